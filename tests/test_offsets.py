"""Positions and offsets (SPEC §1.6): ``compile(…, q_offset=, kv_offset=, head_offset=)``.

The invariant: the rows and columns of a compile with offsets equal the corresponding rows and
columns of the compile over the whole position extents — for the oracle's masks, the layout's
tile contents, the mask_mod and the attention outputs. The expected values come from the
oracle ``patternc.reference.dense_mask`` *without* offsets, sliced.
"""

from __future__ import annotations

import math

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

import patternc
from patternc.compiler import block_offset_unit
from patternc.errors import PatternError
from patternc.ir.normalize import normalize
from patternc.lower.layout import BlockLayout
from patternc.reference import dense_mask
from strategies import patterns


def _offsets(draw, extent: int, unit: int) -> int:
    """An offset < extent that is a multiple of ``unit`` (0 when none fits)."""
    top = (extent - 1) // unit
    return unit * draw(st.integers(0, max(top, 0)))


@st.composite
def offset_cases(draw):
    p = normalize(draw(patterns(max_leaves=5)))
    q_ext = draw(st.sampled_from([1, 37, 97, 130, 191]))
    kv_ext = draw(st.sampled_from([q_ext, 1, 64, 130, 232]))
    unit = block_offset_unit(p)
    qo = _offsets(draw, q_ext, unit)
    ko = _offsets(draw, kv_ext, unit)
    bs = draw(st.sampled_from([16, 32, (16, 64)]))
    heads = draw(st.integers(1, 3))
    ho = draw(st.integers(0, 4))
    return p, q_ext, kv_ext, qo, ko, bs, heads, ho


@settings(max_examples=120, deadline=None)
@given(offset_cases())
def test_offset_compile_equals_rows_of_the_full_compile(case):
    p, q_ext, kv_ext, qo, ko, bs, H, ho = case
    Q, K = q_ext - qo, kv_ext - ko
    full = dense_mask(p, q_len=q_ext, kv_len=kv_ext, num_heads=ho + H)[ho:, qo:, ko:]
    # the oracle's own offsets, written from the SPEC, agree with slicing the full mask
    assert np.array_equal(dense_mask(p, q_len=Q, kv_len=K, num_heads=H, q_offset=qo, kv_offset=ko,
                                     head_offset=ho), full)
    cp = patternc.compile(p, q_len=Q, kv_len=K, num_heads=H, block_size=bs, q_offset=qo, kv_offset=ko,
                          head_offset=ho)
    cp.layout.check_invariants()
    assert (cp.layout.q_offset, cp.layout.kv_offset) == (qo, ko)
    assert np.array_equal(cp.layout.kinds, BlockLayout.from_dense(full, bs).kinds)
    assert np.array_equal(cp.dense_mask(), full)
    assert cp.allowed_pairs == int(full.sum())
    rows, cols = np.arange(Q)[:, None], np.arange(K)[None, :]
    for h in range(H):
        assert np.array_equal(cp.mask_numpy(h, rows, cols), full[h])


@settings(max_examples=25, deadline=None)
@given(offset_cases())
def test_offset_mask_mod_and_block_mask_equal_the_full_rows(case):
    torch = pytest.importorskip("torch")
    from torch.nn.attention.flex_attention import create_block_mask

    p, q_ext, kv_ext, qo, ko, bs, H, ho = case
    Q, K = q_ext - qo, kv_ext - ko
    full = dense_mask(p, q_len=q_ext, kv_len=kv_ext, num_heads=ho + H)[ho:, qo:, ko:]
    cp = patternc.compile(p, q_len=Q, kv_len=K, num_heads=H, block_size=bs, q_offset=qo, kv_offset=ko,
                          head_offset=ho)
    q_idx, kv_idx = torch.arange(Q)[:, None], torch.arange(K)[None, :]
    for h in range(H):
        got = cp.mask_mod(0, torch.tensor(h), q_idx, kv_idx)
        assert np.array_equal(np.broadcast_to(got.numpy(), (Q, K)), full[h])
    ref = create_block_mask(cp.mask_mod, 1, H, Q, K, device="cpu", BLOCK_SIZE=cp.block_size)
    mine = cp.block_mask()
    assert torch.equal(mine.kv_num_blocks, ref.kv_num_blocks)
    assert torch.equal(mine.full_kv_num_blocks, ref.full_kv_num_blocks)


