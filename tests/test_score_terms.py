"""Score terms (SPEC §1.8): `with softcap(c)` / `with alibi(max_bias=8)`.

* the language: canonical text and order, round trip (Hypothesis), params, fmt, check/compile;
* the predicate ignores them: oracle masks, layouts, mask_mods, reachability, properties;
* ALiBi slopes against the published recipe (written here independently) and HF BLOOM;
* every backend, forward and backward, against the float64 reference at ragged lengths,
  including large logits (|s| ~ 100 before the cap).
"""

from __future__ import annotations

import json
import math
import warnings

import numpy as np
import pytest
import torch
from hypothesis import given, settings

import patternc
from patternc.execute.reference import reference_attention
from patternc.ir.nodes import Scored, Term, score_terms, strip_terms
from patternc.ir.normalize import normal_form_problems, normalize
from patternc.ir.terms import alibi_slopes
from strategies import scored_patterns

SOFTCAP_ALIBI = "local(w=37) & causal with softcap(c=5), alibi()"


def _quiet_parse(src, **kw):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return patternc.parse(src, **kw)


# ---- language -----------------------------------------------------------------------------------


@pytest.mark.parametrize("source, canonical", [
    ("(local(w=4096) & causal) with softcap(c=50)", "local(w=4096) & causal with softcap(c=50)"),
    ("causal with alibi", "causal with alibi()"),
    ("causal with alibi(max_bias=8)", "causal with alibi()"),
    ("causal with alibi(4)", "causal with alibi(max_bias=4)"),
    # applied (and printed) in SPEC order whatever the source order
    ("local(w=3) | causal with alibi(), softcap(c=30)", "local(w=3) | causal with softcap(c=30), alibi()"),
    ("param c = 50\nlayers(local(w=8) & causal, causal)\n  with softcap(c)",
     "layers(local(w=8), all) & causal with softcap(c=50)"),
])
def test_canonical_text_and_round_trip(source, canonical):
    p = _quiet_parse(source)
    assert str(p) == canonical
    assert _quiet_parse(str(p)) == p
    assert isinstance(p, Scored) and strip_terms(p) == _quiet_parse(canonical.split(" with ")[0])


def test_terms_take_params_and_set():
    src = "param c = 50\nlocal(w=4) & causal with softcap(c)"
    assert str(_quiet_parse(src, params={"c": 30})) == "local(w=4) & causal with softcap(c=30)"


def test_terms_do_not_change_equality_of_the_predicate():
    a, b = _quiet_parse("causal with softcap(c=50)"), _quiet_parse("causal with softcap(c=30)")
    assert a != b and strip_terms(a) == strip_terms(b) == patternc.parse("causal")
    assert score_terms(patternc.parse("causal")) == ()
    assert score_terms(a) == (Term("softcap", (("c", 50),)),)


@settings(max_examples=80)
@given(scored_patterns())
def test_round_trip_with_terms(p):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        q = normalize(p)
        assert score_terms(q) == p.terms
        assert patternc.parse(str(p)) == q
        assert patternc.parse(str(q)) == q
        assert normal_form_problems(q) == []


def test_fmt_keeps_comments_and_terms():
    from patternc.lang.formatter import format_source

    src = "# Gemma 2\nparam c=50\nlayers(local(w=4096)&causal, causal)   # interleave\n   with softcap(c=c),alibi  # terms\n"
    out = format_source(src)
    assert "# Gemma 2" in out and "# interleave" in out and "# terms" in out
    assert "with softcap(c=c), alibi()" in out
    assert format_source(out) == out
    assert _quiet_parse(out) == _quiet_parse(src)


@pytest.mark.parametrize("source, code", [
    ("softcap(c=50) & causal", "P217"),
    ("let a = alibi\ncausal & a", "P217"),
    ("causal with local(w=4)", "P218"),
    ("def f() = causal\ncausal with f()", "P218"),
    ("causal with softcap(c=5), alibi(), softcap(c=6)", "P219"),
    ("causal with sofcap(c=5)", "P201"),
    ("causal with softcap", "P203"),
    ("causal with softcap(c=0)", "P208"),
    ("causal with alibi(max_bias=0)", "P208"),
    ("causal with softcap(cap=3)", "P202"),
    ("causal with softcap(c=q_len)", "P207"),
    ("causal with softcap(c=causal)", "P207"),
    ("let softcap = causal\nsoftcap", "P211"),
    ("let x = causal with alibi\nx", "P113"),
    ("causal with", "P103"),
])
def test_bad_terms_are_diagnostics(source, code):
    with pytest.raises(patternc.PatternError) as e:
        patternc.parse(source)
    assert e.value.diagnostic.code == code, str(e.value)
    assert "help:" in str(e.value)


# ---- the predicate ignores terms ---------------------------------------------------------------------


