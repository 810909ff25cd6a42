"""Execution backends against the float64 dense reference built from the oracle.

Every backend's output is compared with ``reference_attention`` over
``patternc.reference.dense_mask`` (SPEC §1, the ground truth), never with another backend.
Relative error is ``||out - ref|| / ||ref||`` (Frobenius): float32 <= 1e-5, bf16/fp16 <= 2e-2.
The compile-heavy FlexAttention tests live in ``test_execute_flex.py`` (slow).
"""

from __future__ import annotations

import math
import warnings

import numpy as np
import pytest

torch = pytest.importorskip("torch")

from hypothesis import HealthCheck, assume, given, settings  # noqa: E402
from hypothesis import strategies as st  # noqa: E402

import patternc  # noqa: E402
from patternc.execute import attention, check_inputs, choose_backend  # noqa: E402
from patternc.execute import blocksparse as bsm  # noqa: E402
from patternc.execute.reference import reference_attention  # noqa: E402

pytestmark = pytest.mark.filterwarnings("ignore::patternc.PatternWarning")

TOL = {torch.float32: 1e-5, torch.float64: 1e-10, torch.bfloat16: 2e-2, torch.float16: 2e-2}


def rel_err(out, ref) -> float:
    out, ref = out.detach().to(torch.float64), ref.detach()
    den = float(ref.norm())
    return float((out - ref).norm()) / (den if den > 0 else 1.0)


def oracle(src, q_len, kv_len, heads):
    return patternc.reference.dense_mask(src, q_len=q_len, kv_len=kv_len, num_heads=heads)


def make_qkv(B, H, H_kv, Q, KV, D=16, Dv=None, dtype=torch.float32, seed=0, grad=False):
    g = torch.Generator().manual_seed(seed)
    Dv = D if Dv is None else Dv
    q = torch.randn(B, H, Q, D, generator=g).to(dtype)
    k = torch.randn(B, H_kv, KV, D, generator=g).to(dtype)
    v = torch.randn(B, H_kv, KV, Dv, generator=g).to(dtype)
    if grad:
        q, k, v = (t.requires_grad_() for t in (q, k, v))
    return q, k, v


# (source, Q_LEN, KV_LEN, H, H_kv, BLOCK_SIZE): ragged lengths, Q_LEN != KV_LEN, per-head
# patterns, grouped-query attention, rectangular blocks
CASES = [
    ("local(w=16) & causal", 97, 97, 2, 2, 16),
    ("(local(w=8) | strided(s=7)) & causal", 130, 130, 2, 1, 32),
    ("fixed(16, 4) & causal", 191, 191, 4, 2, 16),
    ("heads(local(w=5) & causal, strided(s=3), sink(4) | global(n=2))", 61, 45, 3, 3, (8, 16)),
    ("band(left=3, right=9)", 40, 73, 2, 2, (16, 8)),
    ("chunk(l=12) | summary(l=12, c=3)", 50, 50, 1, 1, 16),
    ("random(r=5, seed=3) | causal", 45, 33, 2, 1, 8),
    ("blocks(8, local(w=2) & causal)", 100, 100, 2, 2, 16),
    ("dilated(w=4, d=3) | prefix(n=10)", 64, 64, 2, 2, 16),
    ("all", 23, 57, 2, 1, 16),
    ("causal", 70, 50, 2, 2, 32),
    ("~causal | global(at=[0, 17])", 37, 37, 2, 2, 8),
]


@pytest.mark.parametrize("backend", ["blocksparse", "sdpa", "auto"])
@pytest.mark.parametrize("src,Q,KV,H,H_kv,bs", CASES)
def test_forward_matches_float64_reference(src, Q, KV, H, H_kv, bs, backend):
    cp = patternc.compile(src, q_len=Q, kv_len=KV, num_heads=H, block_size=bs)
    q, k, v = make_qkv(2, H, H_kv, Q, KV, D=16, Dv=8)
    ref = reference_attention(q, k, v, oracle(src, Q, KV, H))
    with torch.no_grad():
        out, name = attention(cp, q, k, v, backend=backend, return_backend=True)
    assert out.shape == (2, H, Q, 8) and out.dtype == torch.float32
    assert name == (choose_backend(cp, q, k, v) if backend == "auto" else backend)
    assert rel_err(out, ref) <= 1e-5


