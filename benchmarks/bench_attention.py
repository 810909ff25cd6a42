"""Attention under patterns vs dense baselines, measured in one run (ratios, not absolutes).

CPU section (issue 4): 2 threads, B=1, H=4, D=64, N=8192, float32. Baseline: SDPA with
``is_causal=True`` (forward, and forward+backward). Per pattern:

* ``auto``          -- what ``cp.attention`` runs (blocksparse on CPU, SDPA for pure causal)
* ``blocksparse``   -- patternc's tile kernel, forward and forward+backward
* ``flex(cp)``      -- compiled FlexAttention with ``cp.block_mask()`` (analytic BlockMask)
* ``flex(cbm)``     -- compiled FlexAttention with ``create_block_mask(cp.mask_mod, ...)``
* mask build times  -- ``cp.block_mask()`` vs ``create_block_mask`` (seconds)

Targets for ``local(w=256) & causal``: auto fwd <= 0.3x, blocksparse fwd <= 0.6x,
blocksparse fwd+bwd <= 0.5x of SDPA is_causal.

GPU section (runs only with CUDA): B=1, H=16, D=64, bfloat16, N = 16k and 64k, forward and
forward+backward of auto (flex with the analytic BlockMask) and ``create_block_mask`` + flex,
against SDPA ``is_causal`` (blocksparse is the CPU path and is left out there).

Timing: every variant is warmed up (compiles included there), then each pattern's variants
and the SDPA is_causal baseline are run in interleaved rounds, so a ratio compares runs taken
in the same time window; the table shows the best and the median of the rounds, and the
ratios use the best (the machine may be shared; the best is the least disturbed run).

    python benchmarks/bench_attention.py                 # CPU section (+ GPU when present)
    python benchmarks/bench_attention.py --quick         # N=2048, fewer rounds, no flex
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
    "local(w=256) & causal",
    "(local(w=128) | strided(s=128)) & causal",
    "fixed(256, 32) & causal",
    "causal",
]
TARGETS = {  # (pattern, row) -> max ratio vs the matching SDPA is_causal baseline
    ("local(w=256) & causal", "auto fwd"): 0.3,
    ("local(w=256) & causal", "blocksparse fwd"): 0.6,
    ("local(w=256) & causal", "blocksparse fwd+bwd"): 0.5,
}


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


def bench_pattern(src, *, B, H, N, D, dtype, dev, rounds, with_flex, with_bwd, with_blocksparse=True):
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
    with torch.no_grad():
        fns["auto fwd"] = lambda: attention(cp, q, k, v)
        if with_blocksparse and not cp.is_causal_only:
            fns["blocksparse fwd"] = lambda: attention(cp, q, k, v, backend="blocksparse")
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
            bwd["blocksparse fwd+bwd"] = fwd_bwd(lambda a, b, c: attention(cp, a, b, c, backend="blocksparse"),
                                                 qg, kg, vg)
        if dev.type == "cuda" and with_flex:
            flex = compiled_flex_attention(dev)
            bwd["auto fwd+bwd"] = fwd_bwd(lambda a, b, c: attention(cp, a, b, c), qg, kg, vg)
            bwd["flex(cbm) fwd+bwd"] = fwd_bwd(lambda a, b, c: flex(a, b, c, block_mask=cbm), qg, kg, vg)
        res = measure(bwd, max(3, rounds // 2), dev)
        for n, (best, med) in res.items():
            rows.append((src, n, best, med, best / res[BASE_BWD][0]))
    return rows, {"compile_s": compile_s, "density": cp.density, "block_density": cp.block_density, **build}


def section(title, *, B, H, N, D, dtype, dev, rounds, patterns, with_flex, with_bwd, with_blocksparse=True):
    where = f"{dev} ({torch.get_num_threads()} threads)" if dev.type == "cpu" else torch.cuda.get_device_name(dev)
    print(f"\n== {title}: B={B} H={H} N={N} D={D} {str(dtype).replace('torch.', '')} on {where}")
    all_rows, infos = [], {}
    for src in patterns:
        rows, info = bench_pattern(src, B=B, H=H, N=N, D=D, dtype=dtype, dev=dev, rounds=rounds,
                                   with_flex=with_flex, with_bwd=with_bwd, with_blocksparse=with_blocksparse)
        all_rows += rows
        infos[src] = info
    w = max(len(r[0]) for r in all_rows)
    print(f"{'pattern':<{w}}  {'variant':<22} {'best ms':>9} {'median ms':>10} {'x sdpa causal':>14}  target")
    for src, n, best, med, ratio in all_rows:
        tgt = TARGETS.get((src, n)) if dev.type == "cpu" and N == 8192 else None
        mark = "" if tgt is None else (f"<= {tgt}  {'ok' if ratio <= tgt else 'MISSED'}")
        print(f"{src:<{w}}  {n:<22} {best * 1e3:9.1f} {med * 1e3:10.1f} {ratio:14.3f}  {mark}")
    for src, info in infos.items():
        extra = ", ".join(f"{k} {v:.2f} s" for k, v in info.items() if k.endswith("mask"))
        print(f"{src}: token density {info['density']:.4f}, block density {info['block_density']:.4f}, "
              f"patternc.compile {info['compile_s']:.3f} s" + (f"; mask build: {extra}" if extra else ""))
    return {"rows": [dict(pattern=r[0], variant=r[1], best_s=r[2], median_s=r[3], ratio=r[4]) for r in all_rows],
            "patterns": infos}


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--quick", action="store_true", help="N=2048, 3 rounds, no flex (a smoke run)")
    ap.add_argument("--rounds", type=int, default=7)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--no-flex", action="store_true", help="skip FlexAttention rows (torch.compile on CPU is slow)")
    ap.add_argument("--cpu-only", action="store_true")
    ap.add_argument("--gpu-only", action="store_true")
    ap.add_argument("--json", metavar="PATH", help="also write the results as JSON")
    args = ap.parse_args(argv)
    warnings.filterwarnings("ignore", category=patternc.PatternWarning)
    torch.set_num_threads(args.threads)
    results = {"torch": torch.__version__}
    rounds = 3 if args.quick else args.rounds
    if not args.gpu_only:
        n = 2048 if args.quick else 8192
        results["cpu"] = section("CPU", B=1, H=4, N=n, D=64, dtype=torch.float32, dev=torch.device("cpu"),
                                 rounds=rounds, patterns=CPU_PATTERNS, with_flex=not (args.no_flex or args.quick),
                                 with_bwd=True)
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
