"""The one Hypothesis strategy module for patterns, driven by the primitive registry.

``primitives()`` draws every leaf primitive of ``patternc.ir.primitives.PRIMITIVES`` (a new
registry entry is drawn with no change here) with arguments from its ``Param`` entries:
integers from the parameter's minimum up to ``scale`` (a seed: 0-3), position lists,
every keyword form (``global(n=...)`` / ``global(at=[...])``), and optionally symbolic
``q_len`` / ``kv_len`` expressions that stay in range at every length. A rule between
parameters (the registry's ``constraint``) is met by a repair in ``REPAIR`` (a test checks
every constrained primitive has one). ``patterns()`` composes them with ``~``, ``-``, ``&``,
``|``, ``heads``, ``layers`` and ``blocks``; nodes are built directly, *unnormalised*
(consumers that need canonical IR call ``normalize``). ``sources()`` gives source text for
the reachability tests. Presets: ``layout_patterns`` (lengths up to ~1000 tokens) and
``lang_patterns`` (lengths 1-16, symbolic arguments).
"""

from __future__ import annotations

from hypothesis import strategies as st

from patternc import ir
from patternc.ir.nodes import CAUSAL, And, Blocks, Diff, Heads, Layers, Not, Or, Prim
from patternc.ir.primitives import PRIMITIVES, RUNTIME_PRIMITIVES, check_values

Q, KV = ir.Var("q_len"), ir.Var("kv_len")

# symbolic integers that are >= 1 (resp. >= 0) at every length >= 1
_SYMBOLIC = {
    1: [ir.Fn("max", (1, ir.BinOp("//", Q, 3))), ir.BinOp("+", ir.BinOp("//", KV, 4), 1),
        ir.Fn("isqrt", (Q,)), ir.Fn("min", (Q, KV))],
    0: [ir.BinOp("//", Q, 2), ir.BinOp("-", KV, 1), ir.BinOp("%", Q, 3),
        ir.Fn("max", (0, ir.BinOp("-", Q, 5)))],
}


def _repair_summary(v: dict) -> dict:
    l, c = v["l"], min(v["c"], v["l"])  # noqa: E741
    return {"l": l, "c": c, "g": min(v["g"], l // c - 1)}


# primitives whose registry entry has a `constraint` between parameters: map drawn values
# into range (filtering would reject most draws)
REPAIR = {"summary": _repair_summary}


def leaf_names(reads=None) -> list[str]:
    """Registry names of the leaf primitives (optionally only those whose ``reads`` is in ``reads``).
    Primitives that need run-time data (``document``: SPEC §1.7) are left out: they cannot be
    evaluated alone; ``tests/test_documents.py`` combines them with these patterns."""
    return [n for n, s in PRIMITIVES.items() if not s.combinator and n not in RUNTIME_PRIMITIVES
            and (reads is None or s.reads in reads)]


def _value(param, scale: int, symbolic: bool):
    lo = param.minimum or 0
    if param.kind == "intlist":
        return st.lists(st.integers(0, 3 * scale), max_size=4).map(tuple)
    if not param.unit:  # a seed, not a size
        return st.integers(lo, 3)
    s = st.integers(lo, max(lo, scale))
    if symbolic:
        s = st.one_of(s, st.sampled_from(_SYMBOLIC[min(lo, 1)]))
    return s


@st.composite
def _primitive(draw, name: str, scale: int, symbolic: bool):
    spec = PRIMITIVES[name]
    form = draw(st.sampled_from(spec.forms)) if spec.forms else spec.params
    symbolic = symbolic and spec.constraint is None  # a rule between values needs them concrete
    values = {p.name: draw(_value(p, scale, symbolic)) for p in form}
    if spec.constraint is not None:
        values = REPAIR[name](values)
        assert not check_values(name, values), (name, values)
    return Prim(name, tuple(values.items()))


def primitives(scale: int = 40, symbolic: bool = False, reads=None) -> st.SearchStrategy:
    """One ``Prim`` of the registry, arguments in registry order, defaults filled in.

    Args:
        scale: largest size parameter (tokens).
        symbolic: also draw ``q_len`` / ``kv_len`` expressions.
        reads: only primitives whose registry ``reads`` is one of these (e.g. ``("", "d")``
            for shift-invariant patterns).
    """
    return st.one_of(*[_primitive(n, scale, symbolic) for n in leaf_names(reads)])


def patterns(max_leaves: int = 6, scale: int = 40, symbolic: bool = False, heads: bool = True,
             layers: bool = False, blocks: bool = True, block_max: int = 9, reads=None) -> st.SearchStrategy:
    """Random compositions of registry primitives (unnormalised IR)."""

    def extend(children):
        opts = [
            children.map(Not),
            st.tuples(children, children).map(lambda t: Diff(*t)),
            st.lists(children, min_size=2, max_size=3).map(lambda xs: And(tuple(xs))),
            st.lists(children, min_size=2, max_size=3).map(lambda xs: Or(tuple(xs))),
        ]
        if blocks:
            opts.append(st.tuples(st.integers(1, block_max), children).map(lambda t: Blocks(*t)))
        if heads:
            opts.append(st.lists(children, min_size=1, max_size=3).map(lambda xs: Heads(tuple(xs))))
        if layers:
            opts.append(st.lists(children, min_size=1, max_size=3).map(lambda xs: Layers(tuple(xs))))
        return st.one_of(*opts)

    return st.recursive(primitives(scale, symbolic, reads), extend, max_leaves=max_leaves)


def layout_patterns(max_leaves: int = 6, layers: bool = False) -> st.SearchStrategy:
    """Patterns sized for layouts at lengths up to ~1000 tokens (``LENGTHS``)."""
    return patterns(max_leaves=max_leaves, scale=40, layers=layers, block_max=9)


def lang_patterns(max_leaves: int = 8, symbolic: bool = True) -> st.SearchStrategy:
    """Patterns sized for lengths of 1-16 tokens (``LANG_LENGTHS``), symbolic arguments included."""
    return patterns(max_leaves=max_leaves, scale=6, symbolic=symbolic, layers=True, block_max=4)


@st.composite
def sources(draw, shift_only: bool = False):
    """Source text for the reachability tests: one pattern, or ``heads(...)`` / ``layers(...)``
    of a few, optionally ``& causal``, sometimes inside ``blocks`` (small sizes: n <= 40)."""
    reads = ("", "d") if shift_only else None
    body = patterns(max_leaves=4, scale=6, heads=False, blocks=False, reads=reads)
    kind = draw(st.sampled_from(["plain", "plain", "heads", "layers"]))
    p = draw(body) if kind == "plain" else (Heads if kind == "heads" else Layers)(
        tuple(draw(st.lists(body, min_size=2, max_size=3))))
    if draw(st.booleans()):
        p = And((p, CAUSAL))
    if not shift_only and draw(st.integers(0, 5)) == 0:
        p = Blocks(draw(st.integers(1, 3)), p)
    return ir.to_text(p)


LENGTHS = (1, 97, 130, 191, 232, 1000)
BLOCK_SIZES = (16, 64, 128, (64, 128))

lengths = st.sampled_from(LENGTHS)
block_sizes = st.sampled_from(BLOCK_SIZES)

# Small (Q_LEN, KV_LEN) pairs: square, ragged, Q_LEN != KV_LEN in both directions.
LANG_LENGTHS = [(1, 1), (5, 5), (7, 3), (4, 9), (12, 12)]
