"""Regression tests for the bugs found by trying patternc as a new user would, with adversarial
inputs, and by the differential fuzz (issue 9, items 2-14). Each test fails on the code before
its fix; the values are checked against the float64 reference / the mask oracle."""

from __future__ import annotations

import warnings

import numpy as np
import pytest

import patternc
from patternc.errors import PatternError, PatternWarning
from patternc.ir.primitives import MAX_INT

torch = pytest.importorskip("torch")

from patternc.execute import attention  # noqa: E402
from patternc.execute.reference import reference_attention  # noqa: E402


def _qkv(B, H, L, D, *, dtype=torch.float32, seed=0, grad=False, kv_heads=None):
    g = torch.Generator().manual_seed(seed)
    out = [torch.randn(B, H if i == 0 else (kv_heads or H), L, D, generator=g).to(dtype) for i in range(3)]
    return [x.requires_grad_() for x in out] if grad else out


def _rel(a, b):
    return float((a.detach().double() - b.detach().double()).norm() / b.detach().double().norm())


# ---- item 2: torch.autocast (CPU, bfloat16) on every backend, forward and backward ----------------------

AUTOCAST_SRC = "(sink(n=4) | local(w=32)) & causal"


def test_issue_example_autocast_nn_forward_backward():
    torch.manual_seed(0)
    m = patternc.nn.SparseSelfAttention(64, 4, AUTOCAST_SRC, block_size=32)
    x = torch.randn(2, 200, 64, requires_grad=True)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        y = m(x)
    assert y.dtype == torch.bfloat16 and torch.isfinite(y.float()).all()
    y.float().square().sum().backward()
    assert x.grad is not None and torch.isfinite(x.grad).all() and x.grad.abs().sum() > 0
    with torch.no_grad():  # the same module without autocast, in float32: bf16 tolerance
        y32 = m(x)
    assert _rel(y.float(), y32) < 3e-2


@pytest.mark.parametrize("backend", ["auto", "blocksparse", "sdpa"])
@pytest.mark.parametrize("src", [AUTOCAST_SRC, "causal"])
def test_autocast_matches_reference(backend, src):
    Q, H, D = 97, 2, 16  # ragged against the 32-token blocks
    cp = patternc.compile(src, q_len=Q, num_heads=H, block_size=32)
    dense = patternc.reference.dense_mask(src, q_len=Q, num_heads=H)
    q, k, v = _qkv(1, H, Q, D, grad=True)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = attention(cp, q, k, v, backend=backend)
        # backward inside the autocast region too (the kernel must not be re-cast there)
        (out.float() * torch.linspace(-1, 1, D)).sum().backward()
    assert out.dtype == torch.bfloat16
    # autocast casts q, k, v to bfloat16: the reference sees those same values in float64
    qb, kb, vb = (x.detach().to(torch.bfloat16).double().requires_grad_() for x in (q, k, v))
    ref = reference_attention(qb, kb, vb, dense)
    assert _rel(out, ref) < 2e-2
    (ref * torch.linspace(-1, 1, D, dtype=torch.float64)).sum().backward()
    for x, r in ((q, qb), (k, kb), (v, vb)):
        assert x.grad.dtype == torch.float32
        assert _rel(x.grad, r.grad) < 5e-2


# ---- item 4: [B, L, H, D] inputs --------------------------------------------------------------------------

def test_transposed_layout_is_recognised():
    cp = patternc.compile("local(w=8) & causal", q_len=64, num_heads=4, block_size=16)
    q, k, v = (x.transpose(1, 2) for x in _qkv(2, 4, 64, 8))  # [B, L, H, D]
    with pytest.raises(PatternError) as e:
        attention(cp, q, k, v)
    msg = str(e.value)
    assert e.value.code == "P350" and "[B, L, H, D]" in msg and "transpose(1, 2)" in msg
    assert "q_len=4" not in msg
    out = attention(cp, q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2))  # the advice works
    assert out.shape == (2, 4, 64, 8)


# ---- item 5: W004 (head cycle), W005 (unused param), W006 (--set on it) ----------------------------------

