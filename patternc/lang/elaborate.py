"""Stage 2: Lark tree -> pattern IR (``to_ir``), with name/type/range checks and warnings.

Resolves ``param`` / ``let`` / ``def`` and the prelude, binds primitive arguments
(positional in the order of SPEC §1.1, or keyword), folds integer arithmetic (anything that
mentions ``q_len`` / ``kv_len`` stays symbolic until compile time), and checks every
constraint it can. Errors are P2xx diagnostics; warnings W001 (``&``/``|`` mixed without
parentheses) and W002 (a pattern that uses ``causal`` but still lets some query attend a
later key).
"""

from __future__ import annotations

import dataclasses
import functools
from dataclasses import dataclass, field

from lark import Token, Tree

from ..errors import Diagnostic, PatternError, Span, did_you_mean, normalize_newlines
from ..ir import nodes as ir
from ..ir.nodes import And, Blocks, Diff, Heads, IntExpr, Layers, Not, Or, Pattern, PerDocument, Prim, Scored, Term
from ..ir.primitives import (
    BUILTIN_INTS,
    INT_FUNCTION_NAMES,
    MAX_INT,
    PRIMITIVES,
    check_values,
)
from ..ir.terms import SCORE_TERMS, TERM_ORDER, check_term_values
from .parser import (
    MAX_NESTING,
    empty_source_diagnostic,
    parse_tree,
    prelude_path,
    span_of,
)

# Bounds on what a source may expand to once `let`s are substituted and `def`s called: a
# short source can describe an exponentially large tree (`let a1 = a0 | ~a0`, ...), and every
# later stage walks the tree. Exceeding them is an error (P106 / P216), never a hang.
MAX_IR_NODES = 100_000  # nodes of the expanded pattern, integer expressions included
MAX_IR_DEPTH = 2 * MAX_NESTING  # nesting depth of the expanded pattern
MAX_STEPS = 1_000_000  # elaboration steps (syntax nodes visited, def bodies counted per call)


class _Fail(Exception):
    """Internal: carries one diagnostic out of the recursive elaborator."""

    def __init__(self, code, message, span, help=None):
        self.args_ = (code, message, span, help)


@dataclass
class DefV:
    name: str
    params: list  # [(name, default_tree | None)]
    body: Tree
    env: dict
    span: Span | None
    source: str
    filename: str


@dataclass
class Binding:
    kind: str  # 'param' | 'let' | 'def' | 'arg' | 'set'
    value: object
    span: Span | None
    used: bool = False


@dataclass
class ParseResult:
    pattern: Pattern  # elaborated, not yet normalised
    warnings: list = field(default_factory=list)
    source: str = ""
    filename: str = "<string>"
    params: dict = field(default_factory=dict)  # declared params -> value used


def _is_int(v) -> bool:
    return (isinstance(v, int) and not isinstance(v, bool)) or isinstance(v, IntExpr)


def _describe(v) -> str:
    if isinstance(v, Pattern):
        return "a pattern"
    if isinstance(v, tuple):
        return "a list of integers"
    if isinstance(v, DefV):
        return "a function"
    return "an integer"


