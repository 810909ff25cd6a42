"""Layouts with run-time ``documents`` (SPEC §1.7), in O(tiles + documents) per batch row.

A pattern ``p`` that reads ``document`` (D: ``doc(i) = doc(j)``) is split by Shannon expansion
into two document-free patterns, ``p_all = p[D := all]`` and ``p_none = p[D := none]``: on
every pair, ``p = D ? p_all : p_none``. Their layouts are static (computed once per compile
and reused for every batch); per batch row only the document relation is new:

1. **The relation's tile kinds.** A document is a maximal run of equal consecutive ids. With
   the run index ``run(x)`` of each position, a tile's rows cover runs ``[rq0, rq1]`` and its
   columns ``[rk0, rk1]``. When every run has its own id (the usual packing), D is FULL on the
   tile iff both cover the same single run, EMPTY iff the two run ranges do not meet.
   When an id repeats across runs (``document`` treats such runs as one document), the id
   sets of the two blocks decide instead.
2. **Combination.** D FULL: the tile is ``p_all``'s kind; D EMPTY: ``p_none``'s. D PARTIAL:
   EMPTY if both are EMPTY, FULL if both are FULL, PARTIAL if one is FULL and the other EMPTY
   (some pairs follow each); otherwise the tile's allowed pairs are counted exactly:
   ``count(p_none, tile) + sum over the runs r meeting both ranges of count(p_all, R_r) -
   count(p_none, R_r)``, ``R_r`` the tile clipped to run r on both axes. ``rect_counts``
   counts rectangles in closed form for the primitives (no token pairs are evaluated).
   With repeated ids those few tiles are evaluated token by token instead.
"""

from __future__ import annotations

import numpy as np

from .layout import EMPTY, FULL, PARTIAL
from .lowering import Grid, _eval_rects, rect_counts
from .runtime import runs


def _relation_kinds(ids: np.ndarray, g: Grid):
    """Kinds of D on the grid, and the run data: (kinds [nq, nk], run_of [P], starts [R],
    ends [R], distinct: bool)."""
    starts, run_of = runs(ids)
    ends = np.append(starts[1:], ids.size)
    rq0, rq1 = run_of[g.q0], run_of[g.q1 - 1]
    rk0, rk1 = run_of[g.k0], run_of[g.k1 - 1]
    distinct = np.unique(ids[starts]).size == starts.size
    if distinct:
        full = (rq0 == rq1)[:, None] & (rk0 == rk1)[None, :] & (rq0[:, None] == rk0[None, :])
        empty = np.maximum(rq0[:, None], rk0[None, :]) > np.minimum(rq1[:, None], rk1[None, :])
    else:
        qs = [set(np.unique(ids[a:b]).tolist()) for a, b in zip(g.q0, g.q1)]
        ks = [set(np.unique(ids[a:b]).tolist()) for a, b in zip(g.k0, g.k1)]
        full = np.array([[len(x) == 1 and x == y for y in ks] for x in qs], dtype=bool).reshape(len(qs), len(ks))
        empty = np.array([[x.isdisjoint(y) for y in ks] for x in qs], dtype=bool).reshape(len(qs), len(ks))
    kinds = np.where(full, FULL, np.where(empty, EMPTY, PARTIAL)).astype(np.uint8)
    return kinds, run_of, starts, ends, distinct


def document_kinds(ids: np.ndarray, layout_all, layout_none, heads_all: list, heads_none: list) -> np.ndarray:
    """Exact kinds uint8 [B, H, nq, nkv] of a pattern with ``document``, per batch row.

    Args:
        ids: int64 [B, P] document ids per position (P >= the position extents).
        layout_all, layout_none: the static BlockLayouts of ``p[document := all]`` and
            ``p[document := none]`` (same lengths, block sizes, offsets, heads).
        heads_all, heads_none: their head-free pattern per head (head h uses ``h mod len``).
    """
    lay = layout_all
    g = Grid.uniform(lay.q_len, lay.kv_len, lay.q_block_size, lay.kv_block_size, lay.q_offset, lay.kv_offset)
    H = lay.num_heads
    out = np.empty((ids.shape[0], H) + g.shape, dtype=np.uint8)
    area = (g.q1 - g.q0)[:, None] * (g.k1 - g.k0)[None, :]
    import math

    period = math.lcm(len(heads_all), len(heads_none))
    for b in range(ids.shape[0]):
        D, run_of, starts, ends, distinct = _relation_kinds(ids[b], g)
        per_head = {}
        for h in range(min(H, period)):
            A, N = layout_all.kinds[h], layout_none.kinds[h]
            k = np.where(D == FULL, A, np.where(D == EMPTY, N, EMPTY)).astype(np.uint8)
            part = D == PARTIAL
            k[part & (A == FULL) & (N == FULL)] = FULL
            k[part & (((A == FULL) & (N == EMPTY)) | ((A == EMPTY) & (N == FULL)))] = PARTIAL
            todo = part & ~((A == EMPTY) & (N == EMPTY)) & ~((A == FULL) & (N == FULL)) \
                & ~(((A == FULL) & (N == EMPTY)) | ((A == EMPTY) & (N == FULL)))
            a, c = np.nonzero(todo)
            if a.size:
                pa, pn = heads_all[h % len(heads_all)], heads_none[h % len(heads_none)]
                if distinct:
                    cnt = _counts_by_runs(pa, pn, g.q0[a], g.q1[a], g.k0[c], g.k1[c], g.q_len, g.kv_len,
                                          run_of, starts, ends)
                else:
                    cnt = _counts_brute(pa, pn, g.q0[a], g.q1[a], g.k0[c], g.k1[c], g.q_len, g.kv_len, ids[b])
                k[a, c] = np.where(cnt == 0, EMPTY, np.where(cnt == area[a, c], FULL, PARTIAL))
            per_head[h] = k
        for h in range(H):
            out[b, h] = per_head[h % min(H, period)]
    return out


