"""Facts about the IR, proven syntactically (sound: ``True`` means the property holds for
every length, head and layer; ``False`` means "not proven", not "false").

These are the proofs the normaliser (``causal_absorption``), the W002 lint and ``patternc
check`` rely on. They read only the IR, so they live beside it (standard library only).
"""

from __future__ import annotations

from .nodes import And, Blocks, Diff, Heads, Layers, Not, Or, Pattern, PerDocument, Prim, Scored
from .primitives import PRIMITIVES


def proves_causal(p: Pattern) -> bool:
    """Sound syntactic proof that p allows only j <= i (True means proven)."""
    if isinstance(p, Scored):  # score terms do not change the predicate
        return proves_causal(p.pattern)
    if isinstance(p, Prim):
        spec = PRIMITIVES.get(p.name)
        return spec is not None and bool(spec.causal_if(p.argdict))
    if isinstance(p, And):
        return any(proves_causal(c) for c in p.items)
    if isinstance(p, (Or, Heads, Layers)):
        return all(proves_causal(c) for c in p.items)
    if isinstance(p, Diff):
        return proves_causal(p.left)
    if isinstance(p, Blocks):
        return p.b == 1 and proves_causal(p.child)
    if isinstance(p, PerDocument):  # one start subtracted from both: j - s <= i - s iff j <= i
        return proves_causal(p.child)
    return False


def proves_symmetric(p: Pattern) -> bool:
    """Sound syntactic proof that attend(i, j) == attend(j, i) at every length."""
    if isinstance(p, Scored):
        return proves_symmetric(p.pattern)
    if isinstance(p, Prim):
        spec = PRIMITIVES.get(p.name)
        return spec is not None and bool(spec.symmetric_if(p.argdict))
    if isinstance(p, Not):
        return proves_symmetric(p.child)
    if isinstance(p, Diff):
        return proves_symmetric(p.left) and proves_symmetric(p.right)
    if isinstance(p, (And, Or, Heads, Layers)):
        return all(proves_symmetric(c) for c in p.items)
    if isinstance(p, (Blocks, PerDocument)):  # per_document: square, q_len = kv_len = the document's length
        return proves_symmetric(p.child)
    return False