@pytest.mark.parametrize("base", [
    "local(w=37) & causal", "(local(w=20) | sink(n=3)) & causal", "heads(chunk(l=17), strided(s=5) & causal)",
    "layers(local(w=9) & causal, all) - global(n=2)",
])
def test_masks_layouts_and_reachability_ignore_terms(base):
    scored = f"{base} with softcap(c=7), alibi(max_bias=3)"
    for layer in (0, 1):
        np.testing.assert_array_equal(
            patternc.reference.dense_mask(scored, q_len=97, kv_len=130, num_heads=2, layer=layer),
            patternc.reference.dense_mask(base, q_len=97, kv_len=130, num_heads=2, layer=layer))
        a = patternc.compile(scored, q_len=97, kv_len=130, num_heads=2, block_size=16, layer=layer)
        b = patternc.compile(base, q_len=97, kv_len=130, num_heads=2, block_size=16, layer=layer)
        np.testing.assert_array_equal(a.layout.kinds, b.layout.kinds)
        np.testing.assert_array_equal(a.dense_mask(), b.dense_mask())
        assert a.pattern == b.pattern and a.density == b.density
        assert a.score_terms == score_terms(_quiet_parse(scored)) and b.score_terms == ()
        q, kv = torch.arange(97)[:, None], torch.arange(130)[None, :]
        for h in range(2):
            assert torch.equal(a.mask_mod(0, torch.tensor(h), q, kv), b.mask_mod(0, torch.tensor(h), q, kv))
    ra = patternc.analyze(scored, seq_len=64, num_heads=2)
    rb = patternc.analyze(base, seq_len=64, num_heads=2)
    assert (ra.min_layers, ra.reachable, ra.mode) == (rb.min_layers, rb.reachable, rb.mode)
    from patternc.source.properties import properties

    assert properties(_quiet_parse(scored)) == properties(_quiet_parse(base))


def test_compiled_artifact_keeps_terms(tmp_path):
    cp = patternc.compile(SOFTCAP_ALIBI, q_len=97, num_heads=3, block_size=16)
    assert cp.source == "local(w=37) & causal with softcap(c=5), alibi()"
    cp.save(tmp_path / "x.npz")
    back = patternc.load_compiled(tmp_path / "x.npz")
    assert back.score_terms == cp.score_terms and back.source == cp.source
    s = cp.summary()
    assert s["canonical"] == cp.source
    assert [t["text"] for t in s["score_terms"]] == ["softcap(c=5)", "alibi()"]
    assert s["score_terms"][1]["slopes"] == pytest.approx([2 ** -4, 2 ** -8, 2 ** -2])


# ---- ALiBi slopes ----------------------------------------------------------------------------------


def _published_get_slopes(n):
    """``get_slopes`` of ofirpress/attention_with_linear_biases (fairseq/models/transformer.py),
    transcribed: max_bias 8, power-of-two heads closed form, other counts interleaved."""
    def get_slopes_power_of_2(n):
        start = 2 ** (-2 ** -(math.log2(n) - 3))
        ratio = start
        return [start * ratio ** i for i in range(n)]

    if math.log2(n).is_integer():
        return get_slopes_power_of_2(n)
    closest_power_of_2 = 2 ** math.floor(math.log2(n))
    return (get_slopes_power_of_2(closest_power_of_2)
            + _published_get_slopes(2 * closest_power_of_2)[0::2][: n - closest_power_of_2])


@pytest.mark.parametrize("H", range(1, 13))
def test_alibi_slopes_match_the_published_recipe(H):
    assert alibi_slopes(H) == pytest.approx(_published_get_slopes(H), rel=1e-12)


def test_alibi_slopes_max_bias_and_spec_formula():
    for H in (1, 2, 4, 8, 16):
        for b in (1, 4, 8, 12):
            assert alibi_slopes(H, b) == pytest.approx([2 ** (-b * (h + 1) / H) for h in range(H)], rel=1e-12)
    with pytest.raises(ValueError):
        alibi_slopes(0)


@pytest.mark.parametrize("H", [1, 3, 6, 8, 12])
def test_alibi_slopes_match_hf_bloom(H):
    bloom = pytest.importorskip("transformers.models.bloom.modeling_bloom")
    L = 5
    mask = torch.ones(1, L)
    alibi = bloom.build_alibi_tensor(mask, H, torch.float64)  # [H, 1, L]: slope_h * position
    slopes = (alibi[:, 0, 1] - alibi[:, 0, 0]).tolist()
    assert alibi_slopes(H) == pytest.approx(slopes, rel=1e-6)


# ---- numerics: every backend against the float64 reference -----------------------------------------


def _inputs(B, H, H_kv, N, M, D, dtype, logit_scale=1.0, seed=0):
    g = torch.Generator().manual_seed(seed)
    q = torch.randn(B, H, N, D, generator=g, dtype=torch.float64) * logit_scale
    k = torch.randn(B, H_kv, M, D, generator=g, dtype=torch.float64)
    v = torch.randn(B, H_kv, M, D, generator=g, dtype=torch.float64)
    return q.to(dtype), k.to(dtype), v.to(dtype)


