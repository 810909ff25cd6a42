"""Strided runs: the block-sparse kernel's zero-copy path into ATen's fused CPU flash kernel.

Gathering the key/value blocks of every tile row into a contiguous buffer (``index_select``)
costs about as much as the attention on those tiles once the fused kernel computes them (a
measured third of the time on ``local(w=256) & causal``). Most structured patterns do not need
the copy: a row's kept tiles form one contiguous **span** of key blocks, and consecutive rows'
spans slide in step. Such rows form a **run**:

    row r of a run = query block ``q0 + tau * r``, key blocks ``[kv0 + sigma * r, ... + S)``

(``tau >= 1``; ``sigma >= 0``: ``sigma = 1`` a sliding window, ``sigma = 0`` a shared prefix or
gathered column set, ``tau = sigma = 2`` the two rows of every ``chunk`` in a chunk-causal term).
q, k, v of a whole run are then *views* of the padded inputs (``torch.as_strided``: rows step
``tau`` query blocks, key windows step ``sigma`` key blocks and may overlap), one fused call per
run, no copy. Rows whose masks are identical share one additive bias ``[qb, S * kb]``; others
get theirs from a table of distinct tiles. The backward calls the fused backward on the same
views and folds the per-row key gradients back (``S`` strided ``add_``s, or one sum when
``sigma = 0``).

Rows that do not fit a run (a span with more than 1/``HOLE_FRACTION`` EMPTY tiles, runs past
``MAX_RUNS``) stay on the gather path (``blocksparse.Plan`` of the remaining rows).

This path runs only where the fused kernel applies (CPU, float32 compute, no dropout, no
``score_mod`` but ALiBi alone in natural positions, masks cached). With a softcap (which the
fused kernel cannot apply) the same runs take the **scored path** (``forward_scored`` /
``backward_scored``): the same views, computed unfused (matmul, transform, mask, max, exp, sum,
matmul), a causal staircase slab by slab; elsewhere the kernel's unfused loop runs every row. ALiBi (``alibi_fits``): in a run, ``j - i`` of kernel row ``r`` is that of row
0 plus ``r * (sigma * kb - tau * qb)``, a constant of the kernel row, so each call adds one bias
``[Bp, 1, m * qb, span * kb]`` (per query head; ``scoremod.ScoreTerms.run_alibi``) to its mask
and the constant to its log-sum-exp; a causal staircase's bias would be its whole square, so a
layout whose calls need more than ``ALIBI_CALL_ELEMENTS`` stays on the gather path.
"""

from __future__ import annotations

from dataclasses import dataclass
from types import SimpleNamespace

import numpy as np
import torch

from ..lower.layout import EMPTY, FULL
from .common import CHUNK_ELEMENTS, EXP_FLOOR, TileTable, allowed_in_tiles

#: a row joins a run when its span has at most ``count // HOLE_FRACTION`` EMPTY tiles (they are
#: computed, masked out): a hole costs a tile's compute, a gathered tile only its copy
HOLE_FRACTION = 8
#: most runs per layout (each run is at least one kernel call); the rows of shorter runs past it
#: use the gather path, which batches rows of any shape into a few calls
MAX_RUNS = 256
#: per-row biases (rows of a run whose masks differ) cached up to this many float32 elements per
#: layout; past it they are rebuilt from the tile table at every call
BIAS_CACHE_ELEMENTS = 1 << 24
#: score-sized elements of bias per call (bounds the memory of one call; a staircase whose one
#: kernel row would need a larger bias is split into single rows)
RUN_CHUNK_ELEMENTS = 1 << 23
#: q / k / v / gradient elements one *backward* kernel call reads or writes: the fused backward
#: allocates and zero-fills one key gradient per row and span slot, folded after it, and calls
#: this small keep those buffers off fresh pages (measured: a third of local(w=256)'s backward
#: went to zero-filling fresh 40 MB buffers). The forward's inputs are views and its output is
#: one row of queries each, so it makes one call per run: every call is a parallel region, and
#: on a CPU shared with other busy processes each region waits for descheduled threads
#: (measured: 43 calls per layer took local(w=256)'s forward from 0.13x to 1.1x SDPA under a
#: competing 2-thread process)
CALL_ELEMENTS = 1 << 22
#: tile ids of the table's first entries: every pair allowed, none, the lower triangle (b <= a)
_FULL_ID, _NONE_ID, _TRIL_ID = 0, 1, 2


@dataclass
class Run:
    """``rows`` kernel rows; kernel row ``r`` holds the ``m`` query blocks from ``q0 + tau * r``
    and reads the ``span`` key blocks from ``kv0 + sigma * r`` (all in blocks), for query
    ``head`` (None: every head alike). ``causal``: every allowed pair has its key offset in the
    span <= its query offset in the row, so the kernel's ``is_causal`` skips the rest."""

    head: int | None
    q0: int
    tau: int
    kv0: int
    sigma: int
    rows: int
    m: int
    span: int
    causal: bool = False
    ids: torch.Tensor | None = None  # int64 [rows or 1, m, span] tile ids; None: no bias needed
    bias: torch.Tensor | None = None  # cached float32 [rows or 1, m * qb, span * kb]
    empty: torch.Tensor | None = None  # bool [rows or 1, m * qb]: query rows with no allowed key


