"""``patternc show``: the terminal picture read back equals the oracle; PNGs are real PNGs.

The pictures are compared with ``patternc.reference.dense_mask`` (token view) and with
``BlockLayout.from_dense`` of it (block view), never with stored strings.
"""

from __future__ import annotations

import json
import struct
import warnings

import numpy as np
import pytest

from patternc import BlockLayout, reference
from patternc.cli import main
from patternc.lower.layout import merge_kinds
from patternc.show import parse_text_grid, parse_window, picture, save_png, to_text

TOKEN_CASES = [
    # source, q_len, kv_len, heads, block_size
    ("(local(w=4) | strided(s=8)) & causal", 24, 24, 1, 8),
    ("fixed(8, 2) & causal", 33, 33, 1, 16),
    ("heads(local(w=3), strided(s=5) | sink(n=2)) & causal", 20, 20, 2, 8),
    ("band(left=2, right=3) | global(at=[5])", 17, 29, 1, (4, 8)),
    ("blocks(4, local(w=2) | random(r=1, seed=3))", 23, 23, 1, 4),
]


def _cli(capsys, *argv):
    code = main(list(argv))
    out = capsys.readouterr()
    return code, out.out, out.err


@pytest.mark.parametrize("src, q_len, kv_len, heads, bs", TOKEN_CASES)
@pytest.mark.parametrize("ascii_only", [False, True])
def test_token_picture_reads_back_as_the_oracle_mask(src, q_len, kv_len, heads, bs, ascii_only):
    pic = picture(src, q_len=q_len, kv_len=kv_len, num_heads=heads, block_size=bs, width=80)
    assert pic.view == "tokens"
    grids = parse_text_grid(to_text(pic, ascii_only=ascii_only))
    want = reference.dense_mask(src, q_len=q_len, kv_len=kv_len, num_heads=heads)
    allowed = "#" if ascii_only else "█"
    seen = set()
    for hs, grid in grids.items():
        for h in hs:
            assert np.array_equal(grid == allowed, want[h]), f"head {h}"
            seen.add(h)
    assert seen == set(range(heads))


@pytest.mark.parametrize("layer", [0, 1, 2, 5])
def test_layer_of_a_stack(layer, capsys):
    src = "layers(local(w=3) & causal, causal, strided(s=4) & causal)"
    code, out, _ = _cli(capsys, "show", "-e", src, "--seq-len", "14", "--layer", str(layer), "--ascii")
    assert code == 0
    (grid,) = parse_text_grid(out).values()
    assert np.array_equal(grid == "#", reference.dense_mask(src, q_len=14, layer=layer)[0])
    assert out.splitlines()[1] == f"layer {layer}        " + ["local(w=3) & causal", "causal", "strided(s=4) & causal"][layer % 3]


def test_identical_heads_are_drawn_once(capsys):
    code, out, _ = _cli(capsys, "show", "-e", "heads(causal, local(w=2), causal)", "--seq-len", "6", "--heads", "4")
    assert code == 0
    grids = parse_text_grid(out)
    assert set(grids) == {(0, 2, 3), (1,)}  # head 3 repeats heads(...) entry 0


@pytest.mark.parametrize("src, q_len, bs, width", [
    ("(local(w=128) | strided(s=64)) & causal", 4096, 128, 80),
    ("blocks(16, chunk(4) | summary(4, 1)) & causal", 1000, 16, 80),
    ("local(w=40) | global(n=3)", 1500, (64, 32), 100),
])
def test_block_picture_reads_back_as_the_oracle_layout(src, q_len, bs, width):
    pic = picture(src, q_len=q_len, block_size=bs, width=width)
    assert pic.view == "blocks" and pic.merge == 1
    (grid,) = parse_text_grid(to_text(pic)).values()
    want = BlockLayout.from_dense(reference.dense_mask(src, q_len=q_len), bs).kinds[0]
    assert np.array_equal(grid, np.array([".", "+", "#"])[want])  # EMPTY=0, PARTIAL=1, FULL=2


def test_merged_block_picture():
    src, n, bs = "local(w=64) & causal", 3000, 16  # 188 blocks into 50 columns: 4 x 4 tiles a character
    pic = picture(src, q_len=n, block_size=bs, width=50)
    assert pic.merge == 4
    (grid,) = parse_text_grid(to_text(pic)).values()
    kinds = BlockLayout.from_dense(reference.dense_mask(src, q_len=n), bs).kinds[0]
    assert grid.shape == (47, 47)
    for r, c in [(0, 0), (10, 10), (10, 9), (20, 3), (46, 46)]:
        tile = kinds[4 * r:4 * r + 4, 4 * c:4 * c + 4]
        want = "#" if (tile == 2).all() else "." if (tile == 0).all() else "+"
        assert grid[r, c] == want, (r, c)
    assert np.array_equal(merge_kinds(kinds, 1, 1), kinds)


def test_window_zoom_at_length_past_the_dense_limit_matches_the_oracle(capsys):
    """A window of a 2100-token pattern is evaluated on its own positions (mask_numpy), never the whole mask."""
    src, n = "(local(w=8) | strided(s=16) | sink(n=3)) & causal", 2100
    code, out, _ = _cli(capsys, "show", "-e", src, "--seq-len", str(n), "--window", "2040:2064,1990:2100", "--ascii")
    assert code == 0
    (grid,) = parse_text_grid(out).values()
    want = reference.dense_mask(src, q_len=n)[0, 2040:2064, 1990:2100]
    assert np.array_equal(grid == "#", want)
    assert "queries 2040..2063" in out and "keys 1990..2099" in out


