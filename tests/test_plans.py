"""Execution plans (SPEC §6, issue 10): the planner's terms against the oracle, and planned
attention against the float64 reference and natural-order attention."""

from __future__ import annotations

import math
import warnings

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

import patternc
from patternc.lower.layout import BlockLayout
from patternc.lower.planner import plan_layer
from patternc.reference import dense_mask as oracle

torch = pytest.importorskip("torch")

from patternc.execute.blocksparse import blocksparse_attention, run_terms  # noqa: E402
from patternc.execute.reference import reference_attention  # noqa: E402
from strategies import patterns  # noqa: E402


def _compile(src, **kw):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return patternc.compile(src, **kw)


def _forced(cp):
    """The plan with every reordered term kept (small sizes: the cost model prefers natural)."""
    return plan_layer(cp.head_patterns, np.asarray(cp.layout.kinds), cp.q_len, cp.kv_len, cp.block_size,
                      cp.num_heads, force=True)


def check_terms(cp, plan):
    """Terms are disjoint, their union is the pattern, every term's pairs lie in its gathered
    rows/columns, and its kinds are the oracle's tile kinds in its order."""
    full = oracle(cp.pattern, q_len=cp.q_len, kv_len=cp.kv_len, num_heads=cp.num_heads)
    count = np.zeros(full.shape, dtype=np.int64)
    for t in plan.terms:
        ms = oracle(t.pattern, q_len=cp.q_len, kv_len=cp.kv_len, num_heads=cp.num_heads)
        qp, kp = t.q_positions(cp.q_len), t.kv_positions(cp.kv_len)
        for n, h in enumerate(t.heads):
            m = ms[h]
            inside = np.zeros_like(m)
            inside[np.ix_(qp, kp)] = True
            assert not (m & ~inside).any(), f"term {t.text} has pairs outside its gather"
            perm = m[np.ix_(qp, kp)]
            if perm.size:
                ref = BlockLayout.from_dense(perm[None], cp.block_size).kinds[0]
                np.testing.assert_array_equal(t.kinds[n if t.kinds.shape[0] > 1 else 0], ref,
                                              err_msg=f"kinds of term {t.text} in its order")
            count[h] += m
    assert count.max(initial=0) <= 1, "terms overlap"
    np.testing.assert_array_equal(count.astype(bool), full)


# ---- what the planner finds --------------------------------------------------------------------
def test_strided_runs_in_residue_order_under_a_fifth_of_natural_tiles():
    cp = _compile("(local(w=64) | strided(s=64)) & causal", q_len=4096, block_size=64)
    plan = cp.plan
    orders = {t.q_order.kind for t in plan.terms}
    assert "residue" in orders and "natural" in orders
    res = next(t for t in plan.terms if t.q_order.kind == "residue")
    assert res.q_order.stride == 64 and res.kv_order.stride == 64
    assert plan.computed_tiles * 5 < plan.natural_tiles
    assert plan.natural_tiles == int((cp.layout.kinds != 0).sum())
    assert plan.cost < plan.natural_cost


def test_fixed_gathers_its_summary_columns():
    cp = _compile("fixed(256, 32) & causal", q_len=4096, block_size=128)
    plan = cp.plan
    g = next(t for t in plan.terms if t.kv_order.kind == "front")
    assert g.kv_count == 4096 // 256 * 32  # only the summary columns are read
    assert str(g.kv_order.front) == "summary(l=256, c=32)"
    assert plan.computed_tiles * 2 < plan.natural_tiles


@pytest.mark.parametrize("src", ["local(w=256) & causal", "band(3, 100)", "chunk(l=256) & causal", "causal",
                                 "sink(n=4) | local(w=128) & causal"])
def test_windows_stay_natural(src):
    cp = _compile(src, q_len=2048, block_size=128)
    assert cp.plan.is_natural and len(cp.plan.terms) == 1
    assert cp.plan.computed_tiles == cp.plan.natural_tiles


def test_heads_and_layers_plan_per_head():
    src = "layers(causal, heads(strided(s=64) & causal, local(w=64) & causal))"
    cp = _compile(src, q_len=4096, num_heads=4, block_size=64, layer=1)
    plan = cp.plan
    res = [t for t in plan.terms if t.q_order.kind == "residue"]
    assert res and all(set(t.heads) == {0, 2} for t in res)
    assert any(t.q_order.kind == "natural" and set(t.heads) == {1, 3} for t in plan.terms)
    assert plan.computed_tiles < plan.natural_tiles / 4


