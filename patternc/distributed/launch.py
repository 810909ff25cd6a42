"""Local launches: N gloo processes on 127.0.0.1 (``patternc run --nproc N``, the tests).

``spawn(fn, nproc, *args)`` starts ``nproc`` fresh Python processes (``spawn`` start method:
no fork of a parent whose thread pools are already running), each joining one gloo process
group through a TCP store on 127.0.0.1 at a free port, runs ``fn(rank, world_size, *args)``
in every one and returns the ranks' return values (read back through ``torch.save`` files
in a temporary directory). It is bounded in time: past ``timeout`` seconds every worker is
killed and ``TimeoutError`` raised, so a hung collective never hangs the caller; a worker
that raises makes ``spawn`` raise ``RuntimeError`` with that worker's traceback.

Under ``torchrun --nproc-per-node N script.py`` none of this is needed: the script calls
``torch.distributed.init_process_group("gloo")`` (env:// from torchrun's variables) and builds
``ContextParallel`` as usual.
"""

from __future__ import annotations

import datetime
import os
import socket
import sys
import tempfile
import time
from pathlib import Path

import torch
import torch.distributed as dist
import torch.multiprocessing as mp

#: seconds a collective may wait before gloo gives up (the launcher's own timeout is separate)
COLLECTIVE_TIMEOUT = 120


def free_port() -> int:
    """A TCP port on 127.0.0.1 that was free a moment ago (bound to port 0, then released)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _entry(rank: int, fn, world: int, port: int, threads: int, outdir: str, args: tuple,
           backend: str = "gloo") -> None:
    if sys.platform.startswith("linux"):
        os.environ.setdefault("GLOO_SOCKET_IFNAME", "lo")  # gloo's pairs on the loopback too
    torch.set_num_threads(threads)
    if backend == "nccl":
        torch.cuda.set_device(rank % torch.cuda.device_count())  # one GPU per rank
    dist.init_process_group(backend, init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world,
                            timeout=datetime.timedelta(seconds=COLLECTIVE_TIMEOUT))
    try:
        result = fn(rank, world, *args)
        torch.save(result, Path(outdir) / f"rank{rank}.pt")
        dist.barrier()
    finally:
        dist.destroy_process_group()


def spawn(fn, nproc: int, *args, timeout: float = 300.0, threads: int = 1, backend: str = "gloo") -> list:
    """Run ``fn(rank, world_size, *args)`` in ``nproc`` local gloo processes (``backend="nccl"``:
    nccl, rank r on GPU ``r mod device_count``).

    Args:
        fn: a module-level (picklable) function; its return value must be ``torch.save``-able.
        nproc: number of processes (>= 1).
        args: picklable arguments (a ``CompiledPattern`` is: it pickles without its tensors).
        timeout: seconds for the whole run, start-up included.
        threads: torch intra-op threads per process.

    Returns:
        The return values of ranks 0 … nproc - 1.

    Raises:
        TimeoutError: the run took longer than ``timeout`` (every worker is killed).
        RuntimeError: a worker raised (its traceback in the message) or died.
    """
    if nproc < 1:
        raise ValueError(f"nproc must be >= 1, got {nproc}")
    port = free_port()
    with tempfile.TemporaryDirectory(prefix="patternc-cp-") as outdir:
        ctx = mp.start_processes(_entry, args=(fn, nproc, port, threads, outdir, args, backend), nprocs=nproc,
                                 join=False, start_method="spawn")
        deadline = time.monotonic() + timeout
        try:
            while not ctx.join(timeout=max(0.1, min(1.0, deadline - time.monotonic()))):
                if time.monotonic() > deadline:
                    raise TimeoutError(f"{nproc} gloo workers did not finish within {timeout:.0f} s")
        except mp.ProcessRaisedException as e:
            raise RuntimeError(f"a context-parallel worker failed:\n{e}") from None
        except mp.ProcessExitedException as e:
            raise RuntimeError(f"a context-parallel worker died: {e}") from None
        finally:
            for p in ctx.processes:
                if p.is_alive():
                    p.kill()
                    p.join(5)
        return [torch.load(Path(outdir) / f"rank{r}.pt", weights_only=False) for r in range(nproc)]


# ---- `patternc run --nproc N` ---------------------------------------------------------------
def _run_worker(rank: int, world: int, cp, q, k, v, dout, balance: str, repeats: int, documents=None,
                plan: str = "auto") -> dict:
    """One rank of ``run_local``: shard, time the forward (``repeats`` calls after a warm-up,
    a barrier before each), then forward + backward likewise (at most 3 timed backwards after a
    warm-up) for the backward's bytes and time."""
    import statistics

    from .context import ContextParallel

    shapes = dict(kv_heads=k.shape[1], dtype=q.dtype)  # what the per-term choice weighs
    ctx = ContextParallel(cp, balance=balance, plan=plan, **shapes)
    # what a contiguous split of the same exchange (natural or per-term) would compute per rank
    contiguous = ctx if balance == "contiguous" else ContextParallel(cp, balance="contiguous", plan=plan, **shapes)
    q_l, k_l, v_l = ctx.shard(q), ctx.shard(k), ctx.shard(v)
    times = []
    with torch.no_grad():
        for i in range(repeats + 1):
            dist.barrier()
            t0 = time.perf_counter()
            out_l = ctx.attention(q_l, k_l, v_l, documents=documents)
            if i:
                times.append(time.perf_counter() - t0)
    # the backward warmed up like the forward (its first call builds the backward's plans:
    # timing it alone reported ~50x the steady-state time), then the median of a few
    back, d_l = [], ctx.shard(dout)
    for i in range(max(1, min(repeats, 3)) + 1):
        q_g, k_g, v_g = (x.clone().requires_grad_() for x in (q_l, k_l, v_l))
        o = ctx.attention(q_g, k_g, v_g, documents=documents)
        dist.barrier()
        t0 = time.perf_counter()
        o.backward(d_l)
        if i:
            back.append(time.perf_counter() - t0)
    full = ctx.unshard(out_l)
    return dict(stats=ctx.stats, forward_seconds=statistics.median(times), backward_seconds=statistics.median(back),
                out=full if rank == 0 else None, contiguous_imbalance=contiguous.stats["imbalance"])


