"""The real-input demo ``examples/train_charlm.py`` in ``--quick`` mode (a few steps, tiny model)."""

from __future__ import annotations

import json
import math
import sys
import zlib
from pathlib import Path

import numpy as np
import pytest

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "examples"))
import train_charlm  # noqa: E402


def test_corpus_is_the_stdlib_split_by_file():
    files = train_charlm.stdlib_files()
    assert len(files) > 300, "the standard library's sources are found"
    assert files == sorted(files, key=lambda r: r.as_posix()), "deterministic order"
    assert not any(set(f.parts) & {"site-packages", "test", "tests", "encodings"} for f in files)
    held = [f for f in files if train_charlm.is_held_out(f)]
    assert 0.05 < len(held) / len(files) < 0.15
    assert all(zlib.crc32(f.as_posix().encode()) % 10 == 0 for f in held)
    corpus = train_charlm.load_corpus(max_bytes=300_000)
    # byte streams: every file ends with NUL, so the file counts are the NUL counts
    assert int((corpus["train"] == 0).sum()) >= corpus["train_files"]
    assert int((corpus["heldout"] == 0).sum()) >= corpus["heldout_files"]
    w = train_charlm.eval_windows(corpus["heldout"], 64, 5)
    assert w.shape == (5, 65) and w.dtype == np.uint8


def test_quick_run(tmp_path):
    out, qkv = tmp_path / "r.json", tmp_path / "qkv.safetensors"
    code = train_charlm.main(["--quick", "--no-progress", "--out", str(out), "--save-qkv", str(qkv)])
    assert code == 0
    rep = json.loads(out.read_text())
    names = [r["name"] for r in rep["results"]]
    assert names == ["dense", "fixed", "strided"]
    assert len({r["parameters"] for r in rep["results"]}) == 1, "equal model size"
    dense = rep["results"][0]
    assert dense["canonical"] == "causal" and dense["token_density"] == pytest.approx((256 * 257 / 2) / 256**2)
    for r in rep["results"]:
        assert r["steps"] == 4 and r["sec_per_iter"] > 0
        # untrained byte models start near 8 bits/byte; a few steps must already help
        assert 5.0 < r["heldout_bits_per_byte"] < 8.0, r
        assert math.isfinite(r["train_bits_per_byte_last10"])
        assert 0 < r["token_density"] < dense["token_density"] or r is dense
    # the saved activations: q, k, v float32 [1, H, L, D] of the fixed-pattern model
    from safetensors.numpy import load_file

    t = load_file(str(qkv))
    assert set(t) == {"q", "k", "v"}
    assert all(a.shape == (1, 2, 256, 16) and a.dtype == np.float32 for a in t.values())
    assert rep["qkv"]["run"] == "fixed" and np.isfinite(t["q"]).all() and t["q"].std() > 0
    assert [p.name for p in tmp_path.iterdir() if p.name.startswith(".")] == [], "no temporary files left"
    from patternc.cli import main  # the main job on these activations

    src = ROOT / "examples" / "sparse_transformer_fixed.pattern"
    assert main(["run", str(src), "--input", str(qkv), "--seq-len", "256", "--heads", "2", "--head-dim", "16",
                 "--block-size", "32", "--check"]) == 0


def test_readme_follow_up_reads_what_the_readme_command_writes():
    """Issue 9 item 3: the README's training command must save the q/k/v file that its
    follow-up `patternc run ... --input FILE` reads (without --save-qkv nothing is saved)."""
    import re
    import shlex

    from patternc.cli import build_parser

    text = " ".join((ROOT / "README.md").read_text(encoding="utf-8").split())
    train = re.findall(r"`(python examples/train_charlm\.py[^`]*)`", text)
    follow = re.findall(r"`(patternc run [^`]*--input [^`]*)`", text)
    assert train and follow, "the README shows the training command and its follow-up"
    targs = train_charlm.build_parser().parse_args(shlex.split(train[0])[2:])
    rargs = build_parser().parse_args(shlex.split(follow[0])[1:])
    assert targs.save_qkv is not None, "the README's training command saves q/k/v"
    assert Path(rargs.input) == targs.save_qkv
    # the saved layer is the first sparse run's: the pattern the follow-up runs
    runs = dict(train_charlm.parse_patterns(targs.patterns))
    first_sparse = next(n for n, src in runs.items() if src != "causal")
    assert (targs.qkv_from or first_sparse) == "fixed" and runs["fixed"] == rargs.file
