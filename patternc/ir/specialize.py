"""Specialisation: one step from a whole pattern to what one compile needs.

A pattern may mention ``q_len``/``kv_len`` (SPEC §1.3) and hold ``layers(…)`` / ``heads(…)``
choices. ``specialize`` selects the layer, binds the lengths (checking every computed
parameter, P301) and normalises; ``head_patterns`` then splits the per-head choice. Everything
downstream (lowering, ``mask_mod``, analysis) starts from these.
"""

from __future__ import annotations

from ..errors import Diagnostic, PatternError
from . import nodes as ir
from .nodes import Blocks, Heads, IntExpr, Layers, Pattern, PerDocument, Prim, Scored
from .normalize import normalize
from .primitives import MAX_INT, check_values
from .printer import to_text


def cdiv(a, b):
    """``ceil(a / b)`` for non-negative ints or integer arrays: the number of ``b``-token blocks
    that cover ``a`` tokens (the lengths inside ``blocks(b, ...)``, ``num_q_blocks``, ...).

    Example:
        >>> cdiv(97, 16), cdiv(96, 16)
        (7, 6)
    """
    return -(-a // b)


def select_layer(p: Pattern, layer: int) -> Pattern:
    """Replace every ``layers(p0, …)`` by its entry ``layer mod m`` (SPEC §1.1).

    The result is the layer's *predicate*: score terms (``Scored``, SPEC §1.8) are dropped,
    so everything specialised from here on (layouts, ``mask_mod``, the oracle, analysis)
    never sees them; ``compile`` keeps them beside the layout (``cp.score_terms``)."""
    if isinstance(p, Scored):
        return select_layer(p.pattern, layer)
    if isinstance(p, Layers):
        return select_layer(p.items[layer % len(p.items)], layer)
    kids = p.children()
    if not kids:
        return p
    return p.with_children(tuple(select_layer(c, layer) for c in kids))


def select_head(p: Pattern, head: int) -> Pattern:
    """Replace every ``heads(p0, …)`` by its entry ``head mod m`` (score terms dropped)."""
    if isinstance(p, Scored):
        return select_head(p.pattern, head)
    if isinstance(p, Heads):
        return select_head(p.items[head % len(p.items)], head)
    kids = p.children()
    if not kids:
        return p
    return p.with_children(tuple(select_head(c, head) for c in kids))


def shift_heads(p: Pattern, head_offset: int) -> Pattern:
    """Head ``h`` of the result is head ``head_offset + h`` of ``p`` (SPEC §1.6): every
    ``heads(p0, …, pm-1)`` is rotated to ``heads(p_o, p_(o+1), …)`` with ``o = head_offset mod m``.
    A tensor-parallel rank holding heads ``o … o + H - 1`` compiles ``shift_heads(p, o)``.

    Example:
        >>> from patternc.source.frontdoor import parse
        >>> str(shift_heads(parse("heads(causal, all, none)"), 4))
        'heads(all, none, causal)'
    """
    if head_offset == 0:
        return p
    if isinstance(p, Heads):
        m = len(p.items)
        o = head_offset % m
        items = tuple(shift_heads(c, head_offset) for c in p.items[o:] + p.items[:o])
        return Heads(items, span=p.span)
    kids = p.children()
    if not kids:
        return p
    return p.with_children(tuple(shift_heads(c, head_offset) for c in kids))


def uses_documents(p: Pattern) -> bool:
    """Whether ``p`` reads run-time ``documents`` (``document`` or ``per_document``, SPEC §1.7)."""
    return any(isinstance(n, PerDocument) or (isinstance(n, Prim) and n.name == "document") for n in p.walk())


def uses_per_document(p: Pattern) -> bool:
    """Whether ``p`` holds a ``per_document(…)`` (SPEC §1.1)."""
    return any(isinstance(n, PerDocument) for n in p.walk())


def substitute_per_document(p: Pattern, mode: str, length: int | None = None) -> Pattern:
    """``p`` with every ``per_document(x)`` replaced, normalised: ``mode="none"`` by ``none``
    (a pair in two documents), ``mode="whole"`` by ``x`` bound at ``q_len = kv_len = length``
    (every pair in one document that starts at position 0 and is ``length`` tokens long).

    Raises:
        PatternError: P301 when ``x`` computes a parameter out of range at that length."""

    def sub(n: Pattern) -> Pattern:
        if isinstance(n, PerDocument):
            return ir.NONE if mode == "none" else bind_per_document(n.child, length)
        kids = n.children()
        return n.with_children(tuple(sub(c) for c in kids)) if kids else n

    return normalize(sub(p))


def runtime_bound(p: Pattern) -> Pattern:
    """A document-free pattern that allows every pair ``p`` allows under *some* split into
    documents (SPEC §1.7): the union of ``p`` with each ``document`` / ``per_document(…)``
    replaced by ``all`` or ``none`` (every assignment of them, so negations stay sound),
    normalised. ``p`` itself when it reads no documents; ``all`` when it holds more than five
    distinct ``per_document`` nodes (still a bound). This is what ``cp.layout`` and the
    densities of a compile without documents describe."""
    if not uses_documents(p):
        return p
    nodes = []
    for n in p.walk():
        if isinstance(n, PerDocument) and n not in nodes:
            nodes.append(n)
    if len(nodes) > 5:
        return ir.ALL
    variants = []
    for mask in range(1 << (len(nodes) + 1)):
        table = {n: (ir.ALL if (mask >> k) & 1 else ir.NONE) for k, n in enumerate(nodes)}
        doc = ir.ALL if (mask >> len(nodes)) & 1 else ir.NONE

        def sub(n: Pattern) -> Pattern:
            if isinstance(n, PerDocument):
                return table[n]
            if isinstance(n, Prim) and n.name == "document":
                return doc
            kids = n.children()
            return n.with_children(tuple(sub(c) for c in kids)) if kids else n

        variants.append(sub(p))
    return normalize(ir.Or(tuple(variants)))


def bind_per_document(child: Pattern, length: int, *, normalized: bool = True) -> Pattern:
    """The inner pattern of ``per_document(child)`` for one document of ``length`` tokens:
    ``q_len`` and ``kv_len`` bound to ``length`` (SPEC §1.1), ``document`` inside it ``all``.

    Raises:
        PatternError: P301 naming the document length when a computed parameter is out of range.
    """
    from .normalize import _one_document

    try:
        return bind_lengths(_one_document(child), length, length, normalized=normalized)
    except PatternError as e:
        import dataclasses

        d = e.diagnostic
        raise PatternError(dataclasses.replace(
            d, message=f"{d.message}, inside `per_document(…)` for a document of {length} tokens")) from None


def substitute_document(p: Pattern, value: Pattern) -> Pattern:
    """``p`` with every ``document`` replaced by ``value`` (``ALL`` or ``NONE``), normalised.

    Shannon expansion: for every pair, ``p = document ? p[document := all] : p[document := none]``,
    so layouts and dense masks with documents are built from these two document-free patterns
    and the document relation alone (``patternc.lower.documents``)."""

    def sub(n: Pattern) -> Pattern:
        if isinstance(n, Prim) and n.name == "document":
            return value
        if isinstance(n, PerDocument):  # inside it `document` is `all` (the one document it sees)
            return n
        kids = n.children()
        return n.with_children(tuple(sub(c) for c in kids)) if kids else n

    return normalize(sub(p))


def bind_lengths(p: Pattern, q_len: int, kv_len: int, *, normalized: bool = True) -> Pattern:
    """Substitute ``q_len`` / ``kv_len`` (tokens; block counts inside ``blocks(b, ...)``),
    check the resulting parameter values, and normalise (unless ``normalized=False``: the
    oracle evaluates the bound pattern as it is).

    Raises:
        PatternError: P301 when a parameter computed from the lengths is out of range or
            divides by zero.
    """
    if not p.is_symbolic() and not any(isinstance(n, Blocks) and isinstance(n.b, IntExpr) for n in p.walk()):
        return p
    bound = _bind(p, {"q_len": q_len, "kv_len": kv_len})
    return normalize(bound) if normalized else bound


def _eval(v, env, where, span=None):
    at = f"at q_len={env['q_len']}, kv_len={env['kv_len']}"
    try:
        out = ir.eval_int(v, env)
    except ZeroDivisionError:
        raise PatternError(Diagnostic("P301", f"`{where}` divides by zero {at}",
                                      span, "guard the divisor, e.g. `max(1, ...)`")) from None
    except ValueError as e:
        raise PatternError(Diagnostic("P301", f"`{where}`: {e} {at}",
                                      span, "guard the argument, e.g. `max(0, ...)`")) from None
    if abs(out) > MAX_INT:
        raise PatternError(Diagnostic("P301", f"`{where}` computes {out} {at}, too large for a length or parameter "
                                      "(the limit is 2^31 - 1)", span, "bound it, e.g. `min(q_len, ...)`"))
    return out


def _bind(p: Pattern, env: dict) -> Pattern:
    if isinstance(p, Prim):
        if not any(isinstance(v, IntExpr) for _, v in p.args):
            return p
        vals = tuple((k, _eval(v, env, to_text(p), p.span) if isinstance(v, IntExpr) else v) for k, v in p.args)
        problems = check_values(p.name, dict(vals))
        if problems:
            _k, msg, help_ = problems[0]
            raise PatternError(Diagnostic("P301", f"{msg} (computed from `{to_text(p)}` at q_len={env['q_len']}, "
                                          f"kv_len={env['kv_len']})", p.span, help_))
        return Prim(p.name, vals, span=p.span)
    if isinstance(p, Blocks):
        b = _eval(p.b, env, to_text(p), p.span) if isinstance(p.b, IntExpr) else p.b
        if b < 1:
            raise PatternError(Diagnostic("P301", f"`blocks` size computed as {b} at q_len={env['q_len']}, kv_len={env['kv_len']}; it must be >= 1",
                                          p.span, "guard it, e.g. `max(1, ...)`"))
        inner = {"q_len": cdiv(env["q_len"], b), "kv_len": cdiv(env["kv_len"], b)}
        return Blocks(b, _bind(p.child, inner), span=p.span)
    if isinstance(p, PerDocument):  # its q_len / kv_len are each document's length: bound per document
        return p
    kids = p.children()
    if not kids:
        return p
    return p.with_children(tuple(_bind(c, env) for c in kids))


def specialize(p: Pattern, *, q_len: int, kv_len: int, layer: int = 0) -> Pattern:
    """The canonical pattern of one layer with ``q_len``/``kv_len`` bound (tokens).

    Raises:
        PatternError: P301 when a parameter computed from the lengths is out of range.
    """
    return bind_lengths(normalize(select_layer(p, layer)), q_len, kv_len)


def head_patterns(p: Pattern, num_heads: int) -> list[Pattern]:
    """The head-free pattern of each head ``h < min(num_heads, period)`` (normalised)."""
    period = p.num_heads
    return [normalize(select_head(p, h)) for h in range(min(num_heads, period))]


def head_cycle_warning(period: int, num_heads: int, *, filename: str = "<pattern>") -> Diagnostic | None:
    """W004: ``num_heads`` above the pattern's head period ``period`` (the lcm of its
    ``heads(…)`` arities) but not a multiple of it. Head h uses entry h mod period, so the
    last cycle stops part-way and the entries are not used equally often, which is rarely
    meant. None when ``num_heads`` is a multiple of ``period`` (or at most ``period``: W003
    covers fewer heads)."""
    if num_heads <= period or num_heads % period == 0:
        return None
    r = num_heads % period
    lo, hi = (num_heads // period) * period, num_heads - 1
    return Diagnostic(
        "W004", f"num_heads={num_heads} is not a multiple of the pattern's {period} different heads: head h "
        f"uses entry h mod {period}, so heads {lo}..{hi} repeat only entries 0..{r - 1}",
        None, f"use num_heads={lo} or {lo + period} (--heads), or give `heads(...)` {num_heads} entries",
        severity="warning", filename=filename)
