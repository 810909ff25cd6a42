"""The scored path (``execute.fused.forward_scored`` / ``backward_scored``): a pattern with a
softcap runs its strided runs unfused on zero-copy views, causal staircases slab by slab. Every
case checks that the path ran and compares float32 output and gradients with the float64
reference written from the SPEC table (``reference_attention``) or, where the case needs the
kernel's log-sum-exp, with the float64 gather loop (a different code path: float64 never takes
the strided runs)."""

from __future__ import annotations

import os

import pytest

torch = pytest.importorskip("torch")

import patternc  # noqa: E402
from patternc.execute import blocksparse, fused  # noqa: E402
from patternc.execute.reference import reference_attention  # noqa: E402


@pytest.fixture
def calls(monkeypatch):
    """Counts of the scored path's forward / backward calls."""
    seen = {"fwd": 0, "bwd": 0}
    fwd, bwd = fused.forward_scored, fused.backward_scored

    def f(*a, **kw):
        seen["fwd"] += 1
        return fwd(*a, **kw)

    def b(*a, **kw):
        seen["bwd"] += 1
        return bwd(*a, **kw)

    monkeypatch.setattr(fused, "forward_scored", f)
    monkeypatch.setattr(fused, "backward_scored", b)
    return seen


def _inputs(B, H, H_kv, N, M, D, *, logit_scale=1.0, seed=0):
    g = torch.Generator().manual_seed(seed)
    q = torch.randn(B, H, N, D, generator=g, dtype=torch.float64) * logit_scale
    k = torch.randn(B, H_kv, M, D, generator=g, dtype=torch.float64)
    v = torch.randn(B, H_kv, M, D, generator=g, dtype=torch.float64)
    return q, k, v


def _rel(a, b):
    return float((a.detach().double() - b.detach()).abs().max() / b.detach().abs().max().clamp(min=1e-30))


def _check_against_reference(cp, q, k, v, **kw):
    qf, kf, vf = (t.float().requires_grad_() for t in (q, k, v))
    out = cp.attention(qf, kf, vf, backend="blocksparse", **kw)
    qd, kd, vd = (t.clone().requires_grad_() for t in (q, k, v))
    mask = torch.as_tensor(cp.dense_mask())
    ref = reference_attention(qd, kd, vd, mask, score_terms=cp.score_terms, q_offset=cp.q_offset,
                              kv_offset=cp.kv_offset)
    assert torch.isfinite(out).all() and _rel(out, ref) < 1e-5
    g = torch.randn(ref.shape, dtype=torch.float64, generator=torch.Generator().manual_seed(3))
    got = torch.autograd.grad(out, (qf, kf, vf), g.float())
    want = torch.autograd.grad(ref, (qd, kd, vd), g)
    for name, a, b in zip("qkv", got, want):
        assert torch.isfinite(a).all() and _rel(a, b) < 1e-4, name


@pytest.mark.parametrize("src, N, H, H_kv, bs", [
    ("(local(w=96) & causal) with softcap(c=50)", 515, 2, 2, 64),           # a sliding run, ragged end
    ("(local(w=96) & causal) with softcap(c=20), alibi()", 515, 4, 2, 64),  # + ALiBi, grouped kv heads
    ("causal with softcap(c=50), alibi()", 450, 3, 3, 64),                  # a staircase, slab by slab
    ("causal with softcap(c=100)", 333, 2, 1, 32),                          # the tanh form (c > 64)
    ("local(w=80) with softcap(c=30), alibi(max_bias=4)", 300, 2, 2, 32),   # both sides: j > i too
    ("(local(w=64) | strided(s=64)) & causal with softcap(c=50)", 520, 2, 2, 64),  # plan terms
])
def test_scored_path_equals_the_reference(src, N, H, H_kv, bs, calls):
    cp = patternc.compile(src, q_len=N, num_heads=H, block_size=bs)
    q, k, v = _inputs(2, H, H_kv, N, N, 16, logit_scale=3.0)
    _check_against_reference(cp, q, k, v)
    assert calls["fwd"] >= 1 and calls["bwd"] >= 1