def run_local(cp, q, k, v, nproc: int, *, balance: str = "tiles", repeats: int = 3, threads: int = 1,
              timeout: float = 600.0, seed: int = 0, check: bool = False, documents=None,
              plan: str = "auto") -> dict:
    """Context-parallel attention of ``cp`` over ``nproc`` local gloo processes.

    Args:
        cp: a ``CompiledPattern`` with Q_LEN = KV_LEN.
        q: float [B, H, L, D]; k: [B, H_kv, L, D]; v: [B, H_kv, L, Dv] (CPU; each worker
            receives them whole and keeps its shard).
        nproc: number of processes.
        balance: ``"tiles"`` or ``"contiguous"``.
        repeats: timed forward calls per rank (after one warm-up).
        threads: torch threads per process.
        timeout: seconds for the whole run.
        seed: seed of the output gradient used for the one timed backward.
        check: also compare the unsharded output with the single-process result of the same
            kernel (computed here, in the calling process).
        documents: run-time documents of the whole sequence (SPEC §1.7: ids [B, P] / [P] or
            lengths per row), given to every rank's ``ContextParallel.attention``.
        plan: ``"auto"`` or ``"natural"``, every rank's ``ContextParallel(plan=...)`` (and the
            single-process check's ``attention(plan=...)``).

    Returns:
        ``{"ranks": [per-rank stats + forward_seconds / backward_seconds], "out": [B, H, L, Dv]
        (rank 0's unsharded output), "contiguous_imbalance": float}``; with ``check``, also
        ``max_abs_error`` and ``rel_error`` (Frobenius norm of the difference / of the
        single-process output).

    Raises:
        TimeoutError, RuntimeError: see ``spawn``.
    """
    g = torch.Generator().manual_seed(seed + 1)
    dout = torch.randn(q.shape[:-1] + (v.shape[-1],), generator=g).to(q.dtype)
    res = spawn(_run_worker, nproc, cp, q, k, v, dout, balance, repeats, documents, plan, timeout=timeout,
                threads=threads)
    ranks = [dict(r["stats"], forward_seconds=r["forward_seconds"], backward_seconds=r["backward_seconds"])
             for r in res]
    out = {"ranks": ranks, "out": res[0]["out"], "contiguous_imbalance": res[0]["contiguous_imbalance"]}
    if check:
        with torch.no_grad():
            want = cp.attention(q, k, v, backend="blocksparse", documents=documents, plan=plan).to(torch.float64)
        diff = out["out"].to(torch.float64) - want
        norm = float(want.norm())
        out["max_abs_error"] = float(diff.abs().max()) if diff.numel() else 0.0
        out["rel_error"] = float(diff.norm()) / norm if norm > 0 else float(diff.norm())
    return out
