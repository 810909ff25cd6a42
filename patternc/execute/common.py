"""What the execution backends share: the contract with a compiled pattern (``Compiled``, a
``typing.Protocol``), the chunk size, the token-pair evaluation of tiles and the rows with no
allowed key.

``Compiled`` is everything a backend reads from ``patternc.CompiledPattern``; the backends
(``flex``, ``blocksparse``, ``sdpa``) and ``attention`` take any object with these members, and
a test checks that ``CompiledPattern`` satisfies it.
"""

from __future__ import annotations

import weakref
from typing import Any, Callable, Protocol, runtime_checkable

import numpy as np
import torch

from ..lower.layout import FULL, PARTIAL, BlockLayout


@runtime_checkable
class Compiled(Protocol):
    """The executor's contract with a compiled pattern (``patternc.CompiledPattern``).

    Attributes:
        q_len, kv_len: Q_LEN, KV_LEN (tokens).
        num_heads: H, the layout's head count.
        layout: the exact ``BlockLayout`` (kinds uint8 [H, num_q_blocks, num_kv_blocks]).
        pattern: the canonical layer pattern (``pattern.num_heads``: its head period).
        block_size: (Q_BLOCK_SIZE, KV_BLOCK_SIZE), tokens.
        is_causal_only: the pattern is exactly ``causal`` and has no score terms (SDPA
            ``is_causal`` applies).
        score_terms: the score terms (SPEC §1.8), ``patternc.ir.Term`` tuple, ``()`` when none;
            every backend applies them (``execute.scoremod``).
        needs: the run-time inputs the pattern requires (``frozenset({"documents"})`` or empty).

    With run-time data (``documents`` / ``key_padding_mask``, SPEC §1.7) ``attention`` also
    uses ``CompiledPattern``'s batched builders (``_layout_for``, ``_mask_mod_for``,
    ``_dense_runtime``); they are reached only after ``runtime_inputs`` returned data.
    """

    q_len: int
    kv_len: int
    num_heads: int
    layout: BlockLayout
    pattern: Any
    block_size: tuple
    score_terms: tuple

    @property
    def is_causal_only(self) -> bool: ...

    @property
    def needs(self) -> frozenset: ...

    def runtime_inputs(self, *, documents=None, key_padding_mask=None, batch: int | None = None) -> tuple:
        """Checked run-time data: ``(key_padding bool [B, KV_LEN] | None, documents int64 [B|1, P] | None)``."""
        ...

    def plan_for(self, mode: str = "auto") -> Any:
        """The ``lower.planner.ExecutionPlan`` for ``mode`` (``"auto"`` / ``"natural"``), or
        None: run in natural order."""
        ...

    def mask_mod_on(self, device) -> Callable:
        """``mask_mod(b, h, q_idx, kv_idx)`` with its parameter tensors and tables on ``device``."""
        ...

    def layout_at(self, block_size) -> BlockLayout:
        """The layout at another tile size (tokens; the CPU kernel's finer tiles)."""
        ...

    def block_mask(self, device="cpu"):
        """FlexAttention ``BlockMask`` on ``device``."""
        ...

    def dense_mask(self) -> np.ndarray:
        """bool [H, Q_LEN, KV_LEN] (small sizes)."""
        ...


#: score-matrix elements per chunk (``B * rows * qb * cols``); 2**20 floats = 4 MiB, about an L2
#: cache: measured faster than larger chunks (batched matmuls stay in cache)
CHUNK_ELEMENTS = 1 << 20
#: exp argument floor of the CPU kernels: ``exp(clamp(x, EXP_FLOOR, 0))``. torch's CPU exp leaves
#: its vectorised path for arguments below about -88 (and for -inf), measured 5-50x slower;
#: exp(-80) = 1.8e-35 is below float32 resolution of any row sum (>= 1).
EXP_FLOOR = -80.0


def mask_mod_for(cp: Compiled, device) -> Callable:
    """The pattern's ``mask_mod`` with its parameter tensors on the kernel's ``device``."""
    return cp.mask_mod_on(torch.device(device))


