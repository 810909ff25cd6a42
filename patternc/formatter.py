"""``patternc fmt``: the canonical layout of a ``.pattern`` source, comments kept.

This is a layout of the *surface syntax* (``param`` / ``let`` / ``def`` and the user's
names stay), not the canonical IR that ``str(pattern)`` prints. The rules:

* one statement per line, statements in their order; a run of blank lines becomes one
  blank line, blank lines at the start and end are dropped; the file ends with one newline;
* canonical spacing: ``a | b``, ``a & b``, ``a - b``, ``2 * s + 1``, ``~p``, ``-n``,
  ``name(x, k=v)``, ``[0, 64]``, ``param w = 128``, ``def f(a, b=2) = ...``;
* ``&`` inside ``|`` is parenthesised (``a | b & c`` -> ``a | (b & c)``: the same meaning,
  without warning W001); every other parenthesis is kept as written; integer literals keep
  their spelling (``1_024``);
* a statement longer than ``WIDTH`` columns is broken before its top-level ``|`` / ``&`` /
  ``+`` / ``-`` operators (continuation lines indented by ``INDENT`` and starting with the
  operator, which the parser joins to the line before); a call or list that still does not
  fit puts one argument per line;
* comments: an own-line comment stays on its own line before the statement that follows it
  (or at the end of the file); a comment after code stays at the end of that line, two
  spaces after the code. When a statement whose top-level expression is a chain
  (``a | b | c``) has comments on inner lines, each operand gets its own line and keeps the
  comment of the line it ended on; any other comment inside a multi-line statement moves
  to its own line just before the statement.

``format_source(format_source(x)) == format_source(x)``, and the result parses to the same
pattern (tests/test_fmt.py checks both on every example and golden input).
"""

from __future__ import annotations

import sys

from lark import Token, Tree

from .parser import parse_tree_with_comments, span_of

WIDTH = 100  # columns
INDENT = 4  # spaces per continuation level

_CHAINS = {"or_expr": "|", "and_expr": "&"}  # operands only (the operator tokens are filtered)
_OP_CHAINS = {"sum_expr", "product"}  # operand, op token, operand, ...


def format_source(text: str, filename: str = "<string>") -> str:
    """The canonical layout of ``text``.

    Args:
        text: a pattern source (a ``.pattern`` file's text or one expression).
        filename: shown in diagnostics.

    Returns:
        The formatted source, ending with a newline.

    Raises:
        PatternError: the source has a syntax error (P1xx); names, types and ranges are not
            checked (``fmt`` formats what parses, like any code formatter).

    Example:
        >>> print(format_source("param w=128 # window\\nlocal( w = w )|strided(64)&causal"), end="")
        param w = 128  # window
        local(w=w) | (strided(64) & causal)
    """
    text = text.replace("\r\n", "\n").replace("\r", "\n")
    if text.startswith("\ufeff"):
        text = text[1:]
    tree, comments = parse_tree_with_comments(text, filename)
    old = sys.getrecursionlimit()
    sys.setrecursionlimit(max(old, 20000))
    try:
        return _Formatter(text, comments).run(tree)
    finally:
        sys.setrecursionlimit(old)


