"""Benchmark of ``patternc.analyze`` (issue 5). Prints times and ratios measured in this run.

1. n = 16,384, ``(local(w=128) | strided(s=128)) & causal``, ``--layers 2``, exact: with every
   engine that gives an exact answer (auto picks exact-shift; exact-token is the generic
   engine; target < 30 s on 2 cores).
2. Shift-invariant patterns at n = 1,048,576 (target < 10 s).
3. Speed-ups against the networkx layered graph where networkx alone finishes, with the
   answers checked equal.

Usage: python benchmarks/bench_analyze.py [--quick]
"""

from __future__ import annotations

import argparse
import os
import sys
import time
import warnings

sys.path.insert(0, os.path.join(os.path.dirname(__file__), ".."))

from patternc.analysis import analyze  # noqa: E402


def timed(fn, *a, **k):
    t = time.perf_counter()
    out = fn(*a, **k)
    return out, time.perf_counter() - t


def run(src, n, **kw):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return timed(analyze, src, seq_len=n, **kw)


def show(label, r, sec):
    verdict = "never" if r.never else f"min_layers={r.min_layers}"
    if r.layers is not None:
        verdict += f", reachable within {r.layers}: {r.reachable}"
    exact = "exact" if r.exact else f"bound [{r.lower_bound}, {r.upper_bound}]"
    print(f"  {label:<44} {sec:9.3f} s   {r.engine:<12} {exact:<18} {verdict}")


def main(argv=None):
    ap = argparse.ArgumentParser()
    ap.add_argument("--quick", action="store_true", help="smaller networkx comparison")
    args = ap.parse_args(argv)
    print(f"cpus: {os.cpu_count()}")

    print("\n1. n = 16384, (local(w=128) | strided(s=128)) & causal, --layers 2 (target < 30 s)")
    src = "(local(w=128) | strided(s=128)) & causal"
    results = {}
    for engine in ("auto", "exact-token", "block-bound"):
        r, sec = run(src, 16384, layers=2, engine=engine)
        results[engine] = (r, sec)
        show(engine, r, sec)
    assert results["auto"][0].min_layers == results["exact-token"][0].min_layers == 2
    print(f"  exact-token / auto time ratio: {results['exact-token'][1] / results['auto'][1]:.0f}x")

    print("\n2. shift-invariant patterns, n = 1048576 (target < 10 s)")
    n = 1 << 20
    for src, layers in [
        ("(local(w=1024) | strided(s=1024)) & causal", 2),
        ("(local(w=128) | strided(s=128)) & causal", 2),
        ("local(w=4096) & causal", None),
        ("(local(w=2) | dilated(w=64, d=64)) & causal", None),
        ("band(left=3000, right=1000)", None),
    ]:
        for pairs in ("earlier",) if "band" not in src else ("all",):
            r, sec = run(src, n, layers=layers, pairs=pairs)
            show(f"{src} [{pairs}]", r, sec)

    print("\n3. against networkx (same answers; ratio = networkx time / engine time)")
    sizes = (64, 128) if args.quick else (64, 128, 256)
    cases = [
        "(local(w=9) | strided(s=8)) & causal",
        "fixed(8, 1) & causal",
        "layers(summary(8, 1) & causal, chunk(8) & causal)",
        "(local(w=8) | sink(n=4)) & causal",
        "(chunk(8) | (chunk(16) & strided(2)) | (chunk(32) & strided(4))) & causal",
    ]
    print(f"  {'pattern':<58} {'n':>5} {'networkx':>10} {'token':>9} {'auto':>9} {'nx/token':>9} {'nx/auto':>9}")
    for src in cases:
        for n in sizes:
            g, tg = run(src, n, engine="networkx")
            t, tt = run(src, n, engine="exact-token")
            a, ta = run(src, n)
            assert g.min_layers == t.min_layers == a.min_layers, (src, n, g.min_layers, t.min_layers, a.min_layers)
            assert g.never == t.never == a.never
            print(f"  {src[:58]:<58} {n:>5} {tg:>9.3f}s {tt:>8.4f}s {ta:>8.4f}s {tg / tt:>8.0f}x {tg / ta:>8.0f}x"
                  f"   ({'never' if g.never else g.min_layers})")


if __name__ == "__main__":
    main()