def test_alibi_alone_on_a_staircase_the_fused_runs_cannot_take(monkeypatch, calls):
    """A staircase's ALiBi bias would be its whole square on the fused runs (``alibi_fits``
    refuses past ``ALIBI_CALL_ELEMENTS``, lowered here for a short sequence): the scored path
    takes it slab by slab with no transform."""
    monkeypatch.setattr(fused, "ALIBI_CALL_ELEMENTS", 1 << 12)
    cp = patternc.compile("causal with alibi()", q_len=450, num_heads=4, block_size=64)
    q, k, v = _inputs(2, 4, 2, 450, 450, 16, logit_scale=3.0)
    _check_against_reference(cp, q, k, v)
    assert calls["fwd"] == 1 and calls["bwd"] == 1


def test_value_head_size_other_than_the_query_one(calls):
    """v's head size differs from q's (the fused kernel needs them equal; the scored path does
    not), with ALiBi alone too (the fused runs would have taken it)."""
    for src in ("(local(w=96) & causal) with softcap(c=20), alibi()", "(local(w=96) & causal) with alibi()"):
        cp = patternc.compile(src, q_len=300, num_heads=2, block_size=32)
        g = torch.Generator().manual_seed(4)
        q, k = (torch.randn(2, 2, 300, 16, generator=g, dtype=torch.float64) * 2 for _ in range(2))
        v = torch.randn(2, 2, 300, 40, generator=g, dtype=torch.float64)
        _check_against_reference(cp, q, k, v)
    assert calls["fwd"] == 2 and calls["bwd"] == 2


def test_large_logits_on_the_scored_path(calls):
    """|s| ~ 100 before the cap, on a band and a staircase: finite and exact."""
    for src in ("(local(w=64) & causal) with softcap(c=50), alibi()", "causal with softcap(c=50)"):
        cp = patternc.compile(src, q_len=200, num_heads=2, block_size=32)
        q, k, v = _inputs(1, 2, 2, 200, 200, 16)
        q = q / q.norm(dim=-1, keepdim=True) * 40
        k = k / k.norm(dim=-1, keepdim=True) * 10
        assert float(((q @ k.transpose(-1, -2)) / 4).abs().max()) > 80
        _check_against_reference(cp, q, k, v)
    assert calls["fwd"] >= 2


def test_slab_alibi_generated_per_slab(monkeypatch, calls):
    """A staircase's right-aligned ALiBi bias past the cache (generated slab by slab) and slabs
    of 3 blocks (a first slab shorter than the rest) give the reference too."""
    monkeypatch.setattr(fused, "ALIBI_CACHE_ELEMENTS", 0)
    monkeypatch.setattr(fused, "SLAB_BLOCKS", 3)
    cp = patternc.compile("causal with softcap(c=30), alibi()", q_len=300, num_heads=2, block_size=32)
    q, k, v = _inputs(2, 2, 2, 300, 300, 16, logit_scale=2.0)
    _check_against_reference(cp, q, k, v)
    assert calls["fwd"] == 1


