"""Score terms in torch (SPEC §1.8): the kernels' per-element score transform and its
derivative, FlexAttention's ``score_mod``, and SDPA's float bias.

For a kept pair, ``s = scale * (q_i . k_j)``, then in this order:

* ``softcap(c)``: ``s <- c * tanh(s / c)``; ``d/ds = 1 - tanh(s / c)^2``;
* ``alibi(max_bias)``: ``s <- s + m_h * (j - i)`` with ``m = alibi_slopes(H, max_bias)``
  (``patternc.ir.terms``) and positions ``i = q_idx + q_offset``, ``j = kv_idx + kv_offset``
  (SPEC §1.6); ``d/ds = 1``.

``ScoreTerms`` is what a kernel calls on a chunk of raw scores: ``apply_(s, heads, q_pos,
kv_pos)`` transforms ``s`` in place and returns the factor its backward multiplies ``dS`` by
(``1 - tanh^2``, or None when the derivative is 1). Positions are always the ORIGINAL token
positions of the rows and columns, whatever order a kernel gathers them in, so the same call
is right under execution plans that permute queries or keys.

Importing this module imports torch.
"""

from __future__ import annotations

import threading
import weakref

import torch

from ..ir.terms import alibi_slopes


class ScoreTerms:
    """The score terms of one compiled layer, ready for a kernel on one device.

    Attributes:
        cap: the softcap ``c`` (float) or None.
        slopes: float64 ``[H]`` ALiBi slopes of the query heads (CPU tensor), or None.
        q_offset, kv_offset: tokens added to query rows / key columns to get positions.
        terms: the ``ir.Term`` tuple this was built from.
    """

    def __init__(self, terms, num_heads: int, *, q_offset: int = 0, kv_offset: int = 0, head_offset: int = 0):
        self.terms = tuple(terms)
        self.cap = None
        self.slopes = None
        for t in self.terms:
            if t.name == "softcap":
                self.cap = float(t.arg("c"))
            elif t.name == "alibi":
                # head h of this compile is head head_offset + h of the pattern (SPEC §1.6)
                m = alibi_slopes(num_heads + head_offset, int(t.arg("max_bias")))[head_offset:]
                self.slopes = torch.tensor(m, dtype=torch.float64)
            else:  # pragma: no cover - the elaborator admits only registered terms
                raise ValueError(f"unknown score term {t.name!r}")
        self.q_offset, self.kv_offset = int(q_offset), int(kv_offset)
        self._slopes_on: dict = {}
        self._local = threading.local()  # per thread: tanh(s / c) (or the sigmoid) from ``derivative``
        self._flash = weakref.WeakKeyDictionary()  # plan -> FlashAlibi (shared with ``prescaled`` twins)
        #: True: the kernel's scores arrive already divided by the cap (``prescaled``)
        self.scores_over_cap = False
        #: the prescaled softcap's form: "sigmoid" (``x = 2 s / c``, ``2c sigmoid(x) - c``) for caps
        #: up to ``SIGMOID_CAP_MAX``, else "tanh" (``u = s / c``, ``c tanh(u)``)
        self.softcap_form = "tanh"

    #: c * tanh(s / c) = 2c * sigmoid(2s / c) - c. torch's CPU sigmoid is measured 3.3x faster than
    #: its tanh (1.15 vs 3.8 ns per element, one thread, AVX2: both Sleef-based, sigmoid is one exp
    #: and a division); the sigmoid form's absolute error is about c * 2^-23 (the rounding of a
    #: sigmoid near 1/2 .. 1 times 2c) where tanh's is |s| * 2^-24, so it is used for caps up to
    #: this value (error below 1e-5 in scores; Gemma 2 caps at 50, Grok at 30).
    SIGMOID_CAP_MAX = 64.0

    def prescaled(self) -> "ScoreTerms":
        """The same terms for a kernel run with ``scale * prescale``, which saves a pass over the
        scores and keeps dq and dk exact (they use the scale the scores were made with):

        * ``c <= SIGMOID_CAP_MAX``: prescale ``2 / c``, the matmul yields ``x = 2 s / c``, the
          transform is ``2c * sigmoid(x) - c`` (+ ALiBi), its derivative ``2c * sigmoid(x) *
          (1 - sigmoid(x))``;
        * larger caps: prescale ``1 / c``, ``u = s / c``, ``c * tanh(u)``, ``c * (1 - tanh(u)^2)``.

        Without a cap: self."""
        if self.cap is None:
            return self
        twin = object.__new__(ScoreTerms)
        twin.__dict__.update(self.__dict__)
        twin._local = threading.local()
        twin.scores_over_cap = True
        twin.softcap_form = "sigmoid" if self.cap <= self.SIGMOID_CAP_MAX else "tanh"
        return twin

    @property
    def prescale(self) -> float:
        """What a kernel multiplies its scale by for ``prescaled()``: ``2 / c`` (caps up to
        ``SIGMOID_CAP_MAX``), ``1 / c`` (larger caps), 1 without a cap."""
        if self.cap is None:
            return 1.0
        return (2.0 if self.cap <= self.SIGMOID_CAP_MAX else 1.0) / self.cap

    def __bool__(self) -> bool:
        return bool(self.terms)

    @property
    def is_additive(self) -> bool:
        """True when the terms are a bias independent of the score (ALiBi alone): a fused
        kernel may add ``additive_bias`` to its mask instead of calling the transform."""
        return self.cap is None and self.slopes is not None

    def additive_bias(self, heads, q_pos, kv_pos, dtype=torch.float32) -> torch.Tensor:
        """``m_h * (j - i)`` float ``[R, qb, cols]``, for ``is_additive`` terms: one pass,
        ``m (j - i0) - m (i - i0)`` from ``[R, cols]`` / ``[R, qb]`` vectors, with the rounding
        bound of ``add_alibi_`` (else the exact ``alibi_bias``)."""
        m = self.slopes_on(q_pos.device, dtype).index_select(0, heads)
        q0 = q_pos[:, :1]
        dq = q_pos - q0
        if dq.numel() and float((dq.abs().amax(-1).to(dtype) * m).max()) > self.FAST_ALIBI_SPREAD:
            return self.alibi_bias(heads, q_pos, kv_pos, dtype)
        a = (kv_pos - q0 + (self.kv_offset - self.q_offset)).to(dtype).mul_(m[:, None])
        return torch.sub(a[:, None, :], dq.to(dtype).mul_(m[:, None])[:, :, None])

    def flash_alibi(self, plan, positions) -> "FlashAlibi | None":
        """The cached ``FlashAlibi`` of these terms for one gather plan and its positions
        (``positions.heads`` / ``q_order`` / ``kv_order``: the term's natural indices), or
        None when the terms are not ALiBi alone."""
        if not self.is_additive:
            return None
        cache = self.__dict__.setdefault("_flash", weakref.WeakKeyDictionary())
        per_plan = cache.setdefault(plan, [])
        key = (positions.heads, positions.q_order, positions.kv_order)
        for k, fa in per_plan:
            if all(a is b for a, b in zip(k, key)):
                return fa
        fa = FlashAlibi(self)
        per_plan.append((key, fa))
        return fa

    @property
    def cache_key(self) -> tuple:
        """Hashable, tensor-free identity of what the terms compute (caches shared by layouts)."""
        slopes = None if self.slopes is None else tuple(self.slopes.tolist())
        return (self.cap, slopes, self.q_offset, self.kv_offset)

    def run_alibi(self, heads: torch.Tensor, base: int, delta: int, rows: int, Lq: int, L: int, ref=None):
        """ALiBi of one kernel call of the strided-runs path (``execute.fused``), whose kernel row
        ``r`` (of ``rows``) holds query positions ``i = i0 + r * dq + a`` (``a < Lq``) and key
        positions ``j = j0 + r * dk + c`` (``c < L``), with ``base = j0 - i0`` and ``delta = dk - dq``
        in tokens (natural positions; offsets are added here).

        ``m_h (j - i) = m_h (c - a + base) + m_h * delta * r``: the first part is the same for
        every kernel row, so it is one bias for the call; the second is a constant of each kernel
        row, which the softmax ignores, so it only moves the kernel's log-sum-exp. Both are one
        rounding of an exact integer times the slope (as ``alibi_bias``).

        ``ref`` (int64 ``[1 or rows, Lq]``, optional): a column per query row, whose bias is made
        0 (another constant of the row, moved to the shift): the row's last allowed column, so
        that the entries that weigh most in the softmax (ALiBi's largest) carry the smallest bias
        and lose nothing to the float32 rounding of a large one (a row reading keys far after
        its own position, e.g. a global query, has ``m (j - i)`` up to ``m * L``).

        Args:
            heads: int64 [Bp], the query head of each batch entry of the call.

        Returns:
            ``(bias, shift)``: float32 ``[Bp, 1 or rows, Lq, L]`` to add to the kernel's mask, and
            float64 ``[Bp, rows, 1 or Lq]`` to add to its log-sum-exp (the true one is kernel +
            shift; float64, as ``blocksparse.lse_dtype``: the shift reaches ``m * N``).
        """
        dev, dt = heads.device, torch.float32
        m = self.slopes_on(dev, dt).index_select(0, heads)  # [Bp]
        m64 = self.slopes_on(dev, torch.float64).index_select(0, heads)
        r = torch.arange(rows, device=dev) * delta  # [rows]
        if ref is None:
            rel = (torch.arange(L, device=dev)[None, :] - torch.arange(Lq, device=dev)[:, None]
                   + (base + self.kv_offset - self.q_offset)).to(dt)  # [Lq, L], exact integers
            bias = rel[None, None] * m[:, None, None, None]
            shift = r.to(torch.float64)[None, :, None] * m64[:, None, None]
            return bias, shift
        rel = (torch.arange(L, device=dev) - ref[..., None]).to(dt)  # [1 or rows, Lq, L], exact
        bias = rel[None] * m[:, None, None, None]
        row = ref - torch.arange(Lq, device=dev) + (base + self.kv_offset - self.q_offset)  # [1 or rows, Lq]
        shift = (row + r[:, None]).to(torch.float64)[None] * m64[:, None, None]  # [Bp, rows, Lq]
        return bias, shift

    def __call__(self, s, heads, q_pos, kv_pos, centre=None):
        """The block-sparse kernel's ``score_mod`` hook: ``apply_`` (in place), returns ``s``."""
        return self.apply_(s, heads, q_pos, kv_pos, centre=centre)

    def slopes_on(self, device, dtype) -> torch.Tensor:
        key = (str(device), dtype)
        t = self._slopes_on.get(key)
        if t is None:
            t = self._slopes_on[key] = self.slopes.to(device=device, dtype=dtype)
        return t

    def alibi_bias(self, heads: torch.Tensor, q_pos: torch.Tensor, kv_pos: torch.Tensor, dtype) -> torch.Tensor:
        """``m_h * (j - i)``: float ``[R, qb, cols]`` for query heads ``heads`` int64 [R], query
        positions ``q_pos`` int64 [R, qb] and key positions ``kv_pos`` int64 [R, cols] (rows and
        columns of the compile; offsets are added here). ``j - i`` is an exact integer in the
        float dtype (positions below 2^24 in float32), so the bias has one rounding, of the
        product: never the cancellation of two large biases."""
        qf = (q_pos + self.q_offset).to(dtype)
        kf = (kv_pos + self.kv_offset).to(dtype)
        m = self.slopes_on(q_pos.device, dtype).index_select(0, heads)
        return (kf[:, None, :] - qf[:, :, None]).mul_(m[:, None, None])

    #: the two-broadcast ALiBi path's rounding bound: slope * (spread of a tile's query
    #: positions) at most this many score units (error below 2^-18 of it in float32)
    FAST_ALIBI_SPREAD = 64.0

    def alibi_frame(self, heads: torch.Tensor, q_pos: torch.Tensor, ref: torch.Tensor):
        """Where the unfused loop centres one chunk's ALiBi (``apply_(…, centre=)``), so that the
        keys that weigh most carry the smallest bias and lose nothing to its float32 rounding.

        ALiBi's largest ``m_h (j - i)`` in a row is at its last allowed key ``ref``; with a centre
        ``J``, ``m (j - i) = m (j - J) + m (J - i)``: the first part goes on the scores, the
        second is a constant of the row (the softmax ignores it), ``c``, which only moves the
        log-sum-exp and is kept in float64. A query reading keys far ahead (a global one under
        non-causal ALiBi) has ``m (j - i)`` up to ``m * N``: centred on ``i`` it would lose
        ~1e-5 to float32 rounding.

        Args:
            heads: int64 [R], the query head of each row tile.
            q_pos: int64 [R, qb], query positions (without q_offset).
            ref: int64 [Bm, R, qb], each score row's last allowed key position (without
                kv_offset), -1 for a row with none (``Bm`` 1 or the batch).

        Returns:
            ``(centre, c)``: ``centre`` int64 [R] (one per row tile: the largest ``ref``, when
            the rows' references lie within ``FAST_ALIBI_SPREAD / m`` of it) or [Bm, R, qb]
            (each row's own); ``c`` float64 [Bm, R, qb] = ``m_h (centre - i)`` with offsets: the
            true scores are the centred ones plus ``c``.
        """
        m = self.slopes_on(q_pos.device, torch.float32).index_select(0, heads)  # [R]
        m64 = self.slopes_on(q_pos.device, torch.float64).index_select(0, heads)
        top = ref.amax(-1).amax(0)  # [R]
        ref = torch.where(ref < 0, top[:, None], ref)  # a row with no allowed key: any centre
        spread = (top - ref.amin(-1).amin(0)).to(torch.float32) * m
        centre = ref if ref.numel() and float(spread.max()) > self.FAST_ALIBI_SPREAD else top
        at = centre if centre.dim() == 3 else centre[None, :, None]
        c = (at - q_pos[None] + (self.kv_offset - self.q_offset)).to(torch.float64).mul_(m64[None, :, None])
        return centre, c.expand(ref.shape[0], -1, -1)

    def add_alibi_(self, s: torch.Tensor, heads: torch.Tensor, q_pos: torch.Tensor, kv_pos: torch.Tensor,
                   *, alpha: float = 1.0, shift: float = 0.0, centre=None) -> torch.Tensor:
        """``s <- alpha * s + shift + m_h * (j - i)`` in place (``s`` float ``[B, R, qb, cols]``).

        Fast path, no ``[R, qb, cols]`` temporary: with ``i0`` the first query position of each
        row tile, ``m (j - i) = m (j - i0) - m (i - i0)``, two broadcast updates from ``[R, cols]``
        and ``[R, qb]`` vectors; ``j - i0`` and ``i - i0`` are exact integers, so the only
        error is float rounding of terms at most ``|bias| + m * spread`` (``spread``: the
        largest ``i - i0`` of a tile, < qb in natural order). Tiles whose query positions
        spread wider (an execution plan's reordered rows) with ``m * spread`` above
        ``FAST_ALIBI_SPREAD`` take the exact path (``alibi_bias``).

        ``centre`` (from ``alibi_frame``): add ``m_h (j - centre)`` instead, ``[R, cols]`` for a
        tile centre, an exact ``[Bm, R, qb, cols]`` bias for row centres; the rows' constants
        are the caller's (``alibi_frame``'s ``c``)."""
        dt = s.dtype
        m = self.slopes_on(q_pos.device, dt).index_select(0, heads)  # [R]
        if centre is not None:
            if centre.dim() == 1:
                a = (kv_pos - centre[:, None]).to(dt).mul_(m[:, None])  # [R, cols], exact integers
                if shift:
                    a.add_(shift)
                return torch.add(a[:, None, :], s, alpha=alpha, out=s)
            bias = (kv_pos[None, :, None, :] - centre[..., None]).to(dt).mul_(m[None, :, None, None])
            if alpha != 1.0:
                s.mul_(alpha)
            return s.add_(bias.add_(shift) if shift else bias)
        q0 = q_pos[:, :1]
        dq = q_pos - q0  # [R, qb]
        spread = float((dq.abs().amax(-1).to(dt) * m).max()) if dq.numel() else 0.0
        if spread > self.FAST_ALIBI_SPREAD:
            if alpha != 1.0:
                s.mul_(alpha)
            bias = self.alibi_bias(heads, q_pos, kv_pos, dt)
            return s.add_(bias.add_(shift) if shift else bias)
        a = (kv_pos - q0 + (self.kv_offset - self.q_offset)).to(dt).mul_(m[:, None])  # [R, cols]
        if shift:
            a.add_(shift)
        torch.add(a[:, None, :], s, alpha=alpha, out=s)
        return s.sub_(dq.to(dt).mul_(m[:, None])[:, :, None])

    def apply_(self, s: torch.Tensor, heads: torch.Tensor, q_pos: torch.Tensor, kv_pos: torch.Tensor,
               centre=None):
        """Transform raw scores in place: ``s`` float ``[B, R, qb, cols]`` (already scaled).

        Args:
            heads: int64 [R], the query head of each row tile.
            q_pos: int64 [R, qb], query row of each score row (0-based, without q_offset).
            kv_pos: int64 [R, cols], key column of each score column (without kv_offset).
            centre: ALiBi's centre from ``alibi_frame`` (then the scores are off by its ``c``),
                or None (the true ``m_h (j - i)``).

        Returns:
            The transformed scores: ``s`` itself, or (backward, right after ``derivative`` on
            ``s``) the tanh / sigmoid tensor ``derivative`` made, transformed in its place.
            Passes over the scores: softcap 2 (``* 1/c``, ``tanh_``; 1 when ``prescaled``:
            ``sigmoid_`` or ``tanh_``; the ``* c`` (and the sigmoid form's ``- c``) ride in
            ALiBi's first update, or are one more), ALiBi 2.
        """
        alpha, shift = 1.0, 0.0
        if self.cap is not None:
            sig = self.scores_over_cap and self.softcap_form == "sigmoid"
            t = self._take_tanh(s)
            if t is not None:  # the backward's derivative already computed tanh(s / c) / the sigmoid
                s = t
            elif sig:
                s.sigmoid_()
            elif self.scores_over_cap:
                s.tanh_()
            else:
                s.mul_(1.0 / self.cap).tanh_()
            alpha, shift = (2.0 * self.cap, -self.cap) if sig else (self.cap, 0.0)
        if self.slopes is not None:
            return self.add_alibi_(s, heads, q_pos, kv_pos, alpha=alpha, shift=shift, centre=centre)
        if shift:  # 2c * sigmoid - c, one pass
            return torch.add(torch.full((), shift, dtype=s.dtype, device=s.device), s, alpha=alpha, out=s)
        return s.mul_(alpha) if alpha != 1.0 else s

    def derivative(self, s: torch.Tensor, heads=None, q_pos=None, kv_pos=None) -> torch.Tensor | None:
        """``d terms(s) / ds`` for raw scores ``s``: ``1 - tanh(s / c)^2`` (``prescaled``:
        ``c * (1 - tanh(s)^2)``, or in the sigmoid form ``2c * sigmoid(s) * (1 - sigmoid(s))``),
        a new tensor; None when it is 1 (ALiBi alone)."""
        if self.cap is None:
            return None
        if self.scores_over_cap and self.softcap_form == "sigmoid":
            t = torch.sigmoid(s)
            self._local.tanh = (id(s), s.data_ptr(), s._version, s.shape, t)
            return torch.addcmul(t, t, t, value=-1.0).mul_(2.0 * self.cap)
        t = torch.tanh(s) if self.scores_over_cap else torch.mul(s, 1.0 / self.cap).tanh_()
        # kept for the ``apply_`` on the same scores that follows in the backward pass
        self._local.tanh = (id(s), s.data_ptr(), s._version, s.shape, t)
        k = self.cap if self.scores_over_cap else 1.0
        return torch.addcmul(torch.full((), k, dtype=s.dtype, device=s.device), t, t, value=-k)

    def _take_tanh(self, s):
        hit = getattr(self._local, "tanh", None)
        self._local.tanh = None
        if hit is not None and hit[:4] == (id(s), s.data_ptr(), s._version, s.shape):
            return hit[4]
        return None