def allowed_in_tiles(mask_mod, dims, heads, q_blocks, kv_blocks, alive) -> torch.Tensor:
    """bool [R, qb, S * kb]: ``mask_mod`` over the token pairs of R rows of tiles.

    ``heads``, ``q_blocks``: int64 [R]; ``kv_blocks``: int64 [R, S]; ``alive``: bool [R, S]
    (False slots are not allowed). ``mask_mod`` sees only real indices: padded query rows
    reuse the last real row, keys past KV_LEN are not allowed.
    """
    qb, kb = dims.q_block_size, dims.kv_block_size
    dev = heads.device
    qtok = (q_blocks[:, None] * qb + torch.arange(qb, device=dev)).clamp_(max=dims.q_len - 1)
    kvtok = (kv_blocks[:, :, None] * kb + torch.arange(kb, device=dev)).flatten(1)
    valid = (kvtok < dims.kv_len) & alive.repeat_interleave(kb, dim=1)
    kvtok = kvtok.clamp(max=dims.kv_len - 1)
    b = torch.zeros((), dtype=torch.int64, device=dev)
    m = mask_mod(b, heads[:, None, None], qtok[:, :, None], kvtok[:, None, :])
    m = torch.as_tensor(m, device=dev).to(torch.bool)
    return torch.broadcast_to(m, (heads.shape[0], qb, kvtok.shape[1])) & valid[:, None, :]


class TileTable:
    """The distinct token masks of tiles (bool ``[qb, kb]``), found by hashing their packed bits:
    structured patterns have few (a band's diagonal tiles are all alike). ``add`` gives each
    tile its id in the table, or None once the table would exceed ``budget`` elements."""

    def __init__(self, qb: int, kb: int, budget: int, first=()):
        self.qb, self.kb, self.budget = qb, kb, budget
        self.tiles: list[np.ndarray] = []
        self._index: dict[bytes, int] = {}
        for t in first:
            self._index[np.packbits(t).tobytes()] = len(self.tiles)
            self.tiles.append(np.asarray(t, dtype=bool))

    def add(self, allowed: np.ndarray) -> "np.ndarray | None":
        """int64 [n] ids of ``allowed`` bool [n, qb, kb] (new masks are appended), or None."""
        flat = allowed.reshape(allowed.shape[0], -1)
        out = np.empty(flat.shape[0], dtype=np.int64)
        for t, row in enumerate(np.packbits(flat, axis=1)):
            key = row.tobytes()
            i = self._index.get(key)
            if i is None:
                i = self._index[key] = len(self.tiles)
                self.tiles.append(flat[t].reshape(self.qb, self.kb).copy())
                if len(self.tiles) * self.qb * self.kb > self.budget:
                    return None
            out[t] = i
        return out

    def stacked(self) -> np.ndarray:
        """bool [T, qb, kb]."""
        return np.stack(self.tiles).reshape(-1, self.qb, self.kb)


_EMPTY_ROWS: "weakref.WeakKeyDictionary" = weakref.WeakKeyDictionary()


def empty_rows(layout, mask_mod, num_heads: int, device, *, chunk_elements: int = CHUNK_ELEMENTS):
    """Query rows with no allowed key: bool [H, Q_LEN, 1], or None when every row has one.

    Only rows whose query block has PARTIAL tiles and no FULL tile are evaluated (with
    ``mask_mod``, chunk by chunk); cached per (layout, heads, device).
    """
    device = torch.device(device)
    per = _EMPTY_ROWS.setdefault(layout, {})
    key = (num_heads, str(device))
    if key in per:
        return per[key]
    kinds = np.asarray(layout.kinds)
    if kinds.shape[0] != num_heads:
        kinds = np.broadcast_to(kinds, (num_heads,) + kinds.shape[1:])
    H, nq, nkv = kinds.shape
    qb, kb = layout.q_block_size, layout.kv_block_size
    has_full = (kinds == FULL).any(-1)
    n_partial = (kinds == PARTIAL).sum(-1)
    empty = np.repeat(~has_full & (n_partial == 0), qb, axis=1)  # [H, nq * qb]
    check = ~has_full & (n_partial > 0)
    order = np.argsort(np.where(kinds == PARTIAL, 0, 1) * nkv + np.arange(nkv), axis=-1, kind="stable")
    empty_t = torch.as_tensor(empty, device=device)
    for n_p in np.unique(n_partial[check]):
        hs, qbs = np.nonzero(check & (n_partial == n_p))
        kvb = order[hs, qbs, :n_p]
        step = max(1, chunk_elements // (qb * kb * int(n_p)))
        for a in range(0, hs.size, step):
            h_t = torch.as_tensor(hs[a:a + step], device=device)
            q_t = torch.as_tensor(qbs[a:a + step], device=device)
            kv_t = torch.as_tensor(kvb[a:a + step], device=device)
            allowed = allowed_in_tiles(mask_mod, layout, h_t, q_t, kv_t, torch.ones_like(kv_t, dtype=torch.bool))
            none = ~allowed.any(-1)  # [R, qb]
            cols = q_t[:, None] * qb + torch.arange(qb, device=device)
            empty_t[h_t[:, None], cols] = none
    out = empty_t[:, :layout.q_len, None]
    out = out if bool(out.any()) else None
    per[key] = out
    return out



