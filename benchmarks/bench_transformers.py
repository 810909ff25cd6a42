#!/usr/bin/env python3
"""patternc inside HF transformers: a tiny Mistral, patternc vs HF's own implementations.

Two measurements, each as a ratio taken in one run (rounds interleaved, median per side):

1. **Prefill**: one whole-model forward of a tiny Mistral (random weights, ``--layers`` layers,
   ``--hidden`` wide, ``--heads`` query heads over ``--kv-heads`` key/value heads,
   ``sliding_window=--window``) over ``--seq-len`` tokens, batch 1, under
   ``attn_implementation="sdpa"`` (HF's SDPA with its own sliding-window mask) and under
   patternc's registered ``local(w=W) & causal``. Target: patternc ≤ 0.5× sdpa at 8,192 tokens
   with window 512. The logits are compared too (max abs difference printed).
2. **Mask function per decode step**: HF calls the attention-mask function once per forward
   (per mask type). For ``--decode-steps`` consecutive decode steps of a sequence that has
   reached ``--seq-len`` tokens (Q_LEN = 1, a full cache: KV_LEN = t + 1, q_offset = t, a 2-D
   ``attention_mask`` of ones), the time of HF's ``flex_attention_mask`` (which builds a
   ``BlockMask`` with ``create_block_mask(_compile=True)`` at every step) vs patternc's mask
   function; and, to be fair about where the work went, patternc's mask function plus one
   layer's whole attention call at that step (its layout compile — the equivalent of building
   the BlockMask — and the attention itself). Target: mask function ≤ 1/10 of HF's.

Timings vary ±50 % on a shared machine: the script prints ``uptime``'s load with the table.

Examples:
    python benchmarks/bench_transformers.py                    # 8,192 tokens, window 512
    python benchmarks/bench_transformers.py --quick            # small sizes (the smoke test)
"""

from __future__ import annotations

import argparse
import copy
import os
import statistics
import sys
import time
import warnings
from pathlib import Path

HERE = Path(__file__).resolve().parent
if str(HERE.parent) not in sys.path and (HERE.parent / "patternc" / "__init__.py").exists():
    sys.path.insert(0, str(HERE.parent))

import torch  # noqa: E402


def _load() -> str:
    try:
        return os.getloadavg().__repr__()
    except OSError:  # pragma: no cover
        return "n/a"


def _timed(fn, *a, **kw):
    t0 = time.perf_counter()
    out = fn(*a, **kw)
    return time.perf_counter() - t0, out


def build_models(args):
    import transformers

    import patternc.transformers as pt

    cfg = transformers.MistralConfig(
        vocab_size=1000, hidden_size=args.hidden, intermediate_size=2 * args.hidden,
        num_hidden_layers=args.layers, num_attention_heads=args.heads, num_key_value_heads=args.kv_heads,
        head_dim=args.hidden // args.heads, max_position_embeddings=max(args.seq_len + 64, 128),
        sliding_window=args.window)
    cfg._attn_implementation = "sdpa"
    torch.manual_seed(0)
    sdpa = transformers.MistralForCausalLM(cfg).eval()
    reg = pt.register("patternc-bench", f"local(w={args.window}) & causal", block_size=args.block_size)
    mine = transformers.MistralForCausalLM(copy.deepcopy(cfg)).eval()  # its own config: set_attn_implementation edits it
    mine.load_state_dict(sdpa.state_dict())
    mine.set_attn_implementation("patternc-bench")
    return sdpa, mine, reg, cfg


def bench_prefill(args, sdpa, mine):
    ids = torch.randint(3, 1000, (1, args.seq_len), generator=torch.Generator().manual_seed(0))
    times = {"sdpa": [], "patternc": []}
    outs = {}
    with torch.no_grad():
        for name, m in (("sdpa", sdpa), ("patternc", mine)):  # warm-up (first compile, allocations)
            outs[name] = m(ids, use_cache=False).logits
        for _ in range(args.rounds):
            for name, m in (("sdpa", sdpa), ("patternc", mine)):
                t, _ = _timed(m, ids, use_cache=False)
                times[name].append(t)
    assert sdpa.config._attn_implementation == "sdpa" and mine.config._attn_implementation == "patternc-bench"
    diff = float((outs["sdpa"] - outs["patternc"]).abs().max())
    return {k: statistics.median(v) for k, v in times.items()}, diff