def _reference(cp, q, k, v, scale=None):
    mask = patternc.reference.dense_mask(cp.source, q_len=cp.q_len, kv_len=cp.kv_len, num_heads=q.shape[1])
    return reference_attention(q.double(), k.double(), v.double(), mask, score_terms=cp.score_terms, scale=scale)


def _rel(a, b):
    a, b = a.detach().double(), b.detach().double()
    return float((a - b).norm() / b.norm())


CASES = [
    # (source, N, M, H, H_kv, block_size)
    (SOFTCAP_ALIBI, 97, 97, 3, 3, 16),
    ("(local(w=20) | sink(n=3)) & causal with alibi(max_bias=4)", 130, 97, 4, 2, 32),
    ("heads(chunk(l=17), strided(s=5) & causal) with softcap(c=2)", 191, 232, 2, 1, (16, 32)),
    ("all with softcap(c=30), alibi(max_bias=2)", 130, 130, 6, 3, 64),
]


@pytest.mark.parametrize("source, N, M, H, H_kv, bs", CASES)
@pytest.mark.parametrize("dtype, fwd_tol, grad_tol", [(torch.float64, 1e-12, 1e-10), (torch.float32, 1e-5, 1e-4)])
def test_blocksparse_forward_and_grads_equal_the_reference(source, N, M, H, H_kv, bs, dtype, fwd_tol, grad_tol):
    cp = patternc.compile(source, q_len=N, kv_len=M, num_heads=H, block_size=bs)
    q, k, v = _inputs(2, H, H_kv, N, M, 16, dtype, logit_scale=3.0)
    q, k, v = (t.requires_grad_() for t in (q, k, v))
    out = cp.attention(q, k, v, backend="blocksparse")
    qd, kd, vd = (t.detach().double().requires_grad_() for t in (q, k, v))
    ref = _reference(cp, qd, kd, vd)
    assert _rel(out, ref) < fwd_tol
    g = torch.randn(ref.shape, generator=torch.Generator().manual_seed(1), dtype=torch.float64)
    got = torch.autograd.grad(out, (q, k, v), g.to(dtype))
    want = torch.autograd.grad(ref, (qd, kd, vd), g)
    for name, a, b in zip("qkv", got, want):
        assert _rel(a, b) < grad_tol, name


def test_large_logits_softcap_no_nan_and_exact():
    """|s| ~ 100 before the cap: c * tanh(s / c) stays finite, and so do the gradients."""
    cp = patternc.compile("local(w=64) & causal with softcap(c=50), alibi()", q_len=130, num_heads=2, block_size=32)
    q, k, v = _inputs(1, 2, 2, 130, 130, 16, torch.float32)
    q = (q / q.norm(dim=-1, keepdim=True) * 40).requires_grad_()  # |q . k| * scale up to ~100
    k = (k / k.norm(dim=-1, keepdim=True) * 10).requires_grad_()
    v = v.requires_grad_()
    s = (q @ k.transpose(-1, -2)) / 4
    assert float(s.detach().abs().max()) > 80
    out = cp.attention(q, k, v, backend="blocksparse")
    qd, kd, vd = (t.detach().double().requires_grad_() for t in (q, k, v))
    ref = _reference(cp, qd, kd, vd)
    assert torch.isfinite(out).all() and _rel(out, ref) < 1e-5
    g = torch.randn(ref.shape, dtype=torch.float64, generator=torch.Generator().manual_seed(2))
    got = torch.autograd.grad(out, (q, k, v), g.float())
    want = torch.autograd.grad(ref, (qd, kd, vd), g)
    for a, b in zip(got, want):
        assert torch.isfinite(a).all() and _rel(a, b) < 1e-4


def test_terms_change_the_result():
    """The reference really applies the terms (a test that cannot fail is no test)."""
    q, k, v = _inputs(1, 2, 2, 64, 64, 16, torch.float64, logit_scale=4.0)
    base = patternc.compile("local(w=16) & causal", q_len=64, num_heads=2, block_size=16)
    for src in ("local(w=16) & causal with softcap(c=2)", "local(w=16) & causal with alibi()"):
        cp = patternc.compile(src, q_len=64, num_heads=2, block_size=16)
        assert _rel(cp.attention(q, k, v, backend="blocksparse"), base.attention(q, k, v, backend="blocksparse")) > 1e-2


def test_reference_softcap_by_hand():
    """The reference's softcap and ALiBi, on one row, by hand."""
    q = torch.tensor([[[[2.0, 0.0]]]], dtype=torch.float64)  # B=H=Q=1
    k = torch.tensor([[[[1.0, 0.0], [3.0, 0.0], [0.0, 1.0]]]], dtype=torch.float64)
    v = torch.eye(3, dtype=torch.float64)[None, None]
    terms = score_terms(_quiet_parse("all with softcap(c=2), alibi(max_bias=8)"))
    out = reference_attention(q, k, v, np.ones((1, 1, 3), bool), scale=1.0, score_terms=terms, q_offset=2)
    s = torch.tensor([2.0, 6.0, 0.0], dtype=torch.float64)
    s = 2 * torch.tanh(s / 2) + 2 ** -8 * (torch.arange(3) - 2)  # H = 1: m = 2^-8
    torch.testing.assert_close(out[0, 0, 0], torch.softmax(s, 0))


