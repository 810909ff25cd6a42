"""``exact-token``: bit-packed reachability over every token pair, propagated along the layout.

State: ``R`` uint64 [N, W] with ``W = ceil(n / 64)``: bit ``j`` of row ``i`` (word ``j >> 6``,
bit ``j & 63``) says that key ``j``'s information has reached position ``i``. ``R_0`` is the
identity; one layer maps ``R`` to ``R'[i] = R[i] | OR_{p : attend(m, h, i, p)} R[p]``.

The OR over ``p`` runs along the layer's tiles (``tiles.LayerTiles``): a FULL tile (I, J)
ORs the OR of the whole key block J into every row of query block I (one reduction per
block, not per pair); a PARTIAL tile is evaluated once with the layer's mask, its allowed
pairs gathered and OR-reduced per row (``np.bitwise_or.reduceat``); EMPTY tiles are
skipped. There is no Python loop over pairs: the Python loop is over query blocks.

Two savings keep it fast: when every layer is the same, only the bits that are new since
the previous layer are propagated (they are the only ones that can add anything), and the
work on each key block is confined to the words where its source rows are non-zero (for
local patterns these are a few words around the diagonal).

Cost per layer: O(nnz(PARTIAL pairs) x active words + FULL tiles x active words); memory
O(n^2 / 8) bytes for R (plus one frontier of the same size), so up to tens of thousands of
tokens.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np

from ..ir.specialize import cdiv
from .tiles import LayerTiles

ONE = np.uint64(1)
ALL_ONES = np.uint64(0xFFFFFFFFFFFFFFFF)

# Refuse to cache more PARTIAL pairs than this (int32 indices: 4 bytes each).
MAX_PARTIAL_PAIRS = 1 << 28
# Refuse when the bit matrices would need more than this many bytes.
MAX_BYTES = 6 << 30


class TooLarge(ValueError):
    """The token engine would need more memory than allowed."""


# ---- bit helpers -------------------------------------------------------------------------------------
def lowest_bit(x: np.ndarray) -> np.ndarray:
    """int64: index of the lowest set bit of each non-zero uint64."""
    x = x.astype(np.uint64, copy=False)
    iso = x & (~x + ONE)
    return (np.frexp(iso.astype(np.float64))[1] - 1).astype(np.int64)


def highest_bit(x: np.ndarray) -> np.ndarray:
    """int64: index of the highest set bit of each non-zero uint64 (exact: 32-bit halves)."""
    x = x.astype(np.uint64, copy=False)
    hi = (x >> np.uint64(32)).astype(np.float64)
    lo = (x & np.uint64(0xFFFFFFFF)).astype(np.float64)
    return np.where(hi > 0, 32 + np.frexp(hi)[1] - 1, np.frexp(lo)[1] - 1).astype(np.int64)


def first_bit_per_row(X: np.ndarray) -> np.ndarray:
    """int64 [rows]: lowest set bit index (column) of each non-zero row of uint64 [rows, W]."""
    nz = X != 0
    w = nz.argmax(axis=1)
    return w * 64 + lowest_bit(X[np.arange(len(X)), w])


def last_bit_per_row(X: np.ndarray) -> np.ndarray:
    """int64 [rows]: highest set bit index of each non-zero row."""
    nz = X != 0
    W = X.shape[1]
    w = W - 1 - nz[:, ::-1].argmax(axis=1)
    return w * 64 + highest_bit(X[np.arange(len(X)), w])


def prefix_words(rows: np.ndarray, W: int, inclusive: bool = True) -> np.ndarray:
    """uint64 [len(rows), W]: bits 0 .. r (inclusive) or 0 .. r-1 set, for each r in rows."""
    rows = np.asarray(rows, dtype=np.int64)
    last = rows if inclusive else rows - 1
    widx = np.arange(W, dtype=np.int64)[None, :]
    lw = (last // 64)[:, None]
    lb = (last % 64)[:, None]
    part = np.where(lb == 63, ALL_ONES, (ONE << (lb + 1).astype(np.uint64)) - ONE)
    out = np.where(widx < lw, ALL_ONES, np.where(widx == lw, part, np.uint64(0)))
    out[last < 0] = 0
    return out.astype(np.uint64)


def required_words(rows: np.ndarray, n: int, W: int, mode: str) -> np.ndarray:
    """uint64 [len(rows), W]: the required keys of each query row (j <= i, or every j < n)."""
    if mode == "earlier":
        return prefix_words(rows, W)
    return np.broadcast_to(prefix_words(np.array([n - 1]), W), (len(rows), W)).copy()


# ---- adjacency -----------------------------------------------------------------------------------------
# Runs of at least this many consecutive keys in one row are answered by prefix / suffix ORs
# of the key blocks (two gathers) instead of one gather per key.
LONG_RUN = 4


@dataclass
class _Gather:
    """Rows of one query block that OR together rows of one source array."""

    rows: np.ndarray    # intp [u]: global query rows, ascending
    starts: np.ndarray  # intp [u]: reduceat offsets into idx
    idx: np.ndarray     # intp [k]: rows of the source array (token positions, or key blocks for "bor")
    blocks: np.ndarray  # intp [k]: the key block each item reads (for skipping empty sources)

    @classmethod
    def build(cls, rows, idx, blocks):
        if len(rows) == 0:
            return None
        starts = np.flatnonzero(np.r_[True, rows[1:] != rows[:-1]])
        return cls(rows[starts].astype(np.intp), starts.astype(np.intp), idx.astype(np.intp), blocks.astype(np.intp))


# A row whose isolated keys form one arithmetic progression of at least this many keys that
# runs to the start (or the end) of the sequence reads one cumulative OR along the residue
# class instead (strided patterns: one gather per row instead of n / s).
LONG_AP = 8


def stride_or(src: np.ndarray, m: int, reverse: bool, a: int, z: int) -> np.ndarray:
    """Cumulative OR along residue classes mod m, on words a .. z-1 (zeros elsewhere):
    ``out[x] = OR_{t >= 0} src[x - t m]`` (``reverse``: ``src[x + t m]``), rows of ``src``."""
    N, W = src.shape
    rows = cdiv(N, m) * m
    buf = np.zeros((rows, W), dtype=src.dtype)
    if z > a:
        part = np.zeros((rows, z - a), dtype=src.dtype)
        part[:N] = src[:, a:z]
        g = part.reshape(rows // m, m, z - a)
        if reverse:
            g = np.bitwise_or.accumulate(g[::-1], axis=0)[::-1]
        else:
            g = np.bitwise_or.accumulate(g, axis=0)
        buf[:, a:z] = g.reshape(rows, z - a)
    return buf[:N]


def stride_or_bool(v: np.ndarray, m: int, reverse: bool) -> np.ndarray:
    N = len(v)
    rows = cdiv(N, m) * m
    buf = np.zeros(rows, dtype=bool)
    buf[:N] = v
    g = buf.reshape(rows // m, m)
    g = np.logical_or.accumulate(g[::-1], axis=0)[::-1] if reverse else np.logical_or.accumulate(g, axis=0)
    return g.reshape(rows)[:N]


class Adjacency:
    """One layer's edges grouped by query block: FULL key blocks and PARTIAL pairs.

    A row's PARTIAL keys are cut into runs of consecutive positions. A run of
    ``LONG_RUN`` keys or more is answered from per-block prefix ORs (``pre[x]`` = OR of the
    block's rows up to x), suffix ORs (``suf[x]``: from x to the block's end) and whole
    block ORs (``bor``) for the blocks it covers in between; shorter runs, and long runs
    strictly inside one block, gather their keys one by one (``src``). So a causal diagonal
    tile costs one gather per row, not one per pair.

    Args:
        tiles: the layer's ``LayerTiles``.
        max_pairs: refuse (``TooLarge``) beyond this many PARTIAL pairs.
    """

    def __init__(self, tiles: LayerTiles, max_pairs: int = MAX_PARTIAL_PAIRS):
        n, b = tiles.n, tiles.block_size
        nb = tiles.num_blocks
        self.n, self.b, self.nb = n, b, nb
        self.full = [np.flatnonzero(tiles.full[I]) for I in range(nb)]
        partial = tiles.partial
        self.partial: list[dict | None] = []
        self.blocks: list[np.ndarray | None] = []
        self.nnz = 0
        pre_blocks, suf_blocks = set(), set()
        spre, ssuf = set(), set()
        wide = np.zeros(nb, dtype=bool)
        offs = np.arange(b, dtype=np.int64)
        for I in range(nb):
            pj = np.flatnonzero(partial[I])
            if len(pj) == 0:
                self.partial.append(None)
                self.blocks.append(None)
                continue
            kv = (pj[:, None] * b + offs[None, :]).ravel()
            kv = kv[kv < n]
            q0, q1 = I * b, min(n, (I + 1) * b)
            q = np.arange(q0, q1, dtype=np.int64)
            m = np.broadcast_to(np.asarray(tiles.mask(q[:, None], kv[None, :]), dtype=bool), (len(q), len(kv)))
            r, c = np.nonzero(m)
            self.nnz += len(r)
            if self.nnz > max_pairs:
                raise TooLarge(f"more than {max_pairs} PARTIAL token pairs")
            if len(r) == 0:
                self.partial.append(None)
                self.blocks.append(None)
                continue
            g = self._runs(q0 + r, kv[c])
            pre_blocks.update(np.unique(g["pre"].blocks).tolist() if g["pre"] is not None else ())
            suf_blocks.update(np.unique(g["suf"].blocks).tolist() if g["suf"] is not None else ())
            self.partial.append(g)
            blk = [x.blocks for k, x in g.items() if x is not None and not isinstance(k, tuple)]
            self.blocks.append(np.unique(np.concatenate(blk)) if blk else None)
            for k in g:
                if isinstance(k, tuple):
                    (spre if k[0] == "spre" else ssuf).add(k[1])
                    wide[I] = True
        self.involved = [np.union1d(self.full[I], self.blocks[I] if self.blocks[I] is not None else [])
                         .astype(np.intp) for I in range(nb)]
        self.wide = wide
        self.spre_strides = sorted(spre)
        self.ssuf_strides = sorted(ssuf)
        self.pre_blocks = np.array(sorted(pre_blocks), dtype=np.intp)
        self.suf_blocks = np.array(sorted(suf_blocks), dtype=np.intp)

    def _runs(self, rows: np.ndarray, cols: np.ndarray) -> dict:
        """Split row-major (row, key) pairs into the four gather kinds."""
        n, b = self.n, self.b
        brk = np.r_[True, (rows[1:] != rows[:-1]) | (cols[1:] != cols[:-1] + 1)]
        si = np.flatnonzero(brk)
        ei = np.r_[si[1:] - 1, len(rows) - 1]
        rr, s, e = rows[si], cols[si], cols[ei]
        length = e - s + 1
        Bs, Be = s // b, e // b
        bstart = Bs * b
        bend = np.minimum(n, (Be + 1) * b) - 1
        long_ = length >= LONG_RUN
        same = Bs == Be
        use_pre = long_ & (~same | (s == bstart))           # ends at e: prefix of block Be
        use_suf = long_ & (~same | (e == bend)) & ~(same & (s == bstart))  # starts at s: suffix of block Bs
        inner = long_ & same & (s != bstart) & (e != bend)
        single_run = ~long_ | inner
        # singles: the pairs of short runs and of long runs strictly inside one block
        run_of = np.cumsum(brk) - 1
        keep = single_run[run_of]
        srows, scols, aps = self._aps(rows[keep], cols[keep])
        out = {"src": _Gather.build(srows, scols, scols // b)}
        out.update(aps)
        out["pre"] = _Gather.build(rr[use_pre], e[use_pre], Be[use_pre])
        out["suf"] = _Gather.build(rr[use_suf], s[use_suf], Bs[use_suf])
        # whole blocks strictly between Bs and Be
        span = np.where(long_ & ~same, Be - Bs - 1, 0)
        if span.sum():
            mrows = np.repeat(rr, span)
            first = np.repeat(Bs + 1, span)
            k = np.arange(int(span.sum())) - np.repeat(np.cumsum(span) - span, span)
            mblocks = first + k
            out["bor"] = _Gather.build(mrows, mblocks, mblocks)
        else:
            out["bor"] = None
        # each kind's items must be ordered by row for reduceat; they are (row-major input)
        return out

    def _aps(self, rows, cols):
        """Take out rows whose isolated keys are one arithmetic progression reaching the
        start (``("spre", m)``: OR of the class up to the last key) or the end
        (``("ssuf", m)``: from the first key on)."""
        n, b = self.n, self.b
        if len(rows) < LONG_AP:
            return rows, cols, {}
        st = np.flatnonzero(np.r_[True, rows[1:] != rows[:-1]])
        cnt = np.diff(np.r_[st, len(rows)])
        d = np.diff(cols)
        cross = rows[1:] != rows[:-1]
        big = np.iinfo(np.int64).max
        starts = np.minimum(st, len(d) - 1)
        rmin = np.minimum.reduceat(np.where(cross, big, d), starts)
        rmax = np.maximum.reduceat(np.where(cross, -1, d), starts)
        ok = (cnt >= LONG_AP) & (rmin == rmax) & (rmin > 0)
        if not ok.any():
            return rows, cols, {}
        first, last = cols[st], cols[st + cnt - 1]
        to_start = ok & (first - rmin < 0)
        to_end = ok & ~to_start & (last + rmin >= n)
        out = {}
        for kind, sel, pos in (("spre", to_start, last), ("ssuf", to_end, first)):
            for m in np.unique(rmin[sel]):
                k = sel & (rmin == m)
                out[(kind, int(m))] = _Gather.build(rows[st[k]], pos[k], pos[k] // b)
        taken = np.repeat(to_start | to_end, cnt)
        return rows[~taken], cols[~taken], out

    def prepare(self, src, regs, lo, hi, has, PRE, SUF) -> list:
        """Fill the prefix / suffix ORs this layer reads, over each key block's active words.

        Returns the regions written, ``(array, block, a, z)``, to be zeroed after the layer
        (the arrays must read as zero outside what this layer wrote)."""
        b = self.b
        written = []
        for arr, blocks, rev in ((PRE, self.pre_blocks, False), (SUF, self.suf_blocks, True)):
            if len(blocks) == 0:
                continue
            for J in blocks[has[blocks]]:
                a, z = int(lo[J]), int(hi[J])
                part = src[J * b:(J + 1) * b, a:z]
                if rev:
                    arr[J * b:(J + 1) * b, a:z] = np.bitwise_or.accumulate(part[::-1], axis=0)[::-1]
                else:
                    arr[J * b:(J + 1) * b, a:z] = np.bitwise_or.accumulate(part, axis=0)
                written.append((arr, int(J), a, z))
        return written

    def step_bool(self, v: np.ndarray) -> np.ndarray:
        """One layer for a single source: bool [N] -> bool [N] (residual included)."""
        nb, b, n = self.nb, self.b, self.n
        out = v.copy()
        vb = v.reshape(nb, b)
        bany = vb.any(axis=1)
        pre = np.logical_or.accumulate(vb, axis=1).ravel()
        suf = np.logical_or.accumulate(vb[:, ::-1], axis=1)[:, ::-1].ravel()
        srcs = {"src": v, "pre": pre, "suf": suf, "bor": bany}
        for m in self.spre_strides:
            srcs[("spre", m)] = stride_or_bool(v, m, False)
        for m in self.ssuf_strides:
            srcs[("ssuf", m)] = stride_or_bool(v, m, True)
        for I in range(nb):
            fl = self.full[I]
            if len(fl) and bany[fl].any():
                out[I * b:min(n, (I + 1) * b)] = True
            pr = self.partial[I]
            if pr is None:
                continue
            for kind, g in pr.items():
                if g is not None:
                    out[g.rows] |= np.logical_or.reduceat(srcs[kind][g.idx], g.starts)
        return out


# ---- the engine --------------------------------------------------------------------------------------------
@dataclass
class TokenResult:
    """Outcome of ``reach``.

    Attributes:
        min_layers: least k connecting every required pair, or None (never, or stopped).
        never: proven never (the reachable set stopped growing).
        levels: layers propagated.
        hardest: (i, j) first connected at layer ``min_layers`` (farthest pair, then smallest i).
        unreachable: (i, j) never connected (nearest pair, then smallest i), when ``never``.
        stalled_at: when ``never``: the layer count after which nothing new arrives.
        stopped: True when ``max_levels`` ran out before an answer.
    """

    min_layers: int | None
    never: bool
    levels: int
    hardest: tuple[int, int] | None = None
    unreachable: tuple[int, int] | None = None
    stalled_at: int | None = None
    stopped: bool = False


def popcount(x: np.ndarray) -> np.ndarray:
    """Set bits per uint64 element (``np.bitwise_count`` on numpy >= 2, a byte table otherwise)."""
    if hasattr(np, "bitwise_count"):
        return np.bitwise_count(x)
    table = np.array([bin(v).count("1") for v in range(256)], dtype=np.uint8)
    return table[np.ascontiguousarray(x).view(np.uint8)].reshape(*x.shape, 8).sum(axis=-1)


def required_block(rows: np.ndarray, a: int, z: int, n: int, mode: str) -> np.ndarray:
    """uint64 [len(rows), z - a]: words a .. z-1 of the required keys of each row."""
    widx = np.arange(a, z, dtype=np.int64)[None, :]
    last = np.asarray(rows, dtype=np.int64) if mode == "earlier" else np.full(len(rows), n - 1, dtype=np.int64)
    lw = (last // 64)[:, None]
    lb = (last % 64)[:, None]
    part = np.where(lb == 63, ALL_ONES, (ONE << (lb + 1).astype(np.uint64)) - ONE)
    return np.where(widx < lw, ALL_ONES, np.where(widx == lw, part, np.uint64(0))).astype(np.uint64)


def reach(adjs: list[Adjacency], n: int, mode: str, *, max_levels: int | None = None, q_offset: int = 0,
          kv_offset: int = 0) -> TokenResult:
    """Propagate from the identity until every required pair is connected or nothing grows.

    Only the regions that change are touched: with one layer pattern, the frontier (bits new
    at the previous layer) is the source, kept as (rows of a query block) x (a word range)
    regions; the missing required keys are counted per row (popcount of the new bits), so a
    layer costs what its active regions cost, not n^2 / 64.

    Args:
        adjs: one ``Adjacency`` per layer entry (layer m uses ``adjs[m % len(adjs)]``), all
            with the same block size.
        n: positions.
        mode: ``"earlier"`` or ``"all"``.
        max_levels: stop (``stopped=True``) after this many layers.
        q_offset, kv_offset: only queries ``i >= q_offset`` and keys ``j >= kv_offset`` are
            required (SPEC §1.6 offsets, ``analyze(q_offset=…)``); paths still run through
            every position. Each key column propagates on its own, so the columns below
            ``kv_offset`` are simply marked held from the start, and rows below ``q_offset``
            never count.
    """
    P = len(adjs)
    b, nb = adjs[0].b, adjs[0].nb
    N = nb * b
    W = cdiv(n, 64)
    matrices = 2 + (P == 1) + any(len(x.pre_blocks) for x in adjs) + any(len(x.suf_blocks) for x in adjs) \
        + max(len(x.spre_strides) + len(x.ssuf_strides) for x in adjs)
    need = matrices * N * W * 8
    if need > MAX_BYTES:
        raise TooLarge(f"{matrices} bit matrices of {N} x {W} words need {need / 2**30:.1f} GiB "
                       f"(limit {MAX_BYTES / 2**30:.0f} GiB)")
    R = np.zeros((N, W), dtype=np.uint64)
    ar = np.arange(n)
    R[ar, ar // 64] = ONE << (ar % 64).astype(np.uint64)
    D_cur = R.copy()
    # required keys not yet held (self is held): earlier j in [kv_offset, i], all j >= kv_offset
    if mode == "earlier":
        missing = np.maximum(ar - kv_offset, 0).astype(np.int64)
    else:
        missing = (n - kv_offset - (ar >= kv_offset)).astype(np.int64)
    missing[:q_offset] = 0
    if kv_offset:  # keys below kv_offset are not required: held from the start by every row
        R[:n, :kv_offset // 64] = ~np.uint64(0)
        if kv_offset % 64:
            R[:n, kv_offset // 64] |= (ONE << np.uint64(kv_offset % 64)) - ONE
    total_missing = int(missing.sum())
    if total_missing == 0:
        return TokenResult(0, False, 0, hardest=(q_offset, q_offset))
    # frontier regions: block -> (a, z) word range; the identity of block J spans its own words
    regions = {J: (J * b // 64, min(W, (min(n, (J + 1) * b) - 1) // 64 + 1)) for J in range(nb) if J * b < n}
    D_next = np.zeros_like(R) if P == 1 else None
    bor = np.zeros((nb, W), dtype=np.uint64)
    PRE = np.zeros_like(R) if any(len(x.pre_blocks) for x in adjs) else None
    SUF = np.zeros_like(R) if any(len(x.suf_blocks) for x in adjs) else None
    level = 0
    grew_in_cycle = False
    while True:
        if max_levels is not None and level >= max_levels:
            return TokenResult(None, False, level, stopped=True)
        adj = adjs[level % P]
        if P == 1:
            src, regs = D_cur, regions
        else:
            src = R.copy()
            regs = _regions_of(src, nb, b, W)
        lo = np.full(nb, W, dtype=np.int64)
        hi = np.zeros(nb, dtype=np.int64)
        for J, (a, z) in regs.items():
            lo[J], hi[J] = a, z
            bor[J, a:z] = np.bitwise_or.reduce(src[J * b:(J + 1) * b, a:z], axis=0)
        has = hi > lo
        new_regions = {}
        last_new = []
        prepared = adj.prepare(src, regs, lo, hi, has, PRE, SUF)
        any_has = bool(has.any())
        gA = int(lo[has].min()) if any_has else 0
        gZ = int(hi[has].max()) if any_has else 0
        arrays = {"src": src, "pre": PRE, "suf": SUF, "bor": bor}
        if any_has:
            for m in adj.spre_strides:
                arrays[("spre", m)] = stride_or(src, m, False, gA, gZ)
            for m in adj.ssuf_strides:
                arrays[("ssuf", m)] = stride_or(src, m, True, gA, gZ)
        for I in range(nb):
            q0, q1 = I * b, min(n, (I + 1) * b)
            if q0 >= n:
                break
            inv = adj.involved[I]
            inv = inv[has[inv]] if len(inv) else inv
            wide = adj.wide[I] and any_has
            if len(inv) == 0 and not wide:
                continue
            a, z = (int(lo[inv].min()), int(hi[inv].max())) if len(inv) else (W, 0)
            if wide:
                a, z = min(a, gA), max(z, gZ)
            fl = adj.full[I]
            fl = fl[has[fl]] if len(fl) else fl
            C = np.zeros((q1 - q0, z - a), dtype=np.uint64)
            if len(fl):
                C |= np.bitwise_or.reduce(bor[fl, a:z], axis=0)
            pr = adj.partial[I]
            if pr is not None:
                for kind, g in pr.items():
                    if g is not None:
                        C[g.rows - q0] |= np.bitwise_or.reduceat(arrays[kind][g.idx, a:z], g.starts, axis=0)
            C &= ~R[q0:q1, a:z]
            cols = np.flatnonzero(C.any(axis=0))
            if len(cols) == 0:
                continue
            a2, z2 = a + int(cols[0]), a + int(cols[-1]) + 1
            C = C[:, cols[0]:cols[-1] + 1]
            R[q0:q1, a2:z2] |= C
            got = _required_popcount(C, q0, q1, a2, z2, n, mode)
            if q0 < q_offset:
                got[:q_offset - q0] = 0
            missing[q0:q1] -= got
            total_missing -= int(got.sum())
            if P == 1:
                D_next[q0:q1, a2:z2] = C
            new_regions[I] = (a2, z2)
            last_new.append((q0, q1, a2, C))
        for J, (a, z) in regs.items():
            bor[J, a:z] = 0
        for arr, J, a, z in prepared:
            arr[J * b:(J + 1) * b, a:z] = 0
        level += 1
        grew_in_cycle |= bool(new_regions)
        if total_missing == 0:
            return TokenResult(level, False, level, hardest=_hardest_regions(last_new, n, mode, q_offset))
        if P == 1:
            for J, (a, z) in regions.items():
                D_cur[J * b:(J + 1) * b, a:z] = 0
            D_cur, D_next = D_next, D_cur
            regions = new_regions
        if level % P == 0:
            if not grew_in_cycle:
                inc = np.flatnonzero(missing > 0)
                return TokenResult(None, True, level, unreachable=_nearest_missing(R, inc, n, W, mode),
                                   stalled_at=level - P)
            grew_in_cycle = False


def _required_popcount(C, q0, q1, a, z, n, mode):
    """int64 [q1 - q0]: required bits of C (rows q0.., words a..z-1) per row; the mask is only
    built where the words meet the rows' diagonal words (``earlier``) or the last word."""
    if mode == "earlier":
        if z <= q0 // 64:          # every word lies strictly below every row's diagonal word
            return popcount(C).sum(axis=1).astype(np.int64)
        if a > (q1 - 1) // 64:     # every word lies above: nothing required
            return np.zeros(q1 - q0, dtype=np.int64)
    elif z <= (n - 1) // 64:
        return popcount(C).sum(axis=1).astype(np.int64)
    return popcount(C & required_block(np.arange(q0, q1), a, z, n, mode)).sum(axis=1).astype(np.int64)


