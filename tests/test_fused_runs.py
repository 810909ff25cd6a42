"""The CPU kernel's fused path (issue 10): strided runs on zero-copy views (execute/fused.py),
causal staircases, and the kernel's own tile size. Every value is checked against the float64
reference attention over the mask oracle (``patternc.reference.dense_mask``)."""

from __future__ import annotations

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import patternc
from patternc.lower.layout import EMPTY, FULL, PARTIAL

torch = pytest.importorskip("torch")

from patternc.execute import blocksparse as bs  # noqa: E402
from patternc.execute import fused  # noqa: E402
from patternc.execute.reference import reference_attention  # noqa: E402
from strategies import patterns  # noqa: E402

pytestmark = pytest.mark.skipif(bs._FLASH is None, reason="this torch has no fused CPU flash kernel")


def _qkv(B, H, H_kv, Q, KV, D, seed=0):
    g = torch.Generator().manual_seed(seed)
    mk = lambda *s: torch.randn(*s, generator=g).requires_grad_()  # noqa: E731
    return mk(B, H, Q, D), mk(B, H_kv, KV, D), mk(B, H_kv, KV, D), torch.randn(B, H, Q, D, generator=g)


def _check(cp, q, k, v, do, *, plan="auto", fwd_tol=1e-5, grad_tol=1e-4):
    """blocksparse forward and q/k/v gradients vs the float64 reference (relative to the max)."""
    dense = patternc.reference.dense_mask(cp.pattern, q_len=cp.q_len, kv_len=cp.kv_len, num_heads=q.shape[1])
    out = bs.blocksparse_attention(cp, q, k, v, 0.3, plan=plan)
    grads = torch.autograd.grad(out, (q, k, v), do)
    x64 = [t.detach().double().requires_grad_() for t in (q, k, v)]
    ref = reference_attention(*x64, dense, scale=0.3)
    ref_grads = torch.autograd.grad(ref, x64, do.double())
    rel = lambda a, b: float((a.detach().double() - b.detach()).abs().max() / b.detach().abs().max().clamp(min=1e-30))  # noqa: E731
    assert rel(out, ref) <= fwd_tol
    for g, r in zip(grads, ref_grads):
        assert torch.isfinite(g).all()
        assert rel(g, r) <= grad_tol
    return out


def _fused_of(cp, device="cpu"):
    term = bs.natural_term(cp, device)
    return bs._term_plan(term, cp.num_heads, device).fused(term.mask_mod)


# ---- run structure, by hand count ----------------------------------------------------------------
def test_a_band_is_one_sliding_run_after_its_causal_start():
    # local(w=8) & causal at 4-token tiles: rows 0, 1 form a staircase (spans [0,1), [0,2)), then
    # every row reads blocks i-2..i (w=8 reaches 7 back: 3 blocks), sliding one block per row
    cp = patternc.compile("local(w=8) & causal", q_len=40, block_size=4)
    kinds = np.asarray(cp.layout.kinds)
    lo, hi, ok = fused._spans(kinds, fused.HOLE_FRACTION)
    assert fused._staircases(lo, hi, ok) == [(0, 0, 3, 0)]  # rows 0..2: spans of 1, 2, 3 blocks from 0
    fz = fused.build(bs.plan_for(cp.layout, 1, "cpu", cp.mask_mod), np.array(kinds), True, cp.mask_mod,
                     plan_cls=bs.Plan, mask_cache_elements=1 << 24, mask_eval_elements=1 << 29)
    shapes = sorted((r.q0, r.tau, r.kv0, r.sigma, r.rows, r.m, r.span, r.causal) for r in fz.runs)
    assert shapes == [(0, 1, 0, 0, 1, 3, 3, True), (3, 1, 1, 1, 7, 1, 3, False)]
    assert fz.rest.groups == []  # every row is in a run
    # the sliding run's rows share one mask: one bias, not one per row
    assert fz.runs[[r.q0 for r in fz.runs].index(3)].bias.shape[0] == 1


def test_causal_is_one_staircase_without_a_bias_and_chunks_step_together():
    cp = patternc.compile("causal", q_len=64, block_size=8)
    fz = _fused_of(cp)
    (run,) = fz.runs
    assert (run.rows, run.m, run.span, run.causal, run.ids) == (1, 8, 8, True, None)
    cp = patternc.compile("chunk(l=16) & causal", q_len=64, block_size=8)
    (run,) = _fused_of(cp).runs  # 4 chunks of 2 blocks: one run, each row a causal 16 x 16
    assert (run.q0, run.tau, run.kv0, run.sigma, run.rows, run.m, run.span, run.causal) == (0, 2, 0, 2, 4, 2, 2, True)