@pytest.mark.parametrize("source, N, M, H, H_kv, bs", [CASES[1], CASES[3]])
def test_sdpa_alibi_bias_equals_the_reference(source, N, M, H, H_kv, bs):
    cp = patternc.compile(source, q_len=N, kv_len=M, num_heads=H, block_size=bs)
    q, k, v = _inputs(2, H, H_kv, N, M, 16, torch.float64, logit_scale=2.0)
    if any(t.name == "softcap" for t in cp.score_terms):
        with pytest.raises(patternc.PatternError) as e:
            cp.attention(q, k, v, backend="sdpa")
        assert e.value.diagnostic.code == "P352"
        return
    q, k, v = (t.requires_grad_() for t in (q, k, v))
    out = cp.attention(q, k, v, backend="sdpa")
    qd, kd, vd = (t.detach().requires_grad_() for t in (q, k, v))
    ref = _reference(cp, qd, kd, vd)
    assert _rel(out, ref) < 1e-12
    g = torch.randn(ref.shape, dtype=torch.float64, generator=torch.Generator().manual_seed(3))
    for a, b in zip(torch.autograd.grad(out, (q, k, v), g), torch.autograd.grad(ref, (qd, kd, vd), g)):
        assert _rel(a, b) < 1e-10


def test_auto_never_drops_terms():
    cp = patternc.compile("causal with alibi()", q_len=64, num_heads=2)
    q, k, v = _inputs(1, 2, 2, 64, 64, 16, torch.float32)
    out, name = cp.attention(q, k, v, return_backend=True)
    assert name != "sdpa" or not cp.is_causal_only
    assert _rel(out, _reference(cp, q, k, v)) < 1e-5


@pytest.mark.slow
def test_flex_score_mod_forward_and_a_new_cap_does_not_recompile():
    from torch._dynamo.utils import counters

    from patternc.execute.flex import compiled_flex_attention

    torch._dynamo.reset()
    counters.clear()
    compiled_flex_attention.__globals__["_COMPILED"].clear()
    q, k, v = _inputs(1, 4, 2, 130, 97, 16, torch.float32, logit_scale=3.0)
    for c in (5, 30):
        cp = patternc.compile(f"(local(w=20) | sink(n=3)) & causal with softcap(c={c}), alibi(max_bias=4)",
                              q_len=130, kv_len=97, num_heads=4, block_size=32)
        out = cp.attention(q, k, v, backend="flex")
        assert _rel(out, _reference(cp, q, k, v)) < 1e-5
    assert counters["stats"]["unique_graphs"] == 1


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
@pytest.mark.parametrize("backend", ["flex", "blocksparse"])
def test_cuda_forward_and_grads(backend):
    source, N, M, H, H_kv, bs = CASES[1][0].replace("with", "with softcap(c=20),"), 130, 97, 4, 2, 32
    cp = patternc.compile(source, q_len=N, kv_len=M, num_heads=H, block_size=bs)
    q, k, v = (t.cuda().requires_grad_() for t in _inputs(2, H, H_kv, N, M, 64, torch.float32, logit_scale=3.0))
    out = cp.attention(q, k, v, backend=backend)
    qd, kd, vd = (t.detach().cpu().double().requires_grad_() for t in (q, k, v))
    ref = _reference(cp, qd, kd, vd)
    assert _rel(out.cpu(), ref) < 1e-5
    g = torch.randn(ref.shape, dtype=torch.float64, generator=torch.Generator().manual_seed(4))
    got = torch.autograd.grad(out, (q, k, v), g.float().cuda())
    want = torch.autograd.grad(ref, (qd, kd, vd), g)
    for a, b in zip(got, want):
        assert _rel(a.cpu(), b) < 1e-4


# ---- command line -----------------------------------------------------------------------------------