def test_offsets_gqa_and_empty_rows_on_the_scored_path(calls):
    """Offsets move ALiBi's positions, a query row with no key gets output 0 and log-sum-exp
    +inf, grouped kv heads: float32 on the scored path against the float64 gather loop."""
    src = "(local(w=40) & causal) - global(at=[65]) with softcap(c=5), alibi(max_bias=2)"
    cp = patternc.compile(src, q_len=70, kv_len=100, q_offset=60, kv_offset=30, num_heads=4, block_size=16)
    q, k, v = _inputs(2, 4, 2, 70, 100, 16, logit_scale=2.0)
    want, lse_want = blocksparse.blocksparse_attention(cp, q, k, v, 0.25, return_lse=True)
    assert calls["fwd"] == 0  # float64 runs the gather loop
    qf, kf, vf = (t.float().requires_grad_() for t in (q, k, v))
    got, lse = blocksparse.blocksparse_attention(cp, qf, kf, vf, 0.25, return_lse=True)
    assert calls["fwd"] == 1
    assert bool(torch.isinf(lse_want).any()) and torch.equal(torch.isinf(lse), torch.isinf(lse_want))
    fin = torch.isfinite(lse_want)
    assert _rel(got, want) < 1e-5 and float((lse.double() - lse_want)[fin].abs().max()) < 1e-4
    assert float(got.detach()[~fin].abs().max()) == 0.0
    g = torch.randn(want.shape, dtype=torch.float64, generator=torch.Generator().manual_seed(8))
    qd, kd, vd = (t.detach().requires_grad_() for t in (q, k, v))
    ref = blocksparse.blocksparse_attention(cp, qd, kd, vd, 0.25)
    for a, b in zip(torch.autograd.grad(got, (qf, kf, vf), g.float()), torch.autograd.grad(ref, (qd, kd, vd), g)):
        assert _rel(a, b) < 1e-4
    assert calls["bwd"] == 1


def test_without_softcap_or_in_float64_the_path_is_not_taken(calls):
    q, k, v = _inputs(1, 2, 2, 256, 256, 16)
    patternc.compile("local(w=64) & causal with alibi()", q_len=256, num_heads=2).attention(
        q.float(), k.float(), v.float(), backend="blocksparse")
    patternc.compile("local(w=64) & causal with softcap(c=5)", q_len=256, num_heads=2).attention(
        q, k, v, backend="blocksparse")
    assert calls["fwd"] == 0


# ---- the native row kernels (execute.native) --------------------------------------------------
def _cpu_has_avx2_fma() -> bool:
    try:
        flags = open("/proc/cpuinfo").read().split()
    except OSError:
        return False
    return "avx2" in flags and "fma" in flags


def test_native_builds_where_it_can():
    """On an x86-64 Linux machine with AVX2, FMA and a C compiler (CI's), the kernels build and
    load; elsewhere ``status`` says why not."""
    import platform
    import shutil

    from patternc.execute import native

    can = (platform.machine() in ("x86_64", "AMD64") and _cpu_has_avx2_fma()
           and bool(os.environ.get("CC") or shutil.which("cc") or shutil.which("gcc"))
           and os.environ.get("PATTERNC_NATIVE", "1") != "0")
    assert (native.kernels() is not None) == can, native.status()
    assert native.status().startswith("loaded: " if can else "unavailable: ")
    if can and os.environ.get("PATTERNC_NATIVE_FLASH", "1") != "0":
        # torch's x86-64 builds link MKL, whose sgemm_ the fused calls use
        assert native.kernels().has_flash and "(fused calls)" in native.status()


def _native_or_skip():
    from patternc.execute import native

    nat = native.kernels()
    if nat is None:
        pytest.skip(native.status())
    return nat


def _f(x, form):
    return {"none": x, "sigmoid": torch.sigmoid(x), "tanh": torch.tanh(x)}[form]


@pytest.mark.parametrize("form, a, x_scale", [("none", 1.0, 4.0), ("sigmoid", 100.0, 4.0), ("tanh", 7.0, 4.0),
                                              ("tanh", 300.0, 0.01)])  # a large cap: x = s / c is small
