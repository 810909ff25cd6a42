"""Execution: attention under a compiled pattern, in torch (forward and backward).

``attention(cp, q, k, v)`` runs one of three backends (see ``docs/execution.md``):

========================  ==============================================================
``flex``                  ``torch.compile(flex_attention, fullgraph=True)`` with
                          ``cp.block_mask(device)``; CPU and CUDA forward, CUDA backward
``blocksparse``           patternc's own torch kernel over the listed tiles only; forward
                          and backward on any device (the CPU training path)
``sdpa``                  ``scaled_dot_product_attention``: ``is_causal=True`` for a pure
                          ``causal`` pattern, else the dense boolean mask (small sizes)
``auto`` (default)        ``choose_backend``: pure causal -> sdpa; CPU -> blocksparse;
                          CUDA -> flex (blocksparse for float64)
========================  ==============================================================

Every backend returns 0 for a query row with no allowed key, with finite gradients.
This module imports torch; ``import patternc`` does not import it.
"""

from __future__ import annotations

import math

import torch

from ..errors import Diagnostic, PatternError
from .common import Compiled

BACKENDS = ("auto", "flex", "blocksparse", "sdpa")
DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)

__all__ = ["attention", "choose_backend", "check_inputs", "BACKENDS", "Compiled", "reference_attention"]


def _error(code: str, message: str, help: str | None = None) -> PatternError:
    return PatternError(Diagnostic(code, message, help=help, filename="patternc.execute.attention"))


def _shape(x) -> str:
    return "[" + ", ".join(str(d) for d in x.shape) + "]"


def check_inputs(cp: Compiled, q, k, v) -> None:
    """Check q, k, v against the compiled pattern.

    Args:
        cp: a CompiledPattern.
        q: float [B, H, Q_LEN, D]; k: float [B, H_kv, KV_LEN, D]; v: float [B, H_kv, KV_LEN, Dv],
            one dtype (float16, bfloat16, float32 or float64), one device; H_kv divides H.

    Raises:
        PatternError: P350 a shape that does not fit the pattern or the other tensors (the
            message gives the expected shape), P351 an unsupported dtype, a dtype or device
            mismatch.
    """
    for name, x in (("q", q), ("k", k), ("v", v)):
        if not isinstance(x, torch.Tensor):
            raise _error("P350", f"{name} must be a torch.Tensor, got {type(x).__name__}")
        if x.dim() != 4:
            raise _error("P350", f"{name} must be 4-D [B, H, L, D], got shape {_shape(x)}",
                         help="add the missing batch / head dimensions (x[None] or x.unsqueeze(1))")
    if not (q.dtype == k.dtype == v.dtype):
        raise _error("P351", f"q, k, v dtypes differ: {q.dtype}, {k.dtype}, {v.dtype}",
                     help="cast them to one dtype")
    if q.dtype not in DTYPES:
        raise _error("P351", f"unsupported dtype {q.dtype}; expected float16, bfloat16, float32 or float64")
    if not (q.device == k.device == v.device):
        raise _error("P351", f"q, k, v are on different devices: {q.device}, {k.device}, {v.device}")
    B, H, Q, D = q.shape
    Bk, H_kv, KV, Dk = k.shape
    Dv = v.shape[-1]
    q_len, kv_len = cp.q_len, cp.kv_len
    if Q != q_len and q.shape[1] == q_len and k.shape[1] == kv_len and v.shape[1] == kv_len:
        # [B, L, H, D] (the layout of HF projections before .transpose(1, 2), of xformers and
        # of flash-attn), not [B, H, L, D]: say so instead of suggesting q_len=H
        raise _error("P350", f"q, k, v look like [B, L, H, D] (sequence before heads): q {_shape(q)}, "
                     f"k {_shape(k)}, v {_shape(v)} for Q_LEN={q_len}, KV_LEN={kv_len}; patternc takes "
                     "[B, H, L, D], as scaled_dot_product_attention and flex_attention do",
                     help="pass q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2) (and transpose the "
                          "result back with out.transpose(1, 2))")
    if Q != q_len:
        raise _error("P350", f"q has Q_LEN={Q}, but the pattern was compiled for Q_LEN={q_len}: "
                     f"expected q [B, H, {q_len}, D], got {_shape(q)}",
                     help=f"compile the pattern with q_len={Q}")
    if KV != kv_len or v.shape[2] != kv_len:
        raise _error("P350", f"k/v have KV_LEN={KV}/{v.shape[2]}, but the pattern was compiled for "
                     f"KV_LEN={kv_len}: expected k [B, H_kv, {kv_len}, D], v [B, H_kv, {kv_len}, Dv], "
                     f"got {_shape(k)}, {_shape(v)}", help=f"compile the pattern with kv_len={KV}")
    if Bk != B or v.shape[0] != B:
        raise _error("P350", f"batch sizes differ: q {_shape(q)}, k {_shape(k)}, v {_shape(v)}")
    if v.shape[1] != H_kv:
        raise _error("P350", f"k and v have different head counts: k {_shape(k)}, v {_shape(v)}")
    if Dk != D:
        raise _error("P350", f"q and k head dims differ: expected k [{B}, {H_kv}, {kv_len}, {D}], got {_shape(k)}")
    if H_kv < 1 or H % H_kv:
        raise _error("P350", f"k/v have H_kv={H_kv} heads, which does not divide q's H={H}",
                     help="grouped-query attention needs H to be a multiple of H_kv")
    if B < 1 or H < 1 or D < 1 or Dv < 1:
        raise _error("P350", f"empty dimension in q {_shape(q)}, k {_shape(k)}, v {_shape(v)}")
    layout_heads = cp.layout.num_heads
    if H != layout_heads:
        head_free = layout_heads == 1 and cp.pattern.num_heads == 1
        if not head_free:
            raise _error("P350", f"q has H={H} heads, but the pattern was compiled for num_heads={layout_heads}: "
                         f"expected q [B, {layout_heads}, {q_len}, D], got {_shape(q)}",
                         help=f"compile the pattern with num_heads={H}")