def test_w004_head_count_not_a_multiple_of_the_head_period():
    with pytest.warns(PatternWarning, match=r"W004.*num_heads=4 .*3 different heads") as rec:
        cp = patternc.compile("heads(strided(s=2), local(w=2), sink(n=1))", q_len=16, num_heads=4, block_size=8)
    assert [w.message.diagnostic.code for w in rec if isinstance(w.message, PatternWarning)] == ["W004"]
    # head 3 cycles back to entry 0 (the oracle agrees): that is what the warning says
    dense = patternc.reference.dense_mask("heads(strided(s=2), local(w=2), sink(n=1))", q_len=16, num_heads=4)
    assert (cp.dense_mask()[3] == dense[0]).all()
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        patternc.compile("heads(strided(s=2), local(w=2), sink(n=1))", q_len=16, num_heads=6, block_size=8)
        patternc.compile("heads(strided(s=2), local(w=2))", q_len=16, num_heads=2, block_size=8)


def _warning_codes(source, params=None):
    _p, res = patternc.source.parse_source(source, params=params)
    return [w.code for w in res.warnings], res.warnings


def test_w005_w006_unused_param():
    codes, ws = _warning_codes("param w = 64\nparam s = 8\nlocal(w=w) & causal\n")
    assert codes == ["W005"] and "`param s`" in ws[0].message and ws[0].span.line == 2
    codes, ws = _warning_codes("param w = 64\nparam s = 8\nlocal(w=w) & causal\n", params={"s": 4})
    assert codes == ["W006"] and "changes nothing" in ws[0].message
    # used ones stay silent: in the expression, in another param's default, in a called def
    assert _warning_codes("param w = 64\nparam v = w * 2\nlocal(w=v)\n")[0] == []
    assert _warning_codes("param w = 64\ndef f() = local(w=w)\nf()\n", params={"w": 8})[0] == []


# ---- item 9: CLI help --------------------------------------------------------------------------------------

@pytest.mark.parametrize("name", ["check", "fmt", "compile", "show", "analyze", "run"])
def test_subcommand_help_has_a_plain_description(name, capsys):
    from patternc.cli import main

    with pytest.raises(SystemExit):
        main([name, "--help"])
    out = capsys.readouterr().out
    assert "``" not in out
    paragraphs = out.split("\n\n")
    assert paragraphs[0].startswith("usage: patternc " + name)
    assert not paragraphs[1].lstrip().startswith(("positional arguments", "options")), out  # a description


# ---- item 10: flex advice, .npy artifacts, block_size pairs -----------------------------------------------

def test_flex_cpu_grad_advice_is_accurate():
    cp = patternc.compile("local(w=8) & causal", q_len=32, block_size=16)
    q, k, v = _qkv(1, 1, 32, 8, grad=True)
    with pytest.raises(PatternError) as e:
        attention(cp, q, k, v, backend="flex")
    assert e.value.code == "P352" and "detach()" in str(e.value) and "torch.no_grad()" in str(e.value)
    # that both pieces of advice work is checked in test_execute_flex.py (it compiles flex once)


def test_load_compiled_on_npy_is_p304(tmp_path):
    path = tmp_path / "kinds.npy"
    np.save(path, np.zeros((1, 2, 2), dtype=np.uint8))
    with pytest.raises(PatternError) as e:
        patternc.load_compiled(path)
    assert e.value.code == "P304" and ".npy" in str(e.value)


@pytest.mark.parametrize("bs", [(12.5, 16), ("16", 16), (True, 16), (16, np.float64(16.0)), 12.5, True])
def test_block_size_pairs_are_not_coerced(bs):
    with pytest.raises(PatternError) as e:
        patternc.compile("causal", q_len=64, block_size=bs)
    assert e.value.code == "P302"


def test_block_size_numpy_ints_still_work():
    cp = patternc.compile("causal", q_len=64, block_size=(np.int64(16), 32))
    assert cp.block_size == (16, 32)


# ---- item 12: canonical text never holds integers >= 2^31 ---------------------------------------------------

