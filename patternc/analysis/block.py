"""``block-bound``: proven bounds on ``min_layers`` from block layouts, for very long sequences.

Cut the positions into blocks of ``b`` tokens and read each layer's layout (union over
heads). Two block graphs come out of it:

* the FULL graph: an edge J -> I when tile (I, J) is FULL in some head. If a FULL tile
  (I, J) is used in layer m, every token of block I receives every token of block J; and
  if every token of B already holds all of block J, a FULL tile (I, B) hands all of J to
  every token of I. So a walk J -> ... -> I of k steps in the FULL graph (staying put is a
  step too: the residual path) proves that **every** token pair (i in I, j in J) is
  connected within k layers. Pairs inside one block are proven by a layer whose diagonal
  tile allows every required pair of the tile (evaluated token by token: the refinement
  of PARTIAL diagonal tiles; for ``earlier`` this is every j <= i inside the block).
  Together: ``min_layers <= upper_bound``.
* the non-EMPTY graph: an edge J -> I when tile (I, J) is not EMPTY in some head, plus
  self-loops. A token path of k hops maps to a block walk of k steps, so if no walk of
  fewer than k steps leads from J to I, no token of J reaches a token of I in fewer than k
  layers: ``min_layers >= lower_bound``; and a block pair that no walk connects proves
  "never" exactly.

When the two bounds meet (always for patterns written with ``blocks(b, ...)`` at that block
size), the answer is exact. Both graphs are analysed with the token engine, whose
"tokens" are here the blocks.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np

from ..ir.specialize import cdiv
from . import token as tok
from .model import Hop
from .tiles import dense_tiles, layer_tiles

MAX_BLOCKS = 8192


def default_block_size(n: int) -> int:
    """The smallest power of two keeping the block count <= MAX_BLOCKS (1 for short inputs)."""
    need = cdiv(n, MAX_BLOCKS)
    return 1 << max(0, math.ceil(math.log2(need))) if need > 1 else 1


@dataclass
class BlockResult:
    exact: bool
    lower: int | None
    upper: int | None
    never: bool
    block_size: int
    hardest: tuple[int, int] | None = None       # token pair realising the upper bound
    unreachable: tuple[int, int] | None = None   # token pair proven never connected
    unproven: tuple[int, int] | None = None      # token pair not covered by the FULL graph
    reason: str | None = None
    path_fn: object = None
    lower_pair: tuple[int, int] | None = None    # a token pair needing >= lower layers
    walk_fn: object = None                        # token path of any pair in other blocks, from the
                                                  # FULL-graph walk (None when it does not connect all)

    def real_pair(self):
        """``lower_pair`` when it can be shown with a FULL-walk path: a pair that really needs
        ``lower`` layers (the non-EMPTY block graph proves it), unlike ``hardest``, which is
        only the pair the FULL-tile proof reaches last (it may need far fewer: a key in the
        first block of ``sink(n=4) | local(w)`` is in the same block as the sinks)."""
        if self.lower_pair is None or self.walk_fn is None:
            return None
        i, j = self.lower_pair
        return self.lower_pair if i // self.block_size != j // self.block_size else None


class BlockAnalysis:
    def __init__(self, stack, block_size: int | None = None):
        self.stack = stack
        n = stack.n
        self.n = n
        self.b = b = block_size or default_block_size(n)
        self.nb = nb = cdiv(n, b)
        if nb > 4 * MAX_BLOCKS:
            raise tok.TooLarge(f"{nb} blocks of {b} tokens; use a larger block size")
        self.tiles = [layer_tiles(stack, m, b) for m in range(stack.period)]
        self.full = [t.full for t in self.tiles]
        self.nonempty = [t.nonempty | np.eye(nb, dtype=bool) for t in self.tiles]
        sb = max(8, min(128, 1 << max(3, math.ceil(math.log2(max(nb, 2))) - 3)))
        self.sb = sb
        self.full_adj = [tok.Adjacency(dense_tiles(f, sb)) for f in self.full]
        self.any_adj = [tok.Adjacency(dense_tiles(a, sb)) for a in self.nonempty]

    # token <-> block helpers
    def first(self, B):
        return B * self.b

    def last(self, B):
        return min(self.n, (B + 1) * self.b) - 1

    def _diag_levels(self, mode) -> np.ndarray:
        """int64 [nb]: first layer count after which a block's inner required pairs are all
        connected by a single diagonal tile; 0 for one-token blocks; -1 when no layer does."""
        n, b, nb = self.n, self.b, self.nb
        sizes = np.minimum(b, n - np.arange(nb) * b)
        level = np.where(sizes <= 1, 0, -1).astype(np.int64)
        if b == 1:
            return level
        r = np.arange(b)
        req = (r[None, :] <= r[:, None]) if mode == "earlier" else np.ones((b, b), dtype=bool)
        for m, t in enumerate(self.tiles):
            todo = np.flatnonzero(level < 0)
            if len(todo) == 0:
                break
            ok = t.full[todo, todo].copy()
            ev = todo[~ok & t.nonempty[todo, todo]]
            for s in range(0, len(ev), max(1, (1 << 22) // (b * b))):
                blk = ev[s:s + max(1, (1 << 22) // (b * b))]
                q = blk[:, None] * b + r[None, :]                     # [k, b]
                inside = q < n
                qc = np.minimum(q, n - 1)
                m_ = np.asarray(t.mask(qc[:, :, None], qc[:, None, :]), dtype=bool)
                need = req[None] & inside[:, :, None] & inside[:, None, :]
                good = (m_ | ~need).all(axis=(1, 2))
                ok[np.searchsorted(todo, blk[good])] = True
            level[todo[ok]] = m + 1
        return level

    def run(self, mode: str) -> BlockResult:
        n, b = self.n, self.b
        anyr = tok.reach(self.any_adj, self.nb, mode)
        if anyr.never:
            I, J = anyr.unreachable
            i, j = (self.first(I), self.last(J)) if J < I else (self.last(I), self.first(J))
            if b == 1:
                reason = "no chain of allowed hops leads from the key to the query at any depth"
            else:
                reason = (f"no chain of non-empty tiles (blocks of {b} tokens) leads from key block {J} to query "
                          f"block {I} at any depth, so no token of one reaches a token of the other")
            return BlockResult(exact=True, lower=None, upper=None, never=True, block_size=b,
                               unreachable=(i, j), reason=reason)
        lower = max(anyr.min_layers, 1 if n >= 2 else 0)
        lower_pair = None
        if anyr.hardest is not None and anyr.min_layers == lower:
            I, J = anyr.hardest
            lower_pair = self._far_tokens(I, J)
        fullr = tok.reach(self.full_adj, self.nb, mode)
        diag_raw = self._diag_levels(mode)
        diag = None if (diag_raw < 0).any() else diag_raw
        upper = None
        hardest = None
        path_fn = None
        unproven = None
        if fullr.min_layers is not None and diag is not None:
            upper = max(fullr.min_layers, int(diag.max()) if len(diag) else 0)
            if fullr.min_layers >= int(diag.max()):
                I, J = fullr.hardest
                hardest = self._far_tokens(I, J)
                path_fn = lambda i_, j_, K_: self.block_path(i_, j_, K_)
            else:
                B = int(np.argmax(diag))
                hardest = (self.last(B), self.first(B))
                path_fn = lambda i_, j_, K_, _B=B: self.diag_path(i_, j_, K_, int(diag[_B]))
        else:
            if fullr.never:
                I, J = fullr.unreachable
                unproven = self._far_tokens(I, J)
            elif diag is None:
                B = int(np.flatnonzero(diag_raw < 0)[0])
                unproven = (self.last(B), self.first(B))
        exact = upper is not None and upper == lower
        walk_fn = (lambda i_, j_, K_: self.block_path(i_, j_, K_)) if fullr.min_layers is not None else None
        if upper is None and lower_pair is None:
            lower_pair = unproven
        return BlockResult(exact=exact, lower=lower, upper=upper, never=False, block_size=b, hardest=hardest,
                           unproven=unproven, path_fn=path_fn, lower_pair=lower_pair, walk_fn=walk_fn)

    def _far_tokens(self, I, J):
        if J <= I:
            return (self.last(I), self.first(J))
        return (self.first(I), self.last(J))

    def block_path(self, i: int, j: int, K: int) -> list[Hop]:
        """Token path from a FULL-graph block walk: each real block step enters the next block
        at its first token (at ``i`` for the last one); every hop is inside a FULL tile."""
        b, P = self.b, len(self.full)
        I, J = i // b, j // b
        sets = tok.forward(self.full_adj, J, K)
        blocks = [I]
        cur = I
        for m in range(K - 1, -1, -1):
            prev = sets[m][:self.nb]
            if prev[cur]:
                blocks.append(cur)
                continue
            cand = np.flatnonzero(prev & self.full[m % P][cur])
            cur = int(cand[0])
            blocks.append(cur)
        blocks = blocks[::-1]  # block after 0 .. K layers
        assert blocks[0] == J and blocks[-1] == I
        hops = []
        pos = j
        last_move = max((t for t in range(K) if blocks[t + 1] != blocks[t]), default=-1)
        for m in range(K):
            if blocks[m + 1] == blocks[m]:
                hops.append(self.stack.hop(m, pos, pos))
                continue
            nxt = i if m == last_move else self.first(blocks[m + 1])
            hops.append(self.stack.hop(m, pos, nxt))
            pos = nxt
        if pos != i:  # a walk that ends in block I before its last layer, or J == I
            raise AssertionError("block walk did not end at the query")
        return hops

    def diag_path(self, i: int, j: int, K: int, at: int) -> list[Hop]:
        hops = []
        pos = j
        for m in range(K):
            if m == at - 1 and pos != i:
                hops.append(self.stack.hop(m, pos, i))
                pos = i
            else:
                hops.append(self.stack.hop(m, pos, pos))
        return hops
