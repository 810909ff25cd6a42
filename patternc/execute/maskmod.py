"""Stage 4b: ``lower_to_mask_mod`` — a pattern as a FlexAttention ``mask_mod(b, h, q_idx, kv_idx)``.

The function is built once per (pattern, lengths, device) as a tree of closures, one per IR
node, so it is traceable by ``torch.compile`` / ``vmap`` and has no Python branching on tensor
values. Every integer parameter lives in a 0-d int64 tensor captured by the closure: a
compiled FlexAttention kernel guards on the tensors' metadata, not their values, so changing
``w`` (same pattern shape) does not recompile. Per-position data (``random`` draws,
``global(at=[...])`` positions) are lookup tables indexed by the (clamped) indices.

Importing this module imports torch; ``import patternc`` never does (``CompiledPattern``
imports it on first use of ``mask_mod``).
"""

from __future__ import annotations

import numpy as np
import torch

from ..ir.nodes import And, Blocks, Diff, Heads, Layers, Not, Or, Pattern, Prim
from ..lower.lowering import random_flat_keys


def device_key(device) -> str:
    """The canonical name of a torch device (``"cpu"``, ``"cuda:0"``): the key of per-device caches."""
    return str(torch.device(device))


def lower_to_mask_mod(p: Pattern, q_len: int, kv_len: int, device="cpu", *, q_offset: int = 0,
                      kv_offset: int = 0, key_padding=None, documents=None):
    """Build the ``mask_mod`` of one layer of a pattern.

    Args:
        p: a layer-free Pattern with concrete arguments (``heads`` allowed; head ``h`` uses
            entry ``h mod m``).
        q_len: Q_LEN, tokens (rows; with ``q_offset`` sizes the lookup tables of
            ``random`` / ``global(at=...)``).
        kv_len: KV_LEN, tokens (columns).
        device: where the parameter tensors and tables live (the device of the kernel).
        q_offset, kv_offset: positions of row 0 / column 0 (SPEC §1.6): the predicate is
            evaluated at ``(q_idx + q_offset, kv_idx + kv_offset)``, HF transformers' convention.
        key_padding: bool [B, KV_LEN] (True = real key, SPEC §1.7), ANDed in at ``[b, kv_idx]``;
            the mask_mod then reads its ``b`` argument.

    Returns:
        ``mask_mod(b, h, q_idx, kv_idx) -> bool tensor``; ``b`` is ignored; ``h``, ``q_idx``,
        ``kv_idx`` are int tensors (0-d under ``vmap``/FlexAttention, or broadcastable int64
        tensors when called directly, e.g. ``mask_mod(0, h, q[:, None], kv[None, :])``).
        ``mask_mod.__name__`` is the canonical text of ``p``.

    Example:
        >>> import patternc, torch
        >>> mm = lower_to_mask_mod(patternc.parse("local(w=2) & causal"), 4, 4)
        >>> mm(0, torch.tensor(0), torch.arange(4)[:, None], torch.arange(4)[None, :]).int()
        tensor([[1, 0, 0, 0],
                [1, 1, 0, 0],
                [0, 1, 1, 0],
                [0, 0, 1, 1]], dtype=torch.int32)
    """
    device = torch.device(device)
    if documents is not None:
        from .documents import documents_context

        with documents_context(documents, device):
            fn = _build(p, q_offset + q_len, kv_offset + kv_len, device)
    else:
        fn = _build(p, q_offset + q_len, kv_offset + kv_len, device)
    shifted = bool(q_offset or kv_offset)
    qo, ko = (_t(q_offset, device), _t(kv_offset, device)) if shifted else (None, None)
    kp = None if key_padding is None else torch.as_tensor(key_padding, device=device).to(torch.bool)
    kmax = kv_len - 1

    def mask_mod(b, h, q_idx, kv_idx):
        if not isinstance(h, torch.Tensor):
            h = torch.as_tensor(h, device=device)
        if not isinstance(b, torch.Tensor):
            b = torch.as_tensor(b, device=device)
        out = fn(h, q_idx + qo, kv_idx + ko, b) if shifted else fn(h, q_idx, kv_idx, b)
        if kp is not None:
            out = out & kp[b, kv_idx.clamp(0, kmax)]
        return out

    mask_mod.__name__ = mask_mod.__qualname__ = str(p)
    where = f", q_offset={q_offset}, kv_offset={kv_offset}" if q_offset or kv_offset else ""
    mask_mod.__doc__ = f"FlexAttention mask_mod of the pattern `{p}` (Q_LEN={q_len}, KV_LEN={kv_len}{where})."
    return mask_mod


def _t(v, device) -> torch.Tensor:
    return torch.tensor(int(v), dtype=torch.int64, device=device)


