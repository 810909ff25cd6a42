"""Stage 3: normalisation as a flat list of named passes, each a (match, rewrite) function
returning ``None`` for "no change" (tinygrad style). ``normalize(p)`` applies them bottom-up
to a fixed point; the result is the canonical IR that ``str()`` prints (SPEC §1.4).

Every pass preserves the predicate ``attend(l, h, i, j)`` for all lengths; the property
tests check this against the oracle on random IR. No rewrite drops a parameter that depends
on ``q_len`` / ``kv_len`` (``keeps_length_checks``): its range is checked when the lengths are
bound, on every branch, as a literal's is at parse time. ``bind_lengths`` substitutes ``q_len`` /
``kv_len`` once the lengths are known and re-checks parameter ranges (P301).
"""

from __future__ import annotations

import functools
import math

from . import nodes as ir
from .nodes import (
    ALL,
    NONE,
    And,
    Blocks,
    Diff,
    Heads,
    IntExpr,
    Layers,
    Not,
    Or,
    Pattern,
    PerDocument,
    Prim,
)
from .primitives import MAX_INT, PRIMITIVES, check_values


def _is_const(v) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


def _fits(*values: int) -> bool:
    """A rewrite may only write integers the parser accepts (``<= MAX_INT``, SPEC §1.4:
    the canonical text re-parses); one that would need a larger one is not made."""
    return all(abs(v) <= MAX_INT for v in values)


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


def _collapse(p, const):
    """``p`` (an ``And``/``Or``) is the constant ``const``: return it, except that operands holding
    a length-dependent parameter stay beside it (``const & a`` / ``const | a``) until the lengths
    are bound, so that parameter is still range-checked (``keeps_length_checks``). Keeping them
    here, rather than refusing the rewrite, makes the result independent of how the operands
    were grouped. None when nothing changes."""
    keep = tuple(c for c in p.items if c != const and _length_checks(c))
    if not keep:
        return const
    if set(p.items) == {const, *keep}:
        return None
    return type(p)((const, *keep))


# ``all`` / ``none`` beside length-dependent operands (``_collapse``) are never moved by
# ``context_simplify``, ``factor_common`` or ``factor_choice``: ``_collapse`` puts the constant back
# where it was taken from when that operand is normalised again (``none & ((a & ~a) | b)``,
# ``(a - a) | (b - b)``, ``heads(a - a, b - b)`` with ``a``, ``b`` reading ``q_len``), and the
# rewrite then fires again forever (a loop at the node, or unbounded recursion below it). The
# cost: such kept constants are not factored, so equivalent patterns built from them can keep
# different normal forms (``(none & local(w=q_len)) | (none & local(w=kv_len))`` is no longer
# ``(local(w=kv_len) | local(w=q_len)) & none``); the predicate is always kept.
_CONSTANTS = frozenset((ALL, NONE))


def identity_and_annihilator(p):
    """a & all -> a, a | none -> a; a & none -> none, a | all -> all (see ``_collapse``)."""
    if isinstance(p, And):
        if NONE in p.items:
            return _collapse(p, NONE)
        if ALL in p.items:
            return And(tuple(c for c in p.items if c != ALL))
    if isinstance(p, Or):
        if ALL in p.items:
            return _collapse(p, ALL)
        if NONE in p.items:
            return Or(tuple(c for c in p.items if c != NONE))


def complement(p):
    """a & ~a -> none, a | ~a -> all (see ``_collapse``)."""
    if isinstance(p, (And, Or)):
        items = set(p.items)
        if any(isinstance(c, Not) and c.child in items for c in p.items):
            return _collapse(p, NONE if isinstance(p, And) else ALL)


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


def causal_band(p):
    """band(left=l, right=r) & causal -> band(left=l, right=0) & causal (j <= i already bounds
    the right side), which ``simplify_primitive`` then writes as ``local(w=l+1) & causal``."""
    if isinstance(p, And) and ir.CAUSAL in p.items:
        items = tuple(Prim("band", (("left", c.arg("left")), ("right", 0)))
                      if isinstance(c, Prim) and c.name == "band" and _is_const(c.arg("right")) and c.arg("right") > 0
                      else c for c in p.items)
        if items != p.items:
            return And(items)


