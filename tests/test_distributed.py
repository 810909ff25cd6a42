"""Context parallel (SPEC §7) on gloo: 4 local processes, spawned once for the whole module.

Every case runs on 2 ranks (a subgroup of the 4: the ``group=`` argument) or on all 4 and is
compared here, in the parent, with the single-process result of the same kernel (outputs
1e-5, q/k/v gradients 1e-4), and its bytes with an independent count from the mask oracle:
each rank must receive exactly the key/value blocks that hold a key one of its rows attends.
The schedule's balance is tested without processes.
"""

from __future__ import annotations

import warnings

import numpy as np
import pytest

import patternc
from patternc.distributed import balance as bal

torch = pytest.importorskip("torch")
dist = pytest.importorskip("torch.distributed")
if not dist.is_available():  # pragma: no cover
    pytest.skip("torch.distributed is not available", allow_module_level=True)

DIM = 8
# (name, source, seq_len, heads, kv_heads, block_size, balance, world[, compile / ContextParallel / input options])
CASES = [
    ("local2", "local(w=40) & causal", 300, 2, 2, 32, "tiles", 2),
    ("strided2", "strided(s=24) & causal", 250, 2, 1, 32, "contiguous", 2),
    ("fixed4", "fixed(l=64, c=8)", 333, 2, 2, 32, "tiles", 4),
    ("perhead4", "heads(local(w=32) & causal, strided(s=16) & causal, causal, sink(n=5) | local(w=9))",
     290, 4, 2, 32, "tiles", 4),
    ("causal4", "causal", 301, 1, 1, 16, "tiles", 4),
    ("mixed4", "local(w=50) & causal", 230, 2, 2, (32, 16), "tiles", 4),
    ("idle4", "local(w=16) & causal", 64, 2, 2, 32, "tiles", 4),  # 2 query blocks: 2 ranks own nothing
    ("prefix4", "prefix(n=40)", 200, 1, 1, 32, "tiles", 4),  # rows past 40 have no key at all
    # sharded in the plan's residue order: whole residue classes per rank, nothing to exchange
    ("residue4", "strided(s=32) & causal", 1024, 2, 2, 32, "tiles", 4),
    # per-term exchange (docs/distributed.md): local in natural order, strided in residue order
    ("split4", "(local(w=32) | strided(s=32)) & causal", 1024, 1, 1, 32, "tiles", 4),
    ("splitgqa4", "(local(w=40) | strided(s=32)) & causal", 1000, 2, 1, 32, "tiles", 4),
    ("split2", "(local(w=20) | strided(s=16)) & causal", 333, 2, 2, 16, "tiles", 2, {"exchange": "per-term"}),
    # score terms (ALiBi at global positions) and offsets
    ("alibi4", "((local(w=40) | strided(s=32)) & causal) with alibi(max_bias=8)", 777, 4, 2, 32, "tiles", 4),
    ("softcap2", "(local(w=30) & causal) with softcap(c=5)", 250, 2, 2, 32, "tiles", 2),
    ("offset4", "(local(w=50) & causal) with alibi(max_bias=4)", 300, 2, 2, 32, "tiles", 4,
     {"q_offset": 70, "kv_offset": 70}),
    ("skew2", "causal", 200, 1, 1, 32, "contiguous", 2, {"q_offset": 24}),  # bottom-right rows, same length
    # whole blocks (no padding: the kernel sees the exchange buffer's permuted view as is) with a
    # column every row reads (the fused backward sums its span once): found by a review
    # (Dv = D: the fused FlashAttention-style calls)
    ("sink2", "sink(n=4) & causal", 256, 2, 2, 64, "tiles", 2, {"value_dim": DIM}),
    ("sinksplit4", "(sink(n=4) | strided(s=16)) & causal", 320, 2, 2, 32, "tiles", 4, {"value_dim": DIM}),
    # grouped-query heads make queries and partial outputs (H heads) dear next to keys (H_kv):
    # told the shapes, the choice is the natural exchange; not told, each call still runs it (W030)
    ("gqasplit4", "(local(w=32) | strided(s=32)) & causal", 1024, 8, 1, 32, "tiles", 4, {"kv_heads": 1}),
    ("gqaunhinted4", "(local(w=32) | strided(s=32)) & causal", 1024, 8, 1, 32, "tiles", 4),
    # on 2 ranks per term beat the natural exchange on its own rows but not on the per-term rows,
    # which each call compares with: it was chosen, then every call ran natural (W030)
    ("split2auto", "(local(w=32) | strided(s=32)) & causal", 512, 2, 2, 32, "tiles", 2),
]
COMPILE_OPTIONS = ("q_offset", "kv_offset")
INPUT_OPTIONS = ("value_dim",)  # Dv of the case's inputs (default DIM + 2)

