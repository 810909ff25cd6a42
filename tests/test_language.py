"""The pattern language: canonical text tables, equivalence tables, the oracle by hand,
the API (parse / load / params), ``check`` and robustness (no input gives a traceback)."""

from __future__ import annotations

import json
import subprocess
import sys
import warnings
from pathlib import Path

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import patternc
from patternc.cli import main
from patternc.errors import ExitCode, PatternError, PatternWarning
from patternc.ir.normalize import normal_form_problems
from patternc.reference import dense_mask, random_keys

ROOT = Path(__file__).resolve().parent.parent
pytestmark = pytest.mark.filterwarnings("ignore::patternc.errors.PatternWarning")

# ---- canonical text ---------------------------------------------------------------------------
CANONICAL = [
    # primitives: keyword arguments in registry order, defaults omitted
    ("causal", "causal"),
    ("local(128)", "local(w=128)"),
    ("band(3, 0)", "local(w=4) & causal"),
    ("dilated(4, 2)", "dilated(w=4, d=2)"),
    ("chunk(l=128)", "chunk(l=128)"),
    ("summary(128, 8)", "summary(l=128, c=8)"),
    ("summary(l=128, c=8, g=1)", "summary(l=128, c=8, g=1)"),
    ("sink(4)", "sink(n=4)"),
    ("global(n=2)", "global(n=2)"),
    ("global(at=[5, 0, 5, 1])", "global(at=[0, 1, 5])"),
    ("random(3)", "random(r=3)"),
    ("random(r=3, seed=7)", "random(r=3, seed=7)"),
    ("blocks(16, local(w=3))", "blocks(16, local(w=3))"),
    ("heads(local(w=8), strided(s=8))", "heads(local(w=8), strided(s=8))"),
    # operators: flattened, sorted (`causal` after other operands, negations last), `&` in `|`
    # parenthesised
    ("causal & (strided(s=64) | local(w=128))", "(local(w=128) | strided(s=64)) & causal"),
    ("local(w=128) | strided(s=64) & causal", "local(w=128) | (strided(s=64) & causal)"),
    ("causal - local(w=4)", "causal & ~local(w=4)"),
    ("~sink(2) & causal & chunk(8)", "chunk(l=8) & causal & ~sink(n=2)"),
    ("prefix(n=16) | causal", "prefix(n=16) | causal"),
    # integer arithmetic is folded; q_len / kv_len stay symbolic
    ("local(w=2 * 64)", "local(w=128)"),
    ("local(w=1_024)", "local(w=1024)"),
    ("local(w=-(-3) + 7 // 2 % 3)", "local(w=3)"),
    ("local(w=max(1, q_len // 8))", "local(w=max(1, q_len // 8))"),
    ("strided(s=isqrt(kv_len) + 1)", "strided(s=isqrt(kv_len) + 1)"),
    ("local(w=(q_len + 1) * 2)", "local(w=(q_len + 1) * 2)"),
    ("local(w=q_len - (kv_len - 1))", "local(w=q_len - (kv_len - 1))"),
    # files: param / let / def / prelude are expanded
    ("param w = 128\nlocal(w) & causal", "local(w=128) & causal"),
    ("let win = local(w=4)\nwin & causal", "local(w=4) & causal"),
    ("def sh(s) = heads(strided(s), strided(2*s))\nsh(4) & causal", "heads(strided(s=4), strided(s=8)) & causal"),
    ("def f(a, b=2) = local(w=a * b)\nf(3) | f(b=1, a=5)", "local(w=6)"),
    ("fixed(128, 8) & causal", "(chunk(l=128) | summary(l=128, c=8)) & causal"),
    # normalisation (SPEC §1.4)
    ("causal | causal", "causal"),
    ("causal & all", "causal"),
    ("causal & causal", "causal"),
    ("~~causal", "causal"),
    ("local(w=4) & none", "none"),
    ("local(w=4) & ~local(w=4)", "none"),
    ("local(w=4) | ~local(w=4)", "all"),
    ("local(w=8) | (local(w=8) & sink(n=2))", "local(w=8)"),
    ("band(left=2, right=2)", "local(w=3)"),
    ("dilated(w=4, d=1)", "local(w=4)"),
    ("chunk(1)", "local(w=1)"),
    ("strided(1)", "all"),
    ("summary(l=4, c=4)", "all"),
    ("sink(0) | causal", "causal"),
    ("global(at=[1, 0])", "global(n=2)"),
    ("band(left=3, right=0) & causal", "local(w=4) & causal"),
    ("band(left=3, right=5) & causal", "local(w=4) & causal"),
    ("band(left=0, right=2) & causal", "local(w=1)"),
    ("(local(w=3) | (strided(s=4) & causal)) & causal", "(local(w=3) | strided(s=4)) & causal"),
    ("local(w=3) & causal | strided(s=2) & causal", "(local(w=3) | strided(s=2)) & causal"),
    ("heads(local(w=3) & causal, strided(s=4) & causal)", "heads(local(w=3), strided(s=4)) & causal"),
    ("layers(local(w=8) & causal, causal)", "layers(local(w=8), all) & causal"),
    ("heads(causal, causal)", "causal"),
    ("layers(causal, all, causal, all)", "layers(causal, all)"),
    ("heads(heads(causal, all), none)", "heads(causal, none)"),
    ("blocks(1, causal)", "causal"),
    ("blocks(2, blocks(3, causal))", "blocks(6, causal)"),
    ("blocks(4, all)", "all"),
    ("~blocks(2, causal)", "blocks(2, ~causal)"),
    ("blocks(2, causal) | blocks(2, sink(1))", "blocks(2, sink(n=1) | causal)"),
    ("local(w=3) & local(w=5)", "local(w=3)"),
    ("local(w=3) | local(w=5) | band(left=1, right=7)", "band(left=1, right=7) | local(w=5)"),
    ("strided(s=2) & strided(s=3)", "strided(s=6)"),
    ("strided(s=2) | strided(s=4)", "strided(s=2)"),
    ("chunk(4) | chunk(8) | chunk(3)", "chunk(l=3) | chunk(l=8)"),
    ("global(at=[0]) | global(at=[5]) | sink(1) | sink(3)", "global(at=[0, 5]) | sink(n=3)"),
]