@pytest.mark.parametrize("src,Q,KV,H,H_kv,bs", CASES[:6])
def test_backends_on_oracle_built_layouts(src, Q, KV, H, H_kv, bs):
    """The same backends on a layout and mask_mod built from the oracle alone
    (``BlockLayout.from_dense`` + a dense lookup table): execution is right independently of
    the analytic compiler."""
    from exec_support import StandIn

    cp = StandIn(src, q_len=Q, kv_len=KV, num_heads=H, block_size=bs)
    q, k, v = make_qkv(2, H, H_kv, Q, KV, D=16, Dv=8)
    ref = reference_attention(q, k, v, oracle(src, Q, KV, H))
    for backend in ("blocksparse", "sdpa"):
        assert rel_err(attention(cp, q, k, v, backend=backend), ref) <= 1e-5


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float64])
@pytest.mark.parametrize("backend", ["blocksparse", "sdpa"])
def test_low_and_double_precision(dtype, backend):
    src, Q, KV, H, H_kv, bs = "(local(w=8) | strided(s=7)) & causal", 130, 130, 4, 2, 32
    cp = patternc.compile(src, q_len=Q, kv_len=KV, num_heads=H, block_size=bs)
    q, k, v = make_qkv(1, H, H_kv, Q, KV, D=32, dtype=dtype)
    ref = reference_attention(q, k, v, oracle(src, Q, KV, H))
    out = attention(cp, q, k, v, backend=backend)
    assert out.dtype == dtype
    assert rel_err(out, ref) <= TOL[dtype]


def test_scale_argument():
    src = "local(w=6) & causal"
    cp = patternc.compile(src, q_len=40, num_heads=1, block_size=8)
    q, k, v = make_qkv(1, 1, 1, 40, 40)
    ref = reference_attention(q, k, v, oracle(src, 40, 40, 1), scale=0.7)
    for backend in ("blocksparse", "sdpa"):
        assert rel_err(attention(cp, q, k, v, scale=0.7, backend=backend), ref) <= 1e-5
    # the default scale is 1/sqrt(D): a different scale gives a different answer
    assert rel_err(attention(cp, q, k, v, backend="blocksparse"), ref) > 1e-3


# ---- gradients ----------------------------------------------------------------------------
def grads(out, inputs, g):
    return torch.autograd.grad(out, inputs, g)


GRAD_CASES = [
    ("local(w=16) & causal", 97, 97, 2, 2, 16),
    ("heads(local(w=5) & causal, strided(s=3), sink(4) | global(n=2))", 61, 45, 3, 3, (8, 16)),
    ("fixed(16, 4) & causal", 100, 100, 4, 2, 16),
    ("random(r=5, seed=3) | causal", 45, 33, 2, 1, 8),
]


@pytest.mark.parametrize("src,Q,KV,H,H_kv,bs", GRAD_CASES)
def test_blocksparse_gradients_match_reference(src, Q, KV, H, H_kv, bs):
    cp = patternc.compile(src, q_len=Q, kv_len=KV, num_heads=H, block_size=bs)
    q, k, v = make_qkv(2, H, H_kv, Q, KV, D=16, Dv=8, grad=True)
    out = attention(cp, q, k, v, backend="blocksparse")
    ref = reference_attention(q, k, v, oracle(src, Q, KV, H))
    g = torch.randn(ref.shape, generator=torch.Generator().manual_seed(1), dtype=torch.float64)
    got = grads(out, (q, k, v), g.float())
    want = grads(ref, (q, k, v), g)
    for a, b in zip(got, want):
        assert torch.isfinite(a).all()
        assert rel_err(a, b.to(torch.float64)) <= 1e-5


