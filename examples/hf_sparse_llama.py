#!/usr/bin/env python3
"""Sparse attention inside an HF transformers Llama, end to end: register a pattern, train on
real text, generate with the KV cache.

Three byte-level ``LlamaForCausalLM`` models (vocabulary 256, the same seed, size and batches)
train in lockstep on the Python standard library's own source — the corpus of
``examples/train_charlm.py`` (its ``load_corpus``: every stdlib ``*.py`` file except tests,
site-packages and codec tables; files whose path CRC-32 is 0 mod 10 held out):

* ``dense``: HF's own ``sdpa`` attention (causal), the baseline;
* ``window|strided``: patternc's ``(local(w=128) | strided(s=128)) & causal`` (Sparse
  Transformer-style local + strided, Child et al. 2019, arXiv:1904.10509 §4.2) in every layer;
* ``window/global``: patternc's ``layers(local(w=128) & causal, causal)``: windowed layers
  interleaved with global (full causal) ones, as Gemma 2/3 and Mistral-style hybrids do.

Each patternc run is one ``patternc.transformers.register(name, pattern)`` and
``LlamaForCausalLM(cfg)`` with ``attn_implementation=name``. After training, every model
reports held-out bits per byte, seconds per iteration (median), and greedily generates
``--gen`` bytes from a held-out prompt with ``model.generate`` — once with the KV cache
(decode steps at ``q_offset = t``) and once without (the whole sequence at every step); the two
must give the same bytes, which checks the offsets of a pattern HF has no built-in for.

Examples:
    python examples/hf_sparse_llama.py                         # 300 steps, 512-byte windows
    python examples/hf_sparse_llama.py --steps 20 --seq-len 256 --out /tmp/r.json
"""

from __future__ import annotations

import argparse
import json
import math
import os
import statistics
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
if str(HERE.parent) not in sys.path and (HERE.parent / "patternc" / "__init__.py").exists():
    sys.path.insert(0, str(HERE.parent))  # run from a source checkout without installing
sys.path.insert(0, str(HERE))

import numpy as np  # noqa: E402

RUNS = [
    ("dense", None),  # HF sdpa
    ("window|strided", "(local(w=128) | strided(s=128)) & causal"),
    ("window/global", "layers(local(w=128) & causal, causal)"),
]