@pytest.mark.parametrize("source, canonical", CANONICAL)
def test_canonical_text(source, canonical):
    p = patternc.parse(source)
    assert str(p) == canonical
    assert patternc.parse(canonical) == p
    assert str(patternc.parse(canonical)) == canonical
    assert normal_form_problems(p) == []


# Pairs of different sources with the same canonical text (so the same predicate).
SAME_CANONICAL = [
    ("local(w=128)", "local(128)"),
    ("(local(w=128) | strided(s=64)) & causal", "causal & (strided(64) | local(128))"),
    ("(local(w=128) | strided(s=64)) & causal", "local(w=128) & causal | strided(s=64) & causal"),
    ("fixed(3, 1) & causal", "(chunk(3) | summary(3, 1)) & causal"),
    ("causal - sink(2)", "causal & ~sink(2)"),
    ("~(~causal)", "causal"),
    ("heads(causal, local(w=2) & causal)", "heads(all, local(2)) & causal"),
    ("heads(causal, all, causal, all)", "heads(causal, all)"),
    ("param w = 4\nlocal(w)", "local(w=4)"),
    ("global(at=[2, 0, 1])", "global(n=3)"),
    ("band(1, 1)", "local(2)"),
    ("dilated(1, 9)", "chunk(1)"),
    ("blocks(2, blocks(2, local(2)))", "blocks(4, local(2))"),
    ("(causal | (sink(3) & local(4))) & causal", "causal"),
    ("causal | (local(w=2) & (sink(n=1) | causal))", "causal | (local(w=2) & sink(n=1))"),
]


@pytest.mark.parametrize("a, b", SAME_CANONICAL)
def test_same_canonical_text_and_mask(a, b):
    pa, pb = patternc.parse(a), patternc.parse(b)
    assert str(pa) == str(pb)
    for q, kv in [(13, 13), (9, 17)]:
        assert np.array_equal(dense_mask(a, q_len=q, kv_len=kv, num_heads=4),
                              dense_mask(b, q_len=q, kv_len=kv, num_heads=4))


# Same predicate, different canonical text: the normaliser does not prove these (documented
# in docs/language.md, "Canonical form"); the oracle shows they agree.
SAME_MASK_ONLY = [
    ("chunk(4) & strided(4)", "local(1)"),
    ("dilated(w=3, d=2) & causal", "band(left=4, right=0) & strided(2)"),
    ("prefix(n=4)", "sink(4) & ~global(at=[4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15]) & local(4)"),
    ("summary(l=4, c=2) | summary(l=4, c=2, g=1)", "all"),
    ("global(n=2)", "sink(2) | global(at=[1, 0])"),  # sink(n) is a subset of global(n=n)
]


@pytest.mark.parametrize("a, b", SAME_MASK_ONLY)
def test_same_mask_different_text(a, b):
    assert str(patternc.parse(a)) != str(patternc.parse(b))
    for q in (4, 7, 16):
        assert np.array_equal(dense_mask(a, q_len=q, kv_len=q), dense_mask(b, q_len=q, kv_len=q))


# ---- the oracle, by hand ---------------------------------------------------------------------

