#!/usr/bin/env python3
"""Train small byte-level transformers with dense and sparse attention on real text: a small
Table 2 of Child et al. (2019), "Generating Long Sequences with Sparse Transformers"
(arXiv:1904.10509, §7.1, Table 2: bits per byte and time per iteration for dense, fixed and
strided attention on Enwik8).

The text is the Python standard library's own source, read from this machine
(``sysconfig.get_paths()["stdlib"]``): every ``*.py`` file under it except third-party
packages (``site-packages``), test suites (a ``test``/``tests``/``idle_test`` folder), the
generated codec tables (``encodings``) and build data (``_sysconfigdata*``, ``config-*``).
Files are taken in sorted order of their relative path and split *by file*: a file whose
CRC-32 of its relative path is 0 mod 10 is held out (about 10 % of files); the model never
trains on a byte of them. Each file ends with a NUL byte in the stream.

Every run builds the same model (same seed, same size, same data order): byte embedding +
learned positions, ``--layers`` pre-LayerNorm blocks of ``patternc.nn.SparseSelfAttention``
and a GELU MLP (4x), final LayerNorm and a linear read-out. Only the attention pattern
differs: ``causal`` for dense, the Sparse Transformer's ``fixed`` and ``strided`` patterns
(``examples/sparse_transformer_fixed.pattern``, ``examples/sparse_transformer_strided.pattern``)
for the sparse runs. The optimiser is AdamW with a linear warm-up and cosine decay.

The runs train in lockstep (iteration t of every run back to back, on the same batch), so a
machine that gets busier slows every run alike, and by default on one thread each
(``--threads 1``): the timings then compare the attention algorithms rather than thread
scheduling (on a busy 2-core machine, two threads made the block-sparse kernel's many small
ops wait on each other, 3.5x slower, while SDPA's one fused op barely noticed).

Reported per run: held-out bits per byte (mean cross-entropy over every position of
``--eval-windows`` held-out windows of ``--seq-len`` bytes, divided by ln 2), seconds per
training iteration (median over the iterations after ``--warmup-iters``; forward + backward +
optimiser step), the pattern's token density and block density at ``--seq-len``.

``--save-qkv PATH.safetensors`` writes the query/key/value activations (float32
``[1, H, L, D]``, tensors ``q``, ``k``, ``v``) of one trained layer on a held-out window, so
``patternc run FILE --input PATH --check`` runs the pattern's attention on real activations
and checks it against the float64 reference (``docs/results.md``).

Examples:
    python examples/train_charlm.py                       # the full default (about 10 min, 2 cores)
    python examples/train_charlm.py --quick --out /tmp/r.json
    python examples/train_charlm.py --patterns dense=causal fixed=examples/sparse_transformer_fixed.pattern \\
        --set l=64 --set c=16 --seq-len 1024 --steps 300
"""

from __future__ import annotations

import argparse
import json
import math
import os
import platform
import statistics
import sys
import sysconfig
import time
import zlib
from pathlib import Path

import numpy as np

HERE = Path(__file__).resolve().parent
if str(HERE.parent) not in sys.path and (HERE.parent / "patternc" / "__init__.py").exists():
    sys.path.insert(0, str(HERE.parent))  # run from a source checkout without installing

DEFAULT_PATTERNS = [
    "dense=causal",
    "fixed=examples/sparse_transformer_fixed.pattern",
    "strided=examples/sparse_transformer_strided.pattern",
]
EXCLUDED_DIRS = {"site-packages", "dist-packages", "test", "tests", "idle_test", "encodings", "__pycache__"}


# ---- data ------------------------------------------------------------------------------------------------------


def stdlib_files(root: Path | None = None) -> list[Path]:
    """The deterministic file list: sorted relative paths of the standard library's sources."""
    root = Path(root or sysconfig.get_paths()["stdlib"])
    out = []
    for p in root.rglob("*.py"):
        rel = p.relative_to(root)
        if EXCLUDED_DIRS & set(rel.parts[:-1]) or rel.name.startswith("_sysconfigdata") or rel.parts[0].startswith("config-"):
            continue
        out.append(rel)
    return sorted(out, key=lambda r: r.as_posix())


