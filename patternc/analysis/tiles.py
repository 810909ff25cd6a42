"""Per-layer tile views: the union over heads of a layer's block layout, plus a way to
evaluate the union mask on chosen tiles.

The token and block engines read a layer through ``LayerTiles``:

* ``full``: bool [num_q_blocks, num_kv_blocks], the tile is FULL in some head (every token
  pair of the tile is an edge);
* ``nonempty``: bool [num_q_blocks, num_kv_blocks], the tile is not EMPTY in some head;
* ``mask(q_idx, kv_idx)``: bool, broadcasting int64 token indices: some head allows the pair.

``layer_tiles`` builds them from the lowering (``lower_to_layout`` and ``evaluate``) of the
stack's already specialised head patterns. ``dense_tiles`` wraps an explicit dense adjacency (used by the block-level
engine, whose "tokens" are blocks).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import numpy as np

from ..compiler import MAX_TILES
from ..errors import Diagnostic, PatternError
from ..ir.specialize import cdiv
from ..lower.layout import EMPTY, FULL, PARTIAL, BlockLayout
from ..lower.lowering import evaluate, lower_to_layout


@dataclass
class LayerTiles:
    """Union over heads of one layer's tiles (see the module docstring).

    Attributes:
        n: Q_LEN = KV_LEN, tokens.
        block_size: Q_BLOCK_SIZE = KV_BLOCK_SIZE, tokens.
        full: bool [nb, nb].
        nonempty: bool [nb, nb].
        mask: callable (q_idx, kv_idx) -> bool, broadcasting int64 arrays.
    """

    n: int
    block_size: int
    full: np.ndarray
    nonempty: np.ndarray
    mask: Callable

    @property
    def num_blocks(self) -> int:
        return int(self.full.shape[0])

    @property
    def partial(self) -> np.ndarray:
        """bool [nb, nb]: non-empty tiles that are FULL in no head (need the mask)."""
        return self.nonempty & ~self.full


def layer_tiles(stack, entry: int, block_size: int) -> LayerTiles:
    """The tiles of layer entry ``entry`` of ``stack`` at ``block_size`` tokens per block,
    from the lowering (``lower_to_layout`` of each distinct head pattern: the exact layout;
    PARTIAL tiles evaluated by the numpy predicate ``lower.evaluate``). The stack's patterns
    are already specialised, so nothing is parsed, normalised or compiled twice.

    Args:
        stack: a ``model.Stack``.
        entry: layer entry in ``0 .. stack.period - 1``.
        block_size: tokens per block (both sides).

    Raises:
        PatternError: P303 when a layer would have more tiles than ``compile`` accepts.
    """
    n = stack.n
    heads = [hp for _h, hp in stack.heads[entry]]
    nb = cdiv(n, block_size)
    if len(heads) * nb * nb > MAX_TILES:
        raise PatternError(Diagnostic(
            "P303", f"the layout would have {len(heads)} x {nb} x {nb} = {len(heads) * nb * nb:,} tiles "
            f"(limit {MAX_TILES:,})", None, f"use a larger block_size (e.g. {block_size * 4}) or a shorter seq_len"))
    kinds = np.stack([lower_to_layout(hp, n, n, block_size, 1).kinds[0] for hp in heads])
    full = (kinds == FULL).any(axis=0)
    nonempty = (kinds != EMPTY).any(axis=0)

    def mask(q_idx, kv_idx, _heads=heads):
        q_idx, kv_idx = np.asarray(q_idx, dtype=np.int64), np.asarray(kv_idx, dtype=np.int64)
        shape = np.broadcast_shapes(q_idx.shape, kv_idx.shape)
        out = np.zeros(shape, dtype=bool)
        for hp in _heads:
            out |= np.broadcast_to(evaluate(hp, q_idx, kv_idx, n, n), shape)
        return out

    return LayerTiles(n, block_size, full, nonempty, mask)


def dense_tiles(adj: np.ndarray, block_size: int) -> LayerTiles:
    """Tiles of an explicit square adjacency ``adj`` (bool [n, n], True = query row may
    attend key column), e.g. a block-level graph."""
    adj = np.asarray(adj, dtype=bool)
    lay = BlockLayout.from_dense(adj, block_size)
    kinds = lay.kinds[0]

    def mask(q_idx, kv_idx, _adj=adj):
        return _adj[q_idx, kv_idx]

    return LayerTiles(adj.shape[0], lay.q_block_size, kinds == FULL, kinds != EMPTY, mask)


__all__ = ["LayerTiles", "layer_tiles", "dense_tiles", "EMPTY", "PARTIAL", "FULL"]
