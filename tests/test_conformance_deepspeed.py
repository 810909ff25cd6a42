"""DeepSpeed sparse-attention layouts (peer data in ``../shared/conformance/deepspeed/``,
produced by ``SparsityConfig.make_layout`` of deepspeed 0.16.4) reproduced exactly."""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import pytest

import patternc
from patternc.lower.layout import EMPTY, FULL

ROOT = Path(__file__).resolve().parents[1]


def _shared() -> Path | None:
    candidates = [ROOT.parent / "shared", ROOT / "shared"]
    if os.environ.get("PATTERNC_SHARED"):
        candidates.insert(0, Path(os.environ["PATTERNC_SHARED"]))
    git = ROOT / ".git"
    if git.is_file():  # a git worktree: shared/ sits next to the main checkout
        text = git.read_text(encoding="utf-8", errors="replace").strip()
        if text.startswith("gitdir:"):
            gitdir = Path(text.split(":", 1)[1].strip())
            for parent in gitdir.parents:
                if parent.name == ".git":
                    candidates.append(parent.parent.parent / "shared")
                    break
    for c in candidates:
        if (c / "conformance" / "deepspeed").is_dir():
            return c / "conformance" / "deepspeed"
    return None


# A copy of the peer's files is kept in tests/data/deepspeed so the conformance tests run on
# any checkout; when shared/ is next to the repository, the copy is checked against it.
VENDORED = ROOT / "tests" / "data" / "deepspeed"
SHARED = _shared()
DATA = VENDORED


@pytest.mark.skipif(SHARED is None, reason="shared/ is not next to this checkout; the vendored copy is used")
def test_vendored_copy_equals_the_shared_peer_data():
    names = sorted(p.name for p in SHARED.glob("*.npy"))
    assert names == sorted(p.name for p in VENDORED.glob("*.npy"))
    for n in names:
        np.testing.assert_array_equal(np.load(VENDORED / n), np.load(SHARED / n))

# file -> (patternc source, seq_len), from the README next to the data
CASES = {
    "dense_h2_L128.npy": ("blocks(16, all)", 128),
    "fixed_default_bi_h2_L128.npy": ("blocks(16, chunk(4) | summary(4, 1))", 128),
    "fixed_uni_h4_L256.npy": ("blocks(16, (chunk(4) | summary(4, 1)) & causal)", 256),
    "local_sliding_bi_W5_h2_L128.npy": ("blocks(16, local(3))", 128),
}


@pytest.mark.parametrize("name", sorted(CASES))
def test_deepspeed_layout_reproduced(name):
    expected = np.load(DATA / name, allow_pickle=False)
    src, seq_len = CASES[name]
    H = expected.shape[0]
    cp = patternc.compile(src, q_len=seq_len, num_heads=H, block_size=16)
    computed = (cp.layout.kinds != EMPTY).astype(np.int64)
    np.testing.assert_array_equal(computed, expected)
    # block-level layouts: every kept tile is FULL at BLOCK_SIZE 16, and the token mask is the
    # layout blown up 16 x 16
    assert set(np.unique(cp.layout.kinds).tolist()) <= {EMPTY, FULL}
    np.testing.assert_array_equal(cp.dense_mask(), np.kron(expected, np.ones((16, 16), dtype=np.int64)).astype(bool))


@pytest.mark.parametrize("name", sorted(CASES))
@pytest.mark.parametrize("bs", [32, (16, 64)])
def test_deepspeed_layout_at_coarser_blocks(name, bs):
    expected = np.load(DATA / name, allow_pickle=False)
    src, seq_len = CASES[name]
    H = expected.shape[0]
    qf, kf = (bs // 16, bs // 16) if isinstance(bs, int) else (bs[0] // 16, bs[1] // 16)
    n = expected.shape[1]
    pooled = expected.reshape(H, n // qf, qf, n // kf, kf)
    cp = patternc.compile(src, q_len=seq_len, num_heads=H, block_size=bs)
    np.testing.assert_array_equal((cp.layout.kinds != EMPTY), pooled.any(axis=(2, 4)))
    np.testing.assert_array_equal((cp.layout.kinds == FULL), pooled.all(axis=(2, 4)))
