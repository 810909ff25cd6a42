"""Stage 4: analytic lowering of a pattern to tile kinds (FULL / PARTIAL / EMPTY), exactly,
without Q_LEN x KV_LEN work (numpy only; no torch).

Architecture (details and decisions in ``docs/compiler.md``):

1. **Grid.** Tiles are rectangles ``[q0, q1) x [k0, k1)`` of query and key indices. The
   token grid is uniform (``BLOCK_SIZE``, clipped at the lengths); inside ``blocks(b, p)`` the
   same tiles seen in block coordinates form a general interval grid.
2. **Support classes.** Every sub-pattern is classified by what it reads: only the
   difference ``d = i - j`` (``causal``, ``local``, ``band``, ``strided``, ``dilated`` and any
   boolean combination of them), only ``i``, only ``j`` (``sink``, ``summary``), or more.
   A pure class is lowered *exactly* from one 1-D array: a tile contains every difference in
   ``[q0 - k1 + 1, q1 - 1 - k0]``, so a prefix sum over ``d`` counts the allowed differences
   of every tile at once; likewise prefix sums over ``i`` or ``j``.
3. **Three-valued combination.** ``&``, ``|``, ``~`` combine tile kinds with a fourth,
   internal state MAYBE ("computed, but FULL/EMPTY/PARTIAL not decided"): ``FULL & X = X``,
   ``EMPTY | X = X``, ``PARTIAL & PARTIAL = MAYBE``. Children that read disjoint indices
   (an ``i``-only and a ``j``-only part, e.g. the two halves of ``global``) are independent on a
   rectangle, so for them ``PARTIAL & PARTIAL = PARTIAL`` exactly.
4. **Refinement.** Only MAYBE tiles are decided by counting their allowed pairs exactly:
   with the column sweep (per key column, the query range splits into a few segments on which
   every non-difference atom is constant; each segment is counted with a prefix sum over
   ``d``), or, for patterns with ``random`` / mixed ``blocks``, by evaluating the predicate on
   those tiles only, vectorised in bounded batches.

``evaluate`` is the numpy predicate (broadcasting int64 index arrays) shared by the
refinement, ``CompiledPattern.mask_numpy`` and ``dense_mask``.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass

import numpy as np

from ..ir.nodes import (
    ALL,
    NONE,
    And,
    Blocks,
    Diff,
    Heads,
    Layers,
    Not,
    Or,
    Pattern,
    Prim,
)
from ..ir.primitives import PRIMITIVES, PrimSpec
from ..ir.specialize import cdiv, head_patterns
from .layout import EMPTY, FULL, PARTIAL, BlockLayout, normalize_block_size

MAYBE = 3  # internal only: never stored in a BlockLayout

# elements per vectorised batch (int64 / bool temporaries of this many entries)
BATCH_ELEMENTS = 1 << 20

_E, _P, _F, _M = EMPTY, PARTIAL, FULL, MAYBE
# three-valued tables indexed [a, b] with kinds E=0, P=1, F=2, M=3
AND3 = np.array([[_E, _E, _E, _E], [_E, _M, _P, _M], [_E, _P, _F, _M], [_E, _M, _M, _M]], dtype=np.uint8)
OR3 = np.array([[_E, _P, _F, _M], [_P, _M, _F, _M], [_F, _F, _F, _F], [_M, _M, _F, _M]], dtype=np.uint8)
# the same for independent operands (disjoint index supports): PARTIAL op PARTIAL is PARTIAL
AND_IND = AND3.copy()
AND_IND[_P, _P] = _P
OR_IND = OR3.copy()
OR_IND[_P, _P] = _P
NOT3 = np.array([_F, _P, _E, _M], dtype=np.uint8)


# ---------------------------------------------------------------------------------------------
# grids


@dataclass(frozen=True, eq=False)
class Grid:
    """Tiles ``[q0[a], q1[a]) x [k0[c], k1[c])`` over a ``q_len x kv_len`` index space.

    Attributes:
        q0, q1: int64 [nq], query ranges (non-empty, within [0, q_len)).
        k0, k1: int64 [nk], key ranges (non-empty, within [0, kv_len)).
        q_len, kv_len: lengths of the index space (tokens, or blocks inside ``blocks``).
    """

    q0: np.ndarray
    q1: np.ndarray
    k0: np.ndarray
    k1: np.ndarray
    q_len: int
    kv_len: int

    @classmethod
    def uniform(cls, q_len: int, kv_len: int, q_block: int, kv_block: int, q_offset: int = 0,
                kv_offset: int = 0) -> "Grid":
        """Tiles of Q_LEN rows x KV_LEN columns whose row 0 / column 0 stand at positions
        ``q_offset`` / ``kv_offset`` (SPEC §1.6); the index space is the position extents
        ``q_offset + q_len`` x ``kv_offset + kv_len``."""
        qe, ke = q_offset + q_len, kv_offset + kv_len
        q0 = np.arange(q_offset, qe, q_block, dtype=np.int64)
        k0 = np.arange(kv_offset, ke, kv_block, dtype=np.int64)
        return cls(q0, np.minimum(q0 + q_block, qe), k0, np.minimum(k0 + kv_block, ke), qe, ke)

    @property
    def shape(self) -> tuple[int, int]:
        return (len(self.q0), len(self.k0))

    def inner(self, b: int) -> "Grid":
        """The same rectangles in the coordinates of ``blocks(b, ...)``."""
        return Grid(self.q0 // b, (self.q1 - 1) // b + 1, self.k0 // b, (self.k1 - 1) // b + 1,
                    cdiv(self.q_len, b), cdiv(self.kv_len, b))


# ---------------------------------------------------------------------------------------------
# an internal node: a pattern seen from a shifted origin (``per_document``, lower.perdoc)


@dataclass(frozen=True)
class Shifted(Pattern):
    """Internal (never printed, never normalised): ``child`` evaluated at ``(i + s, j + s)`` in
    an index space of ``q_len x kv_len``. Inside a document that starts at position ``s``,
    ``per_document``'s layouts count in the document's own coordinates (``lower.perdoc``); a
    part of the pattern outside ``per_document`` that is not shift-invariant (``chunk``,
    ``summary``, ``random``, ``blocks`` at an unaligned start) is wrapped in this node there."""

    child: Pattern
    s: int
    q_len: int
    kv_len: int

    def children(self):
        return (self.child,)

    def with_children(self, children):
        return Shifted(children[0], self.s, self.q_len, self.kv_len)

    def grid(self, g: "Grid") -> "Grid":
        """The rectangles of ``g`` in the child's index space."""
        s = self.s
        return Grid(g.q0 + s, g.q1 + s, g.k0 + s, g.k1 + s, self.q_len, self.kv_len)


