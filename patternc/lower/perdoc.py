"""Layouts, counts and dense masks of patterns with ``per_document(p)`` (SPEC §1.1, §1.7), per
batch row, without Q_LEN x KV_LEN work (numpy only; no torch).

``per_document(p)`` (X) holds on a pair iff both positions lie in one document — a maximal run
of equal consecutive ids — and ``p`` holds at the pair's offsets from the run's start, with
``q_len = kv_len =`` the run's length. So the pairs of a row split in two kinds:

* **pairs in two runs**: every X is false. They follow the *cross pattern*
  ``c = P[X := none]`` (which may still read ``document``; its layout with documents is the
  Shannon expansion of ``lower.documents``).
* **pairs inside run r** (start ``s``, length ``L``): ``document`` is true and X is ``p``
  bound at ``L``, evaluated at ``(i - s, j - s)``. Seen from the run's own origin the whole
  pattern is the *local pattern* ``P_r = localize(P, s, L)``: X becomes ``p``, ``document``
  becomes ``all``, shift-invariant primitives (``causal``, ``local``, ``band``, ``strided``,
  ``dilated``) stay, anchored ones move (``sink(n)`` -> ``sink(n - s)``, ``global``, ``prefix``
  likewise; ``chunk`` / ``summary`` / ``blocks`` stay when ``s`` is a multiple of their
  period), and anything else is wrapped in the lowering's internal ``Shifted`` node. For the
  usual ``per_document(…) & causal`` the local pattern depends on ``L`` only.

**Tile kinds of a row.** A tile whose rows and columns lie in no common run takes the cross
pattern's kind. A tile inside one run (rows and columns all in run r) takes ``P_r``'s kind on
the tile moved to the run's origin (``lower_exact`` on the run's sub-grid: the same
prefix sums and three-valued combination as every layout, over ``L`` positions). Every other
tile is counted exactly::

    count(P, T) = count(c, T) - sum_r count(c[document := all], T_r) + sum_r count(P_r, T_r - s_r)

``T_r`` the tile clipped to run r on both axes. Cost per row: O(positions + tiles + sum over
runs of the run's tiles), nothing of size Q_LEN x KV_LEN.
"""

from __future__ import annotations

import numpy as np

from ..ir.nodes import ALL, NONE, Blocks, Pattern, PerDocument, Prim
from ..ir.normalize import normalize
from ..ir.primitives import PRIMITIVES
from ..ir.specialize import bind_per_document, cdiv, substitute_document, uses_documents
from .documents import split_by_runs
from .layout import FULL, PARTIAL
from .lowering import Grid, Shifted, _kinds_from_counts, evaluate, lower_exact, rect_counts
from .runtime import runs


def cross_pattern(p: Pattern) -> Pattern:
    """``p[per_document(…) := none]``, normalised: what pairs in two documents follow."""

    def sub(n: Pattern) -> Pattern:
        if isinstance(n, PerDocument):
            return NONE
        kids = n.children()
        return n.with_children(tuple(sub(c) for c in kids)) if kids else n

    return normalize(sub(p))


def _anchored(p: Prim, s: int) -> Pattern | None:
    """An anchored primitive seen from origin ``s`` (for positions >= s), or None."""
    a = p.argdict
    if p.name in ("sink", "prefix"):
        return Prim(p.name, (("n", max(a["n"] - s, 0)),))
    if p.name == "global":
        if "n" in a:
            return Prim("global", (("n", max(a["n"] - s, 0)),))
        at = tuple(x - s for x in a["at"] if x >= s)
        return Prim("global", (("at", at),)) if at else Prim("global", (("n", 0),))
    if p.name == "chunk" and s % a["l"] == 0:
        return p
    if p.name == "summary" and s % a["l"] == 0:
        return p
    return None