def build(pattern_name, pattern, args):
    import torch
    import transformers

    import patternc.transformers as pt

    cfg = transformers.LlamaConfig(
        vocab_size=256, hidden_size=args.d_model, intermediate_size=4 * args.d_model,
        num_hidden_layers=args.layers, num_attention_heads=args.heads, num_key_value_heads=max(1, args.heads // 2),
        max_position_embeddings=args.seq_len + args.gen + 8, pad_token_id=0, bos_token_id=0, eos_token_id=0,
        tie_word_embeddings=True)
    if pattern is None:
        impl = "sdpa"
    else:
        impl = "patternc-example-" + "".join(c if c.isalnum() else "-" for c in pattern_name)
        pt.register(impl, pattern, block_size=args.block_size)
    torch.manual_seed(args.seed)
    cfg._attn_implementation = impl
    return transformers.LlamaForCausalLM(cfg)


def bits_per_byte(model, windows) -> float:
    import torch

    model.eval()
    total, count = 0.0, 0
    with torch.no_grad():
        for w in windows:
            x = torch.from_numpy(w[None].astype(np.int64))
            out = model(x[:, :-1], use_cache=False)
            loss = torch.nn.functional.cross_entropy(out.logits[0], x[0, 1:], reduction="sum")
            total, count = total + float(loss), count + x.shape[1] - 1
    model.train()
    return total / count / math.log(2)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--steps", type=int, default=300)
    ap.add_argument("--seq-len", type=int, default=512)
    ap.add_argument("--batch", type=int, default=4)
    ap.add_argument("--d-model", type=int, default=128)
    ap.add_argument("--layers", type=int, default=4)
    ap.add_argument("--heads", type=int, default=4)
    ap.add_argument("--block-size", type=int, default=64)
    ap.add_argument("--lr", type=float, default=2e-3)
    ap.add_argument("--gen", type=int, default=64, help="bytes to generate")
    ap.add_argument("--eval-windows", type=int, default=8)
    ap.add_argument("--max-bytes", type=int, default=8_000_000, help="cap on each corpus split (bytes)")
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--out", type=Path, default=None, help="write the results as JSON")
    args = ap.parse_args(argv)

    import torch
    import transformers
    from train_charlm import eval_windows, load_corpus

    torch.set_num_threads(args.threads)
    corpus = load_corpus(args.max_bytes)
    train, heldout = corpus["train"], corpus["heldout"]
    windows = eval_windows(heldout, args.seq_len, args.eval_windows)
    models = {name: build(name, pat, args) for name, pat in RUNS}
    opts = {name: torch.optim.AdamW(m.parameters(), lr=args.lr, weight_decay=0.01) for name, m in models.items()}
    times = {name: [] for name in models}
    rng = np.random.default_rng(args.seed)
    losses = {}
    for step in range(args.steps):
        starts = rng.integers(0, len(train) - args.seq_len - 1, size=args.batch)
        x = torch.from_numpy(np.stack([train[s:s + args.seq_len + 1] for s in starts]).astype(np.int64))
        lr = args.lr * min(1.0, (step + 1) / 20) * 0.5 * (1 + math.cos(math.pi * step / args.steps))
        for name, m in models.items():  # lockstep: a busier machine slows every run alike
            for g in opts[name].param_groups:
                g["lr"] = lr
            t0 = time.perf_counter()
            out = m(x[:, :-1], labels=x[:, :-1], use_cache=False)
            # labels are shifted inside HF's loss: position t predicts byte t+1
            opts[name].zero_grad(set_to_none=True)
            out.loss.backward()
            opts[name].step()
            times[name].append(time.perf_counter() - t0)
            losses[name] = float(out.loss.detach())
        if step % 50 == 0 or step == args.steps - 1:
            print(f"step {step:4d}  " + "  ".join(f"{n} {v:.3f}" for n, v in losses.items()), flush=True)
    prompt_bytes = heldout[len(heldout) // 2: len(heldout) // 2 + 96]
    prompt = torch.from_numpy(prompt_bytes[None].astype(np.int64))
    results = []
    for (name, pat), m in zip(RUNS, models.values()):
        m.eval()
        bpb = bits_per_byte(m, windows)
        kw = dict(max_new_tokens=args.gen, do_sample=False, pad_token_id=0, eos_token_id=None)
        with torch.no_grad():
            t0 = time.perf_counter()
            cached = m.generate(prompt, attention_mask=torch.ones_like(prompt), use_cache=True, **kw)
            t_gen = time.perf_counter() - t0
            uncached = m.generate(prompt, attention_mask=torch.ones_like(prompt), use_cache=False, **kw)
        text = bytes(cached[0, prompt.shape[1]:].tolist()).decode("utf-8", "replace")
        skip = max(1, len(times[name]) // 10)
        results.append({
            "run": name, "attention": "HF sdpa (causal)" if pat is None else f"patternc `{pat}`",
            "heldout_bits_per_byte": bpb, "seconds_per_iter": statistics.median(times[name][skip:] or times[name]),
            "generate_seconds": t_gen, "cache_equals_no_cache": bool(torch.equal(cached, uncached)),
            "sample": text,
        })
    load = os.getloadavg() if hasattr(os, "getloadavg") else None
    meta = {"steps": args.steps, "seq_len": args.seq_len, "batch": args.batch, "d_model": args.d_model,
            "layers": args.layers, "heads": args.heads, "threads": args.threads, "load": load,
            "transformers": transformers.__version__, "torch": torch.__version__,
            "train_bytes": int(len(train)), "heldout_bytes": int(len(heldout))}
    print()
    print(f"# {args.steps} steps, batch {args.batch} x {args.seq_len} bytes, {args.layers} layers, d_model "
          f"{args.d_model}, {args.heads} heads; transformers {transformers.__version__}, load {load}")
    print("| run | attention | held-out bits/byte | s/iter | generate with cache = without | sample (greedy, after the prompt) |")
    print("|---|---|---|---|---|---|")
    for r in results:
        sample = r["sample"].replace("|", "\\|").replace("\n", "⏎")[:48]
        cell, run = r["attention"].replace("|", "\\|"), r["run"].replace("|", "\\|")
        print(f"| {run} | {cell} | {r['heldout_bits_per_byte']:.3f} | {r['seconds_per_iter']:.3f} | "
              f"{'yes' if r['cache_equals_no_cache'] else 'NO'} | `{sample}` |")
    if args.out:
        args.out.write_text(json.dumps({"meta": meta, "results": results}, indent=2))
    return 0 if all(r["cache_equals_no_cache"] for r in results) else 1


if __name__ == "__main__":
    sys.exit(main())
