"""Context parallel (issue 14 targets): bytes moved and balance over 4 gloo ranks, against an
all-gather baseline with patternc's own kernel and PyTorch's ``_ContextParallel`` FLEX path.

Default sizes: 4 ranks, N = 16,384 tokens, H = 4, D = 64, BLOCK_SIZE 128, float32. For each
pattern, every rank (one spawn of N local gloo processes, 1 torch thread each):

* ``ContextParallel(cp, balance="tiles")``: the forward bytes it receives against what an
  all-gather of K and V would receive (the other ranks' positions), the max / mean computed
  tiles (and of ``balance="contiguous"``), the forward time (median, a barrier before each
  call; the slowest rank counts);
* an **all-gather baseline** on the same positions: ``all_gather`` K and V, then the same
  block-sparse kernel on the rank's rows against the whole sequence;
* PyTorch's ``_ContextParallel`` FLEX path (``_context_parallel_shard`` + compiled
  ``flex_attention`` with ``_HeadTailLoadBalancer``) where it runs (``--torch-cp``); where it
  does not, the reason is printed.

Targets: ``local(w=512) & causal`` receives <= 1/8 of the all-gather; ``(local(w=128) |
strided(s=128)) & causal`` <= 1/4 (with its execution plan); ``causal`` <= the all-gather;
max/mean computed tiles <= 1.05 for all three.

Run: ``python benchmarks/bench_distributed.py [--quick] [--nproc 4] [--seq-len N] [--heads H]
[--head-dim D] [--repeats R] [--torch-cp]``. Times on a shared machine vary; compare the ratios
of one run, and read ``uptime``'s load printed with them.
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import time

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))

PATTERNS = ["local(w=512) & causal", "(local(w=128) | strided(s=128)) & causal", "causal"]
TARGET_BYTES = {PATTERNS[0]: 1 / 8, PATTERNS[1]: 1 / 4, PATTERNS[2]: 1.0}


def _timed(fn, repeats, dist):
    times, out = [], None
    for i in range(repeats + 1):
        dist.barrier()
        t0 = time.perf_counter()
        out = fn()
        if i:
            times.append(time.perf_counter() - t0)
    return statistics.median(times), out


def _allgather_baseline(ctx, q_l, k_l, v_l, scale):
    """all_gather K and V (padded to the largest shard), then the block-sparse kernel on this
    rank's rows against the whole sequence."""
    import numpy as np
    import torch
    import torch.distributed as dist

    from patternc.distributed.context import _LocalLayout
    from patternc.execute.blocksparse import Plan, blocksparse_forward
    from patternc.execute.common import mask_mod_for

    cp, s, r = ctx.cp, ctx.schedule, ctx.rank
    N, H = cp.q_len, q_l.shape[1]
    if not hasattr(ctx, "_ag_plan"):
        kinds = np.asarray(cp.layout.kinds)
        lay = _LocalLayout(kinds=np.ascontiguousarray(kinds[:, s.q_blocks[r]]), q_len=int(ctx.positions.size),
                           kv_len=N, q_block_size=ctx.q_block_size, kv_block_size=ctx.kv_block_size)
        base = mask_mod_for(cp, "cpu")
        qpos = torch.as_tensor(ctx.positions)

        def mask_mod(b, h, q_idx, kv_idx):
            return base(b, h, qpos[q_idx], kv_idx)

        ctx._ag_plan = (Plan(lay, H, "cpu", mask_mod), mask_mod)
        ctx._ag_index = [torch.as_tensor(p) for p in s.positions]
    plan, mask_mod = ctx._ag_plan
    m = max(p.size for p in s.positions)
    own = torch.cat([k_l, v_l], -1).permute(2, 0, 1, 3)
    pad = own.new_zeros((m,) + tuple(own.shape[1:]))
    pad[:own.shape[0]] = own
    parts = [torch.empty_like(pad) for _ in range(ctx.world_size)]
    dist.all_gather(parts, pad)
    full = own.new_empty((N,) + tuple(own.shape[1:]))
    for p, idx in enumerate(ctx._ag_index):
        full.index_copy_(0, idx, parts[p][:idx.numel()])
    full = full.permute(1, 2, 0, 3)
    D = k_l.shape[-1]
    if not ctx.positions.size:
        return q_l.new_zeros(q_l.shape[:-1] + (v_l.shape[-1],)), (ctx.world_size - 1) * pad.numel() * pad.element_size()
    o, _ = blocksparse_forward(plan, mask_mod, q_l, full[..., :D], full[..., D:], scale, need_lse=False)
    o = o.view(q_l.shape[0], H, -1, v_l.shape[-1])[:, :, :q_l.shape[2]]
    return o, (ctx.world_size - 1) * pad.numel() * pad.element_size()


