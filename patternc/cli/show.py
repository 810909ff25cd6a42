"""``patternc show``: draw the token mask or the block layout of one layer, per head, in the
terminal or as a PNG (SPEC §5). See ``patternc.show`` for the views and ``docs/cli.md``."""

from __future__ import annotations

import shutil
import sys

from ..errors import ExitCode, PatternError
from .common import (
    UsageError,
    add_documents_arg,
    add_offset_args,
    add_source_args,
    check_count,
    documents_of,
    emit_diagnostics,
    offsets_of,
    parse_block_size,
    print_json,
    run_guarded,
)


def register(sub) -> None:
    p = sub.add_parser(
        "show",
        help="draw the token mask / block layout (terminal, or a PNG with --png)",
        description="Draw one layer of a pattern: the block layout (# FULL, + PARTIAL, . EMPTY) for "
                    "large lengths, the exact token mask for small ones or for a --window of positions.",
    )
    add_source_args(p)
    p.add_argument("--seq-len", type=int, metavar="N", help="Q_LEN in tokens (required unless --documents gives it)")
    p.add_argument("--kv-len", type=int, metavar="M", help="KV_LEN in tokens (default: --seq-len)")
    p.add_argument("--heads", type=int, metavar="H",
                   help="number of heads (default: the pattern's own head count, from heads(...))")
    p.add_argument("--head", type=int, metavar="h", help="draw only head h (default: every head)")
    p.add_argument("--layer", type=int, default=0, metavar="l", help="entry of layers(...) to draw (default 0)")
    add_offset_args(p)
    add_documents_arg(p)
    p.add_argument("--block-size", default="128", metavar="B",
                   help="BLOCK_SIZE in tokens: B, or Q_BLOCK,KV_BLOCK (default 128)")
    p.add_argument("--window", metavar="Q0:Q1,K0:K1",
                   help="zoom: the token mask of query positions Q0..Q1-1 and key positions K0..K1-1")
    p.add_argument("--view", choices=("auto", "tokens", "blocks"), default="auto",
                   help="tokens (exact mask), blocks (tile kinds) or auto (tokens when they fit)")
    p.add_argument("--width", type=int, metavar="COLS",
                   help="characters available for the picture (default: the terminal's width)")
    p.add_argument("--ascii", action="store_true", help="draw the token mask with # and . instead of █ and ·")
    p.add_argument("--png", metavar="PATH", help="write a PNG (matplotlib) instead of the terminal picture")
    p.add_argument("--plan-term", type=int, metavar="T",
                   help="draw term T of the execution plan in its own query / key order (tile kinds; "
                        "see `patternc compile` for the plan, docs/execution.md)")
    p.set_defaults(func=run)


def _show_plan_term(args, pattern, src) -> int:
    """``--plan-term T``: the tile kinds of one plan term in its own order."""
    from ..compiler import compile as compile_pattern
    from ..lower.layout import FULL, PARTIAL

    try:
        cp = compile_pattern(pattern, q_len=args.seq_len, kv_len=args.kv_len, num_heads=args.heads,
                             block_size=parse_block_size(args.block_size), layer=args.layer)
    except PatternError as e:
        if e.code in ("P302", "P303"):
            raise UsageError(e.diagnostic.message + (f" ({e.diagnostic.help})" if e.diagnostic.help else "")) from None
        raise e.with_source(src.text, src.filename) from None
    plan = cp.plan
    n = len(plan.terms)
    if not 0 <= args.plan_term < n:
        raise UsageError(f"--plan-term must be in 0..{n - 1}: the plan has {n} term{'s' if n != 1 else ''}")
    t = plan.terms[args.plan_term]
    kinds = t.kinds[0]
    if args.json:
        print_json({"ok": True, "term": args.plan_term, **t.to_dict(),
                    "kinds": [[int(x) for x in row] for row in kinds]})
        return ExitCode.OK
    print(f"term {args.plan_term} of {n}: {t.text}")
    print(f"q: {t.q_order} ({t.q_count} tokens)   kv: {t.kv_order} ({t.kv_count} tokens)   "
          f"tiles: {t.computed_tiles} (natural order, whole layer: {plan.natural_tiles})")
    print("('#' FULL, '+' PARTIAL, '.' EMPTY; rows = query blocks, columns = key blocks, in the term's order)")
    for row in kinds:
        print("".join("#" if x == FULL else "+" if x == PARTIAL else "." for x in row))
    return ExitCode.OK


def _ascii_only(args) -> bool:
    if args.ascii:
        return True
    enc = (getattr(sys.stdout, "encoding", None) or "").lower().replace("-", "")
    return enc not in ("utf8", "utf16", "utf32")


def run(args) -> int:
    def body(src):
        from ..show import ShowError, picture, save_png, to_json, to_text
        from ..source.frontdoor import analyse_source

        docs = documents_of(args)
        if args.seq_len is None:
            raise UsageError("--seq-len is required (or give --documents, whose sum sets it)")
        check_count("--seq-len", args.seq_len, unit="token")
        check_count("--kv-len", args.kv_len, unit="token")
        pattern, res = analyse_source(src.text, params=src.params, filename=src.filename)
        emit_diagnostics(res.warnings, args.json)
        if args.width is not None and args.width < 8:
            raise UsageError(f"--width must be at least 8 columns, got {args.width}")
        width = args.width or max(20, shutil.get_terminal_size((100, 24)).columns - 8)
        if args.plan_term is not None:
            return _show_plan_term(args, pattern, src)
        try:
            pic = picture(pattern, q_len=args.seq_len, kv_len=args.kv_len, num_heads=args.heads, head=args.head,
                          block_size=parse_block_size(args.block_size), layer=args.layer, window=args.window,
                          view=args.view, width=width, target="png" if args.png else "terminal",
                          documents=docs, **offsets_of(args))
        except ShowError as e:
            raise UsageError(str(e)) from None
        except PatternError as e:
            if e.code in ("P302", "P303"):  # lengths / heads / block size from the command line
                d = e.diagnostic
                raise UsageError(d.message + (f" ({d.help})" if d.help else "")) from None
            raise e.with_source(src.text, src.filename) from None
        png = None
        if args.png:
            try:
                png = str(save_png(pic, args.png))
            except OSError as e:
                raise UsageError(f"cannot write {args.png}: {e.strerror or e}") from None
        if args.json:
            obj = to_json(pic, ascii_only=True, png=png)
            obj["diagnostics"] = [w.to_json() for w in res.warnings]
            print_json(obj)
        elif png:
            from ..show import header_lines

            print("\n".join(header_lines(pic)))
            print(f"wrote {png} ({pic.view} view)")
        else:
            print(to_text(pic, ascii_only=_ascii_only(args)))
        return ExitCode.OK

    return run_guarded(args, body)