class Elaborator:
    def __init__(self, source: str, filename: str):
        self.source = source
        self.filename = filename
        self.warnings: list[Diagnostic] = []
        self._defining: set[str] = set()
        self._steps = [0, None]  # [steps, span of the statement]; shared with prelude elaborators
        self._measured: dict = {}  # id -> (value, tree size, depth); the value keeps the id alive

    def measure(self, v, span):
        """Fail with P216 / P106 when ``v`` (a pattern or integer, a DAG after `let`
        sharing) expands to more than MAX_IR_NODES nodes or MAX_IR_DEPTH levels."""
        memo = self._measured
        stack = [(v, False)]
        while stack:
            n, done = stack.pop()
            if id(n) in memo:
                continue
            kids = _value_children(n)
            if not done:
                stack.append((n, True))
                stack.extend((c, False) for c in kids if id(c) not in memo)
                continue
            size = 1 + sum(memo[id(c)][1] for c in kids)
            depth = 1 + max((memo[id(c)][2] for c in kids), default=0)
            memo[id(n)] = (n, size, depth)
            if depth > MAX_IR_DEPTH:
                self.fail("P106", f"the expression nests more than {MAX_IR_DEPTH} levels deep once names are expanded", span,
                          "flatten chains such as `a - b - c - ...` into `a - (b | c | ...)`, or simplify the definitions")
            if size > MAX_IR_NODES:
                self.fail("P216", f"the pattern expands to more than {MAX_IR_NODES:,} nodes once `let`s and `def`s are substituted",
                          span, "each use of a name copies its definition: avoid definitions that use the previous one several times")
        return v

    # ---- helpers ---------------------------------------------------------------------------
    def fail(self, code, message, span, help=None):
        raise _Fail(code, message, span, help)

    def text(self, node) -> str:
        """The source text of ``node`` as quoted in messages: blanks (tabs, new lines) collapsed."""
        s = span_of(node)
        return " ".join(self.source[s.start:s.end].split()) if s else ""

    def check_int(self, v, span):
        if isinstance(v, int) and abs(v) > MAX_INT:
            self.fail("P213", f"integer {v} is too large to be a length or parameter (the limit is 2^31 - 1)", span,
                      "lengths, windows and strides must fit in 31 bits")
        return v

    # ---- statements ------------------------------------------------------------------------
    def run(self, tree: Tree, env: dict, overrides: dict) -> tuple[Pattern, dict]:
        items = tree.children
        if not items:
            raise PatternError(empty_source_diagnostic(self.source, self.filename))
        declared = {}
        param_bindings = {}  # name -> Binding of each declared `param` (for W005 / W006)
        result = None
        for idx, it in enumerate(items):
            kind = it.data
            self._steps[1] = span_of(it)
            if kind == "final_expr":
                if idx != len(items) - 1:
                    later = items[idx + 1]
                    what = "another expression" if later.data == "final_expr" else "a statement"
                    self.fail("P111", f"this expression is followed by {what}; a source ends with exactly one pattern expression",
                              span_of(it), "combine the expressions with `|` or `&`, or name this one with `let name = ...`")
                val = self.measure(self.expr(it.children[0], env), span_of(it))
                if not isinstance(val, Pattern):
                    self.fail("P206", f"the final expression is {_describe(val)}, but a pattern was expected", span_of(it),
                              "end the source with a pattern, e.g. `local(w=128) & causal`")
                result = val
                if len(it.children) > 1:  # `... with TERM, TERM` (SPEC §1.8)
                    terms = self.score_terms(it.children[1], env)
                    result = Scored(val, terms, span=span_of(it))
                continue
            name_tok = it.children[0]
            name = str(name_tok)
            self.check_new_name(name, name_tok, env)
            if kind == "param_stmt":
                if name in overrides:
                    val = overrides[name]
                    env[name] = Binding("param", val, span_of(name_tok))
                    self.expr(it.children[1], env)  # still check the default
                else:
                    val = self.measure(self.expr(it.children[1], env), span_of(it.children[1]))
                    if not _is_int(val):
                        self.fail("P207", f"`param {name}` must be an integer, got {_describe(val)}", span_of(it.children[1]),
                                  "params are integers (window sizes, strides, ...); use `let` to name a pattern")
                    env[name] = Binding("param", val, span_of(name_tok))
                declared[name] = env[name].value
                param_bindings[name] = env[name]
            elif kind == "let_stmt":
                self._defining = {name}
                if _mentions(it.children[1], name):
                    self.fail("P210", f"`{name}` is defined in terms of itself", span_of(_mentions(it.children[1], name)),
                              "a `let` can only use names defined before it")
                self._defining = set()
                env[name] = Binding("let", self.measure(self.expr(it.children[1], env), span_of(it.children[1])),
                                    span_of(name_tok))
            elif kind == "def_stmt":
                params = []
                body = it.children[-1]
                if len(it.children) == 3:
                    seen = set()
                    for dp in it.children[1].children:
                        pname = str(dp.children[0])
                        if pname in PRIMITIVES or pname in INT_FUNCTION_NAMES or pname in BUILTIN_INTS or pname in SCORE_TERMS:
                            self.fail("P211", f"`{pname}` is a built-in name and cannot be a parameter name",
                                      span_of(dp.children[0]), f"choose another name, e.g. `my_{pname}`")
                        if pname in seen:
                            self.fail("P204", f"`def {name}` has two parameters named `{pname}`", span_of(dp.children[0]),
                                      "give each parameter its own name")
                        seen.add(pname)
                        params.append((pname, dp.children[1] if len(dp.children) > 1 else None))
                if _mentions(body, name):
                    self.fail("P210", f"`def {name}` calls itself: recursion is not supported", span_of(_mentions(body, name)),
                              "patterns are finite expressions; write the repetition out, or use heads(...) / layers(...)")
                env[name] = Binding("def", DefV(name, params, body, dict(env), span_of(name_tok), self.source, self.filename),
                                    span_of(name_tok))
        if result is None:
            last = items[-1]
            lets = [str(it.children[0]) for it in items if it.data == "let_stmt"]
            self.fail("P111", "the source has no final pattern expression after its statements", span_of(last),
                      f"end the source with the pattern itself: add a last line `{lets[-1]}`" if lets
                      else "end the source with the pattern itself, e.g. `local(w=128) & causal`")
        self.unused_param_warnings(param_bindings, overrides)
        return result, declared

    def unused_param_warnings(self, bindings: dict, overrides: dict) -> None:
        """W005: a `param` the pattern never reads; W006: such a param set from outside
        (``--set`` / ``params=``), which then changes nothing."""
        for name, b in bindings.items():
            if b.used:
                continue
            if name in overrides:
                self.warnings.append(Diagnostic(
                    "W006", f"`{name}` is set to {overrides[name]} (--set / params=), but `param {name}` is never "
                    "used: the setting changes nothing", b.span,
                    f"use `{name}` in the pattern, or drop the setting and the `param {name}` line",
                    severity="warning", filename=self.filename, source=self.source))
            else:
                self.warnings.append(Diagnostic(
                    "W005", f"`param {name}` is declared but never used", b.span,
                    f"use `{name}` in the pattern, or remove the `param {name}` line",
                    severity="warning", filename=self.filename, source=self.source))

    def check_new_name(self, name, tok, env):
        if name in PRIMITIVES or name in INT_FUNCTION_NAMES or name in BUILTIN_INTS or name in SCORE_TERMS:
            self.fail("P211", f"`{name}` is a built-in name and cannot be redefined", span_of(tok),
                      f"choose another name, e.g. `my_{name}`")
        b = env.get(name)
        if b is not None and b.kind != "set":
            where = f" (first defined at line {b.span.line})" if b.span else " (in the prelude)"
            self.fail("P211", f"`{name}` is already defined{where}", span_of(tok), "choose another name")

    # ---- expressions -----------------------------------------------------------------------
    def expr(self, node, env):
        self._steps[0] += 1
        if self._steps[0] > MAX_STEPS:
            self.fail("P216", f"the source takes more than {MAX_STEPS:,} elaboration steps (stopped in this statement)",
                      self._steps[1] or span_of(node), "each call of a `def` expands its body again: avoid `def`s that call the previous `def` several times")
        if isinstance(node, Token):  # pragma: no cover - grammar always wraps tokens
            self.fail("P900", f"unexpected token {node!r}", span_of(node))
        method = getattr(self, "e_" + node.data, None)
        if method is None:  # pragma: no cover
            self.fail("P900", f"unknown syntax node {node.data}", span_of(node))
        return method(node, env)

    def e_int_lit(self, node, env):
        return self.check_int(int(str(node.children[0]).replace("_", "")), span_of(node))

    def e_paren(self, node, env):
        return self.expr(node.children[0], env)

    def e_int_list(self, node, env):
        out = []
        for c in node.children:
            v = self.expr(c, env)
            if isinstance(v, IntExpr):
                self.fail("P207", "list positions must be known before compiling (not depend on q_len / kv_len)", span_of(c),
                          "the last k positions are `~prefix(n=q_len - k)` (i or j >= q_len - k; for Q_LEN = KV_LEN "
                          "it is `global(at=[q_len - k, ..., q_len - 1])`); otherwise use integer literals or params")
            if not _is_int(v):
                self.fail("P207", f"expected an integer in the list, got {_describe(v)}", span_of(c), "lists hold token positions")
            out.append(v)
        return tuple(out)

    def e_name(self, node, env):
        tok = node.children[0]
        name = str(tok)
        b = env.get(name)
        if b is not None:
            b.used = True
            if isinstance(b.value, DefV):
                return self.call_def(b.value, [], node, env)
            return b.value
        if name in BUILTIN_INTS:
            return ir.Var(name)
        if name in PRIMITIVES:
            return self.call_prim(name, [], node)
        if name in INT_FUNCTION_NAMES:
            self.fail("P203", f"`{name}` is a function and needs arguments", span_of(node), f"call it: `{name}(...)`")
        if name in SCORE_TERMS:
            self.term_as_pattern(name, node)
        if name in self._defining:
            self.fail("P210", f"`{name}` is defined in terms of itself", span_of(node), "a definition can only use names defined before it")
        cands = list(env) + list(PRIMITIVES) + list(BUILTIN_INTS)
        self.fail("P209", f"undefined name `{name}`", span_of(node),
                  did_you_mean(name, cands) or "define it first with `param`, `let` or `def`, or pass it with --set NAME=INT")

    def e_prefix(self, node, env):
        ops = [str(t) for t in node.children[:-1]]
        val = self.expr(node.children[-1], env)
        for op in reversed(ops):
            if op == "~":
                if not isinstance(val, Pattern):
                    self.fail("P206", f"`~` (not) needs a pattern, got {_describe(val)}", span_of(node),
                              "for a negative integer write `-`")
                val = Not(val, span=span_of(node))
            else:
                if not _is_int(val):
                    self.fail("P207", f"unary `-` needs an integer, got {_describe(val)}", span_of(node),
                              "to remove a pattern from another, write `p - q`; to negate it, `~p`")
                val = self.arith("-", 0, val, node)
        return val

    def arith(self, op, a, b, node):
        if op in ("//", "%") and not isinstance(b, IntExpr) and b == 0:
            self.fail("P212", f"division by zero in `{self.text(node)}`", span_of(node), "the divisor must not be 0")
        if isinstance(a, IntExpr) or isinstance(b, IntExpr):
            return ir.BinOp(op, a, b)
        return self.check_int(ir.INT_BINOPS[op](a, b), span_of(node))

    def e_sum_expr(self, node, env):
        kids = node.children
        acc = self.expr(kids[0], env)
        for i in range(1, len(kids), 2):
            op = str(kids[i])
            rhs = self.expr(kids[i + 1], env)
            if isinstance(acc, Pattern) and isinstance(rhs, Pattern) and op == "-":
                acc = Diff(acc, rhs, span=_join(span_of(kids[0]), span_of(kids[i + 1])))
                continue
            if _is_int(acc) and _is_int(rhs):
                acc = self.arith(op, acc, rhs, node)
                continue
            bad = kids[i + 1] if _is_int(acc) or isinstance(acc, tuple) else kids[0]
            if op == "+":
                self.fail("P207", f"`+` adds integers, got {_describe(acc)} and {_describe(rhs)}", span_of(node),
                          "to combine patterns use `|` (either allows) or `&` (both allow)")
            if isinstance(acc, Pattern):
                self.fail("P206", f"`-` between a pattern and {_describe(rhs)}: expected a pattern on the right",
                          span_of(kids[i + 1]), "`p - q` removes pattern q from p; both sides must be patterns")
            self.fail("P207", f"`-` between {_describe(acc)} and a pattern: expected an integer on the right",
                      span_of(bad), "subtract integers, or make both sides patterns")
        return acc

    def e_product(self, node, env):
        kids = node.children
        acc = self.expr(kids[0], env)
        for i in range(1, len(kids), 2):
            op = str(kids[i])
            rhs = self.expr(kids[i + 1], env)
            if not (_is_int(acc) and _is_int(rhs)):
                bad = kids[0] if not _is_int(acc) else kids[i + 1]
                self.fail("P207", f"`{op}` works on integers, got {_describe(acc if bad is kids[0] else rhs)}",
                          span_of(bad), "combine patterns with `|`, `&`, `-` and `~`")
            acc = self.arith(op, acc, rhs, node)
        return acc

    def _pattern_operands(self, node, env, opname):
        vals = []
        for c in node.children:
            v = self.expr(c, env)
            if not isinstance(v, Pattern):
                self.fail("P206", f"`{opname}` combines patterns, got {_describe(v)}", span_of(c),
                          "integers go inside calls, e.g. `local(w=128)`")
            vals.append(v)
        return vals

    def e_and_expr(self, node, env):
        return And(tuple(self._pattern_operands(node, env, "&")), span=span_of(node))

    def e_or_expr(self, node, env):
        for c in node.children:
            if isinstance(c, Tree) and c.data == "and_expr":
                self.warn_precedence(node, c)
                break
        return Or(tuple(self._pattern_operands(node, env, "|")), span=span_of(node))

    def warn_precedence(self, node, and_child):
        parts = [self.text(c) for c in node.children]
        shown = " | ".join(f"({p})" if isinstance(c, Tree) and c.data == "and_expr" else p
                           for c, p in zip(node.children, parts))
        help_ = f"write `{shown}` to keep this meaning"
        if node.children[-1] is and_child:
            a_parts = [self.text(c) for c in and_child.children]
            alt = "(" + " | ".join(parts[:-1] + [a_parts[0]]) + ") & " + " & ".join(a_parts[1:])
            help_ += f", or `{alt}` to apply `&` to the whole union"
        elif node.children[0] is and_child and len(node.children) > 1:
            a_parts = [self.text(c) for c in and_child.children]
            alt = " & ".join(a_parts[:-1]) + " & (" + " | ".join([a_parts[-1]] + parts[1:]) + ")"
            help_ += f", or `{alt}` to apply `&` to the whole union"
        self.warnings.append(Diagnostic(
            "W001", f"`&` binds tighter than `|`: this is read as `{shown}`", span_of(node), help_,
            severity="warning", filename=self.filename, source=self.source))

    # ---- calls -------------------------------------------------------------------------------
    def e_call(self, node, env):
        name_tok = node.children[0]
        name = str(name_tok)
        args = []  # (keyword | None, tree)
        if len(node.children) > 1:
            for a in node.children[1].children:
                if a.data == "kw_arg":
                    args.append((str(a.children[0]), a.children[1], a))
                else:
                    args.append((None, a.children[0], a))
        b = env.get(name)
        if b is not None:
            b.used = True
            if not isinstance(b.value, DefV):
                self.fail("P215", f"`{name}` is {_describe(b.value)}, not a function: it cannot be called", span_of(node),
                          f"use `{name}` without parentheses")
            return self.call_def(b.value, args, node, env)
        if name in INT_FUNCTION_NAMES:
            return self.call_int_fn(name, args, node, env)
        if name in PRIMITIVES:
            return self.call_prim(name, args, node, env)
        if name in SCORE_TERMS:
            self.term_as_pattern(name, node)
        if name in self._defining:
            self.fail("P210", f"`{name}` calls itself: recursion is not supported", span_of(node),
                      "patterns are finite expressions")
        cands = [k for k, v in env.items() if isinstance(v.value, DefV)] + list(PRIMITIVES) + list(INT_FUNCTION_NAMES)
        self.fail("P201", f"unknown primitive or function `{name}`", span_of(name_tok),
                  did_you_mean(name, cands) or "see `docs/language.md` for the primitives, or define it with `def`")

    def call_int_fn(self, name, args, node, env):
        lo, hi, _ = ir.INT_FUNCS[name]
        for kw, _t, a in args:
            if kw is not None:
                self.fail("P202", f"`{name}` takes no keyword arguments", span_of(a), f"write `{name}(...)` with positional arguments")
        if len(args) < lo or (hi is not None and len(args) > hi):
            need = f"exactly {lo}" if hi == lo else f"at least {lo}"
            self.fail("P203" if len(args) < lo else "P205", f"`{name}` takes {need} argument{'s' if lo > 1 else ''}, got {len(args)}",
                      span_of(node), f"e.g. `{name}(q_len)`" if name == "isqrt" else f"e.g. `{name}(a, b)`")
        vals = []
        for _kw, t, _a in args:
            v = self.expr(t, env)
            if not _is_int(v):
                self.fail("P207", f"`{name}` takes integers, got {_describe(v)}", span_of(t), "pass integers")
            vals.append(v)
        if any(isinstance(v, IntExpr) for v in vals):
            return ir.Fn(name, tuple(vals))
        if name == "isqrt" and vals[0] < 0:
            self.fail("P208", f"`isqrt` of a negative number ({vals[0]})", span_of(node), "pass a non-negative integer")
        return ir.INT_FUNCS[name][2](*vals)

    def _bind(self, fname, params, args, node, env, variadic=False):
        """Match (keyword, tree, argnode) args to params. Returns {param: (value, span)}."""
        out = {}
        names = [p for p in params]
        pos_i = 0
        n_pos = sum(1 for kw, _t, _a in args if kw is None)
        for kw, t, a in args:
            if kw is None:
                if pos_i >= len(names):
                    self.fail("P205", f"`{fname}` takes {len(names)} argument{'s' if len(names) != 1 else ''} "
                              f"({', '.join(names) or 'none'}), got {n_pos} positional", span_of(a),
                              "remove the extra argument" + (f"; the parameters are {', '.join(names)}" if names else ""))
                key = names[pos_i]
                pos_i += 1
            else:
                key = kw
                if key not in names:
                    self.fail("P202", f"`{fname}` has no parameter `{key}`", span_of(a.children[0]),
                              did_you_mean(key, names) or (f"the parameters are {', '.join(names)}" if names else f"`{fname}` takes no arguments"))
            if key in out:
                self.fail("P204", f"argument `{key}` of `{fname}` is given twice", span_of(a),
                          "give each argument once (positional arguments fill parameters in order)")
            out[key] = (self.expr(t, env), span_of(t))
        return out

    def call_prim(self, name, args, node, env=None):
        spec = PRIMITIVES[name]
        span = span_of(node)
        if name in ("heads", "layers"):
            if not args:
                self.fail("P203", f"`{name}` needs at least one pattern", span,
                          f"e.g. `{name}(local(w=128), strided(s=64))`")
            items = []
            for kw, t, a in args:
                if kw is not None:
                    self.fail("P202", f"`{name}` takes patterns positionally, not `{kw}=`", span_of(a),
                              f"write `{name}(p0, p1, ...)`")
                v = self.expr(t, env)
                if not isinstance(v, Pattern):
                    self.fail("P206", f"`{name}` takes patterns, got {_describe(v)}", span_of(t),
                              "each entry is the pattern of one " + ("head" if name == "heads" else "layer"))
                items.append(v)
            cls = Heads if name == "heads" else Layers
            return cls(tuple(items), span=span)
        if name == "global":
            return self.call_global(args, node, env)
        params = [p.name for p in spec.params]
        bound = self._bind(name, params, args, node, env)
        values = {}
        for p in spec.params:
            if p.name not in bound:
                if p.required:
                    pos = params.index(p.name) + 1
                    self.fail("P203", f"`{name}` is missing its argument `{p.name}`" + (f" ({p.doc})" if p.doc else ""), span,
                              f"e.g. `{spec.example}`" if spec.example else f"pass `{p.name}=...` (or as argument {pos})")
                values[p.name] = (p.default, span)
                continue
            v, vspan = bound[p.name]
            if p.kind == "pattern":
                if not isinstance(v, Pattern):
                    self.fail("P206", f"`{name}` expects a pattern for `{p.name}`, got {_describe(v)}", vspan,
                              f"e.g. `{spec.example}`")
            elif not _is_int(v):
                self.fail("P207", f"`{name}` expects an integer for `{p.name}`, got {_describe(v)}", vspan,
                          f"e.g. `{spec.example}`" + ("; to combine patterns use `|` or `&`" if isinstance(v, Pattern) else ""))
            values[p.name] = (v, vspan)
        for key, msg, help_ in check_values(name, {k: v for k, (v, _s) in values.items() if not isinstance(v, Pattern)}):
            self.fail("P208", msg, values[key][1] if key is not None else span, help_)
        if name == "blocks":
            return Blocks(values["b"][0], values["p"][0], span=span)
        if name == "per_document":
            return PerDocument(values["p"][0], span=span)
        return Prim(name, tuple((p.name, values[p.name][0]) for p in spec.params), span=span)

    def call_global(self, args, node, env):
        span = span_of(node)
        bound = {}
        for kw, t, a in args:
            v = self.expr(t, env)
            key = kw
            if key is None:
                if bound:
                    self.fail("P205", "`global` takes one argument: `n=` or `at=`", span_of(a), "e.g. `global(n=2)` or `global(at=[0, 100])`")
                key = "at" if isinstance(v, tuple) else "n"
            if key not in ("n", "at"):
                self.fail("P202", f"`global` has no parameter `{key}`", span_of(a.children[0]),
                          did_you_mean(key, ["n", "at"]) or "use `n=` (the first n positions) or `at=[...]` (listed positions)")
            if bound:
                other = next(iter(bound))
                self.fail("P204", "`global` takes `n=` or `at=`, not both" if other != key else f"argument `{key}` of `global` is given twice",
                          span_of(a), "e.g. `global(n=2)` or `global(at=[0, 100])`")
            if key == "at" and not isinstance(v, tuple):
                self.fail("P207", f"`global(at=...)` expects a list of positions, got {_describe(v)}", span_of(t), "e.g. `global(at=[0, 100])`")
            if key == "n" and not _is_int(v):
                self.fail("P207", f"`global(n=...)` expects an integer, got {_describe(v)}", span_of(t), "e.g. `global(n=2)`")
            bound[key] = (v, span_of(t))
        if not bound:
            self.fail("P203", "`global` needs `n=` (the first n positions) or `at=[...]` (listed positions)", span,
                      "e.g. `global(n=2)` or `global(at=[0, 100])`")
        key, (v, vspan) = next(iter(bound.items()))
        for k2, msg, help_ in check_values("global", {key: v}):
            self.fail("P208", msg, vspan, help_)
        return Prim("global", ((key, v),), span=span)

    # ---- score terms (SPEC §1.8) -----------------------------------------------------------------
    def term_as_pattern(self, name, node):
        spec = SCORE_TERMS[name]
        self.fail("P217", f"`{name}` is a score term, not a pattern: it changes scores, it does not choose pairs",
                  span_of(node), f"write it after the final expression with `with`: e.g. `local(w=128) & causal with {spec.example}`")

    def score_terms(self, node, env) -> tuple:
        """``with t1, t2`` -> ``Term``s in canonical order (each name at most once)."""
        seen: dict[str, Term] = {}
        for tnode in node.children:
            t = self.score_term(tnode, env)
            if t.name in seen:
                first = seen[t.name].span
                where = f" (first given at line {first.line}, column {first.column})" if first else ""
                self.fail("P219", f"the score term `{t.name}` is given twice{where}", t.span,
                          f"give each score term once: keep one `{t.name}(...)`")
            seen[t.name] = t
        return tuple(seen[n] for n in TERM_ORDER if n in seen)

    def score_term(self, node, env) -> Term:
        name_tok = node.children[0]
        name = str(name_tok)
        span = span_of(node)
        args = []
        if len(node.children) > 1:
            for a in node.children[1].children:
                if a.data == "kw_arg":
                    args.append((str(a.children[0]), a.children[1], a))
                else:
                    args.append((None, a.children[0], a))
        if name not in SCORE_TERMS:
            terms = ", ".join(f"`{s.example}`" for s in SCORE_TERMS.values())
            b = env.get(name)
            if name in PRIMITIVES or (b is not None and isinstance(b.value, (Pattern, DefV))):
                self.fail("P218", f"`{name}` is a pattern, not a score term: only score terms may follow `with`", span,
                          f"combine patterns with `&` / `|` before `with`; the score terms are {terms}")
            self.fail("P201", f"unknown score term `{name}`", span_of(name_tok),
                      did_you_mean(name, list(SCORE_TERMS)) or f"the score terms are {terms}")
        spec = SCORE_TERMS[name]
        params = [p.name for p in spec.params]
        bound = self._bind(name, params, args, node, env)
        values = {}
        for p in spec.params:
            if p.name not in bound:
                if p.required:
                    self.fail("P203", f"`{name}` is missing its argument `{p.name}`" + (f" ({p.doc})" if p.doc else ""), span,
                              f"e.g. `{spec.example}`")
                values[p.name] = (p.default, span)
                continue
            v, vspan = bound[p.name]
            if isinstance(v, IntExpr):
                self.fail("P207", f"`{name}({p.name}=...)` must be a constant; it cannot depend on q_len / kv_len", vspan,
                          f"use an integer literal or a `param`, e.g. `{spec.example}`")
            if not _is_int(v):
                self.fail("P207", f"`{name}` expects an integer for `{p.name}`, got {_describe(v)}", vspan, f"e.g. `{spec.example}`")
            values[p.name] = (v, vspan)
        for key, msg, help_ in check_term_values(name, {k: v for k, (v, _s) in values.items()}):
            self.fail("P208", msg, values[key][1], help_)
        return Term(name, tuple((p.name, values[p.name][0]) for p in spec.params), span=span)

    def call_def(self, d: DefV, args, node, env):
        names = [p for p, _ in d.params]
        bound = self._bind(d.name, names, args, node, env)
        local = dict(d.env)
        for pname, default in d.params:
            if pname in bound:
                v = bound[pname][0]
            elif default is not None:
                v = self.expr(default, d.env)
            else:
                self.fail("P203", f"`{d.name}` is missing its argument `{pname}`", span_of(node),
                          f"`{d.name}` takes ({', '.join(names)})")
            local[pname] = Binding("arg", v, None, used=True)
        if d.source is not self.source:  # prelude: evaluate with its own text for errors
            sub = Elaborator(d.source, d.filename)
            sub._steps, sub._measured = self._steps, self._measured
            try:
                out = sub.expr(d.body, local)
            except _Fail as f:  # report at the call site of the user's source
                code, msg, _span, help_ = f.args_
                self.fail(code, f"in `{d.name}`: {msg}", span_of(node), help_)
            # nodes built by the prelude point into the prelude's text: point them at the call
            keep = {id(n) for pname, _ in d.params for v in (local[pname].value,) if isinstance(v, Pattern)
                    for n in v.walk()}
            return _respan(out, span_of(node), keep, {})
        return self.expr(d.body, local)


