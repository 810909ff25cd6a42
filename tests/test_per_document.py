"""``per_document(p)`` (SPEC §1.1, §1.7): ``p`` inside each packed document, in the document's
own coordinates and length.

Expected values come from the oracle ``patternc.reference.dense_mask(…, documents=…)`` (written
from the SPEC), FlexAttention's ``create_block_mask`` of the batched ``mask_mod``, the float64
reference attention, and hand counts.
"""

from __future__ import annotations

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

import patternc
from patternc.errors import PatternError
from patternc.ir.nodes import And, Not, Or, PerDocument, Prim
from patternc.ir.normalize import normal_form_problems, normalize
from patternc.lower.layout import BlockLayout
from patternc.reference import dense_mask
from strategies import patterns
from test_documents import check_layout_for_documents, oracle_and_compile, runtime_case

DOC = Prim("document")
CAUSAL = Prim("causal")


@st.composite
def per_document_cases(draw):
    inner = draw(patterns(max_leaves=3, block_max=4))
    outer = draw(patterns(max_leaves=2, block_max=4))
    x = PerDocument(inner)
    shape = draw(st.sampled_from(["bare", "causal", "or", "not", "doc", "mix"]))
    full = {"bare": x, "causal": And((x, CAUSAL)), "or": Or((x, outer)), "not": And((Not(x), outer)),
            "doc": Or((And((DOC, outer)), x)), "mix": And((Or((x, outer)), CAUSAL))}[shape]
    return draw(runtime_case(normalize(full), [1, 23, 37, 70], [29, 70], [8, (8, 16)]))


@settings(max_examples=40, deadline=None)
@given(per_document_cases())
def test_layout_and_dense_mask_match_the_oracle(case):
    check_layout_for_documents(case)


@settings(max_examples=15, deadline=None)
@given(per_document_cases(), st.integers(0, 2**31))
def test_key_padding_and_mask_mod_match_the_oracle(case, seed):
    torch = pytest.importorskip("torch")
    ids, bs, H = case[5], case[6], case[7]
    B, Q, K = ids.shape[0], case[1] - case[3], case[2] - case[4]
    kp = np.random.default_rng(seed).random((B, K)) > 0.3
    ref, cp = oracle_and_compile(case)
    if not cp.needs:
        return
    lay = cp.layout_for(documents=ids, key_padding_mask=kp)
    mm = cp.mask_mod_for(documents=ids)
    for b in range(B):
        assert np.array_equal(lay.kinds[b], BlockLayout.from_dense(ref[b] & kp[b], bs).kinds)
        for h in range(H):
            got = mm(torch.tensor(b), torch.tensor(h), torch.arange(Q)[:, None], torch.arange(K)[None, :])
            assert np.array_equal(got.numpy(), ref[b, h])


def test_every_document_gets_its_own_sinks():
    # SPEC §1.1's example, counted by hand: documents of 6 and 5 tokens, sinks n=2, window 2
    src = "per_document(sink(n=2) | local(w=2)) & causal"
    m = patternc.compile(src, q_len=11, block_size=4).dense_mask(documents=[[6, 5]])[0, 0]
    assert m[10].tolist() == [False] * 6 + [True, True, False, True, True]  # sinks 6, 7; window 9, 10
    assert m[5].tolist() == [True, True, False, False, True, True] + [False] * 5
    assert int(m.sum()) == sum(min(r + 1, 2 + 2) if r >= 2 else r + 1 for r in range(6)) + \
        sum(min(r + 1, 2 + 2) if r >= 2 else r + 1 for r in range(5))
    assert np.array_equal(m, dense_mask(src, q_len=11, documents=[[6, 5]])[0, 0])


def test_two_runs_with_one_id_are_two_documents():
    # `per_document` reads runs: ids [1,1,1,2,2,1,1,1] are three documents (`document`: two)
    ids = np.array([1, 1, 1, 2, 2, 1, 1, 1])
    per = patternc.compile("per_document(all) & causal", q_len=8, block_size=4).dense_mask(documents=ids)[0, 0]
    doc = patternc.compile("document & causal", q_len=8, block_size=4).dense_mask(documents=ids)[0, 0]
    assert doc[7, 0] and not per[7, 0] and per[7, 5]
    assert np.array_equal(per, dense_mask("per_document(all) & causal", q_len=8, documents=ids)[0])


def test_lengths_inside_are_the_documents_lengths():
    # q_len inside per_document is each document's length: a window of half the document
    m = patternc.compile("per_document(local(w=max(1, q_len // 2)))", q_len=12, block_size=4).dense_mask(
        documents=[[8, 4]])[0, 0]
    assert m[0, 3] and not m[0, 4]  # document of 8: w = 4
    assert m[8, 9] and not m[8, 10]  # document of 4: w = 2
    with pytest.raises(PatternError) as e:  # a document of 1 token gives w = 0
        patternc.compile("per_document(local(w=q_len // 2))", q_len=4).layout_for(documents=[[3, 1]])
    assert e.value.diagnostic.code == "P301" and "document of 1 tokens" in str(e.value)


