"""Stage 5: the torch bridge — ``BlockLayout`` -> FlexAttention ``BlockMask``.

``to_block_mask`` builds the BlockMask straight from the tile kinds with
``BlockMask.from_kv_blocks`` (no mask evaluation): the result equals
``create_block_mask(mask_mod, 1, H, Q_LEN, KV_LEN, BLOCK_SIZE=...)`` in ``kv_num_blocks``,
the index sets of ``kv_indices``, ``full_kv_num_blocks`` and ``full_kv_indices``. The kinds
used are ``layout.to_flex_kinds()``: ``create_block_mask`` pads ragged last tiles with "not
allowed", so a FULL ragged tile is PARTIAL there (SPEC §3).

The ``mask_mod`` attached must be the pattern's: uncompiled ``flex_attention`` ignores the
block lists and applies only ``mask_mod``.
"""

from __future__ import annotations

import torch
from torch.nn.attention.flex_attention import BlockMask

from ..lower.layout import FULL, PARTIAL, BlockLayout, ordered_lists


def to_block_mask(layout: BlockLayout, mask_mod, device="cpu") -> BlockMask:
    """A FlexAttention ``BlockMask`` (batch 1, H = ``layout.num_heads``) for ``layout``; batch
    B for a layout with a batch axis (built with run-time data, SPEC §1.7).

    Args:
        layout: the BlockLayout (tile kinds [H, num_q_blocks, num_kv_blocks], or
            [B, H, num_q_blocks, num_kv_blocks]).
        mask_mod: the pattern's mask_mod (applied on PARTIAL blocks; must agree with the
            layout, since uncompiled flex_attention uses only it).
        device: device of the index tensors.

    Returns:
        BlockMask with ``kv_num_blocks`` int32 [B|1, H, num_q_blocks], ``kv_indices`` int32
        [B|1, H, num_q_blocks, num_kv_blocks] (PARTIAL blocks), ``full_kv_num_blocks`` /
        ``full_kv_indices`` (FULL blocks), ``BLOCK_SIZE`` = (Q_BLOCK_SIZE, KV_BLOCK_SIZE),
        ``seq_lengths`` = (Q_LEN, KV_LEN).
    """
    kinds = layout.to_flex_kinds()
    kv_num, kv_idx = ordered_lists(kinds == PARTIAL)
    full_num, full_idx = ordered_lists(kinds == FULL)

    batched = kinds.ndim == 4

    def t(x):
        x = torch.from_numpy(x).to(device)
        return x if batched else x[None]

    bm = BlockMask.from_kv_blocks(
        t(kv_num), t(kv_idx), t(full_num), t(full_idx),
        BLOCK_SIZE=layout.block_size, mask_mod=mask_mod, seq_lengths=(layout.q_len, layout.kv_len),
        compute_q_blocks=False,
    )
    # The transposed (q) lists that backward kernels read, from the kinds in numpy: torch's
    # own transpose (dense scatter + argsort) costs ~1 s at 1024 x 1024 tiles, this ~20 ms.
    kinds_t = kinds.swapaxes(-1, -2)
    q_num, q_idx = ordered_lists(kinds_t == PARTIAL)
    full_q_num, full_q_idx = ordered_lists(kinds_t == FULL)
    bm.q_num_blocks, bm.q_indices = t(q_num), t(q_idx)
    bm.full_q_num_blocks, bm.full_q_indices = t(full_q_num), t(full_q_idx)
    return bm
