"""``patternc.compile``: one layer of a pattern at given lengths -> ``CompiledPattern``.

The pipeline (see ``docs/compiler.md``)::

    source ─parse─▶ Pattern ─select_layer, bind_lengths, normalize─▶ layer Pattern
        ├─lower.lower_to_layout(Q_LEN, KV_LEN, BLOCK_SIZE, H)─▶ BlockLayout (numpy, exact)
        │      └─blockmask.to_block_mask(device)─▶ torch BlockMask
        └─maskmod.lower_to_mask_mod─▶ mask_mod(b, h, q_idx, kv_idx)

Layouts are cached (einops style) on hashable, tensor-free keys: the canonical layer
pattern, the lengths, the block size and the head count. torch is imported only when a
``mask_mod``, ``BlockMask`` or attention is asked for.
"""

from __future__ import annotations

import functools
import json
import os
import time
import warnings
import zipfile
from functools import cached_property

import numpy as np

from .errors import Diagnostic, PatternError, PatternWarning
from .ir import nodes as ir
from .ir.nodes import Pattern
from .ir.normalize import normalize
from .ir.specialize import (
    cdiv,
    head_cycle_warning,
    runtime_bound,
    specialize,
    substitute_document,
    uses_documents,
    uses_per_document,
)
from .lower.layout import EMPTY, FULL, PARTIAL, BlockLayout, normalize_block_size

ARTIFACT_FORMAT = "patternc.compiled"
ARTIFACT_VERSION = 1
MAX_TILES = 1 << 28  # H * num_q_blocks * num_kv_blocks accepted (256 MiB of kinds)


def _arg_error(message: str, help_: str) -> PatternError:
    return PatternError(Diagnostic("P302", message, None, help_))


def _check_count(name: str, v, minimum: int, unit: str) -> int:
    if isinstance(v, bool) or not isinstance(v, (int, np.integer)):
        raise _arg_error(f"{name} must be an int, got {v!r}", f"pass {name} as a whole number of {unit}")
    if v < minimum:
        raise _arg_error(f"{name} must be >= {minimum} {unit}, got {v}", f"use {name} >= {minimum}")
    return int(v)


@functools.lru_cache(maxsize=32)
def _layout_cached(pattern: Pattern, q_len: int, kv_len: int, qb: int, kb: int, num_heads: int,
                   q_offset: int = 0, kv_offset: int = 0) -> BlockLayout:
    from .lower.lowering import lower_to_layout

    return lower_to_layout(pattern, q_len, kv_len, (qb, kb), num_heads, q_offset=q_offset, kv_offset=kv_offset)


def block_offset_unit(pattern: Pattern) -> int:
    """The least common multiple, over every ``blocks(b, …)`` of ``pattern``, of the product of
    the block sizes enclosing and including it: offsets must be multiples of it (SPEC §1.6;
    inside ``blocks(b1, blocks(b2, …))`` an offset is ``offset / b1`` blocks at the inner level).
    1 when there is no ``blocks``."""
    import math

    def walk(p: Pattern, scale: int) -> int:
        if isinstance(p, ir.Blocks) and isinstance(p.b, int):
            return math.lcm(scale * p.b, walk(p.child, scale * p.b))
        out = 1
        for c in p.children():
            out = math.lcm(out, walk(c, scale))
        return out

    return walk(pattern, 1)


def _check_block_offsets(pattern: Pattern, q_offset: int, kv_offset: int) -> None:
    """P302 unless every ``blocks(b, …)`` has its block size dividing both offsets (SPEC §1.6)."""
    unit = block_offset_unit(pattern)
    if q_offset % unit or kv_offset % unit:
        node = next(n for n in pattern.walk() if isinstance(n, ir.Blocks))
        raise PatternError(Diagnostic(
            "P302", f"q_offset={q_offset}, kv_offset={kv_offset} are not multiples of {unit} tokens, the block "
            f"size of `blocks` in this pattern", node.span,
            f"inside `blocks(b, …)` offsets must be whole blocks: round each offset down to a multiple of {unit} "
            f"and compile the rows / columns in between as well"))