def _needs_grad(q, k, v) -> bool:
    return torch.is_grad_enabled() and (q.requires_grad or k.requires_grad or v.requires_grad)


def choose_backend(cp: Compiled, q, k, v, *, dropout_p: float = 0.0, explain: bool = False):
    """The backend ``backend="auto"`` runs for these inputs.

    Policy (measured with torch 2.13; numbers in ``docs/execution.md``):

    0. one query block (``Q_LEN <= Q_BLOCK_SIZE``: a decode step, a short prefill chunk) and
       not pure ``causal`` -> ``sdpa`` over only the keys of the computed tiles (gathered:
       O(keys kept), e.g. ~w keys for a ``local(w)`` decode step at any cache length);
    1. the pattern is exactly ``causal`` -> ``sdpa`` (``is_causal=True``; FlexAttention is
       2-3x slower than SDPA's fused causal kernel there);
    2. a CPU tensor -> ``blocksparse``: forward it runs as fast as compiled FlexAttention
       without the 5-20 s first compile, and it has a backward (FlexAttention on CPU has none);
    3. CUDA -> ``flex`` (forward and backward), except float64 or attention dropout ->
       ``blocksparse`` (FlexAttention has neither);
    4. any other device -> ``blocksparse`` (plain torch ops).

    Returns:
        The backend name, or ``(name, reason)`` with ``explain=True``.
    """
    if cp.is_causal_only:
        name, why = "sdpa", "the pattern is exactly `causal`: SDPA is_causal"
    elif cp.layout.num_q_blocks == 1 and not _has_softcap(cp):
        name, why = "sdpa", "one query block (decode / short chunk): SDPA over the keys of its computed tiles"
    elif q.device.type == "cpu":
        name, why = "blocksparse", "CPU: patternc's block-sparse kernel (no compile, has a backward)"
    elif q.device.type == "cuda":
        if q.dtype == torch.float64:
            name, why = "blocksparse", "CUDA float64: FlexAttention kernels do not take float64"
        elif dropout_p > 0:
            name, why = "blocksparse", "attention dropout: FlexAttention has none"
        else:
            name, why = "flex", "CUDA: compiled FlexAttention with the pattern's BlockMask"
    else:
        name, why = "blocksparse", f"{q.device.type}: plain torch block-sparse kernel"
    return (name, why) if explain else name


PLANS = ("auto", "natural")


