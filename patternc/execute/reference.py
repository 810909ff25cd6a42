"""The float64 dense reference attention: the numerical oracle every backend is tested against.

``reference_attention`` computes ``softmax(q k^T * scale + mask) v`` in float64 with plain
torch ops (differentiable, so tests also compare gradients through it). A query row with no
allowed key yields 0, with finite (zero) gradients. For long sequences the mask can be given
as a function of a query range and the work is done in query chunks, so memory stays
``O(H * chunk * KV_LEN)`` instead of ``O(H * Q_LEN * KV_LEN)``.
"""

from __future__ import annotations

import math
from typing import Callable


def _as_bool_tensor(mask, device):
    import numpy as np
    import torch

    if isinstance(mask, np.ndarray):
        mask = torch.from_numpy(np.ascontiguousarray(mask))
    return mask.to(device=device, dtype=torch.bool)


def expand_kv_heads(x, num_heads: int):
    """Repeat kv heads for grouped-query attention: ``[B, H_kv, L, D] -> [B, H, L, D]``.

    Query head ``h`` uses kv head ``h // (H // H_kv)`` (torch SDPA's ``enable_gqa``).

    Raises:
        ValueError: ``H_kv`` does not divide ``num_heads``.
    """
    h_kv = x.shape[1]
    if h_kv == num_heads:
        return x
    if num_heads % h_kv:
        raise ValueError(f"H_kv={h_kv} does not divide H={num_heads}")
    return x.repeat_interleave(num_heads // h_kv, dim=1)


def reference_attention(q, k, v, mask, *, scale: float | None = None, q_chunk: int | None = None):
    """Dense masked attention in float64 (the oracle for numerics).

    Args:
        q: float [B, H, Q_LEN, D].
        k: float [B, H_kv, KV_LEN, D] (H_kv divides H; grouped-query attention).
        v: float [B, H_kv, KV_LEN, Dv].
        mask: bool [H or 1, Q_LEN, KV_LEN] (torch tensor or numpy array; True = attend), or a
            callable ``mask(q_start, q_end) -> bool [H or 1, q_end - q_start, KV_LEN]`` that
            yields the rows of a query range (lets long sequences avoid a full mask).
        scale: multiplier of ``q k^T`` (default ``1 / sqrt(D)``).
        q_chunk: query rows per step (default: all rows at once for a tensor mask, 256 for a
            callable).

    Returns:
        float64 [B, H, Q_LEN, Dv]; rows with no allowed key are 0.

    Raises:
        ValueError: shapes that do not fit together.
    """
    import torch

    B, H, Q, D = q.shape
    if k.shape[0] != B or v.shape[0] != B or k.shape[2] != v.shape[2] or k.shape[-1] != D:
        raise ValueError(f"incompatible q/k/v shapes {tuple(q.shape)}, {tuple(k.shape)}, {tuple(v.shape)}")
    scale = 1.0 / math.sqrt(D) if scale is None else float(scale)
    q64 = q.to(torch.float64)
    k64 = expand_kv_heads(k.to(torch.float64), H)
    v64 = expand_kv_heads(v.to(torch.float64), H)
    rows: Callable
    if callable(mask):
        rows = mask
        q_chunk = q_chunk or 256
    else:
        full = _as_bool_tensor(mask, q.device)
        if full.ndim == 2:
            full = full[None]
        if full.shape[-2:] != (Q, k.shape[2]) or full.shape[0] not in (1, H):
            raise ValueError(f"mask of shape {tuple(full.shape)} does not fit q {tuple(q.shape)}, k {tuple(k.shape)}")
        rows = lambda a, b: full[:, a:b]  # noqa: E731
        q_chunk = q_chunk or Q
    outs = []
    for start in range(0, Q, q_chunk):
        end = min(Q, start + q_chunk)
        m = _as_bool_tensor(rows(start, end), q.device)  # [H|1, rows, KV]
        s = torch.matmul(q64[:, :, start:end], k64.transpose(-1, -2)) * scale
        s = s.masked_fill(~m, float("-inf"))
        has_any = m.any(-1, keepdim=True)  # [H|1, rows, 1]
        # an empty row would be softmax(-inf...) = NaN: give it zeros, keep gradients finite
        s = torch.where(has_any, s, torch.zeros((), dtype=s.dtype, device=s.device))
        p = torch.softmax(s, dim=-1)
        p = torch.where(has_any, p, torch.zeros((), dtype=p.dtype, device=p.device))
        outs.append(torch.matmul(p, v64))
    return torch.cat(outs, dim=2)


#: bytes of float64 scores per reference chunk in ``compare_with_reference``
REFERENCE_CHUNK_BYTES = 256 << 20


def reference_chunk_rows(batch: int, num_heads: int, kv_len: int, q_len: int) -> int:
    """Query rows per chunk of ``compare_with_reference``: float64 scores of about
    ``REFERENCE_CHUNK_BYTES`` (``8 * B * H * rows * KV_LEN`` bytes), at least 1, at most Q_LEN."""
    return max(1, min(q_len, REFERENCE_CHUNK_BYTES // max(1, 8 * batch * num_heads * kv_len)))


def pattern_rows(cp, num_heads: int, device, documents=None) -> Callable:
    """``rows(q_start, q_end) -> bool [H, rows, KV_LEN]`` of a compiled pattern, evaluated with
    its ``mask_mod`` on ``device`` (no full ``[H, Q_LEN, KV_LEN]`` mask is built); with
    ``documents`` (one packed row, SPEC §1.7) the mask_mod of that row."""
    import torch

    from .common import mask_mod_for

    mask_mod = mask_mod_for(cp, device) if documents is None else cp.mask_mod_for(device, documents=documents)
    h = torch.arange(num_heads, device=device)[:, None, None]
    kv = torch.arange(cp.kv_len, device=device)[None, None, :]
    b = torch.zeros((), dtype=torch.int64, device=device)

    def rows(a, e):
        qi = torch.arange(a, e, device=device)[None, :, None]
        m = torch.as_tensor(mask_mod(b, h, qi, kv), device=device).to(torch.bool)
        return torch.broadcast_to(m, (num_heads, e - a, cp.kv_len))

    return rows


def compare_with_reference(cp, q, k, v, out, *, scale: float | None = None, on_chunk: Callable | None = None,
                           documents=None) -> dict:
    """The error of an attention result against the float64 reference of the same pattern,
    computed in query chunks (memory about ``REFERENCE_CHUNK_BYTES``, never the full mask).

    Args:
        cp: the compiled pattern ``out`` was computed with (``execute.common.Compiled``).
        q: float [B, H, Q_LEN, D]; k: [B, H_kv, KV_LEN, D]; v: [B, H_kv, KV_LEN, Dv].
        out: the result to check, [B, H, Q_LEN, Dv] (any float dtype).
        scale: the scale ``out`` used (default ``1 / sqrt(D)``).
        on_chunk: called with no argument after each chunk (a progress bar).
        documents: run-time documents of one packed row shared by the batch (SPEC §1.7), for a
            pattern with ``document``.

    Returns:
        ``{"max_abs_error": float, "rel_error": float}``: the largest absolute difference
        (NaN when ``out`` holds a NaN: it is never dropped) and ``||out - ref|| / ||ref||``
        (Frobenius; the absolute norm when the reference is all zeros).
    """
    import torch

    B, H, N, _ = q.shape
    chunk = reference_chunk_rows(B, H, k.shape[2], N)
    rows = pattern_rows(cp, H, q.device, documents)
    sq_err = sq_ref = 0.0
    max_abs = 0.0
    for a in range(0, N, chunk):
        e = min(N, a + chunk)
        ref = reference_attention(q[:, :, a:e], k, v, lambda s0, s1, a=a: rows(a + s0, a + s1), scale=scale)
        diff = out[:, :, a:e].to(torch.float64) - ref
        chunk_max = float(diff.abs().max())
        # NaN must stick (max() would drop it and report a perfect 0)
        max_abs = math.nan if math.isnan(chunk_max) or math.isnan(max_abs) else max(max_abs, chunk_max)
        sq_err += float((diff * diff).sum())
        sq_ref += float((ref * ref).sum())
        if on_chunk is not None:
            on_chunk()
    rel = math.sqrt(sq_err) / math.sqrt(sq_ref) if sq_ref > 0 else math.sqrt(sq_err)
    return {"max_abs_error": max_abs, "rel_error": rel}