# run-time data (SPEC §1.7), 4 ranks: (name, source, seq_len, heads, batch, documents, key padding lengths)
RUNTIME = [
    ("docs4", "document & (sink(n=4) | local(w=30)) & causal", 300, 2, 1, [[100, 57, 143]], None),
    ("docpad4", "document & causal", 250, 2, 2, [[60, 190], [120, 30, 100]], [250, 170]),
    ("pad4", "local(w=64) & causal", 260, 1, 2, None, [260, 100]),
    # a per-term ContextParallel (its rows owned in natural order) runs run-time data with one exchange
    ("splitpad4", "(local(w=40) | strided(s=32)) & causal", 500, 2, 2, None, [500, 333]),
]


def _runtime_data(B, L, docs, pad):
    kp = None if pad is None else torch.arange(L)[None, :] < torch.tensor(pad)[:, None]
    return docs, kp


def _options(case) -> dict:
    return case[8] if len(case) > 8 else {}


def _input_options(case) -> dict:
    return {k: x for k, x in _options(case).items() if k in INPUT_OPTIONS}


def _compile(case):
    name, src, L, H, Hkv, bs = case[:6]
    return patternc.compile(src, q_len=L, num_heads=H, block_size=bs,
                            **{k: x for k, x in _options(case).items() if k in COMPILE_OPTIONS})


def _inputs(seq_len, heads, kv_heads, seed, batch=1, value_dim=DIM + 2):
    g = torch.Generator().manual_seed(seed)
    q = torch.randn(batch, heads, seq_len, DIM, generator=g)
    k = torch.randn(batch, kv_heads, seq_len, DIM, generator=g)
    v = torch.randn(batch, kv_heads, seq_len, value_dim, generator=g)
    dout = torch.randn(batch, heads, seq_len, value_dim, generator=g)
    return q, k, v, dout


def _worker(rank, world):
    """Every case on its ranks; returns {name: (out, dq, dk, dv, stats)} (full tensors on rank 0 of
    the case's group, stats of every rank in it)."""
    from patternc.distributed import ContextParallel

    pair = dist.new_group([0, 1])  # collective: every rank creates it
    results = {}
    for n, case in enumerate(CASES):
        name, src, L, H, Hkv, bs, balance, w = case[:8]
        if w == 2 and rank >= 2:
            continue
        group = pair if w == 2 else None
        cp = _compile(case)
        opts = {k: x for k, x in _options(case).items() if k not in COMPILE_OPTIONS + INPUT_OPTIONS}
        ctx = ContextParallel(cp, group=group, balance=balance, **opts)
        q, k, v, dout = _inputs(L, H, Hkv, n, **_input_options(case))
        ql, kl, vl = (ctx.shard(x).requires_grad_() for x in (q, k, v))
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            out_l = ctx.attention(ql, kl, vl)
        (out_l * ctx.shard(dout)).sum().backward()
        full = [ctx.unshard(t) for t in (out_l, ql.grad, kl.grad, vl.grad)]
        stats = [None] * w
        dist.all_gather_object(stats, ctx.stats, group=group)
        results[name] = (*full, stats, [ctx._natural(p).tolist() for p in ctx.schedule.positions],
                         None if ctx.order is None else ctx.order.tolist(), ctx.exchange,
                         [str(x.message) for x in caught], _keeps_its_choice(ctx, H))
    for n, (name, src, L, H, B, docs, pad) in enumerate(RUNTIME):
        cp = patternc.compile(src, q_len=L, num_heads=H, block_size=32)
        ctx = ContextParallel(cp)
        q, k, v, dout = _inputs(L, H, H, 50 + n, batch=B)
        documents, kp = _runtime_data(B, L, docs, pad)
        ql, kl, vl = (ctx.shard(x).requires_grad_() for x in (q, k, v))
        out_l = ctx.attention(ql, kl, vl, documents=documents, key_padding_mask=kp)
        (out_l * ctx.shard(dout)).sum().backward()
        full = [ctx.unshard(t) for t in (out_l, ql.grad, kl.grad, vl.grad)]
        stats = [None] * world
        dist.all_gather_object(stats, ctx.stats)
        results[name] = (*full, stats, [p.tolist() for p in ctx.schedule.positions], ctx.exchange)
    results["nn"] = _nn_case(ContextParallel)
    results["mismatch"] = _mismatch_case(ContextParallel, rank)
    results["unshard"] = _unshard_case(ContextParallel, world)
    return results


