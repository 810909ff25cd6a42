"""Real batches (issue 11): ratios measured in one run, rounds interleaved; prints ``uptime``.

1. Per-batch BlockMask with packed documents: B rows of L tokens, each packed with D documents
   of random lengths, ``document & local(w) & causal``: ``cp.block_mask(documents=ids)`` vs
   ``torch.compile(create_block_mask)`` of attention-gym's ``generate_doc_mask_mod`` (one call per
   row, compiled once before timing); the BlockMasks are checked equal (counts and index sets).
2. Attention with 16 documents of 512 tokens packed in 8192 (``document & causal``), forward
   and forward+backward, vs SDPA ``is_causal`` over the 8192 tokens.
3. Decode: one step at a cache of 16,384 tokens with ``(local(w=512) | sink(n=4)) & causal``
   (``q_offset`` = 16,383) vs SDPA over the whole cache for the same step.
4. Rows that share run-time data: B=4 rows packed the same way (8 documents of 512 tokens,
   ``per_document(sink(n=4) | local(w=256)) & causal``), blocksparse: one grouped call vs one
   call per row (what the backend did before it grouped rows).

Usage: ``python benchmarks/bench_runtime.py [--quick] [--device cpu|cuda] [--rounds R]``.
"""

from __future__ import annotations

import argparse
import os
import statistics
import subprocess
import sys
import time

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))  # this checkout's patternc

import numpy as np  # noqa: E402
import torch  # noqa: E402


def _sync(device):
    if torch.device(device).type == "cuda":
        torch.cuda.synchronize()


def _timeit(fn, device, reps=1):
    _sync(device)
    t0 = time.perf_counter()
    for _ in range(reps):
        fn()
    _sync(device)
    return (time.perf_counter() - t0) / reps


def _medians(fs, rounds: int, device) -> dict:
    """Median seconds per function name over ``rounds`` interleaved rounds (after one warm-up
    call each): every variant is measured in the same time windows."""
    for f in fs:
        f()
    t = {f.__name__: [] for f in fs}
    for _ in range(rounds):
        for f in fs:
            t[f.__name__].append(_timeit(f, device))
    return {k: statistics.median(v) for k, v in t.items()}


def _uptime() -> str:
    try:
        return subprocess.run(["uptime"], capture_output=True, text=True).stdout.strip()
    except OSError:
        return f"load average: {os.getloadavg()}"


def _random_lengths(rng, total: int, n: int) -> list[int]:
    cuts = np.sort(rng.choice(np.arange(1, total), n - 1, replace=False))
    return np.diff(np.concatenate([[0], cuts, [total]])).tolist()


def _same_block_masks(a, b) -> bool:
    if not (torch.equal(a.kv_num_blocks.cpu(), b.kv_num_blocks.cpu())
            and torch.equal(a.full_kv_num_blocks.cpu(), b.full_kv_num_blocks.cpu())):
        return False
    for name, num in (("kv_indices", "kv_num_blocks"), ("full_kv_indices", "full_kv_num_blocks")):
        ia, ib, n = getattr(a, name).cpu(), getattr(b, name).cpu(), getattr(a, num).cpu()
        width = ia.shape[-1]
        valid = torch.arange(width) < n[..., None]
        sa = torch.where(valid, ia, width).sort(-1).values
        sb = torch.where(valid, ib, width).sort(-1).values
        if not torch.equal(sa, sb):
            return False
    return True


