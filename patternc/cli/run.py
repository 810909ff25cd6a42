"""``patternc run``: execute attention under a pattern, time it against dense SDPA, check it.

Steps: compile the pattern for the lengths; make q/k/v (seeded normal, or ``--input`` a
``.safetensors`` / ``.npz`` / ``.pt`` file holding tensors ``q``, ``k``, ``v``); warm up and
time the chosen backend (median of ``--repeats``); time dense SDPA with the same boolean mask
(skipped, with a note, when the mask would not fit in memory); with ``--check`` compare with
the float64 reference (computed in query chunks, so memory stays bounded). Exit 1 when
``--check`` finds an error above the dtype's tolerance (float32/float64 1e-5, bfloat16 /
float16 2e-2, relative).
"""

from __future__ import annotations

import math
import os
import statistics
import sys
import time

from ..errors import ExitCode, PatternError
from .common import (
    UsageError,
    add_documents_arg,
    add_offset_args,
    add_source_args,
    check_count,
    documents_of,
    emit_diagnostics,
    offsets_of,
    parse_block_size,
    print_json,
    run_guarded,
)

DTYPES = ("float32", "bfloat16", "float16", "float64")
BACKENDS = ("auto", "flex", "blocksparse", "sdpa")
#: relative-error tolerance of ``--check`` per dtype
TOLERANCE = {"float32": 1e-5, "float64": 1e-5, "bfloat16": 2e-2, "float16": 2e-2}


def register(sub) -> None:
    p = sub.add_parser("run", help="execute attention under a pattern; time it against dense SDPA",
                       description="Execute attention under a pattern, time it against dense SDPA with the "
                                   "same mask, and (--check) compare it with a float64 reference.")
    add_source_args(p)
    p.add_argument("--seq-len", type=int, metavar="N", help="Q_LEN in tokens (default: from --input, else required)")
    p.add_argument("--kv-len", type=int, metavar="M", help="KV_LEN in tokens (default: from --input, else N)")
    p.add_argument("--heads", type=int, metavar="H", help="query heads (default: from --input, else required)")
    p.add_argument("--kv-heads", type=int, metavar="H_KV", help="key/value heads, dividing H (grouped-query; default H)")
    p.add_argument("--head-dim", type=int, metavar="D", help="head dimension (default: from --input, else required)")
    p.add_argument("--batch", type=int, metavar="B", help="batch size (default 1)")
    p.add_argument("--dtype", choices=DTYPES, help="tensor dtype (default float32, or the --input file's)")
    p.add_argument("--backend", choices=BACKENDS, default="auto", help="execution backend (default auto)")
    p.add_argument("--block-size", default="128", metavar="B|Q,KV",
                   help="BLOCK_SIZE in tokens, or Q_BLOCK_SIZE,KV_BLOCK_SIZE (default 128)")
    p.add_argument("--layer", type=int, default=0, help="entry of layers(...) to run (default 0)")
    p.add_argument("--plan", choices=("auto", "natural"), default="auto",
                   help="execution plan (blocksparse): auto (disjoint terms, each in its cheapest token order; "
                        "default) or natural (the layout as compiled); see docs/execution.md")
    add_offset_args(p)
    add_documents_arg(p)
    p.add_argument("--device", help="torch device (default: cuda when available, else cpu)")
    p.add_argument("--repeats", type=int, default=5, metavar="R", help="timed calls after one warm-up (default 5)")
    p.add_argument("--check", action="store_true", help="compare with the float64 reference attention")
    p.add_argument("--no-dense", action="store_true", help="skip timing dense SDPA")
    p.add_argument("--input", metavar="F", help="a .safetensors / .npz / .pt file with tensors q, k, v")
    p.add_argument("--seed", type=int, default=0, help="seed of the random q/k/v (default 0)")
    p.add_argument("--threads", type=int, metavar="T",
                   help="torch CPU threads (default: torch's choice). On a busy machine 1 is often faster "
                        "for the block-sparse kernel: its many small ops wait for descheduled threads")
    p.add_argument("--nproc", type=int, metavar="N",
                   help="context parallel: shard the sequence over N local gloo processes; prints per-rank "
                        "balance and bytes (with --check: against the single-process result)")
    p.add_argument("--balance", choices=("tiles", "contiguous"), default="tiles",
                   help="with --nproc: equal computed tiles per rank (default) or equal contiguous chunks")
    p.set_defaults(func=run)


def _compile(pattern, **kw):
    """``patternc.compile``; P302 / P303 (lengths, offsets, block size: the command line's, or
    the --input file's) are usage errors, exit 2, as in ``compile`` and ``show``."""
    from ..compiler import compile as compile_pattern

    try:
        return compile_pattern(pattern, **kw)
    except PatternError as e:
        if e.code in ("P302", "P303"):
            raise UsageError(e.diagnostic.message + (f" ({e.diagnostic.help})" if e.diagnostic.help else "")) from None
        raise


