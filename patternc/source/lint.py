"""Lints over the elaborated and the normalised IR, run by the front door after normalisation.

W002: the pattern uses ``causal`` yet still attends later keys. A syntactic proof
(``ir.facts.proves_causal``) silences it; otherwise the lowering evaluator probes for a
witness pair (``properties.later_key_witness``), and the message points at the part of the
source that breaks causality.
"""

from __future__ import annotations

from ..errors import Diagnostic, Span
from ..ir.facts import proves_causal
from ..ir.nodes import And, Blocks, Diff, Heads, Layers, Or, Pattern, Prim
from ..ir.normalize import normalize
from ..ir.primitives import PRIMITIVES


def lint(p: Pattern, source: str, filename: str) -> list[Diagnostic]:
    """Warnings for the elaborated pattern ``p`` (its spans point into ``source``)."""
    w = causal_warning(p, source, filename)
    return [w] if w else []


def _uses_causal(p: Pattern) -> bool:
    return any(isinstance(n, Prim) and n.name == "causal" for n in p.walk())


def _two_way(c: Pattern) -> bool:
    """A primitive that exists to open bidirectional attention (the registry's ``two_way``:
    `causal | prefix(n)` is the prefix-LM, `causal | global(...)` adds global tokens on
    purpose), so it does not draw W002."""
    return isinstance(c, Prim) and c.name in PRIMITIVES and PRIMITIVES[c.name].two_way


def causal_warning(p: Pattern, source: str, filename: str) -> Diagnostic | None:
    """W002: ``p`` uses ``causal`` yet evaluation finds a query attending a later key.

    Silent when a proof of causality exists (on the elaborated or the normalised IR), when
    the probe finds no witness, or when the parts that break causality are all ``prefix`` /
    ``global`` primitives (deliberately bidirectional)."""
    if not _uses_causal(p) or proves_causal(p):
        return None
    from .properties import later_key_witness

    q = normalize(p)
    if proves_causal(q):
        return None
    witness = later_key_witness(q)
    if witness is None:
        return None
    node = p
    culprit = None
    while True:
        if isinstance(node, (Or, Heads, Layers)):
            bad = [c for c in node.items if not proves_causal(c)]
            if bad and isinstance(node, Or) and all(
                    _two_way(c) for c in bad):
                return None
            with_causal = [c for c in bad if _uses_causal(c)]
            if with_causal and len(bad) == 1:
                node = with_causal[0]
                continue
            culprit = (node, bad[0]) if bad else None
            break
        if isinstance(node, And):
            inner = [c for c in node.items if _uses_causal(c)]
            if len(inner) == 1:
                node = inner[0]
                continue
            culprit = (node, node)
            break
        if isinstance(node, Diff):
            node = node.left
            continue
        culprit = (node, node)
        break
    where, bad = culprit if culprit else (p, p)
    span = bad.span or where.span or p.span
    bad_text = _snippet(source, span) if span else str(bad)
    eg = f" (e.g. query {witness['i']} attends key {witness['j']}"
    eg += f" in head {witness['head']}" if q.num_heads > 1 else ""
    eg += f" of layer {witness['layer']})" if q.num_layers > 1 else ")"
    if isinstance(bad, Blocks):
        msg = f"`{bad_text}` uses `causal` at block level, so its diagonal blocks still let queries attend later keys (j > i){eg}"
        help_ = "every token pair of a kept block is kept (as in DeepSpeed's 'unidirectional' layouts); add `& causal` outside `blocks(...)` for token-level causality"
    else:
        msg = f"the pattern uses `causal`, but `{bad_text}` still lets queries attend later keys (j > i){eg}"
        whole = _snippet(source, p.span) if p.span else str(p)
        help_ = f"apply `causal` to everything: `({whole}) & causal`" if isinstance(where, Or) else "add `& causal` to that part"
        if isinstance(where, Or):
            union = [_snippet(source, c.span) if c.span else str(c) for c in where.items]
            stripped = [t for t in (_strip_causal(u) for u in union) if t != "causal"]
            inner = " | ".join(stripped)
            if len(stripped) > 1:
                help_ = f"apply `causal` to the whole union: `({inner}) & causal`"
            else:
                help_ = f"`| causal` keeps everything `{inner}` allows; did you mean `{inner} & causal`?"
    return Diagnostic("W002", msg, span, help_, severity="warning", filename=filename, source=source)


def _snippet(source: str, span: Span) -> str:
    return " ".join(source[span.start:span.end].split())


def _strip_causal(text: str) -> str:
    t = text.strip()
    for suf in (" & causal", "& causal"):
        if t.endswith(suf):
            return t[: -len(suf)].strip()
    return t