@pytest.mark.parametrize("src", [
    "band(left=2147483647, right=0)",
    "band(left=2147483647, right=0) & causal",
    "band(left=2147483647, right=2147483647)",
    "strided(s=65536) & strided(s=65537)",
    "blocks(65536, blocks(65536, causal))",
])
def test_canonical_text_reparses(src):
    p = patternc.parse(src)
    text = str(p)
    ints = [int(t) for t in __import__("re").findall(r"\d+", text)]
    assert max(ints) <= MAX_INT, text
    assert patternc.parse(text) == p
    # the meaning is kept (the oracle evaluates the unnormalised source)
    assert (patternc.reference.dense_mask(src, q_len=40) == patternc.reference.dense_mask(text, q_len=40)).all()


def test_guarded_rewrites_still_fire_below_the_limit():
    assert str(patternc.parse("band(left=3, right=0)")) == "local(w=4) & causal"
    assert str(patternc.parse("strided(s=4) & strided(s=6)")) == "strided(s=12)"
    assert str(patternc.parse("blocks(4, blocks(8, causal))")) == "blocks(32, causal)"


def test_save_load_roundtrip_with_a_huge_band(tmp_path):
    cp = patternc.compile("band(left=2147483647, right=0)", q_len=64, block_size=16)
    cp.save(tmp_path / "a.npz")
    back = patternc.load_compiled(tmp_path / "a.npz")
    assert (back.layout.kinds == cp.layout.kinds).all()


# ---- item 13: scale <= 0 ------------------------------------------------------------------------------------

@pytest.mark.parametrize("backend", ["auto", "sdpa", "blocksparse"])
@pytest.mark.parametrize("scale", [0.0, -0.5])
@pytest.mark.parametrize("src", ["causal", "local(w=100) & causal"])
def test_nonpositive_scale(backend, scale, src):
    cp = patternc.compile(src, q_len=20, block_size=8)
    dense = patternc.reference.dense_mask(src, q_len=20)
    q, k, v = _qkv(1, 1, 20, 4)
    out = attention(cp, q, k, v, scale=scale, backend=backend)
    assert torch.isfinite(out).all()
    assert _rel(out, reference_attention(q, k, v, dense, scale=scale)) < 1e-5


# ---- item 8: torch.compile of a model with SparseSelfAttention ---------------------------------------------

def test_torch_compile_of_the_module_at_new_lengths():
    torch._dynamo.reset()
    torch.manual_seed(0)
    m = patternc.nn.SparseSelfAttention(32, 2, "(local(w=8) | sink(n=2)) & causal", block_size=16)
    cm = torch.compile(m, backend="aot_eager")
    for L in (40, 56):  # lengths never run eagerly before: compiled first inside the compiled call
        x = torch.randn(2, L, 32, requires_grad=True)
        y = cm(x)
        y.square().sum().backward()
        gx, gw = x.grad.clone(), m.q_proj.weight.grad.clone()
        x.grad = None
        m.zero_grad()
        y_eager = m(x)
        y_eager.square().sum().backward()
        torch.testing.assert_close(y, y_eager)
        torch.testing.assert_close(gx, x.grad)
        torch.testing.assert_close(gw, m.q_proj.weight.grad)
        m.zero_grad()
    assert sorted(m._compiled) == [40, 56]


# ---- item 14: every length-dependent parameter is range-checked, on every branch ---------------------------

@pytest.mark.parametrize("src, literal", [
    ("all | local(w=q_len // 2)", "all | local(w=0)"),
    ("none & strided(s=q_len - 1)", "none & strided(s=0)"),
    ("causal | (causal & local(w=q_len // 2))", "causal | (causal & local(w=0))"),
    ("blocks(q_len - 1, all)", "blocks(0, all)"),
])
def test_dropped_branches_are_still_range_checked(src, literal):
    with pytest.raises(PatternError) as lit:
        patternc.parse(literal)
    assert lit.value.code in ("P208", "P301", "P207")
    with pytest.raises(PatternError) as e:
        patternc.compile(src, q_len=1, block_size=1)
    assert e.value.code == "P301"
    # at a length where the parameter is legal the branch is dropped as before
    q = 8
    cp = patternc.compile(src, q_len=q, block_size=4)
    assert (cp.dense_mask() == patternc.reference.dense_mask(src, q_len=q)).all()
    assert not cp.pattern.is_symbolic()


