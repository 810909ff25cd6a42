"""Per-layer tile views: the union over heads of a layer's block layout, plus a way to
evaluate the union mask on chosen tiles.

The token and block engines read a layer through ``LayerTiles``:

* ``full``: bool [num_q_blocks, num_kv_blocks], the tile is FULL in some head (every token
  pair of the tile is an edge);
* ``nonempty``: bool [num_q_blocks, num_kv_blocks], the tile is not EMPTY in some head;
* ``mask(q_idx, kv_idx)``: bool, broadcasting int64 token indices: some head allows the pair.

``layer_tiles`` builds them from ``patternc.compile`` (the compiler's ``BlockLayout`` and
``mask_numpy``). ``dense_tiles`` wraps an explicit dense adjacency (used by the block-level
engine, whose "tokens" are blocks).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import numpy as np

from ..lower.layout import EMPTY, FULL, PARTIAL, BlockLayout


@dataclass
class LayerTiles:
    """Union over heads of one layer's tiles (see the module docstring).

    Attributes:
        n: Q_LEN = KV_LEN, tokens.
        block_size: Q_BLOCK_SIZE = KV_BLOCK_SIZE, tokens.
        full: bool [nb, nb].
        nonempty: bool [nb, nb].
        mask: callable (q_idx, kv_idx) -> bool, broadcasting int64 arrays.
        source: where the layout came from (``compiler`` / ``dense``).
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


def layer_tiles(stack, entry: int, block_size: int) -> LayerTiles:
    """The tiles of layer entry ``entry`` of ``stack`` at ``block_size`` tokens per block,
    from ``patternc.compile`` (exact layout; PARTIAL tiles evaluated by ``mask_numpy``).

    Args:
        stack: a ``model.Stack``.
        entry: layer entry in ``0 .. stack.period - 1``.
        block_size: tokens per block (both sides).

    Raises:
        PatternError: the compiler's P3xx (e.g. too many tiles).
    """
    from ..compiler import compile as compile_pattern

    reps = [h for h, _ in stack.heads[entry]]
    cp = compile_pattern(stack.pattern, q_len=stack.n, kv_len=stack.n, num_heads=stack.num_heads,
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
