"""Test support for execution tests: a CompiledPattern built from the oracle alone.

``StandIn`` has the members of ``patternc.CompiledPattern`` that execution uses (it satisfies
the executor's ``patternc.execute.common.Compiled`` protocol), built
the slow, obvious way (``patternc.reference.dense_mask`` + ``BlockLayout.from_dense`` + a
``mask_mod`` that indexes the dense table). Running the backends on it checks execution
independently of the analytic compiler (its layouts and mask_mods).
"""

from __future__ import annotations

import patternc
from patternc.lower.layout import BlockLayout


class StandIn:
    def __init__(self, source, *, q_len, kv_len=None, num_heads=1, block_size=128, layer=0, params=None):
        import torch

        kv_len = q_len if kv_len is None else kv_len
        from patternc.ir.nodes import score_terms, strip_terms

        parsed = patternc.parse(source, params=params)
        self.pattern, self.score_terms = strip_terms(parsed), score_terms(parsed)
        self._dense = patternc.reference.dense_mask(self.pattern, q_len=q_len, kv_len=kv_len,
                                                    num_heads=num_heads, layer=layer)
        self.layout = BlockLayout.from_dense(self._dense, block_size)
        self.num_heads, self.q_len, self.kv_len = num_heads, q_len, kv_len
        self.is_causal_only = str(self.pattern) == "causal" and not self.score_terms
        self.density = float(self._dense.mean())
        self.block_density = self.layout.block_density
        table = torch.from_numpy(self._dense)
        self._tables = {}

        def mask_mod(b, h, q_idx, kv_idx):
            t = self._tables.get(q_idx.device)
            if t is None:
                t = self._tables[q_idx.device] = table.to(q_idx.device)
            return t[h % t.shape[0], q_idx, kv_idx]

        mask_mod.__name__ = str(self.pattern)
        self.mask_mod = mask_mod

    block_size = property(lambda self: self.layout.block_size)
    needs = frozenset()  # no run-time inputs

    def runtime_inputs(self, *, documents=None, key_padding_mask=None, batch=None):
        if documents is not None or key_padding_mask is not None:
            raise NotImplementedError("StandIn has no run-time data (documents / key_padding_mask)")
        return None, None

    def plan_for(self, mode="auto"):
        return None  # natural order: the oracle's layout as it is

    def mask_mod_on(self, device="cpu"):
        return self.mask_mod  # its table follows the indices' device

    def layout_at(self, block_size):
        return BlockLayout.from_dense(self._dense, block_size)  # the oracle's tiles at that size

    def dense_mask(self):
        return self._dense.copy()

    def block_mask(self, device="cpu"):
        from torch.nn.attention.flex_attention import create_block_mask

        table = __import__("torch").from_numpy(self._dense).to(device)
        n_heads = table.shape[0]

        def mm(b, h, q_idx, kv_idx):
            return table[h % n_heads, q_idx, kv_idx]

        return create_block_mask(mm, None, self.num_heads, self.q_len, self.kv_len, device=device,
                                 BLOCK_SIZE=self.layout.block_size)

    def attention(self, q, k, v, *, scale=None, backend="auto"):
        from patternc.execute import attention

        return attention(self, q, k, v, scale=scale, backend=backend)