def doc_rect_counts(pa, pn, q0, q1, k0, k1, q_len: int, kv_len: int, ids: np.ndarray) -> np.ndarray:
    """int64 [n]: allowed pairs of ``p = D ? pa : pn`` in each rectangle ``[q0, q1) x [k0, k1)``
    (positions), D the document relation of one row of ``ids``: by runs (closed-form counts of
    the rectangles clipped to each run) when every run has its own id, else token by token."""
    q0, q1, k0, k1 = (np.asarray(x, dtype=np.int64) for x in (q0, q1, k0, k1))
    starts, run_of = runs(ids)
    if np.unique(ids[starts]).size == starts.size:
        return _counts_by_runs(pa, pn, q0, q1, k0, k1, q_len, kv_len, run_of, starts,
                               np.append(starts[1:], ids.size))
    return _counts_brute(pa, pn, q0, q1, k0, k1, q_len, kv_len, ids)


def split_by_runs(q0, q1, k0, k1, run_of, starts, ends):
    """The parts of rectangles ``[q0, q1) x [k0, k1)`` (int64 [n], positions) inside one
    document run on both axes: ``(owner, run, sq0, sq1, sk0, sk1)``, int64 [m] each (``owner``
    the rectangle, ``run`` the run index; ``run_of`` [P] a position's run, ``starts`` /
    ``ends`` [runs] the runs' bounds). O(rectangles + parts)."""
    lo = np.maximum(run_of[q0], run_of[k0])
    hi = np.minimum(run_of[q1 - 1], run_of[k1 - 1])
    n = np.maximum(hi - lo + 1, 0)
    owner = np.repeat(np.arange(q0.size), n)
    r = np.arange(n.sum()) - np.repeat(np.cumsum(n) - n, n) + np.repeat(lo, n)
    sq0, sq1 = np.maximum(q0[owner], starts[r]), np.minimum(q1[owner], ends[r])
    sk0, sk1 = np.maximum(k0[owner], starts[r]), np.minimum(k1[owner], ends[r])
    ok = (sq1 > sq0) & (sk1 > sk0)
    return owner[ok], r[ok], sq0[ok], sq1[ok], sk0[ok], sk1[ok]


def _counts_by_runs(pa, pn, q0, q1, k0, k1, Q, K, run_of, starts, ends) -> np.ndarray:
    cnt = rect_counts(pn, q0, q1, k0, k1, Q, K)
    owner, _, sq0, sq1, sk0, sk1 = split_by_runs(q0, q1, k0, k1, run_of, starts, ends)
    if owner.size == 0:
        return cnt
    delta = rect_counts(pa, sq0, sq1, sk0, sk1, Q, K) - rect_counts(pn, sq0, sq1, sk0, sk1, Q, K)
    return cnt + np.bincount(owner, weights=delta, minlength=q0.size).astype(np.int64)


def _counts_brute(pa, pn, q0, q1, k0, k1, Q, K, ids) -> np.ndarray:
    """Token-level counts on a few rectangles (ids repeated across runs)."""
    out = np.zeros(q0.size, dtype=np.int64)
    if q0.size == 0:
        return out
    top = ids.size - 1
    gen_a = _eval_rects(pa, q0, q1, k0, k1, Q, K)
    gen_n = _eval_rects(pn, q0, q1, k0, k1, Q, K)
    for (sl, ma), (_, mn) in zip(gen_a, gen_n):
        R, C = ma.shape[1], ma.shape[2]
        ii = np.minimum(q0[sl, None] + np.arange(R), top)
        jj = np.minimum(k0[sl, None] + np.arange(C), top)
        same = ids[ii][:, :, None] == ids[jj][:, None, :]
        out[sl] = np.where(same, ma, mn).sum(axis=(1, 2))
    return out


def dense_with_documents(ids: np.ndarray, dense_all: np.ndarray, dense_none: np.ndarray, q_offset: int,
                         kv_offset: int) -> np.ndarray:
    """bool [B, H, Q_LEN, KV_LEN] from the dense masks of ``p_all`` / ``p_none`` ([H, Q, KV])
    and the ids (small sizes: the sdpa backend and tests)."""
    Q, K = dense_all.shape[-2:]
    qi = ids[:, q_offset:q_offset + Q]
    kj = ids[:, kv_offset:kv_offset + K]
    same = (qi[:, :, None] == kj[:, None, :])[:, None]
    return np.where(same, dense_all[None], dense_none[None])


__all__ = ["document_kinds", "doc_rect_counts", "dense_with_documents"]