def test_global_at_length_dependent_is_refused_with_a_working_alternative():
    with pytest.raises(PatternError) as e:
        patternc.parse("global(at=[q_len - 1])")
    assert e.value.code == "P207" and "~prefix(n=q_len - k)" in str(e.value)
    for q, k in ((9, 1), (9, 2), (16, 3)):  # the help's claim, on the oracle
        last = ", ".join(str(x) for x in range(q - k, q))
        assert (patternc.reference.dense_mask(f"~prefix(n=q_len - {k})", q_len=q)
                == patternc.reference.dense_mask(f"global(at=[{last}])", q_len=q)).all()


# ---- item 11: `random` lowers in O(tiles as uint8 + pairs), not O(tiles) int64 several times --------------

def test_random_lowering_memory_is_bounded_and_exact():
    import tracemalloc

    import patternc.lower.lowering as lowering
    from patternc.lower.layout import BlockLayout

    # exact against the oracle, also with chunks cut at every tile row and inside blocks
    old = lowering.RANDOM_CHUNK
    try:
        for chunk in (1, old):
            lowering.RANDOM_CHUNK = chunk
            for src, q, kv, bs in [("random(r=3, seed=1) | local(w=3)", 97, 130, 16),
                                   ("blocks(3, random(r=2, seed=0))", 100, 64, (32, 7)),
                                   ("blocks(40, random(r=1, seed=4)) & causal", 200, 200, 16)]:
                dense = patternc.reference.dense_mask(src, q_len=q, kv_len=kv)
                want = BlockLayout.from_dense(dense, bs).kinds[0]
                got = lowering.lower_to_layout(patternc.parse(src), q, kv, bs, 1).kinds[0]
                assert (got == want).all(), (src, chunk)
    finally:
        lowering.RANDOM_CHUNK = old
    # memory: 65,536 tokens in 16-token tiles = 16.8M tiles, 65,536 drawn pairs
    n, r = 1 << 16, 1
    lowering.random_flat_keys.cache_clear()
    g = lowering.Grid.uniform(n, n, 16, 16)
    tracemalloc.start()
    try:
        kinds = lowering._lower_random(r, 0, g)
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert kinds.dtype == np.uint8 and int((kinds != 0).sum()) <= n * r
    # the old dense int64 histogram + prefix sum alone was 8 bytes per tile several times over
    assert peak < kinds.nbytes + 256 * n * r, peak


@pytest.mark.parametrize("bad", [None, 5, 3.5, ["causal"]])
def test_a_pattern_that_is_not_text_is_a_diagnostic(bad):
    """compile(None) used to end in AttributeError: 'NoneType' object has no attribute 'replace'."""
    for call in (lambda: patternc.parse(bad), lambda: patternc.compile(bad, q_len=64)):
        with pytest.raises(patternc.PatternError) as e:
            call()
        assert e.value.diagnostic.code == "P302" and type(bad).__name__ in str(e.value)
    with pytest.raises(TypeError):
        patternc.reference.dense_mask(bad, q_len=8)


def test_documents_given_to_a_pattern_without_document_warn_w007():
    """Found trying main as a new user: documents were silently ignored (output unchanged)."""
    import torch

    from patternc.errors import PatternWarning

    cp = patternc.compile("local(w=16) & causal", q_len=64, block_size=16)
    q = k = v = torch.randn(1, 1, 64, 8)
    with pytest.warns(PatternWarning, match="W007") as rec:
        out = cp.attention(q, k, v, documents=[[32, 32]])
    assert "document & (local(w=16) & causal)" in str(rec[0].message)
    assert torch.equal(out, cp.attention(q, k, v))  # the documents changed nothing, as the warning says