@pytest.mark.parametrize("bias_shape", [None, (1, 3, 5, 21), (2, 1, 5, 21)])
def test_native_rows_equal_float64(form, a, x_scale, bias_shape):
    """``forward_rows`` / ``backward_rows`` against the same formulas in float64: ragged rows
    (21 columns: two vectors and a tail), broadcast biases with -inf entries, a row with no
    allowed entry, arguments below the floor, tanh near 0 (where ``1 - 2 / (exp(2x) + 1)``
    cancels: the prescaled scores of a cap above 64)."""
    nat = _native_or_skip()
    g = torch.Generator().manual_seed(5)
    x = torch.randn(2, 3, 5, 21, generator=g) * x_scale
    bias = None
    if bias_shape is not None:
        bias = (torch.randn(bias_shape, generator=g) * 30).masked_fill_(torch.rand(bias_shape, generator=g) < 0.3,
                                                                        float("-inf"))
        bias[..., 1, :] = float("-inf")  # query row 1 has no allowed entry
    floor = -80.0
    y = a * _f(x.double(), form) if form != "none" else x.double()
    if bias is not None:
        y = y + bias.double()
    # float32 scores carry a rounding of a few ulps of their magnitude: p's absolute error
    tol = 1e-6 + 4 * 2.0 ** -23 * float(y[torch.isfinite(y)].abs().max())
    m = y.amax(-1, keepdim=True)
    empty = m == float("-inf")
    p = torch.exp((y - m.masked_fill(empty, 0)).clamp(min=floor)).masked_fill(empty, 0.0)
    s = x.clone()
    m_got, den_got = nat.forward_rows(s, form, a, bias, floor)
    assert torch.equal(m_got == float("-inf"), empty)
    fin = ~empty
    assert float((m_got.double() - m)[fin].abs().max()) <= 1e-5 * max(1.0, float(m[fin].abs().max()))
    assert float((s.double() - p).abs().max()) < tol
    assert float(((den_got.double() - p.sum(-1, keepdim=True)) / p.sum(-1, keepdim=True).clamp(min=1e-30))
                 [fin].abs().max()) < tol
    # backward: p = exp(clamp(y - lse, floor, 0)), ds = p (dP - delta) f'
    lse = (m + torch.log(p.sum(-1, keepdim=True))).masked_fill(empty, float("inf")).squeeze(-1)
    dP = torch.randn(x.shape, generator=g, dtype=torch.float64)
    delta = torch.randn(x.shape[:3], generator=g, dtype=torch.float64)
    pb = torch.exp((y - lse[..., None]).clamp(min=floor, max=0.0))
    f = _f(x.double(), form)
    deriv = {"none": torch.ones_like(f), "sigmoid": f * (1 - f), "tanh": 1 - f * f}[form]
    want_ds = pb * (dP - delta[..., None]) * deriv
    s, ds = x.clone(), dP.float()
    nat.backward_rows(s, ds, form, a, bias, lse.float(), delta.float(), floor)
    assert float((s.double() - pb).abs().max()) < tol
    assert float((ds.double() - want_ds).abs().max()) < tol * float(want_ds.abs().max().clamp(min=1.0))


@pytest.mark.parametrize("form, a, kc, inline", [("none", 1.0, 512, False), ("sigmoid", 100.0, 128, False),
                                                 ("tanh", 60.0, 512, False), ("sigmoid", 100.0, 128, True)])