def _respan(v, span, keep: set, memo: dict):
    """``v`` with the span of every pattern node not in ``keep`` (ids) replaced by ``span``."""
    if not isinstance(v, Pattern) or id(v) in keep:
        return v
    if id(v) in memo:
        return memo[id(v)]
    kids = v.children()
    out = v.with_children(tuple(_respan(c, span, keep, memo) for c in kids)) if kids else v
    out = dataclasses.replace(out, span=span)
    memo[id(v)] = out
    return out


def _value_children(v) -> tuple:
    if isinstance(v, Prim):
        out = []
        for _k, x in v.args:
            out.extend(x if isinstance(x, tuple) else (x,))
        return tuple(x for x in out if isinstance(x, IntExpr))
    if isinstance(v, Blocks):
        return (v.child, v.b) if isinstance(v.b, IntExpr) else (v.child,)
    if isinstance(v, Pattern):
        return v.children()
    if isinstance(v, ir.BinOp):
        return tuple(x for x in (v.left, v.right) if isinstance(x, IntExpr))
    if isinstance(v, ir.Fn):
        return tuple(x for x in v.args if isinstance(x, IntExpr))
    return ()


def _join(a: Span | None, b: Span | None) -> Span | None:
    if a is None or b is None:
        return a or b
    return Span(a.start, b.end, a.line, a.column, b.end_line, b.end_column)