def test_natural_plan_is_one_term_and_json_ready():
    import json

    cp = _compile("(local(w=64) | strided(s=64)) & causal", q_len=1024, block_size=64)
    nat = cp.plan_for("natural")
    assert len(nat.terms) == 1 and nat.computed_tiles == nat.natural_tiles
    d = json.loads(json.dumps(cp.plan.to_dict()))
    assert d["computed_tiles"] == cp.plan.computed_tiles and d["natural_tiles"] == cp.plan.natural_tiles
    assert all({"pattern", "q_order", "kv_order", "computed_tiles"} <= set(t) for t in d["terms"])


@pytest.mark.parametrize("src,Q,KV,H,bs", [
    ("(local(w=64) | strided(s=64)) & causal", 1000, 1000, 1, 64),
    ("fixed(64, 8) & causal", 700, 650, 1, 32),
    ("heads(strided(s=7), global(at=[3, 90]) | local(w=5), dilated(w=3, d=5) - causal)", 97, 130, 3, 16),
    ("(strided(s=5) | summary(l=16, c=3) | sink(n=2)) & ~chunk(l=9)", 130, 97, 2, (8, 16)),
])
def test_plan_terms_against_the_oracle(src, Q, KV, H, bs):
    cp = _compile(src, q_len=Q, kv_len=KV, num_heads=H, block_size=bs)
    check_terms(cp, cp.plan)
    check_terms(cp, _forced(cp))


# ---- planned attention against the float64 reference ----------------------------------------------
def _rel(a, b):
    return float((a.detach().double() - b.detach()).abs().max() / b.detach().abs().max().clamp(min=1e-30))


def _run_case(cp, plan, B, H_kv, dtype, seed=0):
    g = torch.Generator().manual_seed(seed)
    H, Q, KV = cp.num_heads, cp.q_len, cp.kv_len
    q = torch.randn(B, H, Q, 16, generator=g, dtype=torch.float64)
    k = torch.randn(B, H_kv, KV, 16, generator=g, dtype=torch.float64)
    v = torch.randn(B, H_kv, KV, 8, generator=g, dtype=torch.float64)
    dout = torch.randn(B, H, Q, 8, generator=g, dtype=torch.float64)
    mask = oracle(cp.pattern, q_len=Q, kv_len=KV, num_heads=H)
    qd, kd, vd = (x.clone().requires_grad_() for x in (q, k, v))
    ref = reference_attention(qd, kd, vd, mask)
    ref.backward(dout)
    xs = [x.to(dtype).requires_grad_() for x in (q, k, v)]
    out = blocksparse_attention(cp, *xs, 1 / math.sqrt(16), plan=plan)
    out.backward(dout.to(dtype))
    return (_rel(out, ref), *(_rel(x.grad, r.grad) for x, r in zip(xs, (qd, kd, vd)))), out, xs


@pytest.mark.parametrize("src,Q,KV,H,H_kv,bs", [
    ("(local(w=16) | strided(s=16)) & causal", 300, 300, 2, 1, 16),
    ("fixed(32, 4) & causal", 191, 232, 2, 2, 16),
    ("heads(strided(s=7) & causal, global(at=[3, 90]) | local(w=5))", 97, 130, 4, 2, 16),
    ("(strided(s=5) | sink(n=3)) - causal", 130, 97, 1, 1, (8, 16)),
    ("dilated(w=4, d=6) | summary(l=16, c=3)", 64, 40, 2, 1, 8),
])
def test_planned_attention_matches_reference(src, Q, KV, H, H_kv, bs):
    cp = _compile(src, q_len=Q, kv_len=KV, num_heads=H, block_size=bs)
    plan = _forced(cp)
    assert len(plan.terms) > 1
    errs, _, _ = _run_case(cp, plan, 2, H_kv, torch.float32)
    assert errs[0] <= 1e-5 and max(errs[1:]) <= 1e-4, errs
    errs64, _, _ = _run_case(cp, plan, 1, H_kv, torch.float64)
    assert max(errs64) <= 1e-10, errs64
    errs_bf, _, _ = _run_case(cp, plan, 1, H_kv, torch.bfloat16)
    assert max(errs_bf) <= 5e-2, errs_bf