@pytest.mark.parametrize("dtype,tol", [(torch.float64, 1e-10), (torch.float32, 5e-4)])
def test_blocksparse_large_logits(dtype, tol):
    """Regression: with large logits a masked entry's raw score can exceed its row's
    log-sum-exp by far more than float32's exp range; the backward must not produce
    inf * 0 = NaN there. Values and gradients stay finite and match the reference (float32
    to SDPA's own level at these logits, a few 1e-5)."""
    src, N = "((local(w=40) | strided(s=7)) & causal) | (global(at=[5]) & causal)", 300
    cp = patternc.compile(src, q_len=N, num_heads=2, block_size=64)
    q, k, v = make_qkv(1, 2, 2, N, N, D=16, dtype=dtype, grad=True, seed=4)
    dense = oracle(src, N, N, 2)
    for scale in (30.0, 300.0):
        out = attention(cp, q, k, v, scale=scale, backend="blocksparse")
        ref = reference_attention(q, k, v, dense, scale=scale)
        g = torch.randn(ref.shape, dtype=torch.float64, generator=torch.Generator().manual_seed(5))
        assert rel_err(out, ref) <= tol
        for a, b in zip(grads(out, (q, k, v), g.to(dtype)), grads(ref, (q, k, v), g)):
            assert torch.isfinite(a).all()
            assert rel_err(a, b) <= (tol if scale < 100 or dtype == torch.float64 else 2e-3)


def test_blocksparse_chunking_segments_and_merged_groups(monkeypatch):
    """Tiny chunks force the online-softmax kv segments; a tiny group budget forces merged
    groups (FULL tiles masked, dead padding slots). Values and gradients are unchanged."""
    src, Q, KV, H = "random(r=6, seed=1) | (local(w=9) & causal) | sink(3)", 77, 90, 2
    cp = patternc.compile(src, q_len=Q, kv_len=KV, num_heads=H, block_size=8)
    q, k, v = make_qkv(2, H, 1, Q, KV, D=8, dtype=torch.float64, grad=True)
    ref = reference_attention(q, k, v, oracle(src, Q, KV, H))
    g = torch.randn(ref.shape, dtype=torch.float64, generator=torch.Generator().manual_seed(2))
    want = grads(ref, (q, k, v), g)
    configs = [  # (max_groups, chunk_elements, mask cache budget, expected mask mode)
        (24, 64, bsm.MASK_CACHE_ELEMENTS, "cached"),  # shared masks and tile tables, kv segments
        (2, 1 << 22, 0, "evaluated per call"),
        (1, 200, 0, "evaluated per call"),
        (1, 1 << 22, bsm.MASK_CACHE_ELEMENTS, "cached"),  # one merged group using tile ids
    ]
    for max_groups, chunk, cache, mode in configs:
        plan = bsm.Plan(cp.layout, H, "cpu", cp.mask_mod, max_groups=max_groups, mask_cache_elements=cache)
        assert len(plan.groups) <= max_groups + 1
        assert plan.mask_mode.startswith(mode)
        if mode == "cached" and max_groups > 1:
            assert any(g.shared_keep is not None for g in plan.groups)
            assert any(g.tile_ids is not None for g in plan.groups)
        monkeypatch.setattr(bsm, "plan_for", lambda *a, plan=plan: plan)
        out = bsm.blocksparse_attention(cp, q, k, v, 1 / 8 ** 0.5, chunk_elements=chunk)
        assert rel_err(out, ref) <= 1e-10
        for a, b in zip(grads(out, (q, k, v), g), want):
            assert rel_err(a, b) <= 1e-10


def test_blocksparse_touches_only_listed_tiles():
    """Keys in EMPTY tiles never reach the result: NaN there changes nothing."""
    src, N = "local(w=8) & causal", 128
    cp = patternc.compile(src, q_len=N, num_heads=1, block_size=16)
    q, k, v = make_qkv(1, 1, 1, N, N)
    kinds = cp.layout.kinds[0]
    # poison kv block 0 for every query block that does not list it
    k2, v2 = k.clone(), v.clone()
    k2[..., :16, :] = float("nan")
    v2[..., :16, :] = float("nan")
    out = attention(cp, q, k2, v2, backend="blocksparse")
    listed = np.repeat(kinds[:, 0] != patternc.EMPTY, 16)
    assert torch.isfinite(out[0, 0, ~torch.from_numpy(listed)]).all()
    ref = reference_attention(q, k, v, oracle(src, N, N, 1))
    rows = ~torch.from_numpy(listed)
    assert rel_err(out[0, 0, rows], ref[0, 0, rows]) <= 1e-5


