"""The ``flex`` backend: ``torch.compile(flex_attention, fullgraph=True)`` with the pattern's
``BlockMask`` (``cp.block_mask(device)``).

* The compiled function is built once per device and reused for every pattern; pattern
  parameters live in tensors inside ``mask_mod``, so a new window size is not a recompile
  (new lengths may be, as for any ``torch.compile``d function). Past ``RECOMPILE_LIMIT``
  distinct shapes, calls run eager FlexAttention (exact, slower) instead of failing.
* Forward on CPU and CUDA; backward on CUDA only: FlexAttention has no CPU backward, so a
  CPU call that needs gradients is refused with P352 (``auto`` never picks flex there).
* FlexAttention's CPU kernel takes float32 / bfloat16 / float16 only (no float64).
* Rows with no allowed key: torch 2.13 already returns 0 there; patternc also zeroes them
  explicitly (``masked_fill``), so the guarantee does not rest on a kernel detail.
"""

from __future__ import annotations

import torch

_COMPILED: dict[str, object] = {}

#: Distinct shapes (lengths, heads, head dims, dtypes) one process may compile flex for before
#: falling back to eager FlexAttention. torch's default recompile limit (8) is low for a
#: library that serves many lengths; with fullgraph=True hitting it is a hard error.
RECOMPILE_LIMIT = 64
_warned_eager = False


def _raise_recompile_limit() -> None:
    cfg = torch._dynamo.config
    name = "recompile_limit" if hasattr(cfg, "recompile_limit") else "cache_size_limit"
    if getattr(cfg, name) < RECOMPILE_LIMIT:
        setattr(cfg, name, RECOMPILE_LIMIT)


def compiled_flex_attention(device):
    """``torch.compile(flex_attention, fullgraph=True)``, one per device (cached)."""
    from torch.nn.attention.flex_attention import flex_attention

    key = str(torch.device(device))
    fn = _COMPILED.get(key)
    if fn is None:
        # CPU: static shapes. torch 2.13's CPU flex template fails to compile (C++ error,
        # `cur_kvSplitSize5` undeclared) when a shape change, e.g. a new head count, turns on
        # automatic dynamic shapes; dynamic=False recompiles per shape instead.
        dynamic = False if torch.device(device).type == "cpu" else None
        _raise_recompile_limit()
        fn = _COMPILED[key] = torch.compile(flex_attention, fullgraph=True, dynamic=dynamic)
    return fn


def flex_attention(cp, q, k, v, scale: float, *, empty_rows=None, block_mask=None):
    """FlexAttention with the compiled pattern's BlockMask.

    Args:
        q: float [B, H, Q_LEN, D]; k: [B, H_kv, KV_LEN, D]; v: [B, H_kv, KV_LEN, Dv].
        empty_rows: bool [H|1, Q_LEN, 1] (or [B, H, Q_LEN, 1]) rows with no allowed key, or None.
        block_mask: a BlockMask to use instead of ``cp.block_mask(q.device)`` (a batched one,
            built with run-time data).

    Returns:
        [B, H, Q_LEN, Dv] in q's dtype.
    """
    bm = cp.block_mask(q.device) if block_mask is None else block_mask
    fn = compiled_flex_attention(q.device)
    gqa = k.shape[1] != q.shape[1]
    try:
        out = fn(q, k, v, block_mask=bm, scale=scale, enable_gqa=gqa)
    except torch._dynamo.exc.FailOnRecompileLimitHit:
        # Past RECOMPILE_LIMIT shapes: eager FlexAttention is still exact (our BlockMask
        # carries a mask_mod that matches it tile for tile), only slower.
        global _warned_eager
        if not _warned_eager:
            import warnings

            warnings.warn(f"patternc flex backend: more than {RECOMPILE_LIMIT} distinct shapes were compiled; "
                          "running FlexAttention uncompiled (exact, slower). Use backend='blocksparse' on CPU "
                          "for many lengths.", RuntimeWarning, stacklevel=3)
            _warned_eager = True
        from torch.nn.attention.flex_attention import (
            flex_attention as eager_flex_attention,
        )

        out = eager_flex_attention(q, k, v, block_mask=bm, scale=scale, enable_gqa=gqa)
    if empty_rows is not None:
        out = out.masked_fill(empty_rows, 0.0)
    return out
