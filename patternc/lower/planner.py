"""Execution plans (SPEC §6): a layer's pattern as disjoint terms, each in the order where it
is cheap (numpy; reasons about tiles, imports no torch).

Basics
    A block-sparse kernel computes every tile a pattern touches. In natural token order some
    patterns touch far more tiles than their token density suggests: the diagonals of
    ``strided(s) & causal`` cross every tile below the diagonal, the summary columns of
    ``fixed(l, c)`` cross every ``l / BLOCK_SIZE``-th key block. Reordering the tokens of one
    axis (or both) packs those pairs into few tiles:

    ========================  ===================================  =============================
    order (``Order.kind``)    position x goes to                   for
    ========================  ===================================  =============================
    ``natural``               x                                    ``local``, ``band``, ``chunk``,
                                                                   ``causal``, ``sink``, ``prefix``
    ``residue``  (stride s)   rank of ``(x mod s, x div s)``       ``strided(s)``, ``dilated(w, s)``
                                                                   (OpenAI's "strided transpose")
    ``front``    (a set)      the set's positions first (in order) ``summary``, ``global(at=…)``
    ========================  ===================================  =============================

    In residue order ``strided(s) & causal`` is block-diagonal causal (one causal block of
    ``ceil(N / s)`` tokens per residue class); in front order the summary columns of
    ``fixed`` are a few dense key blocks. A term whose kept pairs stop before the end of an
    axis in its order is a **gather**: only that prefix of the order is read (trailing
    EMPTY blocks are dropped).

Algorithm (per distinct head pattern, ``plan_layer``)
    1. Disjuncts: the pattern is rewritten as a union ``A1 | A2 | …`` (``|`` flattened, ``&``
       distributed over ``|``, ``a - b`` kept per disjunct of ``a``; at most
       ``MAX_DISJUNCTS``, else the pattern is one disjunct).
    2. Candidates: every disjunct proposes the orders its primitives suggest (table above;
       primitives under ``~`` or on the right of ``-`` propose nothing); natural is always a
       candidate.
    3. Grouping: disjuncts whose best order is natural form the first term (in natural
       order); the others are grouped by their best order, and term k is its group's union
       minus every earlier term (``-``), so terms are disjoint and their union is the
       pattern. A group is kept in its own order only if that costs less than the tiles it
       adds to the natural term; otherwise it joins the natural term.
    4. Cost model, in tiles: a term costs its computed tiles, plus ``GATHER_COST`` per
       gathered block of queries or keys, plus ``MERGE_COST`` per query block of a term
       merged into the result. The plan is used only if it costs less than natural order
       (``natural_tiles``); otherwise the plan is one natural term.

    Tile kinds in a natural order come from the exact analytic lowering; in another order
    they are counted by evaluating the predicate over the term's rows in bounded batches
    (``Q_LEN x KV_LEN`` work, no ``Q_LEN x KV_LEN`` memory). Past ``PLAN_EVAL_ELEMENTS``
    evaluations a layer is not reordered (the plan says so in ``note``).
"""

from __future__ import annotations

import functools
import itertools
from dataclasses import dataclass, field

import numpy as np

from ..ir.nodes import And, Diff, Or, Pattern, Prim
from ..ir.specialize import cdiv
from .layout import EMPTY, FULL, PARTIAL, BlockLayout
from .lowering import evaluate, lower_to_layout, support

#: most disjuncts after distributing ``&`` over ``|``
MAX_DISJUNCTS = 16
#: cost of gathering one block of queries or keys into a term's order, in tiles
GATHER_COST = 0.1
#: cost of merging one query block of a term into the result through the log-sum-exp, in tiles
MERGE_COST = 0.25
#: predicate evaluations a plan may spend on tile kinds in non-natural orders (per layer)
PLAN_EVAL_ELEMENTS = 1 << 31
#: elements per evaluation batch
_BATCH = 1 << 22