class FlashAlibi:
    """ALiBi on ATen's fused CPU flash kernel as one more column of q and k, with nothing
    score-sized made per call.

    With ``J`` the last allowed key of a row tile, ``m_h (j - i) = m_h (j - J) - m_h (i - J)``.
    The second part is a constant of each query row, which the softmax ignores: the kernel runs
    with q augmented by a column of ones (``augment``) and each row tile's gathered k by the
    column ``m_h (j - J)`` (``columns``), so its scores are ``s + m_h (j - J)``, its output is
    exact, and only its log-sum-exp is off by ``m_h (i - J)``, which the caller subtracts
    (forward) or adds back (backward). v gets a column of zeros (the kernel wants one head size),
    and the output's extra column is dropped. ``j - J`` and ``i - J`` are exact integers, and
    the keys that weigh most (a row's largest ALiBi, at its last allowed key) carry the smallest
    bias; a tile whose rows' last keys spread more than ``ScoreTerms.FAST_ALIBI_SPREAD / m``
    gets the bias centred row by row as the kernel's mask instead, and zero columns. The columns (float32 ``[R, cols]``) and row terms (``[R, qb]``)
    are cached per chunk: 1/qb of the chunk's scores.

    Positions are those of ``positions.of(g, rows, s0, s1)`` (the kernel's ``_Positions``): the
    original token rows and columns under an execution plan. One ``FlashAlibi`` serves one gather
    plan and one set of term orders (``ScoreTerms.flash_alibi``).
    """

    def __init__(self, st: ScoreTerms):
        self.st = st
        self._chunks: dict = {}

    @staticmethod
    def augment(qp: torch.Tensor, kp: torch.Tensor, vp: torch.Tensor):
        """q, k, v ``[B, n, blk, D]`` with one more column: q 1, k 0 (filled per chunk), v 0."""
        pad = torch.nn.functional.pad
        return pad(qp, (0, 1), value=1.0), pad(kp, (0, 1)), pad(vp, (0, 1))

    def columns(self, positions, g, rows: slice, mask=None):
        """``(col, row, exact)`` of a chunk (rows ``rows`` of group ``g``, all its slots; ``mask``
        the kernel's additive mask of the chunk, float ``[.., 1 or R, qb, cols]``, None: all
        allowed): ``col`` float32 [R, cols] = ``m_h (j - J)`` for k's extra column, ``row`` float64
        [R, qb] = ``m_h (i - J)`` to take from the kernel's log-sum-exp (offsets included), and
        ``exact`` None. ``J`` is the tile row's last allowed key: the keys that weigh most in a
        row's softmax are its largest ``m (j - i)``, at its last allowed key, so centring there
        keeps their bias small and its float32 rounding with it (a query reading keys far
        ahead, e.g. a global one, would lose ~1e-5 centred on ``i0``). Where the rows' last keys
        spread wider than ``FAST_ALIBI_SPREAD / m`` (a tile mixing a global query with local
        ones; a plan's scattered rows): zero columns, ``exact`` the bias float32 [R, qb, cols]
        centred on each row's own last key, and ``row`` to match."""
        key = (id(g), rows.start, rows.stop)
        hit = self._chunks.get(key)
        if hit is not None:
            return hit
        st = self.st
        heads, q_pos, kv_pos = positions.of(g, rows, 0, g.num_slots)
        dt = torch.float32
        m = st.slopes_on(q_pos.device, dt).index_select(0, heads)  # [R]
        R, qb = q_pos.shape
        last = kv_pos.amax(-1, keepdim=True)  # [R, 1]
        if mask is None:
            ref = last.expand(R, qb)
        else:
            mk = mask.reshape(-1, qb, mask.shape[-1])
            ref = torch.where(torch.isfinite(mk), kv_pos[:, None, :], -1).amax(-1)  # [R, qb]
            ref = torch.where(ref < 0, last, ref)  # a row with no allowed key: any reference
        centre, c = st.alibi_frame(heads, q_pos, ref[None])  # the unfused loop's centring
        row = c[0].neg()  # m (i - J) with offsets: the kernel's lse is off by it
        if centre.dim() == 3:  # row centres: the exact bias as the mask, zero columns
            exact = (kv_pos[:, None, :] - centre[0, :, :, None]).to(dt).mul_(m[:, None, None])
            return torch.zeros(kv_pos.shape, dtype=dt, device=kv_pos.device), row, exact  # not cached
        col = (kv_pos - centre[:, None]).to(dt).mul_(m[:, None])
        out = self._chunks[key] = (col, row, None)
        return out