def test_rows_with_holes_or_no_pattern_go_to_the_gather_path():
    # strided in natural order: each row reads every 4th block, far too many holes for a span
    cp = patternc.compile("strided(s=16) & causal", q_len=128, block_size=4)
    fz = _fused_of(cp)
    kinds = np.asarray(cp.layout.kinds)[0]
    gathered = sum(g.num_rows for g in fz.rest.groups)
    in_runs = sum(r.rows * r.m for r in fz.runs)
    assert in_runs + gathered == int((kinds != EMPTY).any(-1).sum())
    assert gathered > 0


def test_estimate_cost_prefers_finer_tiles_for_a_band_and_counts_staircases_at_half():
    k128 = np.zeros((1, 4, 4), dtype=np.uint8)
    k128[0][np.tril_indices(4)] = FULL
    k128[0][np.diag_indices(4)] = PARTIAL
    # a causal staircase of 4 rows of 128: half of (512 x 512) pairs, 512-row kernel rows
    assert fused.estimate_cost(k128, 128) == pytest.approx(0.5 * 512 * 512 * fused._pair_cost(512))
    band = patternc.compile("local(w=256) & causal", q_len=4096, block_size=128)
    lay32, lay128 = band.layout_at(32), band.layout
    assert fused.estimate_cost(np.asarray(lay32.kinds), 32) < fused.estimate_cost(np.asarray(lay128.kinds), 128)
    fwd, bwd = bs.kernel_layouts(lay128, band.layout_at)
    assert fwd.q_block_size == 32 and bwd.q_block_size in (32, 64, 128)
    # the finer layout keeps the same pairs (the oracle's)
    dense = patternc.reference.dense_mask("local(w=256) & causal", q_len=4096)[0]
    for lay in (fwd, bwd):
        assert lay.q_len == 4096 and lay.kv_len == 4096
        k = np.asarray(lay.kinds)[0]
        b = lay.q_block_size
        covered = np.repeat(np.repeat(k != EMPTY, b, 0), b, 1)[:4096, :4096]
        assert not (dense & ~covered).any()


# ---- exact values -------------------------------------------------------------------------------
@pytest.mark.parametrize("src,Q,KV,bsz", [
    ("local(w=20) & causal", 100, 100, 8),
    ("local(w=20) & causal", 77, 130, 8),  # Q_LEN != KV_LEN, ragged tiles
    ("causal", 90, 90, 16),
    ("chunk(l=24) & causal", 100, 100, 8),
    ("fixed(32, 4) & causal", 150, 170, 16),
    ("(local(w=16) | strided(s=16)) & causal", 150, 150, 16),
    ("sink(n=3) | local(w=10)", 77, 130, 8),
    ("heads(local(w=20), strided(s=8), causal, chunk(l=16)) & causal", 67, 131, 16),
])
def test_fused_path_matches_the_reference(src, Q, KV, bsz):
    cp = patternc.compile(src, q_len=Q, kv_len=KV, num_heads=4, block_size=bsz)
    q, k, v, do = _qkv(2, 4, 2, Q, KV, 32)  # batch 2, grouped-query attention (2 kv heads)
    for plan in ("auto", "natural"):
        _check(cp, q, k, v, do, plan=plan)


def test_finer_kernel_tiles_and_forced_plans_match_the_reference():
    # 64-token blocks: the kernel picks 32-token tiles for the band; the forced plan runs the
    # strided term in residue order (a transpose), merged through the log-sum-exp
    from patternc.lower.planner import plan_layer

    cp = patternc.compile("(local(w=48) | strided(s=32)) & causal", q_len=384, num_heads=2, block_size=64)
    plan = plan_layer(cp.head_patterns, np.asarray(cp.layout.kinds), cp.q_len, cp.kv_len, cp.block_size,
                      cp.num_heads, force=True)
    assert any(t.q_order.kind == "residue" for t in plan.terms)
    terms = bs.plan_terms(cp, plan, "cpu")
    assert any(t.q_stride == 32 for t in terms)  # residue order moved by a transpose
    assert any(t.layout.q_block_size < 64 for t in terms)
    q, k, v, do = _qkv(1, 2, 2, 384, 384, 16, seed=1)
    _check(cp, q, k, v, do, plan=plan)