def _regions_of(src, nb, b, W):
    """block -> (a, z): the non-zero word range of each key block of ``src``."""
    nzw = (np.bitwise_or.reduce(src.reshape(nb, b, W), axis=1) != 0)
    out = {}
    for J in np.flatnonzero(nzw.any(axis=1)):
        row = nzw[J]
        out[int(J)] = (int(row.argmax()), int(W - row[::-1].argmax()))
    return out


def _hardest_regions(last_new, n, mode, q_offset=0):
    """Among required pairs first reached at the last layer (the new bits), the farthest
    pair, then the smallest i (rows below ``q_offset`` are not required)."""
    best = None
    for q0, q1, a, C in last_new:
        rows = np.arange(q0, q1)
        X = C & required_block(rows, a, a + C.shape[1], n, mode)
        nzr = X.any(axis=1) & (rows >= q_offset)
        if not nzr.any():
            continue
        ii = rows[nzr]
        X = X[nzr]
        cand = [(ii, a * 64 + first_bit_per_row(X))]
        if mode == "all":
            cand.append((ii, a * 64 + last_bit_per_row(X)))
        for i_, j_ in cand:
            dist = np.abs(i_ - j_)
            k = np.lexsort((j_, i_, -dist))[0]
            c = (-int(dist[k]), int(i_[k]), int(j_[k]))
            if best is None or c < best:
                best = c
    return (best[1], best[2])