def tile_positions(q_blocks: torch.Tensor, kv_blocks: torch.Tensor, qb: int, kb: int):
    """Token rows / columns of gathered tiles: ``q_blocks`` int64 [R] -> [R, qb];
    ``kv_blocks`` int64 [R, S] -> [R, S * kb] (natural order; a plan passes its own)."""
    dev = q_blocks.device
    q_pos = q_blocks[:, None] * qb + torch.arange(qb, device=dev)
    kv_pos = (kv_blocks[:, :, None] * kb + torch.arange(kb, device=dev)).reshape(kv_blocks.shape[0], -1)
    return q_pos, kv_pos


def score_terms_for(cp, num_heads: int) -> ScoreTerms | None:
    """The ``ScoreTerms`` of a compiled layer for ``num_heads`` query heads (cached on
    ``cp``), or None when it has none."""
    terms = tuple(getattr(cp, "score_terms", ()) or ())
    if not terms:
        return None
    cache = cp.__dict__.setdefault("_score_terms_cache", {})
    st = cache.get(num_heads)
    if st is None:
        st = cache[num_heads] = ScoreTerms(terms, num_heads, q_offset=getattr(cp, "q_offset", 0),
                                           kv_offset=getattr(cp, "kv_offset", 0),
                                           head_offset=getattr(cp, "head_offset", 0))
    return st


