"""docs/language.md and docs/diagnostics.md stay true.

* every ```` ```text ```` block whose first line is ``oracle: SOURCE  q_len=N ...`` holds the
  oracle's picture of SOURCE (``UPDATE_GOLDEN=1`` redraws them);
* every window-convention translation in docs/language.md equals the library's predicate,
  written out in numpy from REFERENCES §6;
* the primitive table lists every primitive of the registry;
* docs/diagnostics.md documents every code the language raises, each example raises its code,
  and each shown rendering is the current one.
"""

from __future__ import annotations

import os
import re
import warnings
from pathlib import Path

import numpy as np
import pytest

import patternc
from patternc.errors import PatternError
from patternc.ir.primitives import PRIMITIVES
from patternc.reference import dense_mask

ROOT = Path(__file__).resolve().parent.parent
LANGUAGE = ROOT / "docs" / "language.md"
DIAGNOSTICS = ROOT / "docs" / "diagnostics.md"
UPDATE = bool(os.environ.get("UPDATE_GOLDEN"))
pytestmark = pytest.mark.filterwarnings("ignore::patternc.errors.PatternWarning")

_ORACLE_BLOCK = re.compile(r"```text\noracle: (?P<head>[^\n]*)\n(?P<body>.*?)```", re.S)


def picture(source: str, q_len: int, kv_len: int | None = None, heads: int = 1, layer: int = 0,
            documents: list | None = None) -> str:
    m = dense_mask(source, q_len=q_len, kv_len=kv_len, num_heads=heads, layer=layer,
                   documents=None if documents is None else [documents])
    m = m if documents is None else m[0]
    return "\n".join("   ".join(" ".join("#" if x else "." for x in m[h, i]) for h in range(heads))
                     for i in range(m.shape[1])) + "\n"


def _parse_head(head: str):
    source, _, opts = head.rpartition("  ")
    kw = {k: ([int(x) for x in v.split("+")] if k == "documents" else int(v))
          for k, v in (o.split("=") for o in opts.split())}  # documents=6+5: lengths of one row
    return source.strip(), kw


def test_oracle_pictures_are_current():
    text = LANGUAGE.read_text(encoding="utf-8")
    blocks = list(_ORACLE_BLOCK.finditer(text))
    assert len(blocks) >= 17
    stale = []

    def redraw(m):
        source, kw = _parse_head(m.group("head"))
        pic = picture(source, **kw)
        if pic != m.group("body"):
            stale.append(source)
        return f"```text\noracle: {m.group('head')}\n{pic}```"

    new = _ORACLE_BLOCK.sub(redraw, text)
    if UPDATE and new != text:
        LANGUAGE.write_text(new, encoding="utf-8")
        return
    assert not stale, f"stale pictures in docs/language.md (UPDATE_GOLDEN=1 redraws): {stale}"


def test_every_primitive_is_in_the_reference_table():
    text = LANGUAGE.read_text(encoding="utf-8")
    for name, spec in PRIMITIVES.items():
        row = [ln for ln in text.splitlines() if ln.startswith(f"| `{name}")]
        assert row, name
        for p in spec.all_param_names():
            if p != "p":
                assert any(p in r for r in row), (name, p)
        if spec.source and name not in ("heads", "layers", "all", "none"):
            assert any(len(r.split("|")) >= 5 and r.split("|")[4].strip() for r in row), name


# ---- window conventions (REFERENCES §6) ---------------------------------------------------------
N = 40
I = np.arange(N)[:, None]
J = np.arange(N)[None, :]