def bench_block_masks(args, device):
    from torch.nn.attention.flex_attention import and_masks, create_block_mask

    import patternc

    try:
        from attn_gym.masks.document_mask import generate_doc_mask_mod
    except ImportError:  # pip install attn-gym==0.0.17 --no-deps
        generate_doc_mask_mod = None
    B, L, D, w, bs = args.batch, args.seq, args.docs, args.window, 128
    rng = np.random.default_rng(0)
    lens = [_random_lengths(rng, L, D) for _ in range(B)]
    ids = torch.from_numpy(np.stack([np.repeat(np.arange(D), row) for row in lens])).to(device)
    src = f"document & local(w={w}) & causal"
    t0 = time.perf_counter()
    cp = patternc.compile(src, q_len=L, block_size=bs)
    compile_s = time.perf_counter() - t0

    def causal(b, h, q, kv):
        return q >= kv

    def window(b, h, q, kv):
        return q - kv < w

    # --quick (the smoke test) runs create_block_mask eagerly: the torch.compile of the peer
    # costs a minute of CPU and is not what the smoke test is for (the masks are still compared)
    cbm = create_block_mask if args.quick else torch.compile(create_block_mask)
    offsets = [torch.tensor(np.concatenate([[0], np.cumsum(row)]), device=device) for row in lens]
    if generate_doc_mask_mod is not None:
        mods = [generate_doc_mask_mod(and_masks(causal, window), off) for off in offsets]
        peer_name = ("create_block_mask (eager: --quick)" if args.quick else "torch.compile(create_block_mask)") + \
            ", attention-gym generate_doc_mask_mod, per row"
    else:
        mods = [cp.mask_mod_for(device, documents=ids[b:b + 1]) for b in range(B)]
        peer_name = "torch.compile(create_block_mask) of cp.mask_mod_for (attn-gym not installed)"

    def peer():
        return [cbm(m, 1, 1, L, L, device=device, BLOCK_SIZE=bs) for m in mods]

    def mine():
        return cp.block_mask(device, documents=ids)

    t0 = time.perf_counter()
    ref = peer()  # compile (not timed below)
    peer_first = time.perf_counter() - t0
    got = mine()
    equal = all(_same_block_masks(got.__getitem__(b) if hasattr(got, "__getitem__") else got, ref[b])
                for b in range(B))
    tp, tm = [], []
    for _ in range(args.rounds):  # interleaved
        tp.append(_timeit(peer, device))
        tm.append(_timeit(mine, device))
    p, m = statistics.median(tp), statistics.median(tm)
    print(f"\n1. per-batch BlockMask: B={B} x {L} tokens, {D} documents/row, `{src}`, BLOCK_SIZE {bs}, {device}")
    print(f"   patternc cp.block_mask(documents=...)  {m * 1e3:10.1f} ms / batch   (compile once: {compile_s * 1e3:.0f} ms)")
    print(f"   {peer_name}  {p * 1e3:10.1f} ms / batch   (first call {peer_first:.1f} s)")
    print(f"   ratio peer / patternc: {p / m:.1f}x   BlockMasks equal: {equal}")
    return equal


def bench_attention(args, device, dtype):
    import patternc

    H, Dh = 8, 64
    ndocs, doc = (16, 512) if not args.quick else (4, 128)
    L = ndocs * doc
    cp = patternc.compile("document & causal", q_len=L, num_heads=H, block_size=128)
    docs = [[doc] * ndocs]
    g = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(1, H, L, Dh, generator=g).to(device=device, dtype=dtype).requires_grad_() for _ in range(3))
    F = torch.nn.functional

    def fwd_mine():
        with torch.no_grad():
            cp.attention(q, k, v, documents=docs)

    def fwd_sdpa():
        with torch.no_grad():
            F.scaled_dot_product_attention(q, k, v, is_causal=True)

    def fb_mine():
        cp.attention(q, k, v, documents=docs).sum().backward()

    def fb_sdpa():
        F.scaled_dot_product_attention(q, k, v, is_causal=True).sum().backward()

    m = _medians((fwd_mine, fwd_sdpa, fb_mine, fb_sdpa), args.rounds, device)
    print(f"\n2. attention, {ndocs} documents x {doc} tokens packed in {L} (`document & causal`), H={H}, D={Dh}, "
          f"{dtype}, {device}")
    print(f"   forward      patternc {m['fwd_mine'] * 1e3:9.1f} ms   SDPA is_causal {m['fwd_sdpa'] * 1e3:9.1f} ms   "
          f"ratio {m['fwd_mine'] / m['fwd_sdpa']:.3f}x (target <= 0.15)")
    print(f"   fwd + bwd    patternc {m['fb_mine'] * 1e3:9.1f} ms   SDPA is_causal {m['fb_sdpa'] * 1e3:9.1f} ms   "
          f"ratio {m['fb_mine'] / m['fb_sdpa']:.3f}x (target <= 0.2)")


