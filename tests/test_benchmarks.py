"""The benchmark scripts stay runnable: each runs once at small sizes (their own --quick or
size flags). They print ratios; nothing here asserts a time."""

import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]

RUNS = {
    "bench_compile.py": ["--big", "8192", "--mid", "2048", "--repeat", "1"],
    "bench_analyze.py": ["--quick"],
    "bench_attention.py": ["--quick", "--cpu-only", "--rounds", "1"],
    "bench_distributed.py": ["--quick"],
    "bench_runtime.py": ["--quick", "--rounds", "1", "--device", "cpu"],
    "bench_transformers.py": ["--quick"],
}


@pytest.mark.slow
@pytest.mark.parametrize("script", sorted(RUNS))
def test_benchmark_script_runs(script):
    pytest.importorskip("torch")
    proc = subprocess.run([sys.executable, str(ROOT / "benchmarks" / script), *RUNS[script]],
                          capture_output=True, text=True, timeout=300, cwd=str(ROOT))
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-2000:]
    assert "Traceback" not in proc.stderr