def localize(p: Pattern, s: int, length: int, q_len: int, kv_len: int) -> Pattern:
    """The head-free pattern ``p`` on the pairs inside one document, in the document's own
    coordinates: ``localize(p, s, L, …)(i', j') == p(i' + s, j' + s)`` for ``0 <= i', j' < L``
    when the document covers positions ``[s, s + L)``.

    Args:
        p: head-free pattern bound at the position extents ``q_len x kv_len`` (its
            ``per_document`` children still symbolic).
        s: the document's first position; length: its length L (tokens).

    Raises:
        PatternError: P301 when ``per_document``'s pattern computes a parameter out of range
            at this document's length.
    """
    if isinstance(p, PerDocument):
        return bind_per_document(p.child, length)
    if isinstance(p, Prim):
        if p.name == "document":
            return ALL
        spec = PRIMITIVES.get(p.name)
        if spec is not None and spec.reads in ("", "d"):
            return p
        if p.name == "random":  # its draws depend on the extents: always evaluated there
            return Shifted(p, s, q_len, kv_len)
        if s == 0:
            return p
        moved = _anchored(p, s)
        return moved if moved is not None else Shifted(p, s, q_len, kv_len)
    if isinstance(p, Blocks):
        b = p.b
        if s % b == 0 and not any(isinstance(n, Prim) and n.name == "random" for n in p.walk()):
            return Blocks(b, localize(p.child, s // b, cdiv(length, b), cdiv(q_len, b), cdiv(kv_len, b)))
        return Shifted(p, s, q_len, kv_len)
    kids = p.children()
    if not kids:
        return p
    return p.with_children(tuple(localize(c, s, length, q_len, kv_len) for c in kids))


def _origin_free(p: Pattern) -> bool:
    """True when ``localize(p, s, L)`` does not depend on ``s`` (only shift-invariant
    primitives outside ``per_document``)."""
    if isinstance(p, PerDocument):
        return True
    if isinstance(p, Prim):
        spec = PRIMITIVES.get(p.name)
        return p.name == "document" or (spec is not None and spec.reads in ("", "d"))
    if isinstance(p, Blocks):
        return False
    return all(_origin_free(c) for c in p.children())


class RowParts:
    """The pieces of one head-free pattern with ``per_document`` at fixed extents.

    Attributes:
        pattern: the head pattern P.
        cross: ``P[per_document := none]`` (pairs in two documents; may read ``document``).
        inside_cross: ``cross`` on pairs inside one document (``document := all``).
    """

    def __init__(self, pattern: Pattern, q_len: int, kv_len: int):
        self.pattern, self.q_len, self.kv_len = pattern, q_len, kv_len
        self.cross = cross_pattern(pattern)
        self.inside_cross = substitute_document(self.cross, ALL) if uses_documents(self.cross) else self.cross
        self._origin_free = _origin_free(pattern)
        # the inner patterns read neither q_len / kv_len nor random: every document's local
        # pattern is the same predicate whatever its length, so one index space (``domain``)
        # serves every document and the prefix sums / sweep plans are shared (cached)
        self._length_free = not any(
            isinstance(n, PerDocument) and (n.child.is_symbolic() or any(
                isinstance(x, Prim) and x.name == "random" for x in n.child.walk()))
            for n in pattern.walk())
        self._local: dict = {}

    def domain(self, length: int, longest: int) -> int:
        """The index space (tokens) to lower a document of ``length`` tokens in: its own length,
        or, when the local pattern does not depend on it, one power of two >= ``longest`` (the
        row's longest document) shared by every document."""
        if not self._length_free:
            return length
        return 1 << max(0, int(longest) - 1).bit_length()

    def local(self, s: int, length: int) -> Pattern:
        """``localize(P, s, L)`` (memoised; keyed on L alone when it does not depend on s)."""
        key = (None if self._origin_free else s, None if self._length_free else length)
        out = self._local.get(key)
        if out is None:
            out = localize(self.pattern, s, length, self.q_len, self.kv_len)
            if len(self._local) > 4096:
                self._local.clear()
            self._local[key] = out
        return out


def _run_table(ids_row: np.ndarray):
    starts, run_of = runs(ids_row)
    ends = np.append(starts[1:], ids_row.size)
    return starts, ends, run_of


def row_kinds(parts: RowParts, ids_row: np.ndarray, g: Grid, cross_kinds: np.ndarray, cross_counts) -> np.ndarray:
    """Exact kinds uint8 [nq, nk] of one head of one batch row.

    Args:
        parts: the head's ``RowParts``.
        ids_row: int64 [P] document ids of the row (P >= the extents).
        g: the tiles (positions), ``Grid.uniform`` of the compile.
        cross_kinds: uint8 [nq, nk], the kinds of ``parts.cross`` with this row's documents.
        cross_counts: ``cross_counts(q0, q1, k0, k1) -> int64 [n]``, allowed pairs of
            ``parts.cross`` with this row's documents in rectangles (positions).
    """
    starts, ends, run_of = _run_table(ids_row)
    longest = int((ends - starts).max())
    k = np.array(cross_kinds, dtype=np.uint8, copy=True)
    rq0, rq1 = run_of[g.q0], run_of[g.q1 - 1]
    rk0, rk1 = run_of[g.k0], run_of[g.k1 - 1]
    lo = max(int(rq0[0]), int(rk0[0]))
    hi = min(int(rq1[-1]), int(rk1[-1]))
    if hi < lo:
        return k
    # boundary pieces: (tile row, tile col, run, clipped rectangle)
    b_a, b_c, b_delta = [], [], []
    cross_a, cross_c, cross_rect = [], [], []
    pending: dict = {}  # (local pattern, domain) -> [(positions in delta, rectangles)]
    offset = 0
    for r in range(lo, hi + 1):
        a0, a1 = int(np.searchsorted(rq1, r, side="left")), int(np.searchsorted(rq0, r, side="right"))
        c0, c1 = int(np.searchsorted(rk1, r, side="left")), int(np.searchsorted(rk0, r, side="right"))
        if a1 <= a0 or c1 <= c0:
            continue
        s, e = int(starts[r]), int(ends[r])
        L = e - s
        pl = parts.local(s, L)
        Ld = parts.domain(L, longest)
        lq0, lq1 = np.maximum(g.q0[a0:a1], s) - s, np.minimum(g.q1[a0:a1], e) - s
        lk0, lk1 = np.maximum(g.k0[c0:c1], s) - s, np.minimum(g.k1[c0:c1], e) - s
        kr = lower_exact(pl, Grid(lq0, lq1, lk0, lk1, Ld, Ld))
        inside = ((rq0[a0:a1] == r) & (rq1[a0:a1] == r))[:, None] & ((rk0[c0:c1] == r) & (rk1[c0:c1] == r))[None, :]
        sub = k[a0:a1, c0:c1]
        sub[inside] = kr[inside]
        ba, bc = np.nonzero(~inside)
        if ba.size == 0:
            continue
        area = (lq1 - lq0)[ba] * (lk1 - lk0)[bc]
        kk = kr[ba, bc]
        cnt = np.where(kk == FULL, area, 0).astype(np.int64)
        part = np.flatnonzero(kk == PARTIAL)
        if part.size:  # counted below, one call per distinct local pattern
            pending.setdefault((pl, Ld), []).append(
                (offset + part, lq0[ba[part]], lq1[ba[part]], lk0[bc[part]], lk1[bc[part]]))
        offset += ba.size
        b_a.append(ba + a0)
        b_c.append(bc + c0)
        b_delta.append(cnt)
        cross_rect.append(np.stack([lq0[ba] + s, lq1[ba] + s, lk0[bc] + s, lk1[bc] + s]))
        cross_a.append(ba + a0)
        cross_c.append(bc + c0)
    if not b_a:
        return k
    a, c = np.concatenate(b_a), np.concatenate(b_c)
    delta = np.concatenate(b_delta)
    for (pl, Ld), items in pending.items():
        at, q0, q1, k0, k1 = (np.concatenate(x) for x in zip(*items))
        delta[at] = rect_counts(pl, q0, q1, k0, k1, Ld, Ld)
    rect = np.concatenate(cross_rect, axis=1)
    delta = delta - rect_counts(parts.inside_cross, rect[0], rect[1], rect[2], rect[3], g.q_len, g.kv_len)
    nk = g.shape[1]
    tile = a * nk + c
    u, inv = np.unique(tile, return_inverse=True)
    ua, uc = np.divmod(u, nk)
    total = cross_counts(g.q0[ua], g.q1[ua], g.k0[uc], g.k1[uc])
    total = total + np.bincount(inv, weights=delta, minlength=u.size).astype(np.int64)
    k[ua, uc] = _kinds_from_counts(total, (g.q1 - g.q0)[ua] * (g.k1 - g.k0)[uc])
    return k


def row_counts(parts: RowParts, ids_row: np.ndarray, q0, q1, k0, k1, cross_counts) -> np.ndarray:
    """int64 [n]: allowed pairs of ``parts.pattern`` with one row's documents in each
    rectangle ``[q0, q1) x [k0, k1)`` (positions); ``cross_counts`` as in ``row_kinds``."""
    q0, q1, k0, k1 = (np.asarray(x, dtype=np.int64) for x in (q0, q1, k0, k1))
    out = np.asarray(cross_counts(q0, q1, k0, k1), dtype=np.int64).copy()
    if q0.size == 0:
        return out
    starts, ends, run_of = _run_table(ids_row)
    owner, r, sq0, sq1, sk0, sk1 = split_by_runs(q0, q1, k0, k1, run_of, starts, ends)
    if owner.size == 0:
        return out
    delta = -rect_counts(parts.inside_cross, sq0, sq1, sk0, sk1, parts.q_len, parts.kv_len)
    longest = int((ends - starts).max())
    for run in np.unique(r).tolist():
        sel = r == run
        s, e = int(starts[run]), int(ends[run])
        Ld = parts.domain(e - s, longest)
        delta[sel] += rect_counts(parts.local(s, e - s), sq0[sel] - s, sq1[sel] - s, sk0[sel] - s, sk1[sel] - s,
                                  Ld, Ld)
    return out + np.bincount(owner, weights=delta, minlength=q0.size).astype(np.int64)


def row_dense(parts: RowParts, ids_row: np.ndarray, cross_dense: np.ndarray, q_offset: int, kv_offset: int) -> np.ndarray:
    """bool [Q_LEN, KV_LEN] of one head of one row (small sizes): ``cross_dense`` (the cross
    pattern with the row's documents) with every document's own block evaluated locally."""
    out = np.array(cross_dense, dtype=bool, copy=True)
    Q, K = out.shape
    starts, ends, _ = _run_table(ids_row)
    for s, e in zip(starts.tolist(), ends.tolist()):
        r0, r1 = max(s, q_offset), min(e, q_offset + Q)
        c0, c1 = max(s, kv_offset), min(e, kv_offset + K)
        if r1 <= r0 or c1 <= c0:
            continue
        L = e - s
        i = np.arange(r0 - s, r1 - s, dtype=np.int64)[:, None]
        j = np.arange(c0 - s, c1 - s, dtype=np.int64)[None, :]
        m = evaluate(parts.local(s, L), i, j, L, L)
        out[r0 - q_offset:r1 - q_offset, c0 - kv_offset:c1 - kv_offset] = np.broadcast_to(m, (r1 - r0, c1 - c0))
    return out


__all__ = ["cross_pattern", "localize", "RowParts", "row_kinds", "row_counts", "row_dense"]