def test_native_flash_call_equals_float64(form, a, kc, inline, monkeypatch):
    """``flash_forward`` / ``flash_backward`` (one fused call) against the same formulas in float64
    autograd: strided views of larger buffers, ragged sizes (70 query rows: a full and a partial
    64-row tile; 300 keys: two 128-key steps and a tail that is not a multiple of 8), a bias
    with a staircase (the tile's key range is cut at both ends), a row with no allowed key; the
    backward's key chunks (at least ``FLASH_KC`` keys) one or two per row; ``inline``: a causal limit and
    ALiBi computed in the kernel (a staircase's), on top of the bias."""
    from patternc.execute import native

    monkeypatch.setattr(native, "FLASH_KC", kc)
    nat = _native_or_skip()
    if not nat.has_flash:
        pytest.skip(native.status())
    g = torch.Generator().manual_seed(11)
    P, R, Lq, L, D, Dv = 2, 3, 70, 300, 20, 12
    big = lambda *shape: torch.randn(*shape, generator=g)  # noqa: E731
    q, k, v = big(P, 2 * R, Lq, D)[:, ::2] * 2, big(P, R + 1, L, D)[:, 1:], big(P, R, L, Dv)
    dout = big(P, R, Lq, Dv)
    rows, cols = torch.arange(Lq)[:, None], torch.arange(L)[None, :]
    bias = torch.where((cols <= rows + 200) & (cols >= rows), 0.0, float("-inf"))[None, None].repeat(1, R, 1, 1)
    bias[0, 1, 5] = float("-inf")  # kernel row 1, query 5: no allowed key
    bias = bias + big(1, R, Lq, L)  # an ALiBi-like additive part
    out = torch.zeros(P, R, Lq, Dv)
    kw = {}
    if inline:  # row x allows c <= x + 150; ALiBi m_p (c - x - 150)
        kw = {"causal_off": 150, "slopes": torch.tensor([0.5, 0.03])}
    m, den = nat.flash_forward(q, k, v, out, form, a, bias, -80.0, **kw)
    qd, kd, vd = (t.double().requires_grad_() for t in (q, k, v))
    x = qd @ kd.transpose(-1, -2)
    y = (a * _f(x, form) if form != "none" else x) + bias.double()
    if inline:
        rel = (cols - rows - 150).double()
        y = (y + kw["slopes"].double()[:, None, None, None] * rel).masked_fill(rel > 0, float("-inf"))
    lse = torch.logsumexp(y.detach(), -1)
    empty = lse == float("-inf")
    p = torch.softmax(y.masked_fill(empty[..., None], 0.0), -1)  # (no NaN from the empty row's gradient)
    want = (p @ vd).masked_fill(empty[..., None], 0.0)
    assert _rel(out, want) < 1e-5
    got_lse = (m + den.log()).squeeze(-1)
    assert torch.equal(got_lse == float("-inf"), empty)
    assert float((got_lse.double() - lse)[~empty].abs().max()) < 1e-4
    dq = torch.zeros(P, 2 * R, Lq, D)[:, ::2]
    delta = (dout * out).sum(-1)
    dk, dv = nat.flash_backward(q, k, v, dout, dq, form, a, bias, got_lse.masked_fill(empty, float("inf")),
                                delta, -80.0, **kw)
    wq, wk, wv = torch.autograd.grad(want, (qd, kd, vd), dout.double())
    for name, got_g, want_g in (("q", dq, wq), ("k", dk, wk), ("v", dv, wv)):
        assert _rel(got_g, want_g) < 1e-4, name


@pytest.mark.parametrize("src", ["(local(w=96) & causal) with softcap(c=50), alibi()", "causal with softcap(c=100)"])
def test_scored_path_with_row_kernels_equals_the_reference(src, monkeypatch, calls):
    """Where torch's library has no ``sgemm_``, the native route is matmul + ``forward_rows`` /
    ``backward_rows`` + matmul (before the fused calls, the only one)."""
    from patternc.execute import native

    _native_or_skip()
    monkeypatch.setitem(native._state, "sgemm", None)
    assert not native.kernels().has_flash
    cp = patternc.compile(src, q_len=333, num_heads=2, block_size=32)
    q, k, v = _inputs(2, 2, 1, 333, 333, 16, logit_scale=3.0)
    _check_against_reference(cp, q, k, v)
    assert calls["fwd"] == 1 and calls["bwd"] == 1


@pytest.mark.parametrize("src", ["(local(w=96) & causal) with softcap(c=20), alibi()", "causal with softcap(c=100)"])
def test_scored_path_without_native_equals_the_reference(src, monkeypatch, calls):
    """The torch-ops fallback of the scored path (no C compiler, ``PATTERNC_NATIVE=0``)."""
    monkeypatch.setattr(fused, "USE_NATIVE", False)
    cp = patternc.compile(src, q_len=333, num_heads=2, block_size=32)
    q, k, v = _inputs(2, 2, 1, 333, 333, 16, logit_scale=3.0)
    _check_against_reference(cp, q, k, v)
    assert calls["fwd"] == 1 and calls["bwd"] == 1