def _spans(kinds: np.ndarray, hole_fraction: int):
    nonempty = kinds != EMPTY
    count = nonempty.sum(-1)
    lo = nonempty.argmax(-1)
    hi = kinds.shape[-1] - nonempty[..., ::-1].argmax(-1)
    ok = (count > 0) & (hi - lo - count <= count // hole_fraction)
    return lo, hi, ok


def _staircases(lo, hi, ok):
    """Per head, maximal runs of consecutive query blocks i0..i0+M-1 (M >= 2) that share their
    span's start and whose span grows by one block per row from one block: ``(h, i0, M, lo)``."""
    out = []
    for h in range(lo.shape[0]):
        i, nq = 0, lo.shape[1]
        while i < nq:
            if ok[h, i] and hi[h, i] - lo[h, i] == 1:
                j = i + 1
                while j < nq and ok[h, j] and lo[h, j] == lo[h, i] and hi[h, j] == hi[h, j - 1] + 1:
                    j += 1
                if j - i >= 2:
                    out.append((h, i, j - i, int(lo[h, i])))
                    i = j
                    continue
            i += 1
    return out


def _pair_cost(Lq: int) -> float:
    """Relative cost of one (query, key) pair in the fused kernel for a kernel row of ``Lq``
    queries: ATen tiles queries into 32-row blocks below 192 rows, 64-row below 768, else 256
    (larger blocks reuse each key block more; measured on 2 threads, float32)."""
    return 1.3 if Lq < 192 else (1.15 if Lq < 768 else 1.0)


def estimate_cost(kinds: np.ndarray, block: int, *, backward: bool = False) -> float:
    """Estimated cost (pair units) of running ``kinds`` uint8 [Hk, nq, nkv] at square tiles of
    ``block`` tokens on this path, from the tile structure alone (masks are not evaluated):
    staircases cost half their square (``is_causal``), rows sharing a span run as one long
    kernel row, rows that fit no run are gathered (30 % more). ``backward``: the fused backward
    writes and folds one key gradient per row and span slot; that memory traffic costs about
    half a pair per key element at 32-token tiles, less at larger ones."""
    if 0 in kinds.shape:
        return 0.0
    lo, hi, ok = _spans(kinds, HOLE_FRACTION)
    e2 = float(block * block)
    fold = (1.0 + 0.5 * 32.0 / block) if backward else 1.0
    total = 0.0
    for h in range(kinds.shape[0]):
        taken = np.zeros(kinds.shape[1], dtype=bool)
        for _, i0, M, _ in _staircases(lo[h:h + 1], hi[h:h + 1], ok[h:h + 1]):
            total += 0.5 * M * M * e2 * _pair_cost(M * block)
            taken[i0:i0 + M] = True
        rows = np.nonzero(ok[h] & ~taken)[0]
        if rows.size:
            S, L = hi[h, rows] - lo[h, rows], lo[h, rows]
            # consecutive rows that share their span become one longer kernel row
            new = np.ones(rows.size, dtype=bool)
            new[1:] = (np.diff(rows) != 1) | (S[1:] != S[:-1]) | (L[1:] != L[:-1])
            starts = np.nonzero(new)[0]
            m = np.diff(np.append(starts, rows.size))
            for mm, ss in zip(m.tolist(), S[starts].tolist()):
                total += mm * ss * e2 * _pair_cost(mm * block) * (fold if ss > 1 else 1.0)
        other = ~ok[h] & (kinds[h] != EMPTY).any(-1)
        total += 1.3 * _pair_cost(block) * e2 * float((kinds[h][other] != EMPTY).sum())
    return total


def _greedy(units):
    """Split ``units`` (sorted ``(q0, lo)`` pairs of one shape) into arithmetic runs:
    ``[(q0, tau, lo, sigma, count)]``."""
    out, a, n = [], 0, len(units)
    while a < n:
        b, tau, sigma = a + 1, 1, 0
        if b < n and units[b][1] >= units[a][1]:
            tau, sigma = units[b][0] - units[a][0], units[b][1] - units[a][1]
            while b + 1 < n and units[b + 1][0] - units[b][0] == tau and units[b + 1][1] - units[b][1] == sigma:
                b += 1
            b += 1
        out.append((units[a][0], tau, units[a][1], sigma, b - a))
        a = b
    return out


class Fused:
    """The runs of a ``blocksparse.Plan`` and the ``Plan`` of its remaining rows (``rest``).

    Built by ``build`` (None when no run is found or the tile masks are too many to cache).
    """

    def __init__(self, runs: list, rest, table_bias: torch.Tensor):
        self.runs, self.rest = runs, rest
        self.table_bias = table_bias  # float32 [T, qb, kb]: 0 allowed, -inf not
        self.alibi_cache: dict = {}  # ALiBi's per-call masks (``_alibi_mask``)

    def bias(self, run: Run, r0: int, r1: int) -> torch.Tensor | None:
        """float32 additive mask of kernel rows [r0, r1) of ``run``: ``[1 or R, m * qb or 1,
        span * kb]`` (1 row: the same for every query row, ``_column_bias``); None when no
        entry is masked."""
        if run.ids is None:
            return None
        if run.bias is not None:
            return run.bias if run.bias.shape[0] == 1 else run.bias[r0:r1]
        return _bias_of(self.table_bias, run.ids if run.ids.shape[0] == 1 else run.ids[r0:r1])

    @staticmethod
    def empty(run: Run, r0: int, r1: int) -> torch.Tensor | None:
        """bool ``[1 or R, m * qb]``: query rows with no allowed key (None: none)."""
        if run.empty is None:
            return None
        return run.empty if run.empty.shape[0] == 1 else run.empty[r0:r1]


def _bias_of(table_bias: torch.Tensor, ids: torch.Tensor) -> torch.Tensor:
    """[R, m, S] tile ids -> float32 [R, m * qb, S * kb]."""
    R, m, S = ids.shape
    qb, kb = table_bias.shape[1:]
    b = table_bias.index_select(0, ids.reshape(-1)).view(R, m, S, qb, kb)
    return b.permute(0, 1, 3, 2, 4).reshape(R, m * qb, S * kb)


def _tile_ids(plan, kh, ok, mask_mod, mask_cache_elements, mask_eval_elements):
    """int64 [Hk, nq, nkv] tile ids over the rows ``ok`` (FULL -> 0, EMPTY -> 1, PARTIAL ->
    its distinct mask in the table), and the table (bool [T, qb, kb]); None past the limits."""
    qb, kb = plan.q_block_size, plan.kv_block_size
    dev = plan.device
    ids = np.where(kh == FULL, _FULL_ID, _NONE_ID).astype(np.int64)
    ph, pq, pk = np.nonzero((kh != FULL) & (kh != EMPTY) & ok[:, :, None])
    if ph.size * qb * kb > mask_eval_elements:
        return None
    full, none = np.ones((qb, kb), dtype=bool), np.zeros((qb, kb), dtype=bool)
    tril = np.arange(kb)[None, :] <= np.arange(qb)[:, None]
    table = TileTable(qb, kb, mask_cache_elements, first=(full, none, tril))  # _FULL_ID, _NONE_ID, _TRIL_ID
    step = max(1, CHUNK_ELEMENTS // (qb * kb))
    for a in range(0, ph.size, step):
        h_t = torch.as_tensor(ph[a:a + step], device=dev)
        q_t = torch.as_tensor(pq[a:a + step], device=dev)
        k_t = torch.as_tensor(pk[a:a + step, None], device=dev)
        allowed = allowed_in_tiles(mask_mod, plan, h_t, q_t, k_t, torch.ones_like(k_t, dtype=torch.bool))
        got = table.add(allowed.cpu().numpy())
        if got is None:
            return None
        ids[ph[a:a + step], pq[a:a + step], pk[a:a + step]] = got
    return ids, table.stacked()


def _ragged_corner_is_tril(plan, ids: np.ndarray, table: np.ndarray) -> None:
    """At a ragged end, the last diagonal tile of ``causal`` is the lower triangle cut to the
    real keys: mark it ``_TRIL_ID`` in ``ids`` (in place) where its real rows are exactly that
    and ``rq <= rk`` (real rows ``x < rq`` then allow ``c <= x < rk``: real keys only). Padded
    rows read padded keys (zeros) or whatever the mask gave them; their output is dropped and
    gives nothing back in the backward (their dO is 0). So a ragged causal staircase stays one
    plain staircase (else it is cut into per-block runs, or slabs with a bias)."""
    qb, kb = plan.q_block_size, plan.kv_block_size
    nq, nkv = plan.num_q_blocks, plan.num_kv_blocks
    if qb != kb or not nq or not nkv:
        return
    rq, rk = plan.q_len - (nq - 1) * qb, plan.kv_len - (nkv - 1) * kb
    if (rq == qb and rk == kb) or rq > rk:
        return
    want = (np.arange(kb)[None, :] <= np.arange(qb)[:, None]) & (np.arange(kb)[None, :] < rk)
    for h in range(ids.shape[0]):
        t = ids[h, nq - 1, nkv - 1]
        if t > _TRIL_ID and np.array_equal(table[t][:rq], want[:rq]):  # padded rows: whatever they read
            ids[h, nq - 1, nkv - 1] = _TRIL_ID


def _column_bias(ids: np.ndarray, table: np.ndarray, table_bias: torch.Tensor) -> torch.Tensor | None:
    """float32 ``[1, 1, S * kb]``: a run's mask (tile ids ``[m, S]``) as one row, broadcast over its
    query rows, where every query row's mask is the same (each key block one tile down the run,
    each tile's rows equal); else None."""
    if not (ids == ids[:1]).all():
        return None
    top = table[ids[0]]  # [S, qb, kb]
    if not (top == top[:, :1]).all():
        return None
    return table_bias[torch.as_tensor(ids[0], device=table_bias.device), 0].reshape(1, 1, -1)


def build(plan, kinds: np.ndarray, head_independent: bool, mask_mod, *, plan_cls,
          mask_cache_elements: int, mask_eval_elements: int) -> Fused | None:
    """The ``Fused`` runs of ``plan`` (a ``blocksparse.Plan``; ``kinds`` uint8 [H, nq, nkv] its
    tile kinds with the ragged last key block PARTIAL), or None."""
    qb, kb = plan.q_block_size, plan.kv_block_size
    dev = plan.device
    kh = kinds[:1] if head_independent else kinds
    if 0 in kh.shape:
        return None
    lo, hi, ok = _spans(kh, HOLE_FRACTION)
    if not ok.any():
        return None
    got = _tile_ids(plan, kh, ok, mask_mod, mask_cache_elements, mask_eval_elements)
    if got is None:
        return None
    ids_all, table = got
    _ragged_corner_is_tril(plan, ids_all, table)
    tril = np.arange(kb)[None, :] <= np.arange(qb)[:, None]
    is_tril = ~(table & ~tril).reshape(table.shape[0], -1).any(-1) if qb == kb else np.zeros(len(table), bool)

    def causal_ok(ids):  # ids [..., m, S] with m == S: nothing above the diagonal
        m, S = ids.shape[-2:]
        r, s = np.arange(m)[:, None], np.arange(S)[None, :]
        return bool((ids[..., s > r] == _NONE_ID).all() and is_tril[ids[..., (s == r) & (r >= 0)]].all())

    units: dict[tuple, list] = {}  # (h, m, span, causal) -> [(q0, lo)]
    taken = np.zeros(ok.shape, dtype=bool)
    if qb == kb:
        for h, i0, M, l0 in _staircases(lo, hi, ok):
            blk = ids_all[h, i0:i0 + M, l0:l0 + M]
            if not causal_ok(blk):
                continue
            plain = bool((blk[np.tril_indices(M, -1)] == _FULL_ID).all() and (np.diagonal(blk) == _TRIL_ID).all())
            if not plain and M * qb * M * kb > RUN_CHUNK_ELEMENTS:
                continue
            units.setdefault((h, M, M, True), []).append((i0, l0))
            taken[h, i0:i0 + M] = True
    for h, i in zip(*np.nonzero(ok & ~taken)):
        S = int(hi[h, i] - lo[h, i])
        units.setdefault((int(h), 1, S, False), []).append((int(i), int(lo[h, i])))
    found = []
    for (h, m, S, causal), us in units.items():
        us.sort()
        for q0, tau, l0, sigma, count in _greedy(us):
            if m == 1 and sigma == 0 and tau == 1 and count > 1:  # one shared span: one long kernel row
                found.append((h, q0, 1, l0, 0, 1, count, S, False))
            else:
                found.append((h, q0, tau, l0, sigma, count, m, S, causal))
    if len(found) > MAX_RUNS:
        found.sort(key=lambda r: -r[5] * r[6] * r[7])
        found = found[:MAX_RUNS]
    table_t = torch.as_tensor(table, device=dev)
    table_bias = torch.zeros(table.shape, dtype=torch.float32, device=dev).masked_fill_(~table_t, float("-inf"))
    row_any = table_t.any(-1)  # [T, qb]
    runs, cached = [], 0
    for h, q0, tau, kv0, sigma, R, m, S, causal in found:
        qs = q0 + tau * np.arange(R)[:, None] + np.arange(m)[None, :]  # [R, m]
        ks = kv0 + sigma * np.arange(R)[:, None] + np.arange(S)[None, :]  # [R, S]
        ids = ids_all[h][qs[:, :, None], ks[:, None, :]]  # [R, m, S]
        if not causal and m == S and qb == kb and causal_ok(ids):
            causal = True  # e.g. a diagonal tile inside the lower triangle: skip its upper half
        run = Run(head=None if head_independent else int(h), q0=q0, tau=tau, kv0=kv0, sigma=sigma,
                  rows=R, m=m, span=S, causal=causal)
        if causal:
            r, s = np.arange(m)[:, None], np.arange(S)[None, :]
            need = bool((ids[:, r > s] != _FULL_ID).any() or (ids[:, r == s] != _TRIL_ID).any())
        else:
            need = bool((ids != _FULL_ID).any())
        if need:
            if (ids == ids[:1]).all():
                ids = ids[:1]
            size = ids.shape[0] * m * qb * S * kb
            col = None
            if ids.shape[0] == 1 and size > BIAS_CACHE_ELEMENTS:
                # one mask for every kernel row, bigger than the cache (one long row whose last
                # key block is ragged: ``all``'s bias would be N x N): one row of it where every
                # query row's mask is the same, else these rows take the gather path
                col = _column_bias(ids[0], table, table_bias)
                if col is None:
                    continue
            run.ids = torch.as_tensor(ids, device=dev)
            if col is not None:
                run.bias = col
            elif ids.shape[0] == 1 or cached + size <= BIAS_CACHE_ELEMENTS:
                run.bias = _bias_of(table_bias, run.ids)
                cached += size if ids.shape[0] > 1 else 0
            empty = ~row_any[run.ids].any(2).reshape(ids.shape[0], m * qb)  # [R or 1, m * qb]
            if bool(empty.any()):
                run.empty = empty
        runs.append(run)
    if not runs:
        return None
    # the rows no run took go to the gather path
    rest = kinds.copy()
    for run in runs:
        rows = (run.q0 + run.tau * np.arange(run.rows)[:, None] + np.arange(run.m)[None, :]).reshape(-1)
        if head_independent:
            rest[:, rows] = EMPTY
        else:
            rest[run.head, rows] = EMPTY
    rest_layout = SimpleNamespace(kinds=rest, q_len=plan.q_len, kv_len=plan.kv_len,
                                  q_block_size=qb, kv_block_size=kb)
    rest_plan = plan_cls(rest_layout, plan.num_heads, dev, mask_mod)
    return Fused(runs, rest_plan, table_bias)


# ---- execution -------------------------------------------------------------------------------
def _alibi_rows(alibi, run: Run, qb: int, kb: int) -> int | None:
    """Most kernel rows of a causal staircase's calls with ALiBi (None: any number). Its slabs'
    bias is in the call's first row's frame; row ``r`` of it is off by ``m * delta * r``
    (``delta = sigma * kb - tau * qb``), a constant the softmax ignores but that the kernel adds
    to that row's scores, so their float32 rounding grows with it: rows are grouped so that it
    stays within ``ScoreTerms.FAST_ALIBI_SPREAD`` score units (the bound of the other ALiBi
    paths). Other runs need no bound: their bias is centred on each query row's last allowed
    key (``_last_allowed``), the same in every kernel row's own key window."""
    delta = run.sigma * kb - run.tau * qb
    if alibi is None or delta == 0:
        return None
    m = float(alibi.slopes.abs().max()) if alibi.slopes is not None and alibi.slopes.numel() else 0.0
    if m == 0.0:
        return None
    return 1 + int(alibi.FAST_ALIBI_SPREAD // (m * abs(delta)))


def _calls(run: Run, *, B: int, H: int, H_kv: int, nq: int, nkv: int, qb: int, kb: int, width: int = 64,
           heads: bool = False, call_elements: int | None = None, alibi=None):
    """Yield ``(r0, r1, Bp, q, kv)`` per kernel call of ``run``: ``q`` / ``kv`` are
    ``(offset, batch_stride, row_stride)`` in tokens of the flat padded query
    (``[B * H * nq * qb]``) and key (``[B * H_kv * nkv * kb]``) sequences. ``heads``: also yield
    the call's query head per batch entry, a tuple of ``Bp`` ints (ALiBi's slopes). ``alibi``:
    the score terms whose ALiBi the calls take (``_alibi_rows`` bounds their rows)."""
    g = H // H_kv
    if run.head is None:  # (b, kv head) is one batch index; one call per query head of a group
        bases = [(B * H_kv, j * nq * qb, g * nq * qb, 0, nkv * kb) for j in range(g)]
        who = [tuple(kvh * g + j for _ in range(B) for kvh in range(H_kv)) for j in range(g)]
    else:
        bases = [(B, run.head * nq * qb, H * nq * qb, (run.head // g) * nkv * kb, H_kv * nkv * kb)]
        who = [(run.head,) * B]
    Bp = bases[0][0]
    step = run.rows if call_elements is None else max(1, call_elements // (Bp * width * (run.m * qb + run.span * kb)))
    if run.ids is not None and run.ids.shape[0] > 1:
        step = min(step, max(1, RUN_CHUNK_ELEMENTS // (run.m * qb * run.span * kb)))
    most = _alibi_rows(alibi, run, qb, kb)
    if most is not None:
        step = min(step, most)
    for (Bp, qoff, qB, koff, kB), hs in zip(bases, who):
        for r0 in range(0, run.rows, step):
            r1 = min(run.rows, r0 + step)
            q = (qoff + (run.q0 + run.tau * r0) * qb, qB, run.tau * qb)
            kv = (koff + (run.kv0 + run.sigma * r0) * kb, kB, run.sigma * kb)
            yield (r0, r1, Bp, q, kv, hs) if heads else (r0, r1, Bp, q, kv)


#: ALiBi on the runs (``alibi_fits``): most float32 elements of one call's bias ``[Bp, 1 or R,
#: m * qb, span * kb]`` (a causal staircase's is its whole square: those layouts stay on the
#: gather path, where ALiBi is one more q / k column), and most kept in the per-layout cache
ALIBI_CALL_ELEMENTS = 1 << 21
ALIBI_CACHE_ELEMENTS = 1 << 24


def alibi_fits(fz: Fused, *, B: int, H: int, H_kv: int) -> bool:
    """True when every call of every run can take ALiBi as a bias of at most
    ``ALIBI_CALL_ELEMENTS`` (``scoremod.ScoreTerms.run_alibi``)."""
    plan = fz.rest
    qb, kb = plan.q_block_size, plan.kv_block_size
    for run in fz.runs:
        Bp = B * H_kv if run.head is None else B
        per_row = run.m * qb * run.span * kb
        rows = 1
        if run.ids is not None and run.ids.shape[0] > 1:  # per-row masks: a per-row bias
            rows = min(run.rows, max(1, RUN_CHUNK_ELEMENTS // per_row))
        if Bp * rows * per_row > ALIBI_CALL_ELEMENTS:
            return False
    return True


def _last_allowed(bias, Lq: int, L: int, causal: bool) -> torch.Tensor:
    """int64 ``[1 or R, Lq]``: each query row's last allowed column of a call whose mask is
    ``bias`` (float ``[1 or R, Lq, L]``, -inf where not allowed; None: all allowed; ``causal``:
    the kernel also drops columns past the row), 0 for a row with none (ALiBi's reference
    column, ``ScoreTerms.run_alibi``)."""
    cols = torch.arange(L)
    if bias is None:
        last = torch.full((1, Lq), L - 1, dtype=torch.int64)
    else:
        last = torch.where(torch.isfinite(bias), cols, -1).amax(-1)
    if causal:
        last = torch.minimum(last, torch.arange(Lq) + (L - Lq))
    return last.clamp_(min=0)


def _alibi_mask(alibi, cache: dict, fz: Fused, run: Run, r0: int, r1: int, hs: tuple, bias, qb: int, kb: int):
    """The call's kernel mask with ALiBi added (float32 ``[Bp, 1 or R, m * qb, span * kb]``) and
    the ``[Bp, R, Lq]`` shift of its log-sum-exp (``scoremod.ScoreTerms.run_alibi``), cached per
    call while ``ALIBI_CACHE_ELEMENTS`` allow."""
    key = (id(run), r0, r1, hs, alibi.cache_key)
    hit = cache.get(key)
    if hit is not None:
        return hit
    heads = torch.as_tensor(hs, dtype=torch.int64, device=fz.table_bias.device)
    base = (run.kv0 + run.sigma * r0) * kb - (run.q0 + run.tau * r0) * qb
    delta = run.sigma * kb - run.tau * qb
    ab, shift = alibi.run_alibi(heads, base, delta, r1 - r0, run.m * qb, run.span * kb,
                                _last_allowed(bias, run.m * qb, run.span * kb, run.causal))
    mask = ab if bias is None else ab + bias[None]
    hit = (mask, shift)
    used = cache.get("elements", 0) + mask.numel()
    if used <= ALIBI_CACHE_ELEMENTS:
        cache[key] = hit
        cache["elements"] = used
    return hit


def _view(x: torch.Tensor, Bp: int, R: int, L: int, where, width: int | None = None):
    """``[Bp, R, L, width]`` strided view of the contiguous ``x`` (``width`` None: ``[Bp, R, L]``)."""
    assert x.is_contiguous()
    off, sb, sr = where
    w = 1 if width is None else width
    size, stride = (Bp, R, L), (sb * w, sr * w, w)
    if width is not None:
        size, stride = size + (width,), stride + (1,)
    return x.as_strided(size, stride, x.storage_offset() + off * w)


def forward(fz: Fused, flash, qp, kp, vp, out, lse, scale: float, *, B: int, H: int, H_kv: int,
            alibi=None) -> None:
    """Every run's rows: ``out`` / ``lse`` (contiguous, padded) written in place. ``alibi``: a
    ``scoremod.ScoreTerms`` of ALiBi alone, in natural positions (``alibi_fits`` checked)."""
    plan = fz.rest
    qb, kb, nq, nkv = plan.q_block_size, plan.kv_block_size, plan.num_q_blocks, plan.num_kv_blocks
    D, Dv = qp.shape[-1], vp.shape[-1]
    inf = float("inf")
    for run in fz.runs:
        Lq, L = run.m * qb, run.span * kb
        for r0, r1, Bp, qw, kw, hs in _calls(run, B=B, H=H, H_kv=H_kv, nq=nq, nkv=nkv, qb=qb, kb=kb,
                                             width=D + Dv, heads=True):
            R = r1 - r0
            bias = fz.bias(run, r0, r1)
            mask = None if bias is None else bias[None]
            if alibi is not None:
                mask, shift = _alibi_mask(alibi, fz.alibi_cache, fz, run, r0, r1, hs, bias, qb, kb)
            o, lg = flash(_view(qp, Bp, R, Lq, qw, D), _view(kp, Bp, R, L, kw, D), _view(vp, Bp, R, L, kw, Dv),
                          0.0, run.causal, attn_mask=mask, scale=scale)
            if alibi is not None:
                lg = lg + shift
            e = fz.empty(run, r0, r1)
            if e is not None:  # the fused kernel gives 0 and lse 0 there (its own buffers)
                lg.masked_fill_(e[None], inf)
                o.masked_fill_(e[None, :, :, None], 0.0)
            _view(out, Bp, R, Lq, qw, Dv).copy_(o)
            if lse is not None:
                _view(lse, Bp, R, Lq, qw).copy_(lg)


def backward(fz: Fused, flash_bw, dop, qp, kp, vp, out, lse, dq, dk, dv, scale: float, *,
             B: int, H: int, H_kv: int, alibi=None) -> None:
    """Every run's gradients, added into ``dq`` / ``dk`` / ``dv`` (contiguous, padded);
    ``alibi`` as for ``forward``."""
    plan = fz.rest
    qb, kb, nq, nkv = plan.q_block_size, plan.kv_block_size, plan.num_q_blocks, plan.num_kv_blocks
    D, Dv = qp.shape[-1], vp.shape[-1]
    for run in fz.runs:
        S = run.span
        Lq, L = run.m * qb, S * kb
        for r0, r1, Bp, qw, kw, hs in _calls(run, B=B, H=H, H_kv=H_kv, nq=nq, nkv=nkv, qb=qb, kb=kb,
                                             width=D + Dv, heads=True, call_elements=CALL_ELEMENTS):
            R = r1 - r0
            bias = fz.bias(run, r0, r1)
            mask, lg = None if bias is None else bias[None], _view(lse, Bp, R, Lq, qw)
            if alibi is not None:
                mask, shift = _alibi_mask(alibi, fz.alibi_cache, fz, run, r0, r1, hs, bias, qb, kb)
                lg = (lg - shift).to(qp.dtype)  # float64 lse (blocksparse.lse_dtype) to the kernel frame
            dqg, dkg, dvg = flash_bw(
                _view(dop, Bp, R, Lq, qw, Dv), _view(qp, Bp, R, Lq, qw, D),
                _view(kp, Bp, R, L, kw, D), _view(vp, Bp, R, L, kw, Dv),
                _view(out, Bp, R, Lq, qw, Dv), lg.contiguous(), 0.0, run.causal,
                attn_mask=mask, scale=scale)
            _view(dq, Bp, R, Lq, qw, D).add_(dqg)
            if run.sigma == 0:  # every row read the same span: one sum
                span = (kw[0], kw[1], 0)
                _view(dk, Bp, 1, L, span, D).add_(dkg.sum(1, keepdim=True))
                _view(dv, Bp, 1, L, span, Dv).add_(dvg.sum(1, keepdim=True))
            else:  # spans overlap: fold slot by slot (one slot's rows never overlap)
                for s in range(S):
                    at = (kw[0] + s * kb, kw[1], kw[2])
                    _view(dk, Bp, R, kb, at, D).add_(dkg[:, :, s * kb:(s + 1) * kb])
                    _view(dv, Bp, R, kb, at, Dv).add_(dvg[:, :, s * kb:(s + 1) * kb])


# ---- the scored path: softcap (and ALiBi) on the same views, unfused -------------------------
#: score elements of one call of the scored path: big enough that a call's dozen torch ops
#: amortise their dispatch, small enough that its scores stay in the last-level cache
SCORED_CALL_ELEMENTS = 1 << 20
#: query blocks per slab of a causal staircase on the scored path: a staircase of M blocks is
#: cut into slabs of this many query blocks, each reading its keys up to its diagonal; the
#: computed upper triangles of the slabs' diagonal squares waste about SLAB_BLOCKS / M of it
SLAB_BLOCKS = 4


def scored_form(terms):
    """``(form, a, const)`` of the softcap of ``terms`` (a ``scoremod.ScoreTerms``) on the scored
    path, whose kernel scores ``x`` arrive multiplied by ``terms.prescale``: ``"sigmoid"``
    (``c(x) = a * sigmoid(x) + const``, ``a = 2c``, ``const = -c``) or ``"tanh"`` (``a * tanh(x)``,
    ``a = c``, ``const = 0``); ``("none", 1, 0)`` for ALiBi alone (a layout the fused kernel's
    ALiBi does not fit: ``alibi_fits``); None where the terms have neither or are not
    ``prescaled``."""
    cap = getattr(terms, "cap", None)
    if cap is None:
        return ("none", 1.0, 0.0) if getattr(terms, "slopes", None) is not None else None
    if not getattr(terms, "scores_over_cap", False):
        return None
    if terms.softcap_form == "sigmoid":
        return "sigmoid", 2.0 * cap, -cap
    return "tanh", cap, 0.0


class _Workspace:
    """Reused flat buffers of the scored path, one per role: a fresh score-sized tensor per call
    would come from fresh pages (glibc maps large blocks anew), and faulting them in costs about
    as much as a pass over them."""

    def __init__(self):
        self.bufs: dict = {}

    def take(self, role: str, shape, like: torch.Tensor) -> torch.Tensor:
        n = 1
        for d in shape:
            n *= d
        buf = self.bufs.get(role)
        if buf is None or buf.numel() < n:
            buf = self.bufs[role] = torch.empty(n, dtype=like.dtype, device=like.device)
        return buf[:n].view(shape)


def _bmm(x: torch.Tensor, y: torch.Tensor, ws: _Workspace, role: str) -> torch.Tensor:
    """``x @ y`` into ``ws``'s contiguous buffer ``role``, of 4-D strided views ``[P, R, a, b] @
    [P, R, b, c]`` without copying them: one ``bmm`` over the dimension that is not 1, else a
    loop over the shorter leading dimension (the views' rows may overlap: no merging them)."""
    P, R = x.shape[0], x.shape[1]
    out = ws.take(role, (P, R, x.shape[2], y.shape[3]), x)
    if R == 1:
        torch.bmm(x[:, 0], y[:, 0], out=out[:, 0])
    elif P == 1:
        torch.bmm(x[0], y[0], out=out[0])
    elif P <= R:
        for p in range(P):
            torch.bmm(x[p], y[p], out=out[p])
    else:
        for r in range(R):
            torch.bmm(x[:, r], y[:, r], out=out[:, r])
    return out


def _transform(x: torch.Tensor, form: str, a: float, bias) -> torch.Tensor:
    """In place: kernel scores ``x`` -> ``a * f(x) + bias`` (``f`` sigmoid or tanh; the
    softcap's ``const`` is left out: a constant of every row, it moves only the log-sum-exp)."""
    if form == "none":
        return x if bias is None else x.add_(bias)
    x.sigmoid_() if form == "sigmoid" else x.tanh_()
    if bias is None:
        return x.mul_(a)
    return torch.add(bias, x, alpha=a, out=x)


class _Calls:
    """The calls of the scored path over one ``Fused``: yields ``(Lq, L, qw, kw, bias, shift, Bp,
    R)`` (as ``_calls``: query / key view places, ``R`` kernel rows) with ``bias`` the call's
    additive mask (+ ALiBi) broadcastable to ``[Bp, R, Lq, L]`` (None: none) and ``shift``
    float64 ``[Bp, R, 1 or Lq]`` (ALiBi's per-row constants; None) to add to the kernel-frame
    log-sum-exp. A causal staircase (``m == span``, ``causal``) is cut into slabs of up to
    ``SLAB_BLOCKS`` query blocks (their diagonal squares computed whole, upper triangles
    masked).

    ``inline`` (the fused native calls, ``native.flash_forward``): a plain causal staircase is one
    call per ``_calls`` chunk, its mask and ALiBi computed in the kernel (no bias tensor), and
    other runs are not cut by score size (no score-sized tensor exists); each call then also
    yields ``(causal_off, slopes)`` (float32 ``[Bp]`` or None) for the kernel, else None."""

    def __init__(self, fz: Fused, *, B: int, H: int, H_kv: int, alibi=None, inline: bool = False):
        self.fz, self.B, self.H, self.H_kv, self.alibi = fz, B, H, H_kv, alibi
        self.inline = inline
        plan = fz.rest
        self.qb, self.kb = plan.q_block_size, plan.kv_block_size
        self.nq, self.nkv = plan.num_q_blocks, plan.num_kv_blocks
        self.cache = fz.__dict__.setdefault("scored_cache", {})

    def __iter__(self):
        qb, kb = self.qb, self.kb
        for run in self.fz.runs:
            if run.causal and run.m > 1:
                yield from (self._staircase(run) if self.inline and run.ids is None else
                            (c + (None,) for c in self._slabs(run)))
                continue
            Lq, L = run.m * qb, run.span * kb
            rows = max(1, SCORED_CALL_ELEMENTS // (Lq * L)) if not self.inline else run.rows
            for r0, r1, Bp, qw, kw, hs in _calls(run, B=self.B, H=self.H, H_kv=self.H_kv, nq=self.nq,
                                                 nkv=self.nkv, qb=qb, kb=kb, heads=True):
                for a0 in range(r0, r1, rows):  # _calls chunks by bias size; this by score size
                    a1 = min(r1, a0 + rows)
                    q = (qw[0] + (a0 - r0) * qw[2], qw[1], qw[2])
                    kv = (kw[0] + (a0 - r0) * kw[2], kw[1], kw[2])
                    bias, shift = self._run_bias(run, a0, a1, hs, Bp)
                    yield Lq, L, q, kv, bias, shift, Bp, a1 - a0, None

    def _staircase(self, run: Run):
        """A plain causal staircase as whole calls for the fused kernels: query row ``x`` of a
        kernel row allows columns ``c <= x + (L - Lq)`` (the slabs' right-aligned diagonal) and
        ALiBi is ``m (c - x - (L - Lq))`` there; ``m (j - i)`` is that plus ``m (L - Lq + base + r
        delta)`` (offsets included), a constant of kernel row ``r``: the shift."""
        qb, kb, M = self.qb, self.kb, run.m
        Lq, L = M * qb, M * kb
        off = L - Lq
        for r0, r1, Bp, qw, kw, hs in _calls(run, B=self.B, H=self.H, H_kv=self.H_kv, nq=self.nq,
                                             nkv=self.nkv, qb=qb, kb=kb, heads=True):
            slopes = shift = None
            if self.alibi is not None:
                dev = self.fz.table_bias.device
                heads = torch.as_tensor(hs, dtype=torch.int64, device=dev)
                slopes = self.alibi.slopes_on(dev, torch.float32).index_select(0, heads).contiguous()
                m64 = self.alibi.slopes_on(dev, torch.float64).index_select(0, heads)
                base = (run.kv0 + run.sigma * r0) * kb - (run.q0 + run.tau * r0) * qb
                r = torch.arange(r1 - r0, device=dev) * (run.sigma * kb - run.tau * qb)
                const = off + base + self.alibi.kv_offset - self.alibi.q_offset
                shift = (r + const).to(torch.float64)[None, :, None] * m64[:, None, None]  # [Bp, R, 1]
            yield Lq, L, qw, kw, None, shift, Bp, r1 - r0, (off, slopes)

    def _run_bias(self, run: Run, r0: int, r1: int, hs: tuple, Bp: int):
        if run.causal:  # m == span == 1: one diagonal tile, nothing above it
            ids = run.ids if run.ids is not None else torch.full((1, 1, 1), _TRIL_ID, dtype=torch.int64)
            key = ("tile", id(run), r0 if ids.shape[0] > 1 else None)
            bias = self.cache.get(key)
            if bias is None:
                bias = _bias_of(self.fz.table_bias, ids if ids.shape[0] == 1 else ids[r0:r1])
                if ids.shape[0] == 1:
                    self.cache[key] = bias
        else:
            bias = self.fz.bias(run, r0, r1)
        if self.alibi is None:
            return (None if bias is None else bias[None]), None
        qb, kb = self.qb, self.kb
        # one bias for every kernel row where the mask is shared: centred on each query row's last
        # allowed key, it is the same in every kernel row's own key window; the rest is the shift
        shared = bias is None or bias.shape[0] == 1
        key = ("alibi", id(run), hs, None if shared else (r0, r1), self.alibi.cache_key)
        hit = self.cache.get(key)
        if hit is None:  # kernel row r's j - i is row 0's plus r * delta: a shift of its lse
            heads = torch.as_tensor(hs, dtype=torch.int64, device=self.fz.table_bias.device)
            base = (run.kv0 + run.sigma * r0 * (not shared)) * kb - (run.q0 + run.tau * r0 * (not shared)) * qb
            ab, shift = self.alibi.run_alibi(heads, base, run.sigma * kb - run.tau * qb,
                                             run.rows if shared else r1 - r0, run.m * qb, run.span * kb,
                                             _last_allowed(bias, run.m * qb, run.span * kb, False))
            hit = (ab if bias is None else ab + bias[None], shift)
            self._keep(key, hit)
        ab, shift = hit
        return ab, (shift[:, r0:r1] if shared else shift)

    def _keep(self, key, hit) -> None:
        used = self.cache.get("elements", 0) + hit[0].numel()
        if used <= ALIBI_CACHE_ELEMENTS:
            self.cache[key] = hit
            self.cache["elements"] = used

    def _slabs(self, run: Run):
        """The slabs of a causal staircase: query blocks ``[a, a + g)`` of each kernel row read
        key blocks ``[0, a + g)``; cut from the end, so every slab but the first has ``g``
        blocks and sits at the same place relative to its diagonal."""
        qb, kb, M = self.qb, self.kb, run.m
        Bp = self.B * self.H_kv if run.head is None else self.B
        g = max(1, min(SLAB_BLOCKS, M, SCORED_CALL_ELEMENTS // (Bp * run.rows * qb * M * kb)))
        plain = run.ids is None  # lower part FULL, diagonal tiles lower-triangular (``build``)
        for r0, r1, Bp, qw, kw, hs in _calls(run, B=self.B, H=self.H, H_kv=self.H_kv, nq=self.nq,
                                             nkv=self.nkv, qb=qb, kb=kb, heads=True, alibi=self.alibi):
            end = M
            while end > 0:
                a = max(0, end - g)
                gq = end - a
                q = (qw[0] + a * qb, qw[1], qw[2])
                bias, shift = self._slab_bias(run, r0, r1, hs, a, gq, g, plain)
                yield gq * qb, end * kb, q, kw, bias, shift, Bp, r1 - r0
                end = a

    def _slab_bias(self, run: Run, r0: int, r1: int, hs: tuple, a: int, gq: int, g: int, plain: bool):
        """Bias of slab ``[a, a + gq)`` (its ``L = (a + gq) * kb`` columns) and the shift: views
        into one right-aligned ``[Bp, g * qb, M * kb]`` tensor per run and call (the slab's
        diagonal square is always its last ``gq * kb`` columns), where its size allows."""
        qb, kb, M = self.qb, self.kb, run.m
        dev = self.fz.table_bias.device
        if not plain:  # a small non-plain staircase (``build`` keeps only those): from the tile table
            ids = run.ids if run.ids.shape[0] == 1 else run.ids[r0:r1]
            bias = _bias_of(self.fz.table_bias, ids[:, a:a + gq, :a + gq].contiguous())[None]
        else:
            key = ("tril", g, M)
            tril = self.cache.get(key)
            if tril is None:
                i = torch.arange(g * qb, device=dev)[:, None]
                j = torch.arange(M * kb, device=dev)[None, :] - (M - g) * kb
                tril = self.cache[key] = torch.zeros((g * qb, M * kb), device=dev).masked_fill_(j > i, float("-inf"))
            bias = None
        if self.alibi is None:
            if plain:
                bias = tril[None, None, (g - gq) * qb:, (M - a - gq) * kb:]
            return bias, None
        heads = torch.as_tensor(hs, dtype=torch.int64, device=dev)
        base = (run.kv0 + run.sigma * r0) * kb - (run.q0 + run.tau * r0) * qb
        delta = run.sigma * kb - run.tau * qb
        Bp = len(hs)
        if Bp * g * qb * M * kb <= ALIBI_CACHE_ELEMENTS:
            key = ("slab-alibi", id(run), r0, r1, hs, self.alibi.cache_key)
            hit = self.cache.get(key)
            if hit is None:  # rel = c - x - (M - g) kb + base at right-aligned column c, row x
                ab, shift = self.alibi.run_alibi(heads, base - (M - g) * kb, delta, r1 - r0, g * qb, M * kb)
                hit = (ab + tril[None, None] if plain else ab, shift)
                self._keep(key, hit)
            ab, shift = hit
            ab = ab[:, :, (g - gq) * qb:, (M - a - gq) * kb:]
        else:  # generated for this slab: j - i = c - x + base - a * qb
            ab, shift = self.alibi.run_alibi(heads, base - a * qb, delta, r1 - r0, gq * qb, (a + gq) * kb)
            if plain:
                ab = ab + tril[None, None, (g - gq) * qb:, (M - a - gq) * kb:]
        return (ab if bias is None else ab + bias), shift


def scored_alibi_fits(fz: Fused, *, B: int, H: int, H_kv: int) -> bool:
    """``alibi_fits`` for the scored path: a causal staircase takes ALiBi slab by slab (always
    fits); any other run's call bias ``[Bp, 1 or R, m * qb, span * kb]`` within
    ``ALIBI_CALL_ELEMENTS``."""
    plan = fz.rest
    qb, kb = plan.q_block_size, plan.kv_block_size
    for run in fz.runs:
        if run.causal and run.m > 1:
            continue
        Bp = B * H_kv if run.head is None else B
        per_row = run.m * qb * run.span * kb
        rows = 1
        if run.ids is not None and run.ids.shape[0] > 1:
            rows = min(run.rows, max(1, SCORED_CALL_ELEMENTS // per_row))
        if Bp * rows * per_row > ALIBI_CALL_ELEMENTS:
            return False
    return True


#: False: the scored path keeps its torch ops even where ``execute.native`` is available
USE_NATIVE = True


def _inline_kw(inline) -> dict:
    return {} if inline is None else {"causal_off": inline[0], "slopes": inline[1]}


def _native_kernels(x: torch.Tensor):
    if not (USE_NATIVE and x.device.type == "cpu" and x.dtype == torch.float32):
        return None
    from . import native

    return native.kernels()


def forward_scored(fz: Fused, qp, kp, vp, out, lse, *, B: int, H: int, H_kv: int, terms, alibi=None) -> None:
    """Every run's rows with a softcap (``scored_form(terms)``; ``alibi``: the same terms when they
    also have ALiBi, natural positions): ``out`` / ``lse`` (contiguous, padded; q pre-scaled by
    ``scale * terms.prescale``) written in place, unfused on the zero-copy views."""
    form, a, const = scored_form(terms)
    D, Dv = qp.shape[-1], vp.shape[-1]
    inf = float("inf")
    ws = _Workspace()
    nat = _native_kernels(qp)
    flash = nat is not None and nat.has_flash
    for Lq, L, qw, kw, bias, shift, Bp, R, inline in _Calls(fz, B=B, H=H, H_kv=H_kv, alibi=alibi, inline=flash):
        if flash:  # the whole call fused, nothing score-sized (execute.native.flash_forward)
            m, den = nat.flash_forward(_view(qp, Bp, R, Lq, qw, D), _view(kp, Bp, R, L, kw, D),
                                       _view(vp, Bp, R, L, kw, Dv), _view(out, Bp, R, Lq, qw, Dv), form, a, bias,
                                       EXP_FLOOR, **_inline_kw(inline))
            empty = m == -inf
        else:
            s = _bmm(_view(qp, Bp, R, Lq, qw, D), _view(kp, Bp, R, L, kw, D).transpose(-1, -2), ws, "s")
            if nat is not None:  # the elementwise part in one pass per row (execute.native)
                m, den = nat.forward_rows(s, form, a, bias, EXP_FLOOR)
                empty = m == -inf
            else:
                _transform(s, form, a, bias)
                m = s.amax(-1, keepdim=True)
                empty = m == -inf  # a query row with no allowed key
                m.masked_fill_(empty, 0.0)
                # masked entries' -inf (and anything below EXP_FLOOR) -> EXP_FLOOR: torch's CPU exp is
                # several times slower where its result underflows; exp(EXP_FLOOR) weighs 1e-35 of a row
                s.sub_(m).clamp_(min=EXP_FLOOR).exp_()
                den = s.sum(-1, keepdim=True)
            o = _bmm(s, _view(vp, Bp, R, L, kw, Dv), ws, "o")
            o.div_(den)
            if bool(empty.any()):
                o.masked_fill_(empty, 0.0)
            _view(out, Bp, R, Lq, qw, Dv).copy_(o)
        if lse is not None:
            lg = m.add_(den.log_()).masked_fill_(empty, inf).squeeze_(-1).add_(const)
            if shift is not None:
                lg = lg.to(lse.dtype).add_(shift)  # float64 (blocksparse.lse_dtype)
            _view(lse, Bp, R, Lq, qw).copy_(lg)


def backward_scored(fz: Fused, dop, qp, kp, vp, out, lse, dq, dk, dv, *, B: int, H: int, H_kv: int,
                    terms, alibi=None) -> None:
    """Every run's gradients on the scored path, added into ``dq`` / ``dk`` / ``dv`` (q pre-scaled
    as in ``forward_scored``; ``dq`` is multiplied by that scale by the caller, ``dk`` is not)."""
    form, a, const = scored_form(terms)
    D, Dv = qp.shape[-1], vp.shape[-1]
    kb = fz.rest.kv_block_size
    delta = (dop * out).sum(-1)  # [B, H * nq, qb]: rowsum(dO * O)
    ws = _Workspace()
    nat = _native_kernels(qp)
    flash = nat is not None and nat.has_flash
    for Lq, L, qw, kw, bias, shift, Bp, R, inline in _Calls(fz, B=B, H=H, H_kv=H_kv, alibi=alibi, inline=flash):
        qv, kv = _view(qp, Bp, R, Lq, qw, D), _view(kp, Bp, R, L, kw, D)
        vv, dov = _view(vp, Bp, R, L, kw, Dv), _view(dop, Bp, R, Lq, qw, Dv)
        lg = _view(lse, Bp, R, Lq, qw) - const  # the kernel frame's log-sum-exp
        if shift is not None:
            lg = (lg - shift).to(qp.dtype)
        if flash:  # the whole call fused, nothing score-sized (execute.native.flash_backward)
            dkg, dvg = nat.flash_backward(qv, kv, vv, dov, _view(dq, Bp, R, Lq, qw, D), form, a, bias, lg,
                                          _view(delta, Bp, R, Lq, qw), EXP_FLOOR, **_inline_kw(inline))
            _fold_kv(dk, dv, dkg, dvg, 1.0, Bp, R, L, kw, kb)
            continue
        f = _bmm(qv, kv.transpose(-1, -2), ws, "f")
        if nat is not None:  # the elementwise part in one pass per row (execute.native)
            ds = _bmm(dov, vv.transpose(-1, -2), ws, "ds")
            nat.backward_rows(f, ds, form, a, bias, lg, _view(delta, Bp, R, Lq, qw), EXP_FLOOR)
            dvg = _bmm(f.transpose(-1, -2), dov, ws, "dv")
            _fold(ws, dq, dk, dv, ds, dvg, qv, kv, a, Bp, R, Lq, L, qw, kw, kb)
            continue
        if form == "none":  # ALiBi alone: the derivative is 1
            p = f if bias is None else f.add_(bias)
        else:
            f.sigmoid_() if form == "sigmoid" else f.tanh_()
            p = ws.take("p", f.shape, f)
            torch.mul(f, a, out=p) if bias is None else torch.add(bias, f, alpha=a, out=p)
        p.sub_(lg[..., None]).clamp_(min=EXP_FLOOR, max=0.0).exp_()  # masked entries: 1e-35 (forward)
        dvg = _bmm(p.transpose(-1, -2), dov, ws, "dv")
        ds = _bmm(dov, vv.transpose(-1, -2), ws, "ds")
        ds.sub_(_view(delta, Bp, R, Lq, qw)[..., None]).mul_(p)
        if form == "sigmoid":  # d(a sigmoid(x)) / dx = a f (1 - f); tanh: a (1 - f^2)
            torch.addcmul(f, f, f, value=-1.0, out=f)
            ds.mul_(f)
        elif form == "tanh":
            torch.addcmul(torch.ones((), dtype=f.dtype, device=f.device), f, f, value=-1.0, out=f)
            ds.mul_(f)
        _fold(ws, dq, dk, dv, ds, dvg, qv, kv, a, Bp, R, Lq, L, qw, kw, kb)


def _fold(ws, dq, dk, dv, ds, dvg, qv, kv, a: float, Bp: int, R: int, Lq: int, L: int, qw, kw, kb: int) -> None:
    """Add one call's gradients: ``dq += a dS K``, ``dk += a dS^T Q``, ``dv += dvg`` (``dS`` without
    the cap's factor ``a``), folding the kernel rows' key windows back onto the keys they read."""
    _view(dq, Bp, R, Lq, qw, qv.shape[-1]).add_(_bmm(ds, kv, ws, "dq"), alpha=a)
    _fold_kv(dk, dv, _bmm(ds.transpose(-1, -2), qv, ws, "dk"), dvg, a, Bp, R, L, kw, kb)


def _fold_kv(dk, dv, dkg, dvg, a: float, Bp: int, R: int, L: int, kw, kb: int) -> None:
    """``dk += a dkg``, ``dv += dvg`` for per-kernel-row gradients ``[Bp, R, L, D or Dv]``, folding
    the kernel rows' key windows back onto the keys they read."""
    D, Dv = dkg.shape[-1], dvg.shape[-1]
    if R > 1 and kw[2] == 0:  # every row read the same keys: one sum
        span = (kw[0], kw[1], 0)
        _view(dk, Bp, 1, L, span, D).add_(dkg.sum(1, keepdim=True), alpha=a)
        _view(dv, Bp, 1, L, span, Dv).add_(dvg.sum(1, keepdim=True))
    elif R == 1 or kw[2] >= L:  # rows' keys do not overlap
        _view(dk, Bp, R, L, kw, D).add_(dkg, alpha=a)
        _view(dv, Bp, R, L, kw, Dv).add_(dvg)
    else:  # overlapping key windows: fold block slot by slot (one slot's rows never overlap)
        for s in range(L // kb):
            at = (kw[0] + s * kb, kw[1], kw[2])
            _view(dk, Bp, R, kb, at, D).add_(dkg[:, :, s * kb:(s + 1) * kb], alpha=a)
            _view(dv, Bp, R, kb, at, Dv).add_(dvg[:, :, s * kb:(s + 1) * kb])
