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

from ..ir.nodes import And, Blocks, Diff, Heads, Layers, Not, Or, Pattern, PerDocument, Prim
from ..ir.primitives import PRIMITIVES
from ..ir.specialize import cdiv
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
    global _DOCS
    _DOCS = None if documents is None else torch.as_tensor(np.ascontiguousarray(documents), dtype=torch.int64,
                                                           device=device)
    try:
        fn = _build(p, q_offset + q_len, kv_offset + kv_len, device)
    finally:
        _DOCS = None
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


#: the run-time ``documents`` (int64 [B|1, P]) of the mask_mod being built (set only while
#: ``lower_to_mask_mod`` builds its closures)
_DOCS = None


def _document(dev):
    """``document``: ``documents[b, q] == documents[b, kv]`` (positions clamped to P - 1; a
    single row serves every b)."""
    from ..errors import Diagnostic, PatternError

    docs = _DOCS
    if docs is None:
        raise PatternError(Diagnostic("P360", "`document` needs run-time `documents` (SPEC §1.7)", None,
                                      "use cp.mask_mod_for(documents=...) / cp.block_mask(documents=...)"))
    rows, top = docs.shape[0], docs.shape[1] - 1
    if rows == 1:
        row = docs[0]
        return lambda h, q, kv, b: row[q.clamp(0, top)] == row[kv.clamp(0, top)]
    return lambda h, q, kv, b: docs[b, q.clamp(0, top)] == docs[b, kv.clamp(0, top)]


def _run_tables(docs: torch.Tensor):
    """int64 [B|1, P] run index, first position and length of every position's run (a run:
    a maximal stretch of equal consecutive ids, SPEC §1.7)."""
    change = torch.ones_like(docs, dtype=torch.bool)
    change[:, 1:] = docs[:, 1:] != docs[:, :-1]
    run = torch.cumsum(change.to(torch.int64), dim=1) - 1
    pos = torch.arange(docs.shape[1], device=docs.device).expand_as(docs)
    start = torch.cummax(torch.where(change, pos, torch.zeros_like(pos)), dim=1).values
    end = torch.flip(torch.cummin(torch.flip(torch.where(
        torch.cat([change[:, 1:], torch.ones_like(change[:, :1])], dim=1), pos + 1,
        torch.full_like(pos, docs.shape[1])), dims=[1]), dim=1).values, dims=[1])
    return run, start, end - start


def _per_document(p: PerDocument, dev):
    """``per_document(x)``: same run, and x at the offsets from the run's start. The inner
    pattern is built once per distinct inner pattern over the row's document lengths (one
    when x reads no ``q_len`` / ``kv_len`` / ``random``; else one per distinct length, chosen
    with ``torch.where`` on the position's run length)."""
    from ..errors import Diagnostic, PatternError
    from ..ir.specialize import bind_per_document

    docs = _DOCS
    if docs is None:
        raise PatternError(Diagnostic("P360", "`per_document` needs run-time `documents` (SPEC §1.7)", None,
                                      "use cp.mask_mod_for(documents=...) / cp.block_mask(documents=...)"))
    run, start, length = _run_tables(docs)
    top = docs.shape[1] - 1
    lengths = sorted(set(length.flatten().tolist()))
    has_random = any(isinstance(n, Prim) and n.name == "random" for n in p.child.walk())
    branches: dict = {}
    for L in lengths:
        inner = bind_per_document(p.child, L)
        key = (inner, L if has_random else None)
        branches.setdefault(key, []).append(L)
    Lmax = lengths[-1]
    fs = []
    for (inner, L), Ls in branches.items():
        n = L if L is not None else Lmax
        fs.append((_build(inner, n, n, dev), torch.tensor(Ls, dtype=torch.int64, device=dev)))
    single = docs.shape[0] == 1

    def per_document(h, q, kv, b):
        qc, kc = q.clamp(0, top), kv.clamp(0, top)
        bb = 0 if single else b
        s = start[bb, qc]
        same = run[bb, qc] == run[bb, kc]
        out = fs[0][0](h, q - s, kv - s, b)
        if len(fs) > 1:
            L = length[bb, qc]
            for f, Ls in fs[1:]:
                out = torch.where(torch.isin(L, Ls), f(h, q - s, kv - s, b), out)
        return same & out

    return per_document


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
        f = _build(p.child, cdiv(q_len, p.b), cdiv(kv_len, p.b), dev)
        return lambda h, q, kv, b: f(h, q // bs, kv // bs, b)
    if isinstance(p, PerDocument):
        return _per_document(p, dev)
    if isinstance(p, Layers):
        raise ValueError("select a layer before building a mask_mod")
    raise TypeError(f"not a pattern: {p!r}")


class TorchArrays:
    """The registry's array namespace on torch (see ``patternc.ir.primitives``): the formula's
    parameters are 0-d int64 tensors on ``device``; position sets and ``random``'s draws are
    bool lookup tables indexed by the (clamped) indices, built once here, outside any trace.

    Attributes:
        q_len, kv_len: Q_LEN and KV_LEN of the index space (tokens, or blocks inside ``blocks``).
        device: where the tensors live.
    """

    abs = staticmethod(torch.abs)

    def __init__(self, q_len: int, kv_len: int, device):
        self.q_len, self.kv_len, self.device = q_len, kv_len, device

    @staticmethod
    def const(value: bool):
        if value:
            return lambda i, j: torch.ones_like(i - j, dtype=torch.bool)
        return lambda i, j: torch.zeros_like(i - j, dtype=torch.bool)

    def index_set(self, positions, axis: str):
        length = self.q_len if axis == "q" else self.kv_len
        marks, top = _marks(np.asarray(positions, dtype=np.int64), length, self.device), length - 1
        return lambda x: marks[x.clamp(0, top)]

    def random_pairs(self, r, seed):
        table = _random_table(int(r), int(seed), self.q_len, self.kv_len, self.device)
        qmax, kmax = self.q_len - 1, self.kv_len - 1
        return lambda i, j: table[i.clamp(0, qmax), j.clamp(0, kmax)]


def _prim(p: Prim, q_len: int, kv_len: int, dev):
    """The registry's formula with every integer parameter a 0-d tensor (a new value is not a
    recompile); a primitive that ignores an index still broadcasts over it (FlexAttention and
    direct ``mask_mod(0, h, q[:, None], kv[None, :])`` calls expect the full shape)."""
    if p.name == "document":
        return _document(dev)
    spec = PRIMITIVES.get(p.name)
    if spec is None or spec.formula is None:
        raise ValueError(f"unknown primitive {p.name!r}")
    args = {k: (_t(v, dev) if isinstance(v, int) else v) for k, v in p.args}
    pred = spec.formula(TorchArrays(q_len, kv_len, dev), args)
    reads_q = spec.reads == "" or any(c in spec.reads for c in "dix")
    reads_kv = spec.reads == "" or any(c in spec.reads for c in "djx")
    if reads_q and reads_kv:
        return lambda h, q, kv, b: pred(q, kv)
    if reads_kv:
        return lambda h, q, kv, b: pred(q, kv) & (q >= 0)
    if reads_q:
        return lambda h, q, kv, b: pred(q, kv) & (kv >= 0)
    return lambda h, q, kv, b: pred(q, kv) & (q >= 0) & (kv >= 0)


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