# ---------------------------------------------------------------------------------------------
# support classes


def _qatom(kind: str, value) -> Prim:
    """Internal one-index atoms: ``_qlt(n)``: i < n, ``_kvlt(n)``: j < n, ``_qin``/``_kvin``: in a set."""
    return Prim(kind, (("v", value),))


def _expand(p: Prim) -> Pattern | None:
    """global / prefix as combinations of one-index atoms (so their halves can be grouped)."""
    a = p.argdict
    if p.name == "global":
        if "n" in a:
            return Or((_qatom("_qlt", a["n"]), _qatom("_kvlt", a["n"])))
        return Or((_qatom("_qin", tuple(a["at"])), _qatom("_kvin", tuple(a["at"]))))
    if p.name == "prefix":
        return And((_qatom("_qlt", a["n"]), _qatom("_kvlt", a["n"])))
    return None


# the lowering's internal one-index atoms (the halves of ``global`` / ``prefix``), in the
# registry's format so ``support`` and ``evaluate`` treat them like primitives
_INTERNAL = {
    s.name: s
    for s in [
        PrimSpec("_qlt", (), "i < v", reads="i", formula=lambda xp, a: (lambda v: lambda i, j: i < v)(a["v"])),
        PrimSpec("_kvlt", (), "j < v", reads="j", formula=lambda xp, a: (lambda v: lambda i, j: j < v)(a["v"])),
        PrimSpec("_qin", (), "i in v", reads="i",
                 formula=lambda xp, a: (lambda f: lambda i, j: f(i))(xp.index_set(a["v"], "q"))),
        PrimSpec("_kvin", (), "j in v", reads="j",
                 formula=lambda xp, a: (lambda f: lambda i, j: f(j))(xp.index_set(a["v"], "kv"))),
    ]
}


def _spec(name: str) -> PrimSpec:
    spec = PRIMITIVES.get(name) or _INTERNAL.get(name)
    if spec is None or spec.formula is None:
        raise ValueError(f"unknown primitive {name!r}")
    return spec


_READS = {"": frozenset(), "d": frozenset("d"), "i": frozenset("i"), "j": frozenset("j"),
          "ij": frozenset("ij"), "x": frozenset("x")}


@functools.lru_cache(maxsize=16384)
def support(p: Pattern) -> frozenset:
    """What ``p`` reads: a subset of {'d', 'i', 'j', 'x'} ('x': both indices, not via i - j),
    from the registry's ``reads`` fact of each primitive.

    The empty set means a constant (``all`` / ``none``)."""
    if isinstance(p, Prim):
        if p.name == "_atom":
            return frozenset()
        return _READS[_spec(p.name).reads]
    if isinstance(p, Blocks):
        s = support(p.child)
        return s if s <= frozenset("ij") else frozenset("x")
    if isinstance(p, Shifted):  # one shift of both indices keeps what each reads
        return support(p.child)
    if isinstance(p, (Heads, Layers)):
        raise ValueError("select a head and a layer before lowering")
    out = frozenset()
    for c in p.children():
        out |= support(c)
    return out


def _pure(s: frozenset) -> str | None:
    """'d', 'i', 'j' or 'c' (constant) when the support is one of them, else None."""
    if not s:
        return "c"
    if len(s) == 1 and "x" not in s:
        return next(iter(s))
    return None


# ---------------------------------------------------------------------------------------------
# the numpy predicate


@functools.lru_cache(maxsize=8)
def random_flat_keys(r: int, seed: int, q_len: int, kv_len: int) -> np.ndarray:
    """int64 [Q_LEN * min(r, KV_LEN)] sorted ``i * KV_LEN + j`` of the pairs ``random(r, seed)``
    draws (SPEC §1.1: one PCG64(seed) generator, rows 0, 1, … in order, ``choice`` without
    replacement)."""
    m = min(r, kv_len)
    if m == 0 or q_len == 0:
        return np.zeros(0, dtype=np.int64)
    rng = np.random.Generator(np.random.PCG64(seed))
    # one row at a time into a preallocated [Q_LEN, m] table: the draws' own 8 bytes each,
    # not a list of Q_LEN small arrays (~120 bytes of object overhead per row)
    flat = np.empty((q_len, m), dtype=np.int64)
    for row in range(q_len):
        flat[row] = rng.choice(kv_len, size=m, replace=False)
    flat += np.arange(0, q_len * kv_len, kv_len, dtype=np.int64)[:, None]  # i * KV_LEN + j
    flat = flat.reshape(-1)
    flat.sort()
    flat.setflags(write=False)
    return flat


