"""Properties of a pattern shown by ``patternc check``: causal, symmetric, heads, layers.

``causal`` / ``symmetric`` are first attempted as proofs over the IR (sound: ``True`` means
the property holds at every length). Without a proof the pattern is probed with the lowering
evaluator (``patternc.lower.lowering.evaluate``) at a length a little larger than its largest parameter
(``probe_length``), over every head and layer of its period: ``False`` then comes with a
concrete witness, and a property neither proven nor refuted is ``None`` ("unknown").
"""

from __future__ import annotations

import numpy as np

from ..ir.facts import proves_causal, proves_symmetric
from ..ir.nodes import Blocks, Pattern, Prim

PROBE_MIN = 64  # tokens
PROBE_MAX = 1024  # tokens: the probe materialises [H, n, n] booleans per layer
PROBE_BUDGET = 1 << 25  # at most this many (layer, head, i, j) evaluated by one probe


def probe_length(p: Pattern) -> int:
    """A length (tokens) at which the pattern's behaviour away from the start shows: twice
    its largest integer argument (block sizes multiply the arguments inside them), plus 2,
    clamped to [PROBE_MIN, PROBE_MAX]."""
    best = 0
    stack = [(p, 1)]
    while stack:
        n, scale = stack.pop()
        if isinstance(n, Prim):
            for _k, v in n.args:
                vals = v if isinstance(v, tuple) else (v,)
                for x in vals:
                    if isinstance(x, int):
                        best = max(best, x * scale)
        elif isinstance(n, Blocks):
            b = n.b if isinstance(n.b, int) else 1
            best = max(best, b)
            stack.append((n.child, scale * b))
        else:
            stack.extend((c, scale) for c in n.children())
    return int(min(PROBE_MAX, max(PROBE_MIN, 2 * best + 2)))


def probe(p: Pattern, check) -> list | None:
    """Evaluate ``check(mask) -> (h, i, j) | None`` on the evaluated mask of every layer of the
    period at ``probe_length(p)``; return ``[layer, h, i, j]`` of the first witness, or None
    (also when the pattern cannot be evaluated at that length, e.g. a symbolic argument out of
    range)."""
    from ..errors import PatternError
    from ..ir.nodes import ALL, NONE
    from ..ir.specialize import (
        head_patterns,
        specialize,
        substitute_document,
        substitute_per_document,
        uses_documents,
    )
    from ..lower.lowering import evaluate

    n = probe_length(p)
    heads, layers = p.num_heads, p.num_layers
    while n > PROBE_MIN and heads * layers * n * n > PROBE_BUDGET:
        n //= 2
    if heads * layers * n * n > PROBE_BUDGET:  # a huge head/layer period: do not probe
        return None
    for layer in range(layers):
        try:
            lp = specialize(p, q_len=n, kv_len=n, layer=layer)
        except (PatternError, ValueError, ZeroDivisionError):
            return None
        i = np.arange(n)[:, None]
        j = np.arange(n)[None, :]
        # `document` (SPEC §1.7): a property holds for every split into documents iff it holds
        # where the pair is in one document (document := all) and where it is not (:= none).
        # With `per_document(x)` the probe tries two real splits: one document over all n
        # positions (x bound at n) and every pair in two documents (x := none): a witness
        # found there is one of a split a user can pass.
        variants = [lp]
        if uses_documents(lp):
            try:
                variants = [substitute_document(substitute_per_document(lp, "whole", n), ALL),
                            substitute_document(substitute_per_document(lp, "none"), NONE)]
            except PatternError:
                return None
        for v in variants:
            per_head = head_patterns(v, heads)
            m = np.stack([np.broadcast_to(evaluate(per_head[h % len(per_head)], i, j, n, n), (n, n))
                          for h in range(heads)])
            bad = check(m)
            if bad is not None:
                return [layer, *bad]
    return None


def _later(m):
    idx = np.argwhere(np.triu(m, 1))
    return tuple(int(x) for x in idx[0]) if len(idx) else None


def _asym(m):
    idx = np.argwhere(m & ~np.swapaxes(m, 1, 2))  # i attends j, j does not attend i
    return tuple(int(x) for x in idx[0]) if len(idx) else None


def later_key_witness(p: Pattern) -> dict | None:
    """``{"layer", "head", "i", "j"}`` with j > i allowed, found by evaluation, or None."""
    w = probe(p, _later)
    return dict(zip(("layer", "head", "i", "j"), w)) if w else None


def properties(p: Pattern) -> dict:
    """``{"causal": bool | None, ["causal_witness": {...}], "symmetric": bool | None,
    ["symmetric_witness": {...}], "heads": int, "layers": int, "needs": [str]}`` for a normalised
    pattern; ``heads`` / ``layers`` are the periods of ``heads(...)`` / ``layers(...)``; ``needs``
    lists the run-time inputs it requires (``["documents"]`` for ``document``, SPEC §1.7)."""
    out = {}
    if proves_causal(p):
        out["causal"] = True
    else:
        w = later_key_witness(p)
        out["causal"] = False if w else None
        if w:
            out["causal_witness"] = w
    if proves_symmetric(p):
        out["symmetric"] = True
    else:
        w = probe(p, _asym)
        out["symmetric"] = False if w else None
        if w:
            out["symmetric_witness"] = dict(zip(("layer", "head", "i", "j"), w))
    out["heads"] = p.num_heads
    out["layers"] = p.num_layers
    from ..ir.specialize import uses_documents

    out["needs"] = ["documents"] if uses_documents(p) else []
    return out
