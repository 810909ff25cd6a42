"""Generation with ``patternc.nn.KVCache`` (SPEC §1.6, §2): a stack of ``SparseSelfAttention``
layers fed token by token (decode) or chunk by chunk (chunked prefill) gives the outputs of the
full-sequence forward; a rolling window cache keeps O(w) keys with ``kv_offset``."""

from __future__ import annotations

import pytest

torch = pytest.importorskip("torch")

from patternc.errors import PatternError  # noqa: E402
from patternc.nn import KVCache, SparseSelfAttention  # noqa: E402


class Stack(torch.nn.Module):
    """Two pre-norm-free residual attention layers (the attention is what is under test)."""

    def __init__(self, pattern, E=16, H=2, layers=2, block_size=32):
        super().__init__()
        self.layers = torch.nn.ModuleList(
            SparseSelfAttention(E, H, pattern, block_size=block_size, layer_idx=i) for i in range(layers))

    def forward(self, x, **kw):
        for layer in self.layers:
            x = x + layer(x, **kw)
        return x


def _stack(pattern, seed=0, **kw):
    torch.manual_seed(seed)
    return Stack(pattern, **kw).double().eval()


@pytest.mark.parametrize("pattern, T", [
    ("(local(w=24) | sink(n=4)) & causal", 256),
    ("layers(local(w=16) & causal, (strided(s=8) | local(w=3)) & causal)", 64),
])
def test_token_by_token_generation_equals_the_full_forward(pattern, T):
    model = _stack(pattern)
    x = torch.randn(2, T, 16, dtype=torch.float64, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        full = model(x)
        cache = KVCache()
        steps = [model(x[:, t:t + 1], kv_cache=cache) for t in range(T)]
    torch.testing.assert_close(torch.cat(steps, dim=1), full, rtol=1e-10, atol=1e-10)
    assert cache.seen(model.layers[0]) == T


def test_chunked_prefill_then_decode_equals_the_full_forward():
    T = 120
    model = _stack("(local(w=40) | global(n=2)) & causal")
    x = torch.randn(1, T, 16, dtype=torch.float64, generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        full = model(x)
        cache = KVCache()
        parts = [model(x[:, a:a + 37], kv_cache=cache) for a in range(0, 111, 37)]
        parts += [model(x[:, t:t + 1], kv_cache=cache) for t in range(111, T)]
    torch.testing.assert_close(torch.cat(parts, dim=1), full, rtol=1e-10, atol=1e-10)


def test_rolling_window_cache_keeps_w_keys_and_matches():
    T, w = 80, 24
    model = _stack("local(w=24) & causal")
    x = torch.randn(1, T, 16, dtype=torch.float64, generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        full = model(x)
        cache = KVCache(window=w)
        steps = [model(x[:, t:t + 1], kv_cache=cache) for t in range(T)]
    torch.testing.assert_close(torch.cat(steps, dim=1), full, rtol=1e-10, atol=1e-10)
    slot = cache.slot(model.layers[1])
    assert slot.k.shape[2] == w and slot.kv_offset == T - w


def test_rolling_window_too_small_for_the_pattern_is_an_error():
    model = _stack("(local(w=24) | sink(n=4)) & causal", layers=1)
    x = torch.randn(1, 40, 16, dtype=torch.float64)
    cache = KVCache(window=24)
    with torch.no_grad(), pytest.raises(PatternError) as e:
        for t in range(40):
            model(x[:, t:t + 1], kv_cache=cache)
    assert e.value.diagnostic.code == "P354" and "window" in str(e.value)


def test_key_padding_and_documents_reach_attention():
    from patternc.execute.reference import reference_attention
    from patternc.reference import dense_mask

    src = "document & causal"
    layer = SparseSelfAttention(8, 2, src, block_size=16).double().eval()
    x = torch.randn(2, 40, 8, dtype=torch.float64)
    kp = torch.ones(2, 40, dtype=torch.bool)
    kp[1, 30:] = False
    lens = [[10, 30], [25, 15]]
    with torch.no_grad():
        y = layer(x, documents=lens, key_padding_mask=kp)
        q, k, v = layer.qkv(x)
        mask = dense_mask(src, q_len=40, num_heads=2, documents=lens) & kp.numpy()[:, None, None, :]
        ref = torch.cat([reference_attention(q[b:b + 1], k[b:b + 1], v[b:b + 1], mask[b]) for b in range(2)])
        want = layer.out_proj(ref.transpose(1, 2).reshape(2, 40, 8))
    torch.testing.assert_close(y, want, rtol=1e-10, atol=1e-10)
    with pytest.raises(PatternError) as e:
        layer(x)
    assert e.value.diagnostic.code == "P360"


def test_left_padded_batch_decodes_with_an_hf_style_mask():
    # row 1 is left-padded by 5 tokens; HF passes attention_mask over the whole sequence so far
    model = _stack("local(w=16) & causal", layers=1)
    T = 30
    x = torch.randn(2, T, 16, dtype=torch.float64, generator=torch.Generator().manual_seed(4))
    am = torch.ones(2, T, dtype=torch.bool)
    am[1, :5] = False
    with torch.no_grad():
        full = model(x, key_padding_mask=am)
        cache = KVCache()
        steps = [model(x[:, t:t + 1], kv_cache=cache, key_padding_mask=am[:, :t + 1]) for t in range(T)]
    got = torch.cat(steps, dim=1)
    torch.testing.assert_close(got[:, :], full, rtol=1e-10, atol=1e-10)


def test_a_kv_cache_with_random_warns_once_and_really_differs():
    import warnings

    from patternc.errors import PatternWarning

    torch.manual_seed(0)
    layer = SparseSelfAttention(16, 2, "(local(w=4) | random(r=3)) & causal", block_size=8)
    layer.eval()
    x = torch.randn(1, 24, 16)
    with torch.no_grad():
        full = layer(x)
        cache = KVCache()
        with warnings.catch_warnings(record=True) as got:
            warnings.simplefilter("always")
            steps = [layer(x[:, t:t + 1], kv_cache=cache) for t in range(24)]
    codes = [w.message.diagnostic.code for w in got if isinstance(w.message, PatternWarning)]
    assert codes.count("W008") == 1
    # the warning is true: cached steps are not the full forward's rows
    assert float((torch.cat(steps, 1) - full).abs().max()) > 1e-3