def evaluate(p: Pattern, i, j, q_len: int, kv_len: int, code: int = 0) -> np.ndarray:
    """The predicate of a head-free, layer-free pattern on broadcastable index arrays.

    Args:
        p: a Pattern without ``heads``/``layers`` (use ``select_head``/``select_layer``).
        i: int64 array (or int), query indices in [0, q_len).
        j: int64 array (or int), key indices in [0, kv_len) (broadcastable with ``i``).
        q_len, kv_len: Q_LEN and KV_LEN of the index space (tokens).
        code: bit k gives the value of the internal placeholder ``_atom(k)`` (column sweep).

    Returns:
        bool array broadcastable to ``broadcast(i, j)`` (it may have fewer dimensions when
        the pattern ignores an index; ``np.broadcast_to`` it when a full array is needed).
    """
    if isinstance(p, Prim):
        return _eval_prim(p, i, j, q_len, kv_len, code)
    if isinstance(p, Not):
        return ~evaluate(p.child, i, j, q_len, kv_len, code)
    if isinstance(p, Diff):
        return evaluate(p.left, i, j, q_len, kv_len, code) & ~evaluate(p.right, i, j, q_len, kv_len, code)
    if isinstance(p, And):
        out = evaluate(p.items[0], i, j, q_len, kv_len, code)
        for c in p.items[1:]:
            out = out & evaluate(c, i, j, q_len, kv_len, code)
        return out
    if isinstance(p, Or):
        out = evaluate(p.items[0], i, j, q_len, kv_len, code)
        for c in p.items[1:]:
            out = out | evaluate(c, i, j, q_len, kv_len, code)
        return out
    if isinstance(p, Blocks):
        b = p.b
        return evaluate(p.child, np.asarray(i) // b, np.asarray(j) // b, cdiv(q_len, b), cdiv(kv_len, b), code)
    if isinstance(p, Shifted):
        return evaluate(p.child, np.asarray(i) + p.s, np.asarray(j) + p.s, p.q_len, p.kv_len, code)
    raise ValueError(f"cannot evaluate {type(p).__name__} here: select a head and a layer first")


class NumpyArrays:
    """The registry's array namespace on numpy (see ``patternc.ir.primitives``): int64
    ``ndarray`` indices, ``isin`` for position sets, the sorted flat keys of ``random``'s draws.

    Attributes:
        q_len, kv_len: Q_LEN and KV_LEN of the index space (tokens, or blocks inside ``blocks``).
    """

    abs = staticmethod(np.abs)

    def __init__(self, q_len: int, kv_len: int):
        self.q_len, self.kv_len = q_len, kv_len

    @staticmethod
    def const(value: bool):
        return lambda i, j: np.full(np.broadcast(i, j).shape, value)

    @staticmethod
    def index_set(positions, axis: str):
        pos = np.asarray(positions, dtype=np.int64)
        return lambda x: np.isin(x, pos)

    def random_pairs(self, r: int, seed: int):
        q_len, kv_len = self.q_len, self.kv_len
        flat_keys = random_flat_keys(int(r), int(seed), q_len, kv_len)

        def drawn(i, j):
            if flat_keys.size == 0:
                return np.zeros(np.broadcast(i, j).shape, dtype=bool)
            flat = np.asarray(i, dtype=np.int64) * kv_len + j
            pos = np.minimum(np.searchsorted(flat_keys, flat), flat_keys.size - 1)
            return flat_keys[pos] == flat

        return drawn


def _eval_prim(p: Prim, i, j, q_len, kv_len, code):
    if p.name == "_atom":
        return np.full(np.broadcast(i, j).shape, bool((code >> p.arg("k")) & 1))
    pred = _spec(p.name).formula(NumpyArrays(q_len, kv_len), p.argdict)
    return pred(np.asarray(i), np.asarray(j))


def _full(x, shape) -> np.ndarray:
    return np.broadcast_to(np.asarray(x, dtype=bool), shape)


# ---------------------------------------------------------------------------------------------
# exact lowering of pure classes


def _kinds_from_counts(cnt: np.ndarray, area: np.ndarray) -> np.ndarray:
    return np.where(cnt == 0, EMPTY, np.where(cnt == area, FULL, PARTIAL)).astype(np.uint8)


@functools.lru_cache(maxsize=16)
def _d_prefix(p: Pattern, q_len: int, kv_len: int) -> np.ndarray:
    """``_d_prefix_uncached`` for the plain difference lowering, cached per pattern/lengths
    (the sweep's per-assignment tables are not cached: they would pin memory and never hit)."""
    return _d_prefix_uncached(p, q_len, kv_len, 0)


def _d_prefix_uncached(p: Pattern, q_len: int, kv_len: int, code: int) -> np.ndarray:
    """int64 [Q_LEN + KV_LEN]: ps[t] = allowed differences among d = -(KV_LEN-1) ... t-KV_LEN."""
    d = np.arange(-(kv_len - 1), q_len, dtype=np.int64)
    f = _full(evaluate(p, d, 0, q_len, kv_len, code), d.shape)
    ps = np.zeros(q_len + kv_len, dtype=np.int64)
    np.cumsum(f, out=ps[1:])
    ps.setflags(write=False)
    return ps


def _lower_d(p: Pattern, g: Grid) -> np.ndarray:
    """Exact kinds [nq, nk] of a difference-only pattern: one prefix sum over d."""
    K = g.kv_len
    ps = _d_prefix(p, g.q_len, K)
    nq, nk = g.shape
    out = np.empty((nq, nk), dtype=np.uint8)
    rows = max(1, (BATCH_ELEMENTS // 4) // max(nk, 1))  # bounded int64 temporaries
    for r in range(0, nq, rows):
        sl = slice(r, r + rows)
        hi = (g.q1[sl] - 1)[:, None] - g.k0[None, :]  # largest d in the tile
        lo = g.q0[sl, None] - (g.k1 - 1)[None, :]  # smallest d
        out[sl] = _kinds_from_counts(ps[hi + K] - ps[lo + (K - 1)], hi - lo + 1)
    return out


def _axis_kinds(p: Pattern, length: int, lo: np.ndarray, hi: np.ndarray, axis: str, g: Grid) -> np.ndarray:
    idx = np.arange(length, dtype=np.int64)
    f = _full(evaluate(p, idx, 0, g.q_len, g.kv_len) if axis == "i" else evaluate(p, 0, idx, g.q_len, g.kv_len),
              idx.shape)
    ps = np.zeros(length + 1, dtype=np.int64)
    np.cumsum(f, out=ps[1:])
    return _kinds_from_counts(ps[hi] - ps[lo], hi - lo)


def _lower_i(p: Pattern, g: Grid) -> np.ndarray:
    return _axis_kinds(p, g.q_len, g.q0, g.q1, "i", g)[:, None]


def _lower_j(p: Pattern, g: Grid) -> np.ndarray:
    return _axis_kinds(p, g.kv_len, g.k0, g.k1, "j", g)[None, :]


def _lower_chunk(l: int, g: Grid) -> np.ndarray:
    cq0, cq1 = (g.q0 // l)[:, None], ((g.q1 - 1) // l)[:, None]
    ck0, ck1 = (g.k0 // l)[None, :], ((g.k1 - 1) // l)[None, :]
    overlap = (cq0 <= ck1) & (ck0 <= cq1)
    single = (cq0 == cq1) & (ck0 == ck1) & (cq0 == ck0)
    return np.where(single, FULL, np.where(overlap, PARTIAL, EMPTY)).astype(np.uint8)


#: drawn pairs classified per step by ``_lower_random`` (bounds its temporaries: ~10 int64
#: arrays of this length, about 20 MB)
RANDOM_CHUNK = 1 << 18


def _lower_random(r: int, seed: int, g: Grid) -> np.ndarray:
    """Exact kinds from the drawn pairs, sparsely: only tiles holding a drawn pair are
    counted (``np.unique`` over the tile ids of the pairs), every other tile is EMPTY.

    Memory: the uint8 kinds ``[nq, nk]`` plus O(``RANDOM_CHUNK``): the pairs (sorted by row)
    are taken a few tile rows at a time, so no tile's pairs are split. (A dense int64
    histogram and 2-D prefix sum over the tiles cost 8 bytes per tile several times over:
    3.4 GB at 1,048,576 tokens and 128-token blocks.) Tiles are sorted ranges that may
    overlap inside ``blocks`` (a block shared by two tiles): a pair is counted in every tile
    that holds it, and such grids are taken in one step."""
    nq, nk = g.shape
    kinds = np.zeros((nq, nk), dtype=np.uint8)  # EMPTY
    flat = random_flat_keys(r, seed, g.q_len, g.kv_len)
    if flat.size == 0:
        return kinds
    # the pairs inside the grid's rows (with offsets the grid is a sub-grid, SPEC §1.6)
    lo, hi = np.searchsorted(flat, [int(g.q0[0]) * g.kv_len, int(g.q1[-1]) * g.kv_len])
    partition = bool((g.q0[1:] == g.q1[:-1]).all() and (g.k0[1:] == g.k1[:-1]).all())
    if partition:  # cut between tile rows, about RANDOM_CHUNK pairs per step
        starts = np.searchsorted(flat, g.q0 * g.kv_len)
        cuts = [int(lo)]
        for row_start in starts[1:].tolist():
            if row_start - cuts[-1] >= RANDOM_CHUNK:
                cuts.append(row_start)
        cuts.append(int(hi))
    else:
        cuts = [int(lo), int(hi)]
    area_q, area_k = g.q1 - g.q0, g.k1 - g.k0
    out = kinds.reshape(-1)
    for s0, s1 in zip(cuts[:-1], cuts[1:]):
        rows, cols = np.divmod(flat[s0:s1], g.kv_len)
        inside = (cols >= g.k0[0]) & (cols < g.k1[-1])
        if not inside.all():
            rows, cols = rows[inside], cols[inside]
        del inside
        # tiles holding row x: q0[a] <= x < q1[a], a contiguous range of a (q0, q1 sorted)
        ra0, ra1 = np.searchsorted(g.q1, rows, side="right"), np.searchsorted(g.q0, rows, side="right")
        ca0, ca1 = np.searchsorted(g.k1, cols, side="right"), np.searchsorted(g.k0, cols, side="right")
        del rows, cols
        if partition:
            ids = ra0 * nk + ca0
        else:  # one id per (pair, tile holding it)
            nr, nc = np.maximum(ra1 - ra0, 0), np.maximum(ca1 - ca0, 0)
            per = nr * nc
            owner = np.repeat(np.arange(per.size), per)
            local = np.arange(owner.size) - np.repeat(np.cumsum(per) - per, per)
            dr, dc = np.divmod(local, np.repeat(np.maximum(nc, 1), per))
            ids = (ra0[owner] + dr) * nk + ca0[owner] + dc
        del ra0, ra1, ca0, ca1
        if ids.size == 0:
            continue
        u, c = np.unique(ids, return_counts=True)
        del ids
        a, k = np.divmod(u, nk)
        out[u] = np.where(c == area_q[a] * area_k[k], FULL, PARTIAL)
    return kinds


# ---------------------------------------------------------------------------------------------
# three-valued lowering


def _combine(table: np.ndarray, parts: list[np.ndarray]) -> np.ndarray:
    out = parts[0]
    for x in parts[1:]:
        out = table[out, x]
    return out


def _lower(p: Pattern, g: Grid) -> np.ndarray:
    """Kinds (with MAYBE) broadcastable to [nq, nk]."""
    cls = _pure(support(p))
    if cls == "c":
        v = bool(np.all(evaluate(p, 0, 0, g.q_len, g.kv_len)))
        return np.full((1, 1), FULL if v else EMPTY, dtype=np.uint8)
    if cls == "d":
        return _lower_d(p, g)
    if cls == "i":
        return _lower_i(p, g)
    if cls == "j":
        return _lower_j(p, g)
    if isinstance(p, Prim):
        if p.name == "chunk":
            return _lower_chunk(p.arg("l"), g)
        if p.name == "random":
            return _lower_random(p.arg("r"), p.arg("seed"), g)
        e = _expand(p)
        if e is not None:
            return _lower(e, g)
        _spec(p.name)  # unknown primitives raise
        # a primitive with no special tile classification: every tile is decided by counting
        # (the registry's formula evaluated on the tiles, or the column sweep)
        return np.full((1, 1), MAYBE, dtype=np.uint8)
    if isinstance(p, Blocks):
        return lower_exact(p.child, g.inner(p.b))
    if isinstance(p, Shifted):
        return lower_exact(p.child, p.grid(g))
    if isinstance(p, Not):
        return NOT3[_lower(p.child, g)]
    if isinstance(p, Diff):
        return _lower(And((p.left, Not(p.right))), g)
    if isinstance(p, (And, Or)):
        return _lower_junction(p, g)
    raise ValueError(f"cannot lower {type(p).__name__}: select a head and a layer first")


def _flat_items(p: Pattern) -> list[Pattern]:
    """Operands of an And/Or, nested same-operator nodes and global/prefix halves spliced in."""
    out = []
    for c in p.items:
        if isinstance(c, Prim):
            e = _expand(c)
            if e is not None and type(e) is type(p):
                c = e
        if type(c) is type(p):
            out.extend(_flat_items(c))
        else:
            out.append(c)
    return out


def _lower_junction(p: Pattern, g: Grid) -> np.ndarray:
    op = type(p)
    table, ind_table = (AND3, AND_IND) if op is And else (OR3, OR_IND)
    groups: dict[str, list] = {"d": [], "i": [], "j": [], "c": []}
    rest = []
    for c in _flat_items(p):
        cls = _pure(support(c))
        if cls is None:
            rest.append(c)
        else:
            groups[cls].append(c)
    groups["d"] += groups.pop("c")  # constants ride along with any exact group

    def node(items):
        return items[0] if len(items) == 1 else op(tuple(items))

    parts = []
    if groups["d"]:
        parts.append(_lower_d(node(groups["d"]), g))
    ij = [f(node(groups[k]), g) for k, f in (("i", _lower_i), ("j", _lower_j)) if groups[k]]
    if ij:
        parts.append(_combine(ind_table, ij))  # i-only and j-only parts are independent: exact
    parts.extend(_lower(c, g) for c in rest)
    return _combine(table, parts)


def lower_exact(p: Pattern, g: Grid) -> np.ndarray:
    """Exact kinds uint8 [nq, nk] (EMPTY/PARTIAL/FULL): three-valued lowering, then the MAYBE
    tiles refined by exact counting."""
    kinds = np.broadcast_to(_lower(p, g), g.shape)
    maybe = kinds == MAYBE
    if not maybe.any():
        return np.ascontiguousarray(kinds)
    kinds = kinds.copy()
    a, c = np.nonzero(maybe)
    cnt = rect_counts(p, g.q0[a], g.q1[a], g.k0[c], g.k1[c], g.q_len, g.kv_len)
    kinds[a, c] = _kinds_from_counts(cnt, (g.q1 - g.q0)[a] * (g.k1 - g.k0)[c])
    return kinds


# ---------------------------------------------------------------------------------------------
# exact counting of allowed pairs in rectangles


def rect_counts(p: Pattern, q0, q1, k0, k1, q_len: int, kv_len: int) -> np.ndarray:
    """int64 [n]: allowed pairs of ``p`` in each rectangle ``[q0, q1) x [k0, k1)``.

    Uses the column sweep when ``p`` has one, the block decomposition for ``blocks(b, p)``,
    and otherwise evaluates the predicate on the rectangles (vectorised, in batches)."""
    q0, q1, k0, k1 = (np.asarray(x, dtype=np.int64) for x in (q0, q1, k0, k1))
    if q0.size == 0:
        return np.zeros(0, dtype=np.int64)
    plan = sweep_plan(p, q_len, kv_len)
    if plan is not None:
        return plan.counts(q0, q1, k0, k1)
    if isinstance(p, Blocks):
        return _blocks_counts(p, q0, q1, k0, k1, q_len, kv_len)
    if isinstance(p, Shifted):
        s = p.s
        return rect_counts(p.child, q0 + s, q1 + s, k0 + s, k1 + s, p.q_len, p.kv_len)
    r = _top_random(p)
    if r is not None and _points_countable(q0, q1, k0, k1):
        return _random_counts(p, r, q0, q1, k0, k1, q_len, kv_len)
    return brute_counts(p, q0, q1, k0, k1, q_len, kv_len)


MAX_LOOP_RECTS = 64
MAX_SEGMENT_CELLS = 1 << 24


def _points_countable(q0, q1, k0, k1) -> bool:
    if q0.size <= MAX_LOOP_RECTS:
        return True
    nq = np.unique(np.concatenate([q0, q1])).size
    nk = np.unique(np.concatenate([k0, k1])).size
    return nq * nk <= MAX_SEGMENT_CELLS


def _sum_points_in_rects(i, j, w, q0, q1, k0, k1) -> np.ndarray:
    """int64 [n]: sum of weights ``w`` of the points (i, j) inside each rectangle (rectangles
    may overlap): a loop for a few rectangles, else a 2-D prefix sum over the elementary
    segments of their boundaries."""
    out = np.zeros(q0.size, dtype=np.int64)
    if i.size == 0:
        return out
    if q0.size <= MAX_LOOP_RECTS:
        for n in range(q0.size):
            inside = (i >= q0[n]) & (i < q1[n]) & (j >= k0[n]) & (j < k1[n])
            out[n] = int(w[inside].sum())
        return out
    qb = np.unique(np.concatenate([q0, q1]))
    kb = np.unique(np.concatenate([k0, k1]))
    ok = (i >= qb[0]) & (i < qb[-1]) & (j >= kb[0]) & (j < kb[-1])
    sr = np.searchsorted(qb, i[ok], side="right") - 1
    sc = np.searchsorted(kb, j[ok], side="right") - 1
    hist = np.bincount(sr * kb.size + sc, weights=w[ok], minlength=qb.size * kb.size).reshape(qb.size, kb.size)
    P = np.zeros((qb.size + 1, kb.size + 1), dtype=np.int64)
    P[1:, 1:] = np.rint(hist).astype(np.int64).cumsum(0).cumsum(1)
    a0, a1 = np.searchsorted(qb, q0), np.searchsorted(qb, q1)
    c0, c1 = np.searchsorted(kb, k0), np.searchsorted(kb, k1)
    return P[a1, c1] - P[a0, c1] - P[a1, c0] + P[a0, c0]


def _top_random(p: Pattern) -> Prim | None:
    """A ``random`` primitive of ``p`` that is not inside ``blocks`` (or None)."""
    if isinstance(p, Prim):
        return p if p.name == "random" else None
    if isinstance(p, (Blocks, Shifted)):  # its draws live in another index space
        return None
    for c in p.children():
        r = _top_random(c)
        if r is not None:
            return r
    return None


def _substitute(p: Pattern, target: Pattern, value: Pattern) -> Pattern:
    if p == target:
        return value
    if isinstance(p, (Blocks, Shifted)) or not p.children():
        return p
    return p.with_children(tuple(_substitute(c, target, value) for c in p.children()))


def _random_counts(p, r: Prim, q0, q1, k0, k1, q_len, kv_len) -> np.ndarray:
    """Shannon expansion on one ``random`` atom R: p = (R & p[R:=all]) | (~R & p[R:=none]), so
    count(p) = count(p[R:=none]) + sum over R's drawn pairs of (p[R:=all] - p[R:=none]).
    The drawn pairs are Q_LEN * r points: no Q_LEN x KV_LEN work."""
    p_true, p_false = _substitute(p, r, ALL), _substitute(p, r, NONE)
    out = rect_counts(p_false, q0, q1, k0, k1, q_len, kv_len)
    flat = random_flat_keys(r.arg("r"), r.arg("seed"), q_len, kv_len)
    if flat.size == 0:
        return out
    i, j = np.divmod(flat, kv_len)
    diff = (_full(evaluate(p_true, i, j, q_len, kv_len), i.shape).astype(np.int64)
            - _full(evaluate(p_false, i, j, q_len, kv_len), i.shape))
    keep = diff != 0
    return out + _sum_points_in_rects(i[keep], j[keep], diff[keep], q0, q1, k0, k1)


def _countable(p: Pattern, q_len: int, kv_len: int) -> bool:
    """Whether ``rect_counts`` counts the whole matrix without evaluating token pairs."""
    if sweep_plan(p, q_len, kv_len) is not None:
        return True
    if isinstance(p, Blocks):
        b = p.b
        return _countable(p.child, cdiv(q_len, b), cdiv(kv_len, b)) or (cdiv(q_len, b)) * (cdiv(kv_len, b)) <= 1 << 24
    r = _top_random(p)
    return r is not None and _countable(_substitute(p, r, NONE), q_len, kv_len)


def _blocks_counts(p: Blocks, q0, q1, k0, k1, q_len, kv_len) -> np.ndarray:
    """Counts of ``blocks(b, child)``: each rectangle is cut into at most 3 x 3 pieces whose
    inner blocks all carry the same number of tokens (first, middle, last), and the child's
    counts at block level are weighted by those token counts."""
    b = p.b
    Qb, Kb = cdiv(q_len, b), cdiv(kv_len, b)

    def pieces(lo, hi):
        # inner index ranges and token weight of each: (start, stop, weight) x 3
        f, l = lo // b, (hi - 1) // b
        single = f == l
        w_first = np.where(single, hi - lo, (f + 1) * b - lo)
        w_last = np.where(single, 0, hi - l * b)
        mid0, mid1 = f + 1, np.maximum(f + 1, l)
        return [(f, f + 1, w_first), (mid0, mid1, np.full_like(f, b)), (l, l + 1, w_last)]

    total = np.zeros(q0.size, dtype=np.int64)
    for (a0, a1, wa) in pieces(q0, q1):
        for (c0, c1, wc) in pieces(k0, k1):
            ok = (a1 > a0) & (c1 > c0) & (wa > 0) & (wc > 0)
            if not ok.any():
                continue
            cnt = rect_counts(p.child, a0[ok], a1[ok], c0[ok], c1[ok], Qb, Kb)
            total[ok] += cnt * wa[ok] * wc[ok]
    return total


def _split(q0, q1, k0, k1, max_rows: int, max_cols: int):
    """Cut rectangles into pieces of at most max_rows x max_cols; returns pieces and owners."""
    nr = cdiv(q1 - q0, max_rows)
    nc = cdiv(k1 - k0, max_cols)
    per = nr * nc
    owner = np.repeat(np.arange(q0.size), per)
    local = np.arange(per.sum()) - np.repeat(np.cumsum(per) - per, per)
    r, c = np.divmod(local, np.repeat(nc, per))
    pq0 = q0[owner] + r * max_rows
    pk0 = k0[owner] + c * max_cols
    return pq0, np.minimum(pq0 + max_rows, q1[owner]), pk0, np.minimum(pk0 + max_cols, k1[owner]), owner


def brute_counts(p: Pattern, q0, q1, k0, k1, q_len: int, kv_len: int) -> np.ndarray:
    """int64 [n]: allowed pairs per rectangle by evaluating the predicate (batched)."""
    q0, q1, k0, k1 = (np.asarray(x, dtype=np.int64) for x in (q0, q1, k0, k1))
    out = np.zeros(q0.size, dtype=np.int64)
    if q0.size == 0:
        return out
    R, C = int((q1 - q0).max()), int((k1 - k0).max())
    if R * C > BATCH_ELEMENTS:
        side_r = max(1, min(R, BATCH_ELEMENTS // min(C, 1024)))
        side_c = max(1, BATCH_ELEMENTS // side_r)
        pq0, pq1, pk0, pk1, owner = _split(q0, q1, k0, k1, side_r, side_c)
        return np.bincount(owner, weights=brute_counts(p, pq0, pq1, pk0, pk1, q_len, kv_len),
                           minlength=q0.size).astype(np.int64)
    for sl, m in _eval_rects(p, q0, q1, k0, k1, q_len, kv_len):
        out[sl] = m.sum(axis=(1, 2))
    return out


def _eval_rects(p, q0, q1, k0, k1, q_len, kv_len):
    """Yield (slice, bool [n, R, C]) with the predicate on each rectangle, False outside it."""
    R, C = int((q1 - q0).max()), int((k1 - k0).max())
    step = max(1, BATCH_ELEMENTS // (R * C))
    ar, ac = np.arange(R, dtype=np.int64), np.arange(C, dtype=np.int64)
    for s in range(0, q0.size, step):
        sl = slice(s, s + step)
        i = q0[sl, None] + ar
        vi = i < q1[sl, None]
        j = k0[sl, None] + ac
        vj = j < k1[sl, None]
        i = np.minimum(i, q_len - 1)
        j = np.minimum(j, kv_len - 1)
        m = evaluate(p, i[:, :, None], j[:, None, :], q_len, kv_len)
        yield sl, m & vi[:, :, None] & vj[:, None, :]


# ---------------------------------------------------------------------------------------------
# the column sweep


class _Unsupported(Exception):
    pass


@dataclass(eq=False)
class SweepPlan:
    """Exact pair counting for patterns built from difference atoms, one-index atoms and
    ``chunk``: for each key column ``j`` of a rectangle, the query range is cut at the
    breakpoints of the non-difference atoms (``i``-atoms, the chunk of ``j``); on each segment
    those atoms are constant (a ``code``), so the predicate is a difference-only function there
    and a prefix sum over ``d`` counts it."""

    skeleton: Pattern  # difference-only, with _atom(k) placeholders
    atoms: list  # [(kind, payload)]: ("i", bool [Q]), ("j", bool [K]), ("chunk", (l, offset))
    i_breaks: np.ndarray  # int64, positions where some i-atom changes value
    q_len: int
    kv_len: int

    def _prefix_table(self, codes) -> np.ndarray:
        return np.stack([_d_prefix_uncached(self.skeleton, self.q_len, self.kv_len, int(c)) for c in codes])

    def _all_codes_table(self) -> np.ndarray | None:
        """int64 [2**atoms, Q_LEN + KV_LEN] prefix sums for every atom assignment, when small
        (built per ``counts`` call, not kept: plans are cached, tables would pile up)."""
        n = 1 << len(self.atoms)
        if n * (self.q_len + self.kv_len) > MAX_TABLE_ENTRIES:
            return None
        return self._prefix_table(range(n))

    def counts(self, q0, q1, k0, k1) -> np.ndarray:
        out = np.zeros(q0.size, dtype=np.int64)
        W = int((k1 - k0).max())
        nb = 2 + self.i_breaks.size + 2 * sum(1 for a in self.atoms if a[0] == "chunk")
        if W * nb > BATCH_ELEMENTS:
            max_cols = max(1, BATCH_ELEMENTS // nb)
            pq0, pq1, pk0, pk1, owner = _split(q0, q1, k0, k1, int((q1 - q0).max()), max_cols)
            return np.bincount(owner, weights=self.counts(pq0, pq1, pk0, pk1), minlength=q0.size).astype(np.int64)
        step = max(1, BATCH_ELEMENTS // (W * nb))
        table = self._all_codes_table()
        for s in range(0, q0.size, step):
            sl = slice(s, s + step)
            out[sl] = self._counts_batch(q0[sl], q1[sl], k0[sl], k1[sl], W, table)
        return out

    def _counts_batch(self, q0, q1, k0, k1, W, table) -> np.ndarray:
        Q, K = self.q_len, self.kv_len
        cols = k0[:, None] + np.arange(W, dtype=np.int64)  # [n, W]
        cvalid = cols < k1[:, None]
        np.minimum(cols, K - 1, out=cols)
        r0 = np.broadcast_to(q0[:, None], cols.shape)
        r1 = np.broadcast_to(q1[:, None], cols.shape)
        # breakpoints strictly inside [r0, r1] (only they need sorting)
        mids = [np.clip(np.int64(x), r0, r1) for x in self.i_breaks]
        for kind, payload in self.atoms:
            if kind == "chunk":  # chunks of l tokens whose boundaries sit at -o mod l
                ln, o = payload
                start = ((cols + o) // ln) * ln - o
                mids.append(np.clip(start, r0, r1))
                mids.append(np.clip(start + ln, r0, r1))
        parts = [r0[..., None]]
        if mids:
            parts.append(np.sort(np.stack(mids, axis=-1), axis=-1))
        parts.append(r1[..., None])
        B = np.concatenate(parts, axis=-1)  # [n, W, nb], ascending
        s, e = B[..., :-1], B[..., 1:]
        valid = (e > s) & cvalid[..., None]
        code = np.zeros(s.shape, dtype=np.int64)
        cc = cols[..., None]
        for k, (kind, payload) in enumerate(self.atoms):
            if kind == "i":
                v = payload[np.minimum(s, Q - 1)]
            elif kind == "j":
                v = payload[cc]
            else:
                ln, o = payload
                v = ((s + o) // ln) == ((cc + o) // ln)
            code |= v.astype(np.int64) << k
        if table is None:
            present = np.flatnonzero(np.bincount(code[valid], minlength=1 << len(self.atoms)))
            if present.size == 0:
                return np.zeros(q0.size, dtype=np.int64)
            table = self._prefix_table(present)
            code = np.minimum(np.searchsorted(present, code), present.size - 1)
        width = Q + K
        base = code * width
        hi = e - cc  # index of d = e - 1 - j in the prefix sums, plus one: (e - 1 - j) + K
        hi += K - 1
        lo = s - cc
        lo += K - 1
        np.clip(hi, 0, width - 1, out=hi)
        np.clip(lo, 0, width - 1, out=lo)
        flat = table.ravel()
        cnt = flat[base + hi] - flat[base + lo]
        cnt[~valid] = 0
        return cnt.sum(axis=(1, 2))


MAX_TABLE_ENTRIES = 1 << 21
MAX_SWEEP_ATOMS = 10
MAX_I_BREAKS = 64


@functools.lru_cache(maxsize=16)
def sweep_plan(p: Pattern, q_len: int, kv_len: int) -> SweepPlan | None:
    """The column-sweep plan of ``p``, or None when ``p`` reads ``random`` or a mixed
    ``blocks`` (or has too many atoms / query breakpoints to sweep cheaply)."""
    atoms: list = []
    keys: dict = {}
    try:
        skel = _atomize(p, atoms, keys)
    except _Unsupported:
        return None
    if len(atoms) > MAX_SWEEP_ATOMS:
        return None
    vals = []
    breaks = set()
    for kind, node in atoms:
        if kind == "i":
            idx = np.arange(q_len, dtype=np.int64)
            v = _full(evaluate(node, idx, 0, q_len, kv_len), idx.shape)
            breaks.update((np.flatnonzero(v[1:] != v[:-1]) + 1).tolist())
            vals.append(("i", v))
        elif kind == "j":
            idx = np.arange(kv_len, dtype=np.int64)
            vals.append(("j", _full(evaluate(node, 0, idx, q_len, kv_len), idx.shape)))
        else:
            vals.append(("chunk", node))
    if len(breaks) > MAX_I_BREAKS:
        return None
    return SweepPlan(skel, vals, np.array(sorted(breaks), dtype=np.int64), q_len, kv_len)


def _atomize(p: Pattern, atoms: list, keys: dict) -> Pattern:
    cls = _pure(support(p))
    if cls in ("d", "c"):
        return p

    def placeholder(key):
        if key not in keys:
            keys[key] = len(atoms)
            atoms.append(key)
        return Prim("_atom", (("k", keys[key]),))

    if cls in ("i", "j"):
        return placeholder((cls, p))
    if isinstance(p, Prim):
        if p.name == "chunk":
            return placeholder(("chunk", (p.arg("l"), 0)))
        e = _expand(p)
        if e is not None:
            return _atomize(e, atoms, keys)
        raise _Unsupported(p.name)
    if isinstance(p, Shifted):
        c = p.child
        if isinstance(c, Prim) and c.name == "chunk":
            return placeholder(("chunk", (c.arg("l"), p.s)))
        if isinstance(c, (Not, Diff, And, Or)):  # the shift distributes over the operators
            return _atomize(c.with_children(tuple(Shifted(x, p.s, p.q_len, p.kv_len) for x in c.children())),
                            atoms, keys)
        raise _Unsupported("shifted " + type(c).__name__)
    if isinstance(p, (Not, Diff, And, Or)):
        return p.with_children(tuple(_atomize(c, atoms, keys) for c in p.children()))
    raise _Unsupported(type(p).__name__)


# ---------------------------------------------------------------------------------------------
# whole layouts


def lower_to_layout(p: Pattern, q_len: int, kv_len: int, block_size, num_heads: int, *,
                    q_offset: int = 0, kv_offset: int = 0) -> BlockLayout:
    """Exact ``BlockLayout`` of a layer-free, length-bound pattern (SPEC §3).

    Args:
        p: Pattern without ``layers``/symbolic lengths (``heads`` allowed), bound at the
            position extents ``q_offset + q_len``, ``kv_offset + kv_len``.
        q_len, kv_len: Q_LEN, KV_LEN (rows and columns, tokens, >= 1).
        block_size: int or (Q_BLOCK_SIZE, KV_BLOCK_SIZE), tokens.
        num_heads: H; head h uses entry ``h mod m`` of each ``heads(...)``.
        q_offset, kv_offset: positions of row 0 / column 0 (SPEC §1.6, tokens, >= 0).

    Returns:
        BlockLayout with kinds uint8 [H, num_q_blocks, num_kv_blocks] (tiles of rows x columns).
    """
    qb, kb = normalize_block_size(block_size)
    g = Grid.uniform(q_len, kv_len, qb, kb, q_offset, kv_offset)
    per_head = []
    seen: dict = {}
    for ph in head_patterns(p, num_heads):
        if ph not in seen:
            seen[ph] = lower_exact(ph, g)
        per_head.append(seen[ph])
    period = len(per_head)
    if num_heads == 1:
        kinds = per_head[0][None]
    else:
        kinds = np.stack([per_head[h % period] for h in range(num_heads)])
    kinds = np.ascontiguousarray(kinds, dtype=np.uint8)
    kinds.setflags(write=False)
    return BlockLayout(kinds=kinds, q_len=q_len, kv_len=kv_len, q_block_size=qb, kv_block_size=kb,
                       q_offset=q_offset, kv_offset=kv_offset)


def count_allowed(p: Pattern, layout: BlockLayout, head: int) -> int:
    """Exact number of allowed token pairs of head-free pattern ``p`` (head ``head`` of
    ``layout``): analytically where possible, else FULL tiles plus PARTIAL tiles counted."""
    qo, ko = layout.q_offset, layout.kv_offset
    Q, K = qo + layout.q_len, ko + layout.kv_len  # position extents
    if _countable(p, Q, K):
        return int(rect_counts(p, [qo], [Q], [ko], [K], Q, K)[0])
    kinds = layout.kinds[head]
    g = Grid.uniform(layout.q_len, layout.kv_len, layout.q_block_size, layout.kv_block_size, qo, ko)
    area = (g.q1 - g.q0)[:, None] * (g.k1 - g.k0)[None, :]
    total = int(area[kinds == FULL].sum())
    a, c = np.nonzero(kinds == PARTIAL)
    total += int(rect_counts(p, g.q0[a], g.q1[a], g.k0[c], g.k1[c], Q, K).sum())
    return total


def dense_from_layout(p_heads: list[Pattern], layout: BlockLayout) -> np.ndarray:
    """bool [H, Q_LEN, KV_LEN]: FULL tiles filled, PARTIAL tiles evaluated (small sizes)."""
    H, Q, K = layout.num_heads, layout.q_len, layout.kv_len
    qo, ko = layout.q_offset, layout.kv_offset
    qb, kb = layout.block_size
    g = Grid.uniform(Q, K, qb, kb, qo, ko)
    out = np.zeros((H, Q, K), dtype=bool)
    for h in range(H):
        ph = p_heads[h % len(p_heads)]
        kinds = layout.kinds[h]
        full = np.repeat(np.repeat(kinds == FULL, qb, axis=0), kb, axis=1)[:Q, :K]
        out[h] = full
        a, c = np.nonzero(kinds == PARTIAL)
        if a.size == 0:
            continue
        q0, q1, k0, k1 = g.q0[a], g.q1[a], g.k0[c], g.k1[c]
        for sl, m in _eval_rects(ph, q0, q1, k0, k1, g.q_len, g.kv_len):
            ii = q0[sl, None, None] - qo + np.arange(m.shape[1])[None, :, None]
            jj = k0[sl, None, None] - ko + np.arange(m.shape[2])[None, None, :]
            ok = (ii < q1[sl, None, None] - qo) & (jj < k1[sl, None, None] - ko)
            ii, jj = np.broadcast_arrays(ii, jj)
            out[h, ii[ok], jj[ok]] = m[ok]
    return out


__all__ = ["Grid", "MAYBE", "Shifted", "support", "evaluate", "lower_exact", "lower_to_layout", "rect_counts",
           "brute_counts", "sweep_plan", "SweepPlan", "count_allowed", "dense_from_layout", "head_patterns",
           "random_flat_keys", "NumpyArrays", "ALL", "NONE"]