class _Formatter:
    def __init__(self, text: str, comments: list[Token]):
        self.lines = text.split("\n")
        self.comments = comments

    # ---- statements and comments ----------------------------------------------------------------
    def run(self, tree: Tree) -> str:
        items = [it for it in tree.children if isinstance(it, Tree)]
        ranges = []
        for it in items:
            s = span_of(it)
            ranges.append((s.line, _last_code_line(s)))
        # comments inside a statement's lines belong to it; others stand alone
        attached: dict[int, list[Token]] = {k: [] for k in range(len(items))}
        elements = []  # (line, kind, payload)
        k = 0
        for c in self.comments:
            while k < len(ranges) and ranges[k][1] < c.line:
                k += 1
            if k < len(ranges) and ranges[k][0] <= c.line <= ranges[k][1]:
                attached[k].append(c)
            else:
                elements.append((c.line, c.line, "comment", c))
        for idx, it in enumerate(items):
            elements.append((ranges[idx][0], ranges[idx][1], "stmt", (it, attached[idx])))
        elements.sort(key=lambda e: (e[0], 0 if e[2] == "comment" else 1))

        out: list[str] = []
        prev_end = None
        for start, end, kind, payload in elements:
            if prev_end is not None and self._blank_between(prev_end, start):
                out.append("")
            if kind == "comment":
                out.append(_comment_text(payload))
            else:
                out.extend(self.statement(*payload))
            prev_end = end
        return "\n".join(out) + "\n"

    def _blank_between(self, a: int, b: int) -> bool:
        return any(not self.lines[n - 1].strip() for n in range(a + 1, b) if 0 < n <= len(self.lines))

    def statement(self, it: Tree, comments: list[Token]) -> list[str]:
        kind = it.data
        if kind == "param_stmt":
            head, expr = f"param {it.children[0]} = ", it.children[1]
        elif kind == "let_stmt":
            head, expr = f"let {it.children[0]} = ", it.children[1]
        elif kind == "def_stmt":
            params = ""
            if len(it.children) == 3:
                params = ", ".join(self.def_param(dp) for dp in it.children[1].children)
            head, expr = f"def {it.children[0]}({params}) = ", it.children[-1]
        else:  # final_expr
            head, expr = "", it.children[0]
        expr = _parenthesise(expr)
        last_line = _last_code_line(span_of(it))
        trailing = [c for c in comments if c.line == last_line]
        inner = [c for c in comments if c.line != last_line]
        if inner and isinstance(expr, Tree) and expr.data in _CHAINS:
            out = self.chain_with_comments(head, expr, comments)
            if out is not None:
                return out
        before = [_comment_text(c) for c in inner]
        body = (head + self.expr(expr, 0, len(head))).split("\n")
        if trailing:
            body[-1] += "  " + "  ".join(_comment_text(c) for c in trailing)
        return before + body

    def chain_with_comments(self, head: str, expr: Tree, comments: list[Token]) -> list[str] | None:
        """One operand per line. A comment after code stays at the end of the operand line it
        followed; a comment on its own line (or inside a multi-line operand) goes on its own
        line before the operand that follows it."""
        op = _CHAINS[expr.data]
        operands = expr.children
        ends = [_last_code_line(span_of(o)) for o in operands]
        leading: list[list[Token]] = [[] for _ in operands]
        trailing: list[list[Token]] = [[] for _ in operands]
        for c in comments:
            k = 0
            while k < len(operands) - 1 and ends[k] < c.line:
                k += 1
            own_line = not self.lines[c.line - 1][: c.column - 1].strip()
            (trailing if c.line == ends[k] and not own_line else leading)[k].append(c)
        if not any(leading[1:]) and not any(trailing[:-1]):
            return None  # every comment goes before the statement or after it: the usual layout
        out = [_comment_text(c) for c in leading[0]]
        for k, o in enumerate(operands):
            if k == 0:
                line = head + self.expr(o, 0, len(head))
            else:
                out += [" " * INDENT + _comment_text(c) for c in leading[k]]
                prefix = " " * INDENT + op + " "
                line = prefix + self.expr(o, INDENT, len(prefix))
            lines = line.split("\n")
            if trailing[k]:
                lines[-1] += "  " + "  ".join(_comment_text(c) for c in trailing[k])
            out += lines
        return out

    def def_param(self, dp: Tree) -> str:
        name = str(dp.children[0])
        return f"{name}={self.flat(dp.children[1])}" if len(dp.children) > 1 else name

    # ---- expressions ------------------------------------------------------------------------------
    def flat(self, node) -> str:
        if isinstance(node, Token):
            return str(node)
        d, kids = node.data, node.children
        if d in _CHAINS:
            return f" {_CHAINS[d]} ".join(self.flat(c) for c in kids)
        if d in _OP_CHAINS:
            return " ".join(str(c) if isinstance(c, Token) else self.flat(c) for c in kids)
        if d == "prefix":
            return "".join(str(t) for t in kids[:-1]) + self.flat(kids[-1])
        if d in ("int_lit", "name"):
            return str(kids[0])
        if d == "call":
            args = ", ".join(self.flat(a) for a in kids[1].children) if len(kids) > 1 else ""
            return f"{kids[0]}({args})"
        if d == "pos_arg":
            return self.flat(kids[0])
        if d == "kw_arg":
            return f"{kids[0]}={self.flat(kids[1])}"
        if d == "paren":
            return f"({self.flat(kids[0])})"
        if d == "int_list":
            return "[" + ", ".join(self.flat(c) for c in kids) + "]"
        raise AssertionError(f"unexpected syntax node {d}")  # pragma: no cover

    def expr(self, node, indent: int, col: int) -> str:
        """``node`` laid out from column ``col``; continuation lines indented from ``indent``."""
        text = self.flat(node)
        if col + len(text) <= WIDTH or isinstance(node, Token):
            return text
        d, kids = node.data, node.children
        if d in _CHAINS or d in _OP_CHAINS:
            if d in _CHAINS:
                parts = [(None, kids[0])] + [(_CHAINS[d], c) for c in kids[1:]]
            else:
                parts = [(None, kids[0])] + [(str(kids[i]), kids[i + 1]) for i in range(1, len(kids), 2)]
            rest = "".join(f" {op} {self.flat(c)}" for op, c in parts[1:])
            # "hug": break the brackets of the first operand and keep a short tail after them,
            # e.g. `heads(\n    ...,\n) & causal`
            if len(rest) <= WIDTH // 3:
                hugged = self.broken(parts[0][1], indent, col)
                if hugged is not None and len(hugged.rsplit("\n", 1)[-1]) + len(rest) <= WIDTH:
                    return hugged + rest
            # one operand per line, the operator first (the parser joins such lines)
            cont = indent if col == indent and indent > 0 else indent + INDENT
            out = self.expr(parts[0][1], cont, col)
            for op, c in parts[1:]:
                prefix = f"{op} "
                out += "\n" + " " * cont + prefix + self.expr(c, cont, cont + len(prefix))
            return out
        return self.broken(node, indent, col) or text

    def broken(self, node, indent: int, col: int) -> str | None:
        """The bracketed ``node`` (a call, list or parenthesis, maybe behind prefix operators)
        with one item per line, or None when it has no brackets to break."""
        if not isinstance(node, Tree):
            return None
        d, kids = node.data, node.children
        inner = indent + INDENT
        if d == "prefix":
            ops = "".join(str(t) for t in kids[:-1])
            sub = self.broken(kids[-1], indent, col + len(ops))
            return None if sub is None else ops + sub
        if d == "paren":
            return "(\n" + " " * inner + self.expr(kids[0], inner, inner) + "\n" + " " * indent + ")"
        if d not in ("call", "int_list"):
            return None
        if d == "call":
            opener, items, closer = f"{kids[0]}(", (kids[1].children if len(kids) > 1 else []), ")"
        else:
            opener, items, closer = "[", kids, "]"
        if not items:
            return None
        lines = [opener]
        for a in items:
            if a.data == "kw_arg":
                pre = f"{a.children[0]}="
                body = pre + self.expr(a.children[1], inner, inner + len(pre))
            elif a.data == "pos_arg":
                body = self.expr(a.children[0], inner, inner)
            else:
                body = self.expr(a, inner, inner)
            lines.append(" " * inner + body + ",")
        lines.append(" " * indent + closer)
        return "\n".join(lines)


def _parenthesise(node):
    """Wrap every ``&`` chain that is a direct operand of a ``|`` chain in parentheses."""
    if not isinstance(node, Tree):
        return node
    kids = [_parenthesise(c) for c in node.children]
    if node.data == "or_expr":
        kids = [Tree("paren", [c], meta=c.meta) if isinstance(c, Tree) and c.data == "and_expr" else c for c in kids]
    return Tree(node.data, kids, meta=node.meta)


def _comment_text(tok: Token) -> str:
    return str(tok).rstrip()


def _last_code_line(span) -> int:
    """The line of the last character of ``span`` (its end is exclusive)."""
    if span.end_column == 1 and span.end_line > span.line:  # ends just after a newline
        return span.end_line - 1
    return span.end_line