def test_empty_rows_are_zero_with_finite_grads_under_a_plan():
    # rows 0..4 keep nothing: strided(3) - causal keeps j > i only; rows >= 60 have no key
    cp = _compile("(strided(s=3) | summary(l=8, c=2)) & ~causal & sink(n=60)", q_len=70, kv_len=70,
                  block_size=8)
    plan = _forced(cp)
    assert len(plan.terms) > 1
    errs, out, xs = _run_case(cp, plan, 1, 1, torch.float32)
    assert errs[0] <= 1e-5 and max(errs[1:]) <= 1e-4
    assert torch.all(out[:, :, 60:] == 0)
    assert all(torch.isfinite(x.grad).all() for x in xs)


def test_plan_auto_is_the_default_and_lse_is_returned():
    cp = _compile("(local(w=32) | strided(s=32)) & causal", q_len=1024, block_size=32)
    assert not cp.plan.is_natural
    q, k, v = (torch.randn(1, 1, 1024, 16) for _ in range(3))
    a = cp.attention(q, k, v)
    b = cp.attention(q, k, v, plan="natural")
    assert _rel(a, b.double()) <= 1e-5
    from patternc.execute.blocksparse import plan_terms

    _, lse = run_terms(q, k, v, plan_terms(cp, cp.plan, "cpu"), 0.25, return_lse=True)
    s = (q.double() @ k.double().transpose(-1, -2)) * 0.25
    mask = torch.as_tensor(oracle(cp.pattern, q_len=1024))
    ref = torch.logsumexp(s.masked_fill(~mask, float("-inf")), -1)
    assert float((lse.double() - ref).abs().max()) <= 1e-4


def test_unknown_plan_is_a_diagnostic():
    cp = _compile("local(w=4) & causal", q_len=16)
    q = torch.randn(1, 1, 16, 8)
    with pytest.raises(patternc.PatternError, match="P352"):
        cp.attention(q, q, q, plan="fastest")


# ---- random patterns ------------------------------------------------------------------------------
@settings(max_examples=40, deadline=None)
@given(p=patterns(max_leaves=5), Q=st.integers(1, 70), KV=st.integers(1, 70),
       bs=st.sampled_from([4, 8, (4, 8)]), H=st.integers(1, 3))
def test_random_plans_are_exact(p, Q, KV, bs, H):
    from patternc.ir.normalize import normalize

    cp = _compile(normalize(p), q_len=Q, kv_len=KV, num_heads=H, block_size=bs)
    for plan in (_forced(cp), cp.plan):
        check_terms(cp, plan)
        assert plan.cost <= plan.natural_cost or plan is not cp.plan
    plan = _forced(cp)
    g = torch.Generator().manual_seed(0)
    q = torch.randn(1, H, Q, 8, generator=g, dtype=torch.float64)
    k = torch.randn(1, H, KV, 8, generator=g, dtype=torch.float64)
    v = torch.randn(1, H, KV, 4, generator=g, dtype=torch.float64)
    planned = blocksparse_attention(cp, q, k, v, 0.3, plan=plan)
    natural = blocksparse_attention(cp, q, k, v, 0.3, plan="natural")
    assert float((planned - natural).abs().max()) <= 1e-10


# ---- command line -----------------------------------------------------------------------------------
def _cli(capsys, *argv):
    from patternc.cli import main

    code = main(list(argv))
    out, err = capsys.readouterr()
    return code, out, err


def test_compile_prints_the_plan_and_json_carries_it(capsys):
    import json

    src = "(local(w=64) | strided(s=64)) & causal"
    code, out, _ = _cli(capsys, "compile", "-e", src, "--seq-len", "2048", "--block-size", "64")
    assert code == 0 and "plan: 2 terms" in out and "residue mod 64" in out
    code, out, _ = _cli(capsys, "compile", "-e", src, "--seq-len", "2048", "--block-size", "64", "--json")
    obj = json.loads(out)
    cp = _compile(src, q_len=2048, block_size=64)
    assert obj["plan"]["computed_tiles"] == cp.plan.computed_tiles
    assert obj["plan"]["natural_tiles"] == int((cp.layout.kinds != 0).sum())
    assert obj["plan"]["computed_tiles"] * 5 < obj["plan"]["natural_tiles"]
    code, out, _ = _cli(capsys, "show", "-e", src, "--seq-len", "1024", "--block-size", "64", "--plan-term", "1")
    rows = [r for r in out.splitlines() if r and set(r) <= set("#+.")]
    assert code == 0 and len(rows) == 16 and all(r[i] == "+" and r.count("+") == 1 for i, r in enumerate(rows))
    code, _, err = _cli(capsys, "show", "-e", src, "--seq-len", "1024", "--plan-term", "5")
    assert code == 2 and "--plan-term" in err