def bench_mask(args, reg, cfg):
    from transformers.masking_utils import causal_mask_function, flex_attention_mask

    t0 = args.seq_len
    steps = range(t0, t0 + args.decode_steps)
    hf, mine, mine_compile = [], [], []
    H, D = args.heads, args.hidden // args.heads
    g = torch.Generator().manual_seed(0)
    layer = torch.nn.Module()
    layer.layer_idx, layer.num_key_value_groups = 0, args.heads // args.kv_heads
    layer.eval()
    for i, t in enumerate(steps):
        am = torch.ones(1, t + 1, dtype=torch.bool)
        kw = dict(batch_size=1, q_length=1, kv_length=t + 1, q_offset=t, kv_offset=0,
                  mask_function=causal_mask_function, attention_mask=am, config=None)
        dt, _ = _timed(flex_attention_mask, **kw)
        if i:  # the first step includes torch.compile's first compile
            hf.append(dt)
        dt, m = _timed(reg.mask_function, **kw)
        mine.append(dt)
        # the work the attention function does with it at this step, for one layer (its layout
        # compile misses the cache at every step: a new length), attention included
        q = torch.randn(1, H, 1, D, generator=g)
        k = torch.randn(1, args.kv_heads, t + 1, D, generator=g)
        dc, _ = _timed(reg.attention_function, layer, q, k, k, m, scaling=D ** -0.5)
        mine_compile.append(dt + dc)
    return statistics.median(hf), statistics.median(mine), statistics.median(mine_compile)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--seq-len", type=int, default=8192)
    ap.add_argument("--window", type=int, default=512)
    ap.add_argument("--layers", type=int, default=2)
    ap.add_argument("--hidden", type=int, default=256)
    ap.add_argument("--heads", type=int, default=4)
    ap.add_argument("--kv-heads", type=int, default=2)
    ap.add_argument("--block-size", type=int, default=128)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--decode-steps", type=int, default=16)
    ap.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's)")
    ap.add_argument("--quick", action="store_true", help="small sizes: 512 tokens, window 64, 1 round")
    args = ap.parse_args(argv)
    if args.quick:
        args.seq_len, args.window, args.rounds, args.decode_steps, args.hidden = 512, 64, 1, 3, 64
    if args.threads:
        torch.set_num_threads(args.threads)
    warnings.filterwarnings("ignore")
    import transformers

    sdpa, mine, reg, cfg = build_models(args)
    prefill, diff = bench_prefill(args, sdpa, mine)
    hf_mask, my_mask, my_mask_compile = bench_mask(args, reg, cfg)
    print(f"# tiny Mistral: {args.layers} layers, hidden {args.hidden}, {args.heads} heads / {args.kv_heads} kv heads, "
          f"sliding_window {args.window}; transformers {transformers.__version__}, torch {torch.__version__}, "
          f"{torch.get_num_threads()} threads; load {_load()}")
    print()
    print("| measurement | HF | patternc | ratio (patternc / HF) | target |")
    print("|---|---|---|---|---|")
    print(f"| whole-model prefill, {args.seq_len:,} tokens (HF `sdpa`) | {prefill['sdpa'] * 1e3:.1f} ms | "
          f"{prefill['patternc'] * 1e3:.1f} ms | {prefill['patternc'] / prefill['sdpa']:.3f} | ≤ 0.5 |")
    print(f"| mask function per decode step at {args.seq_len:,} tokens (HF `flex_attention_mask`) | "
          f"{hf_mask * 1e3:.3f} ms | {my_mask * 1e3:.3f} ms | {my_mask / hf_mask:.4f} | ≤ 0.1 |")
    print(f"| … patternc's mask function + one layer's attention call at that step (layout compile included) | "
          f"{hf_mask * 1e3:.3f} ms | "
          f"{my_mask_compile * 1e3:.3f} ms | {my_mask_compile / hf_mask:.4f} | (not a target) |")
    print()
    print(f"max |logits(sdpa) - logits(patternc)| = {diff:.2e}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
