"""FlexAttention past torch's recompile limit: still exact (eager fallback), never a crash."""

import warnings

import pytest
import torch

import patternc


@pytest.mark.slow
def test_flex_keeps_working_past_the_recompile_limit(monkeypatch):
    import patternc.execute.flex as flex

    cp = patternc.compile("local(w=8) & causal", q_len=32, block_size=16)
    x = torch.randn(1, 2, 32, 16)
    cp.attention(x, x, x, backend="flex")  # first compile (raises torch's limit to ours)
    cfg = torch._dynamo.config
    name = "recompile_limit" if hasattr(cfg, "recompile_limit") else "cache_size_limit"
    assert getattr(cfg, name) >= flex.RECOMPILE_LIMIT
    # torch's config module is restored by hand: monkeypatch's undo leaves the name unset
    # there, and every later torch.compile in the process then fails.
    old = getattr(cfg, name)
    setattr(cfg, name, 1)  # now every new shape is past the limit
    monkeypatch.setattr(flex, "_warned_eager", False)
    torch.manual_seed(0)
    try:
        with warnings.catch_warnings(record=True) as rec:
            warnings.simplefilter("always")
            for L in (40, 48, 56):
                cp = patternc.compile("local(w=8) & causal", q_len=L, block_size=16)
                q, k, v = (torch.randn(1, 2, L, 16) for _ in range(3))
                out = cp.attention(q, k, v, backend="flex")
                ref = cp.attention(q.double(), k.double(), v.double(), backend="sdpa")
                assert float((out.double() - ref).abs().max()) < 1e-5
    finally:
        setattr(cfg, name, old)
    assert any("uncompiled" in str(w.message) for w in rec)


def test_flex_on_cpu_refuses_blocks_below_16():
    """torch 2.13's compiled CPU flex kernel gave outputs 1-2 off at BLOCK_SIZE 8 (head dim 8 or
    16; uncompiled flex_attention with the same BlockMask was right): refused before compiling."""
    import patternc
    from patternc.execute import FLEX_CPU_MIN_BLOCK, attention

    assert FLEX_CPU_MIN_BLOCK == 16
    cp = patternc.compile("causal", q_len=30, num_heads=2, block_size=8)
    q = torch.randn(1, 2, 30, 8)
    with torch.no_grad(), pytest.raises(patternc.PatternError, match="P352.*BLOCK_SIZE >= 16"):
        attention(cp, q, q, q, backend="flex")
    # the block-sparse kernel takes it
    ref = torch.nn.functional.scaled_dot_product_attention(q, q, q, is_causal=True)
    torch.testing.assert_close(attention(cp, q, q, q, backend="blocksparse"), ref, atol=1e-5, rtol=1e-5)
