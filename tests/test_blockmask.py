"""mask_mod and BlockMask against the oracle and FlexAttention's own ``create_block_mask``."""

from __future__ import annotations

import warnings

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

torch = pytest.importorskip("torch")
from torch.nn.attention.flex_attention import create_block_mask  # noqa: E402

import patternc  # noqa: E402
from patternc.reference import dense_mask  # noqa: E402
from strategies import layout_patterns as patterns  # noqa: E402

SOURCES = [
    "all", "causal", "local(w=7) & causal", "band(left=3, right=9)", "strided(s=5)", "dilated(w=3, d=4)",
    "chunk(l=10)", "fixed(l=16, c=4) & causal", "summary(l=10, c=3, g=1)", "sink(n=4) | local(w=16) & causal",
    "global(n=3)", "global(at=[0, 50, 129])", "prefix(n=20) | causal", "random(r=3, seed=1)",
    "heads(local(w=4), strided(s=3), causal - chunk(l=8))", "blocks(16, local(w=3))",
    "blocks(3, random(r=2) | global(at=[2])) & ~band(left=0, right=1)",
]


def compile_quiet(src, **kw):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return patternc.compile(src, **kw)


def oracle(src, **kw):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return dense_mask(src, **kw)


def rows_as_sets(num, idx):
    num, idx = num.numpy(), idx.numpy()
    return [[frozenset(idx[b, h, q, : num[b, h, q]].tolist()) for q in range(num.shape[2])]
            for b in range(num.shape[0]) for h in range(num.shape[1])]


def assert_same_block_mask(ours, ref):
    assert ours.BLOCK_SIZE == ref.BLOCK_SIZE
    assert tuple(ours.seq_lengths) == tuple(ref.seq_lengths)
    assert torch.equal(ours.kv_num_blocks, ref.kv_num_blocks)
    assert torch.equal(ours.full_kv_num_blocks, ref.full_kv_num_blocks)
    assert rows_as_sets(ours.kv_num_blocks, ours.kv_indices) == rows_as_sets(ref.kv_num_blocks, ref.kv_indices)
    assert rows_as_sets(ours.full_kv_num_blocks, ours.full_kv_indices) == \
        rows_as_sets(ref.full_kv_num_blocks, ref.full_kv_indices)
    # the transposed (q) lists that flex_attention's backward uses
    assert torch.equal(ours.q_num_blocks, ref.q_num_blocks)
    assert torch.equal(ours.full_q_num_blocks, ref.full_q_num_blocks)
    assert rows_as_sets(ours.q_num_blocks, ours.q_indices) == rows_as_sets(ref.q_num_blocks, ref.q_indices)
    assert rows_as_sets(ours.full_q_num_blocks, ours.full_q_indices) == \
        rows_as_sets(ref.full_q_num_blocks, ref.full_q_indices)
    for name in ("kv_num_blocks", "kv_indices", "full_kv_num_blocks", "full_kv_indices", "q_num_blocks",
                 "q_indices", "full_q_num_blocks", "full_q_indices"):
        a, b = getattr(ours, name), getattr(ref, name)
        assert (a.dtype, a.shape, a.device) == (b.dtype, b.shape, b.device), name


def mask_mod_dense(cp, h):
    q = torch.arange(cp.q_len)[:, None]
    kv = torch.arange(cp.kv_len)[None, :]
    return cp.mask_mod(0, torch.tensor(h), q, kv).numpy()


@pytest.mark.parametrize("src", SOURCES)
def test_block_mask_equals_create_block_mask(src):
    for q_len, kv_len, bs in [(1, 97, 16), (97, 97, 16), (130, 130, 64), (191, 232, (64, 128)), (232, 97, 128),
                              (130, 191, (16, 32)), (1000, 1000, 128), (1000, 232, 64)]:
        cp = compile_quiet(src, q_len=q_len, kv_len=kv_len, block_size=bs)
        H = cp.num_heads
        ref = create_block_mask(cp.mask_mod, 1, H, q_len, kv_len, device="cpu", BLOCK_SIZE=bs)
        ours = cp.block_mask()
        assert_same_block_mask(ours, ref)
        assert ours.mask_mod is cp.mask_mod


@pytest.mark.parametrize("src", SOURCES)
def test_mask_mod_on_broadcast_tensors_equals_oracle(src):
    cp = compile_quiet(src, q_len=130, kv_len=191, block_size=64)
    ref = oracle(src, q_len=130, kv_len=191, num_heads=cp.num_heads)
    for h in range(cp.num_heads):
        np.testing.assert_array_equal(mask_mod_dense(cp, h), ref[h])
    assert cp.mask_mod.__name__ == cp.source


def test_ragged_full_tiles_are_partial_in_the_block_mask():
    # SPEC §3: `all` at 130 tokens, BLOCK_SIZE 64: FULL in kinds, PARTIAL on the ragged edge
    cp = compile_quiet("all", q_len=130, block_size=64)
    assert (cp.layout.kinds == patternc.FULL).all()
    bm = cp.block_mask()
    assert bm.kv_num_blocks[0, 0].tolist() == [1, 1, 3]
    assert bm.full_kv_num_blocks[0, 0].tolist() == [2, 2, 0]


