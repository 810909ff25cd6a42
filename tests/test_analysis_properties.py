"""Property tests: on random small patterns every exact engine agrees with the layered-graph
model (networkx) and with the dense oracle; the block bound is sound; the point evaluator
used by the engines equals ``patternc.reference.dense_mask``."""

from __future__ import annotations

import os
import warnings

import numpy as np
from hypothesis import given, settings
from hypothesis import strategies as st

import patternc
from analysis_oracle import check_path, oracle_dist, oracle_min_layers
from patternc.analysis import analyze
from patternc.analysis.model import Stack
from patternc.analysis.predicate import evaluate
from patternc.reference import dense_mask
from strategies import sources as patterns

# more examples for a local bug hunt: ANALYSIS_EXAMPLES=2000 pytest tests/test_analysis_properties.py
SCALE = int(os.environ.get("ANALYSIS_EXAMPLES", "0"))


def _n(default):
    return SCALE or default


def _parse(src):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        try:
            return patternc.parse(src)
        except patternc.PatternError:
            return None


def _quiet(fn, *a, **k):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return fn(*a, **k)


STATS: dict = {}


def _check_report(r, dist, src, n, heads, mode):
    STATS[r.engine] = STATS.get(r.engine, 0) + 1
    truth = oracle_min_layers(dist, mode)
    assert r.exact
    assert r.min_layers == truth, (r.engine, src, n, r.min_layers, truth)
    w = r.witness
    if truth is None:
        assert r.never and dist[w.i, w.j] < 0
        assert mode == "all" or w.j <= w.i
    else:
        assert dist[w.i, w.j] == truth
        check_path(src, n, heads, w.path, w.i, w.j)


@settings(max_examples=_n(40), deadline=None)
@given(src=patterns(), n=st.integers(1, 24), heads=st.integers(1, 2), mode=st.sampled_from(["earlier", "all"]),
       bs=st.integers(1, 9))
def test_exact_engines_agree_with_networkx_and_oracle(src, n, heads, mode, bs):
    p = _parse(src)
    if p is None:
        return
    try:
        dist = oracle_dist(p, n, heads)
    except patternc.PatternError:  # a parameter out of range at this length
        return
    for engine in ("networkx", "exact-token", "auto"):
        r = _quiet(analyze, p, seq_len=n, num_heads=heads, pairs=mode, engine=engine)
        _check_report(r, dist, p, n, heads, mode)
    # the token engine with another block size (runs across 1, 2 or more key blocks)
    r = _quiet(analyze, p, seq_len=n, num_heads=heads, pairs=mode, engine="exact-token", block_size=bs)
    _check_report(r, dist, p, n, heads, mode)
    b = _quiet(analyze, p, seq_len=n, num_heads=heads, pairs=mode, engine="block-bound", block_size=(bs + 1) // 2)
    truth = oracle_min_layers(dist, mode)
    if b.never:
        assert truth is None
    elif truth is None:
        assert b.upper_bound is None and not b.exact
    else:
        assert b.lower_bound <= truth and (b.upper_bound is None or truth <= b.upper_bound)
        if b.exact:
            assert b.min_layers == truth
        if b.upper_bound is not None:
            check_path(p, n, heads, b.witness.path, b.witness.i, b.witness.j)


@settings(max_examples=_n(60), deadline=None)
@given(src=patterns(shift_only=True), n=st.integers(1, 40), mode=st.sampled_from(["earlier", "all"]))
def test_shift_engine_agrees_with_oracle(src, n, mode):
    p = _parse(src)
    if p is None:
        return
    dist = oracle_dist(p, n)
    truth = oracle_min_layers(dist, mode)
    r = _quiet(analyze, p, seq_len=n, pairs=mode, engine="exact-shift")
    if r.exact:
        assert r.engine == "exact-shift"
        _check_report(r, dist, p, n, 1, mode)
    else:  # mixed directions it could not settle: the bound must hold
        assert r.engine == "shift-bound" and not r.never
        if truth is None:
            assert r.upper_bound is None
        else:
            assert r.lower_bound <= truth and (r.upper_bound is None or truth <= r.upper_bound)


@settings(max_examples=_n(60), deadline=None)
@given(src=patterns(), n=st.integers(1, 20), heads=st.integers(1, 3), layer=st.integers(0, 2))
def test_point_evaluator_matches_oracle(src, n, heads, layer):
    p = _parse(src)
    if p is None:
        return
    try:
        ref = dense_mask(p, q_len=n, num_heads=heads, layer=layer)
    except patternc.PatternError:
        return
    stack = Stack(p, n, heads)
    ar = np.arange(n)
    union = np.broadcast_to(stack.attend(layer, ar[:, None], ar[None, :]), (n, n))
    assert (union == ref.any(axis=0)).all()
    e = stack.entry(layer)
    for h, hp in stack.heads[e]:
        assert (np.broadcast_to(evaluate(hp, 0, ar[:, None], ar[None, :], n, n), (n, n)) == ref[h]).all()
