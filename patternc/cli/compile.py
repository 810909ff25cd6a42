"""``patternc compile``: build the exact block layout of one layer; print a summary; ``-o``
writes the compiled artifact (``.npz``, no pickle) atomically."""

from __future__ import annotations

import os
import time

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

MAX_PICTURE_BLOCKS = 64  # ascii pictures for layouts up to this many blocks per side
MAX_PICTURE_HEADS = 4


def register(sub) -> None:
    p = sub.add_parser(
        "compile", help="build the exact block layout (FULL/PARTIAL/EMPTY tiles) of a pattern",
        description="Compile one layer of a pattern to its exact FlexAttention block layout and print "
                    "densities, block counts and the compile time.")
    add_source_args(p)
    p.add_argument("--seq-len", type=int, metavar="N", help="Q_LEN in tokens (required unless --documents gives it)")
    p.add_argument("--kv-len", type=int, metavar="M", help="KV_LEN in tokens (default: --seq-len)")
    p.add_argument("--heads", type=int, metavar="H",
                   help="number of heads (default: the pattern's head period, 1 without heads(...))")
    p.add_argument("--block-size", default="128", metavar="B|Q,KV",
                   help="BLOCK_SIZE in tokens: one int, or Q_BLOCK_SIZE,KV_BLOCK_SIZE (default 128)")
    p.add_argument("--layer", type=int, default=0, metavar="L", help="which layer of a layers(...) stack (default 0)")
    p.add_argument("--plan", choices=("auto", "natural"), default="auto",
                   help="execution plan to print: auto (disjoint terms, each in its cheapest token order; "
                        "default) or natural (one term, the layout as compiled); see docs/execution.md")
    add_offset_args(p)
    add_documents_arg(p)
    p.add_argument("-o", "--output", metavar="OUT", help="write the compiled layout here (.npz, written atomically)")
    p.set_defaults(func=run)


def _check_lengths(args):
    if args.seq_len is None:
        raise UsageError("--seq-len is required (or give --documents, whose sum sets it)")
    check_count("--seq-len", args.seq_len, unit="token")
    check_count("--kv-len", args.kv_len, unit="token")
    check_count("--heads", args.heads)
    check_count("--layer", args.layer, minimum=0)


def run(args) -> int:
    def body(src):
        from ..compiler import compile as compile_pattern
        from ..source.frontdoor import analyse_source

        docs = documents_of(args)
        _check_lengths(args)
        block_size = parse_block_size(args.block_size)
        pattern, res = analyse_source(src.text, params=src.params, filename=src.filename)
        try:
            cp = compile_pattern(pattern, q_len=args.seq_len, kv_len=args.kv_len, num_heads=args.heads,
                                 block_size=block_size, layer=args.layer, **offsets_of(args))
        except PatternError as e:
            if e.code in ("P302", "P303"):  # lengths / block size from the command line
                raise UsageError(e.diagnostic.message + (f" ({e.diagnostic.help})" if e.diagnostic.help else "")) from None
            raise e.with_source(src.text, src.filename) from None
        cp.params = dict(res.params)
        summary = cp.summary()
        summary["needs"] = sorted(cp.needs)
        if docs is not None:
            lay = cp.layout_for(documents=docs)
            summary["documents"] = docs[0]
            summary["document_blocks"] = {"full_blocks": lay.full_blocks, "partial_blocks": lay.partial_blocks,
                                          "empty_blocks": lay.empty_blocks, "block_density": lay.block_density}
        summary["num_layers"] = pattern.num_layers  # of the whole pattern (`layer` picks entry layer mod it)
        t0 = time.perf_counter()
        plan = cp.plan_for(args.plan)
        plan_seconds = time.perf_counter() - t0
        if args.output:
            try:
                cp.save(args.output)
            except OSError as e:
                raise UsageError(f"cannot write {args.output}: {e.strerror or e}") from None
        if args.json:
            out = {"ok": True, **summary, "plan": {**plan.to_dict(), "plan_seconds": plan_seconds},
                   "output": os.fspath(args.output) if args.output else None,
                   "diagnostics": [w.to_json() for w in res.warnings]}
            print_json(out)
        else:
            emit_diagnostics(res.warnings, False)
            print(_render(cp, summary))
            print(f"\n{plan.describe()}\nplan time: {1000 * plan_seconds:.1f} ms")
            if args.output:
                print(f"wrote {args.output}")
        return ExitCode.OK

    return run_guarded(args, body)


def _terms_line(terms) -> str:
    parts = []
    for t in terms:
        extra = ""
        if "slopes" in t:
            shown = ", ".join(f"{m:.6g}" for m in t["slopes"][:8]) + (", ..." if len(t["slopes"]) > 8 else "")
            extra = f" (ALiBi slopes per head: {shown})"
        parts.append(t["text"] + extra)
    return "score terms: " + ", ".join(parts)


def _render(cp, s) -> str:
    qb, kb = s["block_size"]
    lines = [
        f"canonical: {s['canonical']}",
        (f"layer: {s['layer']} (entry {s['layer'] % s['num_layers']} of {s['num_layers']})"
         if s["num_layers"] > 1 else f"layer: {s['layer']}") if s["layer"] or s["num_layers"] > 1 else None,
        _terms_line(s["score_terms"]) if s["score_terms"] else None,
        f"Q_LEN x KV_LEN: {s['q_len']} x {s['kv_len']} tokens, heads: {s['num_heads']}",
        (f"offsets: rows are positions {s['q_offset']}..{s['q_offset'] + s['q_len'] - 1}, columns "
         f"{s['kv_offset']}..{s['kv_offset'] + s['kv_len'] - 1}") if s["q_offset"] or s["kv_offset"] else None,
        f"BLOCK_SIZE: {qb} x {kb} tokens -> {s['num_q_blocks']} x {s['num_kv_blocks']} blocks per head",
        f"tiles: {s['full_blocks']} FULL, {s['partial_blocks']} PARTIAL, {s['empty_blocks']} EMPTY",
        f"token density: {100 * s['density']:.3f}%   block density: {100 * s['block_density']:.3f}%",
        f"compile time: {1000 * s['compile_seconds']:.1f} ms",
        ("needs: documents (run-time input; the numbers above are the bound over every split into documents)"
         if s.get("needs") and "documents" not in s else None),
        (f"documents: {len(s['documents'])} ({', '.join(map(str, s['documents'][:8]))}"
         f"{', ...' if len(s['documents']) > 8 else ''} tokens) -> tiles: {s['document_blocks']['full_blocks']} FULL, "
         f"{s['document_blocks']['partial_blocks']} PARTIAL, {s['document_blocks']['empty_blocks']} EMPTY, "
         f"block density {100 * s['document_blocks']['block_density']:.3f}%") if "documents" in s else None,
    ]
    out = [line for line in lines if line is not None]
    lay = cp.layout
    if lay.num_q_blocks <= MAX_PICTURE_BLOCKS and lay.num_kv_blocks <= MAX_PICTURE_BLOCKS:
        shown = []
        for h in range(min(lay.num_heads, len(cp.head_patterns), MAX_PICTURE_HEADS)):
            title = f"head {h}" if lay.num_heads > 1 else "layout"
            shown.append(f"{title} ('#' FULL, '+' PARTIAL, '.' EMPTY; rows = query blocks):\n{lay.ascii(head=h)}")
        out.append("")
        out.append("\n\n".join(shown))
    return "\n".join(out)
