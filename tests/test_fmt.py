"""``patternc fmt``: canonical layout with comments kept; idempotent; meaning preserved."""

from __future__ import annotations

import os
import re
import warnings
from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

import patternc
from patternc.cli import main
from patternc.errors import PatternError, PatternWarning
from patternc.lang.formatter import WIDTH, format_source
from patternc.lang.parser import parse_tree_with_comments
from strategies import lang_patterns as patterns

ROOT = Path(__file__).resolve().parent.parent
GOLDEN = Path(__file__).parent / "golden" / "diagnostics"
pytestmark = pytest.mark.filterwarnings("ignore::patternc.errors.PatternWarning")


def _sources():
    """Every example and every golden input that decodes (name, text)."""
    out = []
    for p in sorted((ROOT / "examples").rglob("*.pattern")) + sorted(GOLDEN.glob("*.pattern")):
        try:
            out.append((str(p.relative_to(ROOT)), p.read_bytes().decode("utf-8")))
        except UnicodeDecodeError:
            continue
    return out


SOURCES = _sources()


def _outcome(text):
    """What a source means: its canonical pattern and warning codes, or its error code."""
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        try:
            p = patternc.parse(text)
        except PatternError as e:
            return ("error", e.code)
    codes = sorted(re.match(r"warning\[(\w+)\]", str(w.message)).group(1) for w in caught
                   if issubclass(w.category, PatternWarning))
    return ("ok", p, codes)


def _comments(text):
    try:
        return sorted(str(c).rstrip() for c in parse_tree_with_comments(text)[1])
    except PatternError:
        return None


@pytest.mark.parametrize("name, text", SOURCES, ids=[n for n, _ in SOURCES])
def test_fmt_is_idempotent_keeps_comments_and_meaning(name, text):
    try:
        once = format_source(text)
    except PatternError:
        with pytest.raises(PatternError):
            patternc.parse(text)
        return
    assert format_source(once) == once
    assert _comments(once) == _comments(text)
    before, after = _outcome(text), _outcome(once)
    if before[0] == "error":
        assert after == before
    else:
        assert after[1] == before[1]  # the same canonical Pattern
        assert "W001" not in after[2]  # `&` inside `|` is now parenthesised
        assert [c for c in before[2] if c != "W001"] == after[2]
    for line in once.splitlines():
        if "#" not in line:
            assert len(line) <= WIDTH or " " not in line.strip(), line


def test_sources_include_examples_when_present():
    if (ROOT / "examples").is_dir():
        assert any(n.startswith("examples") for n, _ in SOURCES)
    assert len(SOURCES) >= 40


LAYOUT = [
    # (input, formatted)
    ("local( w = 128 )|strided(s=64)&causal", "local(w=128) | (strided(s=64) & causal)\n"),
    ("param w=128 # window\n\n\n\nlocal(w=w)&causal", "param w = 128  # window\n\nlocal(w=w) & causal\n"),
    ("\n\n# head\n\ncausal\n\n\n# tail\n\n", "# head\n\ncausal\n\n# tail\n"),
    ("def f(a,b = 2)=heads(strided(a),strided(2*a+b))\nf(3)",
     "def f(a, b=2) = heads(strided(a), strided(2 * a + b))\nf(3)\n"),
    ("~ ~causal - -x", "~~causal - -x\n"),
    ("global(at=[ 0,64 , ])", "global(at=[0, 64])\n"),
    ("local(w=1_024)&causal\r\n", "local(w=1_024) & causal\n"),
    ("\tlocal(w=3)\t&\tcausal\t# tabbed\t", "local(w=3) & causal  # tabbed\n"),
    ("(local(w=1) | local(w=2)) & causal", "(local(w=1) | local(w=2)) & causal\n"),
    ("a & b | c & d", "(a & b) | (c & d)\n"),
    ("let y = local(w=1)  # c1\n  | local(w=2)  # c2\n  # c3\n  | local(w=3)\ny",
     "let y = local(w=1)  # c1\n    | local(w=2)  # c2\n    # c3\n    | local(w=3)\ny\n"),
    ("let y = blocks(4,  # inside\n  local(w=1))\ny", "let y = blocks(\n    4,  # inside\n    local(w=1),\n)\ny\n"),
    ("heads(" + ", ".join(f"local(w={1000 + i})" for i in range(8)) + ") & causal",
     "heads(\n" + "".join(f"    local(w={1000 + i}),\n" for i in range(8)) + ") & causal\n"),
    ("let u = " + " | ".join(f"local(w={100000 + i})" for i in range(7)),
     "let u = local(w=100000)\n" + "".join(f"    | local(w={100000 + i})\n" for i in range(1, 7))),
]


