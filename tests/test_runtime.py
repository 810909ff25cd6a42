"""Run-time data (SPEC §1.7): key padding (and the batch axis it brings) on layouts,
BlockMasks and every attention backend. Expected values: the oracle mask ANDed with the
padding by hand, FlexAttention's ``create_block_mask``, and the float64 reference attention."""

from __future__ import annotations

import numpy as np
import pytest

import patternc
from patternc.errors import PatternError
from patternc.lower.layout import BlockLayout
from patternc.reference import dense_mask

torch = pytest.importorskip("torch")

from patternc.execute.reference import reference_attention  # noqa: E402


def _padding(B, K, seed=0):
    """bool [B, K]: left padding in row 0, right padding in row 1, holes elsewhere, and one
    row with no real key at all (it must give 0)."""
    rng = np.random.default_rng(seed)
    m = rng.random((B, K)) > 0.3
    m[0, :K // 3] = False
    m[0, K // 3:] = True
    if B > 1:
        m[1, :] = True
        m[1, K - 5:] = False
    if B > 2:
        m[2, :] = False
    return m


CASES = [
    ("(local(w=16) | sink(n=4)) & causal", 97, 97, 16),
    ("heads(strided(s=8) & causal, chunk(l=32))", 130, 130, (32, 16)),
    ("all", 40, 75, 16),
    ("local(w=5)", 64, 64, 16),
]


@pytest.mark.parametrize("src,Q,K,bs", CASES)
def test_layout_and_block_mask_with_key_padding(src, Q, K, bs):
    from torch.nn.attention.flex_attention import create_block_mask

    H, B = 2, 3
    kp = _padding(B, K)
    cp = patternc.compile(src, q_len=Q, kv_len=K, num_heads=H, block_size=bs)
    expected = dense_mask(src, q_len=Q, kv_len=K, num_heads=H)[None] & kp[:, None, None, :]
    lay = cp.layout_for(key_padding_mask=torch.from_numpy(kp))
    lay.check_invariants()
    assert lay.kinds.shape[:2] == (B, H) and lay.batch == B
    for b in range(B):
        assert np.array_equal(lay.kinds[b], BlockLayout.from_dense(expected[b], bs).kinds)
    mm = cp.mask_mod_for(key_padding_mask=kp)
    ref = create_block_mask(mm, B, H, Q, K, device="cpu", BLOCK_SIZE=bs)
    mine = cp.block_mask(key_padding_mask=kp)
    assert mine.kv_num_blocks.shape[0] == B
    assert torch.equal(mine.kv_num_blocks, ref.kv_num_blocks)
    assert torch.equal(mine.full_kv_num_blocks, ref.full_kv_num_blocks)
    for name in ("kv_indices", "full_kv_indices"):
        a, r = getattr(mine, name), getattr(ref, name)
        n = getattr(mine, "kv_num_blocks" if name == "kv_indices" else "full_kv_num_blocks")
        for idx in np.ndindex(*n.shape):
            c = int(n[idx])
            assert set(a[idx][:c].tolist()) == set(r[idx][:c].tolist())
    # the mask_mod itself reads b
    qi, ki = torch.arange(Q)[:, None], torch.arange(K)[None, :]
    for b in range(B):
        for h in range(H):
            got = np.broadcast_to(mm(torch.tensor(b), torch.tensor(h), qi, ki).numpy(), (Q, K))
            assert np.array_equal(got, expected[b, h])


@pytest.mark.parametrize("backend", ["blocksparse", "sdpa"])
def test_attention_with_key_padding_forward_and_backward(backend):
    src, Q, K, H, D = "(local(w=16) | sink(n=4)) & causal", 97, 97, 2, 8
    B = 3
    kp = _padding(B, K, seed=1)
    cp = patternc.compile(src, q_len=Q, kv_len=K, num_heads=H, block_size=16)
    g = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(B, H, n, D, generator=g, dtype=torch.float64, requires_grad=True) for n in (Q, K, K))
    out = cp.attention(q, k, v, key_padding_mask=torch.from_numpy(kp), backend=backend)
    mask = dense_mask(src, q_len=Q, kv_len=K, num_heads=H)[None] & kp[:, None, None, :]
    refs = [reference_attention(q[b:b + 1], k[b:b + 1], v[b:b + 1], mask[b]) for b in range(B)]
    ref = torch.cat(refs)
    torch.testing.assert_close(out, ref, rtol=1e-9, atol=1e-9)
    assert (out[2] == 0).all()  # row 2 has no real key at all: zeros
    gout = torch.randn_like(out)
    grads = torch.autograd.grad(out, (q, k, v), gout)
    rgrads = torch.autograd.grad(ref, (q, k, v), gout)
    for a, r in zip(grads, rgrads):
        assert torch.isfinite(a).all()
        torch.testing.assert_close(a, r, rtol=1e-8, atol=1e-8)


def test_flex_forward_with_key_padding():
    src, Q, K, H, D, B = "local(w=24) & causal", 130, 130, 2, 16, 2
    kp = _padding(B, K, seed=2)
    cp = patternc.compile(src, q_len=Q, kv_len=K, num_heads=H, block_size=32)
    g = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(B, H, n, D, generator=g) for n in (Q, K, K))
    with torch.no_grad():
        out = cp.attention(q, k, v, key_padding_mask=kp, backend="flex")
    mask = dense_mask(src, q_len=Q, kv_len=K, num_heads=H)[None] & kp[:, None, None, :]
    ref = torch.cat([reference_attention(q[b:b + 1], k[b:b + 1], v[b:b + 1], mask[b]) for b in range(B)])
    torch.testing.assert_close(out.double(), ref, rtol=2e-5, atol=2e-5)


