"""The ``sdpa`` backend: torch's ``scaled_dot_product_attention``.

* A pattern that is exactly ``causal`` runs SDPA with ``is_causal=True`` (no mask tensor;
  SDPA's causal mask is ``tril(ones(Q_LEN, KV_LEN))``, i.e. ``kv_idx <= q_idx`` with queries
  and keys aligned at 0, which is SPEC §1's ``causal`` also when Q_LEN != KV_LEN).
* Any other pattern runs SDPA with the dense boolean mask ``[H, Q_LEN, KV_LEN]`` (from
  ``cp.dense_mask()``, cached per device): the small-size reference, and the "dense" baseline
  that ``patternc run`` times. It materialises Q_LEN x KV_LEN booleans per head, so it is
  refused (P353) above ``DENSE_MASK_LIMIT`` elements.
* Score terms: ``alibi`` becomes a float ``attn_mask`` (``m_h * (j - i)`` where allowed,
  ``-inf`` elsewhere: ``scoremod.sdpa_bias``); ``softcap`` is not additive, so ``sdpa``
  refuses it (P352) and ``auto`` never picks ``sdpa`` for a pattern with score terms.
* A scale <= 0 (legal: 0 averages the allowed values) on the ``is_causal`` path: torch
  2.13 returns NaN there, so q is multiplied by the scale first and SDPA gets scale 1.
* Rows with no allowed key: their mask row is opened (so SDPA's softmax stays finite) and
  their output is set to 0 afterwards, so values are 0 and gradients finite (zero).
"""

from __future__ import annotations

import weakref

import numpy as np
import torch

from .scoremod import sdpa_bias

#: largest dense mask (H * Q_LEN * KV_LEN booleans) the masked SDPA path builds
DENSE_MASK_LIMIT = 1 << 31
#: dense masks up to this many booleans are cached per (layout, device); larger ones are
#: rebuilt per call rather than held for the layout's lifetime
DENSE_MASK_CACHE_LIMIT = 1 << 26

_MASKS: "weakref.WeakKeyDictionary" = weakref.WeakKeyDictionary()


def dense_mask_elements(cp, num_heads: int) -> int:
    heads = cp.layout.num_heads if cp.layout.num_heads == num_heads else 1
    return heads * cp.q_len * cp.kv_len


def dense_mask_tensors(cp, device):
    """``(mask, empty)``: bool ``[H|1, Q_LEN, KV_LEN]`` with empty rows opened, and bool
    ``[H|1, Q_LEN, 1]`` marking rows with no allowed key (None when there are none)."""
    device = torch.device(device)
    per = _MASKS.setdefault(cp.layout, {})
    hit = per.get(str(device))
    if hit is None:
        dense = np.asarray(cp.dense_mask(), dtype=bool)
        hit = _mask_pair(dense, device)
        if dense.size <= DENSE_MASK_CACHE_LIMIT:
            per[str(device)] = hit
    return hit


def _mask_pair(dense: np.ndarray, device):
    """Torch tensors of a dense mask: ``(mask with empty rows opened, empty rows or None)``."""
    mask = torch.from_numpy(np.ascontiguousarray(dense)).to(device)
    empty = ~mask.any(-1, keepdim=True)
    if bool(empty.any()):
        return mask | empty, empty
    return mask, None


def sdpa_attention(cp, q, k, v, scale: float, *, use_causal: bool, dropout_p: float = 0.0,
                   drop_softcap: bool = False):
    """SDPA with ``is_causal`` (``use_causal``) or with the dense mask of ``cp`` (plus ALiBi's
    float bias when ``cp`` has ``alibi``).

    Args:
        q: float [B, H, Q_LEN, D]; k: [B, H_kv, KV_LEN, D]; v: [B, H_kv, KV_LEN, Dv].
        drop_softcap: run a pattern with ``softcap`` without it (a timing baseline: SDPA takes
            no score transform); False: such a pattern is refused.

    Returns:
        [B, H, Q_LEN, Dv] in q's dtype.

    Raises:
        PatternError: P352, ``cp`` has ``softcap`` and ``drop_softcap`` is False.
    """
    F = torch.nn.functional
    gqa = k.shape[1] != q.shape[1]
    if use_causal:
        if scale <= 0:
            # torch 2.13's is_causal path returns NaN for scale <= 0 (a legal scale: 0 gives
            # the mean of the allowed values); scaling q first and passing 1 is exact
            q, scale = q * scale, 1.0
        return F.scaled_dot_product_attention(q, k, v, is_causal=True, scale=scale, enable_gqa=gqa,
                                              dropout_p=dropout_p)
    mask, empty = dense_mask_tensors(cp, q.device)
    from .scoremod import score_terms_for

    terms = score_terms_for(cp, q.shape[1])
    if terms is not None and terms.cap is not None and not drop_softcap:
        from ..errors import Diagnostic, PatternError

        raise PatternError(Diagnostic("P352", "SDPA cannot apply `softcap`: it takes an additive bias, and "
                                      "c * tanh(s / c) is not one", help="use backend='blocksparse' or 'flex'",
                                      filename="patternc.execute.sdpa"))
    if terms is not None and terms.slopes is not None:  # ALiBi as a float bias (-inf where masked)
        if mask.shape[0] != q.shape[1]:
            mask = mask.expand(q.shape[1], -1, -1)
        mask = sdpa_bias(terms, mask, q.dtype)
    out = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, scale=scale, enable_gqa=gqa,
                                         dropout_p=dropout_p)
    if empty is not None:
        out = out.masked_fill(empty, 0.0)
    return out