def _torch_cp(src, cp, q, k, v, repeats, dist):
    """PyTorch's private _ContextParallel FLEX path on this CPU process group; returns
    (median seconds, bytes received per rank) or raises with the reason."""
    import torch
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.tensor.experimental._attention import (
        _context_parallel_shard,
        _ContextParallel,
        _HeadTailLoadBalancer,
    )
    from torch.distributed.tensor.parallel import parallelize_module
    from torch.nn.attention.flex_attention import flex_attention

    world = dist.get_world_size()
    mesh = init_device_mesh("cpu", (world,))
    N = q.shape[2]
    # the global BlockMask only carries mask_mod and the shape here (each rank builds its own
    # with torch's compiled create_block_mask); patternc's is built without evaluating the mask
    # (eager create_block_mask would materialise [H, N, N] booleans: 1 GiB at N = 16384, H = 4)
    block_mask = cp.block_mask("cpu")
    lb = _HeadTailLoadBalancer(N, world, torch.device("cpu"))
    cq, ck, cv, cbm = _context_parallel_shard(mesh, [q, k, v, block_mask], [2, 2, 2, 2], load_balancer=lb)
    compiled = torch.compile(flex_attention, dynamic=False, fullgraph=True)

    class Flex(torch.nn.Module):
        def forward(self, q, k, v, block_mask):
            return compiled(q, k, v, block_mask=block_mask)

    mod = parallelize_module(Flex(), mesh, _ContextParallel(seq_dim=2,
                                                           attention_type=_ContextParallel.AttentionType.FLEX))
    with torch.no_grad():
        seconds, _ = _timed(lambda: mod(cq, ck, cv, block_mask=cbm), repeats, dist)
    received = (world - 1) * (ck.numel() + cv.numel()) * ck.element_size()
    return seconds, received


def _torch_worker(rank, world, patterns, N, H, D, repeats, mem_limit):
    """PyTorch's FLEX path per pattern, each rank's data segment capped at ``mem_limit`` bytes
    (a MemoryError here instead of the machine's OOM killer)."""
    import resource

    import torch
    import torch.distributed as dist

    import patternc

    if mem_limit:
        resource.setrlimit(resource.RLIMIT_DATA, (mem_limit, mem_limit))
    out = {}
    for n, src in enumerate(patterns):
        cp = patternc.compile(src, q_len=N, num_heads=H)
        g = torch.Generator().manual_seed(n)
        q, k, v = (torch.randn(1, H, N, D, generator=g) for _ in range(3))
        try:
            out[src] = _torch_cp(src, cp, q, k, v, repeats, dist)
        except Exception as e:  # record why it does not run here
            out[src] = f"{type(e).__name__}: {str(e).splitlines()[0][:160] if str(e) else ''}"
        ok = torch.tensor([0 if isinstance(out[src], str) else 1])
        dist.all_reduce(ok, op=dist.ReduceOp.MIN)  # a rank that failed leaves the others' collectives
        if not int(ok):
            break
    return out


