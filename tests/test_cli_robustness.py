"""Regression tests for problems a fresh-eyes review found: built-in names in params, values
computed from the lengths, file writing (symlinks, modes, devices), warnings in the CLI's
outputs, and the JSON ``ok`` field of failed checks."""

import json
import os
import stat

import numpy as np
import pytest

import patternc
from patternc.cli import main
from patternc.fileio import atomic_write_text
from patternc.lower.layout import BlockLayout


def run_json(capsys, argv, err=None):
    rc = main(argv + ["--json"])
    captured = capsys.readouterr()
    if err is not None:
        err.append(captured.err)
    return rc, json.loads(captured.out)


@pytest.mark.parametrize("name", ["q_len", "kv_len", "local", "isqrt"])
def test_params_cannot_override_built_in_names(name):
    with pytest.raises(patternc.PatternError) as e:
        patternc.parse("local(w=q_len // 4)", params={name: 4})
    assert e.value.code == "P214" and f"`{name}`" in str(e.value)


def test_set_of_a_length_name_is_an_error_not_a_silent_override(capsys):
    rc, obj = run_json(capsys, ["compile", "-e", "local(w=q_len // 4)", "--set", "q_len=4", "--seq-len", "64"])
    assert rc == 1 and obj["ok"] is False and obj["diagnostics"][0]["code"] == "P214"
    # and without the override the window really is q_len // 4 = 16 tokens
    cp = patternc.compile("local(w=q_len // 4)", q_len=64, block_size=16)
    np.testing.assert_array_equal(cp.dense_mask(), patternc.reference.dense_mask("local(w=16)", q_len=64))


def test_repeated_set_is_a_usage_error(capsys):
    assert main(["check", "-e", "local(w=w)", "--set", "w=3", "--set", "w=4"]) == 2


def test_values_computed_from_lengths_respect_the_int_limit():
    with pytest.raises(patternc.PatternError) as e:
        patternc.compile("local(w=q_len * q_len * q_len)", q_len=2000)
    assert e.value.code == "P301" and "8000000000" in str(e.value)
    assert " --> <string>:1:1" in str(e.value)  # the diagnostic keeps its place


def test_division_by_zero_at_bind_time_points_at_the_source():
    with pytest.raises(patternc.PatternError) as e:
        patternc.compile("local(w=q_len // (q_len - 16))", q_len=16)
    assert e.value.code == "P301" and "^" in str(e.value)


def test_atomic_write_follows_symlinks_and_honours_umask(tmp_path):
    real = tmp_path / "real"
    real.mkdir()
    link = tmp_path / "link.pattern"
    link.symlink_to(real / "t.pattern")
    old = os.umask(0o022)
    try:
        atomic_write_text(link, "causal\n")
    finally:
        os.umask(old)
    assert link.is_symlink() and (real / "t.pattern").read_text() == "causal\n"
    assert stat.S_IMODE((real / "t.pattern").stat().st_mode) == 0o644
    assert sorted(p.name for p in real.iterdir()) == ["t.pattern"]  # no temporary left


def test_compile_output_keeps_the_file_mode_and_writes_through_links(tmp_path, capsys):
    target = tmp_path / "a.npz"
    target.write_bytes(b"old")
    os.chmod(target, 0o640)
    link = tmp_path / "l.npz"
    link.symlink_to(target)
    assert main(["compile", "-e", "causal", "--seq-len", "10", "-o", str(link)]) == 0
    assert link.is_symlink() and stat.S_IMODE(target.stat().st_mode) == 0o640
    assert patternc.load_compiled(target).source == "causal"


@pytest.mark.skipif(not os.path.exists("/dev/full") or not stat.S_ISCHR(os.stat("/dev/full").st_mode),
                    reason="needs the /dev/full device")
def test_compile_output_to_a_full_device_fails_cleanly(capsys):
    assert main(["compile", "-e", "causal", "--seq-len", "10", "-o", "/dev/full"]) == 2
    assert stat.S_ISCHR(os.stat("/dev/full").st_mode)  # the device node was not replaced