def compile(p_or_source, *, q_len: int, kv_len: int | None = None, num_heads: int = 1,
            block_size=128, layer: int = 0, params: dict | None = None, q_offset: int = 0,
            kv_offset: int = 0, head_offset: int = 0) -> "CompiledPattern":
    """Compile one layer of a pattern to an exact block layout (and, on demand, a mask_mod
    and a FlexAttention BlockMask).

    Args:
        p_or_source: a ``Pattern`` or pattern source text (an expression or a whole file).
        q_len: Q_LEN, tokens (>= 1).
        kv_len: KV_LEN, tokens (default: ``q_len``). Queries and keys are aligned at 0.
        num_heads: H (default 1, SPEC §2). Head ``h`` uses entry ``h mod m`` of each
            ``heads(...)``. When H is smaller than the pattern's head period (the lcm of its
            ``heads`` arities) only heads 0..H-1 are compiled and a ``PatternWarning`` (W003)
            says so; ``None`` means "the head period".
        block_size: ``BLOCK_SIZE``, an int or ``(Q_BLOCK_SIZE, KV_BLOCK_SIZE)``, tokens.
        layer: which layer of a ``layers(...)`` stack (entry ``layer mod m``), >= 0.
        params: values for the source's ``param``s (source text only).
        q_offset: position of query row 0 (SPEC §1.6, tokens, >= 0): row r is position
            ``r + q_offset``. A decode step with t cached tokens: ``q_len=1, kv_len=t + 1,
            q_offset=t``; chunked prefill: ``q_offset = kv_len - q_len``.
        kv_offset: position of key column 0 (tokens, >= 0): a rolling cache that keeps
            only the last ``kv_len`` keys passes the position of the oldest key kept.
            The built-ins ``q_len``/``kv_len`` are the position extents ``q_offset + q_len``,
            ``kv_offset + kv_len``, so the rows of an offset compile equal the corresponding
            rows of the compile over the whole sequence.
        head_offset: head h of the compile is head ``head_offset + h`` of the pattern (a
            tensor-parallel rank holding heads ``head_offset …`` of a ``heads(…)`` pattern).

    Returns:
        CompiledPattern whose ``layout.kinds`` equal, tile for tile, the classification of
        ``patternc.reference.dense_mask`` (SPEC §3).

    Raises:
        PatternError: P1xx/P2xx for bad source; P301 when a parameter computed from the
            lengths is out of range; P302 for bad lengths, offsets, heads, layer or block size
            (offsets inside ``blocks(b, …)`` must be multiples of b); P303
            when the layout would have more than 2**28 tiles.

    Example:
        >>> cp = compile("local(w=256) & causal", q_len=1024, block_size=256)
        >>> print(cp.layout.ascii())
        +...
        ++..
        .++.
        ..++
        >>> cp.density, cp.block_density
        (0.2188720703125, 0.4375)
    """
    t0 = time.perf_counter()
    q_len = _check_count("q_len", q_len, 1, "tokens")
    kv_len = q_len if kv_len is None else _check_count("kv_len", kv_len, 1, "tokens")
    layer = _check_count("layer", layer, 0, "layers")
    q_offset = _check_count("q_offset", q_offset, 0, "tokens")
    kv_offset = _check_count("kv_offset", kv_offset, 0, "tokens")
    head_offset = _check_count("head_offset", head_offset, 0, "heads")
    try:
        qb, kb = normalize_block_size(block_size)
    except (ValueError, TypeError) as e:
        raise _arg_error(str(e), "use block_size=128 or a pair such as (64, 128)") from None
    source_text = None
    if isinstance(p_or_source, Pattern):
        from .source.frontdoor import parse

        full = normalize(parse(p_or_source, params=params))  # params with a Pattern: P214
        params = {}
    else:
        from .source.frontdoor import parse_source

        full, res = parse_source(p_or_source, params=params)
        for w in res.warnings:
            warnings.warn(PatternWarning(w), stacklevel=2)
        source_text, params = res.source, res.params  # params: the declared ones, defaults included
    terms = ir.score_terms(full)  # SPEC §1.8: beside the layout, never part of the predicate
    try:
        pattern = specialize(full, q_len=q_offset + q_len, kv_len=kv_offset + kv_len, layer=layer)
        if q_offset or kv_offset:
            _check_block_offsets(pattern, q_offset, kv_offset)
    except PatternError as e:
        raise (e.with_source(source_text) if source_text is not None else e) from None
    if head_offset:
        from .ir.specialize import shift_heads

        pattern = normalize(shift_heads(pattern, head_offset))
    static = pattern
    if uses_documents(pattern):
        for node in pattern.walk():
            if isinstance(node, ir.Blocks) and uses_documents(node.child):
                e = PatternError(Diagnostic(
                    "P302", "`document` / `per_document` inside `blocks(b, …)` is not supported: documents are runs "
                    "of tokens, not of blocks", node.span,
                    "move it out of `blocks(…)`, e.g. `blocks(b, p) & document` or `per_document(blocks(b, p))`"))
                raise (e.with_source(source_text) if source_text is not None else e) from None
        # the static layout: every pair some split into documents can allow (an upper bound;
        # ``layout_for(documents=…)`` is exact per batch)
        static = runtime_bound(pattern)
    H = pattern.num_heads if num_heads is None else _check_count("num_heads", num_heads, 1, "heads")
    if H < pattern.num_heads:
        warnings.warn(PatternWarning(Diagnostic(
            "W003", f"the pattern has {pattern.num_heads} different heads but num_heads={H}: only heads "
            f"0..{H - 1} are compiled", None, f"pass num_heads={pattern.num_heads} (--heads {pattern.num_heads}) "
            "to compile all of them", severity="warning", filename=source_text and "<string>" or "<pattern>")),
            stacklevel=2)
    cycle = head_cycle_warning(pattern.num_heads, H, filename=source_text and "<string>" or "<pattern>")
    if cycle is not None:
        warnings.warn(PatternWarning(cycle), stacklevel=2)
    nq, nk = cdiv(q_len, qb), cdiv(kv_len, kb)
    if H * nq * nk > MAX_TILES:
        raise PatternError(Diagnostic(
            "P303", f"the layout would have {H} x {nq} x {nk} = {H * nq * nk:,} tiles (limit {MAX_TILES:,})", None,
            f"use a larger block_size (e.g. {max(qb, kb) * 4}) or shorter lengths"))
    layout = _layout_cached(static, q_len, kv_len, qb, kb, H, q_offset, kv_offset)
    cp = CompiledPattern(pattern=pattern, q_len=q_len, kv_len=kv_len, num_heads=H, block_size=(qb, kb),
                         layer=layer, layout=layout, params=dict(params or {}), q_offset=q_offset,
                         kv_offset=kv_offset, head_offset=head_offset, score_terms=terms)
    cp.compile_seconds = time.perf_counter() - t0
    return cp