def is_held_out(rel: Path) -> bool:
    return zlib.crc32(rel.as_posix().encode()) % 10 == 0


def load_corpus(max_bytes: int | None = None, root: Path | None = None) -> dict:
    """Read the standard library: ``{"train": uint8 [N], "heldout": uint8 [M], ...}``.

    ``max_bytes`` caps each split (files are added in order until the cap) for quick runs.
    """
    root = Path(root or sysconfig.get_paths()["stdlib"])
    parts = {"train": [], "heldout": []}
    files = {"train": 0, "heldout": 0}
    size = {"train": 0, "heldout": 0}
    for rel in stdlib_files(root):
        split = "heldout" if is_held_out(rel) else "train"
        if max_bytes is not None and size[split] >= max_bytes:
            continue
        try:
            data = (root / rel).read_bytes() + b"\0"
        except OSError:
            continue
        parts[split].append(data)
        files[split] += 1
        size[split] += len(data)
    if not parts["train"] or not parts["heldout"]:
        raise SystemExit(f"error: found no standard-library sources under {root}")
    return {
        "train": np.frombuffer(b"".join(parts["train"]), dtype=np.uint8),
        "heldout": np.frombuffer(b"".join(parts["heldout"]), dtype=np.uint8),
        "root": str(root),
        "train_files": files["train"],
        "heldout_files": files["heldout"],
    }


def eval_windows(heldout: np.ndarray, seq_len: int, count: int) -> np.ndarray:
    """uint8 [count, seq_len + 1]: evenly spaced held-out windows (the same for every run)."""
    last = len(heldout) - seq_len - 1
    if last < 0:
        raise SystemExit(f"error: the held-out text ({len(heldout)} bytes) is shorter than --seq-len {seq_len}")
    starts = np.linspace(0, last, count).astype(np.int64)
    return np.stack([heldout[s:s + seq_len + 1] for s in starts])


# ---- model -----------------------------------------------------------------------------------------------------


def build_model(pattern, args):
    import torch
    from torch import nn

    from patternc.nn import SparseSelfAttention

    class Block(nn.Module):
        def __init__(self, layer_idx):
            super().__init__()
            self.ln1 = nn.LayerNorm(args.d_model)
            self.attn = SparseSelfAttention(args.d_model, args.heads, pattern, block_size=args.block_size,
                                            backend=args.backend, layer_idx=layer_idx)
            self.ln2 = nn.LayerNorm(args.d_model)
            self.mlp = nn.Sequential(nn.Linear(args.d_model, 4 * args.d_model), nn.GELU(),
                                     nn.Linear(4 * args.d_model, args.d_model))

        def forward(self, x):
            x = x + self.attn(self.ln1(x))
            return x + self.mlp(self.ln2(x))

    class ByteLM(nn.Module):
        def __init__(self):
            super().__init__()
            self.embed = nn.Embedding(256, args.d_model)
            self.pos = nn.Parameter(torch.zeros(args.seq_len, args.d_model))
            nn.init.normal_(self.pos, std=0.02)
            self.blocks = nn.ModuleList(Block(i) for i in range(args.layers))
            self.ln_f = nn.LayerNorm(args.d_model)
            self.head = nn.Linear(args.d_model, 256)

        def hidden(self, idx, upto=None):
            x = self.embed(idx) + self.pos[: idx.shape[1]]
            for i, blk in enumerate(self.blocks):
                if upto is not None and i == upto:
                    return x
                x = blk(x)
            return x

        def forward(self, idx):
            return self.head(self.ln_f(self.hidden(idx)))

    return ByteLM()


