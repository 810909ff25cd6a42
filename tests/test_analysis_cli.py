"""``patternc analyze`` (SPEC §5): text and JSON reports, exit codes 0 / 1 / 2."""

from __future__ import annotations

import json

import pytest

from patternc.cli import main


def run(argv, capsys):
    code = main(argv)
    out = capsys.readouterr()
    return code, out.out, out.err


def test_done_when_json(capsys):
    code, out, _ = run(["analyze", "-e", "(local(w=128) | strided(s=128)) & causal", "--seq-len", "16384",
                        "--layers", "2", "--json"], capsys)
    obj = json.loads(out)
    assert code == 0
    assert obj["min_layers"] == 2 and obj["exact"] is True and obj["reachable"] is True
    assert obj["layers"] == 2 and obj["mode"] == "earlier" and obj["engine"] == "exact-shift"
    path = obj["witness"]["path"]
    assert len(path) == 2 and path[0]["from"] == obj["witness"]["key"] and path[-1]["to"] == obj["witness"]["query"]
    assert obj["seq_len"] == 16384 and obj["seconds"] >= 0


def test_done_when_exit_1_names_pair_and_layers(capsys):
    code, out, _ = run(["analyze", "-e", "local(w=8) & causal", "--seq-len", "64", "--layers", "2"], capsys)
    assert code == 1
    assert "query 63, key 0" in out and "needs 9" in out and "min_layers = 9" in out
    assert "layer   8: 56 -> 63  via local(w=8) & causal" in out


def test_never_json_null(capsys):
    code, out, _ = run(["analyze", "-e", "(chunk(8) | (chunk(16) & strided(2))) & causal", "--seq-len", "64",
                        "--json"], capsys)
    obj = json.loads(out)
    assert code == 0  # no --layers: the analysis ran, nothing was checked
    assert obj["min_layers"] is None and obj["never"] is True and obj["reachable"] is False
    assert obj["witness"]["pair"] == [8, 7]
    code, _, _ = run(["analyze", "-e", "(chunk(8) | (chunk(16) & strided(2))) & causal", "--seq-len", "64",
                      "--layers", "100"], capsys)
    assert code == 1


def test_heads_default_to_pattern_period_and_pairs_all(capsys, tmp_path):
    f = tmp_path / "p.pattern"
    f.write_text("param w = 9\nheads(local(w=w), strided(s=8)) & causal\n")
    code, out, _ = run(["analyze", str(f), "--seq-len", "64", "--json"], capsys)
    obj = json.loads(out)
    assert code == 0 and obj["num_heads"] == 2 and obj["min_layers"] == 2
    code, out, _ = run(["analyze", str(f), "--seq-len", "64", "--heads", "1", "--set", "w=8", "--json"], capsys)
    obj = json.loads(out)
    assert obj["min_layers"] == 9 and obj["notes"]
    code, out, _ = run(["analyze", "-e", "local(w=8)", "--seq-len", "64", "--pairs", "all", "--layers", "9"], capsys)
    assert code == 0 and "pairs: all" in out


@pytest.mark.parametrize("argv", [
    ["analyze", "-e", "causal", "--seq-len", "0"],
    ["analyze", "-e", "causal", "--seq-len", "8", "--layers", "-1"],
    ["analyze", "-e", "chunk(8) & causal", "--seq-len", "64", "--engine", "exact-shift"],
    ["analyze", "-e", "causal", "--seq-len", "8", "--pairs", "later"],
    ["analyze", "/nonexistent/file.pattern", "--seq-len", "8"],
])
def test_usage_errors_exit_2(argv, capsys):
    with pytest.raises(SystemExit) as e:
        raise SystemExit(main(argv))
    assert e.value.code == 2


def test_pattern_error_exit_1(capsys):
    code, _, err = run(["analyze", "-e", "loca(w=8) & causal", "--seq-len", "64"], capsys)
    assert code == 1 and "did you mean `local`" in err
    code, out, _ = run(["analyze", "-e", "loca(w=8)", "--seq-len", "64", "--json"], capsys)
    assert code == 1 and json.loads(out)["ok"] is False


def test_block_bound_text_says_bound(capsys):
    code, out, _ = run(["analyze", "-e", "local(w=16) & causal", "--seq-len", "2048", "--engine", "block-bound",
                        "--block-size", "64", "--layers", "200"], capsys)
    assert "(bound)" in out and "block size 64" in out
    assert code == 1  # not proven within 200 layers by the bound


def test_long_witness_path_folds_in_text_not_in_json(capsys):
    """Issue 9 item 6: a bound's witness with a long path is a pair that needs the layers,
    and its path is folded in the text report (JSON keeps every hop)."""
    argv = ["analyze", "-e", "(local(w=32) | sink(n=4)) & causal", "--seq-len", "2048", "--engine", "block-bound",
            "--block-size", "16"]
    code, out, _ = run(argv + ["--json"], capsys)
    obj = json.loads(out)
    w = obj["witness"]
    hops = len(w["path"])
    assert code == 0 and hops == obj["upper_bound"] > 40 and w["key"] >= 4  # not a sink
    assert "needs at least" in w["reason"]
    code, out, _ = run(argv, capsys)
    hop_lines = [ln for ln in out.splitlines() if ln.lstrip().startswith("layer ")]
    assert code == 0 and 0 < len(hop_lines) < hops and "more hops" in out
    assert f"query {w['query']}, key {w['key']}" in out
