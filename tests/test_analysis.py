"""Reachability analysis (issue 5, SPEC §4): known answers from the papers, every engine
against an independent oracle, witnesses checked hop by hop."""

from __future__ import annotations

import json
import warnings

import numpy as np
import pytest

import patternc
from analysis_oracle import check_path, oracle_dist, oracle_min_layers
from patternc import PatternError
from patternc.analysis import ReachReport, analyze

N = 64
ENGINES = ("auto", "exact-token", "networkx", "block-bound")

LONGNET = "(chunk(8) | (chunk(16) & strided(2)) | (chunk(32) & strided(4)) | (chunk(64) & strided(8))) & causal"

# (source, pairs, expected min_layers, engine auto picks) — issue 5 / REFERENCES §2, §5.2, §5.3
KNOWN = [
    ("(local(w=9) | strided(s=8)) & causal", "earlier", 2, "exact-shift"),   # Sparse Transformer strided
    ("fixed(8, 1) & causal", "earlier", 2, "exact-token"),                   # Sparse Transformer fixed
    ("layers(chunk(8) & causal, summary(8, 1) & causal)", "earlier", 2, "exact-token"),
    ("layers(summary(8, 1) & causal, chunk(8) & causal)", "earlier", 3, "exact-token"),
    ("local(w=8) & causal", "earlier", 9, "exact-shift"),
    ("(local(w=8) | sink(n=4)) & causal", "earlier", 9, "exact-token"),      # sinks add no reach
    ("local(w=8)", "all", 9, "exact-shift"),
    (LONGNET, "earlier", None, "exact-token"),                               # LongNet causal mix: never
]


@pytest.mark.parametrize("src,pairs,expected,auto_engine", KNOWN)
def test_known_answers_every_engine(src, pairs, expected, auto_engine):
    dist = oracle_dist(src, N)
    assert oracle_min_layers(dist, pairs) == expected  # the oracle agrees with the papers
    for engine in ENGINES:
        r = analyze(src, seq_len=N, pairs=pairs, engine=engine)
        assert r.min_layers == expected, (engine, r)
        assert r.exact and r.never == (expected is None)
        assert r.reachable == (expected is not None)
        if engine == "auto":
            assert r.engine == auto_engine
        w = r.witness
        if expected is None:
            assert dist[w.i, w.j] < 0 and (pairs == "all" or w.j <= w.i)
            assert not w.reachable and w.layers_needed is None
        else:
            assert dist[w.i, w.j] == expected  # the witness really needs the most layers
            check_path(src, N, 1, w.path, w.i, w.j)
            assert len(w.path) == expected


def test_sink_does_not_reduce_local():
    a = analyze("local(w=8) & causal", seq_len=N)
    b = analyze("(local(w=8) | sink(n=4)) & causal", seq_len=N)
    assert a.min_layers == b.min_layers == 9


def test_longnet_witness_is_the_immediate_predecessor():
    # REFERENCES §5.3: a query at w0 = 8 never sees key 7, at any depth
    r = analyze(LONGNET, seq_len=N)
    assert (r.witness.i, r.witness.j) == (8, 7)
    assert r.min_layers is None and "never" in r.witness.reason


def test_layers_given_names_pair_and_layers_needed():
    r = analyze("local(w=8) & causal", seq_len=N, layers=2)
    assert not r.reachable and r.min_layers == 9 and r.layers == 2
    w = r.witness
    assert (w.i, w.j) == (63, 0) and w.layers_needed == 9 and not w.reachable
    assert "within 2 layers" in w.reason and "needs 9" in w.reason
    assert analyze("local(w=8) & causal", seq_len=N, layers=9).reachable
    # the same from the token engine
    t = analyze("local(w=8) & causal", seq_len=N, layers=8, engine="exact-token")
    assert not t.reachable and t.witness.layers_needed == 9


def test_single_position_and_zero_layers():
    r = analyze("local(w=8) & causal", seq_len=1, layers=0)
    assert r.min_layers == 0 and r.reachable
    assert analyze("none", seq_len=1, pairs="all").min_layers == 0
    assert not analyze("all", seq_len=2, layers=0).reachable
    assert analyze("all", seq_len=2, layers=1, pairs="all").reachable


def test_causal_pattern_with_pairs_all_never():
    for engine in ENGINES:
        r = analyze("(local(w=4) | strided(s=4)) & causal", seq_len=32, pairs="all", engine=engine)
        assert r.never and r.min_layers is None
        assert (r.witness.i, r.witness.j) == (0, 1), engine
        assert "causal" in r.witness.reason


def test_stride_gcd_reason():
    r = analyze("strided(s=4)", seq_len=40, pairs="all")
    assert r.engine == "exact-shift" and r.never
    assert "multiple of 4" in r.witness.reason


