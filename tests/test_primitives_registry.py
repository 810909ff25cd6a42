"""The registry's one formula per primitive, and its facts, against the hand-written oracle.

Every primitive's ``formula`` is evaluated through both array namespaces (numpy: the
lowering's ``evaluate``; torch: the ``mask_mod``) and compared with ``patternc.reference``,
and every fact the passes rely on (``reads``, ``causal_if``, ``symmetric_if``, ``full_at``,
``stride``) is checked on the oracle's dense mask, so a wrong fact cannot hide.
"""

from __future__ import annotations

import numpy as np
import pytest

from patternc.ir.nodes import Prim
from patternc.ir.primitives import PRIMITIVES, RUNTIME_PRIMITIVES
from patternc.lower.lowering import evaluate
from patternc.reference import dense_mask

# several argument choices per primitive, edge values included (facts switch on them)
CASES = [
    Prim("all"), Prim("none"), Prim("causal"),
    Prim("local", (("w", 1),)), Prim("local", (("w", 3),)),
    Prim("band", (("left", 2), ("right", 0))), Prim("band", (("left", 1), ("right", 3))),
    Prim("band", (("left", 2), ("right", 2))),
    Prim("strided", (("s", 1),)), Prim("strided", (("s", 3),)),
    Prim("dilated", (("w", 1), ("d", 3))), Prim("dilated", (("w", 3), ("d", 2))),
    Prim("chunk", (("l", 1),)), Prim("chunk", (("l", 4),)), Prim("chunk", (("l", 20),)),
    Prim("summary", (("l", 5), ("c", 2), ("g", 0))), Prim("summary", (("l", 6), ("c", 2), ("g", 1))),
    Prim("sink", (("n", 0),)), Prim("sink", (("n", 1),)), Prim("sink", (("n", 3),)), Prim("sink", (("n", 20),)),
    Prim("global", (("n", 0),)), Prim("global", (("n", 2),)), Prim("global", (("n", 20),)),
    Prim("global", (("at", ()),)), Prim("global", (("at", (1, 7, 30)),)),
    Prim("global", (("at", tuple(range(14))),)),
    Prim("prefix", (("n", 1),)), Prim("prefix", (("n", 4),)), Prim("prefix", (("n", 20),)),
    Prim("random", (("r", 0), ("seed", 0))), Prim("random", (("r", 2), ("seed", 3))),
    Prim("random", (("r", 20), ("seed", 1))),
]
SIZES = [(13, 13), (13, 9), (9, 13), (1, 1)]


def test_every_leaf_primitive_is_covered():
    leaves = {n for n, s in PRIMITIVES.items() if not s.combinator}
    assert leaves - set(RUNTIME_PRIMITIVES) == {c.name for c in CASES}  # run-time ones: below
    assert all(PRIMITIVES[n].formula is not None for n in leaves)


def _oracle(p: Prim, q: int, k: int) -> np.ndarray:
    return dense_mask(p, q_len=q, kv_len=k)[0]


@pytest.mark.parametrize("q_len, kv_len", SIZES)
@pytest.mark.parametrize("p", CASES, ids=str)
def test_numpy_formula_equals_the_oracle(p, q_len, kv_len):
    i, j = np.arange(q_len)[:, None], np.arange(kv_len)[None, :]
    got = np.broadcast_to(evaluate(p, i, j, q_len, kv_len), (q_len, kv_len))
    np.testing.assert_array_equal(got, _oracle(p, q_len, kv_len))


@pytest.mark.parametrize("q_len, kv_len", SIZES)
@pytest.mark.parametrize("p", CASES, ids=str)
def test_torch_formula_equals_the_oracle(p, q_len, kv_len):
    torch = pytest.importorskip("torch")
    from patternc.execute.maskmod import lower_to_mask_mod

    mm = lower_to_mask_mod(p, q_len, kv_len)
    got = mm(0, torch.tensor(0), torch.arange(q_len)[:, None], torch.arange(kv_len)[None, :])
    assert tuple(got.shape) == (q_len, kv_len)  # broadcast even when an index is ignored
    np.testing.assert_array_equal(got.numpy(), _oracle(p, q_len, kv_len))


@pytest.mark.parametrize("p", CASES, ids=str)
def test_facts_hold_on_the_oracle(p):
    spec, a = PRIMITIVES[p.name], p.argdict
    n = 13
    m = _oracle(p, n, n)
    i, j = np.arange(n)[:, None], np.arange(n)[None, :]
    if spec.causal_if(a):
        assert not (m & (j > i)).any()
    if spec.symmetric_if(a):
        assert (m == m.T).all()
    const = spec.constant(a)
    if const is not None:  # all / none at every length
        for q, k in SIZES:
            assert (_oracle(p, q, k) == const).all()
    for side in (1, 5, n):  # full_at: at the length ``side``, every pair is allowed
        if spec.full_at(a, side):
            assert _oracle(p, side, side).all()
    reads = spec.reads
    if "i" not in reads and "x" not in reads and "d" not in reads:  # rows identical
        assert (m == m[:1]).all()
    if "j" not in reads and "x" not in reads and "d" not in reads:  # columns identical
        assert (m == m[:, :1]).all()
    if reads in ("", "d"):  # a function of i - j only
        for d in range(-(n - 1), n):
            assert len(set(np.diagonal(m, offset=-d).tolist())) <= 1
    step = spec.stride(a)
    if step is not None and reads == "d":
        for d in range(-(n - 1), n - step):
            if m.diagonal(offset=-d).any():
                assert (d % step == 0)
    if step is not None and reads == "j":
        assert (m[:, step:] == m[:, :-step]).all()


def test_the_strategy_module_meets_every_rule_between_parameters():
    from strategies import REPAIR, leaf_names

    assert set(leaf_names()) == {c.name for c in CASES}
    assert {n for n, s in PRIMITIVES.items() if s.constraint is not None} <= set(REPAIR)


IDS = np.array([4, 4, 4, 1, 1, 9, 9, 9, 9, 4, 4, 2, 2, 2])  # id 4 in two runs: one document


@pytest.mark.parametrize("q_len, kv_len", SIZES)
def test_document_formula_equals_the_oracle(q_len, kv_len):
    torch = pytest.importorskip("torch")
    from patternc.errors import PatternError
    from patternc.execute.maskmod import lower_to_mask_mod
    from patternc.lower.lowering import NumpyArrays

    p = Prim("document")
    want = dense_mask(p, q_len=q_len, kv_len=kv_len, documents=IDS)[0]
    xp = NumpyArrays(q_len, kv_len)
    xp.documents = IDS
    i, j = np.arange(q_len)[:, None], np.arange(kv_len)[None, :]
    np.testing.assert_array_equal(PRIMITIVES["document"].formula(xp, {})(i, j), want)
    mm = lower_to_mask_mod(p, q_len, kv_len, documents=IDS[None])
    got = mm(0, torch.tensor(0), torch.arange(q_len)[:, None], torch.arange(kv_len)[None, :])
    np.testing.assert_array_equal(got.numpy(), want)
    assert (want == want.T[:q_len, :kv_len]).all() if q_len == kv_len else True  # symmetric_if
    with pytest.raises(PatternError) as e:
        evaluate(p, i, j, q_len, kv_len)
    assert e.value.diagnostic.code == "P360"