def test_cli_check_compile_and_run(capsys):
    from patternc.cli import main

    assert main(["check", "-e", "(local(w=4096) & causal) with softcap(c=50)"]) == 0
    out = capsys.readouterr().out
    assert "canonical: local(w=4096) & causal with softcap(c=50)" in out and "score terms: softcap(c=50)" in out
    assert main(["check", "--json", "-e", "causal with alibi(max_bias=4)"]) == 0
    js = json.loads(capsys.readouterr().out)
    assert js["canonical"] == "causal with alibi(max_bias=4)"
    assert js["score_terms"] == [{"name": "alibi", "args": {"max_bias": 4}, "text": "alibi(max_bias=4)"}]
    assert main(["compile", "--json", "-e", "causal with alibi()", "--seq-len", "64", "--heads", "3"]) == 0
    js = json.loads(capsys.readouterr().out)
    assert js["canonical"] == "causal with alibi()"
    assert js["score_terms"][0]["slopes"] == pytest.approx(_published_get_slopes(3))
    assert main(["run", "-e", "local(w=16) & causal with softcap(c=3), alibi()", "--seq-len", "97", "--heads", "3",
                 "--head-dim", "16", "--check", "--repeats", "1", "--no-dense", "--json"]) == 0
    js = json.loads(capsys.readouterr().out)
    assert js["check_passed"] and js["pattern"].endswith("with softcap(c=3), alibi()")


