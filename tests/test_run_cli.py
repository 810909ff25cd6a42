"""``patternc run``: timing report, --check against the float64 reference, --input files,
exit codes (0 ok, 1 pattern error or failed check, 2 usage / unreadable input)."""

from __future__ import annotations

import json

import numpy as np
import pytest

torch = pytest.importorskip("torch")

import patternc  # noqa: E402
from patternc.cli import main  # noqa: E402

pytestmark = pytest.mark.filterwarnings("ignore::patternc.PatternWarning")




def run_json(capsys, *argv):
    code = main(["run", *argv, "--json"])
    out = capsys.readouterr().out
    return code, json.loads(out)


def test_json_report_with_check(capsys):
    src = "local(w=16) & causal"
    code, r = run_json(capsys, "-e", src, "--seq-len", "200", "--kv-len", "150", "--heads", "2",
                       "--head-dim", "16", "--repeats", "2", "--check", "--device", "cpu")
    assert code == 0
    for key in ("backend", "seconds", "dense_seconds", "speedup", "density", "block_density",
                "max_abs_error", "rel_error"):
        assert key in r, key
    assert r["backend"] == "blocksparse"
    dense = patternc.reference.dense_mask(src, q_len=200, kv_len=150, num_heads=2)
    assert r["density"] == pytest.approx(dense.mean())
    assert 0 < r["density"] <= r["block_density"] <= 1
    assert r["rel_error"] <= 1e-5 and r["check_passed"] is True
    assert r["speedup"] == pytest.approx(r["dense_seconds"] / r["seconds"])
    assert r["shape"] == {"batch": 1, "heads": 2, "kv_heads": 2, "q_len": 200, "kv_len": 150,
                          "head_dim": 16, "v_head_dim": 16, "block_size": 128}


def test_text_report_names_backend_and_speedup(capsys):
    code = main(["run", "-e", "causal", "--seq-len", "64", "--heads", "1", "--head-dim", "8",
                 "--repeats", "1", "--check", "--dtype", "bfloat16", "--device", "cpu"])
    out = capsys.readouterr().out
    assert code == 0
    assert "backend: sdpa" in out and "speedup" in out and "rel_error" in out and ": ok)" in out


def _write(tmp_path, fmt, tensors):
    if fmt == "npz":
        path = tmp_path / "qkv.npz"
        np.savez(path, **{n: t.numpy() for n, t in tensors.items()})
    elif fmt == "safetensors":
        from safetensors.torch import save_file

        path = tmp_path / "qkv.safetensors"
        save_file(tensors, str(path))
    else:
        path = tmp_path / "qkv.pt"
        torch.save(tensors, path)
    return str(path)


@pytest.mark.parametrize("fmt", ["npz", "safetensors", "pt"])
def test_input_files(tmp_path, capsys, fmt):
    g = torch.Generator().manual_seed(3)
    tensors = {"q": torch.randn(3, 4, 50, 8, generator=g), "k": torch.randn(3, 2, 50, 8, generator=g),
               "v": torch.randn(3, 2, 50, 4, generator=g)}
    path = _write(tmp_path, fmt, tensors)
    code, r = run_json(capsys, "-e", "strided(s=3) | sink(2)", "--seq-len", "50", "--input", path,
                       "--repeats", "1", "--check", "--block-size", "16", "--device", "cpu")
    assert code == 0, r
    assert r["shape"]["batch"] == 3 and r["shape"]["heads"] == 4 and r["shape"]["kv_heads"] == 2
    assert r["shape"]["v_head_dim"] == 4 and r["rel_error"] <= 1e-5


def test_input_used_not_random(tmp_path, capsys, monkeypatch):
    """The loaded tensors are what runs: capture the q handed to attention."""
    tensors = {"q": torch.full((1, 1, 20, 4), 0.5), "k": torch.ones(1, 1, 20, 4), "v": torch.ones(1, 1, 20, 4)}
    path = _write(tmp_path, "npz", tensors)
    seen = []
    import patternc.execute as ex

    real = ex.attention

    def spy(cp, q, k, v, **kw):
        seen.append(q.clone())
        return real(cp, q, k, v, **kw)

    monkeypatch.setattr(ex, "attention", spy)
    code, _ = run_json(capsys, "-e", "causal", "--seq-len", "20", "--input", path, "--repeats", "1",
                       "--device", "cpu")
    assert code == 0 and seen and torch.equal(seen[0], tensors["q"])


def test_input_shape_error_names_expected_shape(tmp_path, capsys):
    tensors = {"q": torch.randn(1, 2, 30, 8), "k": torch.randn(1, 2, 31, 8), "v": torch.randn(1, 2, 31, 8)}
    path = _write(tmp_path, "safetensors", tensors)
    # KV_LEN comes from the file unless --kv-len is given (docs/cli.md: flags given are checked)
    code = main(["run", "-e", "causal", "--seq-len", "30", "--kv-len", "30", "--input", path, "--device", "cpu"])
    err = capsys.readouterr().err
    assert code == 2
    assert "k has shape [1, 2, 31, 8], expected [1, 2, 30, 8]" in err


def test_input_missing_tensor_and_unreadable(tmp_path, capsys):
    path = _write(tmp_path, "pt", {"q": torch.randn(1, 1, 8, 4), "key": torch.randn(1, 1, 8, 4)})
    assert main(["run", "-e", "causal", "--seq-len", "8", "--input", path]) == 2
    err = capsys.readouterr().err
    assert "missing tensor(s) k, v" in err and "expected q [B, H, Q_LEN, D]" in err
    assert main(["run", "-e", "causal", "--seq-len", "8", "--input", str(tmp_path / "nope.npz")]) == 2
    bad = tmp_path / "bad.safetensors"
    bad.write_bytes(b"not a tensor file")
    assert main(["run", "-e", "causal", "--seq-len", "8", "--input", str(bad)]) == 2
    assert "cannot read" in capsys.readouterr().err


def test_usage_and_pattern_errors(capsys):
    assert main(["run", "-e", "causal", "--seq-len", "8"]) == 2  # no --heads/--head-dim
    assert "--heads and --head-dim are required" in capsys.readouterr().err
    assert main(["run", "-e", "causal", "--seq-len", "0", "--heads", "1", "--head-dim", "4"]) == 2
    assert main(["run", "-e", "causal", "--seq-len", "8", "--heads", "3", "--kv-heads", "2", "--head-dim", "4"]) == 2
    capsys.readouterr()
    assert main(["run", "-e", "causl", "--seq-len", "8", "--heads", "1", "--head-dim", "4"]) == 1
    assert "did you mean `causal`" in capsys.readouterr().err


def test_run_names_the_layer_of_a_layers_pattern(capsys):
    """Issue 9 item 7: `run` on layers(...) says which entry ran (as `compile` does)."""
    src = "layers(local(w=4) & causal, strided(s=3) & causal)"
    args = ["-e", src, "--seq-len", "40", "--heads", "1", "--head-dim", "8", "--repeats", "1",
            "--no-dense", "--block-size", "16"]
    code, r = run_json(capsys, *args, "--layer", "3", "--check")
    assert code == 0 and r["check_passed"]
    assert (r["layer"], r["num_layers"], r["layer_pattern"]) == (3, 2, "strided(s=3) & causal")
    # the density reported is that entry's (the oracle for layer 3 = entry 1)
    assert r["density"] == pytest.approx(patternc.reference.dense_mask(src, q_len=40, layer=3).mean())
    assert main(["run", *args]) == 0
    assert "layer: 0 (entry 0 of 2): local(w=4) & causal" in capsys.readouterr().out.splitlines()
