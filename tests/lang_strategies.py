"""Hypothesis strategies over the pattern IR (``patternc.ir.nodes``).

``patterns()`` draws well-formed, *unnormalised* IR: every primitive of the registry with
valid arguments (sized so that lengths of 1-16 tokens exercise them), sometimes symbolic
(``q_len`` / ``kv_len`` expressions that stay in range at every length), combined with
``~``, ``-``, ``&``, ``|``, ``heads``, ``layers`` and ``blocks``. Shared by the language,
normaliser and formatter tests; other stages may reuse it.
"""

from __future__ import annotations

from hypothesis import strategies as st

from patternc import ir
from patternc.ir.nodes import And, Blocks, Diff, Heads, Layers, Not, Or, Prim

Q, KV = ir.Var("q_len"), ir.Var("kv_len")


def _sym_pos():
    """Symbolic integers that are >= 1 at every length >= 1."""
    return st.sampled_from([
        ir.Fn("max", (1, ir.BinOp("//", Q, 3))),
        ir.BinOp("+", ir.BinOp("//", KV, 4), 1),
        ir.Fn("isqrt", (Q,)),
        ir.Fn("min", (Q, KV)),
    ])


def _sym_nonneg():
    """Symbolic integers that are >= 0 at every length >= 1."""
    return st.sampled_from([
        ir.BinOp("//", Q, 2),
        ir.BinOp("-", KV, 1),
        ir.BinOp("%", Q, 3),
        ir.Fn("max", (0, ir.BinOp("-", Q, 5))),
    ])


def _pos(hi, symbolic):
    s = st.integers(1, hi)
    return st.one_of(s, _sym_pos()) if symbolic else s


def _nonneg(hi, symbolic):
    s = st.integers(0, hi)
    return st.one_of(s, _sym_nonneg()) if symbolic else s


@st.composite
def primitives(draw, symbolic: bool = True):
    """One ``Prim`` with arguments in registry order (defaults filled in)."""
    name = draw(st.sampled_from(["all", "none", "causal", "local", "band", "strided", "dilated", "chunk",
                                 "summary", "sink", "global", "prefix", "random"]))
    if name in ("all", "none", "causal"):
        return Prim(name)
    if name == "local":
        return Prim(name, (("w", draw(_pos(6, symbolic))),))
    if name == "band":
        return Prim(name, (("left", draw(_nonneg(4, symbolic))), ("right", draw(_nonneg(4, symbolic)))))
    if name == "strided":
        return Prim(name, (("s", draw(_pos(5, symbolic))),))
    if name == "dilated":
        return Prim(name, (("w", draw(_pos(4, symbolic))), ("d", draw(st.integers(1, 3)))))
    if name == "chunk":
        return Prim(name, (("l", draw(_pos(5, symbolic))),))
    if name == "summary":
        c = draw(st.integers(1, 3))
        g = draw(st.integers(0, 2))
        l_ = draw(st.integers((g + 1) * c, (g + 1) * c + 3))
        return Prim(name, (("l", l_), ("c", c), ("g", g)))
    if name in ("sink", "prefix"):
        return Prim(name, (("n", draw(_nonneg(5, symbolic))),))
    if name == "global":
        if draw(st.booleans()):
            return Prim(name, (("n", draw(_nonneg(4, symbolic))),))
        return Prim(name, (("at", tuple(draw(st.lists(st.integers(0, 12), max_size=4)))),))
    if name == "random":
        return Prim(name, (("r", draw(st.integers(0, 4))), ("seed", draw(st.integers(0, 3)))))
    raise AssertionError(name)


def patterns(max_leaves: int = 8, symbolic: bool = True, heads: bool = True, layers: bool = True,
             blocks: bool = True):
    """Unnormalised patterns built from ``primitives()``."""

    def extend(children):
        options = [
            children.map(Not),
            st.tuples(children, children).map(lambda t: Diff(*t)),
            st.lists(children, min_size=2, max_size=3).map(lambda xs: And(tuple(xs))),
            st.lists(children, min_size=2, max_size=3).map(lambda xs: Or(tuple(xs))),
        ]
        if heads:
            options.append(st.lists(children, min_size=1, max_size=3).map(lambda xs: Heads(tuple(xs))))
        if layers:
            options.append(st.lists(children, min_size=1, max_size=3).map(lambda xs: Layers(tuple(xs))))
        if blocks:
            options.append(st.tuples(st.integers(1, 4), children).map(lambda t: Blocks(t[0], t[1])))
        return st.one_of(*options)

    return st.recursive(primitives(symbolic), extend, max_leaves=max_leaves)


# Small (Q_LEN, KV_LEN) pairs: square, ragged, Q_LEN != KV_LEN in both directions.
LENGTHS = [(1, 1), (5, 5), (7, 3), (4, 9), (12, 12)]