@pytest.mark.parametrize("src", [
    "(local(w=16) | sink(n=4)) & causal",
    "heads(strided(s=8) & causal, local(w=5) & causal, (chunk(l=32) | global(n=3)) & causal)",
    "(random(r=4, seed=2) | summary(l=32, c=4)) & causal",
    "causal",
])
@pytest.mark.parametrize("backend", ["blocksparse", "sdpa"])
def test_decode_and_chunked_prefill_equal_rows_of_the_whole_attention(src, backend):
    # causal patterns: a query never reads keys past its position, so the keys a decode step
    # or a prefill chunk has (positions < t + n) are all it needs. The step sees the pattern of
    # the whole sequence it ends (length t + n: `random` draws from KV extents, §1.1, §1.6)
    torch = pytest.importorskip("torch")
    from patternc.execute.reference import reference_attention

    T, H, D = 150, 3, 8
    g = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(2, H, T, D, generator=g, dtype=torch.float64) for _ in range(3))
    for t, n in ((T - 1, 1), (100, 50), (64, 40), (0, 17)):  # decode; prefill chunks (bottom-right)
        L = t + n
        whole = reference_attention(q[:, :, :L], k[:, :, :L], v[:, :, :L], dense_mask(src, q_len=L, num_heads=H))
        cp = patternc.compile(src, q_len=n, kv_len=t + n, num_heads=H, block_size=32, q_offset=t)
        out = cp.attention(q[:, :, t:t + n], k[:, :, :t + n], v[:, :, :t + n], backend=backend)
        torch.testing.assert_close(out, whole[:, :, t:t + n], rtol=1e-9, atol=1e-9)


def test_rolling_window_cache_with_kv_offset():
    torch = pytest.importorskip("torch")
    from patternc.execute.reference import reference_attention

    src, w, T, H, D = "(local(w=24) | sink(n=4)) & causal", 24, 200, 2, 8
    g = torch.Generator().manual_seed(1)
    q, k, v = (torch.randn(1, H, T, D, generator=g, dtype=torch.float64) for _ in range(3))
    whole = reference_attention(q, k, v, dense_mask(src, q_len=T, num_heads=H))
    t = 150  # decode position t with a cache of the last w keys (kv_offset = t - w + 1) ...
    cp = patternc.compile("local(w=24) & causal", q_len=1, kv_len=w, q_offset=t, kv_offset=t - w + 1)
    assert cp.dense_mask().all()
    out = cp.attention(q[:, :, t:t + 1], k[:, :, t - w + 1:t + 1], v[:, :, t - w + 1:t + 1], backend="blocksparse")
    ref = reference_attention(q[:, :, t:t + 1], k, v, dense_mask("local(w=24) & causal", q_len=T)[:, t:t + 1])
    torch.testing.assert_close(out, ref, rtol=1e-9, atol=1e-9)
    # ... and the sinks too: keys 0..3 plus the window, as two column ranges of one compile each
    cp_all = patternc.compile(src, q_len=1, kv_len=t + 1, q_offset=t, num_heads=H)
    assert int(cp_all.dense_mask()[0].sum()) == w + 4
    out = cp_all.attention(q[:, :, t:t + 1], k[:, :, :t + 1], v[:, :, :t + 1])
    torch.testing.assert_close(out, whole[:, :, t:t + 1], rtol=1e-9, atol=1e-9)


def test_decode_step_sees_the_window_not_key_zero():
    # the report: a one-query decode step aligned at 0 saw only key 0
    cp = patternc.compile("local(w=128) & causal", q_len=1, kv_len=701, q_offset=700, block_size=64)
    m = cp.dense_mask()[0, 0]
    assert m.sum() == 128 and m[700 - 127:].all() and not m[:700 - 127].any()
    assert cp.layout.kinds.shape == (1, 1, 11)


def test_length_builtins_are_position_extents():
    src = "local(w=kv_len // 4) & causal"
    full = dense_mask(src, q_len=400)
    cp = patternc.compile(src, q_len=100, kv_len=400, q_offset=300, block_size=32)
    assert np.array_equal(cp.dense_mask()[0], full[0, 300:])


def test_random_draws_by_position():
    src = "random(r=3, seed=5)"
    full = dense_mask(src, q_len=90, kv_len=90)
    cp = patternc.compile(src, q_len=10, kv_len=90, q_offset=80, block_size=16)
    assert np.array_equal(cp.dense_mask()[0], full[0, 80:])


def test_head_offset_slices_a_heads_pattern():
    src = "heads(causal, local(w=3), strided(s=2))"
    whole = dense_mask(src, q_len=40, num_heads=40)
    cp = patternc.compile(src, q_len=40, num_heads=20, head_offset=20, block_size=16)
    assert np.array_equal(cp.dense_mask(), whole[20:])
    assert cp.head_offset == 20 and "head_offset=20" in repr(cp)


def test_blocks_offsets_must_be_whole_blocks():
    with pytest.raises(PatternError) as e:
        patternc.compile("blocks(16, local(w=2))", q_len=10, kv_len=40, q_offset=30)
    assert e.value.diagnostic.code == "P302" and "multiples of 16" in str(e.value)
    assert "help:" in str(e.value)
    with pytest.raises(PatternError) as e:
        patternc.compile("blocks(4, blocks(2, causal))", q_len=10, q_offset=4)
    assert "multiples of 8" in str(e.value)
    cp = patternc.compile("blocks(16, local(w=2))", q_len=10, kv_len=48, q_offset=32, block_size=8)
    assert np.array_equal(cp.dense_mask(), dense_mask("blocks(16, local(w=2))", q_len=48)[:, 32:42])
    assert block_offset_unit(patternc.parse("blocks(4, blocks(2, causal)) | blocks(6, local(w=2))")) == math.lcm(8, 6)


