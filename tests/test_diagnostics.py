"""Diagnostics: every bad input has its own code and an exact rendering (golden files).

Golden files live in ``tests/golden/diagnostics``: ``NAME.pattern`` is the input (or it is
generated below, for inputs too large to keep), ``NAME.txt`` the exact output of
``patternc check NAME.pattern`` run in that folder (exit code, stdout, stderr).
Regenerate with ``UPDATE_GOLDEN=1 python -m pytest tests/test_diagnostics.py``; the table
``EXPECTED`` pins the code and exit status of each case, so a regenerated file with the
wrong code still fails.
"""

from __future__ import annotations

import json
import os
import re
from pathlib import Path

import pytest
from lark.exceptions import UnexpectedInput

import patternc
from patternc.cli import main
from patternc.errors import TAB_WIDTH, Diagnostic, ExitCode, PatternError, Span
from patternc.lang.parser import SYNTAX_EXAMPLES, _label, get_parser, parse_tree

GOLDEN = Path(__file__).parent / "golden" / "diagnostics"
UPDATE = bool(os.environ.get("UPDATE_GOLDEN"))

# name -> (first code printed, exit status)
EXPECTED = {
    "unexpected_character": ("P101", 1),
    "unclosed_paren": ("P102", 1),
    "mismatched_bracket": ("P102", 1),
    "unmatched_close": ("P102", 1),
    "ends_mid_expression": ("P103", 1),
    "missing_operator": ("P104", 1),
    "empty_file": ("P105", 1),
    "comments_only": ("P105", 1),
    "deep_nesting_10000": ("P106", 1),
    "deep_negation_10000": ("P106", 1),
    "long_difference_chain": ("P106", 1),
    "huge_5mb": ("P107", 1),
    "non_utf8": ("P108", 1),
    "missing_operand": ("P109", 1),
    "expected_name": ("P110", 1),
    "two_final_expressions": ("P111", 1),
    "no_final_expression": ("P111", 1),
    "incomplete_statement": ("P112", 1),
    "def_without_parens": ("P112", 1),
    "unknown_primitive": ("P201", 1),
    "crlf": ("P201", 1),
    "unknown_parameter": ("P202", 1),
    "missing_argument": ("P203", 1),
    "duplicate_argument": ("P204", 1),
    "global_both_forms": ("P204", 1),
    "too_many_arguments": ("P205", 1),
    "int_where_pattern_expected": ("P206", 1),
    "pattern_where_int_expected": ("P207", 1),
    "out_of_range_w0": ("P208", 1),
    "out_of_range_s_negative": ("P208", 1),
    "out_of_range_summary": ("P208", 1),
    "fixed_out_of_range": ("P208", 1),
    "isqrt_negative": ("P208", 1),
    "undefined_name": ("P209", 1),
    "tabs": ("P209", 1),
    "wide_characters": ("P101", 1),
    "recursion_in_def": ("P210", 1),
    "recursion_in_let": ("P210", 1),
    "shadowing_primitive": ("P211", 1),
    "redefinition": ("P211", 1),
    "division_by_zero": ("P212", 1),
    "integer_too_large": ("P213", 1),
    "set_unknown_param": ("P214", 1),
    "call_non_function": ("P215", 1),
    "exponential_expansion": ("P216", 1),
    "term_as_pattern": ("P217", 1),
    "pattern_as_term": ("P218", 1),
    "repeated_term": ("P219", 1),
    "term_inside_let": ("P113", 1),
    "set_not_an_int": (None, 2),
    "precedence_warning": ("W001", 0),
    "tabs_crlf_warning": ("W001", 0),
    "block_level_causal": ("W002", 0),
    "causal_union": ("W002", 0),
    "unused_param": ("W005", 0),
    "set_unused_param": ("W006", 0),
}

ARGS = {
    "set_unknown_param": ["--set", "wdth=64"],
    "set_not_an_int": ["--set", "w=big"],
    "set_unused_param": ["--set", "s=32"],
}

# Inputs too large to keep in the repository: generated into a temporary folder.
GENERATED = {
    "deep_nesting_10000": lambda: b"(" * 10_000 + b"causal" + b")" * 10_000 + b"\n",
    "deep_negation_10000": lambda: b"~" * 10_000 + b"causal\n",
    "long_difference_chain": lambda: b"all" + b" - local(w=1)" * 10_000 + b"\n",
    "huge_5mb": lambda: b"# five megabytes of pattern\n" + b" | ".join(b"local(w=%d)" % (i + 1) for i in range(290_000)) + b"\n",
}


def _cases():
    static = sorted(p.stem for p in GOLDEN.glob("*.pattern"))
    return static + sorted(GENERATED)


def _run_check(name, tmp_path, monkeypatch, capsys):
    if name in GENERATED:
        data = GENERATED[name]()
        (tmp_path / f"{name}.pattern").write_bytes(data)
        monkeypatch.chdir(tmp_path)
    else:
        monkeypatch.chdir(GOLDEN)
    argv = ["check", f"{name}.pattern", *ARGS.get(name, [])]
    rc = main(argv)
    out = capsys.readouterr()
    text = f"$ patternc {' '.join(argv)}\nexit: {rc}\n--- stdout\n{out.out}--- stderr\n{out.err}"
    return rc, out, text


def test_every_case_has_an_expectation():
    assert set(_cases()) == set(EXPECTED), set(_cases()) ^ set(EXPECTED)


