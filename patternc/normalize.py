"""Stage 3: normalisation as a flat list of named passes, each a (match, rewrite) function
returning ``None`` for "no change" (tinygrad style). ``normalize(p)`` applies them bottom-up
to a fixed point; the result is the canonical IR that ``str()`` prints (SPEC §1.4).

Every pass preserves the predicate ``attend(l, h, i, j)`` for all lengths; the property
tests check this against the oracle on random IR. ``bind_lengths`` substitutes ``q_len`` /
``kv_len`` once the lengths are known and re-checks parameter ranges (P301).
"""

from __future__ import annotations

import functools

from . import ir
from .errors import Diagnostic, PatternError
from .ir import ALL, NONE, And, Blocks, Diff, Heads, IntExpr, Layers, Not, Or, Pattern, Prim
from .primitives import check_values


def _is_const(v) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


# ---- passes ------------------------------------------------------------------------------------------
def diff_to_and_not(p):
    if isinstance(p, Diff):
        return And((p.left, Not(p.right)))


def double_negation(p):
    if isinstance(p, Not) and isinstance(p.child, Not):
        return p.child.child


def negate_constant(p):
    if isinstance(p, Not) and p.child == ALL:
        return NONE
    if isinstance(p, Not) and p.child == NONE:
        return ALL


def flatten(p):
    if isinstance(p, (And, Or)) and any(type(c) is type(p) for c in p.items):
        out = []
        for c in p.items:
            out.extend(c.items if type(c) is type(p) else (c,))
        return type(p)(tuple(out))


def identity_and_annihilator(p):
    if isinstance(p, And):
        if NONE in p.items:
            return NONE
        if ALL in p.items:
            return And(tuple(c for c in p.items if c != ALL))
    if isinstance(p, Or):
        if ALL in p.items:
            return ALL
        if NONE in p.items:
            return Or(tuple(c for c in p.items if c != NONE))


def complement(p):
    if isinstance(p, (And, Or)):
        items = set(p.items)
        if any(isinstance(c, Not) and c.child in items for c in p.items):
            return NONE if isinstance(p, And) else ALL


def absorption(p):
    """a | (a & b) -> a ;  a & (a | b) -> a."""
    if isinstance(p, (And, Or)):
        inner = Or if isinstance(p, And) else And
        items = set(p.items)
        keep = []
        changed = False
        for c in p.items:
            if isinstance(c, inner) and any(x in items for x in c.items):
                changed = True
                continue
            keep.append(c)
        if changed:
            return type(p)(tuple(keep))


def causal_absorption(p):
    """X & causal -> X when X provably allows only j <= i."""
    from .elaborate import proves_causal

    if isinstance(p, And) and ir.CAUSAL in p.items and len(p.items) > 1:
        others = [c for c in p.items if c != ir.CAUSAL]
        if any(proves_causal(c) for c in others):
            return And(tuple(others))


def _sort_key(c: Pattern):
    from .printer import to_text

    rank = 2 if isinstance(c, Not) else (1 if c == ir.CAUSAL else 0)
    return (rank, to_text(c))


def dedupe_and_sort(p):
    if isinstance(p, (And, Or)):
        items = tuple(sorted(set(p.items), key=_sort_key))
        if items != p.items:
            return type(p)(items)