@pytest.mark.parametrize("kw", [{"q_offset": -1}, {"kv_offset": 1.5}, {"head_offset": -2}, {"q_offset": True}])
def test_bad_offsets_are_p302(kw):
    with pytest.raises(PatternError) as e:
        patternc.compile("causal", q_len=8, **kw)
    assert e.value.diagnostic.code == "P302"


def test_offsets_survive_save_and_load(tmp_path):
    cp = patternc.compile("heads(chunk(l=8), causal)", q_len=5, kv_len=30, q_offset=25, num_heads=2,
                          head_offset=1, block_size=8)
    cp.save(tmp_path / "c.npz")
    back = patternc.load_compiled(tmp_path / "c.npz")
    assert (back.q_offset, back.kv_offset, back.head_offset) == (25, 0, 1)
    assert np.array_equal(back.dense_mask(), cp.dense_mask())
    s = cp.summary()
    assert (s["q_offset"], s["kv_offset"], s["head_offset"]) == (25, 0, 1)


def test_causal_with_unequal_offsets_does_not_use_is_causal():
    cp = patternc.compile("causal", q_len=4, kv_len=10, q_offset=6)
    assert not cp.is_causal_only
    assert patternc.compile("causal", q_len=4, q_offset=6, kv_offset=6).is_causal_only


def _cli(capsys, *argv):
    from patternc.cli import main

    code = main(list(argv))
    out, err = capsys.readouterr()
    return code, out, err


def test_cli_compile_with_offsets(capsys):
    import json

    src = "(local(w=128) | sink(n=4)) & causal"
    code, out, _ = _cli(capsys, "compile", "-e", src, "--seq-len", "1", "--kv-len", "701", "--q-offset", "700",
                        "--block-size", "64", "--json")
    assert code == 0
    obj = json.loads(out)
    assert (obj["q_offset"], obj["kv_offset"]) == (700, 0)
    assert obj["density"] == pytest.approx(132 / 701)  # the window of position 700 plus the 4 sinks
    code, out, _ = _cli(capsys, "compile", "-e", src, "--seq-len", "1", "--kv-len", "701", "--q-offset", "700")
    assert code == 0 and "rows are positions 700..700" in out
    code, _, err = _cli(capsys, "compile", "-e", src, "--seq-len", "4", "--q-offset", "-1")
    assert code == 2 and "--q-offset must be >= 0" in err


def test_cli_show_and_run_with_offsets(capsys):
    import json

    code, out, _ = _cli(capsys, "show", "-e", "local(w=3) & causal", "--seq-len", "4", "--kv-len", "12",
                        "--q-offset", "8", "--json")
    assert code == 0
    code, out, _ = _cli(capsys, "run", "-e", "(local(w=32) | sink(n=4)) & causal", "--seq-len", "1", "--kv-len",
                        "300", "--q-offset", "299", "--heads", "2", "--head-dim", "8", "--check", "--repeats", "1",
                        "--no-dense", "--json")
    assert code == 0, out
    obj = json.loads(out)
    assert obj["ok"]


def test_auto_decode_reads_only_the_kept_keys():
    torch = pytest.importorskip("torch")
    from patternc.execute import attention, choose_backend
    from patternc.execute.reference import reference_attention
    from patternc.execute.sdpa import gathered_keys

    src, T, H = "(local(w=100) | sink(n=4)) & causal", 2000, 2
    cp = patternc.compile(src, q_len=1, kv_len=T, q_offset=T - 1, num_heads=H, block_size=64)
    g = torch.Generator().manual_seed(5)
    q = torch.randn(1, H, 1, 8, generator=g, dtype=torch.float64, requires_grad=True)
    k, v = (torch.randn(1, H, T, 8, generator=g, dtype=torch.float64, requires_grad=True) for _ in range(2))
    assert choose_backend(cp, q, k, v) == "sdpa"
    assert gathered_keys(cp.layout, "cpu").numel() <= 64 + 2 * 64 + 64  # the sink block and the window's blocks
    out, name = attention(cp, q, k, v, return_backend=True)
    ref = reference_attention(q, k, v, dense_mask(src, q_len=1, kv_len=T, q_offset=T - 1, num_heads=H))
    torch.testing.assert_close(out, ref, rtol=1e-10, atol=1e-10)
    go = torch.randn_like(out)
    for a, r in zip(torch.autograd.grad(out, (q, k, v), go), torch.autograd.grad(ref, (q, k, v), go)):
        torch.testing.assert_close(a, r, rtol=1e-9, atol=1e-9)