# ---- orders --------------------------------------------------------------------------------
@dataclass(frozen=True)
class Order:
    """A token order of one axis.

    Attributes:
        kind: ``"natural"``, ``"residue"`` or ``"front"``.
        stride: s of ``residue`` (x -> (x mod s, x div s)).
        front: for ``front``, a head-free pattern true exactly for the key columns (or query
            rows) that come first; ``axis`` says which index it reads.
    """

    kind: str = "natural"
    stride: int = 0
    front: Pattern | None = None

    def permutation(self, length: int, axis: str) -> np.ndarray:
        """int64 [length]: the natural position at each place of this order."""
        x = np.arange(length, dtype=np.int64)
        if self.kind == "residue":
            return np.lexsort((x // self.stride, x % self.stride))
        if self.kind == "front":
            sel = _axis_set(self.front, length, axis)
            return np.concatenate([x[sel], x[~sel]])
        return x

    def __str__(self) -> str:
        if self.kind == "residue":
            return f"residue mod {self.stride}"
        if self.kind == "front":
            return f"gather {_front_text(self.front)} first"
        return "natural"

    def to_dict(self) -> dict:
        d = {"kind": self.kind}
        if self.kind == "residue":
            d["stride"] = self.stride
        if self.kind == "front":
            d["front"] = _front_text(self.front)
        return d


def _front_text(p: Pattern) -> str:
    if isinstance(p, Prim) and p.name in ("_qin", "_kvin"):
        return "positions [" + ", ".join(str(x) for x in p.arg("v")) + "]"
    return str(p)


NATURAL = Order()


def _axis_set(p: Pattern, length: int, axis: str) -> np.ndarray:
    """bool [length]: positions of ``axis`` ("q" or "kv") where the one-index pattern holds."""
    x = np.arange(length, dtype=np.int64)
    if axis == "kv":
        return np.broadcast_to(evaluate(p, np.int64(length), x, length + 1, length), (length,)).copy()
    return np.broadcast_to(evaluate(p, x, np.int64(length), length, length + 1), (length,)).copy()


# ---- terms and plans -------------------------------------------------------------------------
@dataclass
class PlanTerm:
    """One disjoint term of a plan.

    Attributes:
        pattern: head-free Pattern of the term's pairs (canonical text: ``str(pattern)``).
        heads: the query heads it covers (tuple of ints).
        q_order, kv_order: ``Order`` of each axis.
        kinds: uint8 [1, nq_t, nkv_t] tile kinds in the term's order (gathered prefix only).
        q_count, kv_count: tokens read of each axis, in the term's order (<= Q_LEN, KV_LEN).
        computed_tiles: FULL + PARTIAL tiles of ``kinds`` times ``len(heads)``.
        cost: the cost model's value (tiles).
    """

    pattern: Pattern
    heads: tuple
    q_order: Order
    kv_order: Order
    kinds: np.ndarray
    q_count: int
    kv_count: int
    computed_tiles: int
    cost: float

    @property
    def text(self) -> str:
        return str(self.pattern)

    def q_positions(self, q_len: int) -> np.ndarray:
        """int64 [q_count]: natural query row of each term row."""
        return self.q_order.permutation(q_len, "q")[:self.q_count]

    def kv_positions(self, kv_len: int) -> np.ndarray:
        """int64 [kv_count]: natural key column of each term column."""
        return self.kv_order.permutation(kv_len, "kv")[:self.kv_count]

    def layout(self, block_size) -> BlockLayout:
        """The term's ``BlockLayout`` in its own order (``q_len = q_count``, ``kv_len = kv_count``)."""
        return BlockLayout(kinds=self.kinds, q_len=self.q_count, kv_len=self.kv_count,
                           q_block_size=block_size[0], kv_block_size=block_size[1])

    def layout_at(self, block_size, q_len: int, kv_len: int) -> BlockLayout:
        """The term's layout at another tile size (tokens), over the same rows and columns
        (``q_count`` x ``kv_count``); ``q_len`` / ``kv_len`` are the layer's (the orders' extent).
        The CPU kernel may compute a term at finer tiles than the BlockMask's."""
        qb, kb = block_size
        kinds = _kinds_cached(self.pattern, self.q_order, self.kv_order, q_len, kv_len, (qb, kb))
        kinds = kinds[:, :cdiv(self.q_count, qb), :cdiv(self.kv_count, kb)]
        return BlockLayout(kinds=kinds, q_len=self.q_count, kv_len=self.kv_count, q_block_size=qb, kv_block_size=kb)

    def to_dict(self) -> dict:
        return {"pattern": self.text, "heads": list(self.heads), "q_order": self.q_order.to_dict(),
                "kv_order": self.kv_order.to_dict(), "q_tokens": self.q_count, "kv_tokens": self.kv_count,
                "computed_tiles": self.computed_tiles, "cost": round(self.cost, 3)}


@dataclass
class ExecutionPlan:
    """A layer's attention as disjoint terms (SPEC §6); see the module docstring.

    Attributes:
        terms: list of ``PlanTerm`` (disjoint; their union is the layer's pattern).
        q_len, kv_len: Q_LEN, KV_LEN (tokens); block_size: (Q_BLOCK_SIZE, KV_BLOCK_SIZE).
        num_heads: H.
        computed_tiles: tiles the plan computes, over all heads and terms.
        natural_tiles: tiles natural order computes (the layout's FULL + PARTIAL).
        cost, natural_cost: the cost model's values (tiles).
        note: why the plan is natural, when it is.
    """

    terms: list
    q_len: int
    kv_len: int
    block_size: tuple
    num_heads: int
    natural_tiles: int
    natural_cost: float
    note: str = ""
    _cache: dict = field(default_factory=dict, repr=False, compare=False)

    @property
    def computed_tiles(self) -> int:
        return int(sum(t.computed_tiles for t in self.terms))

    @property
    def cost(self) -> float:
        return float(sum(t.cost for t in self.terms))

    #: True iff the plan is the natural order's one term (the compiled layout itself)
    natural_layout: bool = False

    @property
    def is_natural(self) -> bool:
        return self.natural_layout

    def to_dict(self) -> dict:
        return {"terms": [t.to_dict() for t in self.terms], "computed_tiles": self.computed_tiles,
                "natural_tiles": self.natural_tiles, "cost": round(self.cost, 3),
                "natural_cost": round(self.natural_cost, 3), "natural": self.is_natural, "note": self.note}

    def describe(self) -> str:
        """Human-readable lines (what ``patternc compile`` prints)."""
        nt = max(1, self.natural_tiles)
        head = (f"plan: {len(self.terms)} term{'s' if len(self.terms) != 1 else ''}, "
                f"{self.computed_tiles} computed tiles (natural order: {self.natural_tiles}, "
                f"{100.0 * self.computed_tiles / nt:.1f}%)")
        lines = [head]
        if self.note:
            lines.append(f"  ({self.note})")
        for n, t in enumerate(self.terms):
            heads = "" if len(t.heads) == self.num_heads else f" heads {list(t.heads)}"
            lines.append(f"  term {n}: {t.text}{heads}")
            lines.append(f"    q: {t.q_order} ({t.q_count} tokens)   kv: {t.kv_order} ({t.kv_count} tokens)   "
                         f"tiles: {t.computed_tiles}")
        return "\n".join(lines)

    def __str__(self) -> str:
        return self.describe()


# ---- disjuncts and candidates -------------------------------------------------------------------
def disjuncts(p: Pattern, limit: int = MAX_DISJUNCTS) -> list[Pattern]:
    """``p`` as a list of patterns whose union is ``p`` (``|`` flattened, ``&`` distributed)."""
    if isinstance(p, Or):
        out = []
        for c in p.items:
            out.extend(disjuncts(c, limit))
        return out if len(out) <= limit else [p]
    if isinstance(p, And):
        parts = [disjuncts(c, limit) for c in p.items]
        n = 1
        for x in parts:
            n *= len(x)
        if n == 1 or n > limit:
            return [p]
        return [_and(combo) for combo in itertools.product(*parts)]
    if isinstance(p, Diff):
        left = disjuncts(p.left, limit)
        return [Diff(d, p.right) for d in left] if len(left) > 1 else [p]
    return [p]


def _and(items) -> Pattern:
    flat = []
    for x in items:
        flat.extend(x.items if isinstance(x, And) else [x])
    return flat[0] if len(flat) == 1 else And(tuple(flat))


def _or(items) -> Pattern:
    flat = []
    for x in items:
        flat.extend(x.items if isinstance(x, Or) else [x])
    return flat[0] if len(flat) == 1 else Or(tuple(flat))


def _positive_prims(p: Pattern):
    """Primitives that constrain ``p`` positively (through ``&``, ``|``, the left of ``-``)."""
    if isinstance(p, Prim):
        yield p
    elif isinstance(p, (And, Or)):
        for c in p.items:
            yield from _positive_prims(c)
    elif isinstance(p, Diff):
        yield from _positive_prims(p.left)


def candidates(p: Pattern) -> list[tuple[Order, Order]]:
    """(q order, kv order) pairs worth trying for a disjunct, natural first."""
    out = [(NATURAL, NATURAL)]
    for prim in _positive_prims(p):
        a = prim.argdict
        if prim.name == "strided" and a["s"] > 1:
            o = Order("residue", stride=int(a["s"]))
            out.append((o, o))
        elif prim.name == "dilated" and a["d"] > 1:
            o = Order("residue", stride=int(a["d"]))
            out.append((o, o))
        elif prim.name == "summary":
            out.append((NATURAL, Order("front", front=prim)))
        elif prim.name == "global" and prim.arg("at") is not None:
            keys = Prim("_kvin", (("v", tuple(prim.arg("at"))),))
            rows = Prim("_qin", (("v", tuple(prim.arg("at"))),))
            out.append((Order("front", front=rows), Order("front", front=keys)))
    seen, uniq = set(), []
    for c in out:
        if c not in seen:
            seen.add(c)
            uniq.append(c)
    return uniq


# ---- tile kinds in an order ----------------------------------------------------------------------
def _natural_kinds(p: Pattern, q_len: int, kv_len: int, block_size) -> np.ndarray:
    return np.asarray(lower_to_layout(p, q_len, kv_len, block_size, 1).kinds)


def kinds_in_order(p: Pattern, q_perm: np.ndarray, kv_perm: np.ndarray, q_len: int, kv_len: int,
                   block_size) -> np.ndarray:
    """uint8 [1, ceil(len(q_perm)/qb), ceil(len(kv_perm)/kb)]: tile kinds of ``p`` with rows
    ``q_perm`` and columns ``kv_perm`` (natural positions), by evaluating the predicate in
    batches of query blocks (ragged last tiles are clipped, as in ``BlockLayout``)."""
    qb, kb = block_size
    Qt, Kt = len(q_perm), len(kv_perm)
    nq, nk = cdiv(Qt, qb), cdiv(Kt, kb)
    kinds = np.zeros((nq, nk), dtype=np.uint8)
    small = max(q_len, kv_len) < (1 << 30)
    dt = np.int32 if small else np.int64
    kvp = np.full(nk * kb, -1, dtype=np.int64)
    kvp[:Kt] = kv_perm
    kv_valid = kvp >= 0
    kvp_eval = np.where(kv_valid, kvp, 0).astype(dt)
    col_area = np.add.reduceat(kv_valid.astype(np.int64), np.arange(0, nk * kb, kb))  # [nk]
    rows_per = max(1, _BATCH // (qb * nk * kb))
    for b0 in range(0, nq, rows_per):
        b1 = min(nq, b0 + rows_per)
        r0, r1 = b0 * qb, min(Qt, b1 * qb)
        qi = np.asarray(q_perm[r0:r1], dtype=dt)
        m = np.broadcast_to(evaluate(p, qi[:, None], kvp_eval[None, :], q_len, kv_len), (r1 - r0, nk * kb))
        m = m & kv_valid[None, :]
        if r1 - r0 < (b1 - b0) * qb:
            m = np.concatenate([m, np.zeros(((b1 - b0) * qb - (r1 - r0), nk * kb), dtype=bool)])
        cnt = m.reshape(b1 - b0, qb, nk, kb).sum(axis=(1, 3), dtype=np.int64)
        rows_real = np.minimum(qb, Qt - np.arange(b0, b1) * qb)
        area = rows_real[:, None] * col_area[None, :]
        kinds[b0:b1] = np.where(cnt == 0, EMPTY, np.where(cnt == area, FULL, PARTIAL))
    return kinds[None]


def _residue_segments(length: int, s: int, block: int):
    """Per block of the residue order of ``range(length)``: arrays (block, r, a0, a1) of the
    residue-class runs it holds (positions r + s*a, a in [a0, a1))."""
    r = np.arange(min(s, length), dtype=np.int64)
    sizes = cdiv(length - r, s)
    start = np.concatenate([[0], np.cumsum(sizes)[:-1]])
    nb = cdiv(length, block)
    lo = np.arange(nb, dtype=np.int64)[:, None] * block
    hi = np.minimum(lo + block, length)
    a0 = np.maximum(lo - start[None, :], 0)
    a1 = np.minimum(hi - start[None, :], sizes[None, :])
    b, c = np.nonzero(a1 > a0)
    return b, r[c], a0[b, c], a1[b, c]


def residue_kinds(p: Pattern, q_len: int, kv_len: int, stride: int, block_size) -> np.ndarray:
    """``kinds_in_order`` for a pattern that reads only ``d = i - j`` with both axes in residue
    order mod ``stride``, without ``Q_LEN x KV_LEN`` work.

    A tile's rows are runs ``i = r1 + s*a`` (a in [a0, a1)), its columns runs ``j = r2 + s*b``;
    for a pair of runs the pairs with ``a - b = t`` all have ``d = r1 - r2 + s*t`` and there are
    ``min(a1, b1 + t) - max(a0, b0 + t)`` of them, so a tile's kept pairs are a sum over
    ``t`` (length <= QB + KB per run pair) of that count times the predicate on ``d``.
    """
    qb, kb = block_size
    s = stride
    nq, nk = cdiv(q_len, qb), cdiv(kv_len, kb)
    d = np.arange(-(kv_len - 1), q_len, dtype=np.int64)
    pd = np.broadcast_to(evaluate(p, d, np.int64(0), q_len, kv_len), d.shape).astype(np.int64)
    off = kv_len - 1
    qs = _residue_segments(q_len, s, qb)
    ks = _residue_segments(kv_len, s, kb)
    # all (q run, kv run) pairs, grouped by q block x kv block
    iq = np.repeat(np.arange(qs[0].size), ks[0].size)
    ik = np.tile(np.arange(ks[0].size), qs[0].size)
    kept = np.zeros(nq * nk, dtype=np.int64)
    area = np.zeros(nq * nk, dtype=np.int64)
    step = max(1, (1 << 22) // (qb + kb))
    for c0 in range(0, iq.size, step):
        a_ = iq[c0:c0 + step]
        b_ = ik[c0:c0 + step]
        tile = qs[0][a_] * nk + ks[0][b_]
        r1, a0, a1 = qs[1][a_], qs[2][a_], qs[3][a_]
        r2, b0, b1 = ks[1][b_], ks[2][b_], ks[3][b_]
        np.add.at(area, tile, (a1 - a0) * (b1 - b0))
        tlo = a0 - b1 + 1
        n = (a1 - a0) + (b1 - b0) - 1
        rep = np.repeat(np.arange(tlo.size), n)
        t = tlo[rep] + (np.arange(rep.size) - np.repeat(np.cumsum(n) - n, n))
        mult = np.minimum(a1[rep], b1[rep] + t) - np.maximum(a0[rep], b0[rep] + t)
        dd = r1[rep] - r2[rep] + s * t
        kept += np.bincount(tile[rep], weights=mult * pd[dd + off], minlength=nq * nk).astype(np.int64)
    kinds = np.where(kept == 0, EMPTY, np.where(kept == area, FULL, PARTIAL)).astype(np.uint8)
    return kinds.reshape(1, nq, nk)


def _trim(kinds: np.ndarray, q_total: int, kv_total: int, block_size):
    """Drop trailing EMPTY query-block rows and key-block columns: (kinds, q_count, kv_count)."""
    k = kinds[0]
    rows = np.nonzero((k != EMPTY).any(axis=1))[0]
    cols = np.nonzero((k != EMPTY).any(axis=0))[0]
    if rows.size == 0:
        return kinds[:, :0, :0], 0, 0
    nq, nk = int(rows[-1]) + 1, int(cols[-1]) + 1
    return kinds[:, :nq, :nk], min(q_total, nq * block_size[0]), min(kv_total, nk * block_size[1])


def _tiles(kinds: np.ndarray) -> int:
    return int((kinds != EMPTY).sum())


# ---- planning --------------------------------------------------------------------------------------
class _Budget:
    def __init__(self, n: int):
        self.left = n

    def spend(self, n: int) -> bool:
        if n > self.left:
            return False
        self.left -= n
        return True


def _eval_cost(p: Pattern, qo: Order, ko: Order, q_len: int, kv_len: int) -> int:
    """Predicate evaluations ``_kinds_cached`` spends on a term: none for natural order (the
    analytic lowering) or for residue order of a pattern that reads only ``i - j`` (an exact
    count over residue runs); Q_LEN x KV_LEN otherwise (every pair evaluated in batches)."""
    if qo == NATURAL and ko == NATURAL:
        return 0
    if qo.kind == "residue" and qo == ko and support(p) == frozenset("d"):
        return 0
    return q_len * kv_len


@functools.lru_cache(maxsize=64)
def _kinds_cached(p: Pattern, qo: Order, ko: Order, q_len: int, kv_len: int, block_size) -> np.ndarray:
    if qo == NATURAL and ko == NATURAL:
        return _natural_kinds(p, q_len, kv_len, block_size)
    if qo.kind == "residue" and qo == ko and support(p) == frozenset("d"):
        return residue_kinds(p, q_len, kv_len, qo.stride, block_size)
    return kinds_in_order(p, qo.permutation(q_len, "q"), ko.permutation(kv_len, "kv"), q_len, kv_len, block_size)


def _term(p: Pattern, heads: tuple, qo: Order, ko: Order, q_len: int, kv_len: int, block_size, merged: bool,
          natural_kinds: np.ndarray | None = None) -> PlanTerm:
    kinds = _kinds_cached(p, qo, ko, q_len, kv_len, tuple(block_size))
    kinds, qc, kc = _trim(kinds, q_len, kv_len, block_size)
    tiles = _tiles(kinds)
    nqb, nkb = kinds.shape[1], kinds.shape[2]
    full_q, full_k = cdiv(q_len, block_size[0]), cdiv(kv_len, block_size[1])
    gathers = (nqb if (qo != NATURAL or nqb < full_q) else 0) + (nkb if (ko != NATURAL or nkb < full_k) else 0)
    cost = tiles + GATHER_COST * gathers + (MERGE_COST * nqb if merged else 0.0)
    H = len(heads)
    return PlanTerm(pattern=p, heads=heads, q_order=qo, kv_order=ko, kinds=kinds, q_count=qc, kv_count=kc,
                    computed_tiles=tiles * H, cost=cost * H)


def _plan_head(p: Pattern, heads: tuple, q_len: int, kv_len: int, block_size, budget: _Budget,
               force: bool = False):
    """Terms of one head-free pattern, and the natural tile count (per head)."""
    nat_kinds = _natural_kinds(p, q_len, kv_len, block_size)
    natural = _tiles(nat_kinds)
    ds = disjuncts(p)
    if not any(len(candidates(d)) > 1 for d in ds):
        return None, natural, ""
    # best order per disjunct (by itself)
    best: list[tuple[Order, Order]] = []
    for d in ds:
        cands = candidates(d)
        if len(cands) == 2:  # one alternative: the grouping step below weighs it
            best.append(cands[1])
            continue
        choice, choice_tiles = (NATURAL, NATURAL), _tiles(_natural_kinds(d, q_len, kv_len, block_size))
        for qo, ko in cands[1:]:
            if not budget.spend(_eval_cost(d, qo, ko, q_len, kv_len)):
                return None, natural, "not reordered: the plan's evaluation budget is spent (long sequences)"
            t = _term(d, heads, qo, ko, q_len, kv_len, block_size, merged=True)
            if force or t.cost / len(heads) < choice_tiles:
                choice, choice_tiles = (qo, ko), t.cost / len(heads)
        best.append(choice)
    nat = [d for d, c in zip(ds, best) if c == (NATURAL, NATURAL)]
    groups: dict = {}
    for d, c in zip(ds, best):
        if c != (NATURAL, NATURAL):
            groups.setdefault(c, []).append(d)
    # keep a group in its own order only if it costs less than the tiles it adds to the natural term
    kept = []
    for order, members in groups.items():
        union = _or(members)
        base = _or(nat) if nat else None
        base_tiles = _tiles(_natural_kinds(base, q_len, kv_len, block_size)) if base is not None else 0
        with_tiles = _tiles(_natural_kinds(_or(nat + members), q_len, kv_len, block_size))
        earlier = _or(nat + [m for _, ms in kept for m in ms]) if (nat or kept) else None
        term_p = Diff(union, earlier) if earlier is not None else union
        if not budget.spend(_eval_cost(term_p, order[0], order[1], q_len, kv_len)):
            return None, natural, "not reordered: the plan's evaluation budget is spent (long sequences)"
        t = _term(term_p, heads, order[0], order[1], q_len, kv_len, block_size, merged=True)
        if force or t.cost / len(heads) < with_tiles - base_tiles:
            kept.append((order, members))
        else:
            nat.extend(members)
    if not kept:
        return None, natural, ""
    terms = []
    done: list[Pattern] = []
    if nat:
        np_ = _or(nat)
        terms.append(_term(np_, heads, NATURAL, NATURAL, q_len, kv_len, block_size, merged=True))
        done.extend(nat)
    for order, members in kept:
        union = _or(members)
        term_p = Diff(union, _or(done)) if done else union
        terms.append(_term(term_p, heads, order[0], order[1], q_len, kv_len, block_size, merged=True))
        done.extend(members)
    terms = [t for t in terms if t.computed_tiles > 0] or terms[:1]
    return terms, natural, ""


def plan_layer(head_patterns: list[Pattern], natural_kinds: np.ndarray, q_len: int, kv_len: int, block_size,
               num_heads: int, *, mode: str = "auto", eval_budget: int = PLAN_EVAL_ELEMENTS,
               force: bool = False) -> ExecutionPlan:
    """The execution plan of one compiled layer.

    Args:
        head_patterns: head-free patterns of heads 0 .. period - 1 (head h uses entry h mod period).
        natural_kinds: uint8 [H, num_q_blocks, num_kv_blocks], the compiled layout's kinds.
        q_len, kv_len: Q_LEN, KV_LEN (tokens); block_size: (Q_BLOCK_SIZE, KV_BLOCK_SIZE).
        num_heads: H.
        mode: ``"auto"`` (plan) or ``"natural"`` (one natural term).
        eval_budget: predicate evaluations allowed for non-natural orders.
        force: keep every reordered term whatever the cost model says (tests use it to
            exercise plans at small sizes, where natural order is usually cheapest).

    Returns:
        ExecutionPlan; never costlier than natural order by the cost model.
    """
    block_size = tuple(block_size)
    natural_tiles = _tiles(natural_kinds)
    nat_plan = _natural_plan(head_patterns, natural_kinds, q_len, kv_len, block_size, num_heads)
    if mode == "natural":
        nat_plan.note = "natural order asked for"
        return nat_plan
    budget = _Budget(eval_budget)
    period = len(head_patterns)
    by_pattern: dict = {}
    for h in range(num_heads):
        by_pattern.setdefault(head_patterns[h % period], []).append(h)
    terms, note, any_plan = [], "", False
    for p, hs in by_pattern.items():
        t, _, why = _plan_head(p, tuple(hs), q_len, kv_len, block_size, budget, force)
        note = note or why
        if t is None:
            terms.append(("natural", p, tuple(hs)))
        else:
            any_plan = True
            terms.extend(t)
    if not any_plan:
        nat_plan.note = note
        return nat_plan
    out = []
    for t in terms:
        if isinstance(t, tuple):
            _, p, hs = t
            out.append(_term(p, hs, NATURAL, NATURAL, q_len, kv_len, block_size, merged=True))
        else:
            out.append(t)
    plan = ExecutionPlan(terms=[t for t in out if t.computed_tiles > 0] or out[:1], q_len=q_len, kv_len=kv_len,
                         block_size=block_size, num_heads=num_heads, natural_tiles=natural_tiles,
                         natural_cost=float(natural_tiles))
    if plan.cost >= plan.natural_cost and not force:
        nat_plan.note = "natural order is cheapest by the cost model"
        return nat_plan
    return plan


def _natural_plan(head_patterns, natural_kinds, q_len, kv_len, block_size, num_heads) -> ExecutionPlan:
    period = len(head_patterns)
    from ..ir.nodes import Heads

    pattern = head_patterns[0] if period == 1 else Heads(tuple(head_patterns))
    term = PlanTerm(pattern=pattern, heads=tuple(range(num_heads)), q_order=NATURAL, kv_order=NATURAL,
                    kinds=natural_kinds, q_count=q_len, kv_count=kv_len, computed_tiles=_tiles(natural_kinds),
                    cost=float(_tiles(natural_kinds)))
    plan = ExecutionPlan(terms=[term], q_len=q_len, kv_len=kv_len, block_size=tuple(block_size),
                         num_heads=num_heads, natural_tiles=_tiles(natural_kinds),
                         natural_cost=float(_tiles(natural_kinds)))
    plan.natural_layout = True
    return plan


__all__ = ["ExecutionPlan", "Order", "PlanTerm", "candidates", "disjuncts", "kinds_in_order", "plan_layer"]
