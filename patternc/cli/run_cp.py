"""``patternc run --nproc N``: context parallel over N local gloo processes (SPEC §7).

Prints one row per rank (owned positions, query blocks, computed tiles, key/value blocks
read, bytes received and sent in the forward and backward exchanges, what an all-gather of
K and V would receive, forward / backward time), the max / mean computed tiles (and what a
contiguous split would give), and with ``--check`` the error of the unsharded output against
the single-process result of the same kernel (exit 1 above the dtype's tolerance).
"""

from __future__ import annotations

import math
import sys

from ..errors import ExitCode
from .common import UsageError, check_count, print_json

#: relative-error tolerance of ``--check`` against the single-process result, per dtype
TOLERANCE = {"float32": 1e-5, "float64": 1e-10, "bfloat16": 2e-2, "float16": 2e-2}


def _mib(n: int) -> str:
    return f"{n / 2**20:.2f}"


def run_nproc(args, cp, q, k, v, dtype_name: str, documents=None) -> int:
    """``documents``: one row of document lengths (``--documents``), checked here (P36x and
    W007 once, in this process) and passed to every worker's ``ContextParallel.attention``."""
    from ..distributed.launch import run_local

    check_count("--nproc", args.nproc)
    if cp.q_len != cp.kv_len:
        raise UsageError(f"--nproc shards one sequence: --kv-len {cp.kv_len} must equal --seq-len {cp.q_len}")
    if q.device.type != "cpu":
        raise UsageError("--nproc runs local gloo (CPU) processes; use --device cpu (for GPUs use torchrun "
                         "with the nccl backend)")
    cp.runtime_inputs(documents=documents)  # P360 (document without --documents), P361, W007: here, once
    if "documents" not in cp.needs:
        documents = None  # they change nothing (W007 said so)
    if args.backend not in ("auto", "blocksparse"):
        raise UsageError(f"--nproc runs patternc's block-sparse kernel on every rank; --backend {args.backend} "
                         "is not available there")
    res = run_local(cp, q, k, v, args.nproc, balance=args.balance, repeats=args.repeats,
                    threads=args.threads or 1, seed=args.seed, check=args.check, documents=documents,
                    plan=args.plan)
    ranks = res["ranks"]
    tiles = [r["computed_tiles"] for r in ranks]
    mean = sum(tiles) / len(tiles)
    result = {
        "ok": True, "pattern": str(cp.pattern), "nproc": args.nproc, "balance": args.balance,
        "schedule": ranks[0]["method"], "exchange": ranks[0]["exchange"], "ranks": ranks,
        "documents": documents[0] if documents else None,
        "imbalance": (max(tiles) / mean) if mean else 1.0, "contiguous_imbalance": res["contiguous_imbalance"],
        "max_bytes_received_forward": max(r["bytes_received_forward"] for r in ranks),
        "max_allgather_bytes": max(r["allgather_bytes"] for r in ranks),
        "shape": {"batch": q.shape[0], "heads": q.shape[1], "kv_heads": k.shape[1], "seq_len": q.shape[2],
                  "head_dim": q.shape[3], "block_size": args.block_size}, "dtype": dtype_name,
    }
    if args.check:
        max_abs, rel = res["max_abs_error"], res["rel_error"]
        tol = TOLERANCE[dtype_name]
        passed = bool(rel <= tol and math.isfinite(max_abs))
        result.update(max_abs_error=max_abs, rel_error=rel, tolerance=tol, check_passed=passed, ok=passed)
    if args.json:
        print_json(result)
    else:
        _print_table(result)
    if args.check and not result["check_passed"]:
        if not args.json:
            print(f"error: rel_error {result['rel_error']:.3g} against the single-process result is above the "
                  f"{dtype_name} tolerance {result['tolerance']:g}", file=sys.stderr)
        return ExitCode.PROBLEMS
    return ExitCode.OK


def _print_table(r: dict) -> None:
    s = r["shape"]
    print(f"pattern: {r['pattern']}")
    print(f"shape: q [{s['batch']}, {s['heads']}, {s['seq_len']}, {s['head_dim']}], k/v heads {s['kv_heads']}, "
          f"{r['dtype']}, BLOCK_SIZE {s['block_size']}")
    print(f"context parallel: {r['nproc']} gloo processes on 127.0.0.1, balance={r['balance']} "
          f"(schedule {r['schedule']}, {r['ranks'][0]['order']} order, {r['exchange']} exchange)")
    if r.get("documents"):
        print(f"documents: {len(r['documents'])} packed ({', '.join(str(x) for x in r['documents'])} tokens)")
    cols = ("rank", "positions", "q_blocks", "tiles", "kv_blocks", "recv_fwd_MiB", "sent_fwd_MiB",
            "recv_bwd_MiB", "sent_bwd_MiB", "allgather_MiB", "recv/allgather", "fwd_ms", "bwd_ms")
    rows = []
    for x in r["ranks"]:
        ag = x["allgather_bytes"]
        rows.append((str(x["rank"]), str(x["positions"]), str(x["q_blocks"]), str(x["computed_tiles"]),
                     str(x["kv_blocks_read"]), _mib(x["bytes_received_forward"]), _mib(x["bytes_sent_forward"]),
                     _mib(x["bytes_received_backward"]), _mib(x["bytes_sent_backward"]), _mib(ag),
                     f"{x['bytes_received_forward'] / ag:.3f}" if ag else "-",
                     f"{x['forward_seconds'] * 1e3:.1f}", f"{x['backward_seconds'] * 1e3:.1f}"))
    widths = [max(len(c), *(len(row[i]) for row in rows)) for i, c in enumerate(cols)]
    print("  ".join(c.rjust(w) for c, w in zip(cols, widths)))
    for row in rows:
        print("  ".join(v.rjust(w) for v, w in zip(row, widths)))
    print(f"computed tiles max/mean: {r['imbalance']:.3f} (a contiguous split: {r['contiguous_imbalance']:.3f})")
    mr, ma = r["max_bytes_received_forward"], r["max_allgather_bytes"]
    print(f"forward bytes received, max over ranks: {_mib(mr)} MiB vs all-gather {_mib(ma)} MiB"
          + (f" ({mr / ma:.3f})" if ma else ""))
    if "rel_error" in r:
        verdict = "ok" if r["check_passed"] else "FAILED"
        print(f"check vs the single-process result: max_abs_error {r['max_abs_error']:.3g}, rel_error "
              f"{r['rel_error']:.3g} (tolerance {r['tolerance']:g}: {verdict})")