def test_native_build_failures_are_reasons_not_errors(tmp_path, monkeypatch):
    """A missing compiler or the opt-out leave the kernels unavailable with a reason; a fresh
    build lands whole in the cache directory (no temporary file left)."""
    from patternc.execute import native

    monkeypatch.setenv("PATTERNC_NATIVE", "0")
    lib, why = native._build()
    assert lib is None and "PATTERNC_NATIVE=0" in why
    monkeypatch.setenv("PATTERNC_NATIVE", "1")
    if native._cpu_ok() is not None:
        pytest.skip(native._cpu_ok())
    monkeypatch.setenv("PATTERNC_CACHE_DIR", str(tmp_path))
    monkeypatch.setenv("CC", str(tmp_path / "no-such-cc"))
    lib, why = native._build()
    assert lib is None and "no-such-cc" in why
    monkeypatch.setenv("CC", "false")  # runs, fails, says nothing
    lib, why = native._build()
    assert lib is None and "exit 1" in why
    monkeypatch.delenv("CC")
    _native_or_skip()  # a compiler exists on this machine
    lib, why = native._build()
    assert lib is not None and why is None
    built = list((tmp_path / "native").iterdir())
    assert len(built) == 1 and built[0].suffix == ".so"
    monkeypatch.setenv("PATTERNC_CACHE_DIR", str(tmp_path / "other"))  # (the loaded file stays mapped)
    cc, target = native._target()
    target.parent.mkdir(parents=True)
    target.write_bytes(b"not a library")  # a damaged file in the cache: built again once
    lib, why = native._build()
    assert lib is not None and why is None and target.stat().st_size > 1000
    import shutil

    monkeypatch.setenv("CC", f"{shutil.which('cc') or shutil.which('gcc')} -O2")  # a word list
    lib, why = native._build()
    assert lib is not None and why is None


# ---- regressions from a review ------------------------------------------------------------------
def test_staircases_of_unequal_length(calls):
    """Packed documents of unequal length give causal staircases of different sizes in one layout
    (each slab's mask is cut for its own staircase)."""
    cp = patternc.compile("document & causal with softcap(c=50), alibi()", q_len=768, num_heads=2, block_size=64)
    q, k, v = _inputs(2, 2, 2, 768, 768, 16, logit_scale=2.0)
    docs = [[512, 256], [256, 512]]
    for b in range(2):
        sub = [t[b:b + 1] for t in (q, k, v)]
        qf, kf, vf = (t.float().requires_grad_() for t in sub)
        out = cp.attention(qf, kf, vf, backend="blocksparse", documents=[docs[b]])
        qd, kd, vd = (t.clone().requires_grad_() for t in sub)
        mask = torch.as_tensor(cp.dense_mask(documents=[docs[b]]))[0]
        ref = reference_attention(qd, kd, vd, mask, score_terms=cp.score_terms)
        assert _rel(out, ref) < 1e-5
        g = torch.randn(ref.shape, dtype=torch.float64, generator=torch.Generator().manual_seed(b))
        for a, w in zip(torch.autograd.grad(out, (qf, kf, vf), g.float()), torch.autograd.grad(ref, (qd, kd, vd), g)):
            assert _rel(a, w) < 1e-4
    assert calls["fwd"] == 2


def test_two_compiles_of_one_layout_keep_their_own_slopes(calls):
    """The per-layout call cache is shared by compiles that differ only in their score terms:
    ALiBi's biases are keyed by the terms (max_bias, head_offset)."""
    q, k, v = _inputs(1, 4, 4, 512, 512, 16, logit_scale=2.0)
    for src, head_offset in [("causal with softcap(c=50), alibi(max_bias=8)", 0),
                             ("causal with softcap(c=50), alibi(max_bias=2)", 0),
                             ("causal with softcap(c=50), alibi(max_bias=2)", 4),
                             ("local(w=128) & causal with softcap(c=50), alibi(max_bias=8)", 0),
                             ("local(w=128) & causal with softcap(c=50), alibi(max_bias=2)", 0)]:
        cp = patternc.compile(src, q_len=512, num_heads=4, block_size=64, head_offset=head_offset)
        out = cp.attention(q.float(), k.float(), v.float(), backend="blocksparse")
        ref = reference_attention(q, k, v, torch.as_tensor(cp.dense_mask()), score_terms=cp.score_terms,
                                  head_offset=head_offset)
        assert _rel(out, ref) < 1e-5, (src, head_offset)
    assert calls["fwd"] == 5