@pytest.mark.parametrize("name", _cases())
def test_golden(name, tmp_path, monkeypatch, capsys):
    rc, out, text = _run_check(name, tmp_path, monkeypatch, capsys)
    code, status = EXPECTED[name]
    assert rc == status, text
    if code is not None:
        first = out.err.splitlines()[0]
        assert re.match(rf"(error|warning)\[{code}\]: ", first), text
    assert "Traceback" not in text
    golden = GOLDEN / f"{name}.txt"
    if UPDATE:
        golden.write_text(text, encoding="utf-8", newline="")
    assert golden.exists(), f"no golden file {golden}; run with UPDATE_GOLDEN=1"
    assert text == golden.read_text(encoding="utf-8"), f"rendering changed for {name}:\n{text}"


def _caret_target(rendered: str, lineno: int) -> str:
    """The characters of the shown source line that the carets sit under."""
    lines = rendered.splitlines()
    src = next(ln for ln in lines if ln.startswith(f"{lineno} | "))
    carets = lines[lines.index(src) + 1]
    shown = src[len(f"{lineno} | "):]
    caret_text = carets[len(f"{' ' * len(str(lineno))} | "):]
    start = len(caret_text) - len(caret_text.lstrip(" "))
    return shown[start:len(caret_text)]


@pytest.mark.parametrize("source, target, line", [
    ("param w = 128\n\tlocal(w=w)\t|\tstrided(s=strid)\t& causal\n", "strid", 2),
    ("param w = 128\r\nlet x = locl(w=w)\r\nx & causal\r\n", "locl", 2),
    ("\t\tlocal(w=1)\t\t&\t\tfoo", "foo", 1),
    ("x = 1\tlocal(w=1)", "=", 1),
])
def test_carets_line_up_with_tabs_and_crlf(source, target, line):
    with pytest.raises(PatternError) as e:
        patternc.parse(source)
    assert _caret_target(str(e.value), line) == target


def test_carets_under_tab_expanded_columns():
    # a span over "bb" after two tabs: tab stops every TAB_WIDTH columns
    src = "a\tbb\tc"
    d = Diagnostic("P999", "m", Span(2, 4, 1, 3, 1, 5), "h", source=src)
    shown = src.expandtabs(TAB_WIDTH)
    assert _caret_target(d.render(), 1) == "bb"
    assert d.render().splitlines()[3] == f"1 | {shown}"


def test_long_lines_are_windowed_around_the_span():
    src = "x" * 500 + "foo" + "y" * 500
    d = Diagnostic("P999", "m", Span(500, 503, 1, 501, 1, 504), "h", source=src)
    r = d.render()
    assert _caret_target(r, 1) == "foo"
    assert max(len(ln) for ln in r.splitlines()) < 130


# ---- the syntax-error table (Lark match_examples) is the error-message test ---------------------

@pytest.mark.parametrize("code, example", [(c, e) for c, exs in SYNTAX_EXAMPLES.items() for e in exs])
def test_syntax_examples_get_their_code(code, example):
    with pytest.raises(PatternError) as e:
        parse_tree(example)
    assert e.value.code == code, str(e.value)
    d = e.value.diagnostic
    assert d.help and d.span is not None
    rendered = str(e.value)
    assert rendered.startswith(f"error[{code}]: ") and "\nhelp: " in rendered


@pytest.mark.parametrize("code, example", [(c, e) for c, exs in SYNTAX_EXAMPLES.items() if c != "P102" for e in exs])
def test_match_examples_labels_the_table(code, example):
    """Lark's match_examples alone (no heuristics) labels every example with its code."""
    with pytest.raises(UnexpectedInput) as e:
        get_parser().parse(example)
    assert _label(e.value) == code


@pytest.mark.parametrize("source, code", [
    ("(1, 2)", "P113"),
    ("causal &\nlet x = causal", "P109"),
    ("local(w=1]", "P102"),
    ("local(w=3);", "P101"),
])
def test_other_syntax_errors(source, code):
    with pytest.raises(PatternError) as e:
        parse_tree(source)
    assert e.value.code == code


# ---- the error type and the CLI contract ----------------------------------------------------------

def test_pattern_error_is_a_value_error_whose_str_is_the_rendering():
    with pytest.raises(ValueError) as e:
        patternc.parse("locl(w=3)")
    err = e.value
    assert isinstance(err, PatternError)
    assert str(err) == err.diagnostic.render()
    assert str(err).splitlines()[:2] == ["error[P201]: unknown primitive or function `locl`", " --> <string>:1:1"]
    assert str(err).splitlines()[-1] == "help: did you mean `local`?"


def test_check_json_on_error(capsys):
    rc = main(["check", "--json", "-e", "local(w=0) & causal"])
    out = json.loads(capsys.readouterr().out)
    assert rc == ExitCode.PROBLEMS
    assert out["ok"] is False
    [d] = out["diagnostics"]
    assert (d["code"], d["severity"], d["line"], d["column"], d["end_column"]) == ("P208", "error", 1, 9, 10)
    assert d["help"]


def test_check_exit_code_2_for_unreadable_file(tmp_path, capsys):
    assert main(["check", str(tmp_path / "missing.pattern")]) == ExitCode.USAGE
    assert "cannot read" in capsys.readouterr().err
    assert main(["check", "--json", str(tmp_path)]) == ExitCode.USAGE
    assert json.loads(capsys.readouterr().out)["ok"] is False


def test_check_exit_code_2_for_usage(capsys):
    with pytest.raises(SystemExit) as e:
        main(["check"])
    assert e.value.code == 2
    with pytest.raises(SystemExit) as e:
        main(["check", "-e", "causal", "x.pattern"])
    assert e.value.code == 2