class CompiledPattern:
    """One layer of a pattern, compiled at fixed lengths and block size.

    Attributes:
        pattern: the canonical layer ``Pattern`` (after ``select_layer`` and ``bind_lengths``):
            the predicate only, without score terms.
        score_terms: the score terms (SPEC §1.8), a tuple of ``patternc.ir.Term`` in
            canonical order (``softcap``, then ``alibi``); ``()`` when none. Every backend
            applies them; layouts, masks and reachability ignore them.
        source: the canonical text of the layer, score terms included
            (``str(pattern) + " with ..."``).
        q_len, kv_len: Q_LEN, KV_LEN (tokens: rows and columns).
        q_offset, kv_offset: positions of row 0 and column 0 (SPEC §1.6, tokens).
        head_offset: head h here is head ``head_offset + h`` of the source pattern (``pattern``
            already has its ``heads(…)`` rotated accordingly).
        num_heads: H.
        block_size: (Q_BLOCK_SIZE, KV_BLOCK_SIZE), tokens.
        layer: the layer index this was compiled for.
        layout: the exact ``BlockLayout`` (kinds uint8 [H, num_q_blocks, num_kv_blocks]).
        params: the ``param`` values given at compile time (name -> int).
        compile_seconds: wall time of ``compile`` (seconds).
    """

    def __init__(self, *, pattern: Pattern, q_len: int, kv_len: int, num_heads: int, block_size: tuple,
                 layer: int, layout: BlockLayout, params: dict, q_offset: int = 0, kv_offset: int = 0,
                 head_offset: int = 0, score_terms: tuple = ()):
        self.pattern = ir.strip_terms(pattern)
        self.score_terms = tuple(score_terms) or ir.score_terms(pattern)
        self.source = str(ir.with_terms(self.pattern, self.score_terms))
        self.q_len = q_len
        self.kv_len = kv_len
        self.q_offset = q_offset
        self.kv_offset = kv_offset
        self.head_offset = head_offset
        self.num_heads = num_heads
        self.block_size = tuple(block_size)
        self.layer = layer
        self.layout = layout
        self.params = params
        self.compile_seconds = 0.0
        self._mask_mods: dict = {}
        self._block_masks: dict = {}

    def __getstate__(self):  # mask_mods / BlockMasks hold closures and tensors: rebuilt on demand
        state = dict(self.__dict__)
        state["_mask_mods"] = {}
        state["_block_masks"] = {}
        for k in [k for k in state if k == "plan" or k.startswith("_plan_")]:
            del state[k]  # plans cache kernel terms (tensors, closures): recomputed on demand
        return state

    def __setstate__(self, state):
        state.setdefault("_block_masks", {})
        self.__dict__.update(state)

    # ---- predicates ------------------------------------------------------------------------------
    @cached_property
    def head_patterns(self) -> list[Pattern]:
        """The head-free pattern of heads 0 .. min(H, period) - 1 (head h uses entry h mod period)."""
        from .ir.specialize import head_patterns

        return head_patterns(self.pattern, self.num_heads)

    @cached_property
    def document_parts(self) -> tuple[Pattern, Pattern] | None:
        """``(p[document := all], p[document := none])`` for a pattern that reads ``document``
        but no ``per_document`` (SPEC §1.7; see ``patternc.lower.documents``), else None."""
        if not uses_documents(self.pattern) or uses_per_document(self.pattern):
            return None
        return substitute_document(self.pattern, ir.ALL), substitute_document(self.pattern, ir.NONE)

    @cached_property
    def static_pattern(self) -> Pattern:
        """The pattern ``layout`` and the densities describe: ``pattern`` itself, or for a pattern
        with ``document`` / ``per_document`` the union over every split into documents
        (``ir.specialize.runtime_bound``: an upper bound; ``layout_for(documents=…)`` is exact)."""
        return runtime_bound(self.pattern)

    def layout_at(self, block_size) -> BlockLayout:
        """The layout at another tile size (``BLOCK_SIZE``: an int or a pair, tokens), cached
        like ``layout``; the CPU kernel computes at finer tiles than the BlockMask's where that
        computes fewer token pairs (docs/execution.md)."""
        qb, kb = normalize_block_size(block_size)
        if (qb, kb) == tuple(self.block_size):
            return self.layout
        return _layout_cached(self.static_pattern, self.q_len, self.kv_len, qb, kb, self.num_heads,
                              self.q_offset, self.kv_offset)

    def _part_layout(self, part: Pattern) -> BlockLayout:
        qb, kb = self.block_size
        return _layout_cached(part, self.q_len, self.kv_len, qb, kb, self.num_heads, self.q_offset, self.kv_offset)

    @cached_property
    def is_causal_only(self) -> bool:
        """True iff the layer pattern is exactly ``causal`` with rows and columns aligned
        (``q_offset == kv_offset``) and no score terms: then SDPA's top-left ``is_causal`` is
        the whole computation."""
        return self.pattern == ir.CAUSAL and self.q_offset == self.kv_offset and not self.score_terms

    @property
    def mask_mod(self):
        """FlexAttention ``mask_mod(b, h, q_idx, kv_idx)`` with CPU parameter tensors;
        ``__name__`` is the canonical text. See ``mask_mod_on`` for another device."""
        return self.mask_mod_on("cpu")

    def mask_mod_on(self, device="cpu"):
        """The ``mask_mod`` with its parameter tensors and tables on ``device`` (cached)."""
        from .execute.maskmod import device_key, lower_to_mask_mod

        key = device_key(device)
        if key not in self._mask_mods:
            self._mask_mods[key] = lower_to_mask_mod(self.pattern, self.q_len, self.kv_len, device=device,
                                                     q_offset=self.q_offset, kv_offset=self.kv_offset)
        return self._mask_mods[key]

    def mask_numpy(self, h: int, q_idx, kv_idx) -> np.ndarray:
        """The predicate of head ``h`` on broadcastable int64 index arrays (numpy).

        Args:
            h: head index (>= 0).
            q_idx: int64 array, query rows in [0, Q_LEN) (position ``q_idx + q_offset``).
            kv_idx: int64 array, key columns in [0, KV_LEN), broadcastable with ``q_idx``.

        Returns:
            bool array of shape ``broadcast(q_idx, kv_idx)``.
        """
        from .lower.lowering import evaluate

        ph = self.head_patterns[h % len(self.head_patterns)]
        q_idx, kv_idx = np.asarray(q_idx, dtype=np.int64), np.asarray(kv_idx, dtype=np.int64)
        out = evaluate(ph, q_idx + self.q_offset, kv_idx + self.kv_offset, self.q_offset + self.q_len,
                       self.kv_offset + self.kv_len)
        return np.array(np.broadcast_to(out, np.broadcast(q_idx, kv_idx).shape), dtype=bool)

    def dense_mask(self, *, documents=None, key_padding_mask=None) -> np.ndarray:
        """bool [H, Q_LEN, KV_LEN]: FULL tiles from the layout, PARTIAL tiles by the predicate
        (materialises Q_LEN x KV_LEN per head: small sizes). With run-time data (SPEC §1.7)
        bool [B, H, Q_LEN, KV_LEN].

        Raises:
            PatternError: P360 when the pattern reads ``document`` and no documents are given.
        """
        from .lower.lowering import dense_from_layout

        if documents is None and key_padding_mask is None and not self.needs:
            return dense_from_layout(self.head_patterns, self.layout)
        kp, docs = self.runtime_inputs(documents=documents, key_padding_mask=key_padding_mask)
        return self._dense_runtime(kp, docs)

    def _dense_runtime(self, kp, docs) -> np.ndarray:
        from .ir.specialize import head_patterns
        from .lower.lowering import dense_from_layout

        if docs is not None and uses_per_document(self.pattern):
            dense = self._per_document_dense(docs)
        elif docs is not None:
            from .lower.documents import dense_with_documents

            pa, pn = self.document_parts
            dense = dense_with_documents(
                docs, dense_from_layout(head_patterns(pa, self.num_heads), self._part_layout(pa)),
                dense_from_layout(head_patterns(pn, self.num_heads), self._part_layout(pn)),
                self.q_offset, self.kv_offset)
        else:
            dense = dense_from_layout(self.head_patterns, self.layout)[None]
        if kp is not None:
            dense = dense & kp[:, None, None, :]
        return dense

    # ---- per_document (SPEC §1.1, §1.7; see patternc.lower.perdoc) ---------------------------------
    @cached_property
    def _per_document(self):
        """``(cross, parts)``: the whole pattern with every ``per_document`` := none (pairs in two
        documents), and one ``lower.perdoc.RowParts`` per head of the period."""
        from .lower.perdoc import RowParts, cross_pattern

        Qe, Ke = self.q_offset + self.q_len, self.kv_offset + self.kv_len
        return cross_pattern(self.pattern), [RowParts(ph, Qe, Ke) for ph in self.head_patterns]

    def _cross_with_documents(self, docs):
        """Kinds uint8 [B|1, H, nq, nkv] of the cross pattern with the documents, and
        ``counts(b, h) -> (q0, q1, k0, k1) -> int64`` of it (positions)."""
        from .ir.specialize import head_patterns
        from .lower.lowering import rect_counts

        cross, parts = self._per_document
        Qe, Ke = self.q_offset + self.q_len, self.kv_offset + self.kv_len
        if not uses_documents(cross):
            def counts(b, h):
                return lambda q0, q1, k0, k1: rect_counts(parts[h % len(parts)].cross, q0, q1, k0, k1, Qe, Ke)

            return self._part_layout(cross).kinds[None], counts
        from .lower.documents import doc_rect_counts, document_kinds

        ca, cn = substitute_document(cross, ir.ALL), substitute_document(cross, ir.NONE)
        ha, hn = head_patterns(ca, self.num_heads), head_patterns(cn, self.num_heads)
        kinds = document_kinds(docs, self._part_layout(ca), self._part_layout(cn), ha, hn)

        def counts(b, h):
            row = docs[min(b, docs.shape[0] - 1)]
            return lambda q0, q1, k0, k1: doc_rect_counts(ha[h % len(ha)], hn[h % len(hn)], q0, q1, k0, k1, Qe, Ke,
                                                          row)

        return kinds, counts

    def _per_document_kinds(self, docs):
        """Exact kinds uint8 [B, H, nq, nkv] of a pattern with ``per_document`` and the
        counter of ``key_padding_kinds`` (``lower.perdoc``: O(tiles + documents) per row)."""
        from .lower.lowering import Grid
        from .lower.perdoc import row_counts, row_kinds

        lay = self.layout
        g = Grid.uniform(lay.q_len, lay.kv_len, lay.q_block_size, lay.kv_block_size, lay.q_offset, lay.kv_offset)
        _cross, parts = self._per_document
        ck, cc = self._cross_with_documents(docs)
        H, period = self.num_heads, len(parts)
        kinds = np.empty((docs.shape[0], H) + g.shape, dtype=np.uint8)
        for b in range(docs.shape[0]):
            for h in range(min(H, period)):
                kinds[b, h] = row_kinds(parts[h], docs[b], g, ck[min(b, ck.shape[0] - 1), h], cc(b, h))
            for h in range(period, H):
                kinds[b, h] = kinds[b, h % period]

        def counter(b, h, q0, q1, k0, k1):
            return row_counts(parts[h % period], docs[min(b, docs.shape[0] - 1)], q0, q1, k0, k1, cc(b, h))

        return kinds, counter

    def per_document_pairs(self, docs) -> list[int]:
        """Exact allowed (h, i, j) pairs over all heads, per batch row, of a pattern with
        ``per_document`` and checked ``docs`` int64 [B, P] (closed-form counts per document)."""
        from .lower.perdoc import row_counts

        _cross, parts = self._per_document
        _ck, cc = self._cross_with_documents(docs)
        Qe, Ke = self.q_offset + self.q_len, self.kv_offset + self.kv_len
        return [sum(int(row_counts(parts[h % len(parts)], docs[b], [self.q_offset], [Qe], [self.kv_offset], [Ke],
                                   cc(b, h))[0]) for h in range(self.num_heads)) for b in range(docs.shape[0])]

    def _per_document_dense(self, docs) -> np.ndarray:
        from .ir.specialize import head_patterns
        from .lower.lowering import dense_from_layout
        from .lower.perdoc import row_dense

        cross, parts = self._per_document
        if uses_documents(cross):
            from .lower.documents import dense_with_documents

            ca, cn = substitute_document(cross, ir.ALL), substitute_document(cross, ir.NONE)
            cd = dense_with_documents(
                docs, dense_from_layout(head_patterns(ca, self.num_heads), self._part_layout(ca)),
                dense_from_layout(head_patterns(cn, self.num_heads), self._part_layout(cn)),
                self.q_offset, self.kv_offset)
        else:
            cd = dense_from_layout(head_patterns(cross, self.num_heads), self._part_layout(cross))[None]
        out = np.empty((docs.shape[0], self.num_heads, self.q_len, self.kv_len), dtype=bool)
        for b in range(docs.shape[0]):
            for h in range(self.num_heads):
                out[b, h] = row_dense(parts[h % len(parts)], docs[b], cd[min(b, cd.shape[0] - 1), h],
                                      self.q_offset, self.kv_offset)
        return out

    # ---- execution plan (SPEC §6) -----------------------------------------------------------------
    @cached_property
    def plan(self):
        """The execution plan (``patternc.lower.planner.ExecutionPlan``): disjoint terms, each
        in the query / key order where its pairs fill the fewest tiles; ``plan.terms``,
        ``plan.computed_tiles``, ``plan.natural_tiles``. Computed on first use (cached)."""
        return self.plan_for("auto")

    def plan_for(self, mode: str = "auto"):
        """``"auto"``: ``self.plan``; ``"natural"``: one term in natural order."""
        from .lower.planner import plan_layer

        key = "_plan_" + mode
        if key not in self.__dict__:
            if mode not in ("auto", "natural"):
                raise PatternError(Diagnostic("P352", f"unknown plan {mode!r}; expected 'auto' or 'natural'",
                                              None, "use plan='auto' (default) or plan='natural'"))
            # with offsets (decode, chunked prefill) the plan stays natural: such calls are short
            # in one axis, and the planner reasons in positions 0..len-1
            # (and for patterns with run-time data, `document`: their pairs are known per batch)
            offsets = bool(self.q_offset or self.kv_offset)
            plan = plan_layer(self.head_patterns, np.asarray(self.layout.kinds), self.q_len, self.kv_len,
                              self.block_size, self.num_heads,
                              mode="natural" if (offsets or self.needs) else mode)
            if mode == "auto" and offsets:
                plan.note = ("natural order: plans are made for compiles without q_offset / kv_offset "
                             "(decode and chunked-prefill calls are short in one axis)")
            elif mode == "auto" and self.needs:
                plan.note = ("natural order: a pattern with run-time documents runs each batch row's "
                             "exact layout (cp.layout_for)")
            self.__dict__[key] = plan
        return self.__dict__[key]

    # ---- densities -------------------------------------------------------------------------------
    @cached_property
    def allowed_pairs(self) -> int:
        """Exact number of allowed (h, i, j) token pairs over all heads."""
        from .ir.specialize import head_patterns
        from .lower.lowering import count_allowed

        heads = self.head_patterns if not self.needs else head_patterns(self.static_pattern, self.num_heads)
        per = [count_allowed(ph, self.layout, h) for h, ph in enumerate(heads)]
        period = len(per)
        return int(sum(per[h % period] for h in range(self.num_heads)))

    @property
    def allows_any(self) -> bool:
        """True when some (h, i, j) token pair is allowed: a FULL tile, or a PARTIAL tile holding
        an allowed pair (counted exactly, only when there is no FULL tile)."""
        return bool(self.layout.full_blocks or (self.layout.partial_blocks and self.allowed_pairs))

    @property
    def density(self) -> float:
        """Token density: allowed token pairs / (H * Q_LEN * KV_LEN), in [0, 1] (of
        ``static_pattern``: an upper bound for a pattern with ``document``)."""
        return self.allowed_pairs / float(self.num_heads * self.q_len * self.kv_len)

    @property
    def block_density(self) -> float:
        """Block density: token pairs in computed (FULL + PARTIAL) tiles, clipped at the real
        lengths, / (H * Q_LEN * KV_LEN), in [0, 1]."""
        return self.layout.block_density

    # ---- torch -------------------------------------------------------------------------------------
    def block_mask(self, device="cpu", *, documents=None, key_padding_mask=None):
        """FlexAttention ``BlockMask`` (batch 1, H heads) built from the layout with
        ``BlockMask.from_kv_blocks``, carrying ``mask_mod_on(device)``; equal to
        ``create_block_mask(self.mask_mod, 1, H, Q_LEN, KV_LEN, BLOCK_SIZE=self.block_size)``.
        Built once per device and cached on this object (not pickled).

        With run-time data (``documents`` ids [B, P] / [P] or lengths, ``key_padding_mask``
        bool [B, KV_LEN], SPEC §1.7) the BlockMask has batch B, is built from
        ``layout_for(...)`` in O(B * (tiles + documents)) and equals ``create_block_mask`` of
        ``mask_mod_for(...)`` with that B; it is not cached (the data changes per batch).

        Raises:
            PatternError: P360-P362 for missing or malformed run-time data."""
        from .execute.blockmask import to_block_mask
        from .execute.maskmod import device_key

        if documents is not None or key_padding_mask is not None or self.needs:
            kp, docs = self.runtime_inputs(documents=documents, key_padding_mask=key_padding_mask)
            if kp is not None or docs is not None:
                return to_block_mask(self._layout_for(kp, docs), self._mask_mod_for(device, kp, docs), device=device)
        key = device_key(device)
        if key not in self._block_masks:
            self._block_masks[key] = to_block_mask(self.layout, self.mask_mod_on(device), device=device)
        return self._block_masks[key]

    def attention(self, q, k, v, *, scale=None, backend="auto", return_backend=False, dropout_p=0.0,
                  documents=None, key_padding_mask=None, plan="auto"):
        """Sparse attention with this layer's pattern: q float [B, H, Q_LEN, D], k [B, H_kv, KV_LEN, D],
        v [B, H_kv, KV_LEN, Dv] -> [B, H, Q_LEN, Dv] (H_kv divides H: grouped-query attention).

        ``backend``: "auto", "flex", "blocksparse" or "sdpa"; ``return_backend=True`` also
        returns the name of the one that ran. ``key_padding_mask``: bool [B, KV_LEN], True =
        real key (SPEC §1.7); ``documents``: ids [B, P] / [P] or lengths per row (SPEC §1.7).
        ``plan``: "auto" (``self.plan``) or "natural" (SPEC §6).
        Raises PatternError P350-P353 for inputs that do not fit, P360-P362 for run-time data.
        See ``patternc.execute.attention`` and docs/execution.md, docs/runtime.md."""
        from .execute import attention

        return attention(self, q, k, v, scale=scale, backend=backend, return_backend=return_backend,
                         dropout_p=dropout_p, documents=documents, key_padding_mask=key_padding_mask,
                         plan=plan)

    # ---- run-time data (SPEC §1.7) -------------------------------------------------------------------
    @cached_property
    def needs(self) -> frozenset:
        """The run-time inputs the pattern requires: ``frozenset({"documents"})`` when it uses
        ``document`` / ``per_document``, else empty. (``key_padding_mask`` is always optional.)"""
        return frozenset({"documents"}) if uses_documents(self.pattern) else frozenset()

    def runtime_inputs(self, *, documents=None, key_padding_mask=None, batch: int | None = None):
        """Check run-time data: ``(key_padding bool [B, KV_LEN] | None, documents int64 [B|1, P] | None)``.

        Raises:
            PatternError: P360 the pattern needs ``documents`` and none were given; P361 bad
                documents; P362 a bad key_padding_mask (shapes, dtypes, batch sizes).
        """
        from .lower.runtime import check_documents, check_key_padding

        kp = None if key_padding_mask is None else check_key_padding(key_padding_mask, self.kv_len, batch)
        if kp is not None and batch is None:
            batch = kp.shape[0]
        docs = None
        if documents is not None and "documents" not in self.needs:
            warnings.warn(PatternWarning(Diagnostic(
                "W007", f"documents were given but the pattern `{self.source}` does not use `document`: they "
                "change nothing, and attention crosses document boundaries", None,
                f"to keep attention inside each packed document write `document & ({self.source})`",
                severity="warning", filename="<pattern>")), stacklevel=3)
        if "documents" in self.needs:
            if documents is None:
                raise PatternError(Diagnostic(
                    "P360", f"the pattern `{self.source}` uses "
                    f"`{'per_document' if uses_per_document(self.pattern) else 'document'}` and needs run-time `documents`, but "
                    "none were given", None, "pass documents=ids [B, P] (or [P], or lengths [[l0, l1, ...]]) to "
                    "attention / block_mask / layout_for (CLI: --documents L1,L2,...)", filename="<pattern>"))
            docs = check_documents(documents, max(self.q_offset + self.q_len, self.kv_offset + self.kv_len), batch)
            if kp is not None and docs.shape[0] not in (1, kp.shape[0]):
                raise PatternError(Diagnostic("P361", f"documents has {docs.shape[0]} rows but key_padding_mask "
                                              f"{kp.shape[0]}", None, "give both one row per batch element"))
        return kp, docs

    def layout_for(self, *, documents=None, key_padding_mask=None) -> BlockLayout:
        """The layout of a batch with run-time data (SPEC §1.7): kinds uint8 [B, H,
        num_q_blocks, num_kv_blocks], built in O(B * (tiles + documents)) from the static
        layout (``self.layout``, computed once) without Q_LEN x KV_LEN work.

        Args:
            documents: ids int [B, P] / [P], or lengths per row [[l0, l1, ...], ...] (P in positions).
            key_padding_mask: bool [B, KV_LEN], True = real key.

        Returns:
            ``self.layout`` when no run-time data applies, else a BlockLayout with a batch axis.

        Raises:
            PatternError: P360-P362 (see ``runtime_inputs``).
        """
        kp, docs = self.runtime_inputs(documents=documents, key_padding_mask=key_padding_mask)
        return self._layout_for(kp, docs)

    def _layout_for(self, kp, docs) -> BlockLayout:
        from .lower.runtime import key_padding_kinds

        lay = self.layout
        if kp is None and docs is None:
            return lay
        kinds = lay.kinds
        counter, heads = None, self.head_patterns
        if docs is not None:
            kinds, counter = self._document_kinds(docs)
        if kp is not None:
            kinds = key_padding_kinds(kinds, kp, lay, heads, counter)
        kinds = np.ascontiguousarray(kinds, dtype=np.uint8)
        kinds.setflags(write=False)
        return BlockLayout(kinds=kinds, q_len=lay.q_len, kv_len=lay.kv_len, q_block_size=lay.q_block_size,
                           kv_block_size=lay.kv_block_size, q_offset=lay.q_offset, kv_offset=lay.kv_offset)

    def _document_kinds(self, docs):
        """Exact kinds uint8 [B, H, nq, nkv] of the pattern with checked ``docs`` int64 [B, P],
        and ``counter(b, h, q0, q1, k0, k1)`` of its allowed pairs (key padding's refinement).
        Rows packed the same way are built once."""
        if uses_per_document(self.pattern):
            from .lower.perdoc import row_counts

            _cross, parts = self._per_document
            period = len(parts)
            cc = None

            def counter(b, h, q0, q1, k0, k1):
                nonlocal cc
                if cc is None:
                    cc = self._cross_with_documents(docs)[1]
                return row_counts(parts[h % period], docs[min(b, docs.shape[0] - 1)], q0, q1, k0, k1, cc(b, h))
        else:
            from .ir.specialize import head_patterns
            from .lower.documents import doc_rect_counts

            pa, pn = self.document_parts
            ha, hn = head_patterns(pa, self.num_heads), head_patterns(pn, self.num_heads)
            Qe, Ke = self.q_offset + self.q_len, self.kv_offset + self.kv_len

            def counter(b, h, q0, q1, k0, k1):
                return doc_rect_counts(ha[h % len(ha)], hn[h % len(hn)], q0, q1, k0, k1, Qe, Ke,
                                       docs[min(b, docs.shape[0] - 1)])
        if docs.shape[0] > 1:
            first: dict = {}  # row bytes -> index of its first occurrence (O(B * P), no sort)
            inverse = np.array([first.setdefault(row.tobytes(), len(first)) for row in docs])
            if len(first) < docs.shape[0]:
                uniq = docs[np.unique(inverse, return_index=True)[1]]
                return self._document_kinds(uniq)[0][inverse], counter
        if uses_per_document(self.pattern):
            kinds = self._per_document_kinds(docs)[0]
        else:
            from .lower.documents import document_kinds

            kinds = document_kinds(docs, self._part_layout(pa), self._part_layout(pn), ha, hn)
        return kinds, counter

    def mask_mod_for(self, device="cpu", *, documents=None, key_padding_mask=None):
        """The ``mask_mod(b, h, q_idx, kv_idx)`` of a batch with run-time data (reads ``b``);
        ``mask_mod_on(device)`` when there is none."""
        kp, docs = self.runtime_inputs(documents=documents, key_padding_mask=key_padding_mask)
        return self._mask_mod_for(device, kp, docs)

    def _mask_mod_for(self, device, kp, docs):
        if kp is None and docs is None:
            return self.mask_mod_on(device)
        from .execute.maskmod import lower_to_mask_mod

        return lower_to_mask_mod(self.pattern, self.q_len, self.kv_len, device=device, q_offset=self.q_offset,
                                 kv_offset=self.kv_offset, key_padding=kp, documents=docs)

    # ---- reporting ---------------------------------------------------------------------------------
    def summary(self) -> dict:
        """A JSON-ready dict: canonical (score terms included), score_terms, lengths, heads,
        block size and counts, densities, time."""
        from .ir.terms import terms_json

        lay = self.layout
        return {
            "canonical": self.source,
            "score_terms": terms_json(self.score_terms, num_heads=self.num_heads),
            "q_len": self.q_len,
            "kv_len": self.kv_len,
            "num_heads": self.num_heads,
            "block_size": list(self.block_size),
            "layer": self.layer,
            "q_offset": self.q_offset,
            "kv_offset": self.kv_offset,
            "head_offset": self.head_offset,
            "num_q_blocks": lay.num_q_blocks,
            "num_kv_blocks": lay.num_kv_blocks,
            "density": self.density,
            "block_density": self.block_density,
            "full_blocks": lay.full_blocks,
            "partial_blocks": lay.partial_blocks,
            "empty_blocks": lay.empty_blocks,
            "compile_seconds": self.compile_seconds,
            "params": dict(self.params),
        }

    def __repr__(self) -> str:
        offsets = "".join(f", {k}={getattr(self, k)}" for k in ("q_offset", "kv_offset", "head_offset")
                          if getattr(self, k))
        return (f"CompiledPattern({self.source!r}, Q_LEN={self.q_len}, KV_LEN={self.kv_len}{offsets}, H={self.num_heads}, "
                f"BLOCK_SIZE={self.block_size}, layer={self.layer}, full={self.layout.full_blocks}, "
                f"partial={self.layout.partial_blocks}, block_density={self.block_density:.4f})")

    # ---- artifact ----------------------------------------------------------------------------------
    def save(self, path) -> None:
        """Write the compiled layout as ``.npz`` (no pickle): ``kinds`` uint8 [H, nq, nkv] and
        ``meta`` (UTF-8 JSON bytes: format, version, canonical source, params, lengths, block
        size, heads, layer, patternc version). Atomic: a temporary file in the same folder is
        renamed over ``path``; on failure nothing is left behind.

        Raises:
            OSError: the folder is missing or not writable.
        """
        from . import __version__

        meta = {
            "format": ARTIFACT_FORMAT, "format_version": ARTIFACT_VERSION, "patternc_version": __version__,
            "canonical": self.source, "params": dict(self.params), "q_len": self.q_len, "kv_len": self.kv_len,
            "num_heads": self.num_heads, "block_size": list(self.block_size), "layer": self.layer,
            "q_offset": self.q_offset, "kv_offset": self.kv_offset, "head_offset": self.head_offset,
        }
        blob = np.frombuffer(json.dumps(meta, sort_keys=True).encode("utf-8"), dtype=np.uint8)
        path = os.fspath(path)
        from .fileio import atomic_write

        atomic_write(path, lambda f: np.savez_compressed(f, kinds=np.asarray(self.layout.kinds), meta=blob))