def unwrap_trivial(p):
    if isinstance(p, (And, Or)):
        if not p.items:
            return ALL if isinstance(p, And) else NONE
        if len(p.items) == 1:
            return p.items[0]
    if isinstance(p, (Heads, Layers)):
        n = len(p.items)
        for period in range(1, n):
            if n % period == 0 and p.items == p.items[:period] * (n // period):
                return p.items[0] if period == 1 else type(p)(p.items[:period])
        if n == 1:
            return p.items[0]


def simplify_primitive(p):
    if not isinstance(p, Prim):
        return None
    a = p.argdict
    if not all(_is_const(v) or isinstance(v, tuple) for v in a.values()):
        return None
    if p.name == "dilated":
        if a["d"] == 1:
            return Prim("local", (("w", a["w"]),))
        if a["w"] == 1:
            return Prim("local", (("w", 1),))
    if p.name == "strided" and a["s"] == 1:
        return ALL
    if p.name == "chunk" and a["l"] == 1:
        return Prim("local", (("w", 1),))
    if p.name == "band" and a["left"] == a["right"]:
        return Prim("local", (("w", a["left"] + 1),))
    if p.name == "summary" and a["c"] * (a["g"] + 1) == a["l"] and a["g"] == 0:
        return ALL
    if p.name in ("sink", "prefix") and a["n"] == 0:
        return NONE
    if p.name == "random" and a["r"] == 0:
        return NONE
    if p.name == "global":
        if "n" in a and a["n"] == 0:
            return NONE
        if "at" in a:
            at = tuple(sorted(set(a["at"])))
            if not at:
                return NONE
            if at == tuple(range(len(at))):
                return Prim("global", (("n", len(at)),))
            if at != a["at"]:
                return Prim("global", (("at", at),))


def simplify_blocks(p):
    if isinstance(p, Blocks):
        if p.child in (ALL, NONE):
            return p.child
        if _is_const(p.b) and p.b == 1:
            return p.child
        if isinstance(p.child, Blocks) and _is_const(p.b) and _is_const(p.child.b):
            return Blocks(p.b * p.child.b, p.child.child)


PASSES = [
    ("diff_to_and_not", diff_to_and_not),
    ("double_negation", double_negation),
    ("negate_constant", negate_constant),
    ("flatten", flatten),
    ("identity_and_annihilator", identity_and_annihilator),
    ("complement", complement),
    ("absorption", absorption),
    ("causal_absorption", causal_absorption),
    ("simplify_primitive", simplify_primitive),
    ("simplify_blocks", simplify_blocks),
    ("unwrap_trivial", unwrap_trivial),
    ("dedupe_and_sort", dedupe_and_sort),
]


@functools.lru_cache(maxsize=65536)
def normalize(p: Pattern) -> Pattern:
    """The canonical form of ``p``: passes applied bottom-up until none fires."""
    kids = p.children()
    if kids:
        new = tuple(normalize(c) for c in kids)
        if new != kids or any(a is not b for a, b in zip(new, kids)):
            p = p.with_children(new)
    for _name, rewrite in PASSES:
        r = rewrite(p)
        if r is not None and r != p:
            return normalize(r)
    return p


def run_passes_traced(p: Pattern) -> list[tuple[str, str]]:
    """For debugging and tests: the (pass name, text after) sequence applied at the root."""
    from .printer import to_text

    trace = []
    changed = True
    while changed:
        changed = False
        for name, rewrite in PASSES:
            r = rewrite(p)
            if r is not None and r != p:
                p = r
                trace.append((name, to_text(p)))
                changed = True
                break
    return trace


# ---- binding lengths ---------------------------------------------------------------------------------
def bind_lengths(p: Pattern, q_len: int, kv_len: int) -> Pattern:
    """Substitute ``q_len`` / ``kv_len`` (tokens; block counts inside ``blocks(b, ...)``),
    check the resulting parameter values, and normalise.

    Raises:
        PatternError: P301 when a parameter computed from the lengths is out of range or
            divides by zero.
    """
    if not p.is_symbolic() and not any(isinstance(n, Blocks) and isinstance(n.b, IntExpr) for n in p.walk()):
        return p
    return normalize(_bind(p, {"q_len": q_len, "kv_len": kv_len}))


def _eval(v, env, where):
    try:
        out = ir.eval_int(v, env)
    except ZeroDivisionError:
        raise PatternError(Diagnostic("P301", f"`{where}` divides by zero at q_len={env['q_len']}, kv_len={env['kv_len']}",
                                      None, "guard the divisor, e.g. `max(1, ...)`")) from None
    except ValueError as e:
        raise PatternError(Diagnostic("P301", f"`{where}`: {e} at q_len={env['q_len']}, kv_len={env['kv_len']}",
                                      None, "guard the argument, e.g. `max(0, ...)`")) from None
    return out


def _bind(p: Pattern, env: dict) -> Pattern:
    from .printer import to_text

    if isinstance(p, Prim):
        if not any(isinstance(v, IntExpr) for _, v in p.args):
            return p
        vals = tuple((k, _eval(v, env, to_text(p)) if isinstance(v, IntExpr) else v) for k, v in p.args)
        problems = check_values(p.name, dict(vals))
        if problems:
            _k, msg, help_ = problems[0]
            raise PatternError(Diagnostic("P301", f"{msg} (computed from `{to_text(p)}` at q_len={env['q_len']}, "
                                          f"kv_len={env['kv_len']})", p.span, help_))
        return Prim(p.name, vals, span=p.span)
    if isinstance(p, Blocks):
        b = _eval(p.b, env, to_text(p)) if isinstance(p.b, IntExpr) else p.b
        if b < 1:
            raise PatternError(Diagnostic("P301", f"`blocks` size computed as {b} at q_len={env['q_len']}, kv_len={env['kv_len']}; it must be >= 1",
                                          p.span, "guard it, e.g. `max(1, ...)`"))
        inner = {"q_len": -(-env["q_len"] // b), "kv_len": -(-env["kv_len"] // b)}
        return Blocks(b, _bind(p.child, inner), span=p.span)
    kids = p.children()
    if not kids:
        return p
    return p.with_children(tuple(_bind(c, env) for c in kids))