def capture_qkv(attn, x):
    """q, k, v (float [B, H, L, D]) that ``attn`` (a ``SparseSelfAttention``) computes for
    x [B, L, E]: its q/k/v projections split into ``num_heads`` heads, as its forward does.
    ``save_qkv`` checks the result against the module's own output."""
    fn = getattr(attn, "qkv", None)
    if callable(fn):
        return fn(x)
    B, L, E = x.shape
    H = attn.num_heads

    def heads(t):
        return t.view(B, L, H, E // H).transpose(1, 2)

    return heads(attn.q_proj(x)), heads(attn.k_proj(x)), heads(attn.v_proj(x))


# ---- one run ---------------------------------------------------------------------------------------------------


def lr_at(step: int, args) -> float:
    if step < args.lr_warmup:
        return args.lr * (step + 1) / args.lr_warmup
    t = (step - args.lr_warmup) / max(1, args.steps - args.lr_warmup)
    return args.lr * (0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * min(1.0, t))))


def evaluate(model, windows) -> float:
    """Held-out bits per byte over every position of the windows."""
    import torch
    import torch.nn.functional as F

    model.eval()
    total, count = 0.0, 0
    with torch.no_grad():
        for w in windows:
            idx = torch.from_numpy(w[None].astype(np.int64))
            logits = model(idx[:, :-1])
            loss = F.cross_entropy(logits.reshape(-1, 256), idx[:, 1:].reshape(-1), reduction="sum")
            total += float(loss)
            count += idx.shape[1] - 1
    model.train()
    return total / count / math.log(2)


class Run:
    """One model being trained: its pattern, model, optimiser and measurements."""

    def __init__(self, name, source, text, params, args):
        import torch

        import patternc

        self.name, self.source, self.params = name, source, params
        self.pattern = patternc.parse(text, params=params)
        cp = patternc.compile(self.pattern, q_len=args.seq_len, num_heads=args.heads, block_size=args.block_size)
        self.token_density, self.block_density = float(cp.density), float(cp.block_density)
        torch.manual_seed(args.seed)  # identical initial weights for every run
        self.model = build_model(self.pattern, args)
        self.opt = torch.optim.AdamW(self.model.parameters(), lr=args.lr, betas=(0.9, 0.95), weight_decay=0.01)
        self.times: list[float] = []
        self.losses: list[float] = []

    def step(self, batch, lr) -> None:
        import torch
        import torch.nn.functional as F

        for g in self.opt.param_groups:
            g["lr"] = lr
        t0 = time.perf_counter()
        logits = self.model(batch[:, :-1])
        loss = F.cross_entropy(logits.reshape(-1, 256), batch[:, 1:].reshape(-1))
        self.opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(self.model.parameters(), 1.0)
        self.opt.step()
        self.times.append(time.perf_counter() - t0)
        self.losses.append(loss.item())

    def result(self, windows, args) -> dict:
        t0 = time.perf_counter()
        bpb = evaluate(self.model, windows)
        timed = self.times[args.warmup_iters:] or self.times
        return {
            "name": self.name,
            "source": self.source,
            "canonical": str(self.pattern),
            "params": self.params,
            "token_density": self.token_density,
            "block_density": self.block_density,
            "parameters": sum(p.numel() for p in self.model.parameters()),
            "steps": len(self.times),
            "heldout_bits_per_byte": bpb,
            "sec_per_iter": statistics.median(timed),
            "sec_per_iter_mean": statistics.fmean(timed),
            "train_bits_per_byte_last10": statistics.fmean(self.losses[-10:]) / math.log(2),
            "train_seconds": sum(self.times),
            "eval_seconds": time.perf_counter() - t0,
        }


def train_lockstep(runs, corpus, args, progress=True) -> None:
    """Train every run for ``args.steps`` iterations, in lockstep: iteration t of every run
    sees the same batch and runs back to back with the others, so a busy machine slows all
    runs alike and the s/iter columns stay comparable."""
    import torch

    rng = np.random.Generator(np.random.PCG64(args.seed))
    train = corpus["train"]
    bar = _progress(range(args.steps), desc="training", enabled=progress)
    for step in bar:
        starts = rng.integers(0, len(train) - args.seq_len - 1, size=args.batch)
        batch = torch.from_numpy(np.stack([train[s:s + args.seq_len + 1] for s in starts]).astype(np.int64))
        lr = lr_at(step, args)
        for run in runs:
            run.step(batch, lr)
        if hasattr(bar, "set_postfix_str"):
            bar.set_postfix_str(" ".join(f"{r.name} {r.losses[-1] / math.log(2):.2f}" for r in runs) + " bits/byte")