def _keeps_its_choice(ctx, H):
    """A per-term choice made at the hinted shapes (D = Dv = 64) is not undone by a call with
    exactly those shapes (it was on 2 ranks: the construction and the call compared with the
    natural exchange on different rows). None where the construction did not choose per term."""
    if ctx._per_term_counts is None or ctx._exchange_opt == "per-term":
        return None
    kvh, dtype = ctx._hint
    q = torch.empty(1, H, 0, 64, dtype=dtype)
    kv = torch.empty(1, kvh, 0, 64, dtype=dtype)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return ctx._per_term_pays(q, kv, kv)


def _mismatch_case(ContextParallel, rank):
    """Rank 0 calls with B = 2, the others with B = 1: every rank raises P350 (gloo aborted the
    processes), and the group goes on working."""
    ctx = ContextParallel(patternc.compile("local(w=16) & causal", q_len=128, num_heads=1, block_size=32))
    def error_of(q, k, v):
        try:
            ctx.attention(q, k, v)
        except patternc.PatternError as e:
            return str(e)
        return None

    q, k, v, _ = _inputs(128, 1, 1, 3, batch=2 if rank == 0 else 1)
    got = error_of(ctx.shard(q), ctx.shard(k), ctx.shard(v))
    # rank 1's inputs do not fit on their own (the whole sequence, not its shard): it raises
    # that, the others raise P350 (they waited for it in the exchange)
    q, k, v, _ = _inputs(128, 1, 1, 3)
    alone = error_of(q, k, v) if rank == 1 else error_of(ctx.shard(q), ctx.shard(k), ctx.shard(v))
    return got, alone, ctx.unshard(ctx.attention(ctx.shard(q), ctx.shard(k), ctx.shard(v)))


UNSHARD = ("(local(w=40) | strided(s=32)) & causal", 500, 2)


def _unshard_case(ContextParallel, world):
    """A loss on the unsharded output, the same on every rank, divided by the world size: the
    gradients summed through unshard's backward are the single-process ones."""
    src, L, H = UNSHARD
    ctx = ContextParallel(patternc.compile(src, q_len=L, num_heads=H, block_size=32))
    q, k, v, dout = _inputs(L, H, H, 77)
    ql, kl, vl = (ctx.shard(x).requires_grad_() for x in (q, k, v))
    full = ctx.unshard(ctx.attention(ql, kl, vl))
    assert full.requires_grad
    ((full * dout).sum() / world).backward()
    return [full.detach()] + [ctx.unshard(t) for t in (ql.grad, kl.grad, vl.grad)]


NN_LEN = 300


def _nn_model():
    from patternc.nn import SparseSelfAttention

    torch.manual_seed(0)
    return torch.nn.Sequential(SparseSelfAttention(16, 2, "(local(w=40) & causal) with alibi(max_bias=8)", block_size=32),
                               SparseSelfAttention(16, 2, "strided(s=24) & causal | sink(n=4)", block_size=32),
                               SparseSelfAttention(16, 2, "(local(w=16) | strided(s=16)) & causal", block_size=32))


def _nn_inputs():
    g = torch.Generator().manual_seed(99)
    return torch.randn(2, NN_LEN, 16, generator=g), torch.randn(2, NN_LEN, 16, generator=g)


def _nn_padding():
    return torch.arange(NN_LEN)[None, :] < torch.tensor([NN_LEN, 211])[:, None]  # row 1 left 89 pad keys


def _nn_case(ContextParallel):
    """Two SparseSelfAttention layers (different patterns) on 4 ranks, one ContextParallel's
    positions for both; parameter gradients summed over the ranks (as DDP would)."""
    model = _nn_model()
    ctx = ContextParallel(model[0].compiled(NN_LEN), balance="tiles")
    for layer in model:
        layer.context_parallel = ctx
    x, g = _nn_inputs()
    kp = _nn_padding()
    y_l = model[1](model[0](ctx.shard(x, dim=1), key_padding_mask=kp), key_padding_mask=kp)
    y_l = model[2](y_l)  # no padding: layer 2 keeps ctx's rows with its own (per-term) exchange
    (y_l * ctx.shard(g, dim=1)).sum().backward()
    grads = []
    for p in model.parameters():
        dist.all_reduce(p.grad)
        grads.append(p.grad)
    return ctx.unshard(y_l, dim=1), grads, ctx.for_pattern(model[2].compiled(NN_LEN)).exchange


@pytest.fixture(scope="module")
def ranks():
    from patternc.distributed.launch import spawn

    return spawn(_worker, 4, timeout=600)


def _single(cp, q, k, v, dout):
    q, k, v = (x.clone().requires_grad_() for x in (q, k, v))
    out = cp.attention(q, k, v, backend="blocksparse")
    (out * dout).sum().backward()
    return out.detach(), q.grad, k.grad, v.grad