@pytest.mark.parametrize("src", ["(causal | global(at=[0, 1])) with alibi(max_bias=1)",
                                 "(causal | global(at=[0, 1])) with softcap(c=50), alibi(max_bias=1)"])
def test_alibi_on_runs_of_far_apart_rows_keeps_float32_precision(src):
    """Query blocks 0 and 31 share their key span, so the runs put them in one run (tau = 31,
    sigma = 0); each call's ALiBi bias is in its first row's frame, so rows are grouped within
    FAST_ALIBI_SPREAD score units of it (before: 4.7e-5 in the last rows)."""
    cp = patternc.compile(src, q_len=2048, num_heads=2, block_size=64)
    q, k, v = _inputs(1, 2, 2, 2048, 2048, 32)
    out = cp.attention(q.float(), k.float(), v.float(), backend="blocksparse")
    ref = reference_attention(q, k, v, torch.as_tensor(cp.dense_mask()), score_terms=cp.score_terms)
    assert _rel(out, ref) < 1e-5


@pytest.mark.parametrize("src, N, H", [
    ("global(at=[0, 1, 3000]) | local(w=32) with alibi()", 4096, 8),
    ("heads(global(at=[7]) | chunk(l=256), sink(n=4) | local(w=64), strided(s=64)) with alibi(max_bias=1)", 3000, 3),
])
def test_alibi_for_queries_reading_far_ahead_on_the_gather_path(src, N, H):
    """Non-causal ALiBi: a global query's heaviest keys are thousands of positions ahead; the
    gather path's column is centred on the tile's last allowed key (``FlashAlibi.columns``),
    or row by row where a tile mixes such a query with local ones (before: 1.3e-5, 3.2e-5)."""
    cp = patternc.compile(src, q_len=N, num_heads=H, block_size=64)
    q, k, v = _inputs(1, H, H, N, N, 32)
    out = cp.attention(q.float(), k.float(), v.float(), backend="blocksparse")
    ref = reference_attention(q, k, v, torch.as_tensor(cp.dense_mask()), score_terms=cp.score_terms)
    assert _rel(out, ref) < 1e-5


def test_cli_run_check_with_softcap_times_dense_without_it(capsys):
    """``patternc run … with softcap(c) --check``: the dense SDPA baseline runs without the cap
    and says so; the check passes."""
    import json

    from patternc.cli import main

    assert main(["run", "-e", "local(w=64) & causal with softcap(c=50)", "--seq-len", "300", "--heads", "2",
                 "--head-dim", "16", "--check", "--repeats", "1", "--json"]) == 0
    js = json.loads(capsys.readouterr().out)
    assert js["check_passed"] and js["dense_seconds"] is not None and "without softcap" in js["dense_note"]
    from patternc.errors import PatternError
    from patternc.execute.sdpa import sdpa_attention

    cp = patternc.compile("causal with softcap(c=5)", q_len=8, num_heads=1)
    x = torch.randn(1, 1, 8, 4)
    with pytest.raises(PatternError, match="P352"):
        sdpa_attention(cp, x, x, x, 0.5, use_causal=False)


@pytest.mark.parametrize("src, N, H", [
    ("global(at=[0, 1, 3000]) | local(w=32) with softcap(c=50), alibi(max_bias=1)", 4096, 1),  # before: 1.8e-5
    ("heads(global(at=[7]) | chunk(l=256), sink(n=4) | local(w=64), strided(s=64)) with softcap(c=30), alibi(max_bias=1)",
     3000, 3),  # before: 2.2e-5
])
def test_large_alibi_lse_merged_across_plan_terms_keeps_float32_precision(src, N, H):
    """A global query under non-causal ALiBi has a log-sum-exp near ``m * N`` (~1,000 here);
    the gather loop centres its scores on each row's last allowed key and the kernels keep the
    lse in float64 (``blocksparse.lse_dtype``), so the plan terms' merge and the backward's
    recomputed probabilities keep float32 precision."""
    cp = patternc.compile(src, q_len=N, num_heads=H, block_size=64)
    assert len(cp.plan.terms) >= 2  # the rows are merged from several terms
    q, k, v = _inputs(1, H, H, N, N, 32)
    _check_against_reference(cp, q, k, v)


