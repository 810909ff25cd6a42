"""The oracle is independent of the normaliser: a deliberately wrong rewrite is caught.

``patternc.reference.dense_mask`` evaluates the elaborated, *unnormalised* IR with its own
hand-written predicates (SPEC §1), so a normaliser pass that changes a pattern's meaning makes
``compile()`` disagree with it. Were the oracle to read the normalised pattern (or the
registry's formulas), this test would pass the wrong rewrite silently.
"""

from __future__ import annotations

import importlib

import numpy as np
import pytest

import patternc
from patternc import compiler
from patternc.ir.nodes import Prim
from patternc.reference import dense_mask
from patternc.source import frontdoor

norm = importlib.import_module("patternc.ir.normalize")  # the module (the package exports the function)

SOURCE = "dilated(w=3, d=2) & causal"


def _clear_caches():
    norm.normalize.cache_clear()
    frontdoor._analyse_cached.cache_clear()
    compiler._layout_cached.cache_clear()


def _wrong_simplify(p):
    """simplify_primitive plus a wrong rewrite: dilated(w, d) -> local(w) (drops the dilation)."""
    if isinstance(p, Prim) and p.name == "dilated" and p.arg("d") != 1:
        return Prim("local", (("w", p.arg("w")),))
    return norm.simplify_primitive(p)


@pytest.fixture
def wrong_normaliser(monkeypatch):
    passes = [(name, _wrong_simplify if name == "simplify_primitive" else f) for name, f in norm.PASSES]
    _clear_caches()
    monkeypatch.setattr(norm, "PASSES", passes)
    yield
    monkeypatch.undo()
    _clear_caches()


def _compiled(source: str, n: int) -> np.ndarray:
    return patternc.compile(source, q_len=n, block_size=4).dense_mask()


def test_compile_matches_the_oracle_with_the_real_normaliser():
    _clear_caches()
    n = 16
    np.testing.assert_array_equal(_compiled(SOURCE, n), dense_mask(SOURCE, q_len=n))


def test_a_wrong_rewrite_is_caught_by_the_oracle(wrong_normaliser):
    n = 16
    assert str(patternc.parse(SOURCE)) == "local(w=3) & causal"  # the wrong rewrite fired
    got, want = _compiled(SOURCE, n), dense_mask(SOURCE, q_len=n)
    # the oracle still sees the dilation: (i, j) = (1, 0) is refused by dilated(d=2) ...
    assert not want[0, 1, 0] and want[0, 2, 0]
    # ... and the compiled (wrongly normalised) pattern allows it: the comparison fails
    assert got[0, 1, 0]
    assert not np.array_equal(got, want)
