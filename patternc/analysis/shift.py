"""``exact-shift``: reachability for shift-invariant patterns, on index differences.

A pattern built from ``local``, ``band``, ``strided``, ``dilated``, ``causal``, ``all``,
``none`` with ``~ & | -`` allows ``(i, j)`` iff ``d = i - j`` lies in a set ``S`` (per layer
entry, union over heads). Information moves from position ``x`` to ``x + d`` for ``d`` in
``S ∪ {0}``, as long as ``x + d`` stays in ``[0, n)``.

Facts used (all paths below have one step per layer):

1. Monotone paths: if a path's steps all have the sign of ``δ = i - j``, its positions stay
   between ``j`` and ``i``, so it exists for *every* pair with that difference. The least
   number of such steps, ``mono(δ)``, is computed once per δ over ``[0, n)`` (a BFS on
   the difference line, one level per layer, in the order of the layers).
2. The line: every real path is also a path on the integers, so the least number of steps
   on ``Z``, ``z(δ)``, is a lower bound for every pair with difference δ. For one set ``U``
   (the union of all layers' sets) the steps of a path can be reordered so that partial
   sums stay in ``[-(n-1) - N, (n-1) + P]`` (P, N: largest positive step, largest
   negative step; the greedy order "step up while below δ, down otherwise"), so a BFS
   over that finite window computes ``z`` exactly for ``|δ| < n``.
3. Hence true distance(i, j) ∈ [z_U(δ), mono(δ)]. When every layer is one-sided (all
   steps >= 0, e.g. anything ``& causal``; or all <= 0), every path is monotone and
   ``mono`` is exact. Otherwise ``min_layers = max_δ true`` is exact when
   ``max_δ z = max_δ mono`` (the pair realising the lower maximum needs exactly that many);
   a required δ with no path on ``Z`` proves "never". In the remaining cases the engine
   gives a bound (``shift-bound``) and ``auto`` uses the token engine instead.

Sets are bool arrays over differences; ``S ⊕ AP`` (sumsets with arithmetic progressions,
found by covering ``S`` with runs along its strides) is computed by shifted ORs with
doubling, so a layer costs O(window x pieces x log) and long sequences (10^6 tokens) take
well under a second per layer.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np

from ..ir.nodes import And, Blocks, Diff, Not, Or, Pattern, Prim
from ..ir.primitives import PRIMITIVES
from ..ir.specialize import cdiv
from ..lower.lowering import evaluate as evaluate_head
from .predicate import evaluate


class NotShiftInvariant(ValueError):
    """The pattern depends on positions, not only on ``i - j`` (names the primitive)."""


# ---- difference sets --------------------------------------------------------------------------------------
def diff_set(p: Pattern, n: int) -> tuple[np.ndarray, set[int]]:
    """``S`` as bool [2n-1] over ``d = -(n-1) .. n-1`` (index ``d + n - 1``), and the strides
    (``s`` of ``strided``, ``d`` of ``dilated``) as hints for the AP cover.

    Position-dependent primitives are accepted when, at this length, they are constant over
    the whole square (``chunk(l)`` with l >= n, ``sink``/``prefix``/``global(n=k)`` with
    k >= n, ``blocks(b, p)`` with b >= n, ``random(r)`` with r >= n).

    Raises:
        NotShiftInvariant: some primitive depends on positions.
    """
    d = np.arange(-(n - 1), n, dtype=np.int64)
    hints: set[int] = set()
    return _ediff(p, d, n, hints), hints


def _ediff(p, d, n, hints):
    if isinstance(p, Prim):
        spec = PRIMITIVES[p.name]
        if spec.reads in ("", "d"):  # shift-invariant: the formula at (i, j) = (d, 0)
            step = spec.stride(p.argdict)
            if step is not None:
                hints.add(step)
            return np.broadcast_to(evaluate_head(p, d, 0, n, n), d.shape).copy()
        if spec.full_at(p.argdict, n):  # constant over the whole square at this length
            return np.ones(d.shape, dtype=bool)
        raise NotShiftInvariant(f"`{p}` depends on positions, not only on i - j")
    if isinstance(p, Not):
        return ~_ediff(p.child, d, n, hints)
    if isinstance(p, Diff):
        return _ediff(p.left, d, n, hints) & ~_ediff(p.right, d, n, hints)
    if isinstance(p, And):
        out = np.ones(d.shape, dtype=bool)
        for c in p.items:
            out &= _ediff(c, d, n, hints)
        return out
    if isinstance(p, Or):
        out = np.zeros(d.shape, dtype=bool)
        for c in p.items:
            out |= _ediff(c, d, n, hints)
        return out
    if isinstance(p, Blocks) and p.b >= n:
        v = bool(evaluate(p.child, 0, 0, 0, 1, 1))
        return np.full(d.shape, v, dtype=bool)
    raise NotShiftInvariant(f"`{p}` depends on positions, not only on i - j")


# ---- arithmetic-progression covers and sumsets -------------------------------------------------------------
def ap_cover(mask: np.ndarray, offset: int, hints) -> list[tuple[int, int, int]]:
    """Cover the True positions of ``mask`` (position x at index x - offset) exactly by
    arithmetic progressions ``(a, c, m)`` = ``{a + t*m : 0 <= t < c}``; the union of the
    pieces is the set (pieces may overlap). Long runs along stride 1 and along each hint
    stride (and pairwise lcms) are taken greedily, longest first; leftovers become
    single positions."""
    L = len(mask)
    idx = np.flatnonzero(mask)
    if len(idx) == 0:
        return []
    mods = {1} | {int(h) for h in hints if 1 < h < L}
    hs = sorted(mods)
    for x in hs:
        for y in hs:
            l = math.lcm(x, y)
            if l < L:
                mods.add(l)
    cands = []  # (count, start_index, m)
    for m in sorted(mods):
        cands.extend(_class_runs(mask, m))
    cands.sort(key=lambda t: -t[0])
    covered = np.zeros(L, dtype=bool)
    total = len(idx)
    done = 0
    pieces = []
    for c, s, m in cands:
        if done == total:
            break
        sl = slice(s, s + (c - 1) * m + 1, m)
        seg = covered[sl]
        if seg.all():
            continue
        done += int((~seg).sum())
        covered[sl] = True
        pieces.append((s + offset, c, m))
    if done < total:
        for x in idx[~covered[idx]]:
            pieces.append((int(x) + offset, 1, 1))
    return pieces


def _class_runs(mask: np.ndarray, m: int, min_len: int = 2):
    """Maximal runs (count >= min_len) of True along stride m: [(count, start_index, m)]."""
    L = len(mask)
    rows = cdiv(L, m)
    pad = np.zeros(rows * m, dtype=bool)
    pad[:L] = mask
    grid = pad.reshape(rows, m).T  # [m, rows]: class r in row r
    g = np.zeros((m, rows + 2), dtype=np.int8)
    g[:, 1:-1] = grid
    dd = np.diff(g, axis=1)
    rs, qs = np.nonzero(dd == 1)
    re, qe = np.nonzero(dd == -1)
    counts = qe - qs  # aligned: both ordered by (r, q)
    keep = counts >= min_len
    starts = qs[keep] * m + rs[keep]
    return [(int(c), int(s), m) for c, s in zip(counts[keep], starts)]


def dilate(F: np.ndarray, f_lo: int, pieces, out_lo: int, out_hi: int) -> np.ndarray:
    """bool [out_hi - out_lo]: the sumset ``F ⊕ (union of pieces)`` on positions
    ``[out_lo, out_hi)``, where ``F`` is a bool array over positions ``[f_lo, f_lo + len(F))``."""
    out = np.zeros(max(0, out_hi - out_lo), dtype=bool)
    nzF = np.flatnonzero(F)
    if len(nzF) == 0 or out_hi <= out_lo:
        return out
    F = F[nzF[0]:nzF[-1] + 1]
    f_lo = f_lo + int(nzF[0])
    f_hi = f_lo + len(F)
    for a, c, m in pieces:
        span = (c - 1) * m
        lo = max(out_lo, f_lo + a)
        hi = min(out_hi, f_hi + a + span)
        if hi <= lo:
            continue
        ext_lo, ext_hi = lo - a - span, hi - a  # F positions feeding [lo, hi)
        base = np.zeros(ext_hi - ext_lo, dtype=bool)
        s, e = max(ext_lo, f_lo), min(ext_hi, f_hi)
        if e <= s:
            continue
        base[s - ext_lo:e - ext_lo] = F[s - f_lo:e - f_lo]
        have = 1
        while have < c:
            k = min(have, c - have) * m
            base[k:] |= base[:-k]
            have += k // m
        out[lo - out_lo:hi - out_lo] |= base[span:]
    return out


# ---- BFS over differences ---------------------------------------------------------------------------------
def one_sided_dist(sets: list[np.ndarray], hints, *, stop_when_all: bool = True):
    """Least number of layers reaching each difference 0 .. n-1 with steps >= 0.

    Args:
        sets: per layer entry, bool [n] over steps 0 .. n-1 (index = step).

    Returns:
        (dist int64 [n] with -1 for never, levels run, stagnated flag).
    """
    n = len(sets[0])
    P = len(sets)
    pieces = [ap_cover(s[1:], 1, hints) for s in sets]
    dist = np.full(n, -1, dtype=np.int64)
    dist[0] = 0
    reached = 1
    if reached == n:
        return dist, 0, False
    level = 0
    if P == 1:
        maxstep = max((a + (c - 1) * m for a, c, m in pieces[0]), default=0)
        F_lo, F = 0, np.ones(1, dtype=bool)
        while True:
            hi = min(n, F_lo + len(F) + maxstep)
            G = dilate(F, F_lo, pieces[0], F_lo, hi)
            new = G & (dist[F_lo:hi] < 0)
            level += 1
            idx = np.flatnonzero(new)
            if len(idx) == 0:
                return dist, level, True
            dist[F_lo + idx] = level
            reached += len(idx)
            if stop_when_all and reached == n:
                return dist, level, False
            F_lo, F = F_lo + int(idx[0]), new[idx[0]:idx[-1] + 1]
    cur = dist >= 0
    grew_cycle = False
    while True:
        G = dilate(cur, 0, pieces[level % P], 0, n)
        new = G & ~cur
        level += 1
        idx = np.flatnonzero(new)
        if len(idx):
            dist[idx] = level
            cur |= new
            reached += len(idx)
            grew_cycle = True
            if stop_when_all and reached == n:
                return dist, level, False
        if level % P == 0:
            if not grew_cycle:
                return dist, level, True
            grew_cycle = False


def line_dist(U: np.ndarray, hints, n: int, required: tuple[int, int]):
    """Least number of steps from U (bool [2n-1] over -(n-1) .. n-1, without 0) reaching each
    δ of ``range(*required)`` on the integer line, or -1 (see fact 2 of the module doc)."""
    steps = U.copy()
    steps[n - 1] = False
    pos = np.flatnonzero(steps[n:])
    neg = np.flatnonzero(steps[:n - 1])
    Pmax = int(pos[-1]) + 1 if len(pos) else 0
    Nmax = (n - 1 - int(neg[0])) if len(neg) else 0
    w_lo, w_hi = -(n - 1) - Nmax, (n - 1) + Pmax + 1
    pieces = ap_cover(steps, -(n - 1), hints)
    size = w_hi - w_lo
    dist = np.full(size, -1, dtype=np.int64)
    dist[-w_lo] = 0
    r_lo, r_hi = required
    need = (r_hi - r_lo) - 1
    minstart = min((a for a, c, m in pieces), default=0)
    maxend = max((a + (c - 1) * m for a, c, m in pieces), default=0)
    level = 0
    F_lo, F = 0, np.ones(1, dtype=bool)
    while need > 0:
        o_lo = max(w_lo, F_lo + minstart)
        o_hi = min(w_hi, F_lo + len(F) + maxend)
        G = dilate(F, F_lo, pieces, o_lo, o_hi)
        new = G & (dist[o_lo - w_lo:o_hi - w_lo] < 0)
        idx = np.flatnonzero(new)
        level += 1
        if len(idx) == 0:
            break
        pos = o_lo + idx
        dist[pos - w_lo] = level
        need -= int(((pos >= r_lo) & (pos < r_hi)).sum())
        F_lo, F = o_lo + int(idx[0]), new[idx[0]:idx[-1] + 1]
    return dist[r_lo - w_lo:r_hi - w_lo]


# ---- the engine -------------------------------------------------------------------------------------------
@dataclass
class ShiftResult:
    exact: bool
    min_layers: int | None        # exact value, or None for never (exact) / unknown upper
    lower: int | None
    upper: int | None
    never: bool
    hardest: tuple[int, int] | None
    unreachable: tuple[int, int] | None
    reason: str | None
    path_fn: object = None
    lower_pair: tuple[int, int] | None = None


class ShiftAnalysis:
    """Difference sets of every layer entry and the distances derived from them."""

    def __init__(self, stack):
        self.stack = stack
        n = stack.n
        self.n = n
        self.sets = []
        self.hints: set[int] = set()
        for entry in range(stack.period):
            S = np.zeros(2 * n - 1, dtype=bool)
            for _h, hp in stack.heads[entry]:
                s, h = diff_set(hp, n)
                S |= s
                self.hints |= h
            S[n - 1] = True  # residual
            self.sets.append(S)
        self.pos = [S[n - 1:].copy() for S in self.sets]        # steps 0 .. n-1
        self.neg = [S[n - 1::-1].copy() for S in self.sets]     # steps 0 .. -(n-1), as magnitudes
        U = np.zeros(2 * n - 1, dtype=bool)
        for S in self.sets:
            U |= S
        self.union = U
        self.has_pos = bool(U[n:].any())
        self.has_neg = bool(U[:n - 1].any())

    def run(self, mode: str) -> ShiftResult:
        n = self.n
        mixed = self.has_pos and self.has_neg
        dpos, _, _ = one_sided_dist(self.pos, self.hints)
        dneg = None
        if mode == "all":
            dneg, _, _ = one_sided_dist(self.neg, self.hints)
        # mono distances for every required delta: index = delta (>= 0) / -delta (< 0)
        if not mixed:
            return self._finish(dpos, dneg, mode, exact=True)
        mono_never = (dpos < 0).any() or (dneg is not None and (dneg < 0).any())
        mmax = None if mono_never else max(int(dpos.max()), int(dneg.max()) if dneg is not None else 0)
        # cheap lower bound: the farthest pair (n-1 apart) needs at least ceil((n-1) / largest step)
        steps = np.flatnonzero(self.union) - (n - 1)
        pmax = int(steps.max())
        nmax = -int(steps.min())
        triv_pos = cdiv(n - 1, pmax)
        triv_neg = cdiv(n - 1, nmax) if mode == "all" else 0
        if mmax is not None and mmax == max(triv_pos, triv_neg):
            sel_pos = np.where(np.arange(n) == n - 1, triv_pos, 0)
            sel_neg = np.where(np.arange(n) == n - 1, triv_neg, 0) if mode == "all" else None
            return self._finish(dpos, dneg, mode, exact=True, select=(sel_pos, sel_neg))
        lo_req, hi_req = (0, n) if mode == "earlier" else (-(n - 1), n)
        z = line_dist(self.union, self.hints, n, (lo_req, hi_req))
        zpos = z[-lo_req:]
        zneg = z[:-lo_req + 1][::-1] if mode == "all" else None
        z_never = (zpos < 0).any() or (zneg is not None and (zneg < 0).any())
        if z_never:
            return self._never(zpos, zneg, mode, "line")
        zmax = max(int(zpos.max()), int(zneg.max()) if zneg is not None else 0)
        if mmax is not None and mmax == zmax:
            # the witness: a delta whose lower bound is the maximum (its mono path has as many hops)
            return self._finish(dpos, dneg, mode, exact=True, select=(zpos, zneg))
        # a bound: witnesses for both ends (the pair the monotone paths cover last, with its
        # path; a pair whose line distance is the lower bound)
        hardest = path_fn = None
        if mmax is not None:
            hardest = self._far_pair(dpos, dneg, mmax)
            path_fn = lambda i_, j_, K_: self.path(dpos, dneg, i_, j_, K_)
        lower_pair = self._far_pair(zpos, zneg, zmax)
        return ShiftResult(exact=False, min_layers=mmax, lower=zmax, upper=mmax, never=False,
                           hardest=hardest, unreachable=None, reason=None, path_fn=path_fn,
                           lower_pair=lower_pair)

    @staticmethod
    def _far_pair(dpos, dneg, K):
        """The farthest pair (then smallest i) whose difference has distance K."""
        cands = []
        hp = np.flatnonzero(dpos == K)
        if len(hp):
            cands.append((-int(hp[-1]), int(hp[-1]), 0))
        if dneg is not None:
            hn = np.flatnonzero(dneg == K)
            if len(hn):
                cands.append((-int(hn[-1]), 0, int(hn[-1])))
        _, i, j = min(cands)
        return (i, j)

    # -- helpers -------------------------------------------------------------------------------------
    def _finish(self, dpos, dneg, mode, exact, select=None) -> ShiftResult:
        if (dpos < 0).any() or (dneg is not None and (dneg < 0).any()):
            return self._never(dpos, dneg, mode, "mono")
        spos, sneg = select if select is not None else (dpos, dneg)
        K = max(int(spos.max()), int(sneg.max()) if sneg is not None else 0)
        # farthest delta with distance K, then smallest i: delta >= 0 -> (delta, 0); < 0 -> (0, -delta)
        i, j = self._far_pair(spos, sneg, K)
        return ShiftResult(exact=True, min_layers=K, lower=K, upper=K, never=False, hardest=(i, j),
                           unreachable=None, reason=None,
                           path_fn=lambda i_, j_, K_: self.path(dpos, dneg, i_, j_, K_))

    def _never(self, dpos, dneg, mode, how) -> ShiftResult:
        n = self.n
        cands = []
        bad = np.flatnonzero(dpos < 0)
        if len(bad):
            dl = int(bad[0])
            cands.append((dl, dl, 0))
        if dneg is not None:
            bad = np.flatnonzero(dneg < 0)
            if len(bad):
                dl = int(bad[0])
                cands.append((dl, 0, dl))
        _, i, j = min(cands)
        delta = i - j
        steps = np.flatnonzero(self.union) - (n - 1)
        steps = steps[steps != 0]
        g = 0
        for s in steps:
            g = math.gcd(g, int(s))
        if delta < 0 and not self.has_neg:
            reason = ("every layer allows only keys j <= i (causal), so information never flows from a later "
                      "key to an earlier query")
        elif delta > 0 and not self.has_pos:
            reason = "every layer allows only keys j >= i, so information never flows from an earlier key to a later query"
        elif len(steps) == 0:
            reason = "no layer lets any query attend another position (only the residual path is left)"
        elif g > 1 and delta % g:
            reason = (f"every allowed offset i - j is a multiple of {g} in every layer and head, "
                      f"and {delta} is not")
        else:
            reason = f"no sequence of allowed offsets i - j (one per layer) adds up to {delta} inside the sequence"
        return ShiftResult(exact=True, min_layers=None, lower=None, upper=None, never=True, hardest=None,
                           unreachable=(i, j), reason=reason)

    def path(self, dpos, dneg, i: int, j: int, K: int):
        """A monotone path of K hops from key j to query i (residual hops when they suffice,
        otherwise the smallest predecessor)."""
        delta = i - j
        if delta >= 0:
            dist, sets, sign = dpos, self.pos, 1
        else:
            dist, sets, sign = dneg, self.neg, -1
        x = abs(delta)
        P = len(sets)
        rev = []
        elems = [np.flatnonzero(s[1:]) + 1 for s in sets]
        for m in range(K - 1, -1, -1):
            if 0 <= dist[x] <= m:
                pos = j + sign * x
                rev.append(self.stack.hop(m, pos, pos))
                continue
            el = elems[m % P]
            el = el[el <= x]
            prev = x - el
            ok = (dist[prev] >= 0) & (dist[prev] <= m)
            if not ok.any():
                raise AssertionError(f"no predecessor of offset {x} at layer {m}")
            px = int(prev[ok].min())
            rev.append(self.stack.hop(m, j + sign * px, j + sign * x))
            x = px
        assert x == 0
        return rev[::-1]
