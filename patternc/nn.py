"""``patternc.nn``: torch modules that attend under a pattern.

``SparseSelfAttention`` is multi-head self-attention (query / key / value / output
projections) whose attention is restricted to a patternc pattern. The pattern is parsed and
checked when the module is built; the compiled layout and block masks are built lazily per
(sequence length, device) and cached on the instance, outside ``state_dict``; pickling and
``copy.deepcopy`` keep only the pattern source.

Example::

    attn = patternc.nn.SparseSelfAttention(256, 4, "(local(w=128) | strided(s=128)) & causal")
    y = attn(torch.randn(2, 1000, 256))        # [2, 1000, 256]

Generation (SPEC §1.6): ``KVCache`` holds each layer's keys and values; ``forward(x,
kv_cache=cache)`` treats ``x`` as the next tokens (a prefill chunk or one decode token), so a
stack of layers fed token by token gives the full-sequence outputs::

    cache = patternc.nn.KVCache()                 # KVCache(window=w) keeps only the last w keys
    y0 = attn(prompt, kv_cache=cache)             # chunked prefill: [B, T, E]
    y1 = attn(next_token, kv_cache=cache)         # decode: [B, 1, E], query at position T

This module imports torch (``import patternc`` does not import it).
"""

from __future__ import annotations

from collections import OrderedDict

import torch
from torch import nn

from .errors import Diagnostic, PatternError
from .ir.nodes import Pattern
from .lower.layout import normalize_block_size
from .source import frontdoor as api

__all__ = ["SparseSelfAttention", "KVCache"]

#: compiled patterns kept per module (an LRU over (length, device))
CACHE_SIZE = 16


def _compile(pattern, **kw):
    from .compiler import compile as compile_pattern

    return compile_pattern(pattern, **kw)


class _LayerCache:
    """One module's cached keys / values: k, v float [B, H, kept, D]; ``kv_offset`` is the
    position of the oldest kept key, ``length`` the number of positions seen; ``padding`` bool
    [B, kept] (True = real key) once a key_padding_mask was given."""

    def __init__(self):
        self.k = self.v = self.padding = None
        self.kv_offset = 0
        self.length = 0


class KVCache:
    """Keys and values of every ``SparseSelfAttention`` layer for generation (SPEC §1.6).

    ``forward(x, kv_cache=cache)`` reads and extends the slot of that module (one slot per
    module object, so a stack of layers shares one ``KVCache``). The queries of ``x`` stand at
    positions ``length … length + L - 1`` (``q_offset = length``, xformers' bottom-right
    alignment), the keys kept at ``kv_offset … length + L - 1``.

    Args:
        window: None keeps every key. An int ``w`` makes a rolling cache that keeps only the
            last ``w`` keys after each step (O(w) memory for ``local(w) & causal`` patterns; the
            compile then uses ``kv_offset``, HF transformers' convention). Each step checks
            that no query of the step may attend a dropped key (P354 otherwise: a rolling
            cache must never change the result).

    Example::

        cache = KVCache()
        for t in range(T):
            y_t = layer(x[:, t:t + 1], kv_cache=cache)   # equals layer(x)[:, t:t + 1] for a causal pattern
    """

    def __init__(self, window: int | None = None):
        if window is not None and (not isinstance(window, int) or window < 1):
            raise ValueError(f"window must be None or an int >= 1 (tokens), got {window!r}")
        self.window = window
        self._slots: dict = {}

    def slot(self, module) -> _LayerCache:
        """The cache of ``module`` (created empty on first use)."""
        key = id(module)
        if key not in self._slots:
            self._slots[key] = _LayerCache()
        return self._slots[key]

    def seen(self, module) -> int:
        """Positions ``module`` has seen (the q_offset of its next step)."""
        s = self._slots.get(id(module))
        return 0 if s is None else s.length

    def reset(self) -> None:
        """Forget every layer's keys and values."""
        self._slots.clear()