# ---- empty rows -------------------------------------------------------------------------------
EMPTY_CASES = [
    ("none", 20, 20),
    ("causal - local(w=4)", 40, 40),  # rows 0..3 have no key
    ("global(at=[5]) & ~causal", 33, 47),  # only row 5 attends
    ("heads(none, local(w=3) & causal)", 30, 30),
]


@pytest.mark.parametrize("backend", ["blocksparse", "sdpa"])
@pytest.mark.parametrize("src,Q,KV", EMPTY_CASES)
def test_empty_rows_are_zero_with_finite_gradients(src, Q, KV, backend):
    H = 2
    cp = patternc.compile(src, q_len=Q, kv_len=KV, num_heads=H, block_size=8)
    q, k, v = make_qkv(1, H, H, Q, KV, grad=True)
    out = attention(cp, q, k, v, backend=backend)
    dense = oracle(src, Q, KV, H)
    empty = torch.from_numpy(~dense.any(-1))  # [H, Q]
    assert empty.any()
    assert torch.isfinite(out).all()
    assert (out[0][empty] == 0).all()
    ref = reference_attention(q, k, v, dense)
    assert rel_err(out, ref) <= 1e-5
    gq, gk, gv = torch.autograd.grad(out.sum(), (q, k, v), allow_unused=True)
    for g in (gq, gk, gv):
        assert g is None or torch.isfinite(g).all()
    if gq is not None:
        assert (gq[0][empty] == 0).all()


# ---- hypothesis: small random patterns --------------------------------------------------------
_prims = st.one_of(
    st.sampled_from(["all", "none", "causal"]),
    st.integers(1, 9).map(lambda w: f"local(w={w})"),
    st.tuples(st.integers(0, 5), st.integers(0, 5)).map(lambda t: f"band(left={t[0]}, right={t[1]})"),
    st.integers(1, 6).map(lambda s: f"strided(s={s})"),
    st.tuples(st.integers(1, 3), st.integers(1, 4)).map(lambda t: f"dilated(w={t[0]}, d={t[1]})"),
    st.integers(1, 12).map(lambda n: f"chunk(l={n})"),
    st.integers(0, 5).map(lambda n: f"sink(n={n})"),
    st.integers(0, 4).map(lambda n: f"global(n={n})"),
    st.integers(0, 9).map(lambda n: f"prefix(n={n})"),
    st.tuples(st.integers(0, 4), st.integers(0, 5)).map(lambda t: f"random(r={t[0]}, seed={t[1]})"),
    st.tuples(st.integers(2, 8), st.integers(1, 2)).map(lambda t: f"fixed({t[0] * t[1]}, {t[1]})"),
)


def _combine(children):
    un = children.map(lambda a: f"~({a})")
    bin_ = st.tuples(children, st.sampled_from(["&", "|", "-"]), children).map(lambda t: f"({t[0]}) {t[1]} ({t[2]})")
    heads = st.tuples(children, children).map(lambda t: f"heads({t[0]}, {t[1]})")
    blocks = st.tuples(st.integers(1, 4), children).map(lambda t: f"blocks({t[0]}, {t[1]})")
    return st.one_of(un, bin_, heads, blocks)


patterns = st.recursive(_prims, _combine, max_leaves=4)


@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(src=patterns, Q=st.integers(1, 45), KV=st.integers(1, 45), H=st.sampled_from([1, 2, 4]),
       gqa=st.booleans(), qb=st.sampled_from([1, 4, 8, 16]), kb=st.sampled_from([4, 8, 16]),
       data=st.data())
def test_hypothesis_blocksparse_and_sdpa_match_reference(src, Q, KV, H, gqa, qb, kb, data):
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            cp = patternc.compile(src, q_len=Q, kv_len=KV, num_heads=H, block_size=(qb, kb))
            dense = oracle(src, Q, KV, H)
    except patternc.PatternError:
        assume(False)
    H_kv = 1 if gqa else H
    q, k, v = make_qkv(1, H, H_kv, Q, KV, D=8, dtype=torch.float64, seed=data.draw(st.integers(0, 99)),
                       grad=True)
    ref = reference_attention(q, k, v, dense)
    for backend in ("blocksparse", "sdpa"):
        out = attention(cp, q, k, v, backend=backend)
        assert rel_err(out, ref) <= 1e-10, backend
    out = attention(cp, q, k, v, backend="blocksparse")
    g = torch.ones_like(ref)
    for a, b in zip(grads(out, (q, k, v), g), grads(ref, (q, k, v), g)):
        assert torch.isfinite(a).all()
        assert rel_err(a, b) <= 1e-10