def attention(cp: Compiled, q, k, v, *, scale: float | None = None, backend: str = "auto",
              return_backend: bool = False, dropout_p: float = 0.0, documents=None, key_padding_mask=None,
              plan: str = "auto"):
    """Attention of q over k, v where the compiled pattern allows it.

    ``out[b, h, i] = sum_j softmax_j(terms(q[b, h, i] . k[b, g(h), j] * scale) | allowed(h, i, j)) v[b, g(h), j]``
    with ``g(h) = h // (H // H_kv)`` (grouped-query attention, as SDPA's ``enable_gqa``) and
    ``terms`` the pattern's score terms (SPEC §1.8: ``softcap``, then ``alibi``; identity
    when it has none), applied by every backend.

    Args:
        cp: a ``patternc.CompiledPattern`` (``patternc.compile(..., q_len=Q_LEN, kv_len=KV_LEN,
            num_heads=H)``).
        q: float16/bfloat16/float32/float64 [B, H, Q_LEN, D].
        k: same dtype [B, H_kv, KV_LEN, D]; H_kv divides H.
        v: same dtype [B, H_kv, KV_LEN, Dv].
        scale: multiplier of ``q k^T`` (default ``1 / sqrt(D)``).
        backend: ``"auto"`` (see ``choose_backend``), ``"flex"``, ``"blocksparse"`` or ``"sdpa"``.
        return_backend: also return the name of the backend that ran.
        dropout_p: attention dropout on the softmax probabilities (training; ``sdpa`` and
            ``blocksparse`` only). Default 0.
        documents: run-time document ids, int [B, P] or [P] (broadcast), or lengths per row
            ``[[l0, l1, ...], ...]`` (SPEC §1.7); required when the pattern uses ``document``.
        key_padding_mask: bool [B, KV_LEN], True = a real key (HF ``attention_mask``); ANDed
            with the pattern. A row left with no key gives 0 with finite gradients.
        plan: ``"auto"`` (default): run ``cp.plan``, the pattern as disjoint terms each in
            its cheapest token order, merged through the log-sum-exp (SPEC §6; ``blocksparse``,
            and ``flex`` on CUDA with one BlockMask per term); ``"natural"``: one term in
            natural order. ``sdpa`` is dense either way.

    Returns:
        [B, H, Q_LEN, Dv] in q's dtype (a row with no allowed key is 0), or
        ``(out, backend_name)`` with ``return_backend=True``.

    Raises:
        PatternError: P350 / P351 inputs that do not fit (see ``check_inputs``); P352 an
            unknown backend, or ``flex`` asked for a CPU call that needs gradients, for
            float64 on CPU or for dropout, or ``sdpa`` for a pattern with ``softcap``; P353
            ``sdpa`` with a dense mask too large to build; P360-P362 missing or malformed
            run-time data (``cp.runtime_inputs``).
    """
    if backend not in BACKENDS:
        from ..errors import did_you_mean

        raise _error("P352", f"unknown backend {backend!r}; expected one of {', '.join(BACKENDS)}",
                     help=did_you_mean(str(backend), BACKENDS) or "use backend='auto'")
    amp = _autocast_dtype(q)
    if amp is not None:
        # Under torch.autocast, attention is a lower-precision op (as SDPA is on autocast's
        # list): q, k, v are cast to the autocast dtype (float64 stays float64, as autocast
        # leaves it), and the backend runs with autocast off, so its own float32
        # accumulation is not re-cast behind its back. The result is in that dtype.
        q, k, v = (x.to(amp) if x.is_floating_point() and x.dtype != torch.float64 else x for x in (q, k, v))
    check_inputs(cp, q, k, v)
    if plan not in PLANS:
        from ..errors import did_you_mean

        raise _error("P352", f"unknown plan {plan!r}; expected one of {', '.join(PLANS)}",
                     help=did_you_mean(str(plan), PLANS) or "use plan='auto' (default) or plan='natural'")
    if amp is not None:
        with torch.autocast(q.device.type, enabled=False):
            return attention(cp, q, k, v, scale=scale, backend=backend, return_backend=return_backend,
                             dropout_p=dropout_p, documents=documents, key_padding_mask=key_padding_mask,
                             plan=plan)
    if not 0.0 <= float(dropout_p) < 1.0:
        raise _error("P352", f"dropout_p must be in [0, 1), got {dropout_p}")
    scale = 1.0 / math.sqrt(q.shape[-1]) if scale is None else float(scale)
    if documents is not None or key_padding_mask is not None or cp.needs:
        kp, docs = cp.runtime_inputs(documents=documents, key_padding_mask=key_padding_mask, batch=q.shape[0])
        if kp is not None or docs is not None:
            name = _runtime_backend(cp, q, dropout_p) if backend == "auto" else backend
            out = _run_batched(cp, name, q, k, v, scale, dropout_p, kp, docs)
            return (out, name) if return_backend else out
    name = choose_backend(cp, q, k, v, dropout_p=dropout_p) if backend == "auto" else backend
    if name == "flex":
        if dropout_p > 0:
            raise _error("P352", "backend 'flex' has no attention dropout",
                         help="use backend='blocksparse' or 'sdpa' (or 'auto') with dropout_p > 0")
        out = _run_flex(cp, q, k, v, scale, plan)
    elif name == "blocksparse":
        from .blocksparse import blocksparse_attention

        out = blocksparse_attention(cp, q, k, v, scale, dropout_p=dropout_p, plan=plan)
    else:
        out = _run_sdpa(cp, q, k, v, scale, dropout_p)
    return (out, name) if return_backend else out