def test_heads_union_and_head_in_via():
    src = "heads(local(w=9), strided(s=8)) & causal"
    with pytest.warns(patternc.PatternWarning, match="num_heads"):
        one = analyze(src, seq_len=N)
    assert one.min_layers == oracle_min_layers(oracle_dist(src, N, heads=1), "earlier") == 8  # head 0 only
    two = analyze(src, seq_len=N, num_heads=2)
    assert two.min_layers == 2
    assert {h.head for h in two.witness.path} == {0, 1}
    check_path(src, N, 2, two.witness.path, two.witness.i, two.witness.j)


def test_json_fields():
    r = analyze("local(w=8) & causal", seq_len=N, layers=2)
    obj = json.loads(json.dumps(r.to_json()))
    for key in ("min_layers", "layers", "reachable", "mode", "exact", "witness", "engine", "seq_len"):
        assert key in obj
    assert obj["min_layers"] == 9 and obj["layers"] == 2 and obj["reachable"] is False
    assert obj["witness"]["pair"] == [63, 0] and len(obj["witness"]["path"]) == 9
    assert obj["witness"]["path"][0] == {"layer": 0, "from": 0, "to": 7, "via": "local(w=8) & causal", "head": 0}
    never = analyze(LONGNET, seq_len=N).to_json()
    assert never["min_layers"] is None and never["never"] is True and never["witness"]["path"] is None
    assert isinstance(r, ReachReport) and "min_layers = 9" in r.format_text()


def test_via_names_the_part_of_the_pattern():
    r = analyze("(local(w=9) | strided(s=8)) & causal", seq_len=N)
    vias = [h.via for h in r.witness.path]
    assert vias == ["local(w=9) & causal", "strided(s=8) & causal"]


def test_bad_arguments():
    with pytest.raises(PatternError) as e:
        analyze("causal", seq_len=0)
    assert e.value.code == "P401"
    with pytest.raises(PatternError, match="pairs"):
        analyze("causal", seq_len=8, pairs="later")
    with pytest.raises(PatternError, match="did you mean"):
        analyze("causal", seq_len=8, engine="exact-tokens")
    with pytest.raises(PatternError) as e:
        analyze("chunk(8) & causal", seq_len=64, engine="exact-shift")
    assert e.value.code == "P402" and "chunk(l=8)" in str(e.value)
    with pytest.raises(PatternError) as e:
        analyze("causal", seq_len=5000, engine="networkx")
    assert e.value.code == "P402"
    with pytest.raises(PatternError):
        analyze(patternc.parse("local(w=2)"), seq_len=8, params={"w": 3})
    with pytest.raises(PatternError) as e:
        analyze("loca(w=2)", seq_len=8)
    assert e.value.code == "P201"


def test_symbolic_params_and_sets():
    src = "param w = 8\nlocal(w=w) & causal"
    assert analyze(src, seq_len=N).min_layers == 9
    assert analyze(src, seq_len=N, params={"w": 9}).min_layers == 8
    assert analyze("local(w=q_len // 8 + 1) & causal", seq_len=N).min_layers == 8


# ---- the shift engine on differences: boundary cases against the oracle ------------------------------
SHIFT_CASES = [
    ("band(left=3, right=1)", "all"),
    ("band(left=3, right=1)", "earlier"),
    ("strided(s=8) | local(w=2)", "all"),        # needs to overshoot and come back: boundary matters
    ("strided(s=8) | local(w=2)", "earlier"),
    ("dilated(w=4, d=3) | local(w=2)", "all"),
    ("(strided(s=5) & ~causal) | (local(w=2) & causal)", "all"),
    ("(strided(s=5) - causal) | band(left=2, right=0)", "earlier"),
    ("layers(local(w=3) & causal, strided(s=4) & causal)", "earlier"),
    ("layers(strided(s=4), local(w=3))", "all"),
    ("~causal | local(w=1)", "earlier"),
    ("local(w=1)", "all"),
]


@pytest.mark.parametrize("src,pairs", SHIFT_CASES)
@pytest.mark.parametrize("n", [1, 2, 7, 23, 40])
def test_shift_engine_against_oracle(src, pairs, n):
    expected = oracle_min_layers(oracle_dist(src, n), pairs)
    r = analyze(src, seq_len=n, pairs=pairs)
    assert r.min_layers == expected, r
    try:
        s = analyze(src, seq_len=n, pairs=pairs, engine="exact-shift")
    except PatternError:
        return
    if s.exact:
        assert s.min_layers == expected and s.never == (expected is None)
        if expected is not None:
            check_path(src, n, 1, s.witness.path, s.witness.i, s.witness.j)
    else:  # a bound must hold
        assert s.engine == "shift-bound" and expected is not None
        assert s.lower_bound <= expected and (s.upper_bound is None or expected <= s.upper_bound)


