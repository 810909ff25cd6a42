"""Per-layer tile views: the union over heads of a layer's block layout, plus a way to
evaluate the union mask on chosen tiles.

The token and block engines read a layer through ``LayerTiles``:

* ``full``: bool [num_q_blocks, num_kv_blocks], the tile is FULL in some head (every token
  pair of the tile is an edge);
* ``nonempty``: bool [num_q_blocks, num_kv_blocks], the tile is not EMPTY in some head;
* ``mask(q_idx, kv_idx)``: bool, broadcasting int64 token indices: some head allows the pair.

``layer_tiles`` builds them from ``patternc.compile`` (the compiler's ``BlockLayout`` and
``mask_numpy``) when that module is available, and otherwise from the module's own
classifier (``evaluate`` over every tile, which materialises Q_LEN x KV_LEN in row strips:
small sizes only). ``dense_tiles`` wraps an explicit dense adjacency (used by the
block-level engine, whose "tokens" are blocks).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import numpy as np

from ..layout import EMPTY, FULL, PARTIAL, BlockLayout

# The adapter evaluates every token pair; refuse beyond this many (rows x keys).
ADAPTER_MAX_PAIRS = 1 << 30


class LayoutUnavailable(ValueError):
    """No layout can be built at this size (the built-in classifier is quadratic)."""


@dataclass
class LayerTiles:
    """Union over heads of one layer's tiles (see the module docstring).

    Attributes:
        n: Q_LEN = KV_LEN, tokens.
        block_size: Q_BLOCK_SIZE = KV_BLOCK_SIZE, tokens.
        full: bool [nb, nb].
        nonempty: bool [nb, nb].
        mask: callable (q_idx, kv_idx) -> bool, broadcasting int64 arrays.
        source: where the layout came from (``compiler`` / ``adapter`` / ``dense``).
    """

    n: int
    block_size: int
    full: np.ndarray
    nonempty: np.ndarray
    mask: Callable
    source: str

    @property
    def num_blocks(self) -> int:
        return int(self.full.shape[0])

    @property
    def partial(self) -> np.ndarray:
        """bool [nb, nb]: non-empty tiles that are FULL in no head (need the mask)."""
        return self.nonempty & ~self.full


def _compiler():
    try:
        from .. import compiler  # noqa: F401
    except ImportError:
        return None
    return compiler


def layer_tiles(stack, entry: int, block_size: int, *, prefer: str = "auto") -> LayerTiles:
    """The tiles of layer entry ``entry`` of ``stack`` at ``block_size`` tokens per block.

    Args:
        stack: a ``model.Stack``.
        entry: layer entry in ``0 .. stack.period - 1``.
        block_size: tokens per block (both sides).
        prefer: ``"auto"`` (the compiler when present), ``"compiler"`` or ``"adapter"``.

    Raises:
        LayoutUnavailable: no compiler, and the adapter would evaluate more than
            ``ADAPTER_MAX_PAIRS`` pairs.
    """
    comp = _compiler() if prefer in ("auto", "compiler") else None
    if prefer == "compiler" and comp is None:
        raise ImportError("patternc.compiler is not available")
    reps = [h for h, _ in stack.heads[entry]]
    if comp is not None:
        cp = comp.compile(stack.pattern, q_len=stack.n, kv_len=stack.n, num_heads=stack.num_heads,
                          block_size=block_size, layer=entry)
        lay: BlockLayout = cp.layout
        kinds = lay.kinds[reps]
        full = (kinds == FULL).any(axis=0)
        nonempty = (kinds != EMPTY).any(axis=0)

        def mask(q_idx, kv_idx, _cp=cp, _reps=reps):
            out = None
            for h in _reps:
                v = np.asarray(_cp.mask_numpy(h, q_idx, kv_idx), dtype=bool)
                out = v if out is None else out | v
            return out

        return LayerTiles(stack.n, block_size, full, nonempty, mask, "compiler")
    return _adapter_tiles(stack, entry, block_size)


def _adapter_tiles(stack, entry: int, block_size: int) -> LayerTiles:
    n, b = stack.n, block_size
    if n * n > ADAPTER_MAX_PAIRS:
        raise LayoutUnavailable(f"the built-in layout classifier evaluates every token pair; {n} tokens is too "
                                "many without patternc.compiler")
    nb = -(-n // b)
    full = np.zeros((nb, nb), dtype=bool)
    nonempty = np.zeros((nb, nb), dtype=bool)
    kv = np.arange(n, dtype=np.int64)
    pad = nb * b - n
    for qb in range(nb):
        q = np.arange(qb * b, min(n, (qb + 1) * b), dtype=np.int64)
        strip = stack.attend(entry, q[:, None], kv[None, :])
        strip = np.broadcast_to(strip, (len(q), n))
        any_ = np.pad(strip, ((0, 0), (0, pad)), constant_values=False).reshape(len(q), nb, b).any(axis=(0, 2))
        all_ = np.pad(strip, ((0, 0), (0, pad)), constant_values=True).reshape(len(q), nb, b).all(axis=(0, 2))
        full[qb] = all_
        nonempty[qb] = any_

    def mask(q_idx, kv_idx, _stack=stack, _entry=entry):
        return _stack.attend(_entry, q_idx, kv_idx)

    return LayerTiles(n, b, full, nonempty, mask, "adapter")


def dense_tiles(adj: np.ndarray, block_size: int) -> LayerTiles:
    """Tiles of an explicit square adjacency ``adj`` (bool [n, n], True = query row may
    attend key column), e.g. a block-level graph."""
    adj = np.asarray(adj, dtype=bool)
    lay = BlockLayout.from_dense(adj, block_size)
    kinds = lay.kinds[0]

    def mask(q_idx, kv_idx, _adj=adj):
        return _adj[q_idx, kv_idx]

    return LayerTiles(adj.shape[0], lay.q_block_size, kinds == FULL, kinds != EMPTY, mask, "dense")


__all__ = ["LayerTiles", "layer_tiles", "dense_tiles", "EMPTY", "PARTIAL", "FULL"]
