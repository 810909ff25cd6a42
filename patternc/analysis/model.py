"""The reachability model shared by every engine (SPEC §4).

Positions ``0 .. n-1`` (Q_LEN = KV_LEN = n). In layer ``m`` information flows from key ``j``
to query ``i`` when ``attend(m, h, i, j)`` holds for some head ``h < num_heads``, or when
``i == j`` (the residual path). Layer ``m`` uses entry ``m mod P`` of every ``layers(...)``
(``P`` = the pattern's layer period). ``Stack`` holds the bound per-layer patterns, the
distinct head patterns of each layer, and answers the questions the engines and the
witness paths ask: the keys of one query row, whether one edge exists, and which part of
the pattern allows it.

Pairs: ``"earlier"`` asks for every ``j <= i``, ``"all"`` for every ``(i, j)``.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import NamedTuple

import numpy as np

from ..ir.nodes import Pattern
from .predicate import evaluate, explain

MODES = ("earlier", "all")


class Hop(NamedTuple):
    """One hop of a witness path: in ``layer``, query ``to_pos`` receives key ``from_pos``.

    ``via`` names what allowed it: the part of the pattern (``explain``), or ``"residual"``
    when ``from_pos == to_pos``. ``head`` is the head whose pattern allowed it (None for the
    residual path).
    """

    layer: int
    from_pos: int
    to_pos: int
    via: str
    head: int | None = None

    def to_json(self) -> dict:
        return {"layer": self.layer, "from": self.from_pos, "to": self.to_pos, "via": self.via, "head": self.head}


@dataclass
class Stack:
    """A pattern prepared for analysis at one length.

    Attributes:
        pattern: the canonical pattern (unbound).
        n: Q_LEN = KV_LEN, tokens.
        num_heads: H.
        period: P, the number of distinct layer entries (``pattern.num_layers``).
        layer_patterns: P bound patterns, entry m = layer m (mod P).
        heads: per entry, the distinct head patterns as ``(first head index, pattern)``.
    """

    pattern: Pattern
    n: int
    num_heads: int
    period: int = field(init=False)
    layer_patterns: list = field(init=False)
    heads: list = field(init=False)

    def __post_init__(self):
        self.period = self.pattern.num_layers
        self.layer_patterns = []
        self.heads = []
        from ..ir.specialize import head_patterns, specialize

        for m in range(self.period):
            lp = specialize(self.pattern, q_len=self.n, kv_len=self.n, layer=m)
            self.layer_patterns.append(lp)
            seen = {}
            for h, hp in enumerate(head_patterns(lp, self.num_heads)):  # heads past the period repeat
                seen.setdefault(hp, h)
            self.heads.append([(h, hp) for hp, h in seen.items()])

    def entry(self, layer: int) -> int:
        return layer % self.period

    def attend(self, layer: int, i, j) -> np.ndarray:
        """bool, broadcast of ``i`` and ``j``: some head of ``layer`` lets ``i`` attend ``j``
        (no residual)."""
        out = None
        for _h, hp in self.heads[self.entry(layer)]:
            v = evaluate(hp, 0, i, j, self.n, self.n)
            out = v if out is None else out | v
        return out

    def row(self, layer: int, i: int) -> np.ndarray:
        """bool [n]: the keys query ``i`` may attend in ``layer`` (some head), plus ``i``."""
        r = np.array(self.attend(layer, np.int64(i), np.arange(self.n, dtype=np.int64)), dtype=bool)
        r[i] = True
        return r

    def hop(self, layer: int, src: int, dst: int) -> Hop:
        """The Hop ``src -> dst`` in ``layer`` with its ``via``.

        Raises:
            AssertionError: the edge does not exist (an engine produced an invalid path).
        """
        if src == dst:
            return Hop(layer, src, dst, "residual", None)
        for h, hp in self.heads[self.entry(layer)]:
            why = explain(hp, 0, dst, src, self.n, self.n)
            if why is not None:
                return Hop(layer, src, dst, why, h)
        raise AssertionError(f"no head of layer {layer} lets query {dst} attend key {src}")

    def validate_path(self, path: list[Hop], i: int, j: int) -> bool:
        """True when ``path`` goes from key ``j`` (layer 0) to query ``i`` through allowed hops."""
        pos = j
        for m, hop in enumerate(path):
            if hop.layer != m or hop.from_pos != pos:
                return False
            if hop.to_pos != hop.from_pos and not bool(self.attend(m, np.int64(hop.to_pos), np.int64(hop.from_pos))):
                return False
            pos = hop.to_pos
        return pos == i


def required_pair(mode: str, i: int, j: int) -> bool:
    return mode == "all" or j <= i


def hardest_key(mode: str, i: int, j: int) -> tuple:
    """Sort key choosing the success witness among pairs that need the most layers: the
    farthest pair (largest i - j, or |i - j| for ``all``), then the smallest i."""
    return (-abs(i - j), i, j)


def nearest_key(i: int, j: int) -> tuple:
    """Sort key choosing the failure witness among unreachable pairs: the closest pair
    (smallest |i - j|), then the smallest i."""
    return (abs(i - j), i, j)
