"""Test helpers for the reachability tests: an oracle written from SPEC §4 with dense numpy
matrices built by ``patternc.reference.dense_mask`` (independent of the engines'
evaluators), and hypothesis strategies producing pattern source text."""

from __future__ import annotations

import numpy as np
from hypothesis import strategies as st

import patternc
from patternc.reference import dense_mask


def layer_adjacency(src, n, heads, layer):
    """bool [n, n]: query i receives key j in ``layer`` (some head, or i == j)."""
    m = dense_mask(src, q_len=n, num_heads=heads, layer=layer).any(axis=0)
    return m | np.eye(n, dtype=bool)


def oracle_dist(src, n, heads=1):
    """int64 [n, n]: least number of layers from key j (column) to query i (row); -1 never.

    Iterates R_{k+1} = A_k R_k (boolean) from the identity until a full cycle of the
    layers(...) stack changes nothing."""
    p = patternc.parse(src) if isinstance(src, str) else src
    P = p.num_layers
    A = [layer_adjacency(p, n, heads, m).astype(np.int64) for m in range(P)]
    R = np.eye(n, dtype=bool)
    dist = np.where(R, 0, -1).astype(np.int64)
    k = 0
    while True:
        before = R.copy()
        for _ in range(P):
            R = (A[k % P] @ R.astype(np.int64)) > 0
            k += 1
            dist[(dist < 0) & R] = k
        if (R == before).all():
            return dist


def oracle_min_layers(dist, mode):
    req = np.ones_like(dist, dtype=bool) if mode == "all" else np.tril(np.ones_like(dist, dtype=bool))
    if (dist[req] < 0).any():
        return None
    return int(dist[req].max())


def check_path(src, n, heads, path, i, j):
    """Every hop of ``path`` is allowed by the oracle in its layer; it goes from j to i."""
    p = patternc.parse(src) if isinstance(src, str) else src
    pos = j
    for m, hop in enumerate(path):
        assert hop.layer == m
        assert hop.from_pos == pos
        if hop.to_pos != hop.from_pos:
            assert layer_adjacency(p, n, heads, m)[hop.to_pos, hop.from_pos], hop
            assert hop.via != "residual"
        else:
            assert hop.via == "residual"
        pos = hop.to_pos
    assert pos == i


# ---- strategies ---------------------------------------------------------------------------------------
def _leaf():
    return st.one_of(
        st.just("causal"),
        st.just("all"),
        st.builds(lambda w: f"local(w={w})", st.integers(1, 6)),
        st.builds(lambda l, r: f"band(left={l}, right={r})", st.integers(0, 3), st.integers(0, 3)),
        st.builds(lambda s: f"strided(s={s})", st.integers(1, 6)),
        st.builds(lambda w, d: f"dilated(w={w}, d={d})", st.integers(1, 3), st.integers(1, 3)),
        st.builds(lambda l: f"chunk(l={l})", st.integers(1, 8)),
        st.builds(lambda l, c: f"summary(l={l}, c={min(c, l)})", st.integers(1, 8), st.integers(1, 3)),
        st.builds(lambda k: f"sink(n={k})", st.integers(0, 3)),
        st.builds(lambda k: f"global(n={k})", st.integers(0, 2)),
        st.builds(lambda k: f"prefix(n={k})", st.integers(0, 5)),
        st.builds(lambda r, s: f"random(r={r}, seed={s})", st.integers(0, 2), st.integers(0, 3)),
    )


def _shift_leaf():
    return st.one_of(
        st.just("causal"),
        st.builds(lambda w: f"local(w={w})", st.integers(1, 6)),
        st.builds(lambda l, r: f"band(left={l}, right={r})", st.integers(0, 4), st.integers(0, 4)),
        st.builds(lambda s: f"strided(s={s})", st.integers(1, 7)),
        st.builds(lambda w, d: f"dilated(w={w}, d={d})", st.integers(1, 3), st.integers(1, 4)),
    )


def _combine(children):
    return st.one_of(
        st.builds(lambda a, b: f"({a}) | ({b})", children, children),
        st.builds(lambda a, b: f"({a}) & ({b})", children, children),
        st.builds(lambda a, b: f"({a}) - ({b})", children, children),
        st.builds(lambda a: f"~({a})", children),
    )


def layer_patterns(shift_only=False):
    leaf = _shift_leaf() if shift_only else _leaf()
    return st.recursive(leaf, _combine, max_leaves=4)


@st.composite
def patterns(draw, shift_only=False):
    """Source text: one pattern, or heads(...)/layers(...) of a few, optionally & causal."""
    body = layer_patterns(shift_only)
    kind = draw(st.sampled_from(["plain", "plain", "heads", "layers"]))
    if kind == "plain":
        p = draw(body)
    else:
        items = draw(st.lists(body, min_size=2, max_size=3))
        p = f"{kind}({', '.join(items)})"
    if draw(st.booleans()):
        p = f"({p}) & causal"
    if not shift_only and draw(st.integers(0, 5)) == 0:
        p = f"blocks({draw(st.integers(1, 3))}, {p})"
    return p