def test_cli_json_carries_library_warnings(capsys):
    err = []
    rc, obj = run_json(capsys, ["compile", "-e", "heads(causal, local(w=2), none)", "--seq-len", "64", "--heads", "2"], err)
    assert rc == 0 and "W003" in [d["code"] for d in obj["diagnostics"]]
    assert err == [""]  # nothing on stderr in JSON mode


def test_analyze_json_ok_is_false_when_the_property_fails(capsys):
    rc, obj = run_json(capsys, ["analyze", "-e", "local(w=2) & causal", "--seq-len", "10", "--layers", "3"])
    assert rc == 1 and obj["ok"] is False and obj["reachable"] is False and obj["min_layers"] == 9
    rc, obj = run_json(capsys, ["analyze", "-e", "local(w=2) & causal", "--seq-len", "10", "--layers", "9"])
    assert rc == 0 and obj["ok"] is True


def test_block_density_matches_a_per_tile_count():
    rng = np.random.default_rng(0)
    kinds = rng.integers(0, 3, size=(3, 7, 5)).astype(np.uint8)
    lay = BlockLayout(kinds=kinds, q_len=97, kv_len=70, q_block_size=16, kv_block_size=16)
    tokens = lay.tile_token_counts()
    want = sum(float(tokens[kinds[h] != 0].sum()) for h in range(3)) / (3 * 97 * 70)
    assert lay.block_density == pytest.approx(want, rel=1e-12)


def test_run_check_with_nan_inputs_fails_with_valid_json(tmp_path, capsys):
    pytest.importorskip("torch")
    rng = np.random.default_rng(0)
    k = rng.standard_normal((1, 2, 64, 8)).astype(np.float32)
    q = np.full_like(k, np.nan)
    np.savez(tmp_path / "nan.npz", q=q, k=k, v=k)
    rc, obj = run_json(capsys, ["run", "-e", "local(w=8) & causal", "--seq-len", "64", "--heads", "2",
                                "--head-dim", "8", "--input", str(tmp_path / "nan.npz"), "--check", "--repeats", "1"])
    assert rc == 1 and obj["ok"] is False and obj["check_passed"] is False
    assert obj["max_abs_error"] is None  # NaN, written as null: never a perfect 0


def test_import_patternc_loads_neither_torch_nor_numpy():
    import subprocess
    import sys

    code = ("import sys, patternc; patternc.parse('(local(w=128) | strided(s=64)) & causal'); "
            "print('torch' in sys.modules, 'numpy' in sys.modules)")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True,
                         cwd=str(__import__("pathlib").Path(__file__).resolve().parents[1])).stdout.split()
    assert out == ["False", "False"]


@pytest.mark.parametrize("width", ["0", "-5", "7"])
def test_show_rejects_a_width_too_small_to_draw(width, capsys):
    assert main(["show", "-e", "causal", "--seq-len", "10", "--width", width]) == 2
    assert "--width" in capsys.readouterr().err


def test_run_takes_its_lengths_from_the_input_file(tmp_path, capsys):
    pytest.importorskip("torch")
    rng = np.random.default_rng(1)
    q = rng.standard_normal((1, 2, 70, 8)).astype(np.float32)
    k = rng.standard_normal((1, 2, 50, 8)).astype(np.float32)
    np.savez(tmp_path / "qkv.npz", q=q, k=k, v=k)
    rc, obj = run_json(capsys, ["run", "-e", "local(w=16) & causal", "--input", str(tmp_path / "qkv.npz"),
                                "--check", "--repeats", "1", "--threads", "1", "--block-size", "16"])
    assert rc == 0 and obj["check_passed"] is True
    assert (obj["shape"]["q_len"], obj["shape"]["kv_len"], obj["shape"]["heads"]) == (70, 50, 2)
    assert main(["run", "-e", "causal", "--heads", "2", "--head-dim", "8"]) == 2  # no lengths at all
    # --seq-len that agrees with the file's q: KV_LEN still from the file's k (it was --seq-len)
    rc, obj = run_json(capsys, ["run", "-e", "local(w=16) & causal", "--input", str(tmp_path / "qkv.npz"),
                                "--seq-len", "70", "--repeats", "1", "--threads", "1", "--block-size", "16"])
    assert rc == 0 and (obj["shape"]["q_len"], obj["shape"]["kv_len"]) == (70, 50)