def _runtime_backend(cp, q, dropout_p) -> str:
    """``auto`` with run-time data: sdpa over gathered keys for one query block, flex on CUDA
    (batched BlockMask), else blocksparse."""
    if cp.layout.num_q_blocks == 1 and not _has_softcap(cp):
        return "sdpa"
    if q.device.type == "cuda" and q.dtype != torch.float64 and dropout_p == 0:
        return "flex"
    return "blocksparse"


class _BatchRow:
    """What the kernels read of a CompiledPattern, for one batch row with run-time data: its
    layout (kinds [H, nq, nkv]) and a mask_mod whose ``b`` is fixed to that row."""

    def __init__(self, cp, layout, mask_mod, b: int):
        self.pattern, self.q_len, self.kv_len, self.num_heads = cp.pattern, cp.q_len, cp.kv_len, cp.num_heads
        self.score_terms = cp.score_terms
        self.q_offset, self.kv_offset = getattr(cp, "q_offset", 0), getattr(cp, "kv_offset", 0)
        self.head_offset = getattr(cp, "head_offset", 0)
        self.layout = layout
        self.is_causal_only = False
        bt = torch.tensor(b, dtype=torch.int64)

        def row_mask_mod(_b, h, q_idx, kv_idx):
            return mask_mod(bt.to(q_idx.device) if isinstance(q_idx, torch.Tensor) else bt, h, q_idx, kv_idx)

        self.mask_mod = row_mask_mod

    def mask_mod_on(self, device):
        return self.mask_mod