def _available_memory() -> int:
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    try:
        return os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
    except (ValueError, OSError, AttributeError):
        return 8 << 30


def _shape_str(shape) -> str:
    return "[" + ", ".join(str(d) for d in shape) + "]"


def load_input(path: str) -> dict:
    """Tensors ``q``, ``k``, ``v`` from a .safetensors / .npz / .pt file (``.pt`` with
    ``torch.load(weights_only=True)``). Raises UsageError (unreadable, missing tensors)."""
    import torch

    if not os.path.isfile(path):
        raise UsageError(f"cannot read {path}: no such file")
    ext = os.path.splitext(path)[1].lower()
    try:
        if ext == ".safetensors":
            from safetensors.torch import load_file

            data = load_file(path)
        elif ext == ".npz":
            import numpy as np

            with np.load(path, allow_pickle=False) as z:
                data = {name: torch.from_numpy(np.array(z[name])) for name in z.files}
        elif ext in (".pt", ".pth"):
            data = torch.load(path, map_location="cpu", weights_only=True)
        else:
            raise UsageError(f"--input {path}: unknown file type {ext or '(none)'!r}; "
                             "expected .safetensors, .npz or .pt")
    except UsageError:
        raise
    except Exception as e:  # a corrupt or foreign file
        raise UsageError(f"cannot read {path}: {type(e).__name__}: {e}") from None
    if not isinstance(data, dict):
        raise UsageError(f"--input {path}: expected a mapping of tensors q, k, v, got {type(data).__name__}")
    missing = [n for n in ("q", "k", "v") if n not in data]
    if missing:
        have = ", ".join(sorted(map(str, data))) or "nothing"
        raise UsageError(f"--input {path}: missing tensor(s) {', '.join(missing)} (it holds {have}); "
                         "expected q [B, H, Q_LEN, D], k [B, H_kv, KV_LEN, D], v [B, H_kv, KV_LEN, Dv]")
    out = {}
    for n in ("q", "k", "v"):
        t = data[n]
        if not isinstance(t, torch.Tensor):
            raise UsageError(f"--input {path}: {n} is not a tensor ({type(t).__name__})")
        if not t.is_floating_point():
            raise UsageError(f"--input {path}: {n} has dtype {t.dtype}; expected a floating-point tensor")
        out[n] = t
    return out


def _check_input_shapes(path, tensors, B, H, H_kv, N, M, D, Dv):
    expected = {"q": (B, H, N, D), "k": (B, H_kv, M, D), "v": (B, H_kv, M, Dv)}
    for n, shape in expected.items():
        got = tuple(tensors[n].shape)
        if got != shape:
            raise UsageError(
                f"--input {path}: {n} has shape {_shape_str(got)}, expected {_shape_str(shape)} "
                f"(B={B}, H={H}, H_kv={H_kv}, Q_LEN={N}, KV_LEN={M}, D={D}, Dv={Dv}; q [B, H, Q_LEN, D], "
                "k [B, H_kv, KV_LEN, D], v [B, H_kv, KV_LEN, Dv])")


class _NoBar:
    def __enter__(self):
        return self

    def __exit__(self, *exc):
        return False

    def update(self, n=1):
        pass


def _progress(total):
    """A tqdm bar on stderr (shown only when stderr is a terminal); none without tqdm."""
    try:
        from tqdm import tqdm
    except ImportError:
        return _NoBar()
    return tqdm(total=total, desc="patternc run", file=sys.stderr, leave=False, disable=None)


def _sync(device):
    import torch

    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _time(fn, repeats, device, bar):
    """(first_call_seconds, median_seconds) of ``fn()``; one warm-up call, then ``repeats``."""
    _sync(device)
    t0 = time.perf_counter()
    fn()
    _sync(device)
    first = time.perf_counter() - t0
    bar.update(1)
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        _sync(device)
        times.append(time.perf_counter() - t0)
        bar.update(1)
    return first, statistics.median(times)


