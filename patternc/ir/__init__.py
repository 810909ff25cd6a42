"""Stage 1 — the pattern IR and its passes (standard library only).

A ``Pattern`` is a frozen tree denoting ``attend(l, h, i, j)`` (SPEC §1). This package holds
the nodes, the primitive registry (``primitives``: parameters, ranges, docs of every
primitive), the canonical printer, the normaliser (an ordered list of named passes), the
syntactic facts the passes and lints rely on (``facts``: causal, symmetric), and
specialisation (``specialize``: select a layer, bind ``q_len``/``kv_len``, split heads), and
the score terms beside the predicate (``terms``: ``softcap``, ``alibi`` and ALiBi's slopes).
Nothing here imports Lark, numpy or torch.
"""

from __future__ import annotations

from .facts import proves_causal, proves_symmetric
from .nodes import (
    ALL,
    CAUSAL,
    NONE,
    And,
    BinOp,
    Blocks,
    Diff,
    Fn,
    Heads,
    IntExpr,
    Layers,
    Lit,
    Not,
    Or,
    Pattern,
    PerDocument,
    Prim,
    Scored,
    Term,
    Var,
    eval_int,
    free_vars,
    score_terms,
    strip_terms,
    with_terms,
)
from .normalize import PASSES, normalize
from .primitives import MAX_INT, PRIMITIVES
from .printer import to_text
from .specialize import (
    bind_lengths,
    head_patterns,
    select_head,
    select_layer,
    specialize,
)
from .terms import SCORE_TERMS, TERM_ORDER, alibi_slopes

__all__ = [
    "ALL", "CAUSAL", "NONE", "And", "BinOp", "Blocks", "Diff", "Fn", "Heads", "IntExpr", "Layers", "Lit", "Not",
    "Or", "Pattern", "PerDocument", "Prim", "Var", "eval_int", "free_vars", "PASSES", "normalize", "MAX_INT", "PRIMITIVES",
    "to_text", "bind_lengths", "head_patterns", "select_head", "select_layer", "specialize",
    "proves_causal", "proves_symmetric", "Scored", "Term", "score_terms", "strip_terms", "with_terms",
    "SCORE_TERMS", "TERM_ORDER", "alibi_slopes",
]
