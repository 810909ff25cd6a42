"""``patternc.nn.SparseSelfAttention``: checked at construction, equal to dense masked
attention with the same weights, trains on CPU, keeps the mask out of state_dict and pickles."""

from __future__ import annotations

import copy
import io
import pickle

import pytest

torch = pytest.importorskip("torch")

import exec_support  # noqa: E402
import patternc  # noqa: E402
import patternc.nn as pnn  # noqa: E402
from patternc.execute.reference import reference_attention  # noqa: E402

pytestmark = pytest.mark.filterwarnings("ignore::patternc.PatternWarning")


@pytest.fixture(autouse=True)
def _compiler(monkeypatch):
    # the oracle stand-in until patternc.compile exists (then compile_pattern is the real one)
    monkeypatch.setattr(pnn, "_compile", exec_support.compile_pattern)


def test_bad_pattern_fails_at_construction():
    with pytest.raises(patternc.PatternError) as e:
        pnn.SparseSelfAttention(32, 4, "locl(w=8) & causal")
    assert e.value.code == "P201" and "did you mean `local`" in str(e.value)
    with pytest.raises(ValueError, match="multiple of num_heads"):
        pnn.SparseSelfAttention(30, 4, "causal")
    with pytest.raises(ValueError, match="backend"):
        pnn.SparseSelfAttention(32, 4, "causal", backend="fast")


def _dense_forward(m, x, src, layer=0):
    """The module's computation written out densely, with the oracle mask."""
    B, L, E = x.shape
    H, Dh = m.num_heads, m.head_dim

    def heads(t):
        return t.view(B, L, H, Dh).transpose(1, 2)

    q, k, v = heads(m.q_proj(x)), heads(m.k_proj(x)), heads(m.v_proj(x))
    mask = patternc.reference.dense_mask(src, q_len=L, num_heads=H, layer=layer, params=m.params or None)
    o = reference_attention(q, k, v, mask).to(x.dtype)
    return m.out_proj(o.transpose(1, 2).reshape(B, L, E))


@pytest.mark.parametrize("backend", ["auto", "blocksparse", "sdpa"])
def test_forward_equals_dense_masked_attention(backend):
    src = "layers(local(w=w) & causal, heads(strided(s=5) & causal, causal))"
    torch.manual_seed(0)
    m = pnn.SparseSelfAttention(32, 4, src, block_size=16, backend=backend, layer_idx=1, params={"w": 6})
    x = torch.randn(2, 45, 32)
    y = m(x)
    assert y.shape == (2, 45, 32)
    want = _dense_forward(m, x, src, layer=1)
    assert float((y - want).norm() / want.norm()) <= 1e-5
    assert m.last_backend == ("blocksparse" if backend == "auto" else backend)


def test_state_dict_pickle_and_deepcopy_keep_only_the_source():
    torch.manual_seed(0)
    m = pnn.SparseSelfAttention(16, 2, "local(w=4) & causal", block_size=8)
    x = torch.randn(1, 20, 16)
    m.eval()
    y = m(x)
    m(torch.randn(1, 33, 16))
    assert len(m._compiled) == 2  # cached per (length, device)
    assert m.compiled(20) is m.compiled(20, "cpu")
    names = set(m.state_dict())
    assert names == {f"{p}.{w}" for p in ("q_proj", "k_proj", "v_proj", "out_proj") for w in ("weight", "bias")}
    blob = pickle.dumps(m)
    assert b"BlockLayout" not in blob and b"numpy" not in blob
    for clone in (pickle.loads(blob), copy.deepcopy(m)):
        assert clone._compiled == {} and clone.source == "local(w=4) & causal"
        assert torch.equal(clone(x), y)
    buf = io.BytesIO()
    torch.save(m.state_dict(), buf)
    buf.seek(0)
    m2 = pnn.SparseSelfAttention(16, 2, "local(w=4) & causal", block_size=8)
    m2.load_state_dict(torch.load(buf, weights_only=True))
    m2.eval()
    assert torch.equal(m2(x), y)


def test_pattern_object_and_params():
    p = patternc.parse("local(w=3) & causal")
    m = pnn.SparseSelfAttention(8, 2, p, block_size=4)
    assert m.source == str(p)
    assert "local(w=3) & causal" in repr(m)


def test_tiny_model_trains_on_cpu():
    """Copy task under a local causal pattern: predict the token two places back. The loss
    falls within a few steps of Adam (blocksparse backward on CPU)."""
    torch.manual_seed(0)
    vocab, E, L = 11, 32, 40
    emb = torch.nn.Embedding(vocab, E)
    pos = torch.nn.Parameter(torch.randn(L, E) * 0.1)
    attn = pnn.SparseSelfAttention(E, 4, "local(w=4) & causal", block_size=16, dropout=0.1)
    head = torch.nn.Linear(E, vocab)
    params = list(emb.parameters()) + [pos] + list(attn.parameters()) + list(head.parameters())
    opt = torch.optim.Adam(params, lr=1e-2)
    losses = []
    for step in range(40):
        x = torch.randint(0, vocab, (8, L))
        target = torch.roll(x, 2, dims=1)
        h = emb(x) + pos
        logits = head(attn(h) + h)
        loss = torch.nn.functional.cross_entropy(logits[:, 2:].reshape(-1, vocab), target[:, 2:].reshape(-1))
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(float(loss))
    assert attn.last_backend == "blocksparse"
    assert all(torch.isfinite(torch.tensor(losses)))
    first, last = sum(losses[:5]) / 5, sum(losses[-5:]) / 5
    assert last < 0.7 * first, losses


def test_wrong_input_shape():
    m = pnn.SparseSelfAttention(8, 2, "causal", block_size=4)
    with pytest.raises(patternc.PatternError, match=r"expects x of shape \[B, L, 8\]"):
        m(torch.randn(2, 5, 6))