def bench_shared_rows(args, device, dtype):
    """B rows packed the same way (a batch of equal packings, e.g. fixed-length documents):
    the blocksparse backend groups rows with equal run-time data into one call; the baseline is
    what it did before, one call per row (here: ``cp.attention`` on each row)."""
    import patternc

    H, Dh, B = 8, 64, 4
    ndocs, doc = (8, 512) if not args.quick else (4, 128)
    L = ndocs * doc
    src = "per_document(sink(n=4) | local(w=256)) & causal"
    cp = patternc.compile(src, q_len=L, num_heads=H, block_size=128)
    docs = [[doc] * ndocs] * B
    g = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(B, H, L, Dh, generator=g).to(device=device, dtype=dtype).requires_grad_() for _ in range(3))

    def fwd_grouped():
        with torch.no_grad():
            cp.attention(q, k, v, documents=docs, backend="blocksparse")

    def fwd_rows():
        with torch.no_grad():
            for b in range(B):
                cp.attention(q[b:b + 1], k[b:b + 1], v[b:b + 1], documents=docs[:1], backend="blocksparse")

    def fb_grouped():
        cp.attention(q, k, v, documents=docs, backend="blocksparse").sum().backward()

    def fb_rows():
        torch.cat([cp.attention(q[b:b + 1], k[b:b + 1], v[b:b + 1], documents=docs[:1], backend="blocksparse")
                   for b in range(B)]).sum().backward()

    m = _medians((fwd_grouped, fwd_rows, fb_grouped, fb_rows), args.rounds, device)
    print(f"\n4. B={B} rows packed the same way ({ndocs} documents x {doc} tokens, `{src}`), H={H}, D={Dh}, "
          f"{dtype}, {device}, blocksparse")
    print(f"   forward      one grouped call {m['fwd_grouped'] * 1e3:9.1f} ms   row by row {m['fwd_rows'] * 1e3:9.1f} ms"
          f"   ratio {m['fwd_grouped'] / m['fwd_rows']:.3f}x")
    print(f"   fwd + bwd    one grouped call {m['fb_grouped'] * 1e3:9.1f} ms   row by row {m['fb_rows'] * 1e3:9.1f} ms"
          f"   ratio {m['fb_grouped'] / m['fb_rows']:.3f}x")


def bench_decode(args, device, dtype):
    import patternc

    H, Dh = 8, 64
    T = 16384 if not args.quick else 2048
    src = "(local(w=512) | sink(n=4)) & causal"
    g = torch.Generator().manual_seed(0)
    q = torch.randn(1, H, 1, Dh, generator=g).to(device=device, dtype=dtype)
    k, v = (torch.randn(1, H, T, Dh, generator=g).to(device=device, dtype=dtype) for _ in range(2))
    F = torch.nn.functional
    t0 = time.perf_counter()
    cp = patternc.compile(src, q_len=1, kv_len=T, q_offset=T - 1, num_heads=H, block_size=128)
    compile_s = time.perf_counter() - t0

    def mine():
        with torch.no_grad():
            cp.attention(q, k, v)

    def sdpa():
        with torch.no_grad():
            F.scaled_dot_product_attention(q, k, v)

    for f in (mine, sdpa):
        f()
    tm, ts = [], []
    for _ in range(args.rounds):
        tm.append(_timeit(mine, device, reps=20))
        ts.append(_timeit(sdpa, device, reps=20))
    m, s = statistics.median(tm), statistics.median(ts)
    read = int(cp.layout.kinds[0].astype(bool).sum()) * 128  # per head
    print(f"\n3. decode one step at a cache of {T} tokens, `{src}`, H={H}, D={Dh}, {dtype}, {device}")
    print(f"   patternc (q_offset={T - 1}) {m * 1e6:9.1f} us   SDPA over the whole cache {s * 1e6:9.1f} us   "
          f"ratio {m / s:.3f}x (target <= 0.2); keys read {read} of {T}; step compile {compile_s * 1e3:.1f} ms")


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true", help="small sizes (the smoke test)")
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--batch", type=int, default=None)
    ap.add_argument("--seq", type=int, default=None)
    ap.add_argument("--docs", type=int, default=None)
    ap.add_argument("--window", type=int, default=1024)
    ap.add_argument("--skip", default="", help="comma list of sections to skip: masks,attention,decode,rows")
    ap.add_argument("--threads", type=int, default=None,
                    help="torch CPU threads (1 is faster on a machine where other jobs hold the cores)")
    args = ap.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    args.batch = args.batch or (2 if args.quick else 8)
    args.seq = args.seq or (4096 if args.quick else 32768)
    args.docs = args.docs or (20 if args.quick else 200)
    if args.quick:
        args.window = min(args.window, 256)
    device = torch.device(args.device)
    dtype = torch.float32 if device.type == "cpu" else torch.bfloat16
    print(f"patternc bench_runtime   torch {torch.__version__}   threads {torch.get_num_threads()}")
    print(_uptime())
    skip = set(filter(None, args.skip.split(",")))
    ok = True
    if "masks" not in skip:
        ok = bench_block_masks(args, device)
    if "attention" not in skip:
        bench_attention(args, device, dtype)
    if "decode" not in skip:
        bench_decode(args, device, dtype)
    if "rows" not in skip:
        bench_shared_rows(args, device, dtype)
    print()
    print(_uptime())
    if not ok:
        raise SystemExit("BlockMasks differ")


if __name__ == "__main__":
    main()