def causal_absorption(p):
    """X & causal -> X when X provably allows only j <= i."""
    from .facts import proves_causal

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
    spec = PRIMITIVES.get(p.name)
    const = spec.constant(a) if spec is not None else None
    if const is not None and p.name not in ("all", "none"):  # the registry's fact: all / none here
        return ALL if const else NONE
    if p.name == "dilated":
        if a["d"] == 1:
            return Prim("local", (("w", a["w"]),))
        if a["w"] == 1:
            return Prim("local", (("w", 1),))
    if p.name == "band" and a["right"] == 0 and a["left"] > 0 and _fits(a["left"] + 1):
        # i - l <= j <= i  is  |i - j| < l + 1 and j <= i: one canonical text for the causal window
        return And((Prim("local", (("w", a["left"] + 1),)), ir.CAUSAL))
    if p.name == "chunk" and a["l"] == 1:
        return Prim("local", (("w", 1),))
    if p.name == "band" and a["left"] == a["right"] and _fits(a["left"] + 1):
        return Prim("local", (("w", a["left"] + 1),))
    if p.name == "global":
        if "at" in a:
            at = tuple(sorted(set(a["at"])))
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
        if isinstance(p.child, Blocks) and _is_const(p.b) and _is_const(p.child.b) and _fits(p.b * p.child.b):
            return Blocks(p.b * p.child.b, p.child.child)


def context_simplify(p):
    """Operands of ``&`` hold inside it, operands of ``|`` fail inside it:
    ``(X | (Y & c)) & c -> (X | Y) & c`` and ``c | (X & (Y | c)) -> c | (X & Y)``
    (``all`` / ``none`` are not context: see ``_CONSTANTS``)."""
    if isinstance(p, (And, Or)):
        mid = Or if isinstance(p, And) else And
        inner = And if isinstance(p, And) else Or
        neutral = ALL if inner is And else NONE
        ctx = set(p.items) - _CONSTANTS
        changed = False
        out = []
        for c in p.items:
            if isinstance(c, mid) and any(isinstance(d, inner) and any(x in ctx for x in d.items) for d in c.items):
                kids = []
                for d in c.items:
                    if isinstance(d, inner) and any(x in ctx for x in d.items):
                        rest = tuple(x for x in d.items if x not in ctx)
                        d = inner(rest) if rest else neutral
                    kids.append(d)
                c = mid(tuple(kids))
                changed = True
            out.append(c)
        if changed:
            return type(p)(tuple(out))


def factor_common(p):
    """``(a & c) | (b & c) -> (a | b) & c`` and ``(a | c) & (b | c) -> (a & b) | c``.

    Shared operands are taken most-shared first (ties in canonical order); each operand of
    ``p`` joins at most one group per rewrite, so a wide ``|`` is factored in one step."""
    if not isinstance(p, (And, Or)):
        return None
    inner = Or if isinstance(p, And) else And
    groups = [k for k, c in enumerate(p.items) if isinstance(c, inner)]
    if len(groups) < 2:
        return None
    holders: dict = {}
    for k in groups:
        for x in set(p.items[k].items) - _CONSTANTS:
            holders.setdefault(x, []).append(k)
    shared = [x for x, ks in holders.items() if len(ks) >= 2]
    if not shared:
        return None
    shared.sort(key=lambda y: (-len(holders[y]), _sort_key(y)))
    taken: set = set()
    factored = []
    for x in shared:
        ks = [k for k in holders[x] if k not in taken]
        if len(ks) < 2:
            continue
        taken.update(ks)
        rests = tuple(inner(tuple(y for y in p.items[k].items if y != x)) for k in ks)
        factored.append(inner((type(p)(rests), x)))
    others = tuple(c for k, c in enumerate(p.items) if k not in taken)
    out = others + tuple(factored)
    return type(p)(out) if len(out) > 1 else out[0]