@pytest.mark.parametrize("device", ["meta", "mps"])
def test_run_on_a_device_patternc_does_not_run_on_is_a_usage_error(device, capsys):
    pytest.importorskip("torch")
    assert main(["run", "-e", "causal", "--seq-len", "16", "--heads", "1", "--head-dim", "8", "--device", device]) == 2
    err = capsys.readouterr().err
    assert f"--device {device}" in err and "P900" not in err


def test_run_lengths_the_compiler_refuses_are_usage_errors(capsys):
    """P302 / P303 from run's own flags exit 2, as in compile and show (run exited 1)."""
    pytest.importorskip("torch")
    assert main(["run", "-e", "causal", "--seq-len", "1000000", "--block-size", "16", "--heads", "1",
                 "--head-dim", "8"]) == 2
    assert "tiles" in capsys.readouterr().err
    assert main(["run", "-e", "blocks(4, causal)", "--seq-len", "8", "--q-offset", "3", "--heads", "1",
                 "--head-dim", "8"]) == 2


class _Closed:
    """A stream whose reader is gone (``err`` to raise on write)."""

    def __init__(self, err):
        self.err = err

    def write(self, text):
        raise self.err

    def flush(self):
        pass


@pytest.mark.parametrize("argv, code", [(["check", "-e", "locl(w=1)"], 1), (["check", "-e", "causal"], 0),
                                        (["compile", "-e", "causal", "--seq-len", "0"], 2)])
def test_a_closed_pipe_keeps_the_exit_code(monkeypatch, argv, code):
    """`patternc check bad.pattern 2>&1 | head -1` exited 0 (BrokenPipeError meant OK): a CI step
    with pipefail saw a broken pattern pass."""
    monkeypatch.setattr("sys.stdout", _Closed(BrokenPipeError(32, "Broken pipe")))
    monkeypatch.setattr("sys.stderr", _Closed(BrokenPipeError(32, "Broken pipe")))
    assert main(argv) == code


def test_a_full_output_is_not_an_internal_error(monkeypatch, capsys):
    monkeypatch.setattr("sys.stdout", _Closed(OSError(28, "No space left on device")))
    assert main(["check", "-e", "causal"]) == 2
    err = capsys.readouterr().err
    assert "cannot write the output: No space left on device" in err and "P900" not in err


def test_analyze_cli_engine_choices_match_the_library():
    # the CLI keeps its own tuple so `patternc check` does not import the analysis at start-up
    from patternc.analysis import ENGINES
    from patternc.cli.analyze import ENGINE_CHOICES

    assert tuple(ENGINE_CHOICES) == tuple(ENGINES)


def test_fmt_does_not_replace_a_read_only_file(tmp_path, monkeypatch, capsys):
    """The atomic write renames over the target, which needs only the folder's permission: a
    mode-444 file was reformatted (as a user without root's override; os.access stands in)."""
    f = tmp_path / "ro.pattern"
    f.write_text("causal&local(w=4)\n")
    f.chmod(0o444)
    real = os.access
    monkeypatch.setattr("os.access", lambda p, m, **kw: False if os.fspath(p) == str(f) and m == os.W_OK
                        else real(p, m, **kw))
    assert main(["fmt", str(f)]) == 2
    assert "Permission denied" in capsys.readouterr().err
    assert f.read_text() == "causal&local(w=4)\n"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ro.pattern"]  # no temporary left


def test_fmt_goes_on_past_a_file_it_cannot_read(tmp_path, capsys):
    """It stopped at the first missing file: later files unformatted, and --json did not list
    the ones already rewritten."""
    a, b = tmp_path / "a.pattern", tmp_path / "b.pattern"
    for f in (a, b):
        f.write_text("causal&local(w=4)\n")
    missing = tmp_path / "missing.pattern"
    rc, obj = run_json(capsys, ["fmt", str(a), str(missing), str(b)])
    assert rc == 2 and obj["ok"] is False
    assert [(r["file"], r["ok"]) for r in obj["files"]] == [(str(a), True), (str(missing), False), (str(b), True)]
    assert "cannot read" in obj["files"][1]["error"]
    assert a.read_text() == b.read_text() == "causal & local(w=4)\n"
