"""The ``flex`` backend on CPU (compiled FlexAttention; compile-heavy, so few and slow-marked).

Outputs are compared with the float64 reference over the oracle's dense mask. All cases use
one tensor shape so the compiled kernel is reused where torch's guards allow.
"""

from __future__ import annotations

import pytest

torch = pytest.importorskip("torch")

import patternc  # noqa: E402
from patternc.execute import attention  # noqa: E402
from patternc.execute.reference import reference_attention  # noqa: E402

pytestmark = [pytest.mark.slow, pytest.mark.filterwarnings("ignore::patternc.PatternWarning"),
              pytest.mark.filterwarnings("ignore::DeprecationWarning")]  # torch.jit inside inductor

Q, KV, H, H_KV, BS = 130, 97, 2, 1, 32  # ragged ends, Q_LEN != KV_LEN, grouped-query


def _qkv(dtype=torch.float32):
    g = torch.Generator().manual_seed(0)
    return (torch.randn(1, H, Q, 16, generator=g).to(dtype), torch.randn(1, H_KV, KV, 16, generator=g).to(dtype),
            torch.randn(1, H_KV, KV, 16, generator=g).to(dtype))


def _rel(out, ref):
    return float((out.double() - ref).norm() / ref.norm())


def test_flex_forward_matches_reference():
    # per-head patterns; head 1 has empty rows (0..3 attend nothing)
    src = "heads(((local(w=20) | strided(s=9)) & causal) | fixed(32, 8), (causal - local(w=4)) | (global(at=[70]) & causal))"
    cp = patternc.compile(src, q_len=Q, kv_len=KV, num_heads=H, block_size=BS)
    dense = patternc.reference.dense_mask(src, q_len=Q, kv_len=KV, num_heads=H)
    q, k, v = _qkv()
    with torch.no_grad():
        out = attention(cp, q, k, v, backend="flex")
    ref = reference_attention(q, k, v, dense)
    assert torch.isfinite(out).all()
    assert _rel(out, ref) <= 1e-5
    empty = torch.from_numpy(~dense.any(-1))
    assert empty.any() and (out[0][empty] == 0).all()
    # bfloat16 through the same kernel family, with inputs that require grad: the P352 advice
    # for them ("wrap the call in torch.no_grad()") must work (issue 9 item 10)
    qb, kb, vb = (x.requires_grad_() for x in _qkv(torch.bfloat16))
    with torch.no_grad():
        outb = attention(cp, qb, kb, vb, backend="flex")
    assert outb.dtype == torch.bfloat16
    assert _rel(outb, reference_attention(qb.detach(), kb.detach(), vb.detach(), dense)) <= 2e-2
    # torch.autocast: float32 inputs run as bfloat16 (the same compiled kernel), issue 9 item 2
    with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):
        outa = attention(cp, q, k, v, backend="flex")
    assert outa.dtype == torch.bfloat16
    assert _rel(outa, reference_attention(*(x.to(torch.bfloat16) for x in (q, k, v)), dense)) <= 2e-2
