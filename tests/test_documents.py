"""Packed documents (SPEC §1.7): the ``document`` primitive with run-time ``documents``.

Expected values come from the oracle ``patternc.reference.dense_mask(…, documents=…)``
(written from the SPEC), FlexAttention's ``create_block_mask`` of the batched ``mask_mod`` and
the float64 reference attention.
"""

from __future__ import annotations

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

import patternc
from patternc.compiler import block_offset_unit
from patternc.errors import PatternError
from patternc.ir.nodes import And, Not, Or, Prim
from patternc.ir.normalize import normalize
from patternc.lower.layout import BlockLayout
from patternc.reference import dense_mask
from strategies import patterns

DOC = Prim("document")


@st.composite
def doc_ids(draw, P: int, rows: int):
    """int64 [rows, P]: random run lengths; ids distinct per run, or (sometimes) repeated."""
    out = []
    repeat = draw(st.booleans())
    for _ in range(rows):
        ids, k = [], 0
        while len(ids) < P:
            n = draw(st.integers(1, max(1, P // 2)))
            ids += [(k % 3) if repeat else k] * n
            k += 1
        out.append(ids[:P])
    return np.array(out, dtype=np.int64)


@st.composite
def doc_cases(draw):
    p = draw(patterns(max_leaves=4))
    q = draw(patterns(max_leaves=2))
    shape = draw(st.sampled_from(["and", "or", "not", "mix"]))
    full = {"and": And((DOC, p)), "or": Or((DOC, p)), "not": And((Not(DOC), p)),
            "mix": Or((And((DOC, p)), q))}[shape]
    return draw(runtime_case(normalize(full), [1, 37, 97, 130], [64, 130], [16, (16, 32)]))


@st.composite
def runtime_case(draw, full, q_exts, kv_exts, block_sizes):
    """``(full, q_ext, kv_ext, q_offset, kv_offset, ids, block_size, H)``: position extents,
    offsets in multiples of the pattern's block unit, document ids for 1-2 rows."""
    q_ext = draw(st.sampled_from(q_exts))
    kv_ext = draw(st.sampled_from([q_ext, *kv_exts]))
    unit = block_offset_unit(full)
    qo = unit * draw(st.integers(0, max(0, (q_ext - 1) // unit)))
    ko = unit * draw(st.integers(0, max(0, (kv_ext - 1) // unit)))
    rows = draw(st.integers(1, 2))
    ids = draw(doc_ids(max(q_ext, kv_ext) + draw(st.integers(0, 3)), rows))
    bs = draw(st.sampled_from(block_sizes))
    H = draw(st.integers(1, 2))
    return full, q_ext, kv_ext, qo, ko, ids, bs, H


def oracle_and_compile(case):
    """``(ref, cp)`` of a ``runtime_case``: the mask oracle's bool ``[B, H, Q_LEN, KV_LEN]`` for
    its document ids and the compiled pattern."""
    p, q_ext, kv_ext, qo, ko, ids, bs, H = case
    Q, K = q_ext - qo, kv_ext - ko
    ref = dense_mask(p, q_len=Q, kv_len=K, num_heads=H, q_offset=qo, kv_offset=ko, documents=ids)
    return ref, patternc.compile(p, q_len=Q, kv_len=K, num_heads=H, block_size=bs, q_offset=qo, kv_offset=ko)


def check_layout_for_documents(case):
    """``cp.layout_for(documents=ids)`` and ``cp.dense_mask(documents=ids)`` of a ``runtime_case``
    against the oracle, tile by tile (also for ``per_document``: tests/test_per_document.py)."""
    ids, bs = case[5], case[6]
    ref, cp = oracle_and_compile(case)
    lay = cp.layout_for(documents=ids)
    lay.check_invariants()
    if not cp.needs:  # the normaliser removed `document` (e.g. `document | all`): ids are ignored
        assert lay is cp.layout and all(np.array_equal(cp.dense_mask(), r) for r in ref)
        return
    assert cp.needs == {"documents"}
    for b in range(ids.shape[0]):
        assert np.array_equal(lay.kinds[b], BlockLayout.from_dense(ref[b], bs).kinds)
        # the static layout is an upper bound: no tile it calls EMPTY has a pair
        assert not ((lay.kinds[b] != 0) & (cp.layout.kinds == 0)).any()
    assert np.array_equal(cp.dense_mask(documents=ids), ref)


@settings(max_examples=40, deadline=None)
@given(doc_cases())
def test_layout_for_documents_matches_the_oracle(case):
    check_layout_for_documents(case)


@settings(max_examples=20, deadline=None)
@given(doc_cases(), st.integers(0, 2**31))
def test_documents_with_key_padding_match_the_oracle(case, seed):
    ids, bs = case[5], case[6]
    B, K = ids.shape[0], case[2] - case[4]
    kp = np.random.default_rng(seed).random((B, K)) > 0.4
    ref, cp = oracle_and_compile(case)
    ref = ref & kp[:, None, None, :]
    lay = cp.layout_for(documents=ids, key_padding_mask=kp)
    for b in range(B):
        if lay.batch is None:
            break
        assert np.array_equal(lay.kinds[b], BlockLayout.from_dense(ref[b], bs).kinds)


def test_lengths_and_ids_are_the_same_documents():
    cp = patternc.compile("document & causal", q_len=12, block_size=4)
    by_len = cp.dense_mask(documents=[[5, 4, 3]])
    by_ids = cp.dense_mask(documents=np.array([7] * 5 + [1] * 4 + [9] * 3))
    assert np.array_equal(by_len[0], by_ids[0])
    assert by_len[0, 0, 5, 4] == 0 and by_len[0, 0, 5, 5] == 1


def test_two_runs_with_one_id_are_one_document():
    # `document` compares ids: runs 0 and 2 share id 1, so position 9 may attend position 0
    ids = np.array([1, 1, 1, 2, 2, 2, 1, 1, 1, 1])
    cp = patternc.compile("document & causal", q_len=10, block_size=4)
    m = cp.dense_mask(documents=ids)[0, 0]
    assert m[9, 0] and not m[9, 4] and not m[4, 0]
    assert np.array_equal(m, dense_mask("document & causal", q_len=10, documents=ids)[0])


@pytest.mark.parametrize("src", ["document & local(w=24) & causal", "per_document(sink(n=4) | local(w=24)) & causal"])
def test_block_mask_equals_create_block_mask(src):
    torch = pytest.importorskip("torch")
    from torch.nn.attention.flex_attention import create_block_mask

    Q = 232
    ids = np.stack([np.repeat(np.arange(4), [50, 100, 2, 80]), np.repeat(np.arange(3), [97, 130, 5])])
    cp = patternc.compile(src, q_len=Q, num_heads=2, block_size=32)
    mine = cp.block_mask(documents=torch.from_numpy(ids))
    ref = create_block_mask(cp.mask_mod_for(documents=ids), 2, 2, Q, Q, device="cpu", BLOCK_SIZE=32)
    assert torch.equal(mine.kv_num_blocks, ref.kv_num_blocks)
    assert torch.equal(mine.full_kv_num_blocks, ref.full_kv_num_blocks)
    for name, num in (("kv_indices", "kv_num_blocks"), ("full_kv_indices", "full_kv_num_blocks")):
        a, r, n = getattr(mine, name), getattr(ref, name), getattr(mine, num)
        for idx in np.ndindex(*n.shape):
            c = int(n[idx])
            assert sorted(a[idx][:c].tolist()) == sorted(r[idx][:c].tolist())


@pytest.mark.parametrize("src", ["document & (local(w=16) | sink(n=2)) & causal",
                                 "per_document(sink(n=3) | local(w=16)) & causal"])
@pytest.mark.parametrize("backend", ["blocksparse", "sdpa"])
def test_attention_with_documents_forward_and_backward(backend, src):
    torch = pytest.importorskip("torch")
    from patternc.execute.reference import reference_attention

    Q, H, D = 130, 2, 8
    lens = [[40, 60, 30], [1, 129]]
    cp = patternc.compile(src, q_len=Q, num_heads=H, block_size=32)
    g = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(2, H, Q, D, generator=g, dtype=torch.float64, requires_grad=True) for _ in range(3))
    out = cp.attention(q, k, v, documents=lens, backend=backend)
    mask = dense_mask(src, q_len=Q, num_heads=H, documents=lens)
    ref = torch.cat([reference_attention(q[b:b + 1], k[b:b + 1], v[b:b + 1], mask[b]) for b in range(2)])
    torch.testing.assert_close(out, ref, rtol=1e-9, atol=1e-9)
    gout = torch.randn_like(out)
    for a, r in zip(torch.autograd.grad(out, (q, k, v), gout), torch.autograd.grad(ref, (q, k, v), gout)):
        torch.testing.assert_close(a, r, rtol=1e-8, atol=1e-8)


def test_flex_forward_with_documents():
    torch = pytest.importorskip("torch")
    from patternc.execute.reference import reference_attention

    src, Q, H, D = "document & causal", 130, 2, 16
    ids = np.repeat(np.arange(3), [64, 30, 36])
    cp = patternc.compile(src, q_len=Q, num_heads=H, block_size=32)
    g = torch.Generator().manual_seed(1)
    q, k, v = (torch.randn(2, H, Q, D, generator=g) for _ in range(3))
    with torch.no_grad():
        out = cp.attention(q, k, v, documents=torch.from_numpy(ids), backend="flex")
    mask = dense_mask(src, q_len=Q, num_heads=H, documents=ids)
    ref = reference_attention(q, k, v, mask)
    torch.testing.assert_close(out.double(), ref, rtol=2e-5, atol=2e-5)


def test_missing_and_bad_documents_are_clear_errors():
    cp = patternc.compile("document & causal", q_len=16, block_size=8)
    with pytest.raises(PatternError) as e:
        cp.layout_for()
    assert e.value.diagnostic.code == "P360" and "help:" in str(e.value)
    with pytest.raises(PatternError) as e:
        cp.dense_mask()
    assert e.value.diagnostic.code == "P360"
    bad = [
        (np.zeros(10, dtype=np.int64), "covers 10 positions"),
        (np.zeros(16, dtype=np.float32), "integer ids"),
        (np.zeros((2, 2, 16), dtype=np.int64), "expected [B, P] or [P]"),
        ([[8, 4], [8, 8]], "sum to different totals"),
        ([[8, 0, 8]], ">= 1 token"),
        ([[8, 4]], "covers 12 positions"),
    ]
    for docs, needle in bad:
        with pytest.raises(PatternError) as e:
            cp.layout_for(documents=docs)
        assert e.value.diagnostic.code == "P361" and needle in str(e.value), (docs, str(e.value))


def test_document_inside_blocks_is_refused():
    with pytest.raises(PatternError) as e:
        patternc.compile("blocks(4, document)", q_len=16)
    assert e.value.diagnostic.code == "P302"


def test_layout_for_documents_scales_with_tiles_not_tokens():
    # 32k tokens, 200 documents: no Q_LEN x KV_LEN work (this would need 1 GiB of booleans)
    rng = np.random.default_rng(0)
    cuts = np.sort(rng.choice(np.arange(1, 32768), 199, replace=False))
    lens = np.diff(np.concatenate([[0], cuts, [32768]])).tolist()
    cp = patternc.compile("document & local(w=1024) & causal", q_len=32768, block_size=128)
    lay = cp.layout_for(documents=[lens])
    assert lay.kinds.shape == (1, 1, 256, 256)
    # spot-check the tiles on the first document boundary against the oracle at token level
    b0 = lens[0]
    a = b0 // 128
    ids = np.repeat(np.arange(len(lens)), lens)
    rows = np.arange(a * 128, min((a + 1) * 128, 32768))
    for c in range(max(0, a - 9), a + 1):
        cols = np.arange(c * 128, (c + 1) * 128)
        m = (ids[rows][:, None] == ids[cols][None, :]) & (cols[None, :] <= rows[:, None]) \
            & (rows[:, None] - cols[None, :] < 1024)
        want = 2 if m.all() else (0 if not m.any() else 1)
        assert lay.kinds[0, 0, a, c] == want


def _cli(capsys, *argv):
    from patternc.cli import main

    code = main(list(argv))
    out, err = capsys.readouterr()
    return code, out, err


def test_cli_run_with_documents_checks_against_the_reference(capsys):
    import json

    code, out, err = _cli(capsys, "run", "-e", "document & local(w=64) & causal", "--documents", "100,300,24",
                          "--heads", "2", "--head-dim", "16", "--check", "--repeats", "1", "--json")
    assert code == 0, err
    obj = json.loads(out)
    assert obj["check_passed"] and obj["shape"]["q_len"] == 424 and obj["documents"] == [100, 300, 24]


def test_cli_documents_set_the_length_and_a_different_one_is_a_usage_error(capsys):
    import json

    code, out, _ = _cli(capsys, "compile", "-e", "document & causal", "--documents", "40,24", "--block-size", "16",
                        "--json")
    assert code == 0
    obj = json.loads(out)
    ref = dense_mask("document & causal", q_len=64, documents=[[40, 24]])[0]
    lay = BlockLayout.from_dense(ref, 16)
    assert obj["q_len"] == 64 and obj["needs"] == ["documents"]
    assert obj["document_blocks"]["partial_blocks"] == lay.partial_blocks
    assert obj["document_blocks"]["full_blocks"] == lay.full_blocks
    code, _, err = _cli(capsys, "compile", "-e", "document & causal", "--documents", "40,24", "--seq-len", "60")
    assert code == 2 and "differs from the sum" in err
    code, _, err = _cli(capsys, "run", "-e", "document & causal", "--seq-len", "16", "--heads", "1", "--head-dim",
                        "8", "--repeats", "1")
    assert code == 1 and "P360" in err
    code, out, _ = _cli(capsys, "check", "-e", "document & causal")
    assert code == 0 and "needs: documents" in out
    code, out, _ = _cli(capsys, "show", "-e", "document & causal", "--documents", "3,5", "--ascii")
    assert code == 0 and "starting at positions 0, 3" in out and "\n3>...#" in out


@pytest.mark.parametrize("name", ["packed_documents.pattern", "packed_streaming_llm.pattern"])
def test_packed_documents_example(capsys, name):
    """examples/packed_*.pattern: header, check, and its `# documents:` claim compiled against
    the oracle (exact per-row layout) and run against the float64 reference."""
    import re
    from pathlib import Path

    torch = pytest.importorskip("torch")
    from patternc.execute.reference import reference_attention

    path = Path(__file__).resolve().parent.parent / "examples" / name
    text = path.read_text()
    assert "Source:" in text and "Convention:" in text
    claim = re.search(r"^# documents: (?P<lens>[\d,]+)(?P<rest>.*)$", text, re.M)
    lens = [int(x) for x in claim["lens"].split(",")]
    params = {k: int(v) for k, v in re.findall(r"(\w+)=(\d+)", claim["rest"])}
    p = patternc.load(path, params=params)
    code, out, _ = _cli(capsys, "check", str(path))
    assert code == 0 and "needs: documents" in out
    n = sum(lens)
    cp = patternc.compile(p, q_len=n, num_heads=2, block_size=32)
    ref = dense_mask(p, q_len=n, num_heads=2, documents=[lens])
    assert np.array_equal(cp.layout_for(documents=[lens]).kinds[0], BlockLayout.from_dense(ref[0], 32).kinds)
    g = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(1, 2, n, 8, generator=g, dtype=torch.float64) for _ in range(3))
    torch.testing.assert_close(cp.attention(q, k, v, documents=[lens]), reference_attention(q, k, v, ref[0]),
                               rtol=1e-9, atol=1e-9)


def test_documents_from_position_ids():
    from patternc.lower.runtime import documents_from_positions

    pos = np.array([[0, 1, 2, 0, 1, 0, 1, 2], [5, 6, 7, 8, 0, 1, 2, 3]])
    ids = documents_from_positions(pos)
    assert ids.tolist() == [[0, 0, 0, 1, 1, 2, 2, 2], [0, 0, 0, 0, 1, 1, 1, 1]]
    cp = patternc.compile("document & causal", q_len=8, block_size=4)
    want = dense_mask("document & causal", q_len=8, documents=[[3, 2, 3], [4, 4]])
    assert np.array_equal(cp.dense_mask(documents=ids), want)
