"""Batch rows with equal run-time data share one kernel call (execute._run_batched) and one
layout build (CompiledPattern._document_kinds): results equal the float64 reference row by
row, forward and backward, whatever the grouping of the rows."""

from __future__ import annotations

import numpy as np
import pytest

import patternc
from patternc.execute import _rows_sharing_data
from patternc.lower.layout import BlockLayout
from patternc.reference import dense_mask

torch = pytest.importorskip("torch")


def test_rows_are_grouped_by_equal_documents_and_padding():
    docs = np.array([[0, 0, 1, 1], [0, 1, 1, 1], [0, 0, 1, 1]])
    assert _rows_sharing_data(3, None, docs) == [[0, 2], [1]]
    kp = np.array([[1, 1, 1, 1], [1, 1, 1, 1], [1, 1, 1, 0]], dtype=bool)
    assert _rows_sharing_data(3, kp, docs) == [[0], [1], [2]]
    assert _rows_sharing_data(3, kp, docs[:1]) == [[0, 1], [2]]  # one broadcast row of ids
    assert _rows_sharing_data(2, None, None) == [[0, 1]]


@pytest.mark.parametrize("src", ["document & (local(w=16) | sink(n=2)) & causal",
                                 "per_document(sink(n=3) | local(w=16)) & causal"])
def test_grouped_rows_forward_and_backward_equal_the_reference(src):
    from patternc.execute.reference import reference_attention

    Q, H, D = 96, 2, 8
    lens = [[40, 56], [10, 50, 36], [40, 56], [40, 56]]  # rows 0, 2, 3 share one call, row 1 its own
    kp = np.ones((4, Q), dtype=bool)
    kp[3, -5:] = False  # row 3: same documents, other padding: its own group
    cp = patternc.compile(src, q_len=Q, num_heads=H, block_size=32)
    g = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(4, H, Q, D, generator=g, dtype=torch.float64, requires_grad=True) for _ in range(3))
    out = cp.attention(q, k, v, documents=lens, key_padding_mask=torch.from_numpy(kp), backend="blocksparse")
    mask = dense_mask(src, q_len=Q, num_heads=H, documents=lens) & kp[:, None, None, :]
    ref = torch.cat([reference_attention(q[b:b + 1], k[b:b + 1], v[b:b + 1], mask[b]) for b in range(4)])
    torch.testing.assert_close(out, ref, rtol=1e-9, atol=1e-9)
    gout = torch.randn_like(out)
    for a, r in zip(torch.autograd.grad(out, (q, k, v), gout), torch.autograd.grad(ref, (q, k, v), gout)):
        torch.testing.assert_close(a, r, rtol=1e-8, atol=1e-8)
    lay = cp.layout_for(documents=lens, key_padding_mask=kp)  # rows built once per distinct packing
    for b in range(4):
        assert np.array_equal(lay.kinds[b], BlockLayout.from_dense(mask[b], 32).kinds)