def test_shift_engine_long_sequences():
    n = 1 << 20
    r = analyze("(local(w=1024) | strided(s=1024)) & causal", seq_len=n, layers=2)
    assert r.engine == "exact-shift" and r.min_layers == 2 and r.reachable
    assert [h.to_pos for h in r.witness.path][-1] == r.witness.i
    r = analyze("local(w=4096) & causal", seq_len=n)
    assert r.min_layers == -(-(n - 1) // 4095)
    # steps {1, 3, 6, 9}: least hops to each offset by a coin-change DP (independent of the engine)
    m = 20000
    r = analyze("(local(w=2) | dilated(w=4, d=3)) & causal", seq_len=m)
    best = np.zeros(m, dtype=np.int64)
    for x in range(1, m):
        best[x] = 1 + min(best[x - s] for s in (1, 3, 6, 9) if s <= x)
    assert r.engine == "exact-shift" and r.min_layers == int(best.max())
    assert r.witness.i - r.witness.j == int(np.flatnonzero(best == best.max())[-1])


def test_done_when_16384():
    r = analyze("(local(w=128) | strided(s=128)) & causal", seq_len=16384, layers=2)
    assert r.min_layers == 2 and r.exact and r.reachable
    assert len(r.witness.path) == 2 and r.witness.path[-1].to_pos == r.witness.i


# ---- block bound ----------------------------------------------------------------------------------
BOUND_CASES = [
    "fixed(16, 4) & causal",
    "(local(w=20) | strided(s=16)) & causal",
    "blocks(16, local(w=3) | global(n=1))",
    "blocks(8, local(w=2) & causal) & causal",
    "(chunk(32) | summary(32, 8)) & causal",
    "local(w=16) & causal",
]


@pytest.mark.parametrize("src", BOUND_CASES)
def test_block_bound_is_sound(src):
    n, b = 160, 16
    for pairs in ("earlier", "all"):
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            dist = oracle_dist(src, n)
            truth = oracle_min_layers(dist, pairs)
            r = analyze(src, seq_len=n, pairs=pairs, engine="block-bound", block_size=b)
        if r.never:
            assert truth is None and r.exact
            continue
        if truth is None:
            assert not r.exact and r.upper_bound is None
            continue
        assert r.lower_bound <= truth
        if r.upper_bound is not None:
            assert truth <= r.upper_bound
            check_path(src, n, 1, r.witness.path, r.witness.i, r.witness.j)
        if r.exact:
            assert r.min_layers == truth
            assert dist[r.witness.i, r.witness.j] == truth, "the exact witness needs min_layers"
        elif r.witness.reachable and "needs at least" in r.witness.reason:
            # issue 9 item 6: a bound's witness is a pair that really needs lower_bound layers
            assert dist[r.witness.i, r.witness.j] >= r.lower_bound


def test_block_bound_witness_is_not_a_sink_reached_in_one_hop():
    """Issue 9 item 6: the FULL-tile proof reaches key block 0 last, but key 0 is a sink that
    every query attends directly; the witness must be a pair that really needs the layers."""
    src, n, b = "(local(w=32) | sink(n=4)) & causal", 512, 16
    r = analyze(src, seq_len=n, engine="block-bound", block_size=b)
    dist = oracle_dist(src, n)
    assert not r.exact and r.witness.reachable
    assert dist[r.witness.i, r.witness.j] >= r.lower_bound > 1
    assert r.witness.j >= 4 and "needs at least" in r.witness.reason
    check_path(src, n, 1, r.witness.path, r.witness.i, r.witness.j)


def test_block_bound_exact_on_block_patterns_and_layers_verdicts():
    src = "blocks(16, local(w=3) | global(n=1))"
    r = analyze(src, seq_len=4096, pairs="all", engine="block-bound", block_size=16)
    assert r.exact and r.min_layers == 2
    # a bound that cannot decide says so
    u = analyze("local(w=16) & causal", seq_len=4096, engine="block-bound", block_size=64, layers=400)
    assert not u.exact and u.lower_bound <= 273 and (u.upper_bound is None or u.upper_bound >= 273)


# ---- the token engine's gather paths: runs across blocks, arithmetic progressions ---------------------
TOKEN_CASES = [
    "strided(s=3) | local(w=2)",                           # progressions reaching both ends
    "(strided(s=5) & causal) | local(w=3)",
    "(strided(s=7) - causal) | band(left=2, right=0)",     # a progression to the end only
    "layers(strided(s=4) & causal, local(w=2) | strided(s=9))",
    "heads(strided(s=6), local(w=40)) & causal | sink(n=2)",  # long runs over several blocks
    "prefix(n=50) | (chunk(l=24) & causal)",
]


@pytest.mark.parametrize("src", TOKEN_CASES)
def test_token_engine_block_sizes_against_oracle(src):
    for n in (97, 130):
        dist = oracle_dist(src, n, heads=2)
        for mode in ("earlier", "all"):
            truth = oracle_min_layers(dist, mode)
            for bs in (4, 16, 64):
                r = analyze(src, seq_len=n, pairs=mode, engine="exact-token", block_size=bs, num_heads=2)
                assert r.min_layers == truth, (n, mode, bs)
                if truth is not None:
                    assert dist[r.witness.i, r.witness.j] == truth
                    check_path(src, n, 2, r.witness.path, r.witness.i, r.witness.j)
                else:
                    assert dist[r.witness.i, r.witness.j] < 0