def test_offsets_are_positions():
    # SPEC §1.6: the rows of a decode step equal the rows of the whole compile
    src, lens = "per_document(sink(n=4) | local(w=8)) & causal", [[30, 20, 14]]
    full = patternc.compile(src, q_len=64, block_size=16)
    step = patternc.compile(src, q_len=1, kv_len=64, q_offset=63, block_size=16)
    chunk = patternc.compile(src, q_len=16, kv_len=40, q_offset=40, kv_offset=24, block_size=8)
    whole = full.dense_mask(documents=lens)[0, 0]
    assert np.array_equal(step.dense_mask(documents=lens)[0, 0], whole[63:64])
    assert np.array_equal(chunk.dense_mask(documents=lens)[0, 0], whole[40:56, 24:64])


def test_canonical_text_and_normalisation():
    cases = {
        "per_document(local(w=3)) & per_document(sink(n=2))": "per_document(local(w=3) & sink(n=2))",
        "per_document(per_document(causal) & document)": "per_document(causal)",
        "document & per_document(causal)": "per_document(causal)",
        "per_document(none) | causal": "causal",
        "per_document(local(w=q_len // 2))": "per_document(local(w=q_len // 2))",
    }
    for src, want in cases.items():
        p = patternc.parse(src)
        assert str(p) == want
        assert patternc.parse(str(p)) == p
        assert not normal_form_problems(p)
    for src in cases:  # every rewrite keeps the predicate (oracle on the unnormalised text)
        ids = np.repeat(np.arange(3), [5, 2, 6])
        want = dense_mask(src, q_len=13, documents=ids)
        got = patternc.compile(src, q_len=13, block_size=4).dense_mask(documents=ids)
        assert np.array_equal(got[0], want)


def test_needs_and_errors():
    cp = patternc.compile("per_document(sink(n=4)) & causal", q_len=16, block_size=8)
    assert cp.needs == {"documents"}
    with pytest.raises(PatternError) as e:
        cp.layout_for()
    assert e.value.diagnostic.code == "P360" and "help:" in str(e.value)
    with pytest.raises(PatternError) as e:
        patternc.compile("blocks(4, per_document(causal))", q_len=16)
    assert e.value.diagnostic.code == "P302"
    for bad, code in (("per_document(3)", "P206"), ("per_document()", "P203"),
                      ("per_document(causal, causal)", "P205"), ("per_documnet(causal)", "P201")):
        with pytest.raises(PatternError) as e:
            patternc.parse(bad)
        assert e.value.diagnostic.code == code, (bad, str(e.value))


# the batched BlockMask against create_block_mask, and attention forward and backward against the
# float64 reference: tests/test_documents.py runs both for `document` and `per_document`


def test_layout_scales_with_tiles_not_tokens():
    # 32k tokens, 200 documents: no Q_LEN x KV_LEN work (that would be 1 GiB of booleans)
    rng = np.random.default_rng(0)
    cuts = np.sort(rng.choice(np.arange(1, 32768), 199, replace=False))
    lens = np.diff(np.concatenate([[0], cuts, [32768]])).tolist()
    cp = patternc.compile("per_document(sink(n=4) | local(w=1024)) & causal", q_len=32768, block_size=128)
    lay = cp.layout_for(documents=[lens])
    # hand count of tiles: every tile inside one document's causal window or sinks is computed
    assert lay.kinds.shape == (1, 1, 256, 256)
    starts = np.concatenate([[0], cuts])
    # a tile row's first document starts at or before the tile: its sink columns are computed
    for a in (0, 17, 255):
        row = lay.kinds[0, 0, a]
        s = starts[np.searchsorted(starts, a * 128, side="right") - 1]
        assert row[s // 128] != 0
        assert (row[a + 1:] == 0).all()  # causal


def test_analyze_reads_one_document():
    # reachability inside one document of seq_len tokens (docs/reachability.md), with a note
    r = patternc.analyze("per_document(sink(n=2) | local(w=4)) & causal", seq_len=64)
    plain = patternc.analyze("(sink(n=2) | local(w=4)) & causal", seq_len=64)
    assert r.min_layers == plain.min_layers == 21
    assert r.pattern == "per_document(local(w=4) | sink(n=2)) & causal"
    assert any("one document of 64 tokens" in n for n in r.notes)
    assert patternc.analyze("document & local(w=8) & causal", seq_len=40).min_layers == \
        patternc.analyze("local(w=8) & causal", seq_len=40).min_layers


def test_nn_layer_on_packed_rows_equals_each_document_alone():
    torch = pytest.importorskip("torch")
    torch.manual_seed(0)
    layer = patternc.nn.SparseSelfAttention(16, 2, "per_document(sink(n=2) | local(w=6)) & causal",
                                            block_size=8).double()
    x = torch.randn(2, 40, 16, dtype=torch.float64)
    packed = layer(x, documents=[[17, 23], [9, 31]])
    for b, lens in enumerate([[17, 23], [9, 31]]):
        start = 0
        for n in lens:
            alone = layer(x[b:b + 1, start:start + n], documents=[[n]])
            torch.testing.assert_close(packed[b:b + 1, start:start + n], alone, rtol=1e-12, atol=1e-12)
            start += n
    with pytest.raises(PatternError) as e:
        layer(x)
    assert e.value.diagnostic.code == "P360" and "`per_document`" in str(e.value)
