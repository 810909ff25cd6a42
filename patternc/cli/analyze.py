"""``patternc analyze``: reachability through the layer stack (SPEC §4, §5).

Exit codes: 0 when the analysis ran and (with ``--layers k``) every required pair is
reached within k layers; 1 when the pattern has errors, or ``--layers k`` is given and some
pair is out of reach (or not proven reachable by a bound); 2 for usage errors (bad
arguments, an engine that does not apply to this pattern or length).
"""

from __future__ import annotations

import sys
import time
import warnings

from ..errors import ExitCode, PatternError, PatternWarning
from .common import (
    UsageError,
    add_offset_args,
    add_source_args,
    check_count,
    emit_diagnostics,
    offsets_of,
    print_json,
    run_guarded,
)

ENGINE_CHOICES = ("auto", "exact-shift", "exact-token", "block-bound", "networkx")


def register(sub) -> None:
    p = sub.add_parser(
        "analyze",
        help="reachability: in how many layers does every token reach every earlier token?",
        description="Least number of layers connecting every required pair of positions (residual path "
                    "included; a layers(...) stack cycles), with a witness path or an unreachable pair.",
    )
    add_source_args(p)
    p.add_argument("--seq-len", type=int, required=True, metavar="N", help="Q_LEN = KV_LEN, tokens")
    p.add_argument("--layers", type=int, default=None, metavar="K",
                   help="check that every required pair is connected within K layers (exit 1 if not)")
    p.add_argument("--heads", type=int, default=None, metavar="H",
                   help="number of heads (default: the pattern's head period)")
    p.add_argument("--pairs", choices=("earlier", "all"), default="earlier",
                   help="earlier: every j <= i (default); all: every pair")
    p.add_argument("--engine", choices=ENGINE_CHOICES, default="auto", help="analysis engine (default auto)")
    p.add_argument("--block-size", type=int, default=None, metavar="B",
                   help="tokens per block for exact-token / block-bound")
    add_offset_args(p)
    p.set_defaults(func=run)


def run(args) -> int:
    try:
        check_count("--seq-len", args.seq_len)
        check_count("--layers", args.layers, minimum=0)
        check_count("--heads", args.heads)
        check_count("--block-size", args.block_size)
    except UsageError as e:
        return _usage(str(e), args.json)

    def body(src):
        from ..analysis import analyze
        from ..source.frontdoor import analyse_source

        t0 = time.perf_counter()
        pattern, res = analyse_source(src.text, params=src.params, filename=src.filename)
        heads = args.heads if args.heads is not None else pattern.num_heads
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore", PatternWarning)
                report = analyze(pattern, seq_len=args.seq_len, layers=args.layers, num_heads=heads,
                                 pairs=args.pairs, engine=args.engine, block_size=args.block_size,
                                 **offsets_of(args))
        except PatternError as e:
            if e.code.startswith("P40"):  # bad argument / engine not applicable: a usage problem
                if args.json:
                    print_json({"ok": False, "diagnostics": [d.to_json() for d in e.diagnostics]})
                else:
                    print(e.diagnostic.render(), file=sys.stderr)
                return ExitCode.USAGE
            raise
        seconds = time.perf_counter() - t0
        if args.json:
            failed = args.layers is not None and not report.reachable
            obj = {"ok": not failed, **report.to_json(), "seconds": round(seconds, 6),
                   "diagnostics": [w.to_json() for w in res.warnings]}
            print_json(obj)
        else:
            emit_diagnostics(res.warnings, False)
            print(report.format_text())
        if args.layers is not None and not report.reachable:
            return ExitCode.PROBLEMS
        return ExitCode.OK

    return run_guarded(args, body)


def _usage(message, as_json):
    from .common import usage_error

    return usage_error(message, as_json)


__all__ = ["register", "run", "UsageError"]