@pytest.mark.parametrize("source, expected", LAYOUT)
def test_layout_table(source, expected):
    assert format_source(source) == expected
    assert format_source(expected) == expected
    assert _comments(expected) == _comments(source)


_BREAKS = st.sampled_from(["", " ", "  ", "\t", "\n", "\n\n", "  # c\n", "\n# own line\n"])


@settings(max_examples=60, deadline=None)
@given(p=patterns(), breaks=st.lists(_BREAKS, min_size=1, max_size=8), name=st.booleans())
def test_fmt_of_generated_patterns(p, breaks, name):
    """Canonical text with blanks, new lines and comments inserted where the grammar allows
    them (after `|`, `&`, `(` and `,`) formats idempotently, keeps every comment and means the
    same pattern."""
    text, k = [], 0
    for ch in str(p):
        text.append(ch)
        if ch in "|&(,":
            text.append(breaks[k % len(breaks)])
            k += 1
    text = "".join(text)
    if name:
        text = "# head\nlet x = " + text + "  # tail\nx"
    once = format_source(text)
    assert format_source(once) == once
    assert _comments(once) == _comments(text)
    # every comment after code stays after code (none is hoisted onto its own line)
    assert _after_code(once) == _after_code(text)
    assert patternc.parse(once) == patternc.parse(text) == patternc.parse(str(p))


def _after_code(text):
    """The comments that follow code on their line."""
    return sorted(str(c).rstrip() for c in parse_tree_with_comments(text)[1]
                  if text.split("\n")[c.line - 1][: c.column - 1].strip())


# comments inside an expression stay on the line of the code they followed
COMMENTED = [
    # the reported case: an operand-per-line group, then a short tail and the statement's comment
    ("( window # win\n | stride_heads(s=w) # strides\n) & causal # final",
     "(\n    window  # win\n    | stride_heads(s=w)  # strides\n) & causal  # final\n"),
    # without inner comments a short statement stays on one line
    ("(window\n | stride_heads(s=w)\n) & causal # final", "(window | stride_heads(s=w)) & causal  # final\n"),
    # a comment after the operator goes with the operand before it
    ("a |  # after op\n b", "a  # after op\n    | b\n"),
    # after the last operand of a group, before its `)`
    ("(a | b  # last\n) & c", "(\n    a | b  # last\n) & c\n"),
    # a commented group as the last operand
    ("causal & (local(w=4)  # near\n | sink(1))",
     "causal & (\n    local(w=4)  # near\n    | sink(1)\n)\n"),
    # a commented group in the middle of a chain: one operand per line
    ("a | (b  # in\n | c) | d", "a\n    | (\n        b  # in\n        | c\n    )\n    | d\n"),
    # nested groups
    ("((a  # deep\n | b) & c) | d  # end",
     "(\n    (\n        a  # deep\n        | b\n    ) & c\n) | d  # end\n"),
    # call arguments: after the `(`, after an argument (and its comma), own-line comments
    ("heads(local(w=1),  # one\n  local(w=2)  # two\n) & causal",
     "heads(\n    local(w=1),  # one\n    local(w=2),  # two\n) & causal\n"),
    ("heads(  # open\n local(w=1),\n # own line\n local(w=2))",
     "heads(  # open\n    local(w=1),\n    # own line\n    local(w=2),\n)\n"),
    # inside an integer argument and inside a keyword argument's list
    ("strided(2 *  # twice\n s)", "strided(\n    2  # twice\n    * s,\n)\n"),
    ("global(at=[0,  # zero\n 64])", "global(\n    at=[\n        0,  # zero\n        64,\n    ],\n)\n"),
    # behind a prefix operator
    ("~(a  # x\n | b)", "~(\n    a  # x\n    | b\n)\n"),
    # two comments after code in one gap: the second goes on its own line (one comment a line)
    ("f(x  # c1\n , # c2\n y)", "f(\n    x,  # c1\n    # c2\n    y,\n)\n"),
    # places no layout breaks at move before the statement (as own-line comments)
    ("let x =  # head\n a | b", "# head\nlet x = a | b\n"),
    ("def f(a,  # p\n b) = a", "# p\ndef f(a, b) = a\n"),
    ("g(f  # name\n (x), k  # kw\n = 1)", "# name\n# kw\ng(f(x), k=1)\n"),
    ("f(  # empty\n)", "# empty\nf()\n"),
]