def _run_batched(cp, name, q, k, v, scale, dropout_p, kp, docs):
    """Attention with run-time data (key padding, documents): per-batch layouts and a
    mask_mod that reads ``b``. flex runs once with the batched BlockMask; blocksparse runs each
    group of rows with equal run-time data in one call on its layout (autograd joins them);
    sdpa uses the dense [B, H, Q, KV] mask."""
    B = q.shape[0]
    layout = cp._layout_for(kp, docs)
    mask_mod = cp._mask_mod_for(q.device, kp, docs)
    if name == "flex":
        if dropout_p > 0:
            raise _error("P352", "backend 'flex' has no attention dropout",
                         help="use backend='blocksparse' or 'sdpa' (or 'auto') with dropout_p > 0")
        if q.device.type == "cpu" and _needs_grad(q, k, v):
            raise _error("P352", "backend 'flex' has no backward on CPU and these inputs require gradients",
                         help="use backend='blocksparse' (or 'auto') to train on CPU")
        from .blockmask import to_block_mask
        from .common import empty_rows
        from .flex import flex_attention

        bm = to_block_mask(layout, mask_mod, device=q.device)
        rows = []
        for b in range(layout.batch):
            row = _BatchRow(cp, layout.batch_row(b), mask_mod, b)
            e = empty_rows(row.layout, row.mask_mod, q.shape[1], q.device)
            rows.append(torch.zeros(q.shape[1], q.shape[2], 1, dtype=torch.bool, device=q.device) if e is None
                        else e.expand(q.shape[1], -1, -1))
        empty = torch.stack(rows)
        return flex_attention(cp, q, k, v, scale, empty_rows=empty, block_mask=bm)
    if name == "sdpa" and layout.num_q_blocks == 1:
        from .scoremod import score_terms_for
        from .sdpa import gathered_attention

        _refuse_sdpa_softcap(cp)
        return gathered_attention(layout, mask_mod, q, k, v, scale, dropout_p=dropout_p,
                                  terms=score_terms_for(cp, q.shape[1]))
    if name == "sdpa":
        from .sdpa import DENSE_MASK_LIMIT, sdpa_attention_masked

        n = layout.batch * layout.num_heads * cp.q_len * cp.kv_len
        if n > DENSE_MASK_LIMIT:
            raise _error("P353", f"backend 'sdpa' needs a dense [B, H, Q_LEN, KV_LEN] mask of {n:,} booleans, over "
                         f"the limit of {DENSE_MASK_LIMIT:,}", help="use backend='blocksparse' or 'flex' (or 'auto')")
        _refuse_sdpa_softcap(cp)
        from .scoremod import score_terms_for

        dense = torch.from_numpy(_dense_runtime(cp, layout, kp, docs)).to(q.device)
        return sdpa_attention_masked(q, k, v, dense, scale, dropout_p=dropout_p,
                                     terms=score_terms_for(cp, q.shape[1]))
    from .blocksparse import blocksparse_attention

    if layout.batch == 1:  # one row of run-time data broadcast over the batch: one plan, one call
        row = _BatchRow(cp, layout.batch_row(0), mask_mod, 0)
        return blocksparse_attention(row, q, k, v, scale, dropout_p=dropout_p)
    groups = _rows_sharing_data(B, kp, docs)
    if len(groups) == 1:  # every row has the same documents and padding: one call over the batch
        row = _BatchRow(cp, layout.batch_row(0), mask_mod, 0)
        return blocksparse_attention(row, q, k, v, scale, dropout_p=dropout_p)
    outs, order = [], []
    for rows in groups:
        b = rows[0]
        row = _BatchRow(cp, layout.batch_row(b), mask_mod, b)
        if len(rows) == 1:
            sel = slice(b, b + 1)
            outs.append(blocksparse_attention(row, q[sel], k[sel], v[sel], scale, dropout_p=dropout_p))
        else:  # rows with equal run-time data: their layouts and mask_mods are equal, one call
            idx = torch.tensor(rows, device=q.device)
            outs.append(blocksparse_attention(row, q.index_select(0, idx), k.index_select(0, idx),
                                              v.index_select(0, idx), scale, dropout_p=dropout_p))
        order += rows
    out = torch.cat(outs, dim=0)
    if order == list(range(B)):
        return out
    inverse = torch.empty(B, dtype=torch.long)
    inverse[torch.tensor(order)] = torch.arange(B)
    return out.index_select(0, inverse.to(q.device))


def _rows_sharing_data(B: int, kp, docs) -> list[list[int]]:
    """Batch rows grouped by equal run-time data (documents row, key padding row), in order of
    first appearance: rows of one group have the same layout and the same mask_mod values,
    so the blocksparse kernel runs them in one call (a batch packed the same way, or padded the
    same way, costs one kernel plan instead of B)."""
    groups: dict = {}
    for b in range(B):
        key = (None if docs is None else docs[min(b, docs.shape[0] - 1)].tobytes(),
               None if kp is None else kp[b].tobytes())
        groups.setdefault(key, []).append(b)
    return list(groups.values())


def _dense_runtime(cp, layout, kp, docs):
    """bool [B, H, Q_LEN, KV_LEN]: the pattern with run-time data (small sizes: sdpa, tests)."""
    return cp._dense_runtime(kp, docs)


def _autocast_dtype(q) -> "torch.dtype | None":
    """The dtype ``torch.autocast`` casts to on q's device, or None when it is off."""
    if not isinstance(q, torch.Tensor):
        return None
    dev = q.device.type
    try:
        if not torch.is_autocast_enabled(dev):
            return None
    except RuntimeError:  # a device type autocast does not know
        return None
    return torch.get_autocast_dtype(dev)


#: the smallest BLOCK_SIZE backend 'flex' runs with on CPU (see ``_run_flex``)
FLEX_CPU_MIN_BLOCK = 16