@pytest.mark.parametrize("order", ["natural", "permuted"])
def test_kernel_score_transform_matches_the_table(order):
    """``ScoreTerms.apply_`` (the kernels' in-place transform, both ALiBi paths: two broadcasts
    for natural tiles, the exact bias for tiles whose rows an execution plan reordered) and its
    derivative, in float32, against SPEC §1.8 evaluated in float64."""
    from patternc.execute.scoremod import ScoreTerms

    terms = score_terms(_quiet_parse("all with softcap(c=20), alibi(max_bias=8)"))
    st = ScoreTerms(terms, 6, q_offset=100, kv_offset=7)
    g = torch.Generator().manual_seed(5)
    R, qb, cols, L = 5, 16, 48, 4096
    heads = torch.randint(0, 6, (R,), generator=g)
    if order == "natural":
        q_pos = torch.randint(0, L // qb, (R, 1), generator=g) * qb + torch.arange(qb)
    else:
        q_pos = torch.randint(0, L, (R, qb), generator=g)
    kv_pos = torch.randint(0, L, (R, cols), generator=g)
    raw = torch.randn(2, R, qb, cols, generator=g, dtype=torch.float64) * 60
    m = torch.tensor(alibi_slopes(6), dtype=torch.float64)[heads]
    want = 20 * torch.tanh(raw / 20) + m[:, None, None] * ((kv_pos + 7)[:, None, :] - (q_pos + 100)[:, :, None])
    got = st.apply_(raw.float(), heads, q_pos, kv_pos)
    assert float((got.double() - want).abs().max()) < 2e-4 * max(1.0, float(want.abs().max()) / 100)
    torch.testing.assert_close(st.derivative(raw.float()).double(), 1 - torch.tanh(raw / 20) ** 2, atol=1e-6, rtol=0)
    # the kernel's variant: scores arrive times ``prescale`` (2 / c: 2c sigmoid(x) - c; 1 / c for caps
    # above SIGMOID_CAP_MAX: c tanh(u)); the derivative is with respect to those scores
    for c, form in ((20, "sigmoid"), (100, "tanh")):
        st = ScoreTerms(score_terms(_quiet_parse(f"all with softcap(c={c}), alibi(max_bias=8)")), 6,
                        q_offset=100, kv_offset=7)
        pre = st.prescaled()
        assert pre.softcap_form == form and pre.prescale == pytest.approx((2 if form == "sigmoid" else 1) / c)
        want = c * torch.tanh(raw / c) + m[:, None, None] * ((kv_pos + 7)[:, None, :] - (q_pos + 100)[:, :, None])
        x = (raw * pre.prescale).float()
        got = pre.apply_(x.clone(), heads, q_pos, kv_pos)
        assert float((got.double() - want).abs().max()) < 2e-4 * max(1.0, float(want.abs().max()) / 100)
        d = pre.derivative(x)
        torch.testing.assert_close(d.double(), (1 - torch.tanh(raw / c) ** 2) / pre.prescale, atol=1e-4, rtol=0)
        # the backward's pair: derivative then apply_ on the same scores reuses its sigmoid / tanh
        again = pre.apply_(x, heads, q_pos, kv_pos)
        assert again is not x and float((again.double() - want).abs().max()) < 2e-4 * max(1.0, float(want.abs().max()) / 100)


# ---- positions (SPEC §1.6) and run-time data (§1.7) with terms ----------------------------------------


@pytest.mark.parametrize("backend", ["blocksparse", "sdpa"])
def test_offsets_rows_equal_the_full_compile(backend):
    """ALiBi reads positions: a compile with q_offset / kv_offset gives the rows of the full one."""
    src = "(local(w=40) | sink(n=2)) & causal with alibi(max_bias=4)"
    N, H = 130, 3
    q, k, v = _inputs(1, H, H, N, N, 16, torch.float64, logit_scale=2.0)
    full = patternc.compile(src, q_len=N, num_heads=H, block_size=32).attention(q, k, v, backend=backend)
    t = 77  # chunked prefill of rows 77..129 against the whole cache
    part = patternc.compile(src, q_len=N - t, kv_len=N, q_offset=t, num_heads=H, block_size=32)
    torch.testing.assert_close(part.attention(q[:, :, t:], k, v, backend=backend), full[:, :, t:])
    s = 50  # a rolling window cache holding keys 50..129
    roll = patternc.compile(src.replace("sink(n=2)", "none"), q_len=N - 90, kv_len=N - s, q_offset=90,
                            kv_offset=s, num_heads=H, block_size=16)
    ref = patternc.compile(src.replace("sink(n=2)", "none"), q_len=N, num_heads=H, block_size=16)
    torch.testing.assert_close(roll.attention(q[:, :, 90:], k[:, :, s:], v[:, :, s:], backend=backend),
                               ref.attention(q, k, v, backend=backend)[:, :, 90:])


def test_head_offset_takes_the_later_slopes():
    src = "local(w=20) & causal with alibi()"
    q, k, v = _inputs(1, 6, 6, 64, 64, 16, torch.float64)
    full = patternc.compile(src, q_len=64, num_heads=6, block_size=16).attention(q, k, v, backend="blocksparse")
    rank1 = patternc.compile(src, q_len=64, num_heads=3, head_offset=3, block_size=16)
    # tensor-parallel rank 1 of 2 holds heads 3..5: their slopes are those of the 6-head model
    torch.testing.assert_close(rank1.attention(q[:, 3:], k[:, 3:], v[:, 3:], backend="blocksparse"), full[:, 3:])


@pytest.mark.parametrize("backend", ["blocksparse", "sdpa"])
def test_key_padding_and_documents_keep_the_terms(backend):
    src = "document & causal with alibi(max_bias=2)" if backend == "sdpa" else \
        "document & causal with softcap(c=3), alibi(max_bias=2)"
    N, H = 70, 2
    cp = patternc.compile(src, q_len=N, num_heads=H, block_size=16)
    q, k, v = _inputs(2, H, H, N, N, 16, torch.float64, logit_scale=3.0)
    docs = torch.tensor([[0] * 30 + [1] * 40, [0] * 50 + [1] * 20])
    kpm = torch.ones(2, N, dtype=torch.bool)
    kpm[1, :5] = False
    out = cp.attention(q, k, v, backend=backend, documents=docs, key_padding_mask=kpm)
    for b in range(2):
        d = docs[b].numpy()
        mask = (d[:, None] == d[None, :]) & np.tril(np.ones((N, N), bool)) & kpm[b].numpy()[None, :]
        ref = reference_attention(q[b:b + 1], k[b:b + 1], v[b:b + 1], mask[None], score_terms=cp.score_terms)
        assert _rel(out[b:b + 1], ref) < 1e-12


def test_nn_decode_with_terms_equals_the_full_forward():
    """A KV-cache decode (q_offset) sees the same ALiBi biases and cap as the whole sequence."""
    from patternc.nn import KVCache, SparseSelfAttention

    torch.manual_seed(0)
    layer = SparseSelfAttention(16, 2, "local(w=24) & causal with softcap(c=2), alibi(max_bias=3)",
                                block_size=16).double().eval()
    x = torch.randn(1, 50, 16, dtype=torch.float64, generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        full = layer(x)
        cache = KVCache()
        steps = [layer(x[:, :20], kv_cache=cache)] + [layer(x[:, t:t + 1], kv_cache=cache) for t in range(20, 50)]
        plain = SparseSelfAttention(16, 2, "local(w=24) & causal", block_size=16).double().eval()
        plain.load_state_dict(layer.state_dict())
        assert _rel(plain(x), full) > 1e-3  # the terms matter here
    torch.testing.assert_close(torch.cat(steps, dim=1), full, rtol=1e-10, atol=1e-10)


@pytest.mark.parametrize("src", ["local(w=40) & causal with alibi()", "local(w=40) & causal with softcap(c=3), alibi()"])
def test_decode_step_keeps_the_terms(src):
    """One query row at position 99 against 100 cached keys (``auto`` may gather keys for SDPA)."""
    H, N = 3, 100
    q, k, v = _inputs(2, H, H, N, N, 16, torch.float64, logit_scale=2.0)
    full = patternc.compile(src, q_len=N, num_heads=H, block_size=16).attention(q, k, v, backend="blocksparse")
    step = patternc.compile(src, q_len=1, kv_len=N, q_offset=N - 1, num_heads=H, block_size=16)
    out, name = step.attention(q[:, :, -1:], k, v, return_backend=True)
    torch.testing.assert_close(out, full[:, :, -1:])
    kpm = torch.ones(2, N, dtype=torch.bool)
    out2 = step.attention(q[:, :, -1:], k, v, key_padding_mask=kpm)
    torch.testing.assert_close(out2, full[:, :, -1:])


@pytest.mark.parametrize("src", ["(strided(s=8) | local(w=5)) & causal with softcap(c=3), alibi(max_bias=4)",
                                 "(summary(l=32, c=4) | local(w=9)) & causal with alibi()"])
def test_execution_plans_use_original_positions(src):
    """Plans gather queries / keys in another order: ALiBi must still see i and j (SPEC §6)."""
    N, H = 256, 2
    cp = patternc.compile(src, q_len=N, num_heads=H, block_size=32)
    assert not cp.plan.is_natural, cp.plan  # a real reordering is under test
    q, k, v = (t.requires_grad_() for t in _inputs(1, H, H, N, N, 16, torch.float64, logit_scale=2.0))
    out = cp.attention(q, k, v, backend="blocksparse", plan="auto")
    qd, kd, vd = (t.detach().requires_grad_() for t in (q, k, v))
    ref = _reference(cp, qd, kd, vd)
    assert _rel(out, ref) < 1e-12
    g = torch.randn(ref.shape, dtype=torch.float64, generator=torch.Generator().manual_seed(6))
    for a, b in zip(torch.autograd.grad(out, (q, k, v), g), torch.autograd.grad(ref, (qd, kd, vd), g)):
        assert _rel(a, b) < 1e-10


@pytest.mark.parametrize("plan", ["natural", "auto"])
def test_fused_alibi_float32_equals_the_reference(plan, monkeypatch):
    """ALiBi on the fused flash path (``scoremod.FlashAlibi``: one more q / k column, the row
    term taken from the log-sum-exp): float32 output, grads and log-sum-exp against float64, in
    natural order and under an execution plan whose reordered tiles take the exact bias."""
    from patternc.execute import blocksparse, scoremod

    seen, runs = [], []
    orig, orig_runs = scoremod.FlashAlibi.columns, scoremod.ScoreTerms.run_alibi

    def spy(self, positions, g, rows, *mask):
        out = orig(self, positions, g, rows, *mask)
        seen.append(out[2] is not None)
        return out

    def spy_runs(self, *a):
        runs.append(1)
        return orig_runs(self, *a)

    monkeypatch.setattr(scoremod.FlashAlibi, "columns", spy)
    monkeypatch.setattr(scoremod.ScoreTerms, "run_alibi", spy_runs)
    src = "(strided(s=8) | local(w=5)) & causal with alibi(max_bias=1)"  # slopes up to 0.84
    N, H = 256, 4
    cp = patternc.compile(src, q_len=N, num_heads=H, block_size=32)
    assert not cp.plan.is_natural  # its strided term gathers rows 8 apart: tiles spread 248 tokens
    q, k, v = _inputs(2, H, H, N, N, 16, torch.float32, logit_scale=2.0)
    q, k, v = (t.requires_grad_() for t in (q, k, v))
    out, lse = blocksparse.blocksparse_attention(cp, q, k, v, 0.25, plan=plan, return_lse=True)
    if plan == "auto":  # the reordered term's tiles take the exact bias (its natural term may run on runs)
        assert seen and any(seen)
    else:  # natural order: the strided runs (execute.fused) with a per-call bias
        assert runs and not any(seen)
    qd, kd, vd = (t.detach().double().requires_grad_() for t in (q, k, v))
    ref = _reference(cp, qd, kd, vd, scale=0.25)
    assert _rel(out, ref) < 1e-5
    _, lse64 = blocksparse.blocksparse_attention(cp, qd.detach(), kd.detach(), vd.detach(), 0.25, return_lse=True)
    assert float((lse.double() - lse64).abs().max()) < 1e-4
    g = torch.randn(ref.shape, dtype=torch.float64, generator=torch.Generator().manual_seed(7))
    for a, b in zip(torch.autograd.grad(out, (q, k, v), g.float()), torch.autograd.grad(ref, (qd, kd, vd), g)):
        assert _rel(a, b) < 1e-4


def test_fused_alibi_with_offsets_gqa_and_empty_rows():
    """The fused ALiBi columns read positions with q_offset / kv_offset (a chunk of prefill
    against a rolled cache), per query head under grouped-query kv heads, with rows that have no
    key: float32 output, log-sum-exp and grads against the float64 run (exact, unfused path)."""
    from patternc.execute import blocksparse

    src = "(local(w=40) & causal) - global(at=[65]) with alibi(max_bias=2)"  # position 65 keeps no key
    cp = patternc.compile(src, q_len=70, kv_len=100, q_offset=60, kv_offset=30, num_heads=4, block_size=16)
    q, k, v = _inputs(2, 4, 2, 70, 100, 16, torch.float64, logit_scale=2.0)
    want, lse_want = blocksparse.blocksparse_attention(cp, q, k, v, 0.25, return_lse=True)
    qf, kf, vf = (t.float().requires_grad_() for t in (q, k, v))
    got, lse = blocksparse.blocksparse_attention(cp, qf, kf, vf, 0.25, return_lse=True)
    assert bool(torch.isinf(lse_want).any()) and torch.equal(torch.isinf(lse), torch.isinf(lse_want))
    fin = torch.isfinite(lse_want)
    assert _rel(got, want) < 1e-5 and float((lse.double() - lse_want)[fin].abs().max()) < 1e-4
    g = torch.randn(want.shape, dtype=torch.float64, generator=torch.Generator().manual_seed(8))
    qd, kd, vd = (t.detach().requires_grad_() for t in (q, k, v))
    ref = blocksparse.blocksparse_attention(cp, qd, kd, vd, 0.25)
    for a, b in zip(torch.autograd.grad(got, (qf, kf, vf), g.float()), torch.autograd.grad(ref, (qd, kd, vd), g)):
        assert _rel(a, b) < 1e-4


@pytest.mark.parametrize("src, N, bs", [
    ("local(w=40) & causal with alibi(max_bias=2)", 200, 16),  # a staircase, then a sliding run
    ("chunk(l=64) & causal with alibi()", 192, 32),  # two-row runs stepping two blocks
    ("(local(w=20) | sink(n=16)) & causal with alibi(max_bias=4)", 160, 16),
])
def test_alibi_on_strided_runs_equals_the_exact_run(src, N, bs, monkeypatch):
    """ALiBi on the zero-copy runs (``fused``, ``ScoreTerms.run_alibi``: one bias per call, the
    per-kernel-row constant moved to the log-sum-exp), with grouped-query kv heads and B=2:
    float32 output, log-sum-exp and grads against the exact float64 run, and the same result
    with the runs switched off (the gather path's ALiBi column)."""
    from patternc.execute import blocksparse, scoremod

    calls = []
    orig = scoremod.ScoreTerms.run_alibi
    monkeypatch.setattr(scoremod.ScoreTerms, "run_alibi", lambda self, *a: calls.append(1) or orig(self, *a))
    cp = patternc.compile(src, q_len=N, num_heads=4, block_size=bs)
    q, k, v = _inputs(2, 4, 2, N, N, 16, torch.float64, logit_scale=2.0)
    want, lse_want = blocksparse.blocksparse_attention(cp, q, k, v, 0.25, return_lse=True)
    qf, kf, vf = (t.float().requires_grad_() for t in (q, k, v))
    got, lse = blocksparse.blocksparse_attention(cp, qf, kf, vf, 0.25, return_lse=True)
    assert calls, "the runs path did not take ALiBi"
    assert _rel(got, want) < 1e-5 and float((lse.double() - lse_want).abs().max()) < 1e-4
    g = torch.randn(want.shape, dtype=torch.float64, generator=torch.Generator().manual_seed(9))
    qd, kd, vd = (t.detach().requires_grad_() for t in (q, k, v))
    ref = blocksparse.blocksparse_attention(cp, qd, kd, vd, 0.25)
    grads = torch.autograd.grad(got, (qf, kf, vf), g.float())
    for a, b in zip(grads, torch.autograd.grad(ref, (qd, kd, vd), g)):
        assert _rel(a, b) < 1e-4
    monkeypatch.setattr(blocksparse, "USE_RUNS", False)
    qf2, kf2, vf2 = (t.detach().clone().requires_grad_() for t in (qf, kf, vf))
    gathered = blocksparse.blocksparse_attention(cp, qf2, kf2, vf2, 0.25)
    assert _rel(gathered, got) < 1e-5
    for a, b in zip(torch.autograd.grad(gathered, (qf2, kf2, vf2), g.float()), grads):
        assert _rel(a, b) < 1e-4


@pytest.mark.parametrize("base, delta", [(-64, 0), (0, -32), (-200, 48)])
def test_run_alibi_is_the_table_up_to_a_row_constant(base, delta):
    """``ScoreTerms.run_alibi`` (a runs call: kernel row r holds i = i0 + r * dq + a, j = j0 + r *
    dk + c): bias + shift equals SPEC §1.8's m_h (j - i) with offsets, in float32."""
    from patternc.execute.scoremod import ScoreTerms

    st = ScoreTerms(score_terms(_quiet_parse("all with alibi(max_bias=3)")), 6, q_offset=40, kv_offset=9)
    heads = torch.tensor([5, 0, 3])
    rows, Lq, L, i0, dq = 4, 16, 48, 300, 32
    bias, shift = st.run_alibi(heads, base, delta, rows, Lq, L)
    assert bias.shape == (3, 1, Lq, L) and shift.shape == (3, rows, 1)
    r = torch.arange(rows)[:, None, None]
    i = i0 + r * dq + torch.arange(Lq)[None, :, None] + 40
    j = i0 + base + r * (dq + delta) + torch.arange(L)[None, None, :] + 9
    m = torch.tensor(alibi_slopes(6, 3), dtype=torch.float64)[heads]
    want = m[:, None, None, None] * (j - i).double()[None]  # [3, rows, Lq, L]
    got = bias.double() + shift.double()[..., None]
    torch.testing.assert_close(got, want, rtol=0, atol=1e-4)
    assert float(shift.abs().max()) > 0 or delta == 0
