"""The cost of score terms in the block-sparse kernel: one pattern with and without
``with softcap(c=50), alibi()`` (SPEC §1.8), measured in one run (a ratio, not absolutes).

Per variant: blocksparse forward (no grad) and forward+backward, float32, B=1, H=4, D=64,
N=4096 (``--n``), 2 threads. The variants run in interleaved rounds so a ratio compares runs
taken in the same time window; the table shows the best of the rounds and the ratio of the
bests, of wall time and of the process's CPU time (the machine may be shared: CPU time
is the steadier measure of the work there). Target (issue 12): both terms <= 1.3x without.

    python benchmarks/bench_score_terms.py
    python benchmarks/bench_score_terms.py --quick      # N=1024, 2 rounds
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

BASE = "local(w=256) & causal"
VARIANTS = {
    "no terms": BASE,
    "softcap": f"{BASE} with softcap(c=50)",
    "alibi": f"{BASE} with alibi()",
    "softcap+alibi": f"{BASE} with softcap(c=50), alibi()",
}


def _time(fn) -> tuple[float, float]:
    """(wall seconds, CPU seconds of this process: all its threads)."""
    c0, t0 = time.process_time(), time.perf_counter()
    fn()
    return time.perf_counter() - t0, time.process_time() - c0


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--n", type=int, default=4096)
    ap.add_argument("--heads", type=int, default=4)
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--quick", action="store_true")
    a = ap.parse_args(argv)
    if a.quick:
        a.n, a.rounds = 1024, 2
    torch.set_num_threads(a.threads)
    g = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(1, a.heads, a.n, 64, generator=g) for _ in range(3))
    cps = {name: patternc.compile(src, q_len=a.n, num_heads=a.heads) for name, src in VARIANTS.items()}

    def fwd(cp):
        with torch.no_grad():
            cp.attention(q, k, v, backend="blocksparse")

    def fwd_bwd(cp):
        qq, kk, vv = (t.clone().requires_grad_() for t in (q, k, v))
        cp.attention(qq, kk, vv, backend="blocksparse").sum().backward()

    best = {(n, m): float("inf") for n in cps for m in ("fwd", "fwd+bwd")}
    cpu = dict(best)
    for cp in cps.values():  # warm-up (plans, mask caches)
        fwd(cp)
        fwd_bwd(cp)
    for _ in range(a.rounds):
        for name, cp in cps.items():
            for mode, fn in (("fwd", fwd), ("fwd+bwd", fwd_bwd)):
                wall, used = _time(lambda: fn(cp))
                best[name, mode] = min(best[name, mode], wall)
                cpu[name, mode] = min(cpu[name, mode], used)
    load = os.getloadavg()
    print(f"blocksparse, {BASE}, N={a.n}, H={a.heads}, D=64, float32, {a.threads} threads, "
          f"best of {a.rounds} interleaved rounds; load average {load[0]:.2f} {load[1]:.2f} {load[2]:.2f}")
    print("wall = best wall time; cpu = best CPU time of the process (all threads): the work, less "
          "disturbed by other processes on a shared machine")
    print(f"{'variant':<16}{'fwd ms':>9}{'wall':>7}{'cpu':>7}{'fwd+bwd ms':>12}{'wall':>7}{'cpu':>7}")
    for name in cps:
        f, fb = best[name, "fwd"], best[name, "fwd+bwd"]
        print(f"{name:<16}{1e3 * f:>9.1f}{f / best['no terms', 'fwd']:>7.2f}{cpu[name, 'fwd'] / cpu['no terms', 'fwd']:>7.2f}"
              f"{1e3 * fb:>12.1f}{fb / best['no terms', 'fwd+bwd']:>7.2f}"
              f"{cpu[name, 'fwd+bwd'] / cpu['no terms', 'fwd+bwd']:>7.2f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
