"""Hypothesis strategies over the pattern IR (``patternc.ir.nodes``).

``primitives()`` draws every primitive of SPEC §1.1 with valid arguments scaled for lengths
up to ~1000 tokens; ``patterns()`` composes them with ``~``, ``-``, ``&``, ``|``, ``heads``
and ``blocks`` (``layers`` optional). Nodes are built directly (not via text), so they are
not normalised: consumers that need canonical IR call ``patternc.ir.normalize.normalize``.
"""

from __future__ import annotations

from hypothesis import strategies as st

from patternc.ir.nodes import ALL, CAUSAL, NONE, And, Blocks, Diff, Heads, Layers, Not, Or, Prim

small = st.integers(min_value=1, max_value=40)


def _summary(draw_l, c, g):
    # (g + 1) * c <= l
    return Prim("summary", (("l", draw_l), ("c", c), ("g", g)))


@st.composite
def summaries(draw):
    l = draw(st.integers(1, 40))
    c = draw(st.integers(1, l))
    g = draw(st.integers(0, l // c - 1))
    return _summary(l, c, g)


def primitives(max_param: int = 40) -> st.SearchStrategy:
    """Every primitive of SPEC §1.1 with arguments that satisfy its rules."""
    k = st.integers(1, max_param)
    k0 = st.integers(0, max_param)
    return st.one_of(
        st.sampled_from([ALL, NONE, CAUSAL]),
        k.map(lambda w: Prim("local", (("w", w),))),
        st.tuples(k0, k0).map(lambda t: Prim("band", (("left", t[0]), ("right", t[1])))),
        k.map(lambda s: Prim("strided", (("s", s),))),
        st.tuples(st.integers(1, 8), st.integers(1, 8)).map(lambda t: Prim("dilated", (("w", t[0]), ("d", t[1])))),
        k.map(lambda l: Prim("chunk", (("l", l),))),
        summaries(),
        k0.map(lambda n: Prim("sink", (("n", n),))),
        k0.map(lambda n: Prim("global", (("n", n),))),
        st.lists(st.integers(0, 1100), min_size=1, max_size=4, unique=True).map(
            lambda at: Prim("global", (("at", tuple(sorted(at))),))),
        st.integers(0, 300).map(lambda n: Prim("prefix", (("n", n),))),
        st.tuples(st.integers(0, 4), st.integers(0, 3)).map(lambda t: Prim("random", (("r", t[0]), ("seed", t[1])))),
    )


def patterns(max_leaves: int = 6, with_heads: bool = True, with_layers: bool = False) -> st.SearchStrategy:
    """Random compositions of primitives (not normalised)."""

    def extend(children):
        opts = [
            children.map(Not),
            st.tuples(children, children).map(lambda t: Diff(*t)),
            st.lists(children, min_size=2, max_size=3).map(lambda xs: And(tuple(xs))),
            st.lists(children, min_size=2, max_size=3).map(lambda xs: Or(tuple(xs))),
            st.tuples(st.integers(1, 9), children).map(lambda t: Blocks(*t)),
        ]
        if with_heads:
            opts.append(st.lists(children, min_size=1, max_size=3).map(lambda xs: Heads(tuple(xs))))
        return st.one_of(*opts)

    base = st.recursive(primitives(), extend, max_leaves=max_leaves)
    if not with_layers:
        return base
    return st.one_of(base, st.lists(base, min_size=1, max_size=3).map(lambda xs: Layers(tuple(xs))))


LENGTHS = (1, 97, 130, 191, 232, 1000)
BLOCK_SIZES = (16, 64, 128, (64, 128))

lengths = st.sampled_from(LENGTHS)
block_sizes = st.sampled_from(BLOCK_SIZES)


def score_terms() -> st.SearchStrategy:
    """A non-empty tuple of score terms (SPEC §1.8) in canonical order, each at most once."""
    from patternc.ir.nodes import Term

    softcap = st.integers(1, 100).map(lambda c: Term("softcap", (("c", c),)))
    alibi = st.integers(1, 16).map(lambda b: Term("alibi", (("max_bias", b),)))
    return st.one_of(
        softcap.map(lambda t: (t,)),
        alibi.map(lambda t: (t,)),
        st.tuples(softcap, alibi),
    )


def scored_patterns(max_leaves: int = 6) -> st.SearchStrategy:
    """``pattern with terms``: random patterns (layers included) carrying score terms."""
    from patternc.ir.nodes import Scored

    return st.tuples(patterns(max_leaves, with_layers=True), score_terms()).map(lambda t: Scored(*t))
