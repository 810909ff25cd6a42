"""The ``blocksparse`` backend: attention that touches only the listed tiles, with autograd.

Entry points (the interface other parts build on)
    ``run_terms(q, k, v, terms, scale, *, score_mod=None, return_lse=False, dropout_p=0.0)``
        Attention over a union of disjoint **terms**, each a ``Term``: a ``BlockLayout`` and
        a ``mask_mod`` *in the term's own coordinates*, and how those coordinates map to the
        caller's tensors:

        =================  =========================================================
        ``Term`` field     meaning
        =================  =========================================================
        ``layout``         tile kinds ``[H_t or 1, nq_t, nkv_t]`` over the term's rows
                           (``q_len = len(q_order)``) and columns (``kv_len =
                           len(kv_order)``); only its FULL / PARTIAL tiles are computed,
                           so a *subset of tiles* is a layout with the rest EMPTY
        ``mask_mod``       ``mask_mod(b, h, q_idx, kv_idx)`` in term coordinates (``h``
                           indexes ``heads``); ``Term.reorder`` builds it from a natural
                           one
        ``q_order``        int64 ``[Q_t]``: natural query row of term row r (a
                           permutation of, or a gather from, ``range(Q_LEN)``); None = all
                           rows in natural order
        ``kv_order``       int64 ``[KV_t]``: natural key column of term column c; None =
                           natural
        ``heads``          int64 ``[H_t]``: the query heads the term covers; None = all
        =================  =========================================================

        Each term is gathered into its order, run block-sparse, and the partial results are
        merged exactly through their log-sum-exp (``out = sum_t exp(lse_t - lse) out_t``);
        the backward recomputes each term's probabilities with the *merged* ``lse`` and
        ``rowsum(dO * O)``, so it needs no gradient through the merge, and scatters dq, dk, dv
        back to natural order (``index_add_``). ``return_lse=True`` also returns the merged
        log-sum-exp, float32 (float64 for float64 input) ``[B, H, Q_LEN]``, +inf for a row with
        no allowed key (context parallel merges across ranks with it).

        ``score_mod`` (score terms): called on every computed chunk of scaled scores before
        masking, ``score_mod(scores, heads, q_pos, kv_pos) -> scores`` (in place allowed),
        with ``scores`` float ``[B, R, qb, cols]``, ``heads`` int64 ``[R]`` (natural query
        heads), ``q_pos`` int64 ``[R, qb]`` and ``kv_pos`` int64 ``[R, cols]`` (natural row
        / column indices, 0-based, clamped into range at ragged ends; add your offsets). If
        it has an attribute ``derivative`` (same arguments, ``scores`` = the raw scores), the
        backward multiplies ``dS`` by it (``c * tanh(s / c)``: ``1 - tanh(s / c) ** 2``);
        without one it must be additive (derivative 1, e.g. ALiBi).
    ``blocksparse_attention(cp, q, k, v, scale, *, plan="natural" | ExecutionPlan | None)``
        A compiled pattern's attention: one natural term, or the terms of an execution plan
        (``patternc.lower.planner``; docs/execution.md).

Basics
    For every (head, query block) row of the layout, the kv blocks it lists (PARTIAL and
    FULL) are gathered into one contiguous ``[rows, qb, S * kb]`` score matrix, ``mask_mod``
    is applied to the PARTIAL part only, and a numerically stable softmax (log-sum-exp) runs
    over the gathered keys. EMPTY tiles are never read. This is plain torch (batched
    ``index_select`` gathers, ``matmul``, ``index_add_`` scatters), so it runs on any device
    and, unlike FlexAttention on CPU, it has a backward: it is patternc's CPU training path.

Details
    * Rows are grouped by their tile counts (PARTIAL count P, total count S) so each group
      is one batched matmul; groups are cut into chunks of rows so one chunk's score matrix
      holds at most ``chunk_elements`` numbers (memory is O(computed tiles of a chunk), not
      O(Q_LEN * KV_LEN)). A row too long for one chunk is split into kv segments merged with
      the online-softmax (running max / running sum) update.
    * When a layout has many distinct (P, S) pairs, groups are merged (a FULL tile may be
      treated as PARTIAL, a row may be padded with dead slots that are masked out): a
      bounded number of groups keeps the Python overhead small; masking a FULL tile is
      exact because ``mask_mod`` is True on all of its real token pairs.
    * The masks of the PARTIAL tiles are evaluated once per (layout, heads, device) and only
      the distinct tile masks are kept (a band has two or three however long the sequence):
      a group whose rows share their tiles gets one broadcast mask, others index a table of
      distinct tiles. Masks are float32 (an additive 0/-inf bias before the row max, a 0/1
      multiplier after exp). Past ``MASK_CACHE_ELEMENTS`` / ``MASK_EVAL_ELEMENTS``,
      ``mask_mod`` is evaluated per chunk at every call.
    * The backward pass is FlashAttention's: it saves q, k, v, the output and the row
      log-sum-exp, and recomputes the probabilities chunk by chunk
      (``dS = P * (dP - rowsum(dO * O))``). Memory stays O(chunk) in both passes.
    * Ragged ends: q/k/v are zero-padded to whole blocks; keys past KV_LEN are masked, the
      last kv block is always in the masked part; ``mask_mod`` only sees real indices
      (padded query rows reuse the last real row and are dropped).
    * Numerics: matmuls and softmax run in float32 for float16 / bfloat16 / float32 inputs
      (float64 stays float64); the result is cast back to the input dtype. ``exp`` arguments
      are clamped to [EXP_FLOOR, 0] (speed; and no inf * 0 in the backward). A query row
      with no allowed key gets output 0 and log-sum-exp +inf, so its probabilities (and its
      gradients) are exactly 0.
"""

from __future__ import annotations

import math
import weakref
from dataclasses import dataclass, field

import numpy as np
import torch

from ..ir.specialize import cdiv
from ..lower.layout import FULL, PARTIAL
from . import fused as _fused
from .common import CHUNK_ELEMENTS, EXP_FLOOR, TileTable, empty_rows, mask_mod_for  # noqa: F401  (re-exported)
from .common import allowed_in_tiles as _allowed

#: elements of the cached table of distinct PARTIAL-tile masks per (layout, heads, device);
#: each costs 8 bytes (an additive float32 bias and a multiplicative float32 keep-mask)
MASK_CACHE_ELEMENTS = 1 << 24
#: most ``mask_mod`` evaluations spent once, at plan time, to find the distinct tile masks;
#: above it the masks are evaluated per chunk at every call instead
MASK_EVAL_ELEMENTS = 1 << 29
#: above this many (P, S) groups, groups are merged
MAX_GROUPS = 128

_DEAD = 3  # a padding slot: masked out entirely

#: ATen's fused CPU flash-attention kernels (forward returns the log-sum-exp). Each chunk of
#: rows is one call with the gathered k/v and the tile masks as an additive bias: one fused pass
#: over the scores instead of ~7 elementwise ones (measured 4-6x faster per chunk, and far less
#: sensitive to a loaded machine: one parallel region per chunk instead of one per op).
_FLASH = getattr(torch.ops.aten, "_scaled_dot_product_flash_attention_for_cpu", None)
_FLASH_BW = getattr(torch.ops.aten, "_scaled_dot_product_flash_attention_for_cpu_backward", None)
#: use the fused kernel where it applies (CPU, float32 compute, cached masks, no dropout, no
#: score_mod but ALiBi alone: ``scoremod.FlashAlibi``); set False to run the unfused torch path everywhere
USE_FLASH = True
#: run rows whose key spans slide in step on zero-copy strided views (``execute.fused``) on the
#: fused path; set False to gather every row
USE_RUNS = True
#: score-sized elements per fused call (the fused kernel never materialises them; this bounds
#: the gathered k/v and the bias)
FLASH_CHUNK_ELEMENTS = 1 << 23


@dataclass
class _Group:
    heads: torch.Tensor  # int64 [G]: query head of each row
    q_blocks: torch.Tensor  # int64 [G]: query block of each row
    kv_blocks: torch.Tensor  # int64 [G, S]: slots, the first P masked
    alive: torch.Tensor  # bool [G, P]: False for dead padding slots
    num_masked: int  # P: leading slots that get mask_mod (PARTIAL, or merged FULL, or dead)
    # cached masks: either one mask shared by every row (``shared_*``, float32 [qb, P * kb]) or
    # an index into the plan's table of distinct tiles (``tile_ids``, int64 [G, P])
    shared_bias: torch.Tensor | None = None  # 0 allowed, -inf not
    shared_keep: torch.Tensor | None = None  # 1 allowed, 0 not
    tile_ids: torch.Tensor | None = None
    flash_bias: torch.Tensor | None = None  # shared masks: float32 [1, 1, qb, S * kb] (FULL slots 0)
    empty: torch.Tensor | None = None  # bool [G or 1, qb]: rows with no allowed key (None: none)

    @property
    def num_slots(self) -> int:
        return int(self.kv_blocks.shape[1])

    @property
    def num_rows(self) -> int:
        return int(self.kv_blocks.shape[0])