def sdpa_attention_masked(q, k, v, dense, scale: float, *, dropout_p: float = 0.0, terms=None, kv_pos=None):
    """SDPA with an explicit bool mask ``dense`` [B|1, H|1, Q_LEN, KV_LEN] (run-time data);
    rows with no allowed key are opened for the softmax and set to 0 afterwards. ``terms``
    (``scoremod.ScoreTerms``, ALiBi only: the caller refuses softcap) become a float bias;
    ``kv_pos`` int64 [KV] are the key columns of ``k`` (default ``arange``: gathered keys pass
    their own).

    Returns:
        [B, H, Q_LEN, Dv] in q's dtype.
    """
    F = torch.nn.functional
    empty = ~dense.any(-1, keepdim=True)
    mask = dense | empty
    if terms:
        H, Q, KV = q.shape[1], dense.shape[-2], dense.shape[-1]
        dev = dense.device
        kv = torch.arange(KV, device=dev) if kv_pos is None else kv_pos.to(dev)
        bias = terms.alibi_bias(torch.arange(H, device=dev), torch.arange(Q, device=dev).expand(H, Q),
                                kv.expand(H, KV), q.dtype)  # [H, Q, KV]
        mask = bias.masked_fill(~mask, float("-inf"))
    out = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, scale=scale, enable_gqa=k.shape[1] != q.shape[1],
                                         dropout_p=dropout_p)
    return out.masked_fill(empty, 0.0)


def gathered_keys(layout, device) -> torch.Tensor:
    """int64 [n]: the key columns of every computed (non-EMPTY) tile of a layout with one query
    block, over all heads (and batch rows), ascending, clipped at KV_LEN."""
    kinds = np.asarray(layout.kinds)
    cols = np.flatnonzero(kinds.reshape(-1, kinds.shape[-1]).any(axis=0))
    kb = layout.kv_block_size
    idx = (cols[:, None] * kb + np.arange(kb)[None, :]).ravel()
    idx = idx[idx < layout.kv_len]
    return torch.from_numpy(idx).to(device)


def gathered_attention(layout, mask_mod, q, k, v, scale: float, *, dropout_p: float = 0.0, terms=None):
    """SDPA over only the keys of the computed tiles (a decode step or a short prefill chunk:
    the layout has one query block). The mask of those keys comes from ``mask_mod`` (which may
    read ``b``: run-time data), ``[B, H, Q_LEN, n]``; the cost is O(keys kept), not O(KV_LEN):
    a decode step of ``local(w) & causal`` reads about w keys (plus a partial block).

    Args:
        layout: BlockLayout with ``num_q_blocks == 1`` (kinds [H, 1, nkv] or [B, H, 1, nkv]).
        q: float [B, H, Q_LEN, D]; k: [B, H_kv, KV_LEN, D]; v: [B, H_kv, KV_LEN, Dv].
        terms: ``scoremod.ScoreTerms`` (ALiBi only; the caller refuses softcap): a float bias
            over the gathered keys' own positions.

    Returns:
        [B, H, Q_LEN, Dv] in q's dtype (rows with no allowed key are 0); differentiable.
    """
    B, H, Q, _ = q.shape
    idx = gathered_keys(layout, q.device)
    if idx.numel() == 0:
        return q.new_zeros(B, H, Q, v.shape[-1]) + 0 * q.sum() + 0 * k.sum() + 0 * v.sum()
    kg, vg = k.index_select(2, idx), v.index_select(2, idx)
    dev = q.device
    b = torch.arange(B, device=dev)[:, None, None, None]
    h = torch.arange(H, device=dev)[None, :, None, None]
    qi = torch.arange(Q, device=dev)[None, None, :, None]
    m = torch.as_tensor(mask_mod(b, h, qi, idx[None, None, None, :]), device=dev).to(torch.bool)
    m = torch.broadcast_to(m, (B, H, Q, idx.numel()))
    return sdpa_attention_masked(q, kg, vg, m, scale, dropout_p=dropout_p, terms=terms, kv_pos=idx)
