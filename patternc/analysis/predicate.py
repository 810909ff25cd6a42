"""Point and broadcast evaluation of a bound pattern, and the "via" of one attention edge.

The reachability engines need the predicate of SPEC §1 at chosen token pairs (a row of a
layer, the tiles of a layout, one hop of a witness path) without materialising
``[Q_LEN, KV_LEN]``. ``evaluate`` is the compiler's numpy broadcasting evaluator
(``patternc.lower.evaluate``, tested against the oracle ``patternc.reference``) per head;
``explain`` names the part of a pattern that allows one pair, e.g. ``strided(s=8) & causal``
for the hop (i=16, j=0) of ``(local(w=9) | strided(s=8)) & causal``.

Patterns passed here have a concrete layer (``select_layer``) and concrete lengths
(``bind_lengths``); heads are resolved by the ``head`` argument.
"""

from __future__ import annotations

import functools

import numpy as np

from ..ir.nodes import And, Blocks, Diff, Heads, Layers, Or, Pattern
from ..ir.printer import _prec
from ..ir.specialize import cdiv, select_head


def evaluate(p: Pattern, head: int, i, j, q_len: int, kv_len: int) -> np.ndarray:
    """``attend(h, i, j)`` of one layer at the given positions, broadcasting ``i`` against ``j``.

    Args:
        p: a pattern with one layer selected and lengths bound (no ``layers(...)``, no
            ``q_len``/``kv_len`` left).
        head: head index h (``heads(p0, ...)`` uses entry h mod m).
        i: int64 query positions, any shape broadcastable with ``j`` (tokens, 0 <= i < Q_LEN).
        j: int64 key positions (tokens, 0 <= j < KV_LEN).
        q_len: Q_LEN, tokens.
        kv_len: KV_LEN, tokens.

    Returns:
        bool array of the broadcast shape of ``i`` and ``j``.

    Raises:
        ValueError: a ``layers(...)`` node is left, or an unknown node.

    Example:
        >>> import numpy as np, patternc
        >>> p = patternc.parse("local(w=2) & causal")
        >>> evaluate(p, 0, np.arange(3)[:, None], np.arange(3)[None, :], 3, 3).astype(int)
        array([[1, 0, 0],
               [1, 1, 0],
               [0, 1, 1]])
    """
    i = np.asarray(i, dtype=np.int64)
    j = np.asarray(j, dtype=np.int64)
    return _eval(p, head, i, j, q_len, kv_len)


def _eval(p, h, i, j, q_len, kv_len):
    """One head of the pattern, evaluated by the compiler's numpy evaluator (``lower.evaluate``,
    itself tested against the oracle), broadcast to the full shape."""
    from ..lower.lowering import evaluate as evaluate_head

    if any(isinstance(n, Layers) for n in p.walk()):
        raise ValueError("select a layer first (patternc.ir.specialize.select_layer)")
    out = evaluate_head(_head(p, h), i, j, q_len, kv_len)
    return np.broadcast_to(out, np.broadcast_shapes(np.shape(i), np.shape(j)))


@functools.lru_cache(maxsize=4096)
def _head(p: Pattern, h: int) -> Pattern:
    return select_head(p, h)


def _holds(p, h, i, j, q_len, kv_len) -> bool:
    return bool(_eval(p, h, np.asarray(i, dtype=np.int64), np.asarray(j, dtype=np.int64), q_len, kv_len))


def explain(p: Pattern, head: int, i: int, j: int, q_len: int, kv_len: int) -> str | None:
    """The part of ``p`` that lets query ``i`` attend key ``j`` in head ``head``, as pattern text.

    An ``|`` is explained by its first operand that holds, an ``&`` by the conjunction of its
    operands' explanations, a primitive or a negation by itself, ``blocks(b, p)`` by
    ``blocks(b, <explanation at block coordinates>)``.

    Returns:
        The explanation text, or None when ``attend(head, i, j)`` is false.

    Example:
        >>> import patternc
        >>> explain(patternc.parse("(local(w=9) | strided(s=8)) & causal"), 0, 16, 0, 64, 64)
        'strided(s=8) & causal'
    """
    if not _holds(p, head, i, j, q_len, kv_len):
        return None
    return _why(p, head, i, j, q_len, kv_len)[0]


def _why(p, h, i, j, q_len, kv_len) -> tuple[str, int]:
    """(text, precedence) for a node known to hold at (i, j); precedence as in SPEC §1.2."""
    if isinstance(p, Or):
        for c in p.items:
            if _holds(c, h, i, j, q_len, kv_len):
                return _why(c, h, i, j, q_len, kv_len)
        raise AssertionError("an | that holds has an operand that holds")
    if isinstance(p, And):
        parts = []
        for c in p.items:
            text, prec = _why(c, h, i, j, q_len, kv_len)
            parts.append(f"({text})" if prec > 3 else text)
        return " & ".join(parts), 3
    if isinstance(p, Heads):
        return _why(p.items[h % len(p.items)], h, i, j, q_len, kv_len)
    if isinstance(p, Blocks):
        b = p.b
        inner, _ = _why(p.child, h, i // b, j // b, cdiv(q_len, b), cdiv(kv_len, b))
        return f"blocks({b}, {inner})", 0
    if isinstance(p, Diff):
        left, lp = _why(p.left, h, i, j, q_len, kv_len)
        return f"{f'({left})' if lp > 2 else left} - {_paren(p.right, 2)}", 2
    text = str(p)
    return text, _prec(p)


def _paren(p, level) -> str:
    text = str(p)
    return f"({text})" if _prec(p) >= level else text