@settings(max_examples=80, deadline=None)
@given(p=patterns(max_leaves=5), q_len=st.sampled_from([1, 17, 97, 130]), kv_len=st.sampled_from([1, 33, 97, 130]),
       bs=st.sampled_from([16, 32, (16, 64)]))
def test_random_patterns_block_mask_and_mask_mod(p, q_len, kv_len, bs):
    cp = compile_quiet(p, q_len=q_len, kv_len=kv_len, block_size=bs)
    ref_dense = oracle(p, q_len=q_len, kv_len=kv_len, num_heads=cp.num_heads)
    for h in range(cp.num_heads):
        np.testing.assert_array_equal(mask_mod_dense(cp, h), ref_dense[h])
    ref = create_block_mask(cp.mask_mod, 1, cp.num_heads, q_len, kv_len, device="cpu", BLOCK_SIZE=bs)
    assert_same_block_mask(cp.block_mask(), ref)


def test_parameters_live_in_tensors():
    cp = compile_quiet("(local(w=5) | strided(s=64)) & causal", q_len=64)
    cells = []
    stack = [cp.mask_mod]
    while stack:
        f = stack.pop()
        for c in f.__closure__ or ():
            v = c.cell_contents
            if callable(v) and getattr(v, "__closure__", None):
                stack.append(v)
            elif isinstance(v, list):
                stack.extend(x for x in v if callable(x))
            cells.append(v)
    ints = sorted(int(v) for v in cells if isinstance(v, torch.Tensor) and v.dim() == 0)
    assert ints == [5, 64]
    assert not any(isinstance(v, int) and not isinstance(v, bool) and v in (5, 64) for v in cells)


def test_mask_mod_on_another_device_object_is_cached():
    cp = compile_quiet("local(w=3)", q_len=16)
    assert cp.mask_mod_on("cpu") is cp.mask_mod


def test_flex_attention_eager_uses_mask_mod():
    from torch.nn.attention.flex_attention import flex_attention

    cp = compile_quiet("heads(local(w=3) & causal, sink(n=2) | causal)", q_len=40, kv_len=40, block_size=16, num_heads=2)
    torch.manual_seed(0)
    q, k, v = (torch.randn(1, 2, 40, 8, dtype=torch.float64) for _ in range(3))
    out = flex_attention(q, k, v, block_mask=cp.block_mask())
    mask = torch.from_numpy(cp.dense_mask())[None]
    s = (q @ k.transpose(-1, -2)) / 8**0.5
    ref = torch.softmax(s.masked_fill(~mask, float("-inf")), dim=-1) @ v
    torch.testing.assert_close(out, ref)


@pytest.mark.slow
def test_changing_window_does_not_recompile():
    from torch._dynamo.utils import counters

    def run(mm, q, kv):
        return mm(0, torch.tensor(0), q, kv)

    compiled = torch.compile(run, fullgraph=True)
    torch._dynamo.reset()
    counters.clear()
    q = torch.arange(64)[:, None]
    kv = torch.arange(64)[None, :]
    for w in (4, 9, 33):
        cp = compile_quiet(f"local(w={w}) & causal", q_len=64, block_size=16)
        got = compiled(cp.mask_mod, q, kv).numpy()
        np.testing.assert_array_equal(got, oracle(f"local(w={w}) & causal", q_len=64)[0])
    assert counters["stats"]["unique_graphs"] == 1


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_block_mask_on_cuda_with_compiled_flex_attention():
    from torch.nn.attention.flex_attention import flex_attention

    src = "heads(local(w=64) & causal, strided(s=32) & causal | sink(n=4), blocks(64, random(r=2)) | causal)"
    cp = compile_quiet(src, q_len=1000, kv_len=1000, block_size=128)
    bm = cp.block_mask("cuda")
    assert bm.kv_num_blocks.device.type == "cuda"
    ref_bm = create_block_mask(cp.mask_mod_on("cuda"), 1, cp.num_heads, 1000, 1000, device="cuda", BLOCK_SIZE=128)
    assert_same_block_mask(bm.to("cpu"), ref_bm.to("cpu"))
    fa = torch.compile(flex_attention, fullgraph=True, dynamic=False)
    torch.manual_seed(0)
    q, k, v = (torch.randn(2, 3, 1000, 64, device="cuda", dtype=torch.float16) for _ in range(3))
    out = fa(q, k, v, block_mask=bm)
    mask = torch.from_numpy(cp.dense_mask()).to("cuda")[None]
    s = (q.double() @ k.double().transpose(-1, -2)) / 8
    ref = torch.softmax(s.masked_fill(~mask, float("-inf")), dim=-1) @ v.double()
    torch.testing.assert_close(out.double(), ref, atol=2e-2, rtol=2e-2)
