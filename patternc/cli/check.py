"""``patternc check``: parse and validate; print the canonical form and properties."""

from __future__ import annotations

from ..errors import ExitCode
from .common import add_source_args, emit_diagnostics, print_json, run_guarded


def register(sub) -> None:
    p = sub.add_parser("check", help="parse and validate a pattern; print its canonical form and properties",
                       description="Parse and validate a pattern; print its canonical form and its properties "
                                   "(causal, symmetric, heads, layers), with a witness pair for each property "
                                   "that does not hold. Exit 1 when the pattern has errors.")
    add_source_args(p)
    p.set_defaults(func=run)


def run(args) -> int:
    def body(src):
        from ..ir.nodes import score_terms
        from ..ir.terms import terms_json
        from ..source.frontdoor import analyse_source
        from ..source.properties import properties

        pattern, res = analyse_source(src.text, params=src.params, filename=src.filename)
        props = properties(pattern)
        terms = score_terms(pattern)
        if args.json:
            print_json({"ok": True, "canonical": str(pattern), "diagnostics": [w.to_json() for w in res.warnings],
                        **props, "score_terms": terms_json(terms), "params": res.params})
        else:
            emit_diagnostics(res.warnings, False)
            print(f"canonical: {pattern}")
            for line in property_lines(props):
                print(line)
            if terms:
                print("score terms: " + ", ".join(str(t) for t in terms))
            if res.params:
                print("params: " + ", ".join(f"{k}={v}" for k, v in res.params.items()))
        return ExitCode.OK

    return run_guarded(args, body)


def _where(w: dict, heads: int, layers: int) -> str:
    out = ""
    if heads > 1:
        out += f" in head {w['head']}"
    if layers > 1:
        out += f" of layer {w['layer']}"
    return out


def property_lines(props: dict) -> list[str]:
    """``check``'s text lines for ``patternc.properties.properties`` output."""
    def yn(v):
        return "unknown (no proof, no counterexample found)" if v is None else ("yes" if v else "no")

    h, l = props["heads"], props["layers"]
    causal = yn(props["causal"])
    if "causal_witness" in props:
        w = props["causal_witness"]
        causal += f" (query {w['i']} attends the later key {w['j']}{_where(w, h, l)})"
    symmetric = yn(props["symmetric"])
    if "symmetric_witness" in props:
        w = props["symmetric_witness"]
        i, j = w["i"], w["j"]
        symmetric += f" (query {i} attends key {j}, but query {j} does not attend key {i}{_where(w, h, l)})"
    lines = [f"causal: {causal}", f"symmetric: {symmetric}", f"heads: {h}", f"layers: {l}"]
    if props.get("needs"):
        lines.append(f"needs: {', '.join(props['needs'])} (run-time input, SPEC §1.7)")
    return lines
