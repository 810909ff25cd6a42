"""The ``flex`` backend: ``torch.compile(flex_attention, fullgraph=True)`` with the pattern's
``BlockMask`` (``cp.block_mask(device)``).

* The compiled function is built once per device and reused for every pattern; pattern
  parameters live in tensors inside ``mask_mod``, so a new window size is not a recompile
  (new lengths may be, as for any ``torch.compile``d function). Past ``RECOMPILE_LIMIT``
  distinct shapes, calls run eager FlexAttention (exact, slower) instead of failing.
* Forward on CPU and CUDA; backward on CUDA only: FlexAttention has no CPU backward, so a
  CPU call that needs gradients is refused with P352 (``auto`` never picks flex there).
* FlexAttention's CPU kernel takes float32 / bfloat16 / float16 only (no float64).
* Score terms (SPEC §1.8) run as FlexAttention's ``score_mod`` (``score_mod_for``), built
  from ``cp.score_terms`` with the cap and ALiBi slopes in tensors.
* Execution plans (``flex_plan_attention``, CUDA): a plan's terms run each with its own
  BlockMask in its own token order and are merged through FlexAttention's log-sum-exp (SPEC
  §6). On CPU compiled FlexAttention returns no log-sum-exp, so ``flex`` runs the natural
  BlockMask there (``blocksparse``, the CPU default, runs the plan).
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
    """FlexAttention with the compiled pattern's BlockMask (and, when the pattern has score
    terms, their generated ``score_mod``: ``score_mod_for``).

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
    score_mod = score_mod_for(cp, q.shape[1], q.device)
    try:
        out = fn(q, k, v, score_mod=score_mod, block_mask=bm, scale=scale, enable_gqa=gqa)
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

        out = eager_flex_attention(q, k, v, score_mod=score_mod, block_mask=bm, scale=scale, enable_gqa=gqa)
    if empty_rows is not None:
        out = out.masked_fill(empty_rows, 0.0)
    return out


def flex_plan_attention(cp, q, k, v, scale: float, ep, *, fn=None):
    """FlexAttention over the terms of an execution plan (SPEC §6; ``lower.planner``): each
    term's q / k / v gathered into its order (a transpose for residue orders), run with the
    term's own ``BlockMask`` and ``mask_mod`` (and the score terms at the natural positions),
    and the partial results merged exactly through FlexAttention's log-sum-exp. Differentiable
    where FlexAttention is (CUDA: the merge weights carry the gradient of each term's lse).

    Args:
        q: float [B, H, Q_LEN, D]; k: [B, H_kv, KV_LEN, D]; v: [B, H_kv, KV_LEN, Dv].
        ep: an ``ExecutionPlan`` of ``cp`` with more than one term or a reordered one.
        fn: the FlexAttention callable (default: ``compiled_flex_attention``). Compiled
            FlexAttention on CPU returns no log-sum-exp (torch 2.13: "torch.compile on CPU only
            supports inference and `return_lse` is not supported yet"), so on CPU the flex
            backend runs the natural BlockMask and only tests pass eager FlexAttention here.

    Returns:
        [B, H, Q_LEN, Dv] in q's dtype; a row with no allowed key in any term is 0.
    """
    from torch.nn.attention.flex_attention import AuxRequest

    from .blockmask import to_block_mask
    from .blocksparse import _from_order, _gather, _term_kv, plan_terms

    B, H, Q, _ = q.shape
    Dv = v.shape[-1]
    fn = compiled_flex_attention(q.device) if fn is None else fn
    base_sm = score_mod_for(cp, H, q.device)
    inf = float("inf")
    out = lse = None
    for t in plan_terms(cp, ep, q.device, kernel_tiles=False):
        cache = cp.__dict__.setdefault("_term_block_masks", {})
        bkey = (id(t), str(q.device))
        if bkey not in cache:
            cache[bkey] = (t, to_block_mask(t.layout, t.mask_mod, q.device))
        bm = cache[bkey][1]
        qt = _gather(q, t.heads, t.q_order, t.q_stride)
        kt, vt = _term_kv(t, k, v, H)
        sm = None if base_sm is None else _reordered_score_mod(base_sm, t)
        ot, aux = fn(qt, kt, vt, score_mod=sm, block_mask=bm, scale=scale, enable_gqa=kt.shape[1] != qt.shape[1],
                     return_aux=AuxRequest(lse=True))
        lt = aux.lse.to(torch.float32)
        Ht, Qt = qt.shape[1], qt.shape[2]
        if t.q_order is not None:
            if Qt == Q:
                ot, lt = _from_order(ot, t.q_order, t.q_stride), _from_order(lt, t.q_order, t.q_stride)
            else:
                ot = ot.new_zeros((B, Ht, Q, Dv)).index_copy(2, t.q_order, ot)
                lt = lt.new_full((B, Ht, Q), -inf).index_copy(2, t.q_order, lt)
        if t.heads is not None:
            ot = ot.new_zeros((B, H, Q, Dv)).index_copy(1, t.heads, ot)
            lt = lt.new_full((B, H, Q), -inf).index_copy(1, t.heads, lt)
        if out is None:
            out, lse = ot.float(), lt
            continue
        # exact merge, out of place (autograd): weights exp(lse_t - lse), 0 where a term has no key
        new = torch.logaddexp(lse, lt)
        safe = new.masked_fill(new == -inf, 0.0)
        out = out * torch.exp(lse - safe)[..., None] + ot.float() * torch.exp(lt - safe)[..., None]
        lse = new
    return out.to(q.dtype)


def _reordered_score_mod(score_mod, term):
    """``score_mod`` at a term's natural heads, rows and columns (ALiBi reads positions)."""
    ho, qo, ko = term.heads, term.q_order, term.kv_order

    def sm(score, b, h, q_idx, kv_idx):
        return score_mod(score, b, h if ho is None else ho[h], q_idx if qo is None else qo[q_idx],
                         kv_idx if ko is None else ko[kv_idx])

    sm.__name__ = getattr(score_mod, "__name__", "score_mod")
    return sm


def score_mod_for(cp, num_heads: int, device):
    """The ``score_mod`` of ``cp.score_terms`` for ``num_heads`` query heads on ``device``
    (cached on ``cp``), or None when the pattern has no score terms. Its cap, slopes and
    offsets are tensors (``scoremod.make_score_mod``): another cap is not a recompile."""
    from .scoremod import make_score_mod, score_terms_for

    st = score_terms_for(cp, num_heads)
    if st is None:
        return None
    cache = cp.__dict__.setdefault("_score_mods", {})
    key = (num_heads, str(torch.device(device)))
    if key not in cache:
        cache[key] = make_score_mod(st, device)
    return cache[key]
