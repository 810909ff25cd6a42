"""``patternc.nn``: torch modules that attend under a pattern.

``SparseSelfAttention`` is multi-head self-attention (query / key / value / output
projections) whose attention is restricted to a patternc pattern. The pattern is parsed and
checked when the module is built; the compiled layout and block masks are built lazily per
(sequence length, device) and cached on the instance, outside ``state_dict``; pickling and
``copy.deepcopy`` keep only the pattern source.

Example::

    attn = patternc.nn.SparseSelfAttention(256, 4, "(local(w=128) | strided(s=128)) & causal")
    y = attn(torch.randn(2, 1000, 256))        # [2, 1000, 256]

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

__all__ = ["SparseSelfAttention"]

#: compiled patterns kept per module (an LRU over (length, device))
CACHE_SIZE = 16


def _compile(pattern, **kw):
    from .compiler import compile as compile_pattern

    return compile_pattern(pattern, **kw)


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

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Self-attention under the pattern.

        Args:
            x: float [B, L, E].

        Returns:
            float [B, L, E].

        Raises:
            PatternError: P350 ``x`` not of shape [B, L, embed_dim]; P3xx from compiling at L.
        """
        if x.dim() != 3 or x.shape[-1] != self.embed_dim:
            raise PatternError(Diagnostic(
                "P350", f"SparseSelfAttention expects x of shape [B, L, {self.embed_dim}], got "
                f"[{', '.join(str(d) for d in x.shape)}]", filename="patternc.nn.SparseSelfAttention"))
        B, L, E = x.shape
        q, k, v = self.qkv(x)
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

        ctx = getattr(self, "context_parallel", None)
        if ctx is not None:  # q, k, v are this rank's positions of ctx.seq_len tokens
            self.last_backend = "context_parallel"
            return ctx.for_pattern(self.compiled(ctx.seq_len, q.device)).attention(q, k, v)
        cp = self.compiled(q.shape[2], q.device)
        out, self.last_backend = attention(cp, q, k, v, backend=self.backend, return_backend=True,
                                           dropout_p=self.dropout if self.training else 0.0)
        return out

    def extra_repr(self) -> str:
        return (f"embed_dim={self.embed_dim}, num_heads={self.num_heads}, pattern={str(self.pattern)!r}, "
                f"block_size={self.block_size}, dropout={self.dropout}, backend={self.backend!r}, "
                f"layer_idx={self.layer_idx}")
