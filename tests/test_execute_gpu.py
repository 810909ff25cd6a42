"""Execution on CUDA: every backend, forward and backward, against the float64 reference.

Skipped cleanly without a CUDA device.
"""

from __future__ import annotations

import pytest

torch = pytest.importorskip("torch")

import patternc  # noqa: E402
from patternc.execute import attention, choose_backend  # noqa: E402
from patternc.execute.reference import reference_attention  # noqa: E402

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device"),
    pytest.mark.filterwarnings("ignore::patternc.PatternWarning"),
]

SRC = "heads((local(w=100) | strided(s=64)) & causal, fixed(128, 16) & causal, causal - local(w=8))"
Q, KV, H, H_KV = 1000, 1000, 4, 2


def _rel(a, b):
    return float((a.double() - b).norm() / b.norm())


@pytest.mark.parametrize("dtype,tol", [(torch.float32, 1e-5), (torch.bfloat16, 2e-2)])
@pytest.mark.parametrize("backend", ["auto", "flex", "blocksparse", "sdpa"])
def test_cuda_forward_backward(backend, dtype, tol):
    dev = torch.device("cuda")
    cp = patternc.compile(SRC, q_len=Q, kv_len=KV, num_heads=H, block_size=128)
    dense = patternc.reference.dense_mask(SRC, q_len=Q, kv_len=KV, num_heads=H)
    g = torch.Generator(device=dev).manual_seed(0)
    q = torch.randn(2, H, Q, 64, device=dev, generator=g).to(dtype).requires_grad_()
    k = torch.randn(2, H_KV, KV, 64, device=dev, generator=g).to(dtype).requires_grad_()
    v = torch.randn(2, H_KV, KV, 64, device=dev, generator=g).to(dtype).requires_grad_()
    if dtype == torch.float32:  # TF32 would cost precision below 1e-5
        torch.backends.cuda.matmul.allow_tf32 = False
    out, name = attention(cp, q, k, v, backend=backend, return_backend=True)
    if backend == "auto":
        assert name == choose_backend(cp, q, k, v) == "flex"
    ref = reference_attention(q, k, v, dense)
    assert _rel(out, ref) <= tol
    gout = torch.randn(ref.shape, device=dev, dtype=torch.float64, generator=g)
    got = torch.autograd.grad(out, (q, k, v), gout.to(dtype))
    want = torch.autograd.grad(ref, (q, k, v), gout)
    for a, b in zip(got, want):
        assert torch.isfinite(a).all()
        if dtype == torch.bfloat16:
            assert _rel(a, b) <= 5e-2
        else:
            assert _rel(a, b) <= (1e-5 if name == "blocksparse" else 1e-4)
    empty = torch.from_numpy(~dense.any(-1)).to(dev)
    assert (out[0][empty] == 0).all()


@pytest.mark.parametrize("backend", ["auto", "flex", "blocksparse"])
def test_cuda_batched_documents_and_key_padding(backend):
    """Run-time data on CUDA (SPEC §1.7): the batched BlockMask through compiled FlexAttention,
    forward and backward, equals the float64 reference per batch row."""
    import numpy as np

    from patternc.reference import dense_mask

    dev = torch.device("cuda")
    src, L, B = "document & (local(w=200) | sink(n=4)) & causal", 1000, 2
    lens = [[300, 500, 200], [1, 999]]
    kp = torch.ones(B, L, dtype=torch.bool)
    kp[1, :37] = False  # left padding in row 1
    cp = patternc.compile(src, q_len=L, num_heads=H, block_size=128)
    g = torch.Generator(device=dev).manual_seed(0)
    q, k, v = (torch.randn(B, H, L, 64, device=dev, generator=g).requires_grad_() for _ in range(3))
    torch.backends.cuda.matmul.allow_tf32 = False
    out, name = attention(cp, q, k, v, backend=backend, return_backend=True, documents=lens,
                          key_padding_mask=kp.to(dev))
    if backend == "auto":
        assert name == "flex"
    mask = dense_mask(src, q_len=L, num_heads=H, documents=lens) & kp.numpy()[:, None, None, :]
    ref = torch.cat([reference_attention(q[b:b + 1], k[b:b + 1], v[b:b + 1], torch.from_numpy(np.ascontiguousarray(mask[b])).to(dev))
                     for b in range(B)])
    assert _rel(out, ref) <= 1e-5
    go = torch.randn_like(out)
    for a, r in zip(torch.autograd.grad(out, (q, k, v), go), torch.autograd.grad(ref, (q, k, v), go.double())):
        assert torch.isfinite(a).all() and _rel(a, r) <= 1e-4
