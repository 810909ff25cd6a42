"""The ``flex`` backend on CPU (compiled FlexAttention; compile-heavy, so few and slow-marked).

Outputs are compared with the float64 reference over the oracle's dense mask. All cases use
one tensor shape so the compiled kernel is reused where torch's guards allow.
"""

from __future__ import annotations

import pytest

torch = pytest.importorskip("torch")

import patternc  # noqa: E402
from exec_support import compile_pattern  # noqa: E402
from patternc.execute import attention  # noqa: E402
from patternc.execute.reference import reference_attention  # noqa: E402

pytestmark = [pytest.mark.slow, pytest.mark.filterwarnings("ignore::patternc.PatternWarning")]

Q, KV, H, H_KV, BS = 130, 97, 2, 1, 32  # ragged ends, Q_LEN != KV_LEN, grouped-query


def _qkv(dtype=torch.float32):
    g = torch.Generator().manual_seed(0)
    return (torch.randn(1, H, Q, 16, generator=g).to(dtype), torch.randn(1, H_KV, KV, 16, generator=g).to(dtype),
            torch.randn(1, H_KV, KV, 16, generator=g).to(dtype))


def _rel(out, ref):
    return float((out.double() - ref).norm() / ref.norm())


@pytest.mark.parametrize("src", [
    "heads((local(w=20) | strided(s=9)) & causal, fixed(32, 8))",
    "causal - local(w=4) | global(at=[70])",  # empty rows 0..3 (except head-free global column)
])
def test_flex_forward_matches_reference(src):
    cp = compile_pattern(src, q_len=Q, kv_len=KV, num_heads=H, block_size=BS)
    dense = patternc.reference.dense_mask(src, q_len=Q, kv_len=KV, num_heads=H)
    q, k, v = _qkv()
    with torch.no_grad():
        out = attention(cp, q, k, v, backend="flex")
    ref = reference_attention(q, k, v, dense)
    assert torch.isfinite(out).all()
    assert _rel(out, ref) <= 1e-5
    empty = torch.from_numpy(~dense.any(-1))
    assert (out[0][empty] == 0).all()
    # bfloat16 through the same kernel family
    qb, kb, vb = _qkv(torch.bfloat16)
    with torch.no_grad():
        outb = attention(cp, qb, kb, vb, backend="flex")
    assert outb.dtype == torch.bfloat16
    assert _rel(outb, reference_attention(qb, kb, vb, dense)) <= 2e-2