def _bad_artifact(path, why: str) -> PatternError:
    return PatternError(Diagnostic("P304", f"{path} is not a valid patternc compiled layout: {why}", None,
                                   "recreate it with `patternc compile ... -o FILE` or CompiledPattern.save",
                                   filename=os.fspath(path)))


def load_compiled(path, *, verify: bool = True) -> CompiledPattern:
    """Read a layout written by ``CompiledPattern.save`` (``.npz``, loaded without pickle).

    Args:
        path: the file.
        verify: recompile the stored pattern and require the stored kinds to be identical
            (catches edited files and files from an incompatible patternc).

    Returns:
        CompiledPattern (``compile_seconds`` is the load time).

    Raises:
        OSError: the file cannot be read.
        PatternError: P304 when the file is not a valid compiled layout (wrong format,
            corrupt, inconsistent shapes, or kinds that differ from its pattern).
    """
    t0 = time.perf_counter()
    path = os.fspath(path)
    try:
        loaded = np.load(path, allow_pickle=False)
        if not isinstance(loaded, np.lib.npyio.NpzFile):  # a bare .npy array (or a memmap)
            raise _bad_artifact(path, f"a single {type(loaded).__name__} (.npy), not an .npz archive")
        with loaded as z:
            names = set(z.files)
            if not {"kinds", "meta"} <= names:
                raise _bad_artifact(path, f"expected arrays 'kinds' and 'meta', found {sorted(names)}")
            kinds = np.array(z["kinds"])
            meta = json.loads(bytes(np.asarray(z["meta"], dtype=np.uint8)).decode("utf-8"))
    except PatternError:
        raise
    except (FileNotFoundError, IsADirectoryError, PermissionError):
        raise
    except (ValueError, KeyError, OSError, EOFError, zipfile.BadZipFile, UnicodeDecodeError) as e:
        # numpy's message for a non-npz file advises allow_pickle: never pass that advice on
        why = "not an .npz archive" if "pickle" in str(e) or isinstance(e, zipfile.BadZipFile) else f"{type(e).__name__}: {e}"
        raise _bad_artifact(path, why) from None
    if not isinstance(meta, dict) or meta.get("format") != ARTIFACT_FORMAT:
        raise _bad_artifact(path, f"metadata 'format' is not {ARTIFACT_FORMAT!r}")
    if meta.get("format_version") != ARTIFACT_VERSION:
        raise _bad_artifact(path, f"format_version {meta.get('format_version')!r} (this patternc reads {ARTIFACT_VERSION})")
    try:
        q_len, kv_len, H, layer = (int(meta[k]) for k in ("q_len", "kv_len", "num_heads", "layer"))
        q_off, kv_off = int(meta.get("q_offset", 0)), int(meta.get("kv_offset", 0))
        qb, kb = normalize_block_size(tuple(meta["block_size"]))
        canonical = str(meta["canonical"])
        params = {str(k): int(v) for k, v in dict(meta.get("params") or {}).items()}
    except (KeyError, TypeError, ValueError) as e:
        raise _bad_artifact(path, f"bad metadata: {type(e).__name__}: {e}") from None
    if min(q_len, kv_len, H) < 1 or min(q_off, kv_off) < 0:
        raise _bad_artifact(path, "lengths and num_heads must be >= 1, offsets >= 0")
    nq, nk = cdiv(q_len, qb), cdiv(kv_len, kb)
    if kinds.dtype != np.uint8 or kinds.shape != (H, nq, nk):
        raise _bad_artifact(path, f"kinds is {kinds.dtype} {list(kinds.shape)}, expected uint8 {[H, nq, nk]}")
    if not np.isin(kinds, (EMPTY, PARTIAL, FULL)).all():
        raise _bad_artifact(path, "kinds holds values outside EMPTY=0, PARTIAL=1, FULL=2")
    from .source.frontdoor import parse

    try:
        pattern = parse(canonical)
    except PatternError as e:
        raise _bad_artifact(path, f"its pattern does not parse: {e.diagnostic.message}") from None
    kinds.setflags(write=False)
    layout = BlockLayout(kinds=kinds, q_len=q_len, kv_len=kv_len, q_block_size=qb, kv_block_size=kb,
                         q_offset=q_off, kv_offset=kv_off)
    if verify:
        # the stored canonical text already has any head_offset applied: compile it unshifted
        fresh = compile(pattern, q_len=q_len, kv_len=kv_len, num_heads=H, block_size=(qb, kb),
                        q_offset=q_off, kv_offset=kv_off)
        if not np.array_equal(fresh.layout.kinds, kinds):
            bad = int((fresh.layout.kinds != kinds).sum())
            raise _bad_artifact(path, f"{bad} tile kinds differ from its pattern `{canonical}`")
        layout = fresh.layout
        pattern = ir.with_terms(fresh.pattern, ir.score_terms(pattern))
    cp = CompiledPattern(pattern=pattern, q_len=q_len, kv_len=kv_len, num_heads=H, block_size=(qb, kb),
                         layer=layer, layout=layout, params=params, q_offset=q_off, kv_offset=kv_off,
                         head_offset=int(meta.get("head_offset", 0)))
    cp.compile_seconds = time.perf_counter() - t0
    return cp


__all__ = ["compile", "CompiledPattern", "load_compiled"]