@pytest.mark.parametrize("source, expected", COMMENTED)
def test_comments_inside_expressions(source, expected):
    once = format_source(source)
    assert once == expected
    assert format_source(once) == once
    assert _comments(once) == _comments(source)
    assert _outcome(once)[:2] == _outcome(source)[:2]  # the same pattern (or the same error)


def test_reported_case_file(tmp_path, capsys):
    f = tmp_path / "c.pattern"
    f.write_text("param w = 8\nlet window = local(w) & causal\n"
                 "def stride_heads(s) = heads(strided(s), strided(2*s))\n"
                 "( window # win\n | stride_heads(s=w) # strides\n) & causal # final\n")
    before = patternc.parse(f.read_text())
    assert main(["fmt", str(f)]) == 0
    assert f.read_text().splitlines()[-4:] == [
        "(", "    window  # win", "    | stride_heads(s=w)  # strides", ") & causal  # final"]
    assert patternc.parse(f.read_text()) == before
    assert main(["fmt", "--check", str(f)]) == 0


# fuzz-found regressions: a statement whose comments all move before it keeps the usual layout
REGRESSIONS = [
    "def f(a,\n b=2) = ~(\t(\n\n~chunk(  # c14\n1))) & local(\n\nw=a)\nf(3)",
    "layers(sink(\tn=7 + kv_len * min(3, 5)) - band(min(min(5, 8),  # c88\n max(  # c51\n5, 2147)) % 2147, 1),"
    "  # c29\n (fixed(l=5, c=1)),\n\n causal) - (~none) - (chunk(l=5)) - chunk(1) - ~chunk(\tl=2147 % isqrt(5 // 2) + 1)"
    " | layers(random(1), none)",
    "def f(a, b=2) = (~dilated(max(1, q_len), max(1,  # c16\n 21474 + 21474 % q_len)) & layers(all\n) |\n"
    " (local(isqrt(2147483))) - (\nfixed(isqrt(kv_len), c=2))) & local(w=a)\nf(2)",
]


@pytest.mark.parametrize("source", REGRESSIONS)
def test_fmt_regressions(source):
    once = format_source(source)
    assert format_source(once) == once
    assert _comments(once) == _comments(source)
    assert patternc.parse(once) == patternc.parse(source)


# ---- the command -------------------------------------------------------------------------------

def test_fmt_check_and_in_place_write(tmp_path, capsys):
    f = tmp_path / "p.pattern"
    f.write_text("# keep me\nparam w=3\nlocal(w=w)|causal&sink(4)  # and me\n")
    os.chmod(f, 0o640)
    assert main(["fmt", "--check", str(f)]) == 1
    assert "would reformat" in capsys.readouterr().err
    assert main(["fmt", "--diff", str(f)]) == 0
    assert "+local(w=w) | (causal & sink(4))  # and me" in capsys.readouterr().out
    assert main(["fmt", str(f)]) == 0
    assert f.read_text() == "# keep me\nparam w = 3\nlocal(w=w) | (causal & sink(4))  # and me\n"
    assert (os.stat(f).st_mode & 0o777) == 0o640
    assert sorted(os.listdir(tmp_path)) == ["p.pattern"]  # no temporary file left
    mtime = os.stat(f).st_mtime_ns
    assert main(["fmt", "--check", str(f)]) == 0
    assert main(["fmt", str(f)]) == 0
    assert os.stat(f).st_mtime_ns == mtime  # an unchanged file is not rewritten


def test_fmt_expr_and_errors(tmp_path, capsys):
    assert main(["fmt", "-e", "causal&local(w=3)"]) == 0
    assert capsys.readouterr().out == "causal & local(w=3)\n"
    assert main(["fmt", "--check", "-e", "causal & local(w=3)"]) == 0
    bad = tmp_path / "bad.pattern"
    bad.write_text("local(w=1) |\n")
    assert main(["fmt", str(bad)]) == 1
    assert "error[P103]" in capsys.readouterr().err
    assert bad.read_text() == "local(w=1) |\n"
    assert main(["fmt", str(tmp_path / "missing.pattern")]) == 2
    assert main(["fmt"]) == 2