# ---- dropout ----------------------------------------------------------------------------------
def test_blocksparse_dropout_gradients_are_exact():
    """With a fixed seed the dropped-out forward is a deterministic function of q, k, v; its
    backward (which regenerates the masks) must match finite differences."""
    src = "(local(w=5) & causal) | sink(2)"
    cp = patternc.compile(src, q_len=19, kv_len=19, num_heads=2, block_size=4)
    q, k, v = make_qkv(1, 2, 1, 19, 19, D=4, dtype=torch.float64, grad=True)

    def f(q, k, v):
        torch.manual_seed(123)
        return bsm.blocksparse_attention(cp, q, k, v, 0.5, dropout_p=0.3, chunk_elements=128)

    assert torch.autograd.gradcheck(f, (q, k, v), eps=1e-6, atol=1e-6)
    with torch.no_grad():
        plain = bsm.blocksparse_attention(cp, q, k, v, 0.5)
        dropped = f(q, k, v)
    assert not torch.allclose(plain, dropped)


def test_dropout_averages_to_no_dropout():
    """E[dropout(P) / (1 - p)] = P: the mean over many independent draws (400 batch copies of
    the same q, k, v) approaches the plain output, while one draw is far from it."""
    src = "local(w=6) & causal"
    cp = patternc.compile(src, q_len=24, num_heads=1, block_size=8)
    q, k, v = make_qkv(1, 1, 1, 24, 24, D=8, dtype=torch.float64)
    plain = attention(cp, q, k, v, backend="blocksparse")
    torch.manual_seed(0)
    n = 400
    draws = attention(cp, q.expand(n, -1, -1, -1), k.expand(n, -1, -1, -1), v.expand(n, -1, -1, -1),
                      backend="blocksparse", dropout_p=0.5)
    assert rel_err(draws[:1], plain) > 0.3  # one draw: dropout really drops
    assert rel_err(draws.mean(0, keepdim=True), plain) < 0.15  # expected ~0.05


# ---- choice of backend, errors ------------------------------------------------------------
def test_auto_policy_on_cpu():
    cp = patternc.compile("causal", q_len=32, num_heads=2, block_size=8)
    q, k, v = make_qkv(1, 2, 2, 32, 32)
    assert choose_backend(cp, q, k, v) == "sdpa"
    assert attention(cp, q, k, v, return_backend=True)[1] == "sdpa"
    cp2 = patternc.compile("local(w=4) & causal", q_len=32, num_heads=2, block_size=8)
    name, why = choose_backend(cp2, q, k, v, explain=True)
    assert name == "blocksparse" and "CPU" in why
    q.requires_grad_()
    assert attention(cp2, q, k, v, return_backend=True)[1] == "blocksparse"


def test_flex_refuses_cpu_backward_with_a_clear_error():
    cp = patternc.compile("local(w=4) & causal", q_len=32, num_heads=1, block_size=8)
    q, k, v = make_qkv(1, 1, 1, 32, 32, grad=True)
    with pytest.raises(patternc.PatternError) as e:
        attention(cp, q, k, v, backend="flex")
    assert e.value.code == "P352" and "no backward on CPU" in str(e.value) and "blocksparse" in str(e.value)


@pytest.mark.parametrize("bad,code,needle", [
    (lambda q, k, v: (q[:, :, :-1], k, v), "P350", "expected q [B, H, 32, D]"),
    (lambda q, k, v: (q, k[:, :, :-1], v[:, :, :-1]), "P350", "KV_LEN=32"),
    (lambda q, k, v: (q[:, :1], k[:, :1], v[:, :1]), "P350", "compiled for num_heads=2"),
    (lambda q, k, v: (q, k[:, :, :, :8], v), "P350", "head dims differ"),
    (lambda q, k, v: (q[0], k, v), "P350", "4-D"),
    (lambda q, k, v: (q, k.double(), v), "P351", "dtypes differ"),
    (lambda q, k, v: (q.int(), k.int(), v.int()), "P351", "unsupported dtype"),
    (lambda q, k, v: (q, torch.cat([k, k, k], 1), torch.cat([v, v, v], 1)), "P350", "does not divide"),
])
def test_input_errors(bad, code, needle):
    cp = patternc.compile("heads(causal, local(w=3))", q_len=32, num_heads=2, block_size=8)
    q, k, v = make_qkv(1, 2, 2, 32, 32)
    with pytest.raises(patternc.PatternError) as e:
        check_inputs(cp, *bad(q, k, v))
    assert e.value.code == code and needle in str(e.value), str(e.value)


