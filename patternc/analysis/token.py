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

from .tiles import LayerTiles

ONE = np.uint64(1)
ALL_ONES = np.uint64(0xFFFFFFFFFFFFFFFF)

# Refuse to cache more PARTIAL pairs than this (int32 indices: 4 bytes each).
MAX_PARTIAL_PAIRS = 1 << 28


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
@dataclass
class _PartialRow:
    rows: np.ndarray    # intp [u]: global query rows that have at least one PARTIAL edge
    starts: np.ndarray  # intp [u]: reduceat offsets into cols
    cols: np.ndarray    # intp [nnz]: key positions, grouped by row
    blocks: np.ndarray  # intp [k]: the key blocks involved


class Adjacency:
    """One layer's edges grouped by query block: FULL key blocks and PARTIAL pairs.

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
        self.partial: list[_PartialRow | None] = []
        self.nnz = 0
        offs = np.arange(b, dtype=np.int64)
        for I in range(nb):
            pj = np.flatnonzero(partial[I])
            if len(pj) == 0:
                self.partial.append(None)
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
                continue
            starts = np.flatnonzero(np.r_[True, r[1:] != r[:-1]])
            self.partial.append(_PartialRow(rows=(q0 + r[starts]).astype(np.intp), starts=starts.astype(np.intp),
                                            cols=kv[c].astype(np.intp), blocks=pj.astype(np.intp)))

    def propagate(self, src: np.ndarray, out: np.ndarray) -> None:
        """``out[i] |= OR_{p: edge p -> i} src[p]`` for uint64 [N, W] arrays (N = nb * b)."""
        nb, b, n = self.nb, self.b, self.n
        W = src.shape[1]
        bor = np.bitwise_or.reduce(src.reshape(nb, b, W), axis=1)
        nzw = bor != 0
        has = nzw.any(axis=1)
        if not has.any():
            return
        lo = np.where(has, nzw.argmax(axis=1), W)
        hi = np.where(has, W - nzw[:, ::-1].argmax(axis=1), 0)
        for I in range(nb):
            fl = self.full[I]
            if len(fl):
                fl = fl[has[fl]]
                if len(fl):
                    a, z = int(lo[fl].min()), int(hi[fl].max())
                    acc = np.bitwise_or.reduce(bor[fl, a:z], axis=0)
                    out[I * b:min(n, (I + 1) * b), a:z] |= acc
            pr = self.partial[I]
            if pr is not None:
                pb = pr.blocks[has[pr.blocks]]
                if len(pb):
                    a, z = int(lo[pb].min()), int(hi[pb].max())
                    g = src[pr.cols, a:z]
                    out[pr.rows, a:z] |= np.bitwise_or.reduceat(g, pr.starts, axis=0)

    def step_bool(self, v: np.ndarray) -> np.ndarray:
        """One layer for a single source: bool [N] -> bool [N] (residual included)."""
        nb, b, n = self.nb, self.b, self.n
        out = v.copy()
        bany = v.reshape(nb, b).any(axis=1)
        for I in range(nb):
            fl = self.full[I]
            if len(fl) and bany[fl].any():
                out[I * b:min(n, (I + 1) * b)] = True
            pr = self.partial[I]
            if pr is not None and bany[pr.blocks].any():
                out[pr.rows] |= np.logical_or.reduceat(v[pr.cols], pr.starts)
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


def reach(adjs: list[Adjacency], n: int, mode: str, *, max_levels: int | None = None) -> TokenResult:
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
    """
    P = len(adjs)
    b, nb = adjs[0].b, adjs[0].nb
    N = nb * b
    W = -(-n // 64)
    R = np.zeros((N, W), dtype=np.uint64)
    ar = np.arange(n)
    R[ar, ar // 64] = ONE << (ar % 64).astype(np.uint64)
    missing = (ar if mode == "earlier" else np.full(n, n - 1)).astype(np.int64)  # required keys not yet held
    total_missing = int(missing.sum())
    if total_missing == 0:
        return TokenResult(0, False, 0, hardest=(0, 0))
    # frontier regions: block -> (a, z) word range; the identity of block J spans its own words
    regions = {J: (J * b // 64, min(W, (min(n, (J + 1) * b) - 1) // 64 + 1)) for J in range(nb) if J * b < n}
    D_cur = R.copy()
    D_next = np.zeros_like(R) if P == 1 else None
    bor = np.zeros((nb, W), dtype=np.uint64)
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
        for I in range(nb):
            q0, q1 = I * b, min(n, (I + 1) * b)
            if q0 >= n:
                break
            fl = adj.full[I]
            fl = fl[has[fl]] if len(fl) else fl
            pr = adj.partial[I]
            pb = pr.blocks[has[pr.blocks]] if pr is not None else fl[:0]
            if len(fl) == 0 and len(pb) == 0:
                continue
            inv = np.concatenate([fl, pb]) if len(pb) else fl
            a, z = int(lo[inv].min()), int(hi[inv].max())
            C = np.zeros((q1 - q0, z - a), dtype=np.uint64)
            if len(fl):
                C |= np.bitwise_or.reduce(bor[fl, a:z], axis=0)
            if len(pb):
                C[pr.rows - q0] |= np.bitwise_or.reduceat(src[pr.cols, a:z], pr.starts, axis=0)
            C &= ~R[q0:q1, a:z]
            cols = np.flatnonzero(C.any(axis=0))
            if len(cols) == 0:
                continue
            a2, z2 = a + int(cols[0]), a + int(cols[-1]) + 1
            C = C[:, cols[0]:cols[-1] + 1]
            R[q0:q1, a2:z2] |= C
            got = popcount(C & required_block(np.arange(q0, q1), a2, z2, n, mode)).sum(axis=1)
            missing[q0:q1] -= got.astype(np.int64)
            total_missing -= int(got.sum())
            if P == 1:
                D_next[q0:q1, a2:z2] = C
            new_regions[I] = (a2, z2)
            last_new.append((q0, q1, a2, C))
        for J, (a, z) in regs.items():
            bor[J, a:z] = 0
        level += 1
        grew_in_cycle |= bool(new_regions)
        if total_missing == 0:
            return TokenResult(level, False, level, hardest=_hardest_regions(last_new, n, mode))
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


def _regions_of(src, nb, b, W):
    """block -> (a, z): the non-zero word range of each key block of ``src``."""
    nzw = (np.bitwise_or.reduce(src.reshape(nb, b, W), axis=1) != 0)
    out = {}
    for J in np.flatnonzero(nzw.any(axis=1)):
        row = nzw[J]
        out[int(J)] = (int(row.argmax()), int(W - row[::-1].argmax()))
    return out


def _hardest_regions(last_new, n, mode):
    """Among required pairs first reached at the last layer (the new bits), the farthest
    pair, then the smallest i."""
    best = None
    for q0, q1, a, C in last_new:
        rows = np.arange(q0, q1)
        X = C & required_block(rows, a, a + C.shape[1], n, mode)
        nzr = X.any(axis=1)
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