def factor_choice(p):
    """An operand common to every entry of ``heads(...)`` / ``layers(...)`` moves out:
    ``heads(a & c, b & c) -> heads(a, b) & c`` (and the same with ``|``)."""
    if isinstance(p, (Heads, Layers)) and len(p.items) >= 2:
        for op, neutral in ((And, ALL), (Or, NONE)):
            sets = [set(c.items) if isinstance(c, op) else {c} for c in p.items]
            common = set.intersection(*sets) - _CONSTANTS
            if common and any(isinstance(c, op) for c in p.items):
                kids = []
                for c in p.items:
                    rest = tuple(y for y in (c.items if isinstance(c, op) else (c,)) if y not in common)
                    kids.append(op(rest) if len(rest) > 1 else (rest[0] if rest else neutral))
                return op(tuple(sorted(common, key=_sort_key)) + (type(p)(tuple(kids)),))


def merge_choices(p):
    """``heads(a, b) & heads(c, d) -> heads(a & c, b & d)`` for entries of equal count (also
    ``|`` and ``layers``); ``blocks(b, x) & blocks(b, y) -> blocks(b, x & y)`` and
    ``per_document(x) & per_document(y) -> per_document(x & y)`` (also ``|``: both hold only on
    pairs of one document, where each evaluates its operand at the same coordinates and length).
    Every group is merged in one rewrite."""
    if not isinstance(p, (And, Or)):
        return None
    op = type(p)
    groups: dict = {}
    for c in p.items:
        if isinstance(c, (Heads, Layers)):
            groups.setdefault((type(c), len(c.items)), []).append(c)
        elif isinstance(c, Blocks):
            groups.setdefault((Blocks, c.b), []).append(c)
        elif isinstance(c, PerDocument):
            groups.setdefault((PerDocument, None), []).append(c)
    if not any(len(g) >= 2 for g in groups.values()):
        return None
    out = []
    done = set()
    for c in p.items:
        key = ((type(c), len(c.items)) if isinstance(c, (Heads, Layers)) else
               (Blocks, c.b) if isinstance(c, Blocks) else (PerDocument, None) if isinstance(c, PerDocument) else None)
        group = groups.get(key) if key is not None else None
        if not group or len(group) < 2:
            out.append(c)
        elif key not in done:
            done.add(key)
            if key[0] is Blocks:
                out.append(Blocks(key[1], op(tuple(g.child for g in group))))
            elif key[0] is PerDocument:
                out.append(PerDocument(op(tuple(g.child for g in group))))
            else:
                out.append(key[0](tuple(op(tuple(g.items[k] for g in group)) for k in range(key[1]))))
    return op(tuple(out)) if len(out) > 1 else out[0]


def nested_choice(p):
    """``heads(heads(a, b), c, d, e) -> heads(a, c, d, e)``: an inner ``heads`` whose count
    divides the outer one always picks the same entry (also ``layers``)."""
    if isinstance(p, (Heads, Layers)):
        m = len(p.items)
        kids = list(p.items)
        changed = False
        for k, c in enumerate(kids):
            if type(c) is type(p) and m % len(c.items) == 0:
                kids[k] = c.items[k % len(c.items)]
                changed = True
        if changed:
            return type(p)(tuple(kids))


def _const_args(p: Prim) -> bool:
    return not any(isinstance(v, IntExpr) for _k, v in p.args)


MERGE_TRIES = 4  # chunk / strided candidates tried per primitive (they merge only when sizes divide)