def _nearest_missing(R, inc, n, W, mode):
    """Among required pairs never reached, the nearest (smallest |i - j|), then smallest i."""
    best = None
    for s in range(0, len(inc), 4096):
        rr = inc[s:s + 4096]
        below = prefix_words(rr, W)  # j <= i
        miss = required_words(rr, n, W, mode) & ~R[rr]
        lower = miss & below
        nz = lower.any(axis=1)
        if nz.any():
            ii = rr[nz]
            jj = last_bit_per_row(lower[nz])
            best = _better(best, ii, jj)
        if mode == "all":
            upper = miss & ~below
            nz = upper.any(axis=1)
            if nz.any():
                ii = rr[nz]
                jj = first_bit_per_row(upper[nz])
                best = _better(best, ii, jj)
    return (best[1], best[2])


def _better(best, ii, jj):
    dist = np.abs(ii - jj)
    k = np.lexsort((jj, ii, dist))[0]
    c = (int(dist[k]), int(ii[k]), int(jj[k]))
    return c if best is None or c < best else best


def forward(adjs: list[Adjacency], j: int, K: int) -> list[np.ndarray]:
    """bool [N] reach sets of key ``j`` after 0 .. K layers (single source)."""
    N = adjs[0].nb * adjs[0].b
    v = np.zeros(N, dtype=bool)
    v[j] = True
    out = [v]
    for m in range(K):
        v = adjs[m % len(adjs)].step_bool(v)
        out.append(v)
    return out


def backtrack(stack, sets: list[np.ndarray], i: int, j: int) -> list:
    """A path of ``len(sets) - 1`` hops from key ``j`` to query ``i`` given the single-source
    reach sets; residual hops are used whenever they suffice, otherwise the smallest
    predecessor is taken. Returns ``model.Hop`` list (layer 0 first)."""
    K = len(sets) - 1
    n = stack.n
    cur = i
    rev = []
    for m in range(K - 1, -1, -1):
        prev = sets[m][:n]
        if prev[cur]:
            rev.append(stack.hop(m, cur, cur))
            continue
        cand = np.flatnonzero(prev & stack.row(m, cur))
        if len(cand) == 0:
            raise AssertionError(f"no predecessor for {cur} at layer {m}")
        p = int(cand[0])
        rev.append(stack.hop(m, p, cur))
        cur = p
    assert cur == j, (cur, j)
    return rev[::-1]


def default_block_size(n: int) -> int:
    """Tokens per block for the token engine: 128, or smaller for short sequences."""
    return max(8, min(128, 1 << max(3, math.ceil(math.log2(max(n, 2))) - 3)))