@pytest.mark.parametrize("plan", ["auto", "natural"])
def test_run_takes_a_plan(capsys, plan):
    import json

    code, out, _ = _cli(capsys, "run", "-e", "(local(w=16) | strided(s=16)) & causal", "--seq-len", "300",
                        "--heads", "2", "--head-dim", "16", "--block-size", "16", "--plan", plan, "--check",
                        "--no-dense", "--repeats", "1", "--json")
    obj = json.loads(out)
    assert code == 0 and obj["check_passed"] and obj["plan"]["mode"] == plan
    assert (obj["plan"]["terms"] == 1) == (plan == "natural")


# ---- the kernel's score hook (the interface score terms build on) -------------------------------------
class _Softcap:
    """``c * tanh(s / c)`` plus a per-head ALiBi-like bias, with its derivative."""

    def __init__(self, c):
        self.c = c

    def __call__(self, s, heads, q_pos, kv_pos):
        bias = 0.01 * (heads[:, None, None] + 1) * (kv_pos[:, None, :] - q_pos[:, :, None])
        return torch.tanh(s / self.c) * self.c + bias

    def derivative(self, s, heads, q_pos, kv_pos):
        return 1 - torch.tanh(s / self.c) ** 2


def test_score_mod_hook_sees_natural_positions_in_every_term():
    cp = _compile("(local(w=16) | strided(s=16)) & causal", q_len=200, kv_len=230, num_heads=2, block_size=16)
    plan = _forced(cp)
    assert len(plan.terms) > 1 and any(t.q_order.kind == "residue" for t in plan.terms)
    g = torch.Generator().manual_seed(1)
    q, k, v = (torch.randn(1, 2, n, 8, generator=g, dtype=torch.float64) * 3 for n in (200, 230, 230))
    dout = torch.randn(1, 2, 200, 8, generator=g, dtype=torch.float64)
    hook = _Softcap(2.0)
    from patternc.execute.blocksparse import plan_terms

    xs = [x.clone().requires_grad_() for x in (q, k, v)]
    out = run_terms(*xs, plan_terms(cp, plan, "cpu"), 0.5, score_mod=hook)
    out.backward(dout)
    # reference: dense float64 with the same transform
    rs = [x.clone().requires_grad_() for x in (q, k, v)]
    s = rs[0] @ rs[1].transpose(-1, -2) * 0.5
    h = torch.arange(2)[:, None, None]
    i, j = torch.arange(200)[:, None], torch.arange(230)[None, :]
    s = torch.tanh(s / 2.0) * 2.0 + 0.01 * (h + 1) * (j - i)
    mask = torch.as_tensor(oracle(cp.pattern, q_len=200, kv_len=230, num_heads=2))
    p = torch.softmax(s.masked_fill(~mask, float("-inf")), -1).nan_to_num(0.0)
    ref = p @ rs[2]
    ref.backward(dout)
    assert _rel(out, ref) <= 1e-10
    for a, b in zip(xs, rs):
        assert _rel(a.grad, b.grad) <= 1e-9


def test_residue_plans_hold_at_long_sequences_without_pair_evaluation():
    # 65,536 tokens: Q x KV = 2^32 pairs is past the evaluation budget, but natural and
    # residue-order kinds are analytic, so the plan is made (it was natural before)
    from patternc.lower import planner

    cp = _compile("(local(w=128) | strided(s=128)) & causal", q_len=65536, block_size=128)
    assert 65536 * 65536 > planner.PLAN_EVAL_ELEMENTS
    plan = cp.plan
    assert not plan.is_natural and any(t.q_order.kind == "residue" for t in plan.terms)
    # hand count: local(w=128) & causal is 2 tiles per query block but the first (512 blocks);
    # the strided term in residue order is 128 classes of 512 positions (4 blocks), causal within
    # each: 4 + 3 + 2 + 1 tiles per class
    assert plan.computed_tiles == (2 * 512 - 1) + 128 * 10
    assert plan.computed_tiles * 50 < plan.natural_tiles


def test_offsets_keep_natural_order_and_say_why():
    cp = _compile("(local(w=128) | strided(s=128)) & causal", q_len=1024, kv_len=2048, q_offset=1024,
                  block_size=128)
    assert cp.plan.is_natural
    assert "offset" in cp.plan.note and "asked" not in cp.plan.note