def _merge_two(op, a: Prim, b: Prim):
    """One primitive equal to ``a op b`` (op: And / Or) for two constant primitives of the
    same kind, or None."""
    if a.name != b.name or not (_const_args(a) and _const_args(b)):
        return None
    x, y = dict(a.args), dict(b.args)
    pick = min if op is And else max
    n = a.name
    if n == "local":  # nested windows around the diagonal
        return Prim(n, (("w", pick(x["w"], y["w"])),))
    if n == "band":  # both intervals contain j = i, so their union is an interval too
        return Prim(n, (("left", pick(x["left"], y["left"])), ("right", pick(x["right"], y["right"]))))
    if n in ("sink", "prefix"):
        return Prim(n, (("n", pick(x["n"], y["n"])),))
    if n == "global":
        if "n" in x and "n" in y:  # (i<a or j<a) and (i<b or j<b) == i<min or j<min
            return Prim(n, (("n", pick(x["n"], y["n"])),))
        if op is Or:  # union of the global positions (global(n=k) is positions 0 .. k-1)
            px = set(x["at"]) if "at" in x else (set(range(x["n"])) if x["n"] <= 1024 else None)
            py = set(y["at"]) if "at" in y else (set(range(y["n"])) if y["n"] <= 1024 else None)
            if px is not None and py is not None:
                return Prim(n, (("at", tuple(sorted(px | py))),))
        return None
    if n == "strided":  # i-j divisible by both <=> by their lcm; s1 | s2 means strided(s2) <= strided(s1)
        s1, s2 = x["s"], y["s"]
        if op is And:
            lcm = math.lcm(s1, s2)
            return Prim(n, (("s", lcm),)) if _fits(lcm) else None
        if s2 % s1 == 0 or s1 % s2 == 0:
            return Prim(n, (("s", math.gcd(s1, s2)),))
        return None
    if n == "chunk":  # l1 | l2: every chunk of l1 lies inside one chunk of l2
        l1, l2 = x["l"], y["l"]
        if l2 % l1 == 0 or l1 % l2 == 0:
            return Prim(n, (("l", min(l1, l2) if op is And else max(l1, l2)),))
    return None


_ALWAYS_MERGE = {"local", "band", "sink", "prefix"}  # any two constant ones merge


def merge_primitives(p):
    """Constant primitives of one kind under ``&`` / ``|`` become one:
    ``local(w=3) & local(w=5) -> local(w=3)``, ``strided(s=2) & strided(s=3) -> strided(s=6)``,
    ``global(at=[0]) | global(at=[5]) -> global(at=[0, 5])``, ``chunk(4) | chunk(8) -> chunk(8)``
    (every mergeable pair in one rewrite, so a wide ``|`` takes one step)."""
    if isinstance(p, (And, Or)):
        op = type(p)
        out: list = []
        slots: dict = {}  # name -> indices in out of primitives of that name
        changed = False
        for c in p.items:
            if isinstance(c, Prim):
                # at most MERGE_TRIES candidates: chunk / strided merge only when sizes divide,
                # and a wide `|` of unrelated sizes must not cost quadratic time
                cands = slots.get(c.name, ())
                for k in (cands[:1] if c.name in _ALWAYS_MERGE else cands[:MERGE_TRIES]):
                    m = _merge_two(op, out[k], c)
                    if m is not None:
                        out[k] = m
                        changed = True
                        break
                else:
                    slots.setdefault(c.name, []).append(len(out))
                    out.append(c)
            else:
                out.append(c)
        if changed:
            return op(tuple(out))


def negate_blocks(p):
    """``~blocks(b, x) -> blocks(b, ~x)`` (every token lies in exactly one block)."""
    if isinstance(p, Not) and isinstance(p.child, Blocks):
        return Blocks(p.child.b, Not(p.child.child))


def _one_document(p: Pattern) -> Pattern:
    """``p`` evaluated inside one document: ``document`` is ``all``, ``per_document(x)`` is ``x``."""
    if isinstance(p, Prim):
        return ALL if p.name == "document" else p
    if isinstance(p, PerDocument):
        return _one_document(p.child)
    kids = p.children()
    if not kids:
        return p
    new = tuple(_one_document(c) for c in kids)
    return p if all(a is b for a, b in zip(new, kids)) else p.with_children(new)


def simplify_per_document(p):
    """``per_document(none) -> none``; inside ``per_document(x)`` the only document is the one
    ``x`` is evaluated in, so ``document`` there is ``all`` and ``per_document(y)`` is ``y``:
    ``per_document(per_document(x) & document) -> per_document(x)``."""
    if isinstance(p, PerDocument):
        if p.child == NONE:
            return NONE
        inner = _one_document(p.child)
        if inner != p.child:
            return PerDocument(inner)


def document_absorption(p):
    """``document & per_document(x) -> per_document(x)``: a pair in one document (one run) has
    one id, so ``per_document`` already implies ``document``."""
    if isinstance(p, And) and Prim("document") in p.items and any(isinstance(c, PerDocument) for c in p.items):
        return And(tuple(c for c in p.items if c != Prim("document")))


