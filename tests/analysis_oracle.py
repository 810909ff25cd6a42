"""Test helpers for the reachability tests: an oracle written from SPEC §4 with dense numpy
matrices built by ``patternc.reference.dense_mask`` (independent of the engines'
evaluators); the pattern strategies are in ``strategies.py``."""

from __future__ import annotations

import numpy as np

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
