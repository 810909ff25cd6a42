"""Every pattern in ``examples/`` is checked, compiled, analysed and run at small sizes.

Each example opens with a comment naming its source and carries one or more claim lines::

    # analyze: seq_len=256 heads=4 pairs=all layers=2 l=16 -> min_layers=2
    # analyze: seq_len=256 prefix_len=64 pairs=all -> never

Keys ``seq_len``, ``heads`` (default 1), ``pairs`` (earlier | all, default earlier) and
``layers`` (optional) are analysis settings; any other ``NAME=INT`` overrides a ``param``.
The claims are checked twice: by an independent reachability count written here from SPEC §4
(boolean matrix products over the oracle's dense masks), and by ``patternc.analyze``.

Compile / analyse / run use ``patternc.compiler``, ``patternc.analysis`` and
``cp.attention``.
"""

from __future__ import annotations

import re
import warnings
from pathlib import Path

import numpy as np
import pytest

import patternc
from patternc import BlockLayout, reference
from patternc.ir.nodes import score_terms
from patternc.ir.terms import alibi_slopes

ROOT = Path(__file__).resolve().parent.parent
# examples whose pattern reads run-time data (`document`, SPEC §1.7) carry `# documents:` claims
# instead and are tested in tests/test_documents.py
EXAMPLES = sorted(p for p in (ROOT / "examples").glob("*.pattern") if "# documents:" not in p.read_text())
RUNTIME_EXAMPLES = sorted(p for p in (ROOT / "examples").glob("*.pattern") if "# documents:" in p.read_text())
CONFORMANCE = Path("/work/shared/conformance/deepspeed")
CLAIM = re.compile(r"^#\s*analyze:\s*(?P<args>.*?)\s*->\s*(?P<result>.*?)\s*$")
SETTINGS = {"seq_len", "heads", "pairs", "layers"}


def _ids(paths):
    return [p.stem for p in paths]


class Claim:
    def __init__(self, line: str):
        m = CLAIM.match(line)
        assert m, line
        kv = {}
        for tok in m.group("args").split():
            name, eq, val = tok.partition("=")
            assert eq, f"claim token {tok!r} is not NAME=VALUE"
            kv[name] = val
        self.text = line.strip()
        self.seq_len = int(kv.pop("seq_len"))
        self.heads = int(kv.pop("heads", 1))
        self.pairs = kv.pop("pairs", "earlier")
        assert self.pairs in ("earlier", "all"), self.pairs
        self.layers = int(kv["layers"]) if "layers" in kv else None
        kv.pop("layers", None)
        self.params = {k: int(v) for k, v in kv.items()}
        result = m.group("result")
        if result == "never":
            self.min_layers = None
        else:
            key, _, val = result.partition("=")
            assert key == "min_layers", f"claim result must be `min_layers=K` or `never`, got {result!r}"
            self.min_layers = int(val)


def claims_of(path: Path) -> list[Claim]:
    return [Claim(line) for line in path.read_text().splitlines() if CLAIM.match(line)]


def load(path: Path, params=None):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # warnings are checked once, in test_check
        return patternc.load(path, params=params)


def independent_min_layers(pattern, seq_len: int, heads: int, pairs: str):
    """SPEC §4 by brute force: R_k = (A_{k-1} | I) ... (A_0 | I) over the oracle's masks,
    heads united. Returns the least k covering the required pairs, or None (never)."""
    period = pattern.num_layers
    eye = np.eye(seq_len, dtype=bool)
    need = np.tril(np.ones((seq_len, seq_len), dtype=bool)) if pairs == "earlier" else ~np.zeros_like(eye)
    steps = [(reference.dense_mask(pattern, q_len=seq_len, num_heads=heads, layer=m).any(0) | eye).astype(np.int32)
             for m in range(period)]
    reach = eye.astype(np.int32)
    history = []
    for k in range(1, seq_len * period + 2):
        reach = ((steps[(k - 1) % period] @ reach) > 0).astype(np.int32)
        if (reach.astype(bool) | ~need).all():
            return k
        history.append(reach)
        if len(history) > period and (history[-1 - period] == reach).all():
            return None  # a whole cycle of layers added nothing: it never grows again
    return None


# ---- the files themselves ----------------------------------------------------------------------------


def test_there_are_enough_examples():
    assert len(EXAMPLES) >= 12, [p.name for p in EXAMPLES]


@pytest.mark.parametrize("path", EXAMPLES, ids=_ids(EXAMPLES))
def test_example_header_and_claims(path):
    lines = path.read_text().splitlines()
    assert lines[0].startswith("# "), "an example opens with a comment"
    header = "\n".join(line for line in lines if line.startswith("#"))
    assert "Source:" in header, "the comment names the source (paper section or repository file)"
    assert "Convention:" in header, "the comment says which window/offset convention it follows"
    assert re.search(r"^param \w+ = ", path.read_text(), re.M), "parameters are `param`s a user can override"
    assert claims_of(path), "at least one `# analyze: ... -> ...` claim"