def make_score_mod(st: ScoreTerms, device, dtype=torch.float32):
    """FlexAttention ``score_mod(score, b, h, q_idx, kv_idx)`` applying ``st``: the registry's
    formulas (``ir.terms.SCORE_TERMS[name].formula``) composed in ``TERM_ORDER``.

    The cap, the slopes and the offsets live in tensors captured by the closure, so a new
    cap or slope set of the same shape does not recompile a ``torch.compile``d
    FlexAttention (it guards on tensor metadata, not values). ``__name__`` names the terms.
    """
    from ..ir.terms import SCORE_TERMS

    device = torch.device(device)
    fns = []
    for t in st.terms:
        a = {k: torch.tensor(float(v), dtype=dtype, device=device) for k, v in t.args}
        fns.append(SCORE_TERMS[t.name].formula(torch, a))
    slopes = st.slopes_on(device, dtype) if st.slopes is not None else torch.zeros(1, dtype=dtype, device=device)
    per_head = st.slopes is not None
    off = torch.tensor(st.kv_offset - st.q_offset, dtype=torch.int64, device=device)

    def score_mod(score, b, h, q_idx, kv_idx):
        m = slopes[h] if per_head else slopes[0]
        d = (kv_idx - q_idx + off).to(score.dtype)
        for f in fns:
            score = f(score, m, d)
        return score

    score_mod.__name__ = score_mod.__qualname__ = "score_mod_" + "_".join(t.name for t in st.terms)
    return score_mod


def sdpa_bias(st: ScoreTerms, mask: torch.Tensor, dtype) -> torch.Tensor:
    """SDPA's float ``attn_mask``: ``m_h * (j - i)`` where ``mask`` (bool [H|1, Q_LEN, KV_LEN])
    allows, ``-inf`` elsewhere; only ALiBi can be a bias (softcap is not additive)."""
    Hm, Q, KV = mask.shape
    H = st.slopes.shape[0]
    dev = mask.device
    q_pos = torch.arange(Q, device=dev).expand(H, Q)
    kv_pos = torch.arange(KV, device=dev).expand(H, KV)
    bias = st.alibi_bias(torch.arange(H, device=dev), q_pos, kv_pos, dtype)  # [H, Q, KV]
    return bias.masked_fill_(~mask, float("-inf"))