def _run_flex(cp, q, k, v, scale, plan="natural"):
    from .common import empty_rows, mask_mod_for
    from .flex import flex_attention, flex_plan_attention

    if q.device.type == "cpu" and _needs_grad(q, k, v):
        raise _error("P352", "backend 'flex' has no backward on CPU (FlexAttention's CPU kernel is "
                     "forward-only) and these inputs require gradients",
                     help="use backend='blocksparse' (or 'auto') to train on CPU; for inference "
                          "wrap the call in torch.no_grad() or pass q.detach(), k.detach(), v.detach()")
    if q.device.type == "cpu":
        # No gradient is needed here (checked above), but torch's CPU flex kernel refuses any
        # input with requires_grad=True even under torch.no_grad(): detaching is exact then.
        q, k, v = q.detach(), k.detach(), v.detach()
    if q.device.type == "cpu" and min(cp.layout.q_block_size, cp.layout.kv_block_size) < FLEX_CPU_MIN_BLOCK:
        # torch 2.13's compiled CPU kernel: BLOCK_SIZE 8 with head dim 8 or 16 gave outputs 1-2 off
        # (uncompiled flex_attention with the same BlockMask is right); smaller blocks are refused
        # as a whole rather than trusting the sizes that happened to pass
        raise _error("P352", f"backend 'flex' on CPU needs BLOCK_SIZE >= {FLEX_CPU_MIN_BLOCK}: torch's compiled CPU "
                     f"FlexAttention kernel returns wrong outputs at BLOCK_SIZE 8 (this layout: "
                     f"{cp.layout.q_block_size} x {cp.layout.kv_block_size})",
                     help=f"compile with block_size >= {FLEX_CPU_MIN_BLOCK}, or use backend='blocksparse' (or 'auto') on CPU")
    if q.device.type == "cpu" and q.dtype == torch.float64:
        raise _error("P352", "backend 'flex' does not take float64 on CPU (FlexAttention's CPU kernel "
                     "supports float32, bfloat16, float16)", help="use backend='blocksparse' or 'sdpa'")
    # the plan's terms, each with its own BlockMask (CUDA: compiled FlexAttention on CPU returns
    # no log-sum-exp to merge them with)
    ep = cp.plan_for(plan) if plan == "auto" and q.device.type == "cuda" else None
    if ep is not None and not ep.is_natural:
        return flex_plan_attention(cp, q, k, v, scale, ep)
    empty = empty_rows(cp.layout, mask_mod_for(cp, q.device), q.shape[1], q.device)
    return flex_attention(cp, q, k, v, scale, empty_rows=empty)


def _has_softcap(cp) -> bool:
    return any(t.name == "softcap" for t in cp.score_terms)


def _refuse_sdpa_softcap(cp) -> None:
    if _has_softcap(cp):
        raise _error("P352", "backend 'sdpa' cannot apply `softcap`: SDPA takes an additive bias, and "
                     "c * tanh(s / c) is not one", help="use backend='blocksparse' or 'flex' (or 'auto')")


def _run_sdpa(cp, q, k, v, scale, dropout_p=0.0):
    from .sdpa import DENSE_MASK_LIMIT, dense_mask_elements, sdpa_attention

    _refuse_sdpa_softcap(cp)
    if cp.is_causal_only:
        return sdpa_attention(cp, q, k, v, scale, use_causal=True, dropout_p=dropout_p)
    if cp.layout.num_q_blocks == 1:  # decode / short chunk: only the keys of the computed tiles
        from .common import mask_mod_for
        from .scoremod import score_terms_for
        from .sdpa import gathered_attention

        return gathered_attention(cp.layout, mask_mod_for(cp, q.device), q, k, v, scale, dropout_p=dropout_p,
                                  terms=score_terms_for(cp, q.shape[1]))
    n = dense_mask_elements(cp, q.shape[1])
    if n > DENSE_MASK_LIMIT:
        raise _error("P353", f"backend 'sdpa' needs a dense [H, Q_LEN, KV_LEN] mask of {n:,} booleans "
                     f"for this pattern, over the limit of {DENSE_MASK_LIMIT:,}",
                     help="use backend='blocksparse' or 'flex' (or 'auto')")
    return sdpa_attention(cp, q, k, v, scale, use_causal=False, dropout_p=dropout_p)


def reference_attention(*args, **kwargs):
    """See ``patternc.execute.reference.reference_attention`` (float64 dense oracle)."""
    from .reference import reference_attention as ref

    return ref(*args, **kwargs)
