"""The wheel carries the grammar and the prelude: build it, install it into a fresh virtual
environment outside the checkout, and parse / check a pattern file from there."""

from __future__ import annotations

import os
import shutil
import site
import subprocess
import sys
import venv
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent

SAMPLE = """\
# a Sparse Transformer "fixed" pattern: uses the prelude (fixed) and the grammar
param l = 128
param c = 8
fixed(l, c) & causal
"""


def _env():
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "PYTHONHOME", "VIRTUAL_ENV")}
    env["PIP_NO_INDEX"] = "1"  # offline
    env["PIP_DISABLE_PIP_VERSION_CHECK"] = "1"
    return env


def test_wheel_installs_and_parses_outside_the_checkout(tmp_path):
    dist = tmp_path / "dist"
    try:
        import hatchling  # noqa: F401  (the build backend: build offline, without isolation)

        cmd = ["--no-build-isolation", "--no-index"]
        env = _env()
    except ImportError:  # let pip fetch the backend into an isolated build environment
        cmd, env = [], {k: v for k, v in _env().items() if k != "PIP_NO_INDEX"}
    build = subprocess.run([sys.executable, "-m", "pip", "wheel", "--no-deps", *cmd, "-w", str(dist), str(ROOT)],
                           capture_output=True, text=True, env=env, cwd=tmp_path)
    if build.returncode != 0 and not cmd:
        pytest.skip("hatchling is not installed and cannot be fetched: " + build.stderr[-300:])
    assert build.returncode == 0, build.stdout + build.stderr
    [wheel] = list(dist.glob("patternc-*.whl"))

    env_dir = tmp_path / "venv"
    venv.EnvBuilder(system_site_packages=False, with_pip=False).create(env_dir)
    py = env_dir / ("Scripts" if os.name == "nt" else "bin") / "python"
    # The wheel's dependencies (lark, numpy, networkx) come from the environment running the
    # tests (CI's venv), never from the base interpreter, which may have nothing installed: a
    # .pth line adds that environment's site-packages after the new venv's own, so the
    # installed wheel still shadows the checkout.
    inner = subprocess.run([str(py), "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"],
                           capture_output=True, text=True, check=True).stdout.strip()
    Path(inner, "_outer_env.pth").write_text("\n".join(site.getsitepackages()) + "\n")
    install = subprocess.run(
        [sys.executable, "-m", "pip", "--python", str(py), "install", "--no-deps", "--no-index", str(wheel)],
        capture_output=True, text=True, env=_env(), cwd=tmp_path)
    if install.returncode != 0 and "no such option: --python" in install.stderr:  # pip < 22.3
        install = subprocess.run([str(py), "-m", "pip", "install", "--no-deps", "--no-index", str(wheel)],
                                 capture_output=True, text=True, env=_env(), cwd=tmp_path)
    assert install.returncode == 0, install.stdout + install.stderr

    work = tmp_path / "elsewhere"
    work.mkdir()
    example = next(iter(sorted((ROOT / "examples").rglob("*.pattern"))), None)
    sample = work / "sample.pattern"
    sample.write_text(SAMPLE)
    files = [sample]
    if example is not None:
        files.append(Path(shutil.copy(example, work / example.name)))
    code = (
        "import sys, patternc, patternc.lang.parser as P\n"
        "assert str(P.grammar_path()).startswith(sys.prefix), P.grammar_path()\n"
        "assert 'site-packages' in patternc.__file__, patternc.__file__\n"
        "for f in sys.argv[1:]:\n"
        "    print(patternc.load(f))\n"
    )
    run = subprocess.run([str(py), "-c", code, *map(str, files)], capture_output=True, text=True,
                         env=_env(), cwd=work)
    assert run.returncode == 0, run.stdout + run.stderr
    assert run.stdout.splitlines()[0] == "(chunk(l=128) | summary(l=128, c=8)) & causal"

    script = env_dir / ("Scripts" if os.name == "nt" else "bin") / "patternc"
    check = subprocess.run([str(script), "check", "sample.pattern", "--set", "c=16"], capture_output=True,
                           text=True, env=_env(), cwd=work)
    assert check.returncode == 0, check.stdout + check.stderr
    assert "canonical: (chunk(l=128) | summary(l=128, c=16)) & causal" in check.stdout
