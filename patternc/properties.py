"""Properties of a pattern shown by ``patternc check``: causal, symmetric, heads, layers.

``causal`` / ``symmetric`` are proofs over the IR (sound: ``True`` means it holds for every
length); when no proof is found the pattern is probed with the oracle at a small length, so
``False`` comes with a concrete witness pair, and an unproven-but-unrefuted property is
reported as ``None`` ("unknown").
"""

from __future__ import annotations

import numpy as np

from .elaborate import proves_causal
from .ir import And, Blocks, Diff, Heads, Layers, Not, Or, Pattern, Prim

_SYMMETRIC_PRIMS = {"all", "none", "local", "strided", "dilated", "chunk", "global", "prefix"}


def proves_symmetric(p: Pattern) -> bool:
    if isinstance(p, Prim):
        if p.name == "band":
            return p.arg("left") == p.arg("right")
        return p.name in _SYMMETRIC_PRIMS
    if isinstance(p, (Not,)):
        return proves_symmetric(p.child)
    if isinstance(p, Diff):
        return proves_symmetric(p.left) and proves_symmetric(p.right)
    if isinstance(p, (And, Or, Heads, Layers)):
        return all(proves_symmetric(c) for c in p.items)
    if isinstance(p, Blocks):
        return proves_symmetric(p.child)
    return False


def _probe(p: Pattern, check) -> tuple[bool | None, list | None]:
    from .reference import dense_mask

    n = 64
    heads = p.num_heads
    for layer in range(p.num_layers):
        try:
            m = dense_mask(p, q_len=n, num_heads=heads, layer=layer)
        except Exception:
            return None, None
        bad = check(m)
        if bad is not None:
            h, i, j = bad
            return False, [layer, h, i, j]
    return None, None


def properties(p: Pattern) -> dict:
    out = {}
    if proves_causal(p):
        out["causal"] = True
    else:
        def later(m):
            idx = np.argwhere(np.triu(m, 1))
            return tuple(int(x) for x in idx[0]) if len(idx) else None

        out["causal"], w = _probe(p, later)
        if w:
            out["causal_witness"] = {"layer": w[0], "head": w[1], "i": w[2], "j": w[3]}
    if proves_symmetric(p):
        out["symmetric"] = True
    else:
        def asym(m):
            idx = np.argwhere(m != np.swapaxes(m, 1, 2))
            return tuple(int(x) for x in idx[0]) if len(idx) else None

        out["symmetric"], _ = _probe(p, asym)
    out["heads"] = p.num_heads
    out["layers"] = p.num_layers
    return out
