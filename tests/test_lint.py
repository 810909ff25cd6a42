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
