"""``analyze`` with offsets (SPEC §1.6, §5): the stack spans positions 0 .. q_offset + seq_len - 1,
and only the queries at positions >= q_offset and keys >= kv_offset are required. Expected
values come from the SPEC §4 oracle (dense matrices from ``patternc.reference.dense_mask``)
restricted to those pairs."""

from __future__ import annotations

import json

import numpy as np
import pytest

import patternc
from analysis_oracle import check_path, oracle_dist
from patternc import PatternError
from patternc.analysis import analyze

CASES = [
    ("local(w=3) & causal", "earlier"),
    ("(sink(n=2) | local(w=4)) & causal", "earlier"),
    ("layers(local(w=2) & causal, strided(s=3) & causal)", "earlier"),
    ("chunk(l=5) | (global(n=1) & causal)", "all"),
    ("heads(local(w=2), summary(l=6, c=1)) & causal", "earlier"),
    ("local(w=4)", "all"),
]


def oracle(src, n, qo, ko, mode, heads):
    dist = oracle_dist(src, n, heads)
    req = np.ones((n, n), dtype=bool) if mode == "all" else np.tril(np.ones((n, n), dtype=bool))
    req[:qo] = False
    req[:, :ko] = False
    d = dist[req]
    return None if (d < 0).any() else (int(d.max()) if d.size else 0)


@pytest.mark.parametrize("src,mode", CASES)
@pytest.mark.parametrize("seq_len,qo,ko", [(1, 30, 0), (1, 30, 22), (6, 20, 3), (13, 0, 7), (26, 0, 0)])
def test_offsets_against_the_oracle(src, mode, seq_len, qo, ko):
    heads = patternc.parse(src).num_heads
    n = qo + seq_len
    want = oracle(src, n, qo, ko, mode, heads)
    for engine in ("auto", "networkx"):
        r = analyze(src, seq_len=seq_len, num_heads=heads, pairs=mode, engine=engine, q_offset=qo, kv_offset=ko)
        assert r.min_layers == want, (engine, r.min_layers, want)
        assert (r.q_offset, r.kv_offset, r.seq_len) == (qo, ko, seq_len)
        w = r.witness
        if want is None:
            assert r.never and w.i >= qo and w.j >= ko
            assert oracle_dist(src, n, heads)[w.i, w.j] < 0
        else:
            assert w.i >= qo and (w.j >= ko or want == 0)
            if w.path is not None and want:
                check_path(src, n, heads, w.path, w.i, w.j)
                assert len(w.path) == want


def test_a_decode_step_needs_fewer_layers_than_the_whole_sequence():
    # the last token of 64 with a window of 8: keys from position 32 on are 5 hops away (7 per hop)
    src = "local(w=8) & causal"
    whole = analyze(src, seq_len=64)
    step = analyze(src, seq_len=1, q_offset=63, kv_offset=32)
    assert whole.min_layers == 9 and step.min_layers == 5
    assert step.engine == "exact-token" and any("offsets" in n for n in step.notes)
    assert analyze(src, seq_len=1, q_offset=63, kv_offset=32, layers=4).reachable is False


def test_offsets_that_do_not_apply_are_clear_errors():
    for kw, code in ((dict(engine="exact-shift", q_offset=3), "P402"), (dict(engine="block-bound", kv_offset=2), "P402"),
                     (dict(q_offset=-1), "P401"), (dict(kv_offset=40), "P401")):
        with pytest.raises(PatternError) as e:
            analyze("local(w=3) & causal", seq_len=32, **kw)
        assert e.value.diagnostic.code == code and "help:" in str(e.value), kw


def test_cli_analyze_takes_offsets(capsys):
    from patternc.cli import main

    rc = main(["analyze", "-e", "local(w=8) & causal", "--seq-len", "1", "--q-offset", "63", "--kv-offset", "32",
               "--json"])
    out = json.loads(capsys.readouterr().out)
    assert rc == 0 and out["min_layers"] == 5 and out["q_offset"] == 63 and out["kv_offset"] == 32
    rc = main(["analyze", "-e", "local(w=8) & causal", "--seq-len", "1", "--q-offset", "63", "--engine",
               "exact-shift"])
    assert rc == 2 and "P402" in capsys.readouterr().err
    rc = main(["analyze", "-e", "local(w=8) & causal", "--seq-len", "4", "--q-offset", "-1"])
    assert rc == 2
