"""The normaliser and printer over generated IR, checked against the oracle.

* every single rewrite of every pass keeps the predicate of the node it rewrites, on all
  (layer, head, i, j) of the period at several (Q_LEN, KV_LEN), and keeps the IR well formed;
* ``normalize`` is idempotent and its output satisfies ``normal_form_problems``;
* ``parse(str(p)) == normalize(p)`` (print/parse round trip) and ``str`` of a normal form
  is stable.
"""

from __future__ import annotations

import math
import warnings

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings

import patternc
from patternc.ir.nodes import And, Blocks, Diff, Heads, Layers, Not, Or, PerDocument, Prim, Var
from patternc.ir.normalize import PASSES, ir_problems, keeps_length_checks, normal_form_problems, normalize
from patternc.ir.specialize import uses_documents
from patternc.lang.elaborate import elaborate
from patternc.reference import dense_mask
from strategies import LANG_LENGTHS as LENGTHS
from strategies import lang_patterns as patterns

pytestmark = pytest.mark.filterwarnings("ignore::patternc.errors.PatternWarning")
SETTINGS = dict(deadline=None, suppress_health_check=[HealthCheck.too_slow, HealthCheck.filter_too_much])


# run-time documents for patterns that read them: runs of 3, 1, 4, 2, ... tokens, one id
# repeated across two runs (`document` compares ids, `per_document` reads runs)
DOC_IDS = np.array([0, 0, 0, 1, 2, 2, 2, 2, 0, 0, 3, 3, 3, 4, 4, 4], dtype=np.int64)


def masks(p, q_len, kv_len, num_heads, num_layers):
    """bool [L, H, Q_LEN, KV_LEN] straight from the oracle (with ``DOC_IDS`` when ``p`` reads
    documents)."""
    docs = DOC_IDS if uses_documents(p) else None
    return np.stack([dense_mask(p, q_len=q_len, kv_len=kv_len, num_heads=num_heads, layer=l, documents=docs)
                     for l in range(num_layers)])


def assert_same_predicate(a, b, lengths=LENGTHS, what=""):
    h = math.lcm(a.num_heads, b.num_heads)
    nl = math.lcm(a.num_layers, b.num_layers)
    for q, kv in lengths:
        ma, mb = masks(a, q, kv, h, nl), masks(b, q, kv, h, nl)
        if not np.array_equal(ma, mb):
            layer, head, i, j = (int(x) for x in np.argwhere(ma != mb)[0])
            raise AssertionError(f"{what}: {a}  vs  {b} differ at Q_LEN={q} KV_LEN={kv} layer={layer} "
                                 f"head={head} i={i} j={j}: {bool(ma[layer, head, i, j])} vs {bool(mb[layer, head, i, j])}")


def checked_normalize(p, fired):
    """``normalize`` re-done with a check after every rewrite (the tinygrad-style invariant
    checker between passes): the result is well formed and has the node's predicate."""
    kids = p.children()
    if kids:
        p = p.with_children(tuple(checked_normalize(c, fired) for c in kids))
    for name, rewrite in PASSES:
        r = rewrite(p)
        if r is not None and r != p and keeps_length_checks(p, r):  # as normalize's driver
            fired.add(name)
            assert not ir_problems(r), (name, ir_problems(r))
            assert_same_predicate(p, r, lengths=LENGTHS[1:4], what=f"pass {name}")
            return checked_normalize(r, fired)
    return p


def _p(name, **args):
    return Prim(name, tuple(args.items()))


CAUSAL, ALL, NONE = _p("causal"), _p("all"), _p("none")

# Hand-picked IR on which every pass fires at least once (checked below).
PASS_EXAMPLES = [
    And((Or((_p("local", w=3), And((_p("strided", s=2), CAUSAL)))), CAUSAL)),
    Or((And((_p("local", w=2), CAUSAL)), And((_p("sink", n=2), CAUSAL)))),
    And((Or((_p("local", w=2), CAUSAL)), Or((_p("sink", n=2), CAUSAL)))),
    Heads((And((_p("local", w=2), CAUSAL)), And((CAUSAL, _p("none"))))),
    And((Heads((CAUSAL, ALL)), Heads((_p("sink", n=1), _p("local", w=2))))),
    Or((Blocks(2, CAUSAL), Blocks(2, _p("local", w=2)), Not(Blocks(3, Not(ALL))))),
    Heads((Heads((CAUSAL, ALL)), NONE, CAUSAL, ALL)),
    Blocks(2, Blocks(3, _p("local", w=Var("q_len")))),
    Blocks(1, Or((ALL, _p("band", left=2, right=2)))),
    Layers((_p("global", at=(3, 0, 1, 2, 2)), _p("dilated", w=1, d=3), _p("global", at=(0, 1)))),
    Diff(Not(Not(_p("chunk", l=1))), _p("strided", s=1)),
    Or((_p("summary", l=4, c=4, g=0), Not(NONE), And((_p("local", w=2), Not(_p("local", w=2)))))),
    Or((CAUSAL, And((_p("local", w=2), _p("prefix", n=0), CAUSAL)), And((CAUSAL, _p("random", r=0, seed=1))))),
    Or((CAUSAL, And((_p("local", w=2), Or((_p("sink", n=3), CAUSAL)))))),
    And((_p("band", left=3, right=0), CAUSAL, And((CAUSAL, _p("global", n=0))))),
    Layers((CAUSAL, CAUSAL)),
    Heads((And((_p("local", w=2), CAUSAL)), And((CAUSAL, _p("sink", n=3))))),
    Not(Blocks(3, CAUSAL)),
    Or((_p("local", w=2), And((_p("local", w=2), _p("sink", n=3))))),
    And((_p("band", left=1, right=2), And((CAUSAL, _p("sink", n=3))))),
    And((_p("local", w=3), _p("local", w=5), _p("strided", s=2), _p("strided", s=3), _p("chunk", l=2), _p("chunk", l=4))),
    Or((_p("band", left=1, right=3), _p("band", left=2, right=0), _p("global", at=(0,)), _p("global", at=(5, 1)),
        _p("strided", s=2), _p("strided", s=4), _p("chunk", l=3), _p("chunk", l=6), _p("sink", n=1), _p("sink", n=2))),
    And((_p("global", n=1), _p("global", n=3), _p("prefix", n=2), _p("prefix", n=4), _p("strided", s=2), _p("strided", s=4))),
    Or((_p("chunk", l=3), _p("chunk", l=4), _p("strided", s=2), _p("strided", s=3), _p("global", n=2), _p("global", at=(3,)))),
    PerDocument(And((PerDocument(_p("sink", n=2)), _p("document"), CAUSAL))),
    And((_p("document"), PerDocument(_p("local", w=Var("q_len"))), PerDocument(NONE), _p("sink", n=3))),
    Or((PerDocument(CAUSAL), PerDocument(_p("prefix", n=2)), _p("document"))),
]


