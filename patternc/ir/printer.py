"""The canonical printer: Pattern -> text, with the fewest parentheses Python's precedence
needs, except that ``&`` inside ``|`` is always parenthesised (so canonical text never draws
warning W001). ``parse(to_text(p)) == p`` for every normalised pattern.

Primitive arguments are printed as keywords in registry order, defaults omitted
(``summary(l=8, c=1)``, ``random(r=3)``); ``blocks`` takes its block size positionally.
Score terms follow ``with`` in canonical order (``... with softcap(c=50), alibi()``).
"""

from __future__ import annotations

from . import nodes as ir
from .nodes import And, Blocks, Diff, Heads, Layers, Not, Or, Pattern, PerDocument, Prim, Scored, Term
from .primitives import PRIMITIVES

_INT_PREC = {"+": 3, "-": 3, "*": 2, "//": 2, "%": 2}


def int_text(v, parent_prec: int = 9, right: bool = False) -> str:
    if isinstance(v, bool):  # pragma: no cover
        raise TypeError(v)
    if isinstance(v, int):
        s = str(v)
        return f"({s})" if v < 0 and parent_prec < 9 else s
    if isinstance(v, ir.Lit):
        return int_text(v.value, parent_prec, right)
    if isinstance(v, ir.Var):
        return v.name
    if isinstance(v, ir.Fn):
        return f"{v.name}({', '.join(int_text(a) for a in v.args)})"
    if isinstance(v, ir.BinOp):
        prec = _INT_PREC[v.op]
        s = f"{int_text(v.left, prec)} {v.op} {int_text(v.right, prec, right=True)}"
        if prec > parent_prec or (right and prec == parent_prec):
            return f"({s})"
        return s
    raise TypeError(f"not an integer expression: {v!r}")


def _value_text(v) -> str:
    if isinstance(v, tuple):
        return "[" + ", ".join(int_text(x) for x in v) + "]"
    return int_text(v)


def prim_text(p: Prim) -> str:
    spec = PRIMITIVES[p.name]
    defaults = {q.name: q.default for q in spec.params}
    parts = [f"{k}={_value_text(v)}" for k, v in p.args if not (defaults.get(k) is not None and v == defaults[k])]
    return f"{p.name}({', '.join(parts)})" if parts else p.name


def term_text(t: Term) -> str:
    """A score term as keywords, defaults omitted, always with parentheses (``alibi()``,
    ``softcap(c=50)``) so it never reads as a pattern name."""
    from .terms import SCORE_TERMS

    defaults = {q.name: q.default for q in SCORE_TERMS[t.name].params}
    parts = [f"{k}={int_text(v)}" for k, v in t.args if not (defaults.get(k) is not None and v == defaults[k])]
    return f"{t.name}({', '.join(parts)})"


def _prec(p: Pattern) -> int:
    if isinstance(p, Or):
        return 4
    if isinstance(p, And):
        return 3
    if isinstance(p, Diff):
        return 2
    if isinstance(p, Not):
        return 1
    return 0


def to_text(p: Pattern) -> str:
    """Canonical text of ``p`` (iterative over ``|``/``&`` chains, recursive over nesting).

    Example:
        >>> from patternc import parse
        >>> to_text(parse("causal & (strided(64) | local(128))"))
        '(local(w=128) | strided(s=64)) & causal'
    """
    if isinstance(p, Prim):
        return prim_text(p)
    if isinstance(p, Scored):  # only at the root: `with` binds loosest, no parentheses needed
        return to_text(p.pattern) + " with " + ", ".join(term_text(t) for t in p.terms)
    if isinstance(p, Or):
        return " | ".join(_wrap(c, 3) if not isinstance(c, And) else f"({to_text(c)})" for c in p.items)
    if isinstance(p, And):
        return " & ".join(_wrap(c, 3) for c in p.items)
    if isinstance(p, Diff):
        return f"{_wrap(p.left, 2)} - {_wrap(p.right, 1)}"
    if isinstance(p, Not):
        return "~" + _wrap(p.child, 0)
    if isinstance(p, Heads):
        return "heads(" + ", ".join(to_text(c) for c in p.items) + ")"
    if isinstance(p, Layers):
        return "layers(" + ", ".join(to_text(c) for c in p.items) + ")"
    if isinstance(p, Blocks):
        return f"blocks({int_text(p.b)}, {to_text(p.child)})"
    if isinstance(p, PerDocument):
        return f"per_document({to_text(p.child)})"
    raise TypeError(f"not a pattern: {p!r}")


def _wrap(c: Pattern, max_prec: int) -> str:
    s = to_text(c)
    return f"({s})" if _prec(c) > max_prec else s


ir._TEXT.update(pattern=to_text, term=term_text)  # str() of every node (see nodes._TEXT)