PASSES = [
    ("diff_to_and_not", diff_to_and_not),
    ("double_negation", double_negation),
    ("negate_constant", negate_constant),
    ("flatten", flatten),
    ("identity_and_annihilator", identity_and_annihilator),
    ("complement", complement),
    ("absorption", absorption),
    ("causal_band", causal_band),
    ("causal_absorption", causal_absorption),
    ("context_simplify", context_simplify),
    ("factor_common", factor_common),
    ("factor_choice", factor_choice),
    ("merge_choices", merge_choices),
    ("nested_choice", nested_choice),
    ("negate_blocks", negate_blocks),
    ("merge_primitives", merge_primitives),
    ("simplify_primitive", simplify_primitive),
    ("simplify_blocks", simplify_blocks),
    ("simplify_per_document", simplify_per_document),
    ("document_absorption", document_absorption),
    ("unwrap_trivial", unwrap_trivial),
    ("dedupe_and_sort", dedupe_and_sort),
]


@functools.lru_cache(maxsize=65536)
def _length_checks(p: Pattern) -> frozenset:
    """The parameters of ``p`` that depend on ``q_len`` / ``kv_len``: ``(primitive, argument,
    expression)`` and ``("blocks", "b", expression)``. They are range-checked only when the
    lengths are bound (P301), so no rewrite may drop one: ``all | local(w=q_len // 2)`` keeps
    its second operand until then, and at q_len=1 it is refused like ``all | local(w=0)``."""
    own: set = set()
    if isinstance(p, Prim):
        own = {(p.name, k, v) for k, v in p.args if isinstance(v, IntExpr)}
    elif isinstance(p, Blocks) and isinstance(p.b, IntExpr):
        own = {("blocks", "b", p.b)}
    for c in p.children():
        own |= _length_checks(c)
    return frozenset(own)


def keeps_length_checks(before: Pattern, after: Pattern) -> bool:
    """True when the rewrite ``before -> after`` keeps every length-dependent parameter."""
    need = _length_checks(before)
    return not need or need <= _length_checks(after)


@functools.lru_cache(maxsize=65536)
def normalize(p: Pattern) -> Pattern:
    """The canonical form of ``p``: passes applied bottom-up until none fires.

    Example:
        >>> from patternc.ir import CAUSAL, And, Prim
        >>> str(normalize(And((CAUSAL, And((Prim("local", (("w", 4),)), CAUSAL))))))
        'local(w=4) & causal'
    """
    while True:  # iterative at the root: a wide `|` may take many rewrites
        kids = p.children()
        if kids:
            new = tuple(normalize(c) for c in kids)
            if any(a is not b for a, b in zip(new, kids)):
                p = p.with_children(new)
        for _name, rewrite in PASSES:
            r = rewrite(p)
            if r is not None and r != p and keeps_length_checks(p, r):
                p = r
                break
        else:
            return p


# ---- invariants (checked by the tests, between passes and on every normalised result) ------------------
def ir_problems(p: Pattern) -> list[str]:
    """Well-formedness of any IR, normalised or not: node types, arities, primitive
    arguments in registry order with valid values. Returns a list of problems (empty = ok)."""
    from .primitives import PRIMITIVES

    out = []
    for n in p.walk():
        if isinstance(n, Prim):
            spec = PRIMITIVES.get(n.name)
            if spec is None or spec.combinator:
                out.append(f"unknown primitive {n.name!r}")
                continue
            names = tuple(k for k, _ in n.args)
            forms = [tuple(q.name for q in spec.params)] + [tuple(q.name for q in f) for f in spec.forms]
            if names not in forms:
                out.append(f"{n.name}: arguments {names} are not one of {forms}")
            for k, v in n.args:
                ok = (isinstance(v, int) and not isinstance(v, bool)) or isinstance(v, IntExpr) or (
                    isinstance(v, tuple) and all(isinstance(x, int) for x in v))
                if not ok:
                    out.append(f"{n.name}: argument {k}={v!r} is not an integer, list or IntExpr")
            concrete = {k: v for k, v in n.args if not isinstance(v, IntExpr)}
            out += [f"{n.name}: {msg}" for _k, msg, _h in check_values(n.name, concrete)]
        elif isinstance(n, (And, Or, Heads, Layers)):
            if not isinstance(n.items, tuple) or not all(isinstance(c, Pattern) for c in n.items):
                out.append(f"{type(n).__name__}: items must be a tuple of patterns")
            elif isinstance(n, (Heads, Layers)) and not n.items:
                out.append(f"{type(n).__name__} with no entries")
        elif isinstance(n, Blocks):
            if not (isinstance(n.b, IntExpr) or (_is_const(n.b) and n.b >= 1)):
                out.append(f"blocks size {n.b!r} must be an integer >= 1")
        elif isinstance(n, (Not, Diff, PerDocument)):
            pass
        elif isinstance(n, ir.Scored):
            out += _scored_problems(n, root=n is p)
        else:
            out.append(f"unknown node {type(n).__name__}")
    return out