def run(args) -> int:
    def body(src):
        import torch

        from ..execute import attention, choose_backend
        from ..execute.reference import compare_with_reference, reference_chunk_rows
        from ..execute.sdpa import DENSE_MASK_LIMIT
        from ..source.frontdoor import analyse_source

        pattern, res = analyse_source(src.text, params=src.params, filename=src.filename)
        emit_diagnostics(res.warnings, args.json)
        args.block_size = parse_block_size(args.block_size)
        for name in ("--seq-len", "--kv-len", "--heads", "--kv-heads", "--head-dim", "--batch", "--threads"):
            check_count(name, getattr(args, name[2:].replace("-", "_")))
        if args.threads:
            torch.set_num_threads(args.threads)
        check_count("--repeats", args.repeats)
        check_count("--layer", args.layer, minimum=0)
        try:
            device = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
        except RuntimeError as e:
            raise UsageError(f"--device: {e}") from None
        if device.type not in ("cpu", "cuda"):
            raise UsageError(f"--device {args.device}: patternc runs on 'cpu' or 'cuda' (FlexAttention)")
        if device.type == "cuda" and not torch.cuda.is_available():
            raise UsageError("--device cuda: no CUDA device is available")
        docs = documents_of(args)
        tensors = load_input(args.input) if args.input else None
        if tensors is None and args.seq_len is None:
            raise UsageError("--seq-len is required (or give --input, whose q sets it)")
        if tensors is not None:
            q0 = tensors["q"]
            if q0.dim() != 4 or tensors["k"].dim() != 4 or tensors["v"].dim() != 4:
                raise UsageError(f"--input {args.input}: q, k, v must be 4-D: q [B, H, Q_LEN, D], "
                                 "k [B, H_kv, KV_LEN, D], v [B, H_kv, KV_LEN, Dv]; got "
                                 f"{_shape_str(q0.shape)}, {_shape_str(tensors['k'].shape)}, "
                                 f"{_shape_str(tensors['v'].shape)}")
            N = args.seq_len or q0.shape[2]
            M = args.kv_len or tensors["k"].shape[2]
        else:
            N = args.seq_len
            M = args.kv_len or N
        if tensors is not None:
            B = args.batch or q0.shape[0]
            H = args.heads or q0.shape[1]
            D = args.head_dim or q0.shape[3]
            H_kv = args.kv_heads or tensors["k"].shape[1]
            Dv = tensors["v"].shape[3]
            _check_input_shapes(args.input, tensors, B, H, H_kv, N, M, D, Dv)
            dtype_name = args.dtype or str(q0.dtype).replace("torch.", "")
            if dtype_name not in DTYPES:
                raise UsageError(f"--input {args.input}: dtype {dtype_name} is not one of {', '.join(DTYPES)}")
        else:
            if args.heads is None or args.head_dim is None:
                raise UsageError("--heads and --head-dim are required (or give --input)")
            B, H, D = args.batch or 1, args.heads, args.head_dim
            H_kv = args.kv_heads or H
            Dv = D
            dtype_name = args.dtype or "float32"
        if H % H_kv:
            raise UsageError(f"--kv-heads {H_kv} does not divide --heads {H}")
        dtype = getattr(torch, dtype_name)

        t0 = time.perf_counter()
        cp = _compile(pattern, q_len=N, kv_len=M, num_heads=H, block_size=args.block_size, layer=args.layer,
                      **offsets_of(args))
        compile_seconds = time.perf_counter() - t0

        if tensors is not None:
            q, k, v = (tensors[n].to(device=device, dtype=dtype) for n in ("q", "k", "v"))
        else:
            gen = torch.Generator().manual_seed(args.seed)
            q = torch.randn(B, H, N, D, generator=gen)
            k = torch.randn(B, H_kv, M, D, generator=gen)
            v = torch.randn(B, H_kv, M, Dv, generator=gen)
            q, k, v = (t.to(device=device, dtype=dtype) for t in (q, k, v))

        if args.nproc is not None:
            from .run_cp import run_nproc

            return run_nproc(args, cp, q, k, v, dtype_name, documents=docs)

        backend, reason = (args.backend, "chosen with --backend") if args.backend != "auto" else \
            choose_backend(cp, q, k, v, explain=True)
        if backend == "flex" and device.type == "cpu" and dtype == torch.float64:
            raise UsageError("--backend flex does not take float64 on CPU; use --dtype float32")

        # dense SDPA needs the [H, Q_LEN, KV_LEN] mask and (worst case) a float score tensor
        mask_heads = cp.layout.num_heads
        dense_bytes = mask_heads * N * M + B * H * N * M * 4
        dense_note = None
        if args.no_dense:
            dense_note = "skipped (--no-dense)"
        elif mask_heads * N * M > DENSE_MASK_LIMIT or dense_bytes > 0.5 * _available_memory():
            dense_note = (f"skipped: the dense mask and scores need about {dense_bytes / 2**30:.1f} GiB, "
                          "more than half the available memory")
        do_dense = dense_note is None
        ref_chunk = reference_chunk_rows(B, H, M, N)
        steps = (1 + args.repeats) * (2 if do_dense else 1) + (math.ceil(N / ref_chunk) if args.check else 0)

        with torch.no_grad(), _progress(steps) as bar:
            out_holder = {}

            def call():
                out_holder["out"] = attention(cp, q, k, v, backend=backend, documents=docs, plan=args.plan)

            first, seconds = _time(call, args.repeats, device, bar)
            dense_seconds = None
            if do_dense:
                from ..execute.sdpa import sdpa_attention

                scale = 1.0 / math.sqrt(D)

                if docs is not None:
                    from ..execute.sdpa import sdpa_attention_masked

                    dense_t = torch.from_numpy(cp.dense_mask(documents=docs)).to(device)

                    def dense():  # SDPA with the dense boolean mask of the packed row
                        sdpa_attention_masked(q, k, v, dense_t, scale)
                else:
                    def dense():  # SDPA with the dense boolean mask (also for `causal`), ALiBi's bias
                        sdpa_attention(cp, q, k, v, scale, use_causal=False, drop_softcap=True)

                if any(t.name == "softcap" for t in cp.score_terms):
                    dense_note = "timed without softcap (SDPA takes no score transform)"

                _, dense_seconds = _time(dense, args.repeats, device, bar)
            result = {
                "ok": True, "pattern": str(pattern), "backend": backend, "backend_reason": reason,
                "seconds": seconds, "dense_seconds": dense_seconds,
                "speedup": (dense_seconds / seconds) if dense_seconds and seconds > 0 else None,
                "density": float(cp.density), "block_density": float(cp.block_density),
                "first_call_seconds": first, "compile_seconds": compile_seconds,
                "repeats": args.repeats, "dtype": dtype_name, "device": str(device),
                "layer": args.layer, "num_layers": pattern.num_layers, "layer_pattern": str(cp.pattern),
                "plan": {"mode": args.plan, "terms": len(cp.plan_for(args.plan).terms),
                         "computed_tiles": cp.plan_for(args.plan).computed_tiles,
                         "natural_tiles": cp.plan_for(args.plan).natural_tiles},
                "q_offset": cp.q_offset, "kv_offset": cp.kv_offset, "documents": docs[0] if docs else None,
                "shape": {"batch": B, "heads": H, "kv_heads": H_kv, "q_len": N, "kv_len": M,
                          "head_dim": D, "v_head_dim": Dv, "block_size": args.block_size},
            }
            if dense_note:
                result["dense_note"] = dense_note
            if args.check:
                errors = compare_with_reference(cp, q, k, v, out_holder["out"], on_chunk=bar.update, documents=docs)
                max_abs, rel = errors["max_abs_error"], errors["rel_error"]
                tol = TOLERANCE[dtype_name]
                passed = bool(rel <= tol and math.isfinite(max_abs))
                result.update(max_abs_error=max_abs, rel_error=rel, tolerance=tol, check_passed=passed, ok=passed)

        if args.json:
            print_json(result)
        else:
            _print_text(result, B, H, H_kv, N, M, D, Dv)
        if args.check and not result["check_passed"]:
            if not args.json:
                print(f"error: rel_error {result['rel_error']:.3g} is above the {dtype_name} tolerance "
                      f"{result['tolerance']:g}", file=sys.stderr)
            return ExitCode.PROBLEMS
        return ExitCode.OK

    return run_guarded(args, body)


