"""``patternc check``: parse and validate; print the canonical form and properties."""

from __future__ import annotations

from ..errors import ExitCode
from .common import add_source_args, emit_diagnostics, print_json, run_guarded


def register(sub) -> None:
    p = sub.add_parser("check", help="parse and validate a pattern; print its canonical form and properties")
    add_source_args(p)
    p.set_defaults(func=run)


def run(args) -> int:
    def body(src):
        from ..api import analyse_source
        from ..properties import properties

        pattern, res = analyse_source(src.text, params=src.params, filename=src.filename)
        props = properties(pattern)
        if args.json:
            print_json({"ok": True, "canonical": str(pattern), "diagnostics": [w.to_json() for w in res.warnings],
                        **props, "params": res.params})
        else:
            emit_diagnostics(res.warnings, False)
            print(f"canonical: {pattern}")
            for k, v in props.items():
                print(f"{k}: {_fmt(v)}")
            if res.params:
                print("params: " + ", ".join(f"{k}={v}" for k, v in res.params.items()))
        return ExitCode.OK

    return run_guarded(args, body)


def _fmt(v):
    if isinstance(v, bool):
        return "yes" if v else "no"
    return v