def _grid(rows):
    return np.array([[c == "1" for c in r] for r in rows.split()], dtype=bool)


@pytest.mark.parametrize("source, q, kv, rows", [
    ("local(w=2) & causal", 4, 4, "1000 1100 0110 0011"),
    ("local(w=2)", 4, 4, "1100 1110 0111 0011"),
    ("band(left=1, right=2)", 4, 5, "11100 11110 01111 00111"),
    ("strided(s=2) & causal", 5, 5, "10000 01000 10100 01010 10101"),
    ("dilated(w=2, d=2)", 5, 5, "10100 01010 10101 01010 00101"),
    ("chunk(l=2)", 5, 5, "11000 11000 00110 00110 00001"),
    ("summary(l=3, c=1)", 2, 7, "0010010 0010010"),
    ("summary(l=4, c=1, g=1)", 1, 8, "00100010"),
    ("sink(n=2)", 3, 4, "1100 1100 1100"),
    ("global(n=1)", 3, 3, "111 100 100"),
    ("global(at=[1, 9])", 3, 3, "010 111 010"),
    ("prefix(n=2) | causal", 4, 4, "1100 1100 1110 1111"),
    ("blocks(2, causal)", 5, 5, "11000 11000 11110 11110 11111"),
    ("blocks(2, local(w=1))", 3, 5, "11000 11000 00110"),
    ("blocks(2, sink(n=q_len - 1))", 6, 6, "111100 111100 111100 111100 111100 111100"),
    ("causal", 2, 4, "1000 1100"),
    ("causal", 4, 2, "10 11 11 11"),
])
def test_oracle_by_hand(source, q, kv, rows):
    assert np.array_equal(dense_mask(source, q_len=q, kv_len=kv)[0], _grid(rows))


def test_oracle_heads_layers_and_random():
    m = dense_mask("heads(causal, all, none)", q_len=3, num_heads=4)
    assert np.array_equal(m[0], np.tril(np.ones((3, 3), bool))) and m[1].all() and not m[2].any()
    assert np.array_equal(m[3], m[0])  # h mod 3
    lay = "layers(causal, ~causal)"
    assert np.array_equal(dense_mask(lay, q_len=3, layer=3), ~dense_mask(lay, q_len=3, layer=0))
    r = dense_mask("random(r=3, seed=5)", q_len=6, kv_len=10, num_heads=2)
    rng = np.random.Generator(np.random.PCG64(5))
    for i in range(6):
        keys = rng.choice(10, size=3, replace=False)
        assert set(np.flatnonzero(r[0, i])) == set(keys.tolist())
    assert np.array_equal(r[0], r[1])  # same draws for every head
    rng = np.random.Generator(np.random.PCG64(0))
    assert [k.tolist() for k in random_keys(2, 0, 3, 4)] == [rng.choice(4, size=2, replace=False).tolist() for _ in range(3)]
    assert dense_mask("random(r=9)", q_len=2, kv_len=4).sum() == 8  # min(r, KV_LEN) per row


def test_oracle_errors():
    with pytest.raises(ValueError):
        dense_mask("causal", q_len=0)
    with pytest.raises(PatternError) as e:
        dense_mask("local(w=q_len - 4) & causal", q_len=3)
    assert e.value.code == "P301"
    assert str(e.value).splitlines()[3:5] == ["1 | local(w=q_len - 4) & causal", "  | ^^^^^^^^^^^^^^^^^^"]


# ---- API -----------------------------------------------------------------------------------------

def test_parse_params_and_load(tmp_path):
    src = "param w = 8\nparam s = 4\n(local(w) | strided(s)) & causal"
    assert str(patternc.parse(src)) == "(local(w=8) | strided(s=4)) & causal"
    assert str(patternc.parse(src, params={"w": 16})) == "(local(w=16) | strided(s=4)) & causal"
    assert str(patternc.parse("local(w=n)", params={"n": 3})) == "local(w=3)"
    f = tmp_path / "p.pattern"
    f.write_bytes(b"\xef\xbb\xbf" + src.encode() + b"\r\n")  # BOM and CRLF are fine
    assert patternc.load(f, params={"s": 2}) == patternc.parse(src, params={"s": 2})
    p = patternc.parse(src)
    assert patternc.parse(p) is p
    for bad, code in [({"w": 2**40}, "P213"), ({"w": "8"}, "P214"), ({"x": 1}, "P214"), ({"w": True}, "P214")]:
        with pytest.raises(PatternError) as e:
            patternc.parse(src, params=bad)
        assert e.value.code == code