@pytest.mark.parametrize("path", EXAMPLES, ids=_ids(EXAMPLES))
def test_check(path, capsys):
    from patternc.cli import main

    with warnings.catch_warnings():
        warnings.simplefilter("error")  # an example draws no warning (W001 / W002)
        p = patternc.load(path)
        assert patternc.parse(str(p)) == p, "canonical text round-trips"
    assert main(["check", str(path)]) == 0
    out = capsys.readouterr().out
    assert f"canonical: {p}" in out
    for claim in claims_of(path):  # every claim's parameters are valid
        load(path, params=claim.params)


@pytest.mark.parametrize("path", EXAMPLES, ids=_ids(EXAMPLES))
def test_claims_hold_by_brute_force(path):
    for claim in claims_of(path):
        p = load(path, params=claim.params)
        got = independent_min_layers(p, claim.seq_len, claim.heads, claim.pairs)
        assert got == claim.min_layers, f"{claim.text}: brute force says {got}"


# ---- compile ---------------------------------------------------------------------------------------------------


def _compile_cases(path):
    claim = claims_of(path)[0]
    p = load(path, params=claim.params)
    n = claim.seq_len
    # a block multiple, a ragged length with a (q, kv) block pair, and Q_LEN != KV_LEN
    return p, claim.heads, [(n, n, 32), (n - 57, n - 57, (16, 32)), (n // 2 + 3, n, 16)]


@pytest.mark.parametrize("path", EXAMPLES, ids=_ids(EXAMPLES))
def test_compile_matches_oracle(path):
    p, heads, cases = _compile_cases(path)
    for q_len, kv_len, bs in cases:
        for layer in range(p.num_layers):
            cp = patternc.compile(p, q_len=q_len, kv_len=kv_len, num_heads=heads, block_size=bs, layer=layer)
            dense = reference.dense_mask(p, q_len=q_len, kv_len=kv_len, num_heads=heads, layer=layer)
            want = BlockLayout.from_dense(dense, bs)
            cp.layout.check_invariants()
            where = f"{path.name} q_len={q_len} kv_len={kv_len} block_size={bs} layer={layer}"
            assert np.array_equal(cp.layout.kinds, want.kinds), where
            assert np.array_equal(cp.dense_mask(), dense), where
            assert cp.density == pytest.approx(dense.mean()), where
            assert cp.block_density == pytest.approx(want.block_density), where


def _deepspeed_bslongformer(num_blocks, w, globals_):
    """DeepSpeed BSLongformerSparsityConfig.make_layout, bidirectional, restated as loops
    (deepspeed/ops/sparse_attention/sparsity_config.py: set_sliding_window_layout, set_global_layout)."""
    lay = np.zeros((num_blocks, num_blocks), dtype=bool)
    half = w // 2
    for row in range(num_blocks):
        lay[row, max(0, row - half):min(row + half + 1, num_blocks)] = True
    for g in globals_:
        if g < num_blocks:
            lay[g, :] = True
            lay[:, g] = True
    return lay


@pytest.mark.parametrize("name, conformance_file, seq_len, heads", [
    ("deepspeed_fixed", "fixed_uni_h4_L256.npy", 256, 4),
    ("deepspeed_fixed_bidirectional", "fixed_default_bi_h2_L128.npy", 128, 2),
])
def test_deepspeed_examples_reproduce_deepspeed_layouts(name, conformance_file, seq_len, heads):
    """The peer's data: DeepSpeed make_layout output (1 = computed block), block size 16."""
    f = CONFORMANCE / conformance_file
    if not f.exists():
        pytest.skip(f"conformance data {f} not on this machine")
    expected = np.load(f).astype(bool)
    p = load(ROOT / "examples" / f"{name}.pattern")
    layout = BlockLayout.from_dense(reference.dense_mask(p, q_len=seq_len, num_heads=heads), 16)
    assert np.array_equal(layout.kinds != patternc.EMPTY, expected)
    cp = patternc.compile(p, q_len=seq_len, num_heads=heads, block_size=16)
    assert np.array_equal(cp.layout.kinds != patternc.EMPTY, expected)


@pytest.mark.parametrize("seq_len, w", [(128, 3), (256, 5), (256, 4)])
def test_bslongformer_example_matches_deepspeed_rule(seq_len, w):
    p = load(ROOT / "examples" / "deepspeed_bslongformer.pattern", params={"num_sliding_window_blocks": w})
    layout = BlockLayout.from_dense(reference.dense_mask(p, q_len=seq_len), 16)
    assert np.array_equal(layout.kinds[0] != patternc.EMPTY, _deepspeed_bslongformer(seq_len // 16, w, [0]))
    assert (layout.kinds != patternc.PARTIAL).all(), "a block-level layout has only FULL and EMPTY tiles"


def _natten_1d(n, k):
    """NATTEN's non-causal 1-D neighbourhood, stride 1, dilation 1, restated from
    SHI-Labs/NATTEN src/natten/backends/flex.py (get_na_flex_mask)."""
    left, right = k // 2, k // 2 + k % 2 - 1
    m = np.zeros((n, n), dtype=bool)
    for i in range(n):
        centre = min(max(i, left), n - 1 - right)
        m[i, centre - left:centre + right + 1] = True
    return m


@pytest.mark.parametrize("n", [7, 30, 97])
@pytest.mark.parametrize("k", [1, 2, 5, 6, 7])
def test_natten_example_matches_natten_rule(n, k):
    p = load(ROOT / "examples" / "natten_1d.pattern", params={"kernel_size": k})
    got = reference.dense_mask(p, q_len=n)[0]
    assert np.array_equal(got, _natten_1d(n, k))
    assert (got.sum(axis=1) == k).all(), "every query sees exactly kernel_size keys"


# ---- analyse ---------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("path", EXAMPLES, ids=_ids(EXAMPLES))
def test_analyze_claims(path):
    for claim in claims_of(path):
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # claims with heads=1 analyse only head 0 on purpose
            rep = patternc.analyze(path.read_text(), seq_len=claim.seq_len, layers=claim.layers,
                                   num_heads=claim.heads, pairs=claim.pairs, params=claim.params)
        assert rep.min_layers == claim.min_layers, f"{claim.text}: analyze says {rep.min_layers}"
        if claim.layers is not None:
            want = claim.min_layers is not None and claim.min_layers <= claim.layers
            assert rep.reachable == want, claim.text
        assert rep.witness is not None, f"{claim.text}: the report names a witness"


# ---- run -------------------------------------------------------------------------------------------------------


def _reference_attention(q, k, v, mask, terms=()):
    """float64 softmax attention over the allowed keys, score terms applied (SPEC §1.8 by hand);
    rows without keys give 0."""
    import torch

    q, k, v = (t.double() for t in (q, k, v))
    scores = (q @ k.transpose(-1, -2)) / q.shape[-1] ** 0.5
    for t in terms:  # SPEC §1.8, in its order: softcap, then alibi
        if t.name == "softcap":
            c = t.arg("c")
            scores = c * torch.tanh(scores / c)
        elif t.name == "alibi":
            slopes = torch.tensor(alibi_slopes(q.shape[1], t.arg("max_bias")), dtype=torch.float64)
            pos = torch.arange(q.shape[2], dtype=torch.float64)
            scores = scores + slopes[:, None, None] * (pos[None, None, :] - pos[None, :, None])
    m = torch.as_tensor(mask)[None]  # [1, H, Q, KV]
    scores = scores.masked_fill(~m, float("-inf"))
    has_key = m.any(-1, keepdim=True)
    probs = torch.softmax(torch.where(has_key, scores, torch.zeros_like(scores)), dim=-1)
    probs = torch.where(m, probs, torch.zeros_like(probs))
    return probs @ v


@pytest.mark.parametrize("path", EXAMPLES, ids=_ids(EXAMPLES))
def test_run_matches_float64_reference(path):
    import torch

    claim = claims_of(path)[0]
    p = load(path, params=claim.params)
    heads, q_len = max(claim.heads, p.num_heads), claim.seq_len - 27  # ragged against the block
    cp = patternc.compile(p, q_len=q_len, num_heads=heads, block_size=32)
    g = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(2, heads, q_len, 16, generator=g) for _ in range(3))
    out = cp.attention(q, k, v, backend="blocksparse")
    want = _reference_attention(q, k, v, reference.dense_mask(p, q_len=q_len, num_heads=heads), score_terms(p))
    assert out.shape == want.shape and out.dtype == torch.float32
    assert torch.isfinite(out).all()
    rel = (out.double() - want).abs().max() / want.abs().max().clamp_min(1e-12)
    assert rel <= 1e-5, f"{path.name}: relative error {rel:.2e}"


def test_examples_are_formatted(capsys):
    from patternc.cli import main

    assert main(["fmt", "--check", *map(str, EXAMPLES)]) == 0, capsys.readouterr().out


def test_docs_list_every_example():
    doc = (ROOT / "docs" / "examples.md").read_text()
    missing = [p.name for p in EXAMPLES if f"`{p.name}`" not in doc]
    assert not missing, f"docs/examples.md does not list {missing}"