def save_qkv(model, windows, args, path: Path, meta: dict) -> dict:
    """Write q, k, v float32 [1, H, L, D] of layer ``args.qkv_layer`` on the first held-out window."""
    import torch
    from safetensors.torch import save_file

    layer = args.qkv_layer if args.qkv_layer >= 0 else args.layers + args.qkv_layer
    if not 0 <= layer < args.layers:
        raise SystemExit(f"error: --qkv-layer {args.qkv_layer} is outside the model's {args.layers} layers")
    model.eval()
    with torch.no_grad():
        idx = torch.from_numpy(windows[:1, :-1].astype(np.int64))
        x = model.hidden(idx, upto=layer)
        blk = model.blocks[layer]
        xin = blk.ln1(x)
        q, k, v = (t.contiguous().float() for t in capture_qkv(blk.attn, xin))
        # the captured q/k/v must be the module's: attention on them + out_proj == its output
        cp = blk.attn.compiled(args.seq_len) if hasattr(blk.attn, "compiled") else None
        if cp is not None:
            o = cp.attention(q, k, v).transpose(1, 2).reshape(xin.shape)
            ref = blk.attn(xin)
            err = float((blk.attn.out_proj(o) - ref).abs().max() / ref.abs().max())
            if err > 1e-4:
                raise SystemExit(f"error: captured q/k/v do not reproduce the layer's output (rel. error {err:.1e})")
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp")
    save_file({"q": q, "k": k, "v": v}, str(tmp), metadata={k2: str(v2) for k2, v2 in {**meta, "layer": layer}.items()})
    os.replace(tmp, path)
    return {"path": str(path), "layer": layer, "shape": list(q.shape), **meta}


# ---- CLI -------------------------------------------------------------------------------------------------------


def _progress(it, desc, enabled):
    if not enabled:
        return it
    try:
        from tqdm import tqdm
    except ImportError:  # pragma: no cover
        return it
    return tqdm(it, desc=desc, unit="it", dynamic_ncols=True, leave=True)


def parse_patterns(items) -> list[tuple[str, str]]:
    out = []
    for item in items:
        name, eq, src = item.partition("=")
        if not eq or not name.isidentifier() or not src.strip():
            raise SystemExit(f"error: --patterns expects NAME=SOURCE (a .pattern file or an expression), got {item!r}")
        out.append((name, src))
    return out


def build_parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--patterns", nargs="+", default=DEFAULT_PATTERNS, metavar="NAME=SOURCE",
                    help="runs to compare: NAME=a .pattern file or an expression (default: dense, fixed, strided)")
    ap.add_argument("--set", dest="sets", action="append", default=[], metavar="NAME=INT",
                    help="override a `param` of the pattern files (repeatable; names a file does not declare are ignored)")
    ap.add_argument("--steps", type=int, default=250, help="training iterations per run (default 250)")
    ap.add_argument("--seq-len", type=int, default=2048, help="context length in bytes (default 2048)")
    ap.add_argument("--batch", type=int, default=4, help="sequences per iteration (default 4)")
    ap.add_argument("--d-model", type=int, default=128, help="model width (default 128)")
    ap.add_argument("--layers", type=int, default=2, help="transformer blocks (default 2)")
    ap.add_argument("--heads", type=int, default=4, help="attention heads (default 4)")
    ap.add_argument("--block-size", type=int, default=32,
                    help="BLOCK_SIZE of the layouts, tokens (default 32: the fixed pattern's 32 summary "
                         "columns are then whole tiles)")
    ap.add_argument("--backend", default="auto", help="attention backend of SparseSelfAttention (default auto)")
    ap.add_argument("--lr", type=float, default=3e-3, help="peak learning rate (default 3e-3)")
    ap.add_argument("--lr-warmup", type=int, default=20, help="warm-up iterations (default 20)")
    ap.add_argument("--eval-windows", type=int, default=16, help="held-out windows of --seq-len bytes (default 16)")
    ap.add_argument("--warmup-iters", type=int, default=5, help="iterations left out of the timing (default 5)")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--threads", type=int, default=1,
                    help="torch threads (default 1: timings then compare the attention algorithms, not "
                         "thread scheduling; 0 = torch's choice)")
    ap.add_argument("--max-bytes", type=int, default=None, help="cap each split of the corpus (bytes)")
    ap.add_argument("--out", type=Path, default=Path("runs/charlm.json"), help="results JSON (default runs/charlm.json)")
    ap.add_argument("--save-qkv", type=Path, metavar="PATH.safetensors",
                    help="save q/k/v of one trained layer on held-out text")
    ap.add_argument("--qkv-from", metavar="NAME", help="which run's model to save q/k/v from (default: the first sparse run)")
    ap.add_argument("--qkv-layer", type=int, default=-1, help="which layer (default -1: the last)")
    ap.add_argument("--quick", action="store_true", help="a few steps of a tiny model (for tests, ~10 s)")
    ap.add_argument("--no-progress", action="store_true", help="no progress bar")
    return ap