def _build(p: Pattern, q_len: int, kv_len: int, dev):
    if isinstance(p, Prim):
        return _prim(p, q_len, kv_len, dev)
    if isinstance(p, Not):
        f = _build(p.child, q_len, kv_len, dev)
        return lambda h, q, kv, b: ~f(h, q, kv, b)
    if isinstance(p, Diff):
        f, g = _build(p.left, q_len, kv_len, dev), _build(p.right, q_len, kv_len, dev)
        return lambda h, q, kv, b: f(h, q, kv, b) & ~g(h, q, kv, b)
    if isinstance(p, (And, Or)):
        fs = [_build(c, q_len, kv_len, dev) for c in p.items]
        conj = isinstance(p, And)

        def junction(h, q, kv, b):
            out = fs[0](h, q, kv, b)
            for f in fs[1:]:
                out = (out & f(h, q, kv, b)) if conj else (out | f(h, q, kv, b))
            return out

        return junction
    if isinstance(p, Heads):
        fs = [_build(c, q_len, kv_len, dev) for c in p.items]
        m = len(fs)

        def per_head(h, q, kv, b):
            hm = h % m
            out = fs[0](h, q, kv, b)
            for k in range(1, m):
                out = torch.where(hm == k, fs[k](h, q, kv, b), out)
            return out

        return per_head
    if isinstance(p, Blocks):
        bs = _t(p.b, dev)
        f = _build(p.child, -(-q_len // p.b), -(-kv_len // p.b), dev)
        return lambda h, q, kv, b: f(h, q // bs, kv // bs, b)
    if isinstance(p, Layers):
        raise ValueError("select a layer before building a mask_mod")
    raise TypeError(f"not a pattern: {p!r}")


def _prim(p: Prim, q_len: int, kv_len: int, dev):
    a = p.argdict
    n = p.name
    if n == "all":
        return lambda h, q, kv, b: torch.ones_like(q - kv, dtype=torch.bool)
    if n == "none":
        return lambda h, q, kv, b: torch.zeros_like(q - kv, dtype=torch.bool)
    if n == "causal":
        return lambda h, q, kv, b: kv <= q
    if n == "local":
        w = _t(a["w"], dev)
        return lambda h, q, kv, b: (q - kv).abs() < w
    if n == "band":
        left, right = _t(a["left"], dev), _t(a["right"], dev)
        return lambda h, q, kv, b: (q - kv <= left) & (kv - q <= right)
    if n == "strided":
        s = _t(a["s"], dev)
        return lambda h, q, kv, b: (q - kv) % s == 0
    if n == "dilated":
        d, span = _t(a["d"], dev), _t(a["w"] * a["d"], dev)
        return lambda h, q, kv, b: ((q - kv) % d == 0) & ((q - kv).abs() < span)
    if n == "chunk":
        l = _t(a["l"], dev)
        return lambda h, q, kv, b: q // l == kv // l
    if n == "summary":
        l, c, g = a["l"], a["c"], a["g"]
        lt, lo, hi = _t(l, dev), _t(l - (g + 1) * c, dev), _t(l - g * c, dev)

        def summary(h, q, kv, b):
            jm = kv % lt
            return (jm >= lo) & (jm < hi) & (q >= 0)

        return summary
    if n == "sink":
        k = _t(a["n"], dev)
        return lambda h, q, kv, b: (kv < k) & (q >= 0)
    if n == "prefix":
        k = _t(a["n"], dev)
        return lambda h, q, kv, b: (q < k) & (kv < k)
    if n == "global":
        if "n" in a:
            k = _t(a["n"], dev)
            return lambda h, q, kv, b: (q < k) | (kv < k)
        at = np.asarray(a["at"], dtype=np.int64)
        mq, mk = _marks(at, q_len, dev), _marks(at, kv_len, dev)
        qmax, kmax = q_len - 1, kv_len - 1
        return lambda h, q, kv, b: mq[q.clamp(0, qmax)] | mk[kv.clamp(0, kmax)]
    if n == "random":
        table = _random_table(a["r"], a["seed"], q_len, kv_len, dev)
        qmax, kmax = q_len - 1, kv_len - 1
        return lambda h, q, kv, b: table[q.clamp(0, qmax), kv.clamp(0, kmax)]
    raise ValueError(f"unknown primitive {n!r}")


def _marks(at: np.ndarray, length: int, dev) -> torch.Tensor:
    m = np.zeros(length, dtype=bool)
    m[at[at < length]] = True
    return torch.from_numpy(m).to(dev)


def _random_table(r: int, seed: int, q_len: int, kv_len: int, dev) -> torch.Tensor:
    """bool [Q_LEN, KV_LEN] lookup table of the draws (O(Q_LEN * KV_LEN) is allowed for
    ``random``, SPEC §3)."""
    table = np.zeros(q_len * kv_len, dtype=bool)
    table[random_flat_keys(r, seed, q_len, kv_len)] = True
    return torch.from_numpy(table.reshape(q_len, kv_len)).to(dev)