def test_warnings_are_pattern_warnings():
    with warnings.catch_warnings(record=True) as w:
        warnings.simplefilter("always")
        patternc.parse("local(w=128) | strided(s=64) & causal")
    codes = sorted(str(x.message).split("]")[0].split("[")[1] for x in w if x.category is PatternWarning)
    assert codes == ["W001", "W002"]
    with warnings.catch_warnings(record=True) as w:
        warnings.simplefilter("always")
        patternc.parse("(local(w=128) | strided(s=64)) & causal")
        patternc.parse("causal | prefix(n=8)")  # the prefix-LM is bidirectional on purpose
        patternc.parse("(sink(n=1) | local(w=1)) | causal")  # proven causal: no warning
    assert not w


@pytest.mark.parametrize("module", ["source.frontdoor", "reference", "lang.formatter", "ir.printer", "ir.normalize", "errors", "ir.primitives", "ir.specialize", "cli.common"])
def test_doctests(module):
    import doctest
    import importlib

    result = doctest.testmod(importlib.import_module(f"patternc.{module}"))
    assert result.attempted > 0 and result.failed == 0


def test_import_patternc_does_not_import_torch():
    code = "import sys, patternc; patternc.parse('causal'); print('torch' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=ROOT, check=True)
    assert out.stdout.strip() == "False"


# ---- patternc check -----------------------------------------------------------------------------

def test_check_the_issue_example(capsys):
    assert main(["check", "-e", "(local(w=128) | strided(s=64)) & causal"]) == ExitCode.OK
    out = capsys.readouterr()
    assert out.out.splitlines()[:2] == ["canonical: (local(w=128) | strided(s=64)) & causal", "causal: yes"]
    assert out.err == ""


def test_check_json(capsys):
    assert main(["check", "--json", "-e", "local(w=128) | strided(s=64) & causal"]) == ExitCode.OK
    obj = json.loads(capsys.readouterr().out)
    assert obj["ok"] is True
    assert obj["canonical"] == "local(w=128) | (strided(s=64) & causal)"
    assert [d["code"] for d in obj["diagnostics"]] == ["W001", "W002"]
    assert obj["causal"] is False and obj["causal_witness"] == {"layer": 0, "head": 0, "i": 0, "j": 1}
    assert obj["symmetric"] is False and obj["heads"] == 1 and obj["layers"] == 1
    assert main(["check", "--json", "--set", "w=64", "-e", "param w = 8\nlocal(w) & causal"]) == 0
    obj = json.loads(capsys.readouterr().out)
    assert obj["canonical"] == "local(w=64) & causal" and obj["params"] == {"w": 64} and obj["causal"] is True


def test_check_properties_use_witnesses(capsys):
    assert main(["check", "-e", "heads(causal, local(w=3)) & band(left=3, right=4)"]) == 0
    out = capsys.readouterr().out
    assert "causal: no (query 0 attends the later key 1 in head 1)" in out
    assert "symmetric: no (query 1 attends key 0, but query 0 does not attend key 1 in head 0)" in out
    assert "heads: 2" in out


# ---- robustness: no input gives anything but a PatternError ----------------------------------------

TOKENS = ["local", "band", "strided", "dilated", "chunk", "summary", "sink", "global", "prefix", "random",
          "heads", "layers", "blocks", "all", "none", "causal", "fixed", "q_len", "kv_len", "min", "max",
          "isqrt", "param", "let", "def", "w", "s", "x", "f", "n", "at", "(", ")", "[", "]", ",", "=", "|",
          "&", "-", "~", "+", "*", "//", "%", "0", "1", "3", "64", "-1", "2147483648", "\n", "# c\n",
          " ", "\t", "\r\n", "!", "é", "窓", "\x00"]


def _must_be_clean(text):
    try:
        p = patternc.parse(text)
    except PatternError as e:
        assert e.code.startswith("P") and str(e)
        return
    str(p)
    assert normal_form_problems(p) == []


FUZZ = dict(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])


@settings(**FUZZ)
@given(st.lists(st.sampled_from(TOKENS), max_size=30).map(" ".join))
def test_token_soup_never_crashes(text):
    _must_be_clean(text)


@settings(**FUZZ)
@given(st.text(max_size=60))
def test_random_text_never_crashes(text):
    _must_be_clean(text)


@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.lists(st.sampled_from(TOKENS), max_size=20).map("".join))
def test_check_command_never_crashes(text):
    rc = main(["check", "--json", f"--expr={text}"])  # the = form: the text may start with `-`
    assert rc in (ExitCode.OK, ExitCode.PROBLEMS)


def test_check_command_output_on_fuzz_is_json(capsys):
    assert main(["check", "--json", "-e", "local(w=1) ( ]"]) == ExitCode.PROBLEMS
    obj = json.loads(capsys.readouterr().out)
    assert obj["ok"] is False and obj["diagnostics"][0]["code"].startswith("P1")
