"""The pattern IR: immutable nodes, children in tuples, source spans excluded from equality.

A ``Pattern`` denotes the predicate ``attend(l, h, i, j)`` of SPEC §1. Nodes:

* ``Prim(name, args)``: a primitive of §1.1 (``args``: ``(param, value)`` pairs in the
  registry's order, defaults filled in, so equal predicates from different spellings are
  equal nodes). A value is an ``int``, a tuple of ints (``global(at=[...])``) or an
  ``IntExpr`` that still depends on ``q_len`` / ``kv_len``.
* ``Not(child)``, ``Diff(left, right)``, ``And(children)``, ``Or(children)``: §1.2.
* ``Heads(children)``, ``Layers(children)``: per-head / per-layer choice (``p_(h mod m)``).
* ``Blocks(b, child)``: ``child`` evaluated on block coordinates (b tokens per block).
* ``PerDocument(child)``: ``child`` evaluated inside each packed document, in the document's
  own coordinates and length (SPEC §1.1 ``per_document``; the documents arrive at run time).

``str(p)`` is the canonical text (``patternc.printer``); ``parse(str(p)) == p``.
Integer expressions (``IntExpr``) are the symbolic part of arguments: ``Var('q_len')``,
``Lit``, ``BinOp`` and ``Fn`` (min, max, isqrt).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Iterator, Union

from ..errors import Span

# ---------------------------------------------------------------------------------------------
# integer expressions (only what survives constant folding: anything mentioning q_len / kv_len)


#: the canonical printers, ``{"pattern": to_text, "term": term_text}``: ``patternc.ir.printer``
#: installs them when imported (``patternc.ir`` imports it, so any use of these nodes has them);
#: the nodes never import the printer, which imports them (no import cycle)
_TEXT: dict = {}


class IntExpr:
    """Base of symbolic integer expressions."""

    def free_vars(self) -> set[str]:
        raise NotImplementedError

    def evaluate(self, env: dict) -> int:
        raise NotImplementedError


@dataclass(frozen=True)
class Lit(IntExpr):
    value: int

    def free_vars(self):
        return set()

    def evaluate(self, env):
        return self.value


@dataclass(frozen=True)
class Var(IntExpr):
    name: str  # 'q_len' or 'kv_len'

    def free_vars(self):
        return {self.name}

    def evaluate(self, env):
        return env[self.name]


INT_BINOPS = {
    "+": lambda a, b: a + b,
    "-": lambda a, b: a - b,
    "*": lambda a, b: a * b,
    "//": lambda a, b: a // b,
    "%": lambda a, b: a % b,
}
INT_FUNCS = {
    "min": (2, None, lambda *a: min(a)),
    "max": (2, None, lambda *a: max(a)),
    "isqrt": (1, 1, lambda a: math.isqrt(a)),
}


@dataclass(frozen=True)
class BinOp(IntExpr):
    op: str
    left: "IntValue"
    right: "IntValue"

    def free_vars(self):
        return free_vars(self.left) | free_vars(self.right)

    def evaluate(self, env):
        a, b = eval_int(self.left, env), eval_int(self.right, env)
        if self.op in ("//", "%") and b == 0:
            raise ZeroDivisionError(self.op)
        return INT_BINOPS[self.op](a, b)


@dataclass(frozen=True)
class Fn(IntExpr):
    name: str
    args: tuple

    def free_vars(self):
        out = set()
        for a in self.args:
            out |= free_vars(a)
        return out

    def evaluate(self, env):
        vals = [eval_int(a, env) for a in self.args]
        if self.name == "isqrt" and vals[0] < 0:
            raise ValueError("isqrt of a negative number")
        return INT_FUNCS[self.name][2](*vals)


IntValue = Union[int, IntExpr]


def free_vars(v) -> set[str]:
    if isinstance(v, IntExpr):
        return v.free_vars()
    return set()


def eval_int(v, env: dict) -> int:
    if isinstance(v, IntExpr):
        return v.evaluate(env)
    return v


# ---------------------------------------------------------------------------------------------
# patterns


@dataclass(frozen=True)
class Pattern:
    """Base class of pattern nodes. ``span`` is kept for diagnostics, ignored by ==/hash."""

    def children(self) -> tuple["Pattern", ...]:
        return ()

    def with_children(self, children: tuple["Pattern", ...]) -> "Pattern":
        return self

    def walk(self) -> Iterator["Pattern"]:
        """Pre-order traversal (iterative)."""
        stack = [self]
        while stack:
            n = stack.pop()
            yield n
            stack.extend(reversed(n.children()))

    def __str__(self) -> str:  # canonical text
        return _TEXT["pattern"](self)

    # properties of the whole pattern --------------------------------------------------------------
    @property
    def num_heads(self) -> int:
        """Head period: the pattern repeats every ``num_heads`` heads (lcm of heads(...) arities)."""
        return _period(self, Heads)

    @property
    def num_layers(self) -> int:
        """Layer period: lcm of the arities of layers(...) nodes."""
        return _period(self, Layers)

    def is_symbolic(self) -> bool:
        """True when some argument still depends on q_len / kv_len."""
        for n in self.walk():
            if isinstance(n, Prim) and any(isinstance(v, IntExpr) for _, v in n.args):
                return True
        return False


def _period(p: Pattern, cls) -> int:
    out = 1
    for n in p.walk():
        if isinstance(n, cls):
            out = math.lcm(out, len(n.items))
    return out


@dataclass(frozen=True)
class Prim(Pattern):
    name: str
    args: tuple = ()  # ((param_name, value), ...)
    span: Span | None = field(default=None, compare=False, repr=False)

    def arg(self, name, default=None):
        for k, v in self.args:
            if k == name:
                return v
        return default

    @property
    def argdict(self) -> dict:
        return dict(self.args)


@dataclass(frozen=True)
class Not(Pattern):
    child: Pattern
    span: Span | None = field(default=None, compare=False, repr=False)

    def children(self):
        return (self.child,)

    def with_children(self, children):
        return Not(children[0], span=self.span)


@dataclass(frozen=True)
class Diff(Pattern):
    left: Pattern
    right: Pattern
    span: Span | None = field(default=None, compare=False, repr=False)

    def children(self):
        return (self.left, self.right)

    def with_children(self, children):
        return Diff(children[0], children[1], span=self.span)


@dataclass(frozen=True)
class And(Pattern):
    items: tuple
    span: Span | None = field(default=None, compare=False, repr=False)

    def children(self):
        return self.items

    def with_children(self, children):
        return And(tuple(children), span=self.span)


@dataclass(frozen=True)
class Or(Pattern):
    items: tuple
    span: Span | None = field(default=None, compare=False, repr=False)

    def children(self):
        return self.items

    def with_children(self, children):
        return Or(tuple(children), span=self.span)


@dataclass(frozen=True)
class Heads(Pattern):
    items: tuple
    span: Span | None = field(default=None, compare=False, repr=False)

    def children(self):
        return self.items

    def with_children(self, children):
        return Heads(tuple(children), span=self.span)


@dataclass(frozen=True)
class Layers(Pattern):
    items: tuple
    span: Span | None = field(default=None, compare=False, repr=False)

    def children(self):
        return self.items

    def with_children(self, children):
        return Layers(tuple(children), span=self.span)


@dataclass(frozen=True)
class Blocks(Pattern):
    b: object  # IntValue, tokens per block
    child: Pattern
    span: Span | None = field(default=None, compare=False, repr=False)

    def children(self):
        return (self.child,)

    def with_children(self, children):
        return Blocks(self.b, children[0], span=self.span)


@dataclass(frozen=True)
class PerDocument(Pattern):
    """``per_document(child)`` (SPEC §1.1): ``doc(i) = doc(j)`` and ``child`` holds at
    ``(i - start(i), j - start(j))``, evaluated with ``q_len = kv_len =`` the length of that
    document. A document here is a maximal run of equal consecutive ids of the run-time
    ``documents`` (§1.7): two runs with one id are two documents. ``child`` keeps any
    ``q_len`` / ``kv_len`` symbolic: they are bound per document (``ir.specialize``).
    Inside ``child`` the only document is the one it is evaluated in: ``document`` there is
    ``all`` and a nested ``per_document(x)`` is ``x``."""

    child: Pattern
    span: Span | None = field(default=None, compare=False, repr=False)

    def children(self):
        return (self.child,)

    def with_children(self, children):
        return PerDocument(children[0], span=self.span)


ALL = Prim("all")
NONE = Prim("none")
CAUSAL = Prim("causal")


# ---------------------------------------------------------------------------------------------
# score terms (SPEC §1.8): how a kept pair's score changes before the softmax


@dataclass(frozen=True)
class Term:
    """One score term, ``softcap(c)`` or ``alibi(max_bias)`` (registry: ``ir.terms``).

    Not a ``Pattern``: a term never says which pairs attend. ``args`` are ``(param, value)``
    pairs in the registry's order with defaults filled in (integers; constants only).
    """

    name: str
    args: tuple = ()
    span: Span | None = field(default=None, compare=False, repr=False)

    def arg(self, name, default=None):
        for k, v in self.args:
            if k == name:
                return v
        return default

    @property
    def argdict(self) -> dict:
        return dict(self.args)

    def __str__(self) -> str:
        return _TEXT["term"](self)


@dataclass(frozen=True)
class Scored(Pattern):
    """``pattern with t1, t2``: the root of a pattern that carries score terms (SPEC §1.8).

    Shape decision (docs/language.md, "Score terms"): the terms sit in one node at the root,
    beside the predicate, never inside it. ``Scored`` only ever appears at the root (the
    grammar puts ``with`` after the final expression), ``terms`` is non-empty, in the
    canonical order of ``ir.terms.TERM_ORDER`` with each name at most once. Everything that
    reads the predicate (``select_layer`` / ``select_head``, hence specialisation, the
    lowering, ``mask_mod``, layouts, the oracle and reachability) sees ``pattern`` alone:
    ``select_layer`` drops the node, and ``strip_terms`` / ``score_terms`` split it.
    Normalisation rewrites ``pattern`` and keeps ``terms``.
    """

    pattern: Pattern
    terms: tuple = ()
    span: Span | None = field(default=None, compare=False, repr=False)

    def children(self):
        return (self.pattern,)

    def with_children(self, children):
        return Scored(children[0], self.terms, span=self.span)


def strip_terms(p: Pattern) -> Pattern:
    """The predicate of ``p`` without its score terms (``p`` itself when it has none)."""
    return p.pattern if isinstance(p, Scored) else p


def score_terms(p: Pattern) -> tuple:
    """The score terms of ``p`` (``Term`` tuple in canonical order; ``()`` when none)."""
    return p.terms if isinstance(p, Scored) else ()


def with_terms(p: Pattern, terms) -> Pattern:
    """``p`` (its own terms replaced) carrying ``terms``; ``terms`` empty: the bare predicate."""
    p = strip_terms(p)
    return Scored(p, tuple(terms)) if terms else p
