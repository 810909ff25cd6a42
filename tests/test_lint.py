"""ruff (pinned in the test extra, configured in pyproject.toml) is clean on the tree, so a
plain ``pytest`` catches what ``.ci/run``'s lint step would."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def test_ruff_is_clean():
    r = subprocess.run([sys.executable, "-m", "ruff", "check", "--no-cache", "patternc", "tests", "benchmarks", "examples"],
                       cwd=ROOT, capture_output=True, text=True)
    assert r.returncode == 0, (r.stdout + r.stderr + "\nfix: `python -m ruff check --fix patternc tests benchmarks examples`"
                               " (ruff is pinned in the test extra: pip install -e '.[test]')")


def test_ruff_is_pinned_and_run_by_ci():
    assert '"ruff==' in (ROOT / "pyproject.toml").read_text()
    ci = (ROOT / ".ci" / "run").read_text()
    assert ci.index("ruff check") < ci.index("pytest")


def test_one_cdiv_and_one_newline_handling():
    """Ceil-division is ``ir.specialize.cdiv`` and newline handling ``errors.normalize_newlines``
    everywhere in the product (the oracle, ``patternc/reference.py``, stays self-contained)."""
    offenders = []
    for f in sorted((ROOT / "patternc").rglob("*.py")):
        rel = f.relative_to(ROOT).as_posix()
        text = f.read_text(encoding="utf-8")
        if rel not in ("patternc/reference.py", "patternc/ir/specialize.py") and "-(-" in text:
            offenders.append(f"{rel}: write cdiv(a, b) (patternc.ir.specialize), not -(-a // b)")
        if rel != "patternc/errors.py" and 'replace("\\r\\n"' in text:
            offenders.append(f"{rel}: use patternc.errors.normalize_newlines")
    assert offenders == []