@settings(max_examples=200, **SETTINGS)
@given(patterns(max_leaves=6))
def test_every_rewrite_keeps_the_predicate(p):
    assert checked_normalize(p, set()) == normalize(p)


def test_every_pass_fires_on_the_examples_and_keeps_the_predicate():
    fired = set()
    for p in PASS_EXAMPLES:
        assert checked_normalize(p, fired) == normalize(p)
    assert fired == {n for n, _ in PASSES}, sorted({n for n, _ in PASSES} - fired)


@settings(max_examples=150, **SETTINGS)
@given(patterns())
def test_normalize_keeps_the_predicate_and_is_a_normal_form(p):
    q = normalize(p)
    assert normalize(q) == q
    assert normal_form_problems(q) == []
    assert_same_predicate(p, q, what="normalize")


@settings(max_examples=150, **SETTINGS)
@given(patterns())
def test_print_parse_round_trip(p):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        q = normalize(p)
        assert patternc.parse(str(p)) == q
        assert patternc.parse(str(q)) == q
        assert str(patternc.parse(str(q))) == str(q)


@pytest.mark.parametrize("source", [
    "(local(w=max(1, q_len // 4)) | strided(s=max(1, isqrt(q_len)))) & causal",
    "blocks(2, local(w=max(1, q_len // 2)) | sink(n=kv_len - 1)) & causal",
    "heads(local(w=min(q_len, kv_len)), random(r=2, seed=1), summary(l=4, c=1, g=3))",
    "layers(blocks(3, random(r=1)), prefix(n=q_len // 2) | causal)",
])
def test_symbolic_lengths_through_combinators(source):
    """q_len / kv_len are the lengths where the primitive is evaluated: token counts outside
    blocks(...), block counts inside it (SPEC §1)."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        p = patternc.parse(source)
    raw = elaborate(source).pattern
    assert_same_predicate(raw, p, what=source)
    assert patternc.parse(str(p)) == p


def test_wide_operands_normalise_iteratively():
    """A wide `|` takes many root rewrites; they must not recurse (one rewrite per step would
    overflow the stack), and the result keeps the predicate."""
    p = patternc.parse(" | ".join(f"local(w={i + 1})" for i in range(5000)))
    assert str(p) == "local(w=5000)"
    src = " | ".join(f"(blocks({i % 7 + 1}, sink({i % 5})) & strided({i % 3 + 1}))" for i in range(600))
    raw = elaborate(src).pattern
    q = normalize(raw)
    assert normal_form_problems(q) == []
    assert_same_predicate(raw, q, lengths=[(16, 16), (9, 20)], what="wide")


def within(seconds: int, fn, *args):
    """``fn(*args)``, failing the test (not hanging it) past ``seconds``: rewrites that undo
    each other loop without end."""
    import signal

    def stop(signum, frame):
        raise AssertionError(f"no normal form within {seconds} s")

    old = signal.signal(signal.SIGALRM, stop)
    signal.alarm(seconds)
    try:
        return fn(*args)
    finally:
        signal.alarm(0)
        signal.signal(signal.SIGALRM, old)


@pytest.mark.parametrize("source", [
    # context_simplify took the `none` out of `a & ~a` (none & a & ~a), _collapse put it back: a loop
    "none & (local(w=q_len) & ~local(w=q_len) | causal)",
    "all | ((local(w=q_len) | ~local(w=q_len)) & causal)",
    "none & ((local(w=kv_len) & ~local(w=kv_len)) | sink(n=1)) & sink(n=2)",
    # factor_common / factor_choice moved the `none` out, _collapse put it back: unbounded recursion
    "(local(w=q_len) - local(w=q_len)) | (local(w=kv_len) - local(w=kv_len))",
    "(local(w=q_len) | ~local(w=q_len)) & (local(w=kv_len) | ~local(w=kv_len))",
    "heads(local(w=q_len) - local(w=q_len), local(w=kv_len) - local(w=kv_len))",
    "layers(local(w=q_len) | ~local(w=q_len), local(w=kv_len) | ~local(w=kv_len))",
])
def test_constants_kept_for_length_checks_are_not_moved(source):
    """``all`` / ``none`` kept beside length-dependent operands (``_collapse``) are not context
    or a shared operand: moved, they were made again where they were and normalising never ended."""
    raw = elaborate(source).pattern
    q = within(10, normalize, raw)
    assert normal_form_problems(q) == []
    assert_same_predicate(raw, q, what=source)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        assert patternc.parse(source) == q
        assert patternc.parse(str(q)) == q
