"""The cost of score terms in the block-sparse kernel: one pattern with and without
``with softcap(c=50), alibi()`` (SPEC §1.8), measured in one run (a ratio, not absolutes).

Per variant: blocksparse forward (no grad) and forward+backward, float32, B=1, H=4, D=64,
N=4096 (``--n``), 2 threads. The variants run in interleaved rounds so a ratio compares runs
taken in the same time window; the table shows the best of the rounds and the ratio of the
bests (the machine may be shared). Target (issue 12): both terms <= 1.3x without.

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


def _time(fn) -> float:
    t0 = time.perf_counter()
    fn()
    return time.perf_counter() - t0


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
    for cp in cps.values():  # warm-up (plans, mask caches)
        fwd(cp)
        fwd_bwd(cp)
    for _ in range(a.rounds):
        for name, cp in cps.items():
            best[name, "fwd"] = min(best[name, "fwd"], _time(lambda: fwd(cp)))
            best[name, "fwd+bwd"] = min(best[name, "fwd+bwd"], _time(lambda: fwd_bwd(cp)))
    load = os.getloadavg()
    print(f"blocksparse, {BASE}, N={a.n}, H={a.heads}, D=64, float32, {a.threads} threads, "
          f"best of {a.rounds} interleaved rounds; load average {load[0]:.2f} {load[1]:.2f} {load[2]:.2f}")
    print(f"{'variant':<16}{'fwd ms':>10}{'ratio':>8}{'fwd+bwd ms':>13}{'ratio':>8}")
    for name in cps:
        f, fb = best[name, "fwd"], best[name, "fwd+bwd"]
        print(f"{name:<16}{1e3 * f:>10.1f}{f / best['no terms', 'fwd']:>8.2f}"
              f"{1e3 * fb:>13.1f}{fb / best['no terms', 'fwd+bwd']:>8.2f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