# (patternc spelling as written in docs/language.md, params, the library's predicate)
CONVENTIONS = [
    ("local(w=W) & causal", {"W": 5}, (0 <= I - J) & (I - J < 5)),
    ("local(w=W + 1) & causal", {"W": 5}, (0 <= I - J) & (I - J <= 5)),
    ("local(w=W // 2 + 1)", {"W": 7}, np.abs(I - J) <= 7 // 2),
    ("band(left=L, right=R)", {"L": 3, "R": 2}, (-3 <= J - I) & (J - I <= 2)),
    ("local(w=ctx) & causal", {"ctx": 6}, (0 <= I - J) & (I - J <= min(N - 1, 6 - 1))),
    ("local(w=l + 1) & causal", {"l": 4}, (0 <= I - J) & (I - J <= 4)),
    ("local(w=w // 2 + 1)", {"w": 6}, np.abs(I - J) <= 6 / 2),
    ("local(w=w + 1)", {"w": 3}, np.abs(I - J) <= 3),
    ("blocks(b, local(w=(w + 1) // 2))", {"b": 3, "w": 5}, np.abs(I // 3 - J // 3) <= (5 - 1) // 2),
    ("blocks(b, local(w=W // 2 + 1))", {"b": 4, "W": 3}, np.abs(I // 4 - J // 4) <= 3 // 2),
    ("blocks(b, local(w=W // 2 + 1) & causal)", {"b": 4, "W": 5}, (0 <= I // 4 - J // 4) & (I // 4 - J // 4 <= 5 // 2)),
    ("local(w=k) & causal", {"k": 7}, (0 <= I - J) & (I - J < 7)),
    ("(sink(n=S) | local(w=R + 1)) & causal", {"S": 2, "R": 6}, (J <= I) & ((J < 2) | (I - J <= 6))),
]


@pytest.mark.parametrize("spelling, params, predicate", CONVENTIONS, ids=[c[0] for c in CONVENTIONS])
def test_window_conventions(spelling, params, predicate):
    doc = LANGUAGE.read_text(encoding="utf-8")
    assert f"`{spelling}`" in doc.replace("\\|", "|")
    source = "".join(f"param {k} = {v}\n" for k, v in params.items()) + spelling
    assert np.array_equal(dense_mask(source, q_len=N)[0], predicate)


def test_natten_non_causal_away_from_the_edges():
    k = 5
    m = dense_mask(f"local(w={k} // 2 + 1)", q_len=N)[0]
    rows = slice(k // 2, N - k // 2)
    assert (m[rows].sum(axis=1) == k).all()  # exactly k keys, centred, where no shift is needed


# ---- diagnostics.md -------------------------------------------------------------------------------
_CODE_SECTION = re.compile(r"^### (?P<code>[PW]\d{3})\b(?P<body>.*?)(?=^### |^## |\Z)", re.S | re.M)
_EXAMPLE = re.compile(r"```pattern\n(?P<src>.*?)```\n+```text\n(?P<out>.*?)```", re.S)


def _language_codes():
    """Every P1xx/P2xx/W0xx the language modules can raise (found in their source)."""
    codes = set()
    for mod in ("lang/parser", "lang/elaborate", "ir/normalize", "ir/primitives", "ir/specialize",
                "source/frontdoor", "source/lint", "errors"):
        codes |= set(re.findall(r'"([PW][0-2]\d\d)"', (ROOT / "patternc" / f"{mod}.py").read_text()))
    codes |= set(re.findall(r'"(P3\d\d)"', (ROOT / "patternc" / "ir" / "specialize.py").read_text()))
    return codes - {"P900"}


def test_every_code_is_documented_with_an_example_and_a_fix():
    text = DIAGNOSTICS.read_text(encoding="utf-8")
    sections = {m.group("code"): m.group("body") for m in _CODE_SECTION.finditer(text)}
    missing = _language_codes() - set(sections)
    assert not missing, f"codes without a section in docs/diagnostics.md: {sorted(missing)}"
    for code, body in sections.items():
        assert "```text" in body, f"{code}: no rendered example"
        assert re.search(r"^\*\*Fix", body, re.M), f"{code}: no fix"


def test_diagnostics_examples_raise_their_code():
    text = DIAGNOSTICS.read_text(encoding="utf-8")
    checked = 0
    for m in _CODE_SECTION.finditer(text):
        code = m.group("code")
        for ex in _EXAMPLE.finditer(m.group("body")):
            src, out = ex.group("src"), ex.group("out")
            rendered = _render(src)
            assert re.match(rf"(error|warning)\[{code}\]", rendered), (code, rendered)
            assert rendered == out.rstrip("\n"), f"{code}: the shown rendering is stale:\n{rendered}"
            checked += 1
    assert checked >= 25


def _render(src: str) -> str:
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        try:
            patternc.parse(src, filename="example.pattern")
        except PatternError as e:
            return str(e)
    return "\n\n".join(str(w.message) for w in caught)
