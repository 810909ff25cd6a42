"""``patternc compile``: summary, --json fields, -o artifact, exit codes."""

from __future__ import annotations

import json

import numpy as np
import pytest

import patternc
from patternc.cli import main
from patternc.lower.layout import BlockLayout
from patternc.reference import dense_mask

JSON_FIELDS = ("canonical", "q_len", "kv_len", "num_heads", "block_size", "num_q_blocks", "num_kv_blocks",
               "density", "block_density", "full_blocks", "partial_blocks", "compile_seconds")


def run(capsys, *argv):
    code = main(list(argv))
    out, err = capsys.readouterr()
    return code, out, err


def test_json_summary_matches_the_oracle(capsys):
    src = "(local(w=40) | strided(s=32)) & causal"
    code, out, _ = run(capsys, "compile", "-e", src, "--seq-len", "300", "--kv-len", "260", "--block-size", "64,32",
                       "--json")
    assert code == 0
    obj = json.loads(out)
    for key in JSON_FIELDS:
        assert key in obj, key
    ref = dense_mask(src, q_len=300, kv_len=260)
    lay = BlockLayout.from_dense(ref, (64, 32))
    assert obj["canonical"] == src
    assert (obj["q_len"], obj["kv_len"], obj["num_heads"], obj["block_size"]) == (300, 260, 1, [64, 32])
    assert (obj["num_q_blocks"], obj["num_kv_blocks"]) == (5, 9)
    assert obj["full_blocks"] == lay.full_blocks and obj["partial_blocks"] == lay.partial_blocks
    assert obj["density"] == pytest.approx(ref.mean())
    assert obj["block_density"] == pytest.approx(lay.block_density)
    assert obj["compile_seconds"] >= 0


def test_text_summary_with_picture(capsys):
    code, out, _ = run(capsys, "compile", "-e", "local(w=64) & causal", "--seq-len", "256", "--block-size", "64")
    assert code == 0
    assert "canonical: local(w=64) & causal" in out
    assert "tiles: 0 FULL, 7 PARTIAL, 9 EMPTY" in out
    assert "+...\n++..\n.++.\n..++" in out


def test_heads_default_to_the_pattern_period(capsys):
    code, out, _ = run(capsys, "compile", "-e", "heads(causal, local(w=3), all)", "--seq-len", "64", "--json")
    assert code == 0 and json.loads(out)["num_heads"] == 3
    code, out, _ = run(capsys, "compile", "-e", "heads(causal, local(w=3), all)", "--seq-len", "64", "--heads", "8",
                       "--json")
    assert json.loads(out)["num_heads"] == 8


def test_output_artifact_roundtrip(tmp_path, capsys):
    src_file = tmp_path / "p.pattern"
    src_file.write_text("param w = 8\nlayers(local(w) & causal, strided(s=w))\n")
    out_path = tmp_path / "out.npz"
    code, out, _ = run(capsys, "compile", str(src_file), "--seq-len", "100", "--block-size", "16", "--layer", "1",
                       "--set", "w=5", "-o", str(out_path))
    assert code == 0 and f"wrote {out_path}" in out
    cp = patternc.load_compiled(out_path)
    assert cp.source == "strided(s=5)" and cp.layer == 1 and cp.params == {"w": 5}
    np.testing.assert_array_equal(cp.layout.kinds, BlockLayout.from_dense(dense_mask("strided(s=5)", q_len=100), 16).kinds)


@pytest.mark.parametrize("argv", [
    ["--seq-len", "0"], ["--seq-len", "8", "--kv-len", "0"], ["--seq-len", "8", "--heads", "0"],
    ["--seq-len", "8", "--block-size", "0"], ["--seq-len", "8", "--block-size", "a,b"],
    ["--seq-len", "8", "--block-size", "1,2,3"], ["--seq-len", "8", "--layer", "-1"],
    ["--seq-len", "100000000", "--block-size", "16"],
])
def test_bad_lengths_are_usage_errors(capsys, argv):
    code, out, err = run(capsys, "compile", "-e", "causal", *argv)
    assert code == 2
    assert err.startswith("error: ") and "Traceback" not in err
    code, out, _ = run(capsys, "compile", "-e", "causal", *argv, "--json")
    assert code == 2 and json.loads(out)["ok"] is False


def test_pattern_errors_exit_1_with_the_place(capsys):
    code, _, err = run(capsys, "compile", "-e", "locl(w=3)", "--seq-len", "8")
    assert code == 1 and "error[P201]" in err and "did you mean `local`" in err
    code, _, err = run(capsys, "compile", "-e", "local(w=q_len - 20) & causal", "--seq-len", "10")
    assert code == 1 and "error[P301]" in err and "local(w=q_len - 20) & causal" in err and "^^^" in err


def test_failed_write_leaves_nothing(tmp_path, capsys):
    target = tmp_path / "missing" / "x.npz"
    code, _, err = run(capsys, "compile", "-e", "causal", "--seq-len", "8", "-o", str(target))
    assert code == 2 and "cannot write" in err
    assert list(tmp_path.iterdir()) == []


def test_unreadable_file_is_a_usage_error(tmp_path, capsys):
    code, _, err = run(capsys, "compile", str(tmp_path / "nope.pattern"), "--seq-len", "8")
    assert code == 2 and "cannot read" in err
