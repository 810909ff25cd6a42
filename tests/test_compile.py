"""The compiler against the oracle: layouts equal the classification of
``patternc.reference.dense_mask`` tile for tile, ``dense_mask()`` equals the oracle, token
densities are exact, and every layout passes ``check_invariants``."""

from __future__ import annotations

import warnings

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

import patternc
from patternc import BlockLayout, PatternError
from patternc.reference import dense_mask
from strategies import BLOCK_SIZES, block_sizes, lengths
from strategies import layout_patterns as patterns

PRIMITIVE_SOURCES = [
    "all", "none", "causal", "local(w=1)", "local(w=7)", "local(w=130)", "band(left=3, right=0)",
    "band(left=0, right=9)", "band(left=17, right=5)", "strided(s=2)", "strided(s=7)", "strided(s=64)",
    "strided(s=300)", "dilated(w=3, d=4)", "dilated(w=9, d=2)", "chunk(l=10)", "chunk(l=64)", "chunk(l=100)",
    "summary(l=10, c=3)", "summary(l=10, c=3, g=1)", "summary(l=64, c=8)", "summary(l=100, c=1, g=99)",
    "sink(n=5)", "sink(n=200)", "global(n=3)", "global(n=150)", "global(at=[0, 96, 129, 190, 999])",
    "prefix(n=40)", "prefix(n=500)", "random(r=3, seed=2)", "random(r=40)",
    "heads(local(w=4), strided(s=3), causal)", "blocks(16, local(w=3))", "blocks(7, chunk(l=3) | summary(l=3, c=1))",
]

# length pairs (Q_LEN, KV_LEN) drawn from {1, 97, 130, 191, 232, 1000}, including Q_LEN != KV_LEN
LENGTH_PAIRS = [(1, 1), (1, 97), (97, 97), (130, 191), (191, 130), (232, 232), (232, 1000), (1000, 97)]


def check_against_oracle(p, q_len, kv_len, block_size, num_heads=None, layer=0):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        cp = patternc.compile(p, q_len=q_len, kv_len=kv_len, block_size=block_size, num_heads=num_heads, layer=layer)
    H = cp.num_heads
    ref = dense_mask(p, q_len=q_len, kv_len=kv_len, num_heads=H, layer=layer)
    want = BlockLayout.from_dense(ref, block_size)
    cp.layout.check_invariants()
    assert cp.layout.kinds.shape == want.kinds.shape
    bad = np.argwhere(cp.layout.kinds != want.kinds)
    assert bad.size == 0, (f"{cp.source} Q={q_len} KV={kv_len} B={block_size}: tile {bad[0].tolist()} is "
                           f"{cp.layout.kinds[tuple(bad[0])]}, oracle {want.kinds[tuple(bad[0])]}")
    np.testing.assert_array_equal(cp.dense_mask(), ref)
    assert cp.allowed_pairs == int(ref.sum())
    assert cp.density == pytest.approx(ref.mean())
    assert cp.block_density == pytest.approx(want.block_density)
    return cp


@pytest.mark.parametrize("src", PRIMITIVE_SOURCES)
def test_primitive_layouts_match_oracle(src):
    for (q_len, kv_len) in LENGTH_PAIRS:
        for bs in BLOCK_SIZES:
            check_against_oracle(src, q_len, kv_len, bs)


COMPOSITIONS = [
    "(local(w=64) | strided(s=32)) & causal",
    "fixed(l=50, c=5) & causal",
    "fixed(l=128, c=8)",
    "sink(n=4) | (local(w=33) & causal)",
    "(summary(l=6, c=2) & strided(s=5)) | (chunk(l=11) & ~band(left=2, right=1))",
    "~(local(w=5) | global(n=2)) & chunk(l=13)",
    "(chunk(l=7) - summary(l=7, c=2)) | (prefix(n=9) & ~causal)",
    "(global(at=[3, 40]) & local(w=9)) | (summary(l=5, c=1) & causal)",
    "(random(r=2) & causal) | blocks(5, strided(s=3))",
    "blocks(3, random(r=2, seed=1)) | global(at=[5])",
    "blocks(16, local(w=2)) & causal",
    "(local(w=128) | strided(s=64)) & causal | sink(n=1)",
    "heads(local(w=8), strided(s=8) - local(w=3), all) & causal",
]