class Plan:
    """The gather plan of one layout for H query heads on one device (cached; see ``plan_for``).

    Attributes:
        groups: row groups (each one batched matmul per chunk).
        q_block_size, kv_block_size: tokens.
        num_q_blocks, num_kv_blocks: blocks.
        computed_tiles: number of tiles the kernel computes (including merged / dead slots).
    """

    def __init__(self, layout, num_heads: int, device, mask_mod, *,
                 mask_cache_elements: int = MASK_CACHE_ELEMENTS, max_groups: int = MAX_GROUPS,
                 mask_eval_elements: int = MASK_EVAL_ELEMENTS):
        self.q_len, self.kv_len = layout.q_len, layout.kv_len
        self.q_block_size, self.kv_block_size = layout.q_block_size, layout.kv_block_size
        self.num_heads = num_heads
        self.device = torch.device(device)
        kinds = np.asarray(layout.kinds)
        if kinds.shape[0] not in (1, num_heads):
            raise ValueError(f"a layout of {kinds.shape[0]} heads cannot run {num_heads} query heads")
        kinds = np.array(np.broadcast_to(kinds, (num_heads,) + kinds.shape[1:]), dtype=np.uint8)  # copy
        self.num_q_blocks, self.num_kv_blocks = kinds.shape[1], kinds.shape[2]
        if self.kv_len % self.kv_block_size and self.num_kv_blocks:
            last = kinds[:, :, -1]
            last[last == FULL] = PARTIAL  # the padding columns must be masked
        self.head_independent = np.asarray(layout.kinds).shape[0] == 1
        self._kinds = kinds  # uint8 [H, nq, nkv], the ragged last key block PARTIAL
        self._fused = None  # the strided runs (``fused``), built at first use
        self._mask_limits = (mask_cache_elements, mask_eval_elements)
        self.groups = self._build_groups(kinds, max_groups)
        self.computed_tiles = sum(g.num_rows * g.num_slots for g in self.groups)
        self.table_bias = self.table_keep = None  # float32 [T, qb, kb]
        self.mask_mode = "none"
        tile = self.q_block_size * self.kv_block_size
        masked = sum(g.num_rows * g.num_masked for g in self.groups) * tile
        if masked:
            self.mask_mode = "evaluated per call"
            if masked <= mask_eval_elements:
                self._cache_masks(mask_mod, mask_cache_elements)

    def _cache_masks(self, mask_mod, budget: int) -> None:
        """Evaluate every masked tile once, keep the distinct tile masks (structured patterns
        have few: a band's diagonal tiles are all alike) and give each group either one
        shared mask or tile ids into the table. Gives up (per-call evaluation) when the
        distinct tiles exceed ``budget`` elements."""
        qb, kb = self.q_block_size, self.kv_block_size
        table = TileTable(qb, kb, budget)
        per_group = []
        for g in self.groups:
            P = g.num_masked
            if not P:
                per_group.append(None)
                continue
            ids = np.empty((g.num_rows, P), dtype=np.int64)
            step = max(1, CHUNK_ELEMENTS // (qb * kb * P))
            for r0 in range(0, g.num_rows, step):
                rows = slice(r0, min(g.num_rows, r0 + step))
                a = self.allowed(mask_mod, g, rows, 0, P)  # [R, qb, P * kb]
                a = a.view(-1, qb, P, kb).permute(0, 2, 1, 3).reshape(-1, qb, kb).cpu().numpy()
                got = table.add(a)
                if got is None:
                    return
                ids[rows] = got.reshape(-1, P)
            per_group.append(ids)
        tiles = table.tiles
        table = torch.as_tensor(table.stacked(), device=self.device)
        keep = table.to(torch.float32)
        bias = torch.zeros_like(keep).masked_fill_(~table, float("-inf"))
        shared = 0
        for g, ids in zip(self.groups, per_group):
            if ids is None:
                continue
            if (ids == ids[:1]).all():  # every row has the same tiles: one broadcast mask
                first = torch.as_tensor(ids[0], device=self.device)
                g.shared_keep = keep[first].permute(1, 0, 2).reshape(qb, -1)
                g.shared_bias = bias[first].permute(1, 0, 2).reshape(qb, -1)
                shared += 1
            else:
                g.tile_ids = torch.as_tensor(ids, device=self.device)
        if shared < sum(ids is not None for ids in per_group):
            self.table_keep, self.table_bias = keep, bias
        self.mask_mode = f"cached ({len(tiles)} distinct tiles)"
        for g in self.groups:
            P, S = g.num_masked, g.num_slots
            if not P:
                continue
            if g.shared_bias is not None:
                fb = torch.zeros((qb, S * kb), dtype=torch.float32, device=self.device)
                fb[:, :P * kb] = g.shared_bias
                g.flash_bias = fb[None, None]
                if P == S:
                    g.empty = (g.shared_keep.amax(-1) == 0)[None]
            elif P == S:
                row_any = keep.amax(-1) > 0  # [T, qb]
                g.empty = ~row_any[g.tile_ids].any(1)  # [G, qb]
        for g in self.groups:
            if g.empty is not None and not bool(g.empty.any()):
                g.empty = None

    # ---- grouping ---------------------------------------------------------------------
    def _build_groups(self, kinds: np.ndarray, max_groups: int) -> list[_Group]:
        H, nq, nkv = kinds.shape
        p = (kinds == PARTIAL).sum(-1).reshape(-1).astype(np.int64)
        f = (kinds == FULL).sum(-1).reshape(-1).astype(np.int64)
        s = p + f
        rows = np.nonzero(s > 0)[0]
        if rows.size == 0:
            return []
        flat_kinds = kinds.reshape(H * nq, nkv)
        # slot order within a row: PARTIAL (ascending), then FULL (ascending)
        rank = np.where(flat_kinds == PARTIAL, 0, np.where(flat_kinds == FULL, 1, 2))
        order = np.argsort(rank * nkv + np.arange(nkv), axis=-1, kind="stable")

        # choose group keys (S_g, P_g) per row, merging when there are too many groups
        key_s, key_p = s[rows], p[rows]
        if len(set(zip(key_s.tolist(), key_p.tolist()))) > max_groups:
            # same S: treat the leading FULL tiles as PARTIAL up to the group's max P
            pmax = {}
            for a, b in zip(key_s.tolist(), key_p.tolist()):
                pmax[a] = max(pmax.get(a, 0), b)
            if len(pmax) > max_groups:
                # bucket S geometrically, padding rows with dead slots
                buckets = _geometric_buckets(int(key_s.max()), max_groups)
                key_s = buckets[np.searchsorted(buckets, key_s)]
                pad = key_s - s[rows]
                need = p[rows] + pad
                pmax = {}
                for a, b in zip(key_s.tolist(), need.tolist()):
                    pmax[a] = max(pmax.get(a, 0), b)
            key_p = np.array([pmax[a] for a in key_s.tolist()], dtype=np.int64)

        groups = []
        dev = self.device
        for sg, pg in sorted(set(zip(key_s.tolist(), key_p.tolist()))):
            sel = rows[(key_s == sg) & (key_p == pg)]
            G = sel.size
            slots = np.zeros((G, sg), dtype=np.int64)
            slot_kind = np.full((G, sg), _DEAD, dtype=np.int64)
            for n_p, n_s in set(zip(p[sel].tolist(), s[sel].tolist())):
                sub = (p[sel] == n_p) & (s[sel] == n_s)
                o = order[sel[sub]]  # [g, nkv]
                n_dead = sg - n_s
                # layout: PARTIAL..., dead..., FULL...
                slots[sub, :n_p] = o[:, :n_p]
                slot_kind[sub, :n_p] = PARTIAL
                slots[sub, n_p + n_dead:] = o[:, n_p:n_s]
                slot_kind[sub, n_p + n_dead:] = FULL
            alive = slot_kind[:, :pg] != _DEAD
            groups.append(_Group(
                heads=torch.as_tensor(sel // nq, device=dev),
                q_blocks=torch.as_tensor(sel % nq, device=dev),
                kv_blocks=torch.as_tensor(slots, device=dev),
                alive=torch.as_tensor(alive, device=dev),
                num_masked=int(pg),
            ))
        return groups

    # ---- masks ----------------------------------------------------------------------------
    def allowed(self, mask_mod, g: _Group, rows: slice, s0: int, s1: int) -> torch.Tensor:
        """bool [R, qb, (s1 - s0) * kb]: allowed token pairs in slots [s0, s1) (masked part)."""
        return _allowed(mask_mod, self, g.heads[rows], g.q_blocks[rows], g.kv_blocks[rows, s0:s1],
                        g.alive[rows, s0:s1])

    def mask(self, mask_mod, g: _Group, rows: slice, s0: int, s1: int) -> "_Mask | None":
        """The mask of slots [s0, s1) of rows ``rows`` (None when no slot there is masked)."""
        s1 = min(s1, g.num_masked)
        if s1 <= s0:
            return None
        kb = self.kv_block_size
        if g.shared_keep is not None:
            cols = slice(s0 * kb, s1 * kb)
            return _Mask(bias=g.shared_bias[:, cols], keep=g.shared_keep[:, cols])
        if g.tile_ids is not None:
            ids = g.tile_ids[rows, s0:s1]  # [R, P']
            R, n = ids.shape
            flat = ids.reshape(-1)
            # [R, P', qb, kb] -> viewed [R, qb, P', kb] to meet the scores' tile layout
            bias = self.table_bias.index_select(0, flat).view(R, n, -1, kb).permute(0, 2, 1, 3)
            keep = self.table_keep.index_select(0, flat).view(R, n, -1, kb).permute(0, 2, 1, 3)
            return _Mask(bias=bias, keep=keep, tiled=True)
        return _Mask(blocked=~self.allowed(mask_mod, g, rows, s0, s1))

    def bias_for_flash(self, g: _Group, rows: slice) -> "torch.Tensor | None":
        """float32 additive mask (0 / -inf) over all slots of ``rows``, broadcastable to
        ``[B, R, qb, S * kb]``, for the fused kernel (None: no masked slot)."""
        if not g.num_masked:
            return None
        if g.flash_bias is not None:
            return g.flash_bias
        kb, P, S = self.kv_block_size, g.num_masked, g.num_slots
        ids = g.tile_ids[rows]
        R = ids.shape[0]
        b = self.table_bias.index_select(0, ids.reshape(-1)).view(R, P, -1, kb).permute(0, 2, 1, 3)
        out = torch.zeros((R, b.shape[1], S * kb), dtype=torch.float32, device=self.device)
        out[:, :, :P * kb] = b.reshape(R, b.shape[1], P * kb)
        return out[None]

    def fused(self, mask_mod):
        """The strided runs of this layout and the plan of its other rows (``execute.fused``),
        or None where no row forms a run; built once."""
        if self._fused is None:
            cache, evals = self._mask_limits
            self._fused = _fused.build(self, self._kinds, self.head_independent, mask_mod, plan_cls=Plan,
                                      mask_cache_elements=cache, mask_eval_elements=evals) or False
        return self._fused or None

    def flash_ok(self) -> bool:
        """True when every masked tile's mask is cached (the fused kernel takes them as a bias)."""
        return self.mask_mode != "evaluated per call"

    # ---- chunking ---------------------------------------------------------------------
    def chunks(self, g: _Group, batch: int, chunk_elements: int):
        """Yield ``(rows: slice, segments: list[(s0, s1)])`` covering group ``g``."""
        qb, kb = self.q_block_size, self.kv_block_size
        per_slot = batch * qb * kb
        slots_per_seg = max(1, chunk_elements // per_slot)
        S = g.num_slots
        if S <= slots_per_seg:
            segs = [(0, S)]
            rows_per_chunk = max(1, chunk_elements // (per_slot * S))
        else:
            segs = [(a, min(S, a + slots_per_seg)) for a in range(0, S, slots_per_seg)]
            rows_per_chunk = 1
        for r0 in range(0, g.num_rows, rows_per_chunk):
            yield slice(r0, min(g.num_rows, r0 + rows_per_chunk)), segs


def _geometric_buckets(smax: int, n: int) -> np.ndarray:
    """Ascending slot counts ending at >= smax, about ``n`` of them, ratio-spaced."""
    if smax <= n:
        return np.arange(1, smax + 1, dtype=np.int64)
    if n <= 1:
        return np.array([smax], dtype=np.int64)
    ratio = smax ** (1.0 / (n - 1))
    vals = sorted({max(1, int(math.ceil(ratio ** i))) for i in range(n)} | {smax})
    return np.array(vals, dtype=np.int64)


_PLANS: "weakref.WeakKeyDictionary" = weakref.WeakKeyDictionary()


def plan_for(layout, num_heads: int, device, mask_mod) -> Plan:
    """The cached ``Plan`` of ``layout`` for ``num_heads`` query heads on ``device``."""
    device = torch.device(device)
    per_layout = _PLANS.setdefault(layout, {})
    key = (num_heads, str(device))
    plan = per_layout.get(key)
    if plan is None:
        plan = per_layout[key] = Plan(layout, num_heads, device, mask_mod)
    return plan


# ---- kernels -------------------------------------------------------------------------------
def _compute_dtype(dtype: torch.dtype) -> torch.dtype:
    return torch.float64 if dtype == torch.float64 else torch.float32


def _pad_blocks(x: torch.Tensor, n_blocks: int, block: int, dtype) -> torch.Tensor:
    """[B, H, L, D] -> [B, H * n_blocks, block, D] (zero-padded, in ``dtype``)."""
    B, H, L, D = x.shape
    x = x.to(dtype)
    if n_blocks * block != L:
        x = torch.nn.functional.pad(x, (0, 0, 0, n_blocks * block - L))
    return x.reshape(B, H * n_blocks, block, D)


class _Ctx:
    """Per-call gather state shared by the forward and backward loops."""

    def __init__(self, plan: Plan, B: int, H: int, H_kv: int):
        self.plan, self.B, self.H, self.H_kv = plan, B, H, H_kv
        self.group = H // H_kv

    def rows(self, g: _Group, rows: slice):
        nq, nkv = self.plan.num_q_blocks, self.plan.num_kv_blocks
        hq = g.heads[rows]
        q_rows = hq * nq + g.q_blocks[rows]  # [R]
        kv_rows = ((hq // self.group)[:, None] * nkv + g.kv_blocks[rows]).reshape(-1)  # [R * S]
        return q_rows, kv_rows


def _gather_kv(x: torch.Tensor, kv_rows: torch.Tensor, R: int, S: int, s0: int, s1: int) -> torch.Tensor:
    """[B, Hkv*nkv, kb, D] -> [B, R, (s1-s0)*kb, D] for slots [s0, s1) of each row."""
    B, _, kb, D = x.shape
    idx = kv_rows.view(R, S)[:, s0:s1].reshape(-1)
    return x.index_select(1, idx).view(B, R, (s1 - s0) * kb, D)


class _Mask:
    """The mask of the leading (masked) columns of a chunk's scores ``[B, R, qb, cols]``.

    Cached masks are float tensors (``add_`` / ``mul_`` measured several times faster than
    ``masked_fill_`` with a bool mask on CPU); masks evaluated on the fly stay bool.
    """

    def __init__(self, *, bias=None, keep=None, blocked=None, tiled=False):
        self.bias, self.keep, self.blocked, self.tiled = bias, keep, blocked, tiled
        ref = blocked if blocked is not None else keep
        # tiled: bias/keep are [R, qb, P, kb] (views over a tile table gather)
        self.cols = ref.shape[-2] * ref.shape[-1] if tiled else ref.shape[-1]

    def _view(self, s):
        v = s[..., :self.cols]
        if self.tiled:
            kb = self.keep.shape[-1]
            v = v.unflatten(-1, (-1, kb))
        return v

    def fill_scores(self, s):
        """Not-allowed scores -> -inf (before the row max)."""
        v = self._view(s)
        if self.bias is not None:
            v.add_(self.bias)
        else:
            v.masked_fill_(self.blocked, float("-inf"))

    def last_allowed(self, kv_pos: torch.Tensor) -> torch.Tensor:
        """int64 ``[Bm, R, qb]``: each score row's last allowed key position, -1 for none
        (``kv_pos`` int64 [R, cols]: the chunk's key positions; columns past the masked ones
        are all allowed)."""
        ok = ~self.blocked if self.blocked is not None else self.keep > 0
        if self.tiled:  # [R, qb, P, kb]
            ok = ok.flatten(-2)
        ref = torch.where(ok, kv_pos[:, None, :self.cols], -1).amax(-1)
        ref = ref if ref.dim() == 3 else ref[None]
        if kv_pos.shape[1] > self.cols:
            ref = torch.maximum(ref, kv_pos[:, self.cols:].amax(-1)[None, :, None])
        return ref

    def zero_probs(self, p):
        """Not-allowed probabilities -> exactly 0 (after exp)."""
        v = self._view(p)
        if self.keep is not None:
            v.mul_(self.keep)
        else:
            v.masked_fill_(self.blocked, 0.0)


def _exp_probs(s, shift, mask):
    """``exp(s - shift)`` in place (``shift`` None: ``exp(s)``), masked entries exactly 0.

    The argument is clamped to [EXP_FLOOR, 0]: probabilities are at most 1, and in the
    backward pass the raw score of a *masked* entry may exceed the row's log-sum-exp by any
    amount (its exp would overflow to inf, and inf * 0 is NaN) before it is zeroed.
    """
    if shift is not None:
        s.sub_(shift)
    s.clamp_(min=EXP_FLOOR, max=0.0).exp_()
    if mask is not None:
        mask.zero_probs(s)
    return s


class _Dropout:
    """Attention dropout whose masks the backward pass can regenerate: chunk ``n`` of a call
    draws its keep-mask from a generator seeded with ``seed + n``."""

    def __init__(self, p: float, seed: int | None, device):
        self.p = float(p)
        self.seed = seed
        self.device = device
        self.count = 0

    def __bool__(self) -> bool:
        return self.p > 0.0

    def mask(self, shape) -> torch.Tensor:
        """float [shape]: 0 (dropped) or 1 / (1 - p) (kept)."""
        gen = torch.Generator(device=self.device)
        gen.manual_seed(self.seed + self.count)
        self.count += 1
        keep = torch.rand(shape, generator=gen, device=self.device) >= self.p
        return keep.to(torch.float32).mul_(1.0 / (1.0 - self.p))


class _Positions:
    """Natural (head, row, column) indices of a chunk, for ``score_mod``."""

    def __init__(self, plan: Plan, heads=None, q_order=None, kv_order=None):
        self.plan, self.heads, self.q_order, self.kv_order = plan, heads, q_order, kv_order

    def of(self, g: _Group, rows: slice, s0: int, s1: int):
        pl = self.plan
        qb, kb = pl.q_block_size, pl.kv_block_size
        h = g.heads[rows]
        dev = h.device
        qi = (g.q_blocks[rows, None] * qb + torch.arange(qb, device=dev)).clamp_(max=pl.q_len - 1)
        ki = (g.kv_blocks[rows, s0:s1, None] * kb + torch.arange(kb, device=dev)).flatten(1).clamp_(max=pl.kv_len - 1)
        if self.heads is not None:
            h = self.heads[h]
        if self.q_order is not None:
            qi = self.q_order[qi]
        if self.kv_order is not None:
            ki = self.kv_order[ki]
        return h, qi, ki


def _alibi_centre(score_mod, pos, mk: "_Mask | None"):
    """``(centre, c)`` of a chunk's ALiBi on the unfused loop (``ScoreTerms.alibi_frame``: the
    scores are centred on each row's last allowed key, ``c`` float64 [Bm, R, qb] is what they
    are off by), or ``(None, None)`` for a ``score_mod`` without ALiBi."""
    if getattr(score_mod, "slopes", None) is None or not hasattr(score_mod, "alibi_frame"):
        return None, None
    heads, q_pos, kv_pos = pos
    if mk is None:
        ref = kv_pos.amax(-1)[None, :, None].expand(1, -1, q_pos.shape[1])
    else:
        ref = mk.last_allowed(kv_pos)
    return score_mod.alibi_frame(heads, q_pos, ref)


def lse_dtype(cdt, score_mod) -> torch.dtype:
    """The dtype the kernels keep log-sum-exps in: float64 with ALiBi (a row's lse reaches
    ``m * N``, whose float32 rounding, ~1e-4 at 2,000, would move the weights that merge plan
    terms and the probabilities the backward recomputes), else the compute dtype."""
    return torch.float64 if getattr(score_mod, "slopes", None) is not None else cdt


def _use_flash(plan: Plan, q, v, cdt, score_mod, dropout_p) -> bool:
    return (USE_FLASH and _FLASH is not None and _FLASH_BW is not None and q.device.type == "cpu"
            and q.shape[-1] == v.shape[-1]  # the fused kernel needs one head size for q, k, v
            and cdt == torch.float32 and not dropout_p and plan.flash_ok()
            and (score_mod is None or getattr(score_mod, "is_additive", False)))


def _flash_bias(plan: Plan, g: _Group, rows: slice, score_mod, positions):
    """The fused kernel's additive mask of a chunk, plus an additive ``score_mod``'s bias
    (ALiBi: ``score_mod.additive_bias(heads, q_pos, kv_pos)`` float32 [R, qb, S * kb])."""
    bias = plan.bias_for_flash(g, rows)
    if score_mod is None:
        return bias
    extra = score_mod.additive_bias(*positions.of(g, rows, 0, g.num_slots), torch.float32)[None]
    return extra if bias is None else bias + extra


def _natural(positions: "_Positions | None") -> bool:
    """True when the kernel's rows, columns and heads are the pattern's own (ALiBi on the runs
    reads positions from the run's geometry)."""
    return positions is not None and positions.heads is None and positions.q_order is None \
        and positions.kv_order is None


def _runs(plan: Plan, mask_mod, score_mod, positions, B: int, H: int, H_kv: int):
    """``(fz, alibi)``: the strided runs (``execute.fused``) for this call or None, and the score
    terms they apply (ALiBi alone, natural positions, every call's bias within
    ``fused.ALIBI_CALL_ELEMENTS``; else the gather path takes ALiBi as one more column)."""
    if not USE_RUNS:
        return None, None
    if score_mod is None:
        return plan.fused(mask_mod), None
    if not (_natural(positions) and getattr(score_mod, "is_additive", False) and hasattr(score_mod, "run_alibi")):
        return None, None
    fz = plan.fused(mask_mod)
    if fz is None or not _fused.alibi_fits(fz, B=B, H=H, H_kv=H_kv):
        return None, None
    return fz, score_mod


def _scored_runs(plan: Plan, mask_mod, score_mod, positions, q, v, cdt, dropout_p, B: int, H: int, H_kv: int):
    """``(fz, alibi)`` for the scored path (``fused.forward_scored``): the strided runs of a call
    whose score terms have a softcap (``fused.scored_form``), run unfused on zero-copy views
    (ALiBi too, in natural positions, within ``fused.scored_alibi_fits``; ALiBi alone where the
    fused kernel's ALiBi does not fit, e.g. a causal staircase); None: the gather loop runs
    every row. Needs what the fused kernel needs but the score hook and one head size for q and
    v: CPU, float32, no dropout, cached masks."""
    if not (USE_RUNS and q.device.type == "cpu" and cdt == torch.float32 and not dropout_p
            and plan.flash_ok() and _fused.scored_form(score_mod) is not None):
        return None
    alibi = None
    if getattr(score_mod, "slopes", None) is not None:
        if not _natural(positions):
            return None
        alibi = score_mod
    fz = plan.fused(mask_mod)
    if fz is None or (alibi is not None and not _fused.scored_alibi_fits(fz, B=B, H=H, H_kv=H_kv)):
        return None
    return fz, alibi


def _flash_alibi(score_mod, plan: Plan, positions):
    """``score_mod.flash_alibi(plan, positions)`` (``scoremod.ScoreTerms``: ALiBi alone), else None."""
    f = getattr(score_mod, "flash_alibi", None)
    return f(plan, positions) if f is not None else None


def _flash_alibi_chunk(plan: Plan, fa, positions, g: _Group, rows: slice, kg: torch.Tensor):
    """ALiBi on the fused path (``scoremod.FlashAlibi``): writes the chunk's bias column into the
    gathered, augmented k (``kg`` [B, R, cols, D + 1]) and returns ``(mask, row)``: the kernel's
    additive mask and the ``[R, qb]`` term its log-sum-exp is off by (None: not off)."""
    mask = plan.bias_for_flash(g, rows)
    col, row, exact = fa.columns(positions, g, rows, mask)
    kg[..., -1].copy_(col)
    if exact is not None:
        mask = exact[None] if mask is None else mask + exact[None]
    return mask, row


def _flash_chunks(plan: Plan, cx: "_Ctx", g_list, B: int):
    """Yield ``(group, rows, q_rows, kv_rows)`` in chunks of at most ``FLASH_CHUNK_ELEMENTS``
    score-sized elements (whole rows: the fused kernel runs over any number of keys)."""
    qb, kb = plan.q_block_size, plan.kv_block_size
    for g in g_list:
        per_row = B * qb * kb * g.num_slots
        step = max(1, FLASH_CHUNK_ELEMENTS // per_row)
        for r0 in range(0, g.num_rows, step):
            rows = slice(r0, min(g.num_rows, r0 + step))
            q_rows, kv_rows = cx.rows(g, rows)
            yield g, rows, q_rows, kv_rows


def blocksparse_forward(plan: Plan, mask_mod, q, k, v, scale: float, *, need_lse: bool = True,
                        chunk_elements: int = CHUNK_ELEMENTS, dropout_p: float = 0.0, seed: int = 0,
                        score_mod=None, positions: "_Positions | None" = None):
    """Forward pass (``dropout_p`` > 0: attention dropout, masks drawn from ``seed``;
    ``score_mod``: see the module docstring, ``positions`` maps term indices to natural ones).

    Returns:
        ``(out, lse)``: out, compute dtype ``[B, H*nq, qb, Dv]``; lse ``[B, H*nq, qb]``, the
        log-sum-exp of each row's scaled scores (+inf for a row with no allowed key), or
        None when ``need_lse`` is False.
    """
    B, H, Q, D = q.shape
    H_kv, Dv = k.shape[1], v.shape[-1]
    cdt = _compute_dtype(q.dtype)
    qb, kb, nq, nkv = plan.q_block_size, plan.kv_block_size, plan.num_q_blocks, plan.num_kv_blocks
    flash = _use_flash(plan, q, v, cdt, score_mod, dropout_p)
    qp = _pad_blocks(q, nq, qb, cdt)
    # the fused kernel takes the scale (its is_causal gives NaN for scale <= 0, and ALiBi's extra
    # column must not be scaled: then q is scaled here, as in the unfused loop)
    kscale = scale if flash and scale > 0 and score_mod is None else 1.0
    if kscale != scale:
        qp = qp * scale
    kp = _pad_blocks(k, nkv, kb, cdt)
    vp = _pad_blocks(v, nkv, kb, cdt)
    out = torch.zeros((B, H * nq, qb, Dv), dtype=cdt, device=q.device)
    ldt = lse_dtype(cdt, score_mod)
    lse = torch.full((B, H * nq, qb), float("inf"), dtype=ldt, device=q.device) if need_lse else None
    cx = _Ctx(plan, B, H, H_kv)
    inf = float("inf")
    drop = _Dropout(dropout_p, seed, q.device)
    if score_mod is not None and positions is None:
        positions = _Positions(plan)
    if flash:
        fz, alibi = _runs(plan, mask_mod, score_mod, positions, B, H, H_kv)
        rest = plan
        scored = None if fz is not None or score_mod is None else \
            _scored_runs(plan, mask_mod, score_mod, positions, q, v, cdt, dropout_p, B, H, H_kv)
        if fz is not None:  # strided runs: zero-copy views (execute.fused); the rest gathers
            qp, kp, vp = qp.contiguous(), kp.contiguous(), vp.contiguous()
            _fused.forward(fz, _FLASH, qp, kp, vp, out, lse, kscale, B=B, H=H, H_kv=H_kv, alibi=alibi)
            rest = fz.rest
        elif scored is not None:  # ALiBi the fused runs cannot take: unfused on the same views
            qp, kp, vp = qp.contiguous(), kp.contiguous(), vp.contiguous()
            _fused.forward_scored(scored[0], qp, kp, vp, out, lse, B=B, H=H, H_kv=H_kv, terms=score_mod,
                                  alibi=scored[1])
            rest = scored[0].rest
        # ALiBi: one more column of q and k (scoremod.FlashAlibi), nothing score-sized per call
        fa = _flash_alibi(score_mod, rest, positions)
        if fa is not None:
            qp, kp, vp = fa.augment(qp, kp, vp)
        for g, rows, q_rows, kv_rows in _flash_chunks(rest, cx, g_list=rest.groups, B=B):
            S, R = g.num_slots, q_rows.shape[0]
            kg, mask = _gather_kv(kp, kv_rows, R, S, 0, S), None
            if fa is not None:
                mask, row = _flash_alibi_chunk(rest, fa, positions, g, rows, kg)
            o, m = _FLASH(qp.index_select(1, q_rows), kg, _gather_kv(vp, kv_rows, R, S, 0, S), 0.0, False,
                          attn_mask=mask if fa is not None else _flash_bias(rest, g, rows, score_mod, positions),
                          scale=kscale)
            if fa is not None:
                o = o[..., :Dv]
                m = m if row is None else m - row
            if g.empty is not None:  # the fused kernel gives 0 and lse 0 there
                e = g.empty if g.empty.shape[0] == 1 else g.empty[rows]
                m = m.masked_fill(e[None], inf)
                o = o.masked_fill(e[None, :, :, None], 0.0)
            out.index_copy_(1, q_rows, o)
            if need_lse:
                lse.index_copy_(1, q_rows, m)
        return out, lse
    scored = _scored_runs(plan, mask_mod, score_mod, positions, q, v, cdt, dropout_p, B, H, H_kv)
    if scored is not None:  # softcap on the strided runs' views (execute.fused); the rest gathers
        fz, alibi = scored
        qp, kp, vp = qp.contiguous(), kp.contiguous(), vp.contiguous()
        _fused.forward_scored(fz, qp, kp, vp, out, lse, B=B, H=H, H_kv=H_kv, terms=score_mod, alibi=alibi)
        plan = fz.rest
        cx = _Ctx(plan, B, H, H_kv)
        positions = _Positions(plan, positions.heads, positions.q_order, positions.kv_order)
    for g in plan.groups:
        S = g.num_slots
        for rows, segs in plan.chunks(g, B, chunk_elements):
            q_rows, kv_rows = cx.rows(g, rows)
            R = q_rows.shape[0]
            qg = qp.index_select(1, q_rows)  # [B, R, qb, D]
            if len(segs) == 1:
                kg = _gather_kv(kp, kv_rows, R, S, 0, S)
                vg = _gather_kv(vp, kv_rows, R, S, 0, S)
                mk = plan.mask(mask_mod, g, rows, 0, S)
                s = torch.matmul(qg, kg.transpose(-1, -2))
                c = None  # ALiBi: what the centred scores are off by (float64 [Bm, R, qb])
                if score_mod is not None:
                    pos = positions.of(g, rows, 0, S)
                    centre, c = _alibi_centre(score_mod, pos, mk)
                    s = score_mod(s, *pos) if centre is None else score_mod(s, *pos, centre=centre)
                if mk is not None:
                    mk.fill_scores(s)
                # (amax, sub_, exp_, sum measured faster than torch.softmax on CPU)
                m = s.amax(-1, keepdim=True)
                m.masked_fill_(m == -inf, 0.0)  # a row with no allowed key: all its slots are masked
                _exp_probs(s, m, mk)
                den = s.sum(-1, keepdim=True)
                if drop:
                    s.mul_(drop.mask(s.shape))
                o = torch.matmul(s, vg)
                del s
                o.div_(den.clamp(min=torch.finfo(cdt).tiny))  # an empty row: 0 / tiny = 0
                if need_lse:
                    m = (m + torch.log(den)).squeeze(-1)
                    m = m if c is None else m.to(ldt) + c
                    m.masked_fill_(m == -inf, inf)
            else:  # one long row at a time, online softmax over kv segments
                # (with ALiBi the running max is kept in float64 in the true frame: each
                # segment's scores are centred on their own reference)
                run_max = torch.full((B, R, qb, 1), -inf, dtype=ldt, device=q.device)
                run_sum = torch.zeros((B, R, qb, 1), dtype=cdt, device=q.device)
                o = torch.zeros((B, R, qb, Dv), dtype=cdt, device=q.device)
                for s0, s1 in segs:
                    kg = _gather_kv(kp, kv_rows, R, S, s0, s1)
                    vg = _gather_kv(vp, kv_rows, R, S, s0, s1)
                    mk = plan.mask(mask_mod, g, rows, s0, s1)
                    s = torch.matmul(qg, kg.transpose(-1, -2))
                    c = None
                    if score_mod is not None:
                        pos = positions.of(g, rows, s0, s1)
                        centre, c = _alibi_centre(score_mod, pos, mk)
                        s = score_mod(s, *pos) if centre is None else score_mod(s, *pos, centre=centre)
                    if mk is not None:
                        mk.fill_scores(s)
                    top = s.amax(-1, keepdim=True)
                    new_max = torch.maximum(run_max, top if c is None else top.to(ldt) + c[..., None])
                    safe = new_max.masked_fill(new_max == -inf, 0.0)
                    alpha = torch.exp(run_max - safe).to(cdt)
                    _exp_probs(s, safe if c is None else (safe - c[..., None]).to(cdt), mk)
                    run_sum = run_sum * alpha + s.sum(-1, keepdim=True)
                    if drop:
                        s.mul_(drop.mask(s.shape))
                    o = o * alpha + torch.matmul(s, vg)
                    run_max = new_max
                    del s
                nz = run_sum > 0
                denom = torch.where(nz, run_sum, torch.ones_like(run_sum))
                o = torch.where(nz, o / denom, torch.zeros_like(o))
                m = torch.where(nz, run_max + torch.log(denom), torch.full_like(run_max, inf)).squeeze(-1)
            out.index_copy_(1, q_rows, o)
            if need_lse:
                lse.index_copy_(1, q_rows, m.expand(B, R, qb))
    return out, lse


def blocksparse_backward(plan: Plan, mask_mod, q, k, v, out, lse, dout, scale: float, *,
                         chunk_elements: int = CHUNK_ELEMENTS, dropout_p: float = 0.0, seed: int = 0,
                         score_mod=None, positions: "_Positions | None" = None):
    """Backward pass (FlashAttention-style recomputation).

    Args:
        out, lse: as returned by ``blocksparse_forward`` (or, for one term of several, the
            *merged* output and log-sum-exp gathered into the term's order).
        dout: float [B, H, Q_LEN, Dv].
        score_mod, positions: as for ``blocksparse_forward``.

    Returns:
        dq, dk, dv in the compute dtype, shaped like q, k, v.
    """
    B, H, Q, D = q.shape
    H_kv, KV, Dv = k.shape[1], k.shape[2], v.shape[-1]
    cdt = out.dtype
    qb, kb, nq, nkv = plan.q_block_size, plan.kv_block_size, plan.num_q_blocks, plan.num_kv_blocks
    flash = _use_flash(plan, q, v, cdt, score_mod, dropout_p)
    qp = _pad_blocks(q, nq, qb, cdt)
    kscale = scale if flash and scale > 0 and score_mod is None else 1.0  # as in the forward
    if kscale != scale:
        qp = qp * scale
    kp = _pad_blocks(k, nkv, kb, cdt)
    vp = _pad_blocks(v, nkv, kb, cdt)
    dop = _pad_blocks(dout, nq, qb, cdt)
    # contiguous whatever the inputs' strides (a context-parallel buffer is a permuted view, and
    # _pad_blocks returns such a view as is when no padding is needed): the fused calls write
    # through strided views of these
    dq = torch.zeros(qp.shape, dtype=cdt, device=qp.device)
    dk = torch.zeros(kp.shape, dtype=cdt, device=kp.device)
    dv = torch.zeros(vp.shape, dtype=cdt, device=vp.device)
    cx = _Ctx(plan, B, H, H_kv)
    drop = _Dropout(dropout_p, seed, q.device)  # same seeds, same chunk order: same masks
    if score_mod is not None and positions is None:
        positions = _Positions(plan)
    if flash:
        lse_f = lse.contiguous()
        fz, alibi = _runs(plan, mask_mod, score_mod, positions, B, H, H_kv)
        rest = plan
        scored = None if fz is not None or score_mod is None else \
            _scored_runs(plan, mask_mod, score_mod, positions, q, v, cdt, dropout_p, B, H, H_kv)
        if fz is not None:
            qp, kp, vp = qp.contiguous(), kp.contiguous(), vp.contiguous()
            dop, out = dop.contiguous(), out.contiguous()
            _fused.backward(fz, _FLASH_BW, dop, qp, kp, vp, out, lse_f, dq, dk, dv, kscale, B=B, H=H, H_kv=H_kv,
                            alibi=alibi)
            rest = fz.rest
        elif scored is not None:  # as in the forward
            qp, kp, vp = qp.contiguous(), kp.contiguous(), vp.contiguous()
            dop, out = dop.contiguous(), out.contiguous()
            _fused.backward_scored(scored[0], dop, qp, kp, vp, out, lse_f, dq, dk, dv, B=B, H=H, H_kv=H_kv,
                                   terms=score_mod, alibi=scored[1])
            rest = scored[0].rest
        fa = _flash_alibi(score_mod, rest, positions)
        if fa is not None:  # ALiBi as one more column (see the forward)
            qp, kp, vp = fa.augment(qp, kp, vp)
            dop, out = (torch.nn.functional.pad(x, (0, 1)) for x in (dop, out))
        for g, rows, q_rows, kv_rows in _flash_chunks(rest, cx, g_list=rest.groups, B=B):
            S, R = g.num_slots, q_rows.shape[0]
            kg, lse_g = _gather_kv(kp, kv_rows, R, S, 0, S), lse_f.index_select(1, q_rows)
            if fa is not None:
                mask, row = _flash_alibi_chunk(rest, fa, positions, g, rows, kg)
                lse_g = (lse_g if row is None else lse_g + row).to(cdt)  # float64 lse to the kernel frame
            else:
                mask = _flash_bias(rest, g, rows, score_mod, positions)
            dqg, dkg, dvg = _FLASH_BW(dop.index_select(1, q_rows), qp.index_select(1, q_rows),
                                      kg, _gather_kv(vp, kv_rows, R, S, 0, S),
                                      out.index_select(1, q_rows), lse_g, 0.0, False, attn_mask=mask, scale=kscale)
            dq.index_add_(1, q_rows, dqg[..., :D])
            dk.index_add_(1, kv_rows, dkg[..., :D].reshape(B, R * S, kb, D))
            dv.index_add_(1, kv_rows, dvg[..., :Dv].reshape(B, R * S, kb, Dv))
        if kscale != scale:  # q was scaled here: chain rule
            dq.mul_(scale)
        dq = dq.view(B, H, nq * qb, D)[:, :, :Q]
        dk = dk.view(B, H_kv, nkv * kb, D)[:, :, :KV]
        dv = dv.view(B, H_kv, nkv * kb, Dv)[:, :, :KV]
        return dq, dk, dv
    scored = _scored_runs(plan, mask_mod, score_mod, positions, q, v, cdt, dropout_p, B, H, H_kv)
    if scored is not None:  # as in the forward
        fz, alibi = scored
        qp, kp, vp, dop = qp.contiguous(), kp.contiguous(), vp.contiguous(), dop.contiguous()
        _fused.backward_scored(fz, dop, qp, kp, vp, out.contiguous(), lse.contiguous(), dq, dk, dv, B=B, H=H,
                               H_kv=H_kv, terms=score_mod, alibi=alibi)
        plan = fz.rest
        cx = _Ctx(plan, B, H, H_kv)
        positions = _Positions(plan, positions.heads, positions.q_order, positions.kv_order)
    # Augmented operands fold the "- lse" of P = exp(s - lse) into the matmul:
    # [q * scale, -lse] @ [k, 1]^T = q k^T * scale - lse (an empty row's lse is huge, not inf).
    neg_lse = (-lse).clamp_(min=-torch.finfo(cdt).max / 4)[..., None]
    qa = torch.cat([qp, neg_lse.to(cdt)], dim=-1)  # [B, H*nq, qb, D + 1]
    ka = torch.nn.functional.pad(kp, (0, 1), value=1.0)  # [B, Hkv*nkv, kb, D + 1]
    delta = (dop * out).sum(-1)  # [B, H*nq, qb]
    for g in plan.groups:
        S = g.num_slots
        for rows, segs in plan.chunks(g, B, chunk_elements):
            q_rows, kv_rows = cx.rows(g, rows)
            R = q_rows.shape[0]
            qag = qa.index_select(1, q_rows)
            qg = qag[..., :D]
            dog = dop.index_select(1, q_rows)
            delta_g = delta.index_select(1, q_rows)[..., None]
            neg_lse_g = None if score_mod is None else neg_lse.index_select(1, q_rows)  # float64 with ALiBi
            dqg = None
            for s0, s1 in segs:
                kag = _gather_kv(ka, kv_rows, R, S, s0, s1)
                vg = _gather_kv(vp, kv_rows, R, S, s0, s1)
                # probabilities P = exp(q k^T * scale - lse), masked entries 0
                mk = plan.mask(mask_mod, g, rows, s0, s1)
                if score_mod is None:
                    p = _exp_probs(torch.matmul(qag, kag.transpose(-1, -2)), None, mk)
                    dmod = None
                else:  # P = exp(score_mod(q k^T * scale) - lse): the lse cannot ride in the matmul
                    raw = torch.matmul(qg, kag[..., :D].transpose(-1, -2))
                    pos = positions.of(g, rows, s0, s1)
                    deriv = getattr(score_mod, "derivative", None)
                    dmod = deriv(raw, *pos) if deriv is not None else None
                    centre, c = _alibi_centre(score_mod, pos, mk)
                    p = score_mod(raw, *pos) if centre is None else score_mod(raw, *pos, centre=centre)
                    if mk is not None:
                        mk.fill_scores(p)
                    # ALiBi: the scores are centred (off by c), the lse is float64 in the true frame
                    p.add_(qag[..., D:] if c is None else (neg_lse_g + c[..., None]).to(cdt))
                    p = _exp_probs(p, None, mk)
                ds = torch.matmul(dog, vg.transpose(-1, -2))  # dP (of the dropped-out P)
                if drop:
                    z = drop.mask(p.shape)
                    dvg = torch.matmul((p * z).transpose(-1, -2), dog)  # [B, R, cols, Dv]
                    ds.mul_(z)
                    del z
                else:
                    dvg = torch.matmul(p.transpose(-1, -2), dog)
                ds.sub_(delta_g).mul_(p)  # dS = P * (dP - delta), delta = rowsum(dO * O)
                del p
                if score_mod is not None and dmod is not None:
                    ds.mul_(dmod)  # chain rule through the score transform
                kg = kag[..., :D]
                part = torch.matmul(ds, kg)
                dqg = part if dqg is None else dqg.add_(part)
                dkg = torch.matmul(ds.transpose(-1, -2), qg)  # q is pre-scaled
                del ds
                idx = kv_rows.view(R, S)[:, s0:s1].reshape(-1)
                n = idx.shape[0]
                dk.index_add_(1, idx, dkg.reshape(B, n, kb, D))
                dv.index_add_(1, idx, dvg.reshape(B, n, kb, Dv))
            dq.index_add_(1, q_rows, dqg)
    dq = dq.mul_(scale).view(B, H, nq * qb, D)[:, :, :Q]
    dk = dk.view(B, H_kv, nkv * kb, D)[:, :, :KV]
    dv = dv.view(B, H_kv, nkv * kb, Dv)[:, :, :KV]
    return dq, dk, dv


@dataclass
class Term:
    """One disjoint part of an attention, in its own query / key order (module docstring).

    Attributes:
        layout: a ``BlockLayout`` (or any object with ``kinds``, ``q_len``, ``kv_len``,
            ``q_block_size``, ``kv_block_size``) in term coordinates; ``kinds`` uint8
            ``[H_t or 1, nq_t, nkv_t]``.
        mask_mod: ``mask_mod(b, h, q_idx, kv_idx)`` in term coordinates.
        q_order: int64 ``[Q_t]`` natural query rows, or None (all, natural order).
        kv_order: int64 ``[KV_t]`` natural key columns, or None.
        heads: int64 ``[H_t]`` natural query heads, or None (all heads).
    """

    layout: object
    mask_mod: object
    q_order: torch.Tensor | None = None
    kv_order: torch.Tensor | None = None
    heads: torch.Tensor | None = None
    #: the layout the backward computes (same rows, columns and pairs as ``layout``, perhaps at
    #: another tile size: ``kernel_layouts``); None: ``layout``
    bwd_layout: object = None
    #: s > 0 when ``q_order`` / ``kv_order`` is the residue order of its whole axis with s | length
    #: (x -> (x mod s, x div s)): moving to and from it is a transpose (a copy), not a gather
    q_stride: int = field(default=0, init=False)
    kv_stride: int = field(default=0, init=False)

    def __post_init__(self):
        self.q_stride = _residue_stride(self.q_order)
        self.kv_stride = _residue_stride(self.kv_order)

    @classmethod
    def reorder(cls, layout, natural_mask_mod, *, q_order=None, kv_order=None, heads=None, device="cpu"):
        """A term whose ``mask_mod`` is ``natural_mask_mod`` read through the orders:
        ``mask_mod(b, h, r, c) = natural_mask_mod(b, heads[h], q_order[r], kv_order[c])``."""
        dev = torch.device(device)
        t = [None if x is None else torch.as_tensor(np.asarray(x), dtype=torch.int64, device=dev)
             for x in (q_order, kv_order, heads)]
        qo, ko, ho = t
        if qo is None and ko is None and ho is None:
            mm = natural_mask_mod
        else:
            def mm(b, h, q_idx, kv_idx):
                h = torch.as_tensor(h, device=dev)
                return natural_mask_mod(b, h if ho is None else ho[h], q_idx if qo is None else qo[q_idx],
                                        kv_idx if ko is None else ko[kv_idx])
            mm.__name__ = getattr(natural_mask_mod, "__name__", "mask_mod")
        return cls(layout=layout, mask_mod=mm, q_order=qo, kv_order=ko, heads=ho)


def _term_plan(term: Term, num_heads: int, device, backward: bool = False) -> Plan:
    """The cached gather ``Plan`` of a term (``plan_for``: per layout object, heads, device)."""
    layout = term.bwd_layout if backward and term.bwd_layout is not None else term.layout
    return plan_for(layout, num_heads, device, term.mask_mod)


def _residue_stride(order) -> int:
    """s when ``order`` (int64 [N]) is ``arange(N).view(N // s, s).T.flatten()`` (residue order,
    s | N), else 0."""
    if order is None or order.numel() < 2:
        return 0
    n, st = order.numel(), int(order[1] - order[0])
    if st <= 1 or n % st or int(order[0]) != 0:
        return 0
    want = torch.arange(n, device=order.device).view(n // st, st).t().reshape(-1)
    return st if torch.equal(order, want) else 0


def _to_order(x: torch.Tensor, order, stride: int, dim: int = 2) -> torch.Tensor:
    """``x.index_select(dim, order)`` (a transpose copy when ``stride``)."""
    if order is None:
        return x
    if stride:
        n = x.shape[dim]
        return x.unflatten(dim, (n // stride, stride)).transpose(dim, dim + 1).flatten(dim, dim + 1)
    return x.index_select(dim, order)


def _from_order(x: torch.Tensor, order, stride: int, dim: int = 2) -> torch.Tensor:
    """The inverse of ``_to_order`` for a whole-axis permutation ``order``."""
    if stride:
        n = x.shape[dim]
        return x.unflatten(dim, (stride, n // stride)).transpose(dim, dim + 1).flatten(dim, dim + 1)
    return torch.empty_like(x).index_copy_(dim, order, x)


def _gather(x: torch.Tensor, heads, order, stride: int = 0, dim_heads=1, dim_len=2) -> torch.Tensor:
    if heads is not None:
        x = x.index_select(dim_heads, heads)
    return _to_order(x, order, stride, dim_len)


def _scatter_add(dst: torch.Tensor, src: torch.Tensor, heads, order, stride: int = 0) -> None:
    """dst[:, heads][:, :, order] += src (dst [B, H, L, D])."""
    if heads is None:
        if order is None:
            dst.add_(src)
        elif stride:
            n = dst.shape[2]
            dst.unflatten(2, (n // stride, stride)).add_(src.unflatten(2, (stride, n // stride)).transpose(2, 3))
        else:
            dst.index_add_(2, order, src)
        return
    tmp = torch.zeros((dst.shape[0], heads.shape[0]) + tuple(dst.shape[2:]), dtype=dst.dtype, device=dst.device)
    _scatter_add(tmp, src, None, order, stride)
    dst.index_add_(1, heads, tmp)


def _term_kv(term: Term, k, v, H: int):
    """k, v of a term: its key order; per query head when the term covers a subset of heads."""
    kvh = None
    if term.heads is not None:
        kvh = term.heads // (H // k.shape[1])
    return _gather(k, kvh, term.kv_order, term.kv_stride), _gather(v, kvh, term.kv_order, term.kv_stride)


def _unpad(x: torch.Tensor, B: int, H: int, L: int) -> torch.Tensor:
    """[B, H*n, blk, ...] -> [B, H, L, ...]."""
    return x.reshape((B, H, -1) + tuple(x.shape[3:]))[:, :, :L]


def _pad_rows(x: torch.Tensor, n: int, blk: int) -> torch.Tensor:
    """[B, H, L, ...] -> [B, H*n, blk, ...] (zero-padded)."""
    B, H, L = x.shape[:3]
    rest = tuple(x.shape[3:])
    if n * blk != L:
        pad = torch.zeros((B, H, n * blk - L) + rest, dtype=x.dtype, device=x.device)
        x = torch.cat([x, pad], dim=2)
    return x.reshape((B, H * n, blk) + rest)


def terms_forward(q, k, v, terms, scale, *, score_mod=None, chunk_elements=CHUNK_ELEMENTS,
                  dropout_p=0.0, seed=0):
    """Forward of ``run_terms``: ``(out, lse)`` in the compute dtype, natural order,
    out ``[B, H, Q_LEN, Dv]``, lse ``[B, H, Q_LEN]`` (+inf: no allowed key)."""
    B, H, Q, _ = q.shape
    Dv = v.shape[-1]
    cdt = _compute_dtype(q.dtype)
    inf = float("inf")
    if len(terms) == 1 and terms[0].q_order is None and terms[0].heads is None:
        t = terms[0]
        plan = _term_plan(t, H, q.device)
        kt, vt = _term_kv(t, k, v, H)
        o, lse = blocksparse_forward(plan, t.mask_mod, q, kt, vt, scale, chunk_elements=chunk_elements,
                                     dropout_p=dropout_p, seed=seed, score_mod=score_mod,
                                     positions=_Positions(plan, None, None, t.kv_order))
        return _unpad(o, B, H, Q), _unpad(lse, B, H, Q)
    # several terms: merge through the log-sum-exp (empty rows: -inf while merging)
    out = lse = None
    for n, t in enumerate(terms):
        Ht = H if t.heads is None else int(t.heads.shape[0])
        plan = _term_plan(t, Ht, q.device)
        qt = _gather(q, t.heads, t.q_order, t.q_stride)
        kt, vt = _term_kv(t, k, v, H)
        o, lt = blocksparse_forward(plan, t.mask_mod, qt, kt, vt, scale, chunk_elements=chunk_elements,
                                    dropout_p=dropout_p, seed=seed + 7919 * n, score_mod=score_mod,
                                    positions=_Positions(plan, t.heads, t.q_order, t.kv_order))
        Qt = qt.shape[2]
        o, lt = _unpad(o, B, Ht, Qt), _unpad(lt, B, Ht, Qt)
        lt = lt.masked_fill(lt == inf, -inf)
        if t.q_order is not None:  # back to natural order
            if Qt == Q:
                o, lt = _from_order(o, t.q_order, t.q_stride), _from_order(lt, t.q_order, t.q_stride)
            else:
                o = torch.zeros((B, Ht, Q, Dv), dtype=cdt, device=q.device).index_copy_(2, t.q_order, o)
                lt = torch.full((B, Ht, Q), -inf, dtype=lt.dtype, device=q.device).index_copy_(2, t.q_order, lt)
        if t.heads is not None:
            o = torch.zeros((B, H, Q, Dv), dtype=cdt, device=q.device).index_copy_(1, t.heads, o)
            lt = torch.full((B, H, Q), -inf, dtype=lt.dtype, device=q.device).index_copy_(1, t.heads, lt)
        if out is None:
            out, lse = o.contiguous(), lt
        else:
            out, lse = _merge(out, lse, o, lt)
    return out, lse.masked_fill(lse == -inf, inf)


def _merge(o_a, l_a, o_b, l_b):
    """Two partial attentions of disjoint key sets merged exactly through their log-sum-exp
    (``l`` -inf: no key); ``o_a`` is overwritten."""
    inf = float("inf")
    m = torch.maximum(l_a, l_b)
    safe = m.masked_fill(m == -inf, 0.0)
    w_a, w_b = (l_a - safe).exp_(), (l_b - safe).exp_()
    den = w_a + w_b
    lse = safe + torch.log(den)  # -inf where neither term has a key
    den.clamp_(min=torch.finfo(den.dtype).tiny)
    o_a.mul_((w_a / den).to(o_a.dtype)[..., None]).addcmul_(o_b, (w_b / den).to(o_a.dtype)[..., None])
    return o_a, lse


def terms_backward(q, k, v, terms, scale, out, lse, dout, *, score_mod=None,
                   chunk_elements=CHUNK_ELEMENTS, dropout_p=0.0, seed=0):
    """Backward of ``run_terms``: each term recomputes its probabilities with the merged
    ``lse`` and ``rowsum(dO * O)`` of the merged output (exact: a pair's probability in the
    whole attention is ``exp(s - lse)`` whichever term holds it); grads scatter back."""
    B, H, Q, D = q.shape
    dq = dk = dv = None  # a natural-order term's gradients become the sums; the others add in
    group = H // k.shape[1]
    for n, t in enumerate(terms):
        Ht = H if t.heads is None else int(t.heads.shape[0])
        plan = _term_plan(t, Ht, q.device, backward=not dropout_p)  # dropout: the forward's chunks
        nq, qb = plan.num_q_blocks, plan.q_block_size
        qt = _gather(q, t.heads, t.q_order, t.q_stride)
        kt, vt = _term_kv(t, k, v, H)
        ot = _pad_rows(_gather(out, t.heads, t.q_order, t.q_stride), nq, qb)
        lt = _pad_rows(_gather(lse, t.heads, t.q_order, t.q_stride), nq, qb)
        dot = _gather(dout, t.heads, t.q_order, t.q_stride)
        dqt, dkt, dvt = blocksparse_backward(
            plan, t.mask_mod, qt, kt, vt, ot, lt, dot, scale, chunk_elements=chunk_elements,
            dropout_p=dropout_p, seed=seed + 7919 * n, score_mod=score_mod,
            positions=_Positions(plan, t.heads, t.q_order, t.kv_order))
        kvh = None if t.heads is None else t.heads // group
        dq = _accumulate(dq, dqt, q.shape, t.heads, t.q_order, t.q_stride)
        dk = _accumulate(dk, dkt, k.shape, kvh, t.kv_order, t.kv_stride)
        dv = _accumulate(dv, dvt, v.shape, kvh, t.kv_order, t.kv_stride)
    return dq, dk, dv


def _accumulate(dst, src, shape, heads, order, stride):
    """``dst`` (None: zeros of ``shape``) plus ``src`` scattered from a term's order."""
    if dst is None:
        if heads is None and order is None and tuple(src.shape) == tuple(shape):
            return src.contiguous()
        dst = torch.zeros(shape, dtype=src.dtype, device=src.device)
    _scatter_add(dst, src, heads, order, stride)
    return dst


class _TermsAttention(torch.autograd.Function):
    @staticmethod
    def forward(ctx, q, k, v, terms, scale, score_mod, chunk_elements, dropout_p, seed):
        out, lse = terms_forward(q, k, v, terms, scale, score_mod=score_mod, chunk_elements=chunk_elements,
                                 dropout_p=dropout_p, seed=seed)
        ctx.save_for_backward(q, k, v, out, lse)
        ctx.args = (terms, scale, score_mod, chunk_elements, dropout_p, seed)
        ctx.mark_non_differentiable(lse)
        return out.to(q.dtype), lse

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, dout, _dlse):
        q, k, v, out, lse = ctx.saved_tensors
        terms, scale, score_mod, chunk_elements, dropout_p, seed = ctx.args
        # backward() may run inside torch.autocast: the kernel accumulates in its own compute
        # dtype and must not have its matmuls re-cast (index_add_ needs matching dtypes)
        with torch.autocast(q.device.type, enabled=False):
            dq, dk, dv = terms_backward(q, k, v, terms, scale, out, lse, dout.to(out.dtype), score_mod=score_mod,
                                        chunk_elements=chunk_elements, dropout_p=dropout_p, seed=seed)
        return dq.to(q.dtype), dk.to(k.dtype), dv.to(v.dtype), None, None, None, None, None, None


def run_terms(q, k, v, terms, scale: float, *, score_mod=None, return_lse: bool = False,
              dropout_p: float = 0.0, chunk_elements: int = CHUNK_ELEMENTS):
    """Attention over disjoint terms, merged exactly (see the module docstring).

    Args:
        q: float [B, H, Q_LEN, D]; k: [B, H_kv, KV_LEN, D]; v: [B, H_kv, KV_LEN, Dv]; H_kv divides H.
        terms: a sequence of ``Term`` whose kept pairs are disjoint.
        scale: multiplier of ``q k^T``.
        score_mod: the score hook (module docstring) or None.
        return_lse: also return the merged log-sum-exp.
        dropout_p: attention dropout on the probabilities (masks from torch's default generator).

    Returns:
        out [B, H, Q_LEN, Dv] in q's dtype (0 for a row with no allowed key in any term),
        differentiable in q, k, v; with ``return_lse``, ``(out, lse)``, lse float32 (float64
        for float64 input) [B, H, Q_LEN], +inf for an empty row, not differentiable.
    """
    terms = list(terms)
    seed = int(torch.randint(0, 2**62, ())) if dropout_p > 0 else 0
    if torch.is_grad_enabled() and (q.requires_grad or k.requires_grad or v.requires_grad):
        out, lse = _TermsAttention.apply(q, k, v, terms, scale, score_mod, chunk_elements, float(dropout_p), seed)
    else:
        out, lse = terms_forward(q, k, v, terms, scale, score_mod=score_mod, chunk_elements=chunk_elements,
                                 dropout_p=dropout_p, seed=seed)
        out = out.to(q.dtype)
    return (out, lse.to(_compute_dtype(q.dtype))) if return_lse else out  # (float64 inside with ALiBi)


#: the CPU kernel may compute a term at finer tiles than ``BLOCK_SIZE`` (halving down to this edge,
#: tokens) when ``fused.estimate_cost`` says it is cheaper by ``KERNEL_BLOCK_GAIN``: a band's
#: ragged edges cost less at finer tiles (ATen's fused kernel splits queries into 32-row blocks
#: below 192 rows anyway), while a long shared key span runs faster as one long kernel row
MIN_KERNEL_BLOCK = 32
KERNEL_BLOCK_GAIN = 0.05
#: ... unless the finer layout would have more tiles than this per head
MAX_KERNEL_TILES = 1 << 22
#: ... and at least this many tokens for a pattern with a softcap: its scores run unfused
#: (``fused.forward_scored``), where a batched matmul of 32-token tiles runs at about 70 % of the
#: rate of 64-token ones (measured on 2 threads), which outweighs 64's extra masked pairs
SCORED_MIN_KERNEL_BLOCK = 64


def _min_block(cp) -> int:
    terms = getattr(cp, "score_terms", ()) or ()
    return SCORED_MIN_KERNEL_BLOCK if any(t.name == "softcap" for t in terms) else MIN_KERNEL_BLOCK


def kernel_layouts(layout, layout_at, *, min_block: int = MIN_KERNEL_BLOCK):
    """``(forward, backward)`` layouts the CPU kernel computes: ``layout`` or the same term at a
    finer square tile (``layout_at(edge)`` gives it, ``edge >= min_block`` tokens), each the
    cheapest by ``fused.estimate_cost`` (the backward's cost of folding key gradients differs)."""
    qb, kb = layout.q_block_size, layout.kv_block_size
    if qb != kb:
        return layout, layout
    cands = [layout]
    e = qb // 2
    while e >= min_block and qb % e == 0 and cdiv(layout.q_len, e) * cdiv(layout.kv_len, e) <= MAX_KERNEL_TILES:
        cands.append(layout_at(e))
        e //= 2
    picks = []
    for backward in (False, True):
        best, best_cost = None, None
        for lay in cands:
            c = _fused.estimate_cost(np.asarray(lay.kinds), lay.q_block_size, backward=backward)
            if best is None or c <= best_cost * (1.0 - KERNEL_BLOCK_GAIN):
                best, best_cost = lay, c
        picks.append(best)
    return picks[0], picks[1]


_KERNEL_LAYOUTS: "weakref.WeakKeyDictionary" = weakref.WeakKeyDictionary()


def plan_terms(cp, ep, device, *, kernel_tiles: bool = True) -> list:
    """The kernel ``Term`` list of an execution plan (``patternc.lower.planner``), cached on
    the plan per device: each term's layout in its own order, its ``mask_mod`` read through
    the orders, and its natural rows / columns / heads (None where they are all, in order).
    ``kernel_tiles``: on CPU, the layouts at the CPU kernel's tile size (``kernel_layouts``);
    False: at ``cp.block_size`` (FlexAttention's BlockMasks)."""
    cpu_tiles = kernel_tiles and torch.device(device).type == "cpu"
    key = ("terms", str(torch.device(device)), cpu_tiles)
    hit = ep._cache.get(key)
    if hit is not None:
        return hit
    if ep.is_natural:
        terms = [natural_term(cp, device) if cpu_tiles else Term(layout=cp.layout, mask_mod=mask_mod_for(cp, device))]
    else:
        from .maskmod import lower_to_mask_mod

        terms = []
        for t in ep.terms:
            qo = None if (t.q_order.kind == "natural" and t.q_count == cp.q_len) else t.q_positions(cp.q_len)
            ko = None if (t.kv_order.kind == "natural" and t.kv_count == cp.kv_len) else t.kv_positions(cp.kv_len)
            hs = None if len(t.heads) == cp.num_heads else np.asarray(t.heads, dtype=np.int64)
            mm = lower_to_mask_mod(t.pattern, cp.q_len, cp.kv_len, device=device)
            layout = bwd = t.layout(cp.block_size)
            if cpu_tiles:
                layout, bwd = kernel_layouts(layout, lambda e, t=t: t.layout_at((e, e), cp.q_len, cp.kv_len),
                                             min_block=_min_block(cp))
            term = Term.reorder(layout, mm, q_order=qo, kv_order=ko, heads=hs, device=device)
            term.bwd_layout = bwd
            terms.append(term)
    ep._cache[key] = terms
    return terms


def natural_term(cp, device) -> Term:
    """The one natural-order term of a compiled pattern (its layout and ``mask_mod``); on CPU at
    the kernel's tile size (``kernel_layout``)."""
    layout = bwd = cp.layout
    if torch.device(device).type == "cpu" and hasattr(cp, "layout_at"):
        try:
            layout, bwd = _KERNEL_LAYOUTS[cp]
        except (KeyError, TypeError):
            layout, bwd = kernel_layouts(cp.layout, lambda e: cp.layout_at((e, e)), min_block=_min_block(cp))
            try:
                _KERNEL_LAYOUTS[cp] = (layout, bwd)
            except TypeError:  # not weak-referenceable: recomputed (the compiler caches layouts)
                pass
    return Term(layout=layout, mask_mod=mask_mod_for(cp, device), bwd_layout=bwd)


def blocksparse_attention(cp, q, k, v, scale: float, *, dropout_p: float = 0.0,
                          chunk_elements: int = CHUNK_ELEMENTS, plan="natural", score_mod=None,
                          return_lse: bool = False):
    """Block-sparse attention of a compiled pattern (shapes checked by the caller).

    Args:
        cp: a CompiledPattern (uses ``cp.layout`` and ``cp.mask_mod``; ``cp.plan`` for
            ``plan="auto"``; ``cp.score_terms`` unless ``score_mod`` is given).
        q: float [B, H, Q_LEN, D]; k: [B, H_kv, KV_LEN, D]; v: [B, H_kv, KV_LEN, Dv].
        scale: multiplier of ``q k^T``.
        dropout_p: attention dropout probability (on the softmax probabilities; the masks
            come from torch's default generator, so ``torch.manual_seed`` makes them repeat).
        chunk_elements: score elements per chunk (memory knob).
        plan: ``"natural"`` (one term, natural order), ``"auto"`` (``cp.plan``), or an
            ``ExecutionPlan`` of ``cp``.
        score_mod, return_lse: as for ``run_terms``; ``score_mod`` None: the pattern's score
            terms (``scoremod.ScoreTerms``, run with ``scale / c`` when it has a softcap), or
            none.

    Returns:
        [B, H, Q_LEN, Dv] in q's dtype; differentiable in q, k, v (``(out, lse)`` with
        ``return_lse``).
    """
    if score_mod is None:  # the pattern's score terms (SPEC §1.8; execute.scoremod)
        from .scoremod import score_terms_for

        score_mod = score_terms_for(cp, q.shape[1])
        if score_mod is not None:  # softcap: the matmul divides by the cap (one pass fewer)
            scale, score_mod = scale * score_mod.prescale, score_mod.prescaled()
    ep = None if plan == "natural" or plan is None else (cp.plan_for(plan) if isinstance(plan, str) else plan)
    terms = [natural_term(cp, q.device)] if ep is None else plan_terms(cp, ep, q.device)
    return run_terms(q, k, v, terms, scale, score_mod=score_mod, return_lse=return_lse, dropout_p=dropout_p,
                     chunk_elements=chunk_elements)