def _print_text(r, B, H, H_kv, N, M, D, Dv) -> None:
    print(f"pattern: {r['pattern']}")
    if r["num_layers"] > 1:  # a layers(...) stack: say which entry ran (--layer L runs entry L mod m)
        print(f"layer: {r['layer']} (entry {r['layer'] % r['num_layers']} of {r['num_layers']}): {r['layer_pattern']}")
    print(f"shape: q [{B}, {H}, {N}, {D}], k/v [{B}, {H_kv}, {M}, {D}/{Dv}], {r['dtype']} on {r['device']}")
    print(f"density: token {100 * r['density']:.2f}%, block {100 * r['block_density']:.2f}%")
    pl = r.get("plan")
    if pl:
        print(f"plan: {pl['mode']}, {pl['terms']} term(s), {pl['computed_tiles']} computed tiles "
              f"(natural order: {pl['natural_tiles']})")
    print(f"backend: {r['backend']} ({r['backend_reason']})")
    print(f"time: {r['seconds'] * 1e3:.2f} ms (median of {r['repeats']}; first call {r['first_call_seconds']:.2f} s, "
          f"compile {r['compile_seconds']:.2f} s)")
    if r["dense_seconds"] is not None:
        note = f"; {r['dense_note']}" if r.get("dense_note") else ""
        print(f"dense sdpa (same mask): {r['dense_seconds'] * 1e3:.2f} ms -> speedup {r['speedup']:.2f}x{note}")
    else:
        print(f"dense sdpa: {r.get('dense_note')}")
    if "rel_error" in r:
        verdict = "ok" if r["check_passed"] else "FAILED"
        print(f"check vs float64 reference: max_abs_error {r['max_abs_error']:.3g}, rel_error {r['rel_error']:.3g} "
              f"(tolerance {r['tolerance']:g}: {verdict})")