@pytest.mark.parametrize("src", COMPOSITIONS)
def test_compositions_match_oracle(src):
    for (q_len, kv_len) in [(97, 97), (191, 130), (232, 1000), (1000, 1000)]:
        for bs in BLOCK_SIZES:
            check_against_oracle(src, q_len, kv_len, bs)


@settings(max_examples=250, deadline=None)
@given(p=patterns(max_leaves=8), q_len=lengths, kv_len=lengths, bs=block_sizes)
def test_random_compositions_match_oracle(p, q_len, kv_len, bs):
    check_against_oracle(p, q_len, kv_len, bs)


@settings(max_examples=40, deadline=None)
@given(p=patterns(layers=True), layer=st.integers(0, 3), heads=st.integers(1, 4))
def test_layers_and_explicit_heads_match_oracle(p, layer, heads):
    check_against_oracle(p, 130, 97, 16, num_heads=heads, layer=layer)


# ---- the CompiledPattern API ---------------------------------------------------------------------


def test_pattern_attributes_and_summary():
    cp = patternc.compile("layers(local(w=4) & causal, causal & strided(s=q_len // 4))", q_len=64, layer=1,
                          block_size=(16, 32))
    assert cp.source == "strided(s=16) & causal"
    assert str(cp.pattern) == cp.source
    assert (cp.q_len, cp.kv_len, cp.num_heads, cp.block_size, cp.layer) == (64, 64, 1, (16, 32), 1)
    assert cp.layout.kinds.shape == (1, 4, 2)
    s = cp.summary()
    for key in ("canonical", "q_len", "kv_len", "num_heads", "block_size", "num_q_blocks", "num_kv_blocks",
                "density", "block_density", "full_blocks", "partial_blocks", "compile_seconds"):
        assert key in s
    # strided(16) & causal on 64 tokens: row i keeps i // 16 + 1 keys
    assert s["density"] == pytest.approx(sum(i // 16 + 1 for i in range(64)) / 64**2)
    assert "strided(s=16) & causal" in repr(cp)


def test_num_heads_default_is_one_and_warns_below_the_head_period():
    src = "heads(causal, local(w=2), none, causal, local(w=2), none)"
    with pytest.warns(patternc.PatternWarning, match="W003"):
        cp = patternc.compile(src, q_len=32, block_size=8)  # SPEC §2: num_heads=1
    assert cp.num_heads == 1
    np.testing.assert_array_equal(cp.dense_mask()[0], patternc.reference.dense_mask("causal", q_len=32)[0])
    cp = patternc.compile(src, q_len=32, block_size=8, num_heads=None)
    assert cp.num_heads == 3  # the normaliser folds the repeated entries: period 3
    cp2 = patternc.compile("heads(causal, all)", q_len=32, block_size=8, num_heads=5)
    assert cp2.num_heads == 5
    np.testing.assert_array_equal(cp2.layout.kinds[4], cp2.layout.kinds[0])
    np.testing.assert_array_equal(cp2.layout.kinds[3], cp2.layout.kinds[1])


def test_is_causal_only():
    assert patternc.compile("causal & causal", q_len=8).is_causal_only
    assert not patternc.compile("local(w=3) & causal", q_len=8).is_causal_only
    assert patternc.compile("layers(all, causal)", q_len=8, layer=1).is_causal_only


def test_mask_numpy_matches_oracle():
    src = "heads(local(w=5) & causal, strided(s=4) | sink(n=2), blocks(4, random(r=1)))"
    cp = patternc.compile(src, q_len=50, kv_len=70, block_size=16, num_heads=None)
    ref = dense_mask(src, q_len=50, kv_len=70, num_heads=3)
    q = np.arange(50)[:, None]
    kv = np.arange(70)[None, :]
    for h in range(3):
        np.testing.assert_array_equal(cp.mask_numpy(h, q, kv), ref[h])
    assert cp.mask_numpy(1, np.int64(9), np.int64(1)).shape == ()


def test_pickle_keeps_the_layout_and_drops_mask_mods():
    import pickle

    cp = patternc.compile("sink(n=2) | local(w=5) & causal", q_len=40, block_size=16)
    cp._mask_mods["cpu"] = lambda *a: None  # stands for a built mask_mod (a closure)
    back = pickle.loads(pickle.dumps(cp))
    assert back.source == cp.source and back._mask_mods == {}
    np.testing.assert_array_equal(back.layout.kinds, cp.layout.kinds)


def test_layouts_are_cached_and_read_only():
    a = patternc.compile("local(w=9) & causal", q_len=300, block_size=32)
    b = patternc.compile("causal & local(w=9)", q_len=300, block_size=32)
    assert a.layout is b.layout
    with pytest.raises(ValueError):
        a.layout.kinds[0, 0, 0] = 2


@pytest.mark.parametrize("kwargs, code", [
    ({"q_len": 0}, "P302"), ({"q_len": 8, "kv_len": -1}, "P302"), ({"q_len": 8, "num_heads": 0}, "P302"),
    ({"q_len": 8, "block_size": 0}, "P302"), ({"q_len": 8, "block_size": (8, 8, 8)}, "P302"),
    ({"q_len": 8, "layer": -1}, "P302"), ({"q_len": 2.5}, "P302"), ({"q_len": 10**9, "block_size": 16}, "P303"),
])
def test_bad_arguments_raise_pattern_errors(kwargs, code):
    with pytest.raises(PatternError) as ei:
        patternc.compile("causal", **kwargs)
    assert ei.value.code == code
    assert "help:" in str(ei.value)


def test_parameters_out_of_range_at_these_lengths():
    with pytest.raises(PatternError) as ei:
        patternc.compile("local(w=q_len - 10)", q_len=8)
    assert ei.value.code == "P301"


def test_params_bind_file_parameters():
    src = "param w = 4\nlocal(w) & causal"
    cp = patternc.compile(src, q_len=64, params={"w": 8}, block_size=16)
    assert cp.source == "local(w=8) & causal"
    assert cp.params == {"w": 8}
    with pytest.raises(PatternError):
        patternc.compile(patternc.parse("causal"), q_len=8, params={"w": 1})


# ---- the artifact ---------------------------------------------------------------------------------


def test_save_and_load_roundtrip(tmp_path):
    cp = patternc.compile("heads(local(w=16), strided(s=8)) & causal", q_len=200, kv_len=150, block_size=(32, 16), num_heads=2)
    path = tmp_path / "layout.npz"
    cp.save(path)
    assert [p.name for p in tmp_path.iterdir()] == ["layout.npz"]
    back = patternc.load_compiled(path)
    assert back.source == cp.source
    assert (back.q_len, back.kv_len, back.num_heads, back.block_size) == (200, 150, 2, (32, 16))
    np.testing.assert_array_equal(back.layout.kinds, cp.layout.kinds)
    # not a pickle: numpy opens it with allow_pickle=False
    with np.load(path, allow_pickle=False) as z:
        assert z["kinds"].dtype == np.uint8


def test_save_without_npz_suffix_keeps_the_name(tmp_path):
    cp = patternc.compile("causal", q_len=16, block_size=8)
    cp.save(tmp_path / "out.layout")
    assert (tmp_path / "out.layout").exists() and not (tmp_path / "out.layout.npz").exists()
    assert patternc.load_compiled(tmp_path / "out.layout").source == "causal"


def test_failed_save_leaves_nothing(tmp_path, monkeypatch):
    cp = patternc.compile("causal", q_len=16, block_size=8)

    def boom(*a, **k):
        raise OSError("disk full")

    monkeypatch.setattr(np, "savez_compressed", boom)
    with pytest.raises(OSError):
        cp.save(tmp_path / "x.npz")
    assert list(tmp_path.iterdir()) == []
    with pytest.raises(OSError):
        cp.save(tmp_path / "missing-folder" / "x.npz")


def test_corrupt_and_tampered_artifacts_are_rejected(tmp_path):
    cp = patternc.compile("local(w=8) & causal", q_len=64, block_size=16)
    good = tmp_path / "good.npz"
    cp.save(good)
    junk = tmp_path / "junk.npz"
    junk.write_bytes(b"not a zip file at all")
    truncated = tmp_path / "trunc.npz"
    truncated.write_bytes(good.read_bytes()[:40])
    tampered = tmp_path / "tampered.npz"
    kinds = np.array(cp.layout.kinds)
    kinds[0, 3, 0] = 2
    with np.load(good) as z:
        np.savez(tampered, kinds=kinds, meta=z["meta"])
    other = tmp_path / "other.npz"
    np.savez(other, a=np.zeros(3))
    for path in (junk, truncated, tampered, other):
        with pytest.raises(PatternError) as ei:
            patternc.load_compiled(path)
        assert ei.value.code == "P304" and str(path) in str(ei.value)
    assert patternc.load_compiled(tampered, verify=False).layout.kinds[0, 3, 0] == 2
    with pytest.raises(OSError):
        patternc.load_compiled(tmp_path / "absent.npz")


def test_large_compile_stays_in_tiles():
    # 131072 tokens with 128-token blocks: 1024 x 1024 tiles, no token-level work
    cp = patternc.compile("(local(w=512) | strided(s=256)) & causal", q_len=131072)
    assert cp.layout.kinds.shape == (1, 1024, 1024)
    # hand count by tile diagonal t = q_block - kv_block: a tile holds d = i - j in
    # [128t - 127, 128t + 127]; t = 1..3 lie inside the window (FULL), t = 0 and 4 are cut by
    # causal / the window, and beyond it only even t contain a multiple of 256
    full = sum(1024 - t for t in (1, 2, 3))
    partial = 1024 + (1024 - 4) + sum(1024 - t for t in range(6, 1024, 2))
    assert (cp.layout.full_blocks, cp.layout.partial_blocks) == (full, partial)
    i = np.arange(131072)
    local = np.minimum(i + 1, 512).sum()
    # keys at distances 512, 768, ... <= i (distances 0 and 256 are inside the window)
    strided_beyond = np.maximum(i // 256 - 1, 0).sum()
    assert cp.allowed_pairs == local + strided_beyond


# ---- the exact counting engines against brute force ----------------------------------------------


@pytest.mark.parametrize("src", [
    "fixed(l=10, c=2) & causal", "(summary(l=6, c=2) & strided(s=5)) | (chunk(l=11) & ~band(left=2, right=1))",
    "(chunk(l=7) - summary(l=7, c=2)) | (prefix(n=9) & ~causal)", "global(at=[3, 40, 41]) & local(w=9) | sink(n=2)",
    "(random(r=3) & causal) | (random(r=2, seed=5) & ~local(w=30))", "blocks(3, random(r=2) & causal) | local(w=4)",
])
@pytest.mark.parametrize("small_tables", [False, True])
def test_rect_counts_engines_agree_with_brute_force(src, small_tables, monkeypatch):
    from patternc.lower import lowering as lower

    if small_tables:  # force the "present atom assignments only" path of the column sweep
        monkeypatch.setattr(lower, "MAX_TABLE_ENTRIES", 0)
    q_len, kv_len = 150, 170
    p = patternc.compile(src, q_len=q_len, kv_len=kv_len).pattern
    rng = np.random.default_rng(7)
    for n in (5, 300):  # few rectangles (loops) and many (2-D prefix sums over segments)
        q0 = rng.integers(0, q_len, n)
        q1 = np.minimum(q_len, q0 + rng.integers(1, 60, n))
        k0 = rng.integers(0, kv_len, n)
        k1 = np.minimum(kv_len, k0 + rng.integers(1, 60, n))
        got = lower.rect_counts(p, q0, q1, k0, k1, q_len, kv_len)
        ref = dense_mask(p, q_len=q_len, kv_len=kv_len)[0]
        want = [ref[a:b, c:d].sum() for a, b, c, d in zip(q0, q1, k0, k1)]
        np.testing.assert_array_equal(got, want)