def _scored_problems(n, root: bool) -> list[str]:
    from .terms import SCORE_TERMS, TERM_ORDER, check_term_values

    out = [] if root else ["score terms (Scored) below the root"]
    names = [t.name for t in n.terms if isinstance(t, ir.Term)]
    if len(names) != len(n.terms) or not names:
        return out + ["Scored needs a non-empty tuple of Term"]
    if any(name not in SCORE_TERMS for name in names):
        return out + [f"unknown score term in {names}"]
    if names != sorted(set(names), key=TERM_ORDER.index):
        out.append(f"score terms {names} repeated or not in the order {TERM_ORDER}")
    for t in n.terms:
        if tuple(k for k, _ in t.args) != tuple(q.name for q in SCORE_TERMS[t.name].params):
            out.append(f"{t.name}: arguments {t.args} not in registry order")
        elif not all(isinstance(v, int) and not isinstance(v, bool) for _k, v in t.args):
            out.append(f"{t.name}: arguments must be integer constants")
        else:
            out += [f"{t.name}: {msg}" for _k, msg, _h in check_term_values(t.name, t.argdict)]
    return out


def normal_form_problems(p: Pattern) -> list[str]:
    """The invariants of ``normalize``'s output, on top of ``ir_problems``: no ``-``
    (``Diff``); ``&`` / ``|`` flattened, with >= 2 distinct operands in canonical order and no
    ``all`` / ``none`` among them; no ``~~x``, ``~all``, ``~none``; ``heads`` / ``layers`` with
    >= 2 entries and no shorter period; no ``blocks(1, x)``, ``blocks(b, all)``, nested
    constant blocks; and no pass applies anywhere (a fixed point)."""
    out = ir_problems(p)
    seen = set()
    for n in p.walk():
        if id(n) in seen:
            continue
        seen.add(id(n))
        name = type(n).__name__
        if isinstance(n, Diff):
            out.append("Diff in normal form")
        if isinstance(n, (And, Or)):
            if len(n.items) < 2:
                out.append(f"{name} with {len(n.items)} operand(s)")
            if any(type(c) is type(n) for c in n.items):
                out.append(f"{name} not flattened")
            if (ALL in n.items or NONE in n.items) and not _length_checks(n):
                out.append(f"{name} contains all/none")
            if list(n.items) != sorted(set(n.items), key=_sort_key):
                out.append(f"{name} operands not unique and sorted")
        if isinstance(n, Not) and (isinstance(n.child, Not) or n.child in (ALL, NONE)):
            out.append(f"trivial negation {n}")
        if isinstance(n, (Heads, Layers)):
            m = len(n.items)
            if m < 2 or any(m % k == 0 and n.items == n.items[:k] * (m // k) for k in range(1, m)):
                out.append(f"{name} with a shorter period: {n}")
        if isinstance(n, Blocks):
            if (n.child in (ALL, NONE) and not _length_checks(n)) or (_is_const(n.b) and n.b == 1):
                out.append(f"trivial blocks: {n}")
        for pass_name, rewrite in PASSES:
            r = rewrite(n)
            if r is not None and r != n and keeps_length_checks(n, r):
                out.append(f"pass {pass_name} still applies to {n}")
    return out
