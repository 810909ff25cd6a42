"""``networkx``: the layered graph model of SPEC §4, literally.

Nodes ``(m, p)``: position ``p`` after ``m`` layers (``m = 0`` is the input). Edges
``(m, p) -> (m + 1, q)`` when some head of layer ``m`` lets query ``q`` attend key ``p``, and
``(m, p) -> (m + 1, p)`` (the residual path). Key ``j`` reaches query ``i`` within ``k``
layers iff ``(k, i)`` is a descendant of ``(0, j)``; every edge goes one layer up, so the
BFS layers of ``(0, j)`` are exactly its reach sets after 0, 1, 2, ... layers.

This engine builds the whole graph (``n`` nodes and all edges per layer copy), so it is for
small sizes: it is the model the fast engines are checked against, and it gives witness
paths with ``networkx.shortest_path``. The number of layer copies grows by doubling until
every source's reach set stops growing over a full cycle of the ``layers(...)`` stack.
"""

from __future__ import annotations

from dataclasses import dataclass

import networkx as nx
import numpy as np

from .model import Hop, hardest_key, nearest_key, required_pair

MAX_TOKENS = 2048


@dataclass
class GraphResult:
    min_layers: int | None
    never: bool
    dist: np.ndarray          # int64 [n, n]: least layers from key j (column) to query i (row), -1 never
    hardest: tuple[int, int] | None
    unreachable: tuple[int, int] | None
    stalled_at: int | None


class LayeredGraph:
    """The layered graph of ``stack`` (a ``model.Stack``), grown on demand."""

    def __init__(self, stack):
        self.stack = stack
        self.n = stack.n
        self.G = nx.DiGraph()
        self.G.add_nodes_from((0, p) for p in range(self.n))
        self.depth = 0
        self._edges = {}

    def _layer_edges(self, m):
        e = self.stack.entry(m)
        if e not in self._edges:
            n = self.n
            ar = np.arange(n)
            adj = np.broadcast_to(self.stack.attend(m, ar[:, None], ar[None, :]), (n, n)) | np.eye(n, dtype=bool)
            q, k = np.nonzero(adj)
            self._edges[e] = list(zip(k.tolist(), q.tolist()))
        return self._edges[e]

    def grow(self, depth: int) -> None:
        for m in range(self.depth, depth):
            self.G.add_edges_from(((m, p), (m + 1, q)) for p, q in self._layer_edges(m))
        self.depth = max(self.depth, depth)

    def reach_sets(self, j: int) -> list[set[int]]:
        """Positions holding key j's information after 0 .. depth layers."""
        return [{p for _, p in layer} for layer in nx.bfs_layers(self.G, [(0, j)])]

    def path(self, i: int, j: int, k: int) -> list[Hop]:
        """A k-hop path from key j to query i (``networkx.shortest_path`` in the layered graph)."""
        self.grow(k)
        nodes = nx.shortest_path(self.G, (0, j), (k, i))
        return [self.stack.hop(m, p, q) for (m, p), (_, q) in zip(nodes, nodes[1:])]


def run(stack, mode: str, q_offset: int = 0, kv_offset: int = 0) -> tuple[GraphResult, LayeredGraph]:
    """Distances of every pair; required: the mode's pairs with ``i >= q_offset`` and
    ``j >= kv_offset`` (SPEC §1.6 offsets: the rows of a step / chunk, the keys kept)."""
    n, P = stack.n, stack.period
    g = LayeredGraph(stack)
    cap = n * P + P  # every cycle that changes something adds at least one position
    depth = min(cap, max(4, 2 * P))
    while True:
        g.grow(depth)
        dist = np.full((n, n), -1, dtype=np.int64)
        settled = True
        for j in range(n):
            sets = g.reach_sets(j)
            for k, s in enumerate(sets):
                for i in s:
                    if dist[i, j] < 0:
                        dist[i, j] = k
            # settled when the last full cycle added nothing, or every position is reached
            if len(sets[-1]) < n and not (len(sets) > P and sets[-1] == sets[-1 - P]):
                settled = False
        if settled or depth >= cap:
            break
        depth = min(cap, depth * 2)
    req = np.ones((n, n), dtype=bool) if mode == "all" else np.tril(np.ones((n, n), dtype=bool))
    req[:q_offset] = False
    req[:, :kv_offset] = False
    if not req.any():
        return GraphResult(0, False, dist, (q_offset, q_offset), None, None), g
    missing = req & (dist < 0)
    if missing.any():
        ii, jj = np.nonzero(missing)
        i, j = min(zip(ii.tolist(), jj.tolist()), key=lambda t: nearest_key(*t))
        last_growth = _last_growth(dist)
        return GraphResult(None, True, dist, None, (i, j), last_growth), g
    K = int(dist[req].max())
    ii, jj = np.nonzero(req & (dist == K))
    i, j = min(zip(ii.tolist(), jj.tolist()), key=lambda t: hardest_key(mode, *t))
    assert required_pair(mode, i, j)
    return GraphResult(K, False, dist, (i, j), None, None), g


def _last_growth(dist):
    return int(dist.max())