@pytest.mark.parametrize("case", CASES, ids=[c[0] for c in CASES])
def test_equals_single_process(ranks, case):
    name, src, L, H, Hkv, bs, balance, w = case[:8]
    n = CASES.index(case)
    cp = _compile(case)
    want = _single(cp, *_inputs(L, H, Hkv, n, **_input_options(case)))
    got = ranks[0][name][:4]
    for what, a, b, tol in zip(("out", "dq", "dk", "dv"), got, want, (1e-5, 1e-4, 1e-4, 1e-4)):
        assert a.shape == b.shape, what
        torch.testing.assert_close(a, b, atol=tol, rtol=tol, msg=f"{name}: {what}")
    # the ranks of the pair agree with rank 0 (every rank gets the whole unsharded tensor)
    for r in range(1, w):
        torch.testing.assert_close(ranks[r][name][0], got[0], atol=0, rtol=0)


PER_TERM = ["fixed4", "split4", "splitgqa4", "split2", "alibi4", "sinksplit4"]  # exchanged per plan term (stats["exchange"])
NATURAL_CASES = [c for c in CASES if c[0] not in PER_TERM]


@pytest.mark.parametrize("case", NATURAL_CASES, ids=[c[0] for c in NATURAL_CASES])
def test_moves_exactly_the_blocks_read(ranks, case):
    """bytes received = the tokens of the key blocks holding a key some owned row attends (oracle),
    minus the rank's own; the backward sends exactly as much back; sums match across ranks."""
    name, src, L, H, Hkv, bs, balance, w = case[:8]
    stats, positions, order = ranks[0][name][4], ranks[0][name][5], ranks[0][name][6]
    assert all(s["exchange"] == "natural" for s in stats)
    kb = bs[1] if isinstance(bs, tuple) else bs
    dense = patternc.reference.dense_mask(src, q_len=L, num_heads=H,
                                          **{k: x for k, x in _options(case).items() if k in COMPILE_OPTIONS})
    dense = dense.any(axis=0)  # [L, L]
    row_bytes = Hkv * (DIM + _input_options(case).get("value_dim", DIM + 2)) * 4
    assert sorted(sum(positions, [])) == list(range(L))
    place = np.arange(L) if order is None else np.argsort(order)  # natural position -> place in the order
    for r, s in enumerate(stats):
        own = np.array(positions[r], dtype=np.int64)
        keys = np.nonzero(dense[own].any(axis=0))[0] if own.size else np.zeros(0, dtype=np.int64)
        blocks = np.unique(place[keys] // kb)  # key blocks are blocks of the sharding order
        tokens = {t for b in blocks for t in range(b * kb, min(L, (b + 1) * kb))} - set(place[own].tolist())
        assert s["positions"] == own.size
        assert s["bytes_received_forward"] == len(tokens) * row_bytes, (name, r)
        assert s["kv_bytes_received_forward"] == s["bytes_received_forward"]
        assert s["bytes_sent_backward"] == s["bytes_received_forward"]
        assert s["bytes_received_backward"] == s["bytes_sent_forward"]
        assert s["allgather_bytes"] == (L - own.size) * row_bytes
        assert s["bytes_received_forward"] <= s["allgather_bytes"]
    assert sum(s["bytes_sent_forward"] for s in stats) == sum(s["bytes_received_forward"] for s in stats)


@pytest.mark.parametrize("case", RUNTIME, ids=[c[0] for c in RUNTIME])
def test_runtime_data_equals_single_process(ranks, case):
    """documents / key padding: outputs and grads as one process; bytes = the key blocks that
    hold a key some owned row attends *in this batch* (the oracle with documents, and padding)."""
    name, src, L, H, B, docs, pad = case
    n = RUNTIME.index(case)
    cp = patternc.compile(src, q_len=L, num_heads=H, block_size=32)
    documents, kp = _runtime_data(B, L, docs, pad)
    q, k, v, dout = (x.clone().requires_grad_() for x in _inputs(L, H, H, 50 + n, batch=B))
    out = cp.attention(q, k, v, backend="blocksparse", documents=documents, key_padding_mask=kp)
    (out * dout).sum().backward()
    got = ranks[0][name]
    for what, a, b, tol in zip(("out", "dq", "dk", "dv"), got[:4], (out.detach(), q.grad, k.grad, v.grad),
                               (1e-5, 1e-4, 1e-4, 1e-4)):
        torch.testing.assert_close(a, b, atol=tol, rtol=tol, msg=f"{name}: {what}")
    dense = np.zeros((L, L), dtype=bool)
    for b in range(B):
        row_docs = None if docs is None else [docs[min(b, len(docs) - 1)]]
        m = patternc.reference.dense_mask(src, q_len=L, num_heads=H, documents=row_docs).reshape(-1, L, L).any(axis=0)
        if kp is not None:
            m = m & kp[b].numpy()[None, :]
        dense |= m
    row_bytes = B * H * (DIM + DIM + 2) * 4
    for r, s in enumerate(got[4]):
        own = np.array(got[5][r], dtype=np.int64)
        keys = np.nonzero(dense[own].any(axis=0))[0] if own.size else np.zeros(0, dtype=np.int64)
        tokens = {t for blk in np.unique(keys // 32) for t in range(blk * 32, min(L, blk * 32 + 32))} - set(own.tolist())
        assert s["bytes_received_forward"] == len(tokens) * row_bytes, (name, r)
    assert got[6] == ("per-term" if name.startswith("split") else "natural")
    # the stats describe the call that ran (one natural exchange, this batch's tiles), also on a
    # per-term ContextParallel (they gave its static per-term imbalance)
    kinds = np.asarray(cp.layout_for(documents=documents, key_padding_mask=kp).kinds)
    kinds = kinds if kinds.ndim == 4 else kinds[None]
    per_head = H if kinds.shape[1] == 1 else 1
    tiles = [int((kinds[:, :, np.unique(np.array(got[5][r], dtype=np.int64) // 32)] != 0).sum()) * per_head
             for r in range(len(got[4]))]
    assert [s["computed_tiles"] for s in got[4]] == tiles
    assert all(s["exchange"] == "natural" for s in got[4])
    assert got[4][0]["imbalance"] == round(max(tiles) * len(tiles) / sum(tiles), 4)


def test_nn_layers_context_parallel(ranks):
    model = _nn_model()
    x, g = _nn_inputs()
    kp = _nn_padding()
    y = model[2](model[1](model[0](x, key_padding_mask=kp), key_padding_mask=kp))
    (y * g).sum().backward()
    y_cp, grads, exchange = ranks[0]["nn"]
    assert exchange == "per-term"  # for_pattern keeps the rows and still exchanges per term
    torch.testing.assert_close(y_cp, y.detach(), atol=1e-5, rtol=1e-5)
    for (name, p), got in zip(model.named_parameters(), grads):
        torch.testing.assert_close(got, p.grad, atol=1e-4, rtol=1e-4, msg=name)


def test_per_term_exchange_moves_the_hand_count(ranks):
    """(local(w=32) | strided(s=32)) & causal, 1024 tokens, 4 ranks, blocks of 32: the plan is
    local in natural order + the rest of strided in residue order (32 classes of 32 tokens, one
    block each). Rows: 256 contiguous tokens per rank; rank r computes residue classes 8r..8r+7,
    each holding 8 tokens of every rank. Per rank r: it receives 3 * 64 = 192 queries and 192
    keys/values of its classes, the partial outputs (+ log-sum-exp) of its 192 rows in other
    ranks' classes, and (r > 0) a halo of one 32-token key block for the local term."""
    stats = ranks[0]["split4"][4]
    cp = patternc.compile("(local(w=32) | strided(s=32)) & causal", q_len=1024, block_size=32)
    assert [str(t.q_order) for t in cp.plan.terms] == ["natural", "residue mod 32"]
    D, Dv = DIM, DIM + 2
    for r, s in enumerate(stats):
        halo = 32 if r else 0
        assert s["exchange"] == "per-term" and s["positions"] == 256
        assert s["kv_bytes_received_forward"] == (192 + halo) * (D + Dv) * 4, r
        assert s["bytes_received_forward"] == (192 * D + (192 + halo) * (D + Dv) + 192 * (Dv + 1)) * 4, r
        assert s["allgather_bytes"] == 768 * (D + Dv) * 4
        # backward: merged out + dout + lse of the 192 rows in, dq of 192 own rows back, dk/dv of
        # 192 + halo own keys back
        read_by_next = 32 if r < 3 else 0  # the next rank's halo: its dk, dv come back
        assert s["bytes_received_backward"] == (192 * (2 * Dv + 1) + 192 * D + (192 + read_by_next) * (D + Dv)) * 4, r
    assert stats[0]["imbalance"] <= 1.05


def test_a_per_term_choice_holds_at_its_own_shapes(ranks):
    kept = {c[0]: ranks[0][c[0]][9] for c in CASES}
    assert all(x in (None, True) for x in kept.values()), kept
    assert any(x is True for x in kept.values())  # some case chose per term by itself


def test_grouped_query_heads_weigh_the_per_term_choice(ranks):
    """Per-term exchange moves queries and partial outputs with H = 8 heads and keys with
    H_kv = 1: there it received 2.35x the all-gather. With kv_heads=1 the natural exchange is
    chosen at construction; without, every call checks its real shapes, runs the natural
    exchange and says so (W030); either way no rank receives more than an all-gather."""
    hinted, unhinted = ranks[0]["gqasplit4"], ranks[0]["gqaunhinted4"]
    assert hinted[7] == "natural" and not any("W030" in m for m in hinted[8])
    assert unhinted[7] == "per-term"  # as configured for H_kv = H ...
    assert [s["exchange"] for s in unhinted[4]] == ["natural"] * 4  # ... but the call ran the natural one
    assert any("W030" in m and "kv_heads=1" in m for m in unhinted[8])
    for st in (hinted[4], unhinted[4]):
        assert all(s["bytes_received_forward"] <= s["allgather_bytes"] for s in st)
    # the stats' imbalance is that of the exchange that ran: the rows were balanced for per-term
    tiles = [s["computed_tiles"] for s in unhinted[4]]
    assert unhinted[4][0]["imbalance"] == round(max(tiles) * 4 / sum(tiles), 4)


@pytest.mark.parametrize("name", PER_TERM)
def test_per_term_bytes_balance(ranks, name):
    stats = ranks[0][name][4]
    assert all(s["exchange"] == "per-term" for s in stats)
    for a, b in (("bytes_sent_forward", "bytes_received_forward"), ("bytes_sent_backward", "bytes_received_backward")):
        assert sum(s[a] for s in stats) == sum(s[b] for s in stats) > 0


def test_ranks_that_disagree_on_shapes_get_a_diagnostic(ranks):
    cp = patternc.compile("local(w=16) & causal", q_len=128, num_heads=1, block_size=32)
    want = cp.attention(*_inputs(128, 1, 1, 3)[:3], backend="blocksparse")
    for r in range(4):
        message, alone, out = ranks[r]["mismatch"]
        assert message is not None and "P350" in message and "different B" in message, (r, message)
        assert alone is not None and "P350" in alone, (r, alone)
        assert ("rank 1 owns 32 positions" if r == 1 else "another rank's call") in alone, (r, alone)
        torch.testing.assert_close(out, want, atol=1e-5, rtol=1e-5)


def test_unshard_is_differentiable(ranks):
    src, L, H = UNSHARD
    cp = patternc.compile(src, q_len=L, num_heads=H, block_size=32)
    want = _single(cp, *_inputs(L, H, H, 77))
    for what, a, b in zip(("out", "dq", "dk", "dv"), ranks[0]["unshard"], want):
        torch.testing.assert_close(a, b, atol=1e-4, rtol=1e-4, msg=what)


def test_residue_order_exchanges_nothing(ranks):
    stats, order = ranks[0]["residue4"][4], ranks[0]["residue4"][6]
    assert order is not None  # the plan's residue order: position x at place (x mod 32) * 32 + x // 32
    assert order[:3] == [0, 32, 64]
    assert all(s["bytes_received_forward"] == 0 and s["bytes_sent_backward"] == 0 for s in stats)
    assert all(s["computed_tiles"] > 0 for s in stats)


def test_idle_ranks_participate(ranks):
    stats = ranks[0]["idle4"][4]
    assert [s["positions"] for s in stats].count(0) == 2
    stats = ranks[0]["prefix4"][4]
    assert sum(s["computed_tiles"] == 0 for s in stats) >= 2  # ranks whose rows attend nothing


# ---- the schedule, without processes ---------------------------------------------------------
def _schedule(src, balance, world=4, seq_len=16384, heads=4, block=128):
    cp = patternc.compile(src, q_len=seq_len, num_heads=heads, block_size=block)
    return bal.make_schedule(cp.layout.kinds, world=world, seq_len=seq_len, q_block_size=block,
                             kv_block_size=block, balance=balance)


def test_contiguous_causal_is_one_and_three_quarters_imbalanced():
    # 128 query blocks, row b computes b + 1 tiles: the last quarter has (97 + 128) * 32 / 2 of 8256 / 4
    s = _schedule("causal", "contiguous", heads=1)
    assert s.tiles.tolist() == [528, 1552, 2576, 3600]
    assert s.imbalance == pytest.approx(3600 / 2064)


@pytest.mark.parametrize("src", ["causal", "local(w=512) & causal", "(local(w=128) | strided(s=128)) & causal",
                                 "fixed(l=256, c=16) & causal", "heads(causal, local(w=256))"])
def test_tiles_balance_any_pattern(src):
    s = _schedule(src, "tiles")
    assert s.imbalance <= 1.05
    cp = patternc.compile(src, q_len=16384, num_heads=4)
    assert int(s.tiles.sum()) == int((cp.layout.kinds != 0).sum())


def test_local_moves_a_halo():
    s = _schedule("local(w=512) & causal", "tiles")
    assert s.method.startswith("contiguous")
    for r in range(1, 4):  # w - 1 = 511 keys before the first row, rounded up to whole blocks
        assert s.received_positions()[r] == 512
    assert s.received_positions()[0] == 0


def test_schedule_at_ragged_lengths_covers_every_position():
    for n in (1, 127, 129, 1000, 4097):
        s = _schedule("local(w=100) & causal", "tiles", seq_len=n, heads=1)
        assert np.array_equal(np.sort(np.concatenate(s.positions)), np.arange(n))


def test_bad_balance():
    with pytest.raises(ValueError, match="balance"):
        _schedule("causal", "zigzag", seq_len=256)


# ---- in this process: errors and a group of one ------------------------------------------------
def test_needs_a_process_group():
    from patternc.distributed import ContextParallel

    if dist.is_initialized():  # pragma: no cover
        pytest.skip("a process group is already initialised in this process")
    cp = patternc.compile("causal", q_len=64, block_size=16)
    with pytest.raises(patternc.PatternError, match=r"P380.*process group"):
        ContextParallel(cp)


def test_group_of_one(tmp_path):
    from patternc.distributed import ContextParallel

    if dist.is_initialized():  # pragma: no cover
        pytest.skip("a process group is already initialised in this process")
    dist.init_process_group("gloo", init_method=f"file://{tmp_path / 'store'}", rank=0, world_size=1)
    try:
        cp = patternc.compile("local(w=20) & causal", q_len=100, num_heads=2, block_size=16)
        ctx = ContextParallel(cp)
        q, k, v, dout = _inputs(100, 2, 2, 7)
        assert torch.equal(ctx.shard(q), q)
        out = ctx.attention(q, k, v)
        torch.testing.assert_close(out, cp.attention(q, k, v, backend="blocksparse"), atol=1e-6, rtol=1e-6)
        assert ctx.stats["bytes_received_forward"] == 0 and ctx.stats["allgather_bytes"] == 0
        with pytest.raises(patternc.PatternError, match=r"P381.*100 tokens"):
            ctx.shard(q[:, :, :50])
        with pytest.raises(patternc.PatternError, match="P381"):
            ctx.unshard(out[:, :, :3])
        with pytest.raises(patternc.PatternError, match="P350"):
            ctx.attention(q[:, :, :50], k, v)
        with pytest.raises(patternc.PatternError, match="P380.*KV_LEN"):
            ContextParallel(patternc.compile("causal", q_len=64, kv_len=80))
        with pytest.raises(patternc.PatternError, match="P380.*per-term"):  # a one-term plan
            ContextParallel(cp, exchange="per-term")
        with pytest.raises(patternc.PatternError, match="P380.*takes a compiled pattern, got str"):
            ContextParallel("local(w=20) & causal")  # was an AttributeError
        with pytest.raises(patternc.PatternError, match="P380.*exchange must be"):
            ContextParallel(cp, exchange="ring")
        # a score term on one rank: ALiBi at the compile's positions
        cpa = patternc.compile("(local(w=20) & causal) with alibi(max_bias=8)", q_len=100, num_heads=2,
                               block_size=16, q_offset=30, kv_offset=30)
        torch.testing.assert_close(ContextParallel(cpa).attention(q, k, v),
                                   cpa.attention(q, k, v, backend="blocksparse"), atol=1e-6, rtol=1e-6)
    finally:
        dist.destroy_process_group()


# ---- `patternc run --nproc N` -----------------------------------------------------------------
def test_run_nproc_prints_the_per_rank_table_and_checks(capsys):
    from patternc.cli import main

    code = main(["run", "-e", "local(w=40) & causal", "--seq-len", "300", "--heads", "2", "--head-dim", "8",
                 "--block-size", "32", "--nproc", "2", "--repeats", "1", "--check"])
    out = capsys.readouterr().out
    assert code == 0, out
    lines = out.splitlines()
    head = next(i for i, line in enumerate(lines) if line.split()[:2] == ["rank", "positions"])
    rows = [line.split() for line in lines[head + 1:head + 3]]
    assert [r[0] for r in rows] == ["0", "1"]
    assert sum(int(r[1]) for r in rows) == 300
    cp = patternc.compile("local(w=40) & causal", q_len=300, num_heads=2, block_size=32)
    assert sum(int(r[3]) for r in rows) == int((cp.layout.kinds != 0).sum())
    assert "check vs the single-process result" in out and "ok)" in out
    assert "computed tiles max/mean" in out and "all-gather" in out


@pytest.mark.parametrize("argv, message", [
    (["--kv-len", "200"], "--kv-len 200 must equal --seq-len 300"),
    (["--backend", "sdpa"], "--backend sdpa"),
    (["--nproc", "0"], "--nproc must be >= 1"),
])
def test_run_nproc_usage_errors(capsys, argv, message):
    from patternc.cli import main

    base = ["run", "-e", "causal", "--seq-len", "300", "--heads", "1", "--head-dim", "8", "--nproc", "2"]
    code = main(base + argv)
    assert code == 2
    assert message in capsys.readouterr().err


def test_run_nproc_takes_the_plan(capsys):
    """--plan reaches every worker's ContextParallel (it was ignored: a one-term plan in residue
    order stayed in residue order under --plan natural)."""
    import json

    from patternc.cli import main

    code = main(["run", "-e", "strided(s=16) & causal", "--seq-len", "256", "--heads", "1", "--head-dim", "8",
                 "--block-size", "32", "--nproc", "2", "--repeats", "1", "--plan", "natural", "--check", "--json"])
    res = json.loads(capsys.readouterr().out)
    assert code == 0, res
    assert [r["order"] for r in res["ranks"]] == ["natural", "natural"]
    assert res["exchange"] == "natural"
    assert res["ranks"][0]["positions"] + res["ranks"][1]["positions"] == 256
    assert res["ranks"][1]["bytes_received_forward"] > 0  # natural order: strided rows read earlier blocks


def test_run_nproc_with_documents(capsys):
    """--documents reach every worker (they were refused: the workers ran without them); the
    check compares with the single-process result with the same documents."""
    from patternc.cli import main

    argv = ["run", "-e", "document & (sink(n=4) | local(w=30)) & causal", "--documents", "100,57,143",
            "--heads", "2", "--head-dim", "8", "--block-size", "32", "--nproc", "2", "--repeats", "1", "--check",
            "--json"]
    code = main(argv)
    out = capsys.readouterr().out
    assert code == 0, out
    import json

    got = json.loads(out)
    assert got["check_passed"] and got["rel_error"] <= 1e-5 and got["documents"] == [100, 57, 143]
    # the ranks computed exactly this batch's tiles (the layout with the documents), not the static one's
    cp = patternc.compile("document & (sink(n=4) | local(w=30)) & causal", q_len=300, num_heads=2, block_size=32)
    assert sum(r["computed_tiles"] for r in got["ranks"]) == int(
        (cp.layout_for(documents=[[100, 57, 143]]).kinds != 0).sum())
    # a pattern that uses `document` without --documents: P360, exit 1 (before any worker starts)
    assert main(argv[:3] + ["--seq-len", "300"] + argv[5:-2]) == 1
    assert "P360" in capsys.readouterr().err


# ---- nccl (GPU): the same code on CUDA tensors; skipped without CUDA ------------------------------
def _nccl_worker(rank, world):
    from patternc.distributed import ContextParallel

    dev = torch.device("cuda", torch.cuda.current_device())
    out = {}
    for name, src, L, exchange in NCCL_CASES:
        cp = patternc.compile(src, q_len=L, num_heads=2, block_size=32)
        ctx = ContextParallel(cp, exchange=exchange)
        q, k, v, dout = (x.to(dev) for x in _inputs(L, 2, 2, 5))
        ql, kl, vl = (ctx.shard(x).requires_grad_() for x in (q, k, v))
        o = ctx.attention(ql, kl, vl)
        (o * ctx.shard(dout)).sum().backward()
        out[name] = [ctx.unshard(t).cpu() for t in (o, ql.grad, kl.grad, vl.grad)]
    return out


NCCL_CASES = [("local", "local(w=40) & causal", 300, "auto"),
              ("split", "(local(w=40) | strided(s=32)) & causal", 1000, "per-term")]


def test_nccl_equals_single_process():
    if not torch.cuda.is_available() or not dist.is_nccl_available():
        pytest.skip("nccl needs CUDA")
    from patternc.distributed.launch import spawn

    world = min(2, torch.cuda.device_count())
    got = spawn(_nccl_worker, world, timeout=300, backend="nccl")
    for name, src, L, _ in NCCL_CASES:
        cp = patternc.compile(src, q_len=L, num_heads=2, block_size=32)
        want = _single(cp, *(x.cuda() for x in _inputs(L, 2, 2, 5)))
        for what, a, b in zip(("out", "dq", "dk", "dv"), got[0][name], want):
            torch.testing.assert_close(a, b.cpu(), atol=1e-4, rtol=1e-4, msg=f"{name}: {what}")