class SparseSelfAttention(nn.Module):
    """Multi-head self-attention restricted to a pattern.

    ``forward(x)`` projects ``x`` to q, k, v (``num_heads`` heads of ``embed_dim // num_heads``),
    runs ``patternc.execute.attention`` under the pattern compiled for ``Q_LEN = KV_LEN = L``
    (layer ``layer_idx`` of a ``layers(...)`` stack), and applies the output projection.

    Args:
        embed_dim: E, model width (a multiple of ``num_heads``).
        num_heads: H; head ``h`` uses entry ``h mod m`` of every ``heads(...)``.
        pattern: pattern source text (or a ``patternc.Pattern``).
        block_size: BLOCK_SIZE in tokens, int or ``(Q_BLOCK_SIZE, KV_BLOCK_SIZE)``.
        bias: biases in the four projections.
        dropout: attention dropout probability (on the softmax probabilities, in training).
        backend: ``"auto"``, ``"flex"``, ``"blocksparse"`` or ``"sdpa"`` (see
            ``patternc.execute.attention``).
        layer_idx: which entry of ``layers(...)`` this module uses (``layer_idx mod m``).
        params: values for the pattern's ``param``s.
        context_parallel: a ``patternc.distributed.ContextParallel`` (any layer's, for the
            full sequence length): ``x`` is then this rank's shard ``[B, n_r, E]``
            (``ctx.shard(x, dim=1)``) and attention runs context-parallel over the ranks, with
            the positions of ``context_parallel`` and this module's pattern (see
            docs/distributed.md). Not pickled; no attention dropout there.

    Raises:
        PatternError: the pattern does not parse or check (at construction).
        ValueError: ``embed_dim`` not a multiple of ``num_heads``, a bad block size, dropout,
            backend or layer index.

    Shapes:
        x: float [B, L, E] -> [B, L, E].
    """

    def __init__(self, embed_dim: int, num_heads: int, pattern, *, block_size=128, bias: bool = True,
                 dropout: float = 0.0, backend: str = "auto", layer_idx: int = 0, params: dict | None = None,
                 context_parallel=None):
        super().__init__()
        from .execute import BACKENDS

        if num_heads < 1 or embed_dim < 1 or embed_dim % num_heads:
            raise ValueError(f"embed_dim ({embed_dim}) must be a positive multiple of num_heads ({num_heads})")
        if not 0.0 <= float(dropout) < 1.0:
            raise ValueError(f"dropout must be in [0, 1), got {dropout}")
        if backend not in BACKENDS:
            raise ValueError(f"backend must be one of {', '.join(BACKENDS)}, got {backend!r}")
        if not isinstance(layer_idx, int) or layer_idx < 0:
            raise ValueError(f"layer_idx must be an int >= 0, got {layer_idx!r}")
        self.embed_dim, self.num_heads = int(embed_dim), int(num_heads)
        self.head_dim = self.embed_dim // self.num_heads
        self.block_size = normalize_block_size(block_size)
        self.dropout, self.backend, self.layer_idx = float(dropout), backend, layer_idx
        self.source = str(pattern) if isinstance(pattern, Pattern) else pattern
        self.params = dict(params or {})
        if context_parallel is not None and float(dropout) > 0:
            raise ValueError("attention dropout is not available with context_parallel; use dropout=0.0")
        self.context_parallel = context_parallel
        self.q_proj = nn.Linear(embed_dim, embed_dim, bias=bias)
        self.k_proj = nn.Linear(embed_dim, embed_dim, bias=bias)
        self.v_proj = nn.Linear(embed_dim, embed_dim, bias=bias)
        self.out_proj = nn.Linear(embed_dim, embed_dim, bias=bias)
        self._setup()

    # ---- the pattern (not in state_dict; rebuilt from the source after unpickling) ----------
    def _setup(self) -> None:
        if not isinstance(self.source, str):
            raise TypeError(f"pattern must be source text or a patternc.Pattern, got {type(self.source).__name__}")
        self.pattern = api.parse(self.source, params=self.params or None)  # PatternError here
        self._compiled: OrderedDict = OrderedDict()
        self.last_backend: str | None = None

    def __getstate__(self):
        state = dict(self.__dict__)
        state.pop("pattern", None)
        state.pop("_compiled", None)
        state["context_parallel"] = None  # holds a process group: set it again after unpickling
        return state

    def __setstate__(self, state):
        super().__setstate__(state)
        self._setup()

    # ---- compiled patterns ----------------------------------------------------------------
    def compiled(self, seq_len: int, device="cpu"):
        """The ``CompiledPattern`` for ``Q_LEN = KV_LEN = seq_len``, cached per length; the
        per-device ``mask_mod`` and ``BlockMask`` are cached inside it (so block masks are
        cached per (length, device)). ``device`` is accepted for symmetry and not needed.

        Raises:
            PatternError: a parameter out of range at this length (P301) and other P3xx.
        """
        key = int(seq_len)
        cp = self._compiled.get(key)
        if cp is not None:
            self._compiled.move_to_end(key)
            return cp
        cp = _compile(self.pattern, q_len=int(seq_len), kv_len=int(seq_len), num_heads=self.num_heads,
                      block_size=self.block_size, layer=self.layer_idx)
        self._compiled[key] = cp
        while len(self._compiled) > CACHE_SIZE:
            self._compiled.popitem(last=False)
        return cp

    def qkv(self, x: torch.Tensor):
        """The projected queries, keys and values this module attends with.

        Args:
            x: float [B, L, E].

        Returns:
            (q, k, v), each float [B, H, L, E // H] (what ``forward`` passes to attention;
            ``examples/train_charlm.py --save-qkv`` saves them for ``patternc run --input``).
        """
        B, L, _ = x.shape
        H, Dh = self.num_heads, self.head_dim

        def heads(t):
            return t.view(B, L, H, Dh).transpose(1, 2)

        return heads(self.q_proj(x)), heads(self.k_proj(x)), heads(self.v_proj(x))

    def forward(self, x: torch.Tensor, *, documents=None, key_padding_mask=None, kv_cache: KVCache | None = None,
                positions: int | None = None) -> torch.Tensor:
        """Self-attention under the pattern.

        Args:
            x: float [B, L, E].
            documents: run-time document ids of the packed rows (SPEC §1.7): int [B, P] / [P]
                over positions (P >= the last position of ``x``), or lengths ``[[l0, l1, …], …]``;
                needed when the pattern uses ``document``.
            key_padding_mask: bool, True = real key (HF ``attention_mask``): [B, L] for the keys of
                ``x``; with a cache also [B, seen + L] (the whole sequence so far, as HF passes it).
            kv_cache: a ``KVCache``: ``x`` is the next L tokens after the ones the cache has seen
                (decode: L = 1; chunked prefill: L > 1); its keys and values are appended.
            positions: the position of ``x[:, 0]`` (tokens). Default: the tokens the cache has
                seen, or 0. Without a cache, queries and keys both start there.

            With ``context_parallel`` set, ``x`` is this rank's shard ``[B, n_r, E]`` of the whole
            sequence and ``documents`` / ``key_padding_mask`` cover the whole sequence
            (``[B, ctx.seq_len]``); ``kv_cache`` and ``positions`` are not available there.

        Returns:
            float [B, L, E].

        Raises:
            PatternError: P350 ``x`` not of shape [B, L, embed_dim]; P354 a rolling cache that
                dropped keys the pattern needs, or ``positions`` that disagree with the cache;
                P360-P362 bad run-time data; P3xx from compiling at these lengths.
        """
        if x.dim() != 3 or x.shape[-1] != self.embed_dim:
            raise PatternError(Diagnostic(
                "P350", f"SparseSelfAttention expects x of shape [B, L, {self.embed_dim}], got "
                f"[{', '.join(str(d) for d in x.shape)}]", filename="patternc.nn.SparseSelfAttention"))
        B, L, E = x.shape
        q, k, v = self.qkv(x)
        if getattr(self, "context_parallel", None) is not None:
            if kv_cache is not None or positions:
                raise ValueError("kv_cache and positions are not available with context_parallel "
                                 "(it shards one whole sequence of ctx.seq_len tokens)")
            out = self._attend_context_parallel(q, k, v, documents, key_padding_mask)
        elif kv_cache is not None:
            out = self._attend_cached(q, k, v, kv_cache, positions, documents, key_padding_mask)
        elif positions or documents is not None or key_padding_mask is not None:
            pos = int(positions or 0)
            out = self._attend_at(q, k, v, pos, pos, documents, key_padding_mask)
        else:
            out = self._attend(q, k, v)
        return self.out_proj(out.transpose(1, 2).reshape(B, L, E))

    @torch.compiler.disable
    def _attend(self, q, k, v):
        """Attention of [B, H, L, D] q, k, v under the pattern compiled at L.

        Kept out of ``torch.compile`` graphs: compiling the pattern at a new length is numpy
        and Python (the lowering, the plan, ``time.perf_counter``), which dynamo cannot trace,
        and the block-sparse kernel loops over a data-dependent tile plan. A compiled model
        runs its projections compiled and this call eagerly (one graph break); the compiled
        ``flex`` backend still compiles its own kernel."""
        from .execute import attention

        cp = self.compiled(q.shape[2], q.device)
        out, self.last_backend = attention(cp, q, k, v, backend=self.backend, return_backend=True,
                                           dropout_p=self.dropout if self.training else 0.0)
        return out

    @torch.compiler.disable
    def _attend_context_parallel(self, q, k, v, documents, key_padding_mask):
        """q, k, v: this rank's positions of ``context_parallel.seq_len`` tokens; documents and
        key_padding_mask over the whole sequence (see ``ContextParallel.attention``)."""
        ctx = self.context_parallel
        self.last_backend = "context_parallel"
        return ctx.for_pattern(self.compiled(ctx.seq_len, q.device)).attention(
            q, k, v, documents=documents, key_padding_mask=key_padding_mask)

    def compiled_at(self, q_len: int, kv_len: int, q_offset: int, kv_offset: int):
        """The ``CompiledPattern`` of a step: Q_LEN = q_len rows at position q_offset, KV_LEN =
        kv_len columns at kv_offset (SPEC §1.6); cached like ``compiled``."""
        if q_offset == 0 and kv_offset == 0 and q_len == kv_len:
            return self.compiled(q_len)
        key = (int(q_len), int(kv_len), int(q_offset), int(kv_offset))
        cp = self._compiled.get(key)
        if cp is not None:
            self._compiled.move_to_end(key)
            return cp
        cp = _compile(self.pattern, q_len=q_len, kv_len=kv_len, num_heads=self.num_heads, block_size=self.block_size,
                      layer=self.layer_idx, q_offset=q_offset, kv_offset=kv_offset)
        self._compiled[key] = cp
        while len(self._compiled) > CACHE_SIZE:
            self._compiled.popitem(last=False)
        return cp

    @torch.compiler.disable
    def _attend_at(self, q, k, v, q_offset, kv_offset, documents, key_padding_mask):
        from .execute import attention

        cp = self.compiled_at(q.shape[2], k.shape[2], q_offset, kv_offset)
        out, self.last_backend = attention(cp, q, k, v, backend=self.backend, return_backend=True,
                                           dropout_p=self.dropout if self.training else 0.0,
                                           documents=documents, key_padding_mask=key_padding_mask)
        return out

    @torch.compiler.disable
    def _attend_cached(self, q, k, v, cache: KVCache, positions, documents, key_padding_mask):
        if not getattr(self, "_warned_random", False) and any(
                getattr(n, "name", None) == "random" for n in self.pattern.walk()):
            import warnings

            from .errors import PatternWarning

            self._warned_random = True
            warnings.warn(PatternWarning(Diagnostic(
                "W008", f"a KV cache with the pattern `{self.pattern}`, which uses `random`: `random` draws per "
                "key extent (SPEC §1.1, not prefix-stable), so cached steps attend other keys than the "
                "full-sequence forward", None, "decode without a cache (full forward per step), or use a "
                "pattern without `random` for generation", severity="warning",
                filename="patternc.nn.SparseSelfAttention")), stacklevel=4)
        slot = cache.slot(self)
        t, L = slot.length, q.shape[2]
        if positions is not None and int(positions) != t:
            raise PatternError(Diagnostic(
                "P354", f"positions={positions} but the KV cache has seen {t} tokens: the next tokens start at "
                f"position {t}", None, "pass positions=None with a cache (or reset the cache)",
                filename="patternc.nn.SparseSelfAttention"))
        if slot.k is not None and (slot.k.shape[0] != k.shape[0] or slot.k.dtype != k.dtype):
            raise PatternError(Diagnostic("P354", f"the KV cache holds batch {slot.k.shape[0]} {slot.k.dtype}, x is "
                                          f"batch {k.shape[0]} {k.dtype}", None, "use one KVCache per sequence batch",
                                          filename="patternc.nn.SparseSelfAttention"))
        keys = k if slot.k is None else torch.cat([slot.k, k], dim=2)
        vals = v if slot.v is None else torch.cat([slot.v, v], dim=2)
        pad = None
        if key_padding_mask is not None or slot.padding is not None:
            new = key_padding_mask
            if new is not None:
                new = torch.as_tensor(new, device=k.device).to(torch.bool)
                if new.dim() == 2 and new.shape[1] == t + L:  # HF: the whole sequence so far
                    new = new[:, t:]
            else:
                new = torch.ones(k.shape[0], L, dtype=torch.bool, device=k.device)
            old = slot.padding
            if old is None:
                old = torch.ones(k.shape[0], keys.shape[2] - L, dtype=torch.bool, device=k.device)
            pad = torch.cat([old, new], dim=1)
        kv_offset = slot.kv_offset
        if kv_offset > 0:
            self._check_window(L, t, kv_offset)
        out = self._attend_at(q, keys, vals, t, kv_offset, documents, pad)
        # keep the keys (detached: generation does not backpropagate through the cache)
        slot.k, slot.v, slot.padding = keys.detach(), vals.detach(), None if pad is None else pad
        slot.length = t + L
        w = cache.window
        if w is not None and slot.k.shape[2] > w:
            drop = slot.k.shape[2] - w
            slot.k, slot.v = slot.k[:, :, drop:], slot.v[:, :, drop:]
            if slot.padding is not None:
                slot.padding = slot.padding[:, drop:]
            slot.kv_offset += drop
        return out

    def _check_window(self, L: int, t: int, kv_offset: int) -> None:
        """P354 when a query at positions t … t + L - 1 may attend a key before ``kv_offset``
        (one a rolling cache dropped): counted exactly on the layout of those columns."""
        cp = self.compiled_at(L, kv_offset, t, 0)
        if cp.allows_any:
            raise PatternError(Diagnostic(
                "P354", f"the rolling KV cache keeps keys from position {kv_offset} on, but the pattern "
                f"`{self.pattern}` lets a query at positions {t}..{t + L - 1} attend an earlier key", None,
                "use a larger KVCache(window=...) (the pattern's look-back) or KVCache() without a window",
                filename="patternc.nn.SparseSelfAttention"))

    def extra_repr(self) -> str:
        return (f"embed_dim={self.embed_dim}, num_heads={self.num_heads}, pattern={str(self.pattern)!r}, "
                f"block_size={self.block_size}, dropout={self.dropout}, backend={self.backend!r}, "
                f"layer_idx={self.layer_idx}")
