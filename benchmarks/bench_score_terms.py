"""The cost of score terms in the block-sparse kernel: each pattern with and without
``softcap(c=50)``, ``alibi()`` and both (SPEC §1.8), measured in one run (ratios, not absolutes).

Per variant: blocksparse forward (no grad) and forward+backward, float32, B=1, H=4, D=64, for
``local(w=256) & causal`` and ``causal`` at N=4096 and 8192 (``--n``), 2 threads (``--threads``).
All variants of one (pattern, N) run in interleaved rounds, so a ratio compares runs taken in
the same time window; the table shows the best of the rounds and the ratio of the bests, of
wall time and of the process's CPU time (the machine may be shared: CPU time is the steadier
measure of the work there), with the load average before and after. Target (issue 12): both
terms <= 1.3x without.

    python benchmarks/bench_score_terms.py
    python benchmarks/bench_score_terms.py --quick      # N=1024, 2 rounds
    python benchmarks/bench_score_terms.py --n 4096 --pattern "local(w=256) & causal"
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch  # noqa: E402

import patternc  # noqa: E402

PATTERNS = ("local(w=256) & causal", "causal")
TERMS = {
    "no terms": "",
    "alibi": " with alibi()",
    "softcap": " with softcap(c=50)",
    "softcap+alibi": " with softcap(c=50), alibi()",
}


def _time(fn) -> tuple[float, float]:
    """(wall seconds, CPU seconds of this process: all its threads)."""
    c0, t0 = time.process_time(), time.perf_counter()
    fn()
    return time.perf_counter() - t0, time.process_time() - c0


def _load() -> str:
    return " ".join(f"{x:.2f}" for x in os.getloadavg())


def run(base: str, n: int, heads: int, rounds: int) -> None:
    g = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(1, heads, n, 64, generator=g) for _ in range(3))
    # the pattern is wrapped so `with` applies to all of it; `causal` alone is not run by SDPA here
    cps = {name: patternc.compile(f"({base}){t}", q_len=n, num_heads=heads) for name, t in TERMS.items()}

    def fwd(cp):
        with torch.no_grad():
            cp.attention(q, k, v, backend="blocksparse")

    def fwd_bwd(cp):
        qq, kk, vv = (t.clone().requires_grad_() for t in (q, k, v))
        cp.attention(qq, kk, vv, backend="blocksparse").sum().backward()

    best = {(name, m): float("inf") for name in cps for m in ("fwd", "fwd+bwd")}
    cpu = dict(best)
    for cp in cps.values():  # warm-up (plans, mask caches)
        fwd(cp)
        fwd_bwd(cp)
    load0 = _load()
    for _ in range(rounds):
        for name, cp in cps.items():
            for mode, fn in (("fwd", fwd), ("fwd+bwd", fwd_bwd)):
                wall, used = _time(lambda: fn(cp))
                best[name, mode] = min(best[name, mode], wall)
                cpu[name, mode] = min(cpu[name, mode], used)
    print(f"\n{base}, N={n}: best of {rounds} interleaved rounds; load average {load0} before, {_load()} after")
    print(f"{'terms':<16}{'fwd ms':>9}{'wall':>7}{'cpu':>7}{'fwd+bwd ms':>12}{'wall':>7}{'cpu':>7}")
    for name in cps:
        f, fb = best[name, "fwd"], best[name, "fwd+bwd"]
        print(f"{name:<16}{1e3 * f:>9.1f}{f / best['no terms', 'fwd']:>7.2f}"
              f"{cpu[name, 'fwd'] / cpu['no terms', 'fwd']:>7.2f}"
              f"{1e3 * fb:>12.1f}{fb / best['no terms', 'fwd+bwd']:>7.2f}"
              f"{cpu[name, 'fwd+bwd'] / cpu['no terms', 'fwd+bwd']:>7.2f}", flush=True)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--n", type=int, nargs="+", default=[4096, 8192])
    ap.add_argument("--pattern", nargs="+", default=list(PATTERNS))
    ap.add_argument("--heads", type=int, default=4)
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--quick", action="store_true")
    a = ap.parse_args(argv)
    if a.quick:
        a.n, a.rounds = [1024], 2
    torch.set_num_threads(a.threads)
    print(f"blocksparse, H={a.heads}, D=64, float32, B=1, {a.threads} threads, torch {torch.__version__}; "
          "ratios to the same pattern without terms; wall = best wall time, cpu = best CPU time of the "
          "process (all threads): the work, less disturbed by other processes on a shared machine")
    for base in a.pattern:
        for n in a.n:
            run(base, n, a.heads, a.rounds)
    return 0


if __name__ == "__main__":
    sys.exit(main())
