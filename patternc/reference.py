"""The oracle: dense masks straight from the predicates of SPEC §1.1 (numpy, small sizes).

Everything faster in patternc (analytic layouts, mask_mods, block masks, reachability
engines) is tested against ``dense_mask``. It materialises ``[H, Q_LEN, KV_LEN]`` booleans,
so it is meant for lengths up to a few thousand tokens.
"""

from __future__ import annotations

import numpy as np

from .errors import Diagnostic, PatternError
from .ir.nodes import And, Blocks, Diff, Heads, Layers, Not, Or, Pattern, PerDocument, Prim
from .ir.specialize import bind_lengths, select_layer


def random_keys(r: int, seed: int, q_len: int, kv_len: int) -> list[np.ndarray]:
    """The keys ``random(r, seed)`` draws for each query row (SPEC §1.1): one PCG64 stream,
    rows 0..Q_LEN-1 in order, ``choice(KV_LEN, size=min(r, KV_LEN), replace=False)``."""
    rng = np.random.Generator(np.random.PCG64(seed))
    return [rng.choice(kv_len, size=min(r, kv_len), replace=False) for _ in range(q_len)]


def _prim(p: Prim, q_len: int, kv_len: int, doc=None) -> np.ndarray:
    i = np.arange(q_len, dtype=np.int64)[:, None]
    j = np.arange(kv_len, dtype=np.int64)[None, :]
    a = p.argdict
    full = np.ones((q_len, kv_len), dtype=bool)
    n = p.name
    if n == "document":  # SPEC §1.7: doc(i) = doc(j), doc(x) = documents[b, x]
        if doc is None:
            raise ValueError("`document` needs documents= (SPEC §1.7)")
        return doc[:q_len][:, None] == doc[:kv_len][None, :]
    if n == "all":
        return full
    if n == "none":
        return ~full
    if n == "causal":
        return j <= i
    if n == "local":
        return np.abs(i - j) < a["w"]
    if n == "band":
        return (i - a["left"] <= j) & (j <= i + a["right"])
    if n == "strided":
        return (i - j) % a["s"] == 0
    if n == "dilated":
        return ((i - j) % a["d"] == 0) & (np.abs(i - j) < a["w"] * a["d"])
    if n == "chunk":
        return (i // a["l"]) == (j // a["l"])
    if n == "summary":
        l, c, g = a["l"], a["c"], a["g"]
        jm = j % l
        return full & (l - (g + 1) * c <= jm) & (jm < l - g * c)
    if n == "sink":
        return full & (j < a["n"])
    if n == "global":
        if "n" in a:
            return (i < a["n"]) | (j < a["n"])
        pos = np.asarray(a["at"], dtype=np.int64)
        return np.isin(i, pos) | np.isin(j, pos)
    if n == "prefix":
        return (i < a["n"]) & (j < a["n"])
    if n == "random":
        out = np.zeros((q_len, kv_len), dtype=bool)
        for row, keys in enumerate(random_keys(a["r"], a["seed"], q_len, kv_len)):
            out[row, keys] = True
        return out
    raise ValueError(f"unknown primitive {n}")


def _eval(p: Pattern, h: int, q_len: int, kv_len: int, doc=None) -> np.ndarray:
    if isinstance(p, Prim):
        return _prim(p, q_len, kv_len, doc)
    if isinstance(p, Not):
        return ~_eval(p.child, h, q_len, kv_len, doc)
    if isinstance(p, Diff):
        return _eval(p.left, h, q_len, kv_len, doc) & ~_eval(p.right, h, q_len, kv_len, doc)
    if isinstance(p, And):
        out = np.ones((q_len, kv_len), dtype=bool)
        for c in p.items:
            out &= _eval(c, h, q_len, kv_len, doc)
        return out
    if isinstance(p, Or):
        out = np.zeros((q_len, kv_len), dtype=bool)
        for c in p.items:
            out |= _eval(c, h, q_len, kv_len, doc)
        return out
    if isinstance(p, Heads):
        return _eval(p.items[h % len(p.items)], h, q_len, kv_len, doc)
    if isinstance(p, Layers):  # pragma: no cover - removed by select_layer
        raise ValueError("select a layer first")
    if isinstance(p, Blocks):
        b = p.b
        inner = _eval(p.child, h, -(-q_len // b), -(-kv_len // b), None)
        return inner[np.ix_(np.arange(q_len) // b, np.arange(kv_len) // b)]
    if isinstance(p, PerDocument):  # SPEC §1.1: same run, p at (i - start, j - start), lengths = the run's
        if doc is None:
            raise ValueError("`per_document` needs documents= (SPEC §1.7)")
        out = np.zeros((q_len, kv_len), dtype=bool)
        start = 0
        while start < len(doc):
            end = start + 1
            while end < len(doc) and doc[end] == doc[start]:
                end += 1
            L = end - start
            inner = bind_lengths(p.child, L, L, normalized=False)
            # inside, the only document is this one: every position has the same id
            m = _eval(inner, h, L, L, np.zeros(L, dtype=np.int64))
            qe, ke = min(end, q_len), min(end, kv_len)
            if qe > start and ke > start:
                out[start:qe, start:ke] = m[:qe - start, :ke - start]
            start = end
        return out
    raise TypeError(f"not a pattern: {p!r}")


def _elaborated(p_or_source, params) -> Pattern:
    """The pattern as the elaborator built it, *not normalised*: the oracle must not share the
    normaliser's rewrites with the compiler, or a wrong rewrite would pass every comparison."""
    if isinstance(p_or_source, Pattern):
        if params:
            raise PatternError(Diagnostic("P214", "params apply to source text; this is already a Pattern", None,
                                          "pass the source text with params=..."))
        return p_or_source
    from .lang.elaborate import elaborate
    from .lang.parser import decode_source

    if not isinstance(p_or_source, (str, bytes)):
        raise TypeError(f"dense_mask takes pattern text, bytes or a Pattern, got {type(p_or_source).__name__}")
    text = decode_source(p_or_source, "<bytes>") if isinstance(p_or_source, bytes) else p_or_source
    return elaborate(text, params=params).pattern


def dense_mask(p_or_source, *, q_len: int, kv_len: int | None = None, num_heads: int = 1,
               layer: int = 0, params: dict | None = None, q_offset: int = 0, kv_offset: int = 0,
               head_offset: int = 0, documents=None) -> np.ndarray:
    """The allowed token pairs of one layer, straight from SPEC §1.1 and §1.6.

    Args:
        p_or_source: a ``Pattern`` or pattern source text.
        q_len: Q_LEN, tokens (>= 1): query rows.
        kv_len: KV_LEN, tokens (default: q_len): key columns.
        num_heads: H; head h uses entry ``(h + head_offset) mod m`` of every ``heads(...)``.
        layer: which entry of every ``layers(...)`` applies (``layer mod m``).
        params: values for the source's ``param``s.
        q_offset, kv_offset: row r is position ``r + q_offset``, column c position
            ``c + kv_offset`` (§1.6). Written literally from the SPEC: the mask over the whole
            position extents ``q_offset + q_len`` x ``kv_offset + kv_len`` (``q_len``/``kv_len``
            built-ins bound to the extents), then its last rows and columns.
        head_offset: head h is head ``head_offset + h`` of the pattern (§1.6).
        documents: run-time document ids (§1.7): int ``[P]`` or ``[B, P]`` (P >= the position
            extents), or lengths per row as a list of lists ``[[l0, l1, …], …]``;
            ``doc(x) = documents[b, x]``, and ``document`` holds iff ``doc(i) = doc(j)``;
            ``per_document(p)`` holds iff i and j are in one maximal run of equal ids and ``p``
            holds at ``(i - start, j - start)`` over that run's length.

    Returns:
        bool [H, Q_LEN, KV_LEN]; True = query row r may attend key column c. With 2-D
        ``documents`` (or lengths): bool [B, H, Q_LEN, KV_LEN].

    Raises:
        PatternError: invalid source, or a parameter out of range at these lengths (P301).
        ValueError: non-positive lengths or head count.

    Example:
        >>> dense_mask("local(w=2) & causal", q_len=4)[0].astype(int)
        array([[1, 0, 0, 0],
               [1, 1, 0, 0],
               [0, 1, 1, 0],
               [0, 0, 1, 1]])
    """
    kv_len = q_len if kv_len is None else kv_len
    if q_len < 1 or kv_len < 1 or num_heads < 1:
        raise ValueError(f"q_len, kv_len and num_heads must be >= 1, got {q_len}, {kv_len}, {num_heads}")
    if min(q_offset, kv_offset, head_offset) < 0:
        raise ValueError(f"offsets must be >= 0, got {q_offset}, {kv_offset}, {head_offset}")
    p = _elaborated(p_or_source, params)
    Q, K = q_offset + q_len, kv_offset + kv_len  # position extents
    try:
        p = bind_lengths(select_layer(p, layer), Q, K, normalized=False)
    except PatternError as e:
        if isinstance(p_or_source, str):
            raise e.with_source(p_or_source) from None
        raise
    if documents is None:
        return np.stack([_eval(p, head_offset + h, Q, K)[q_offset:, kv_offset:] for h in range(num_heads)])
    if isinstance(documents, (list, tuple)) and documents and isinstance(documents[0], (list, tuple)):
        rows = np.stack([np.repeat(np.arange(len(ls)), ls) for ls in documents])  # lengths -> ids
    else:
        rows = np.asarray(documents)
    batched = rows.ndim == 2
    out = np.stack([np.stack([_eval(p, head_offset + h, Q, K, row)[q_offset:, kv_offset:] for h in range(num_heads)])
                    for row in np.atleast_2d(rows)])
    return out if batched else out[0]