def test_key_padding_with_offsets_decode():
    # a left-padded batch decoding at position 40: padding is over key columns
    src, H, D = "(local(w=8) | sink(n=2)) & causal", 2, 8
    kp = np.ones((2, 41), dtype=bool)
    kp[1, :10] = False
    cp = patternc.compile(src, q_len=1, kv_len=41, q_offset=40, num_heads=H, block_size=16)
    g = torch.Generator().manual_seed(3)
    q = torch.randn(2, H, 1, D, generator=g, dtype=torch.float64)
    k, v = (torch.randn(2, H, 41, D, generator=g, dtype=torch.float64) for _ in range(2))
    out = cp.attention(q, k, v, key_padding_mask=kp)
    mask = dense_mask(src, q_len=1, kv_len=41, q_offset=40, num_heads=H)[None] & kp[:, None, None, :]
    ref = torch.cat([reference_attention(q[b:b + 1], k[b:b + 1], v[b:b + 1], mask[b]) for b in range(2)])
    torch.testing.assert_close(out, ref, rtol=1e-9, atol=1e-9)


@pytest.mark.parametrize("bad,needle", [
    (np.ones((2, 10), dtype=bool), "expected [B, 12]"),
    (np.ones((2, 12), dtype=np.float32), "must be bool"),
    (np.full((2, 12), 2), "must be bool"),
])
def test_bad_key_padding_is_p362(bad, needle):
    cp = patternc.compile("causal", q_len=12)
    with pytest.raises(PatternError) as e:
        cp.layout_for(key_padding_mask=bad)
    assert e.value.diagnostic.code == "P362" and needle in str(e.value) and "help:" in str(e.value)


def test_key_padding_batch_must_match_q():
    cp = patternc.compile("causal", q_len=12, num_heads=1)
    q = torch.randn(3, 1, 12, 4)
    with pytest.raises(PatternError) as e:
        cp.attention(q, q, q, key_padding_mask=np.ones((2, 12), dtype=bool))
    assert e.value.diagnostic.code == "P362"


from hypothesis import given, settings  # noqa: E402
from hypothesis import strategies as st  # noqa: E402

from strategies import patterns  # noqa: E402


@settings(max_examples=40, deadline=None)
@given(patterns(max_leaves=4), st.sampled_from([(37, 37), (97, 64), (130, 130)]), st.sampled_from([16, (16, 32)]),
       st.integers(0, 2**31), st.sampled_from(["random", "left", "right", "none"]))
def test_key_padding_layouts_match_the_oracle(p, lengths, bs, seed, kind):
    from patternc.ir.normalize import normalize

    p = normalize(p)
    Q, K = lengths
    rng = np.random.default_rng(seed)
    B, H = 2, 2
    if kind == "random":
        kp = rng.random((B, K)) > 0.5
    else:
        n = rng.integers(0, K + 1, size=B)
        ar = np.arange(K)[None, :]
        kp = (ar >= n[:, None]) if kind == "left" else (ar < n[:, None]) if kind == "right" else np.ones((B, K), bool)
    cp = patternc.compile(p, q_len=Q, kv_len=K, num_heads=H, block_size=bs)
    want = dense_mask(p, q_len=Q, kv_len=K, num_heads=H)[None] & kp[:, None, None, :]
    lay = cp.layout_for(key_padding_mask=kp)
    for b in range(B):
        assert np.array_equal(lay.kinds[b], BlockLayout.from_dense(want[b], bs).kinds)
    assert np.array_equal(cp.dense_mask(key_padding_mask=kp), want)