def test_rows_without_keys_give_zero_and_finite_gradients():
    # keys 0..9 are the only ones; queries >= 30 see none (local(w=20) & causal & kv < 10)
    cp = patternc.compile("local(w=20) & causal & (prefix(n=10))", q_len=64, block_size=8)
    q, k, v, do = _qkv(1, 1, 1, 64, 64, 16)
    out = _check(cp, q, k, v, do)
    assert float(out[0, 0, 40:].detach().abs().max()) == 0.0
    _, lse = bs.run_terms(q, k, v, [bs.natural_term(cp, "cpu")], 0.3, return_lse=True)
    assert torch.isinf(lse[0, 0, 40:]).all() and bool((lse[0, 0, 40:] > 0).all())


@pytest.mark.parametrize("scale", [0.0, -0.5])
def test_nonpositive_scale_on_a_staircase(scale):
    # ATen's is_causal gives NaN for scale <= 0: the kernel scales q itself there
    cp = patternc.compile("causal", q_len=40, block_size=8)
    q, k, v, do = _qkv(1, 1, 1, 40, 40, 8)
    out = bs.blocksparse_attention(cp, q, k, v, scale)
    ref = reference_attention(*(x.detach().double() for x in (q, k, v)), np.tril(np.ones((1, 40, 40), bool)), scale=scale)
    assert float((out.detach().double() - ref).abs().max()) < 1e-5
    (dq,) = torch.autograd.grad(out, (q,), do)
    assert torch.isfinite(dq).all()


@settings(max_examples=25, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(p=patterns(max_leaves=4), Q=st.integers(1, 90), KV=st.integers(1, 90), bsz=st.sampled_from([8, 16]),
       H=st.integers(1, 2))
def test_fused_runs_equal_the_gather_path_on_random_patterns(p, Q, KV, bsz, H):
    from patternc.ir.normalize import normalize

    try:
        cp = patternc.compile(normalize(p), q_len=Q, kv_len=KV, num_heads=H, block_size=bsz)
    except patternc.PatternError:
        return
    q, k, v, do = _qkv(1, H, H, Q, KV, 16, seed=Q * 131 + KV)
    with pytest.MonkeyPatch.context() as m:
        m.setattr(bs, "USE_RUNS", False)
        gathered = bs.blocksparse_attention(cp, q, k, v, 0.3, plan="natural")
        g_grads = torch.autograd.grad(gathered, (q, k, v), do)
    runs = bs.blocksparse_attention(cp, q, k, v, 0.3, plan="natural")
    r_grads = torch.autograd.grad(runs, (q, k, v), do)
    assert float((runs - gathered).detach().abs().max()) <= 2e-5
    for a, b in zip(r_grads, g_grads):
        assert float((a - b).abs().max()) <= 1e-4


# ---- FlexAttention over a plan (CUDA path; checked here with eager FlexAttention, forward) -------
@pytest.mark.filterwarnings("ignore::UserWarning")
@pytest.mark.parametrize("src", ["(local(w=40) | strided(s=32)) & causal with alibi()",
                                 "heads(fixed(64, 8) & causal, (local(w=24) | strided(s=16)) & causal)"])
def test_flex_over_a_plan_matches_the_reference(src):
    from torch.nn.attention.flex_attention import flex_attention as eager_flex

    from patternc.execute.flex import flex_plan_attention
    from patternc.lower.planner import plan_layer

    N, H = 300, 2
    cp = patternc.compile(src, q_len=N, num_heads=H, block_size=32)
    ep = plan_layer(cp.head_patterns, np.asarray(cp.layout.kinds), N, N, cp.block_size, H, force=True)
    assert any(t.q_order.kind != "natural" or t.kv_order.kind != "natural" for t in ep.terms)
    g = torch.Generator().manual_seed(3)
    q, k, v = (torch.randn(1, H, N, 16, generator=g) for _ in range(3))
    out = flex_plan_attention(cp, q, k, v, 0.25, ep, fn=eager_flex)
    dense = patternc.reference.dense_mask(cp.pattern, q_len=N, num_heads=H)
    ref = reference_attention(q.double(), k.double(), v.double(), dense, scale=0.25, score_terms=cp.score_terms)
    assert float((out.double() - ref).abs().max() / ref.abs().max()) <= 1e-5