def _worker(rank, world, patterns, N, H, D, repeats):
    import torch
    import torch.distributed as dist

    import patternc
    from patternc.distributed import ContextParallel

    out = {}
    for n, src in enumerate(patterns):
        cp = patternc.compile(src, q_len=N, num_heads=H)
        g = torch.Generator().manual_seed(n)
        q, k, v = (torch.randn(1, H, N, D, generator=g) for _ in range(3))
        ctx = ContextParallel(cp, balance="tiles")
        contiguous = ContextParallel(cp, balance="contiguous")
        q_l, k_l, v_l = ctx.shard(q), ctx.shard(k), ctx.shard(v)
        scale = D ** -0.5
        with torch.no_grad():
            t_ours, o_ours = _timed(lambda: ctx.attention(q_l, k_l, v_l), repeats, dist)
            t_ag, (o_ag, ag_bytes) = _timed(lambda: _allgather_baseline(ctx, q_l, k_l, v_l, scale), repeats, dist)
        agree = float((o_ours - o_ag).abs().max()) if ctx.positions.size else 0.0
        row = dict(stats=ctx.stats, contiguous_imbalance=contiguous.schedule.imbalance, seconds=t_ours,
                   allgather_seconds=t_ag, allgather_received=ag_bytes, agree=agree)
        out[src] = row
    return out


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--nproc", type=int, default=4)
    ap.add_argument("--seq-len", type=int, default=16384)
    ap.add_argument("--heads", type=int, default=4)
    ap.add_argument("--head-dim", type=int, default=64)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--quick", action="store_true", help="N = 2048, H = 2, D = 16, 1 repeat (a smoke run)")
    ap.add_argument("--torch-cp", action="store_true",
                    help="also run PyTorch's _ContextParallel FLEX path (compiles flex_attention on every rank)")
    ap.add_argument("--torch-cp-mem", type=float, default=4.0, metavar="GiB",
                    help="cap on each torch-CP rank's data segment (default 4 GiB; 0: none)")
    a = ap.parse_args(argv)
    if a.quick:
        a.seq_len, a.heads, a.head_dim, a.repeats = 2048, 2, 16, 1

    from patternc.distributed.launch import spawn

    load = os.getloadavg()[0] if hasattr(os, "getloadavg") else float("nan")
    t0 = time.perf_counter()
    res = spawn(_worker, a.nproc, PATTERNS, a.seq_len, a.heads, a.head_dim, a.repeats, timeout=3000)
    if a.torch_cp:
        try:
            tres = spawn(_torch_worker, a.nproc, PATTERNS, a.seq_len, a.heads, a.head_dim, a.repeats,
                         int(a.torch_cp_mem * 2**30), timeout=3000)
        except (RuntimeError, TimeoutError) as e:
            tres = [{src: f"{type(e).__name__}: {str(e).splitlines()[-1][:160]}" for src in PATTERNS}] * a.nproc
        for r, t in zip(res, tres):
            for src in PATTERNS:
                got = t.get(src, "not run (an earlier pattern failed)")
                if isinstance(got, str):
                    r[src]["torch_error"] = got
                else:
                    r[src]["torch_seconds"], r[src]["torch_received"] = got
    print(f"context parallel, {a.nproc} gloo ranks (1 thread each), N={a.seq_len}, H={a.heads}, D={a.head_dim}, "
          f"float32, BLOCK_SIZE 128; load average {load:.1f} at start, "
          f"{os.getloadavg()[0] if hasattr(os, 'getloadavg') else float('nan'):.1f} at end "
          f"({time.perf_counter() - t0:.0f} s)")
    print()
    print("| pattern | schedule, exchange | max recv fwd / all-gather (target) | per-rank recv / all-gather | "
          "of which k/v (max) | max/mean tiles (contiguous) | fwd ms: patternc / all-gather baseline (ratio) | "
          "torch _ContextParallel FLEX |")
    print("|---|---|---|---|---|---|---|---|")
    ok = True
    for src in PATTERNS:
        rows = [r[src] for r in res]
        st = [r["stats"] for r in rows]
        ratios = [s["bytes_received_forward"] / s["allgather_bytes"] if s["allgather_bytes"] else 0.0 for s in st]
        worst = max(s["bytes_received_forward"] for s in st) / max(s["allgather_bytes"] for s in st)
        kv_worst = max(s["kv_bytes_received_forward"] for s in st) / max(s["allgather_bytes"] for s in st)
        ours = max(r["seconds"] for r in rows)
        ag = max(r["allgather_seconds"] for r in rows)
        if "torch_seconds" in rows[0]:
            torch_col = f"{max(r['torch_seconds'] for r in rows) * 1e3:.0f} ms (all-gather: " \
                        f"{rows[0]['torch_received'] / 2**20:.1f} MiB/rank)"
        elif "torch_error" in rows[0]:
            torch_col = f"does not run: {rows[0]['torch_error']}"
        else:
            torch_col = "not run (--torch-cp)"
        print(f"| `{src}` | {st[0]['method']}, {st[0]['exchange']} | {worst:.3f} (<= {TARGET_BYTES[src]:.3g}) | "
              f"{', '.join(f'{x:.3f}' for x in ratios)} | {kv_worst:.3f} | "
              f"{st[0]['imbalance']:.3f} ({rows[0]['contiguous_imbalance']:.3f}) | "
              f"{ours * 1e3:.0f} / {ag * 1e3:.0f} ({ag / ours:.2f}x) | {torch_col} |")
        if max(r["agree"] for r in rows) > 1e-4:
            print(f"  error: patternc and the all-gather baseline disagree by {max(r['agree'] for r in rows):.3g}")
            ok = False
    return 0 if ok else 1


if __name__ == "__main__":
    raise SystemExit(main())