def test_unknown_backend_suggests():
    cp = patternc.compile("causal", q_len=8, num_heads=1, block_size=8)
    q, k, v = make_qkv(1, 1, 1, 8, 8)
    with pytest.raises(patternc.PatternError, match="did you mean `blocksparse`"):
        attention(cp, q, k, v, backend="blocksparce")


def test_head_independent_layout_broadcasts_over_heads():
    """A pattern without heads(...) compiled for one head runs for any H."""
    src = "local(w=5) & causal"
    cp = patternc.compile(src, q_len=30, num_heads=1, block_size=8)
    q, k, v = make_qkv(2, 3, 3, 30, 30)
    ref = reference_attention(q, k, v, oracle(src, 30, 30, 1))
    for backend in ("blocksparse", "sdpa"):
        assert rel_err(attention(cp, q, k, v, backend=backend), ref) <= 1e-5


def test_plans_are_cached_per_device_and_heads():
    cp = patternc.compile("local(w=5) & causal", q_len=30, num_heads=2, block_size=8)
    p1 = bsm.plan_for(cp.layout, 2, "cpu", cp.mask_mod)
    assert bsm.plan_for(cp.layout, 2, "cpu", cp.mask_mod) is p1
    with pytest.raises(ValueError, match="2 heads"):
        bsm.plan_for(cp.layout, 4, "cpu", cp.mask_mod)
    # the plan computes exactly the listed tiles (no merging needed here)
    assert p1.computed_tiles == int((cp.layout.kinds != patternc.EMPTY).sum())


def test_compiled_pattern_satisfies_the_executor_protocol():
    from patternc.execute.common import Compiled

    cp = patternc.compile("local(w=4) & causal", q_len=16, block_size=4)
    assert isinstance(cp, Compiled)
    for name in ("q_len", "kv_len", "num_heads", "layout", "pattern", "block_size", "is_causal_only", "needs",
                 "runtime_inputs", "plan_for", "mask_mod_on", "block_mask", "dense_mask", "layout_at"):
        assert name in set(Compiled.__annotations__) | set(vars(Compiled)), name
    assert not isinstance(object(), Compiled)
    from exec_support import StandIn

    assert isinstance(StandIn("causal", q_len=8, block_size=4), Compiled)


def test_compare_with_reference_measures_the_error_in_chunks(monkeypatch):
    from patternc.execute import reference as ref_mod

    src, Q, KV, H = "(local(w=8) | sink(n=2)) & causal", 70, 70, 2
    cp = patternc.compile(src, q_len=Q, kv_len=KV, num_heads=H, block_size=16)
    q, k, v = make_qkv(1, H, H, Q, KV, D=8)
    out = attention(cp, q, k, v, backend="blocksparse")
    monkeypatch.setattr(ref_mod, "REFERENCE_CHUNK_BYTES", 8 * H * KV * 16)  # 16 rows per chunk: 5 chunks
    calls = []
    good = ref_mod.compare_with_reference(cp, q, k, v, out, on_chunk=lambda: calls.append(1))
    assert len(calls) == 5 and good["rel_error"] <= 1e-5
    dense = reference_attention(q, k, v, oracle(src, Q, KV, H))
    bad = out.clone()
    bad[0, 1, 40, 0] += 0.5
    err = ref_mod.compare_with_reference(cp, q, k, v, bad)
    want = float((bad.double() - dense).norm() / dense.norm())
    assert abs(err["max_abs_error"] - 0.5) < 1e-5 and abs(err["rel_error"] - want) < 1e-9
    bad[0, 0, 3, 1] = float("nan")
    assert math.isnan(ref_mod.compare_with_reference(cp, q, k, v, bad)["max_abs_error"])