def test_large_alibi_lse_on_the_segmented_gather_loop():
    """Rows longer than ``chunk_elements`` run as an online softmax over key segments; with ALiBi
    each segment is centred on its own last allowed key and the running max is float64."""
    from patternc.execute import blocksparse as bsm

    cp = patternc.compile("global(at=[0, 3000]) | local(w=32) with softcap(c=50), alibi(max_bias=1)",
                          q_len=4096, num_heads=1, block_size=64)
    q, k, v = _inputs(1, 1, 1, 4096, 4096, 16)
    ref = reference_attention(q, k, v, torch.as_tensor(cp.dense_mask()), score_terms=cp.score_terms)
    for chunk in (1 << 12, bsm.CHUNK_ELEMENTS):  # segments of 64 keys; whole rows
        out, lse = bsm.blocksparse_attention(cp, q.float(), k.float(), v.float(), 0.25, chunk_elements=chunk,
                                             return_lse=True, plan=cp.plan)  # before: 2.3e-5
        assert _rel(out, ref) < 1e-5, chunk
        assert lse.dtype == torch.float32 and torch.isfinite(lse).all()


@pytest.mark.parametrize("N, bs", [(1000, 64), (1025, 128)])
def test_ragged_causal_staircase_is_one_fused_call(N, bs, monkeypatch):
    """At a ragged end ``causal``'s last diagonal tile is the lower triangle cut to the real keys;
    it counts as the plain triangle (``fused._ragged_corner_is_tril``), so the staircase stays one
    fused call with its mask inline instead of per-block runs (3.5x slower in a review)."""
    from patternc.execute import native

    nat = _native_or_skip()
    if not nat.has_flash:
        pytest.skip(native.status())
    seen = []
    orig = native._Native.flash_forward

    def spy(*a, **kw):
        seen.append(kw.get("causal_off"))
        return orig(*a, **kw)

    monkeypatch.setattr(native._Native, "flash_forward", staticmethod(spy))
    cp = patternc.compile("causal with softcap(c=30), alibi()", q_len=N, num_heads=2, block_size=bs)
    q, k, v = _inputs(1, 2, 2, N, N, 16, logit_scale=2.0)
    _check_against_reference(cp, q, k, v)
    assert seen and all(c is not None for c in seen), seen


@pytest.mark.parametrize("src, N", [("all", 300), ("all with softcap(c=50), alibi()", 301),
                                    ("all with alibi(max_bias=2)", 302), ("local(w=100) | sink(n=3) with softcap(c=20)", 303)])
def test_one_long_row_past_the_bias_cache(src, N, monkeypatch):
    """A run that is one long shared row with a ragged last key block used to cache its whole
    mask (``all`` at N=8191: +532 MB); past ``BIAS_CACHE_ELEMENTS`` its mask is one row broadcast
    over the queries where every query row's is the same (``fused._column_bias``), else its rows
    take the gather path. Both equal the reference, forward and gradients."""
    monkeypatch.setattr(fused, "BIAS_CACHE_ELEMENTS", 4096)
    made = []
    real = fused._column_bias

    def spy(*a):
        made.append(real(*a))
        return made[-1]

    monkeypatch.setattr(fused, "_column_bias", spy)
    cp = patternc.compile(src, q_len=N, num_heads=2, block_size=64)  # (a new N: a new plan)
    q, k, v = _inputs(2, 2, 1, N, N, 16, logit_scale=2.0)
    _check_against_reference(cp, q, k, v)
    if src.startswith("all"):  # one row of bias, not N x N
        assert any(b is not None and tuple(b.shape) == (1, 1, 320) for b in made), made