def test_window_parsing():
    assert parse_window("0:8,4:12", 16, 16) == (0, 8, 4, 12)
    assert parse_window(":8", 16, 20) == (0, 8, 0, 8)
    assert parse_window("8:,:", 16, 20) == (8, 16, 0, 20)


@pytest.mark.parametrize("argv, code, message", [
    (["--window", "5:3"], 2, "query range 5:3 is empty"),
    (["--window", "0:4,0:99"], 2, "outside 0:10"),
    (["--window", "a:b"], 2, "must hold integers"),
    (["--head", "3"], 2, "out of range"),
    (["--block-size", "0"], 2, "--block-size"),
    (["--layer", "-1"], 2, "--layer"),
])
def test_usage_errors_exit_2(capsys, argv, code, message):
    got, out, err = _cli(capsys, "show", "-e", "causal", "--seq-len", "10", *argv)
    assert got == code
    assert message in err and "Traceback" not in err


def test_pattern_errors_exit_1(capsys):
    got, _, err = _cli(capsys, "show", "-e", "locl(w=3)", "--seq-len", "10")
    assert got == 1 and "error[P2" in err and "did you mean `local`" in err


def test_json(capsys):
    src = "heads(local(w=3), strided(s=4)) & causal"
    code, out, _ = _cli(capsys, "show", "-e", src, "--seq-len", "12", "--block-size", "4", "--json")
    assert code == 0
    obj = json.loads(out)
    want = reference.dense_mask(src, q_len=12, num_heads=2)
    assert obj["ok"] is True and obj["view"] == "tokens" and obj["num_heads"] == 2
    assert obj["density"] == pytest.approx(want.mean())
    assert obj["block_density"] == pytest.approx(BlockLayout.from_dense(want, 4).block_density)
    for pic in obj["pictures"]:
        grid = np.array([list(r) for r in pic["rows"]])
        for h in pic["heads"]:
            assert np.array_equal(grid == "#", want[h])


# ---- PNG ----------------------------------------------------------------------------------------------------------


def _png_size(path) -> tuple[int, int]:
    data = path.read_bytes()
    assert data[:8] == b"\x89PNG\r\n\x1a\n", "PNG signature"
    assert data[12:16] == b"IHDR"
    w, h = struct.unpack(">II", data[16:24])
    assert data[-8:-4] == b"IEND"
    return w, h


@pytest.mark.parametrize("argv, view", [
    (["-e", "(local(w=128) | strided(s=64)) & causal", "--seq-len", "4096"], "blocks"),
    (["-e", "heads(fixed(16, 2), local(w=5)) & causal", "--seq-len", "64", "--block-size", "16"], "tokens"),
    (["-e", "local(w=64) & causal", "--seq-len", "8192", "--window", "0:256,0:256"], "tokens"),
])
def test_png_is_written_and_valid(tmp_path, capsys, argv, view):
    import matplotlib.image

    out_png = tmp_path / "pattern.png"
    code, out, err = _cli(capsys, "show", *argv, "--png", str(out_png), "--json")
    assert code == 0, err
    obj = json.loads(out)
    assert obj["png"] == str(out_png) and obj["view"] == view
    w, h = _png_size(out_png)
    assert 500 <= w <= 4000 and 400 <= h <= 4000, (w, h)
    img = matplotlib.image.imread(out_png)
    assert img.shape[:2] == (h, w)
    assert img[..., :3].std() > 0.05, "not a blank image"
    assert [p.name for p in tmp_path.iterdir()] == ["pattern.png"], "no temporary file left behind"


def test_png_failure_leaves_no_file(tmp_path, capsys):
    target = tmp_path / "missing-dir" / "x.png"
    code, _, err = _cli(capsys, "show", "-e", "causal", "--seq-len", "16", "--png", str(target))
    assert code == 2 and "cannot write" in err
    assert not target.exists() and list(tmp_path.iterdir()) == []


def test_png_replaces_atomically(tmp_path):
    target = tmp_path / "x.png"
    target.write_bytes(b"old")
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        save_png(picture("local(w=3) & causal", q_len=16, block_size=4, target="png"), target)
    assert _png_size(target)[0] > 0
    assert [p.name for p in tmp_path.iterdir()] == ["x.png"]


def test_import_show_does_not_import_torch_or_matplotlib():
    import subprocess
    import sys

    code = ("import sys, patternc.show; "
            "assert 'torch' not in sys.modules and 'matplotlib' not in sys.modules, sorted(sys.modules)")
    subprocess.run([sys.executable, "-c", code], check=True)


def test_png_with_many_heads_draws_sixteen_panels_and_names_the_rest(tmp_path):
    from patternc.show import MAX_PNG_PANELS

    src = "heads(" + ", ".join(f"local(w={w})" for w in range(1, 19)) + ") & causal"
    pic = picture(src, q_len=32, block_size=8, target="png")
    assert len(pic.heads) == 18 and MAX_PNG_PANELS == 16
    w, h = _png_size(save_png(pic, tmp_path / "many.png"))
    assert w > 1500 and h > 1500, "a 4 x 4 grid of panels (one row would be about 600 px high)"
