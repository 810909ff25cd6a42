"""Attention under patterns vs dense baselines, measured in one run (ratios, not absolutes).

CPU section (issues 4 and 10): 2 threads, B=1, H=4, D=64, float32, N = 8192 and 16384.
Baseline: SDPA with ``is_causal=True`` (forward, and forward+backward). Per pattern:

* ``auto``          -- what ``cp.attention`` runs: on CPU the blocksparse kernel over the
                       execution plan (``plan="auto"``: disjoint terms, each in its cheapest
                       token order, merged through the log-sum-exp; SPEC §6)
* ``natural``       -- the blocksparse kernel over the natural-order layout (``plan="natural"``)
* ``flex(cp)``      -- compiled FlexAttention with ``cp.block_mask()`` (analytic BlockMask)
* ``flex(cbm)``     -- compiled FlexAttention with ``create_block_mask(cp.mask_mod, ...)``
* mask build times  -- ``cp.block_mask()`` vs ``create_block_mask`` (seconds)

Targets (issue 10, quiet machine, ratio to SDPA is_causal): N=8192 ``(local(w=128) |
strided(s=128)) & causal`` fwd <= 0.25, fwd+bwd <= 0.30; ``fixed(256, 32) & causal`` (128-token
blocks) fwd <= 0.30, fwd+bwd <= 0.35; ``local(w=256) & causal`` <= 0.15 both; at N=16384 each
forward ratio <= half its 8192 ratio. ``--contended`` runs a competing 2-thread process (a
matmul loop) during all timing, both sides timed under it: ``local(w=256) & causal`` forward
<= 0.4 there.

GPU section (runs only with CUDA): B=1, H=16, D=64, bfloat16, N = 16k and 64k, forward and
forward+backward of auto (flex with the analytic BlockMask) and ``create_block_mask`` + flex,
against SDPA ``is_causal`` (blocksparse is the CPU path and is left out there).

Timing: every variant is warmed up (compiles and plans included there), then each pattern's
variants and the SDPA is_causal baseline are run in interleaved rounds, so a ratio compares
runs taken in the same time window; the table shows the best and the median of the rounds,
and the ratios use the best (the machine may be shared; the best is the least disturbed run).
The machine's load average is printed with every table.

    python benchmarks/bench_attention.py                 # CPU section (+ GPU when present)
    python benchmarks/bench_attention.py --quick         # N=2048, fewer rounds, no flex
    python benchmarks/bench_attention.py --no-flex --sizes 8192,16384 --contended
    python benchmarks/bench_attention.py --json out.json
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
import warnings
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch  # noqa: E402

import patternc  # noqa: E402
from patternc.execute import attention  # noqa: E402

F = torch.nn.functional

CPU_PATTERNS = [
    "(local(w=128) | strided(s=128)) & causal",
    "fixed(256, 32) & causal",
    "local(w=256) & causal",
    "causal",
]
TARGETS = {  # (pattern, row) -> max ratio vs the matching SDPA is_causal baseline at N=8192 (issue 10)
    ("(local(w=128) | strided(s=128)) & causal", "auto fwd"): 0.25,
    ("(local(w=128) | strided(s=128)) & causal", "auto fwd+bwd"): 0.30,
    ("fixed(256, 32) & causal", "auto fwd"): 0.30,
    ("fixed(256, 32) & causal", "auto fwd+bwd"): 0.35,
    ("local(w=256) & causal", "auto fwd"): 0.15,
    ("local(w=256) & causal", "auto fwd+bwd"): 0.15,
}
CONTENDED_TARGETS = {("local(w=256) & causal", "auto fwd"): 0.4}


def _load() -> str:
    import os

    try:
        a, b, c = os.getloadavg()
        return f"load average {a:.2f}, {b:.2f}, {c:.2f} on {os.cpu_count()} CPUs"
    except OSError:
        return "load average unknown"


class Competitor:
    """A competing process: a 2-thread float32 matmul loop, for ``--contended``."""

    CODE = ("import torch, time\ntorch.set_num_threads(2)\na = torch.randn(512, 512)\n"
            "while True:\n    a = torch.tanh(a @ a * 1e-3)\n")

    def __enter__(self):
        import subprocess

        self.proc = subprocess.Popen([sys.executable, "-c", self.CODE])
        time.sleep(1.0)
        return self

    def __exit__(self, *exc):
        self.proc.kill()
        self.proc.wait()


def _sync(dev):
    if dev.type == "cuda":
        torch.cuda.synchronize(dev)


def measure(fns: dict, rounds: int, dev) -> dict:
    """{name: (best_s, median_s)}; one warm-up call each, then interleaved rounds."""
    for f in fns.values():
        f()
        _sync(dev)
    times = {n: [] for n in fns}
    for _ in range(rounds):
        for n, f in fns.items():
            _sync(dev)
            t0 = time.perf_counter()
            f()
            _sync(dev)
            times[n].append(time.perf_counter() - t0)
    return {n: (min(t), statistics.median(t)) for n, t in times.items()}


def qkv(B, H, N, D, dtype, dev, grad=False, seed=0):
    g = torch.Generator(device="cpu").manual_seed(seed)
    ts = [torch.randn(B, H, N, D, generator=g).to(dev, dtype) for _ in range(3)]
    return [t.requires_grad_(grad) for t in ts]


def fwd_bwd(fn, q, k, v):
    def run():
        for t in (q, k, v):
            t.grad = None
        fn(q, k, v).sum().backward()

    return run


BASE_FWD, BASE_BWD = "sdpa is_causal fwd", "sdpa is_causal fwd+bwd"


def bench_pattern(src, *, B, H, N, D, dtype, dev, rounds, with_flex, with_bwd, with_blocksparse=True,
                  with_natural_bwd=True):
    """Rows ``(pattern, variant, best_s, median_s, ratio)``; every variant is timed in the same
    interleaved rounds as the SDPA is_causal baseline it is divided by."""
    from torch.nn.attention.flex_attention import create_block_mask

    from patternc.execute.flex import compiled_flex_attention

    rows = []
    t0 = time.perf_counter()
    cp = patternc.compile(src, q_len=N, num_heads=H, block_size=128)
    compile_s = time.perf_counter() - t0
    q, k, v = qkv(B, H, N, D, dtype, dev)
    fns = {BASE_FWD: lambda: F.scaled_dot_product_attention(q, k, v, is_causal=True)}
    t0 = time.perf_counter()
    plan = cp.plan
    plan_s = time.perf_counter() - t0
    with torch.no_grad():
        fns["auto fwd"] = lambda: attention(cp, q, k, v)
        if with_blocksparse and not cp.is_causal_only:
            fns["natural fwd"] = lambda: attention(cp, q, k, v, backend="blocksparse", plan="natural")
        build = {}
        if with_flex:
            flex = compiled_flex_attention(dev)
            t0 = time.perf_counter()
            bm = cp.block_mask(dev)
            build["cp.block_mask"] = time.perf_counter() - t0
            t0 = time.perf_counter()
            mm = cp.mask_mod_on(dev) if hasattr(cp, "mask_mod_on") else cp.mask_mod
            cbm = create_block_mask(mm, None, H, N, N, device=dev, BLOCK_SIZE=128)
            build["create_block_mask"] = time.perf_counter() - t0
            fns["flex(cp) fwd"] = lambda: flex(q, k, v, block_mask=bm)
            fns["flex(cbm) fwd"] = lambda: flex(q, k, v, block_mask=cbm)
        res = measure(fns, rounds, dev)
    for n, (best, med) in res.items():
        rows.append((src, n, best, med, best / res[BASE_FWD][0]))
    if with_bwd and not cp.is_causal_only:
        qg, kg, vg = qkv(B, H, N, D, dtype, dev, grad=True)
        bwd = {BASE_BWD: fwd_bwd(lambda a, b, c: F.scaled_dot_product_attention(a, b, c, is_causal=True), qg, kg, vg)}
        if with_blocksparse:
            bwd["auto fwd+bwd"] = fwd_bwd(lambda a, b, c: attention(cp, a, b, c), qg, kg, vg)
            if with_natural_bwd:
                bwd["natural fwd+bwd"] = fwd_bwd(
                    lambda a, b, c: attention(cp, a, b, c, backend="blocksparse", plan="natural"), qg, kg, vg)
        if dev.type == "cuda" and with_flex:
            flex = compiled_flex_attention(dev)
            bwd["auto fwd+bwd"] = fwd_bwd(lambda a, b, c: attention(cp, a, b, c), qg, kg, vg)
            bwd["flex(cbm) fwd+bwd"] = fwd_bwd(lambda a, b, c: flex(a, b, c, block_mask=cbm), qg, kg, vg)
        res = measure(bwd, max(3, rounds // 2), dev)
        for n, (best, med) in res.items():
            rows.append((src, n, best, med, best / res[BASE_BWD][0]))
    return rows, {"compile_s": compile_s, "plan_s": plan_s, "density": cp.density, "block_density": cp.block_density,
                  "plan_tiles": plan.computed_tiles, "natural_tiles": plan.natural_tiles, **build}


def section(title, *, B, H, N, D, dtype, dev, rounds, patterns, with_flex, with_bwd, with_blocksparse=True,
            targets=None, with_natural_bwd=True):
    where = f"{dev} ({torch.get_num_threads()} threads)" if dev.type == "cpu" else torch.cuda.get_device_name(dev)
    print(f"\n== {title}: B={B} H={H} N={N} D={D} {str(dtype).replace('torch.', '')} on {where}; {_load()}",
          flush=True)
    targets = TARGETS if targets is None else targets
    all_rows, infos = [], {}
    w = max(len(p) for p in patterns)
    print(f"{'pattern':<{w}}  {'variant':<22} {'best ms':>9} {'median ms':>10} {'x sdpa causal':>14}  target",
          flush=True)
    for src in patterns:
        rows, info = bench_pattern(src, B=B, H=H, N=N, D=D, dtype=dtype, dev=dev, rounds=rounds,
                                   with_flex=with_flex, with_bwd=with_bwd, with_blocksparse=with_blocksparse,
                                   with_natural_bwd=with_natural_bwd)
        all_rows += rows
        infos[src] = info
        for src_, n, best, med, ratio in rows:  # printed as soon as measured
            tgt = targets.get((src_, n)) if dev.type == "cpu" and N == 8192 else None
            mark = "" if tgt is None else (f"<= {tgt}  {'ok' if ratio <= tgt else 'MISSED'}")
            print(f"{src_:<{w}}  {n:<22} {best * 1e3:9.1f} {med * 1e3:10.1f} {ratio:14.3f}  {mark}", flush=True)
    for src, info in infos.items():
        extra = ", ".join(f"{k} {v:.2f} s" for k, v in info.items() if k.endswith("mask"))
        print(f"{src}: token density {info['density']:.4f}, block density {info['block_density']:.4f}, "
              f"plan {info['plan_tiles']} / natural {info['natural_tiles']} tiles, "
              f"patternc.compile {info['compile_s']:.3f} s, plan {info['plan_s']:.2f} s"
              + (f"; mask build: {extra}" if extra else ""))
    print(f"({_load()} at the end)")
    return {"rows": [dict(pattern=r[0], variant=r[1], best_s=r[2], median_s=r[3], ratio=r[4]) for r in all_rows],
            "patterns": infos}


def _print_scaling(r8: dict, r16: dict) -> None:
    """Issue 10's N=16384 target: each forward ratio at 16384 <= half its 8192 ratio. Printed
    beside the bound the pattern itself sets: the ratio of token densities (pairs / N^2, as
    SDPA causal's pairs are N^2 / 2 at both lengths), which an ideal kernel would follow."""
    print("\n== scaling N=8192 -> 16384 (auto fwd): ratio(16384) / ratio(8192); target <= 0.5; "
          "an exact-pairs kernel would give density(16384) / density(8192)")
    f8 = {r["pattern"]: r["ratio"] for r in r8["rows"] if r["variant"] == "auto fwd"}
    f16 = {r["pattern"]: r["ratio"] for r in r16["rows"] if r["variant"] == "auto fwd"}
    for src in f8:
        if src not in f16 or src == "causal":
            continue
        got = f16[src] / f8[src]
        bound = r16["patterns"][src]["density"] / r8["patterns"][src]["density"]
        print(f"{src:<42} {f8[src]:.3f} -> {f16[src]:.3f}: {got:.2f}  (<= 0.5 {'ok' if got <= 0.5 else 'MISSED'}; "
              f"token density ratio {bound:.2f})")


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--quick", action="store_true", help="N=2048, 3 rounds, no flex (a smoke run)")
    ap.add_argument("--rounds", type=int, default=7)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--no-flex", action="store_true", help="skip FlexAttention rows (torch.compile on CPU is slow)")
    ap.add_argument("--cpu-only", action="store_true")
    ap.add_argument("--gpu-only", action="store_true")
    ap.add_argument("--json", metavar="PATH", help="also write the results as JSON")
    ap.add_argument("--sizes", default="8192,16384", help="CPU sequence lengths, comma-separated (default 8192,16384)")
    ap.add_argument("--contended", action="store_true",
                    help="also time the CPU section with a competing 2-thread process running (both sides under it)")
    ap.add_argument("--patterns", help="only these CPU patterns (';'-separated)")
    ap.add_argument("--no-natural-bwd", action="store_true",
                    help="skip the natural-order fwd+bwd rows (the slowest ones on a busy machine)")
    args = ap.parse_args(argv)
    warnings.filterwarnings("ignore", category=patternc.PatternWarning)
    torch.set_num_threads(args.threads)
    results = {"torch": torch.__version__}
    rounds = 3 if args.quick else args.rounds
    if not args.gpu_only:
        sizes = [2048] if args.quick else [int(x) for x in args.sizes.split(",")]
        pats = args.patterns.split(";") if args.patterns else CPU_PATTERNS
        results["cpu"] = {}
        for n in sizes:
            results["cpu"][str(n)] = section("CPU", B=1, H=4, N=n, D=64, dtype=torch.float32,
                                             dev=torch.device("cpu"), rounds=rounds, patterns=pats,
                                             with_flex=not (args.no_flex or args.quick), with_bwd=True,
                                             with_natural_bwd=not args.no_natural_bwd)
        if "8192" in results["cpu"] and "16384" in results["cpu"]:
            _print_scaling(results["cpu"]["8192"], results["cpu"]["16384"])
        if args.contended:
            with Competitor():
                for n in sizes:
                    results["cpu"][f"{n} contended"] = section(
                        "CPU, contended (a competing 2-thread process)", B=1, H=4, N=n, D=64, dtype=torch.float32,
                        dev=torch.device("cpu"), rounds=rounds, patterns=[p for p in pats if p != "causal"],
                        with_flex=False, with_bwd=False, targets=CONTENDED_TARGETS)
    if torch.cuda.is_available() and not args.cpu_only:
        dev = torch.device("cuda")
        torch.backends.cuda.matmul.allow_tf32 = True
        results["gpu"] = {}
        for n in ((4096,) if args.quick else (16384, 65536)):
            results["gpu"][str(n)] = section("GPU", B=1, H=16, N=n, D=64, dtype=torch.bfloat16, dev=dev,
                                             rounds=rounds, patterns=CPU_PATTERNS[:3], with_flex=True, with_bwd=True,
                                             with_blocksparse=False)
    elif not args.cpu_only:
        print("\n== GPU: skipped (no CUDA device)")
    if args.json:
        Path(args.json).write_text(json.dumps(results, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