def _mentions(tree, name):
    """The first (in source order) use of ``name`` in ``tree``, or None."""
    for t in tree.iter_subtrees_topdown():
        if t.data in ("name", "call") and str(t.children[0]) == name:
            return t
    return None


# ---- the prelude ----------------------------------------------------------------------------------
@functools.lru_cache(maxsize=1)
def _prelude_tree():
    path = prelude_path()
    text = path.read_text(encoding="utf-8")
    return text, parse_tree(text, "<prelude>")


def prelude_env() -> dict:
    text, tree = _prelude_tree()
    el = Elaborator(text, "<prelude>")
    env: dict = {}
    for it in tree.children:
        if it.data == "def_stmt":
            name = str(it.children[0])
            params = []
            if len(it.children) == 3:
                params = [(str(dp.children[0]), dp.children[1] if len(dp.children) > 1 else None) for dp in it.children[1].children]
            env[name] = Binding("def", DefV(name, params, it.children[-1], {}, None, text, "<prelude>"), None)
        elif it.data == "let_stmt":
            env[str(it.children[0])] = Binding("let", el.expr(it.children[1], env), None)
    return env


# ---- entry point -------------------------------------------------------------------------------------
def elaborate(text: str, *, params: dict | None = None, filename: str = "<string>") -> ParseResult:
    """Parse and elaborate ``text`` into an (unnormalised) IR.

    Raises:
        PatternError: any P1xx / P2xx diagnostic.
    """
    import sys

    text = normalize_newlines(text)
    tree = parse_tree(text, filename)
    el = Elaborator(text, filename)
    env = prelude_env()
    overrides = {}
    for k, v in (params or {}).items():
        if isinstance(v, bool) or not isinstance(v, int):
            raise PatternError(Diagnostic("P214", f"parameter `{k}` must be an integer, got {v!r}", None,
                                          "params are integers: e.g. params={'w': 256} or --set w=256", filename=filename))
        if abs(v) > MAX_INT:
            raise PatternError(Diagnostic("P213", f"parameter `{k}` = {v} is too large (the limit is 2^31 - 1)", None,
                                          "use a smaller value", filename=filename))
        if k in PRIMITIVES or k in INT_FUNCTION_NAMES or k in BUILTIN_INTS:
            what = "the length" if k in BUILTIN_INTS else "a built-in"
            raise PatternError(Diagnostic("P214", f"cannot set `{k}`: it is {what} name, not a `param`", None,
                                          "q_len / kv_len come from the lengths you compile for (--seq-len, --kv-len)"
                                          if k in BUILTIN_INTS else "set only the source's `param`s",
                                          filename=filename, source=text))
        overrides[k] = v
    declared_names = {str(it.children[0]) for it in tree.children if it.data == "param_stmt"}
    for k, v in overrides.items():
        if k not in declared_names:
            env[k] = Binding("set", v, None)
    old = sys.getrecursionlimit()
    sys.setrecursionlimit(max(old, 20000))
    try:
        pattern, declared = el.run(tree, env, overrides)
    except _Fail as f:
        code, msg, span, help_ = f.args_
        raise PatternError(Diagnostic(code, msg, span, help_, filename=filename, source=text)) from None
    finally:
        sys.setrecursionlimit(old)
    unused = [k for k in overrides if k not in declared_names and not env[k].used]
    if unused:
        k = unused[0]
        cands = list(declared_names) + [n for n, b in env.items() if b.kind in ("param", "let")]
        raise PatternError(Diagnostic("P214", f"parameter `{k}` is set but the pattern never uses it", None,
                                      did_you_mean(k, cands) or (f"the pattern's params are {', '.join(sorted(declared_names))}" if declared_names else "the pattern declares no `param`"),
                                      filename=filename, source=text))
    warnings = list(el.warnings)
    return ParseResult(pattern=pattern, warnings=warnings, source=text, filename=filename, params=declared)