QUICK = dict(steps=4, seq_len=256, batch=2, d_model=32, layers=2, heads=2, block_size=32, eval_windows=2,
             warmup_iters=1, lr_warmup=2, max_bytes=400_000)


def main(argv=None) -> int:
    ap = build_parser()
    args = ap.parse_args(argv)
    if args.quick:
        given = {a.split("=")[0] for a in (argv if argv is not None else sys.argv[1:]) if a.startswith("--")}
        for k, v in QUICK.items():
            if f"--{k.replace('_', '-')}" not in given:
                setattr(args, k, v)
    for name in ("steps", "seq_len", "batch", "d_model", "layers", "heads", "block_size", "eval_windows"):
        if getattr(args, name) < 1:
            ap.error(f"--{name.replace('_', '-')} must be >= 1")
    if args.d_model % args.heads:
        ap.error(f"--d-model {args.d_model} is not a multiple of --heads {args.heads}")
    sets = {}
    for s in args.sets:
        k, eq, v = s.partition("=")
        try:
            sets[k.strip()] = int(v)
        except ValueError:
            ap.error(f"--set expects NAME=INT, got {s!r}")
    runs = parse_patterns(args.patterns)

    import torch

    import patternc

    if args.threads and args.threads > 0:
        torch.set_num_threads(args.threads)
    load_before = _loadavg()
    t0 = time.perf_counter()
    corpus = load_corpus(args.max_bytes)
    windows = eval_windows(corpus["heldout"], args.seq_len, args.eval_windows)
    print(f"corpus: {corpus['root']}: {corpus['train_files']} training files ({len(corpus['train']):,} bytes), "
          f"{corpus['heldout_files']} held-out files ({len(corpus['heldout']):,} bytes); read in "
          f"{time.perf_counter() - t0:.1f} s", file=sys.stderr)

    qkv_info = None
    qkv_from = args.qkv_from or next((n for n, s in runs if patternc.parse(_text(s)) != patternc.parse("causal")), runs[-1][0])
    if args.save_qkv and qkv_from not in {n for n, _ in runs}:
        ap.error(f"--qkv-from {qkv_from!r} is not one of the runs {[n for n, _ in runs]}")
    try:
        models = [Run(name, src, _text(src), _declared(_text(src), sets), args) for name, src in runs]
    except patternc.PatternError as e:
        print(e, file=sys.stderr)
        return 1
    n_params = {r.name: sum(p.numel() for p in r.model.parameters()) for r in models}
    assert len(set(n_params.values())) == 1, f"runs differ in size: {n_params}"
    print(f"model: {args.layers} layers, d_model {args.d_model}, {args.heads} heads, "
          f"{next(iter(n_params.values())):,} parameters; {args.steps} iterations of {args.batch} x {args.seq_len} bytes",
          file=sys.stderr)
    train_lockstep(models, corpus, args, progress=not args.no_progress)
    results = []
    for run in models:
        res = run.result(windows, args)
        results.append(res)
        print(f"{run.name:>8}: held-out {res['heldout_bits_per_byte']:.3f} bits/byte, {res['sec_per_iter']:.3f} s/iter, "
              f"token density {100 * res['token_density']:.1f}%, block density {100 * res['block_density']:.1f}%",
              file=sys.stderr)
        if args.save_qkv and run.name == qkv_from:
            qkv_info = save_qkv(run.model, windows, args, args.save_qkv,
                                {"run": run.name, "source": run.source, "canonical": res["canonical"],
                                 "params": json.dumps(run.params), "seq_len": args.seq_len, "heads": args.heads,
                                 "block_size": args.block_size})

    out = {
        "command": " ".join([Path(sys.argv[0]).name] + (argv if argv is not None else sys.argv[1:])),
        "config": {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items()},
        "data": {"stdlib": corpus["root"], "train_files": corpus["train_files"], "heldout_files": corpus["heldout_files"],
                 "train_bytes": int(len(corpus["train"])), "heldout_bytes": int(len(corpus["heldout"])),
                 "heldout_rule": "crc32(relative path) % 10 == 0"},
        "environment": {"python": platform.python_version(), "torch": torch.__version__,
                        "patternc": patternc.__version__, "threads": torch.get_num_threads(),
                        "machine": platform.machine(), "processor": platform.processor() or None,
                        "cpu_count": os.cpu_count(), "loadavg_before": load_before, "loadavg_after": _loadavg()},
        "results": results,
        "qkv": qkv_info,
        "seconds_total": time.perf_counter() - t0,
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    tmp = args.out.with_name(f".{args.out.name}.tmp")
    tmp.write_text(json.dumps(out, indent=2) + "\n")
    os.replace(tmp, args.out)
    print(markdown_table(results))
    print(f"\nwrote {args.out}" + (f" and {args.save_qkv}" if qkv_info else "") +
          f" in {out['seconds_total']:.0f} s", file=sys.stderr)
    return 0


def _loadavg():
    """1/5/15-minute load averages (None where the OS has none): a busy machine slows every
    run; lockstep training keeps the s/iter ratios comparable, not the absolute times."""
    try:
        return [round(x, 2) for x in os.getloadavg()]
    except (AttributeError, OSError):
        return None


def _pattern_file(src: str) -> Path | None:
    """The file ``src`` names (relative to the working directory, or to the repository root
    as the defaults are), or None when ``src`` is an expression."""
    if "\n" in src or "(" in src:
        return None
    for p in (Path(src), HERE.parent / src):
        try:
            if p.is_file():
                return p
        except OSError:  # too long to be a file name
            return None
    return None


def _text(src: str) -> str:
    f = _pattern_file(src)
    return f.read_text(encoding="utf-8") if f is not None else src


def _declared(text: str, sets: dict) -> dict:
    """The --set values for the params this source declares."""
    import re

    names = set(re.findall(r"^\s*param\s+([A-Za-z_]\w*)", text, re.M))
    return {k: v for k, v in sets.items() if k in names}


def markdown_table(results) -> str:
    dense = next((r for r in results if r["canonical"] == "causal"), None)
    lines = ["| attention | pattern | bits/byte (held-out) | s/iter | vs dense | token density | block density |",
             "|---|---|---|---|---|---|---|"]
    for r in results:
        ratio = f"{r['sec_per_iter'] / dense['sec_per_iter']:.2f}x" if dense else "-"
        canonical = r["canonical"].replace("|", "\\|")  # a literal | inside a table cell
        lines.append(f"| {r['name']} | `{canonical}` | {r['heldout_bits_per_byte']:.3f} | {r['sec_per_iter']:.3f} | "
                     f"{ratio} | {100 * r['token_density']:.1f}% | {100 * r['block_density']:.1f}% |")
    return "\n".join(lines)


if __name__ == "__main__":
    sys.exit(main())
