"""Which rank owns which query blocks, and which key/value positions each rank must receive.

numpy only (no torch, no process group): every rank computes the same schedule from the same
layout, so the schedule itself costs no communication.

Basics
    Positions are owned in whole **query blocks** (``Q_BLOCK_SIZE`` tokens; the last one may be
    ragged). A rank owns the query, key and value rows of its positions. The work of query
    block ``b`` is its number of computed tiles, ``weight[b]`` = the non-EMPTY tiles of row
    ``b`` summed over heads (and over the batch axis of a layout built with run-time data).

``balance="contiguous"``
    ``W`` equal chunks of query blocks, in order (rank ``r`` gets blocks
    ``[r * nq // W, (r + 1) * nq // W)``): the classic split; for ``causal`` at 4 ranks the
    last rank computes 1.75x the mean.

``balance="tiles"``
    Candidates, each scored by its imbalance (max / mean computed tiles) and the key/value
    positions it makes ranks receive (exact, from the layout):

    1. contiguous ranges with the least possible maximum weight (the linear-partition
       problem: binary search on the capacity, greedy fill), which keeps a banded pattern's
       exchange a halo;
    2. "snake" orders: ``m * W`` contiguous segments of equal weight dealt to ranks
       0, 1, …, W-1, W-1, …, 0, … (``m = 2`` is the head-tail split of causal load balancing);
    3. greedy longest-processing-time (heaviest block to the least loaded rank), the
       best balance for any weights.

    The candidate with the least received positions among those within ``tolerance`` of
    perfect balance wins; when none is, the best balanced one.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from ..lower.layout import EMPTY

BALANCES = ("tiles", "contiguous")
#: accepted imbalance (max / mean computed tiles - 1) before a better-balanced, costlier schedule is taken
TOLERANCE = 0.03


@dataclass(frozen=True)
class Schedule:
    """Who owns what and who sends what to whom (identical on every rank).

    Attributes:
        world: number of ranks W.
        owner: int64 [num_q_blocks]: the rank that owns each query block.
        positions: per rank, int64 [n_r] owned token positions, ascending.
        q_blocks: per rank, int64 [nq_r] owned query blocks, ascending.
        kv_blocks: per rank, int64 [nkv_r] key/value blocks its computed tiles read, ascending.
        tiles: int64 [W] computed (non-EMPTY) tiles per rank, over heads and batch.
        method: which candidate was chosen ("contiguous", "contiguous-balanced", "snake-m", "lpt").
        q_block_size, kv_block_size, seq_len: tokens.
    """

    world: int
    owner: np.ndarray
    positions: tuple
    q_blocks: tuple
    kv_blocks: tuple
    tiles: np.ndarray
    method: str
    q_block_size: int
    kv_block_size: int
    seq_len: int

    def buffer_positions(self, rank: int) -> np.ndarray:
        """int64 [n]: the key/value positions rank ``rank`` computes with (its gathered buffer),
        ascending: every token of every block in ``kv_blocks[rank]``."""
        return _block_tokens(self.kv_blocks[rank], self.kv_block_size, self.seq_len)

    def position_owner(self, pos: np.ndarray) -> np.ndarray:
        """int64 [n]: the rank that owns each token position."""
        return self.owner[np.asarray(pos, dtype=np.int64) // self.q_block_size]

    def receives(self, rank: int, peer: int) -> np.ndarray:
        """int64 [n]: positions ``rank`` receives from ``peer`` (ascending; empty for itself)."""
        if rank == peer:
            return np.zeros(0, dtype=np.int64)
        buf = self.buffer_positions(rank)
        return buf[self.position_owner(buf) == peer]

    def received_positions(self) -> np.ndarray:
        """int64 [W]: key/value positions each rank receives in the forward exchange."""
        return np.array([sum(self.receives(r, p).size for p in range(self.world)) for r in range(self.world)],
                        dtype=np.int64)

    @property
    def imbalance(self) -> float:
        """max / mean computed tiles over ranks (1.0 = perfect; 1.0 when there is no work)."""
        total = int(self.tiles.sum())
        return float(self.tiles.max() * self.world / total) if total else 1.0


def _block_tokens(blocks: np.ndarray, block: int, length: int) -> np.ndarray:
    blocks = np.asarray(blocks, dtype=np.int64)
    if blocks.size == 0:
        return np.zeros(0, dtype=np.int64)
    tok = (blocks[:, None] * block + np.arange(block, dtype=np.int64)).reshape(-1)
    return tok[tok < length]


def block_weights(kinds: np.ndarray) -> np.ndarray:
    """int64 [num_q_blocks]: computed tiles of each query block row.

    Args:
        kinds: uint8 [H, nq, nkv] or [B, H, nq, nkv] (a layout with run-time data).
    """
    k = np.asarray(kinds)
    k = k.reshape(-1, k.shape[-2], k.shape[-1])
    return (k != EMPTY).sum(axis=(0, 2)).astype(np.int64)


def row_reads(kinds: np.ndarray) -> np.ndarray:
    """bool [nq, nkv]: query block row ``b`` reads key/value block ``c`` for some head (and batch)."""
    k = np.asarray(kinds)
    k = k.reshape(-1, k.shape[-2], k.shape[-1])
    return (k != EMPTY).any(axis=0)


# ---- candidate assignments ------------------------------------------------------------------
def contiguous(nq: int, world: int) -> np.ndarray:
    """owner [nq]: W equal chunks of query blocks in order."""
    return (np.arange(nq, dtype=np.int64) * world) // max(nq, 1)


def _greedy_cuts(w: np.ndarray, cap: int) -> list[int] | None:
    """Segment starts filling each segment up to ``cap``; None if a block exceeds it."""
    starts, acc = [0], 0
    for b, x in enumerate(w.tolist()):
        if x > cap:
            return None
        if acc + x > cap:
            starts.append(b)
            acc = 0
        acc += x
    return starts


def contiguous_balanced(w: np.ndarray, world: int) -> np.ndarray:
    """owner [nq]: contiguous ranges minimising the largest weight (binary search + greedy)."""
    nq = w.size
    if nq == 0:
        return np.zeros(0, dtype=np.int64)
    lo, hi = int(w.max()), int(w.sum())
    while lo < hi:
        mid = (lo + hi) // 2
        cuts = _greedy_cuts(w, mid)
        if cuts is not None and len(cuts) <= world:
            hi = mid
        else:
            lo = mid + 1
    cuts = _greedy_cuts(w, lo) + [nq]
    owner = np.zeros(nq, dtype=np.int64)
    for r in range(len(cuts) - 1):
        owner[cuts[r]:cuts[r + 1]] = r
    return owner


def snake(w: np.ndarray, world: int, m: int) -> np.ndarray:
    """owner [nq]: ``m * world`` equal-weight contiguous segments dealt 0..W-1, W-1..0, …"""
    nq = w.size
    segs = m * world
    total = int(w.sum())
    if nq == 0:
        return np.zeros(0, dtype=np.int64)
    if total == 0:
        seg = (np.arange(nq) * segs) // nq
    else:
        mid = np.cumsum(w) - w / 2.0  # weight before the middle of each block
        seg = np.minimum((mid * segs / total).astype(np.int64), segs - 1)
    rnd, pos = seg // world, seg % world
    return np.where(rnd % 2 == 0, pos, world - 1 - pos).astype(np.int64)


def lpt(w: np.ndarray, world: int) -> np.ndarray:
    """owner [nq]: heaviest block first to the least loaded rank (ties: lower rank)."""
    owner = np.zeros(w.size, dtype=np.int64)
    load = np.zeros(world, dtype=np.int64)
    for b in np.argsort(-w, kind="stable").tolist():
        r = int(np.argmin(load))
        owner[b] = r
        load[r] += int(w[b])
    return owner


# ---- the schedule ----------------------------------------------------------------------------
def make_schedule(kinds: np.ndarray, *, world: int, seq_len: int, q_block_size: int, kv_block_size: int,
                  balance: str = "tiles", tolerance: float = TOLERANCE) -> Schedule:
    """The schedule of one self-attention layout over ``world`` ranks.

    Args:
        kinds: uint8 [H, nq, nkv] (or [B, H, nq, nkv]) tile kinds of a layout with
            Q_LEN = KV_LEN = ``seq_len`` tokens.
        world: number of ranks (>= 1).
        balance: ``"tiles"`` or ``"contiguous"`` (see the module docstring).
        tolerance: accepted imbalance for ``"tiles"`` (0.03: within 3 % of perfect).

    Raises:
        ValueError: an unknown ``balance`` or ``world`` < 1.
    """
    if balance not in BALANCES:
        raise ValueError(f"balance must be one of {', '.join(BALANCES)}, got {balance!r}")
    if world < 1:
        raise ValueError(f"world size must be >= 1, got {world}")
    w = block_weights(kinds)
    reads = row_reads(kinds)
    if balance == "contiguous":
        cands = [("contiguous", contiguous(w.size, world))]
    else:
        cands = [("contiguous-balanced", contiguous_balanced(w, world))]
        cands += [(f"snake-{m}", snake(w, world, m)) for m in (2, 4)]
        cands.append(("lpt", lpt(w, world)))
    best = None
    for method, owner in cands:
        s = _build(owner, method, w, reads, world, seq_len, q_block_size, kv_block_size)
        over = max(0.0, s.imbalance - 1.0 - tolerance)
        key = (round(over, 6), int(s.received_positions().sum()))
        if best is None or key < best[0]:
            best = (key, s)
    return best[1]


def _build(owner, method, w, reads, world, seq_len, qb, kb) -> Schedule:
    owner = np.asarray(owner, dtype=np.int64)
    q_blocks, positions, kv_blocks, tiles = [], [], [], []
    for r in range(world):
        qbs = np.nonzero(owner == r)[0].astype(np.int64)
        q_blocks.append(qbs)
        positions.append(_block_tokens(qbs, qb, seq_len))
        kv_blocks.append(np.nonzero(reads[qbs].any(axis=0))[0].astype(np.int64) if qbs.size
                         else np.zeros(0, dtype=np.int64))
        tiles.append(int(w[qbs].sum()))
    return Schedule(world=world, owner=owner, positions=tuple(positions), q_blocks=tuple(q_blocks),
                    kv_blocks=tuple(kv_blocks), tiles=np.array(tiles, dtype=np.int64), method=method,
                    q_block_size=qb, kv_block_size=kb, seq_len=seq_len)
