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
  spaces after the code, and a statement's trailing comment stays at the end of the
  statement. A comment *inside* an expression stays on the line of the code it followed:
  every node around it is laid out broken at its *gaps* (a chain one operand per line with
  the operator first, a group as ``(`` / body / ``)``, a call or list one item per line), and
  the comment ends the line of the operand, ``(`` or item before it (a comment after an
  operator goes with the operand before the operator); own-line comments stay on their own
  line there. A commented group first (or last) in a chain hugs a short comment-free rest:
  ``(\n    a  # c\n    | b\n) & causal``. Only a comment where no layout has a line break
  (in ``let x =`` / ``def f(...) =`` heads, after a prefix operator, between a name and its
  ``(`` or ``=``, inside ``f()``) moves to its own line just before the statement, and a
  second comment after code in the same gap (``f(x  # a\n, # b\n y)``) goes on its own line.
  Statements without inner comments are laid out as if there were none.
* score terms: `` with t1, t2`` ends the final expression's last line (on a line of its own,
  indented, when it does not fit), each term with parentheses (``alibi()``); a comment
  among the terms moves to its own line before the statement.

``format_source(format_source(x)) == format_source(x)``, and the result parses to the same
pattern (tests/test_fmt.py checks both on every example and golden input).
"""

from __future__ import annotations

import sys

from lark import Token, Tree

from ..errors import normalize_newlines
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
    text = normalize_newlines(text)
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
        # the source with every comment blanked out (the same offsets), to find brackets
        code = list(text)
        for c in comments:
            code[c.start_pos:c.end_pos] = " " * (c.end_pos - c.start_pos)
        self.code = "".join(code)

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
        else:  # final_expr, maybe with score terms
            head, expr = "", it.children[0]
        terms = it.children[1] if kind == "final_expr" and len(it.children) > 1 else None
        expr = _parenthesise(expr)
        end = span_of(it).end
        trailing = [c for c in comments if c.start_pos >= end]
        self.gaps: dict[tuple[int, int], list[Token]] = {}
        self.hot: set[int] = set()
        before = []  # comments that no line break of the layout can carry: before the statement
        start = span_of(expr).start
        for c in comments:
            if c.start_pos < end and not (c.start_pos > start and self._place(expr, c)):
                before.append(_comment_text(c))
        if id(expr) in self.hot:
            body = self.lay(expr, 0, len(head))
            body[0] = (head + body[0][0], body[0][1])
            body = [code + ("  " + note if note else "") for code, note in body]
        else:
            body = (head + self.expr(expr, 0, len(head))).split("\n")
        if terms is not None:  # `with t1, t2` after the expression, or on its own line when long
            tail = "with " + ", ".join(self.term(t) for t in terms.children)
            if len(body[-1]) + 1 + len(tail) <= WIDTH and "#" not in body[-1]:
                body[-1] += " " + tail
            else:
                body.append(" " * INDENT + tail)
        if trailing:
            body[-1] += "  " + "  ".join(_comment_text(c) for c in trailing)
        return before + body

    def term(self, t: Tree) -> str:
        """A score term, always with parentheses (``alibi()``), arguments as written."""
        args = ", ".join(self.flat(a) for a in t.children[1].children) if len(t.children) > 1 else ""
        return f"{t.children[0]}({args})"

    # ---- comments inside an expression --------------------------------------------------------------
    # A comment inside an expression belongs to a *gap* of the innermost node around it: between
    # two operands of a chain, after the opening bracket, between two arguments or list items,
    # before the closing bracket. Every node on the way down is "hot": laid out broken, so that
    # the gap becomes a line break and the comment stays on the line of the code it followed.

    def _place(self, node, c: Token) -> bool:
        """Record ``c`` in the gap of ``node`` (or a descendant) it lies in; False when that
        place has no line break in any layout (after a prefix operator, between a name and
        its ``(`` or ``=``, inside an empty call)."""
        pos = c.start_pos
        if not isinstance(node, Tree):
            return False
        d, kids = node.data, node.children
        items = self._items(node)
        if items is None:  # a leaf, an argument or a prefix: only its last child can break
            s = span_of(kids[-1])
            if d in ("pos_arg", "kw_arg", "prefix") and s.start <= pos < s.end and self._place(kids[-1], c):
                self.hot.add(id(node))
                return True
            return False
        for it in items:
            s = span_of(it)
            if s.start <= pos < s.end:
                if not self._place(it, c):
                    return False
                self.hot.add(id(node))
                return True
        gap = sum(1 for it in items if span_of(it).end <= pos)
        if d in ("call", "int_list", "paren"):
            if not items:
                return False
            opener = self.code.index("(" if d != "int_list" else "[", node.meta.start_pos)
            if pos < opener:
                return False
        self.gaps.setdefault((id(node), gap), []).append(c)
        self.hot.add(id(node))
        return True

    @staticmethod
    def _items(node):
        """The children of ``node`` that gaps separate, or None for a node without gaps."""
        if not isinstance(node, Tree):
            return None
        d, kids = node.data, node.children
        if d in _CHAINS or d == "int_list":
            return kids
        if d in _OP_CHAINS:
            return kids[::2]
        if d == "paren":
            return kids[:1]
        if d == "call":
            return kids[1].children if len(kids) > 1 else []
        return None

    def _own_line(self, c: Token) -> bool:
        return not self.lines[c.line - 1][: c.column - 1].strip()

    def _gap(self, node, k: int, lines: list, indent: int) -> None:
        """Append the comments of gap ``k`` of ``node``: the first at the end of the last line
        when it followed code in the source, the others on their own lines at ``indent``."""
        for n, c in enumerate(self.gaps.get((id(node), k), [])):
            if n == 0 and not self._own_line(c) and lines and lines[-1][1] is None:
                lines[-1] = (lines[-1][0], _comment_text(c))
            else:
                lines.append((" " * indent + _comment_text(c), None))

    def sub(self, node, indent: int, col: int) -> list[tuple[str, str | None]]:
        """``node`` as (code, comment) lines: the first line starts at ``col`` (no indent)."""
        if id(node) in self.hot:
            return self.lay(node, indent, col)
        return [(line, None) for line in self.expr(node, indent, col).split("\n")]

    def lay(self, node, indent: int, col: int) -> list[tuple[str, str | None]]:
        """A hot ``node`` broken at its gaps, each comment kept on the line it followed. Its
        last line never carries a comment (the gaps are all inside it)."""
        d, kids = node.data, node.children
        if d == "pos_arg":
            return self.sub(kids[0], indent, col)
        if d == "prefix":
            ops = "".join(str(t) for t in kids[:-1])
            out = self.sub(kids[-1], indent, col + len(ops))
            out[0] = (ops + out[0][0], out[0][1])
            return out
        if d in _CHAINS or d in _OP_CHAINS:
            return self.lay_chain(node, indent, col)
        inner = indent + INDENT
        if d == "paren":
            out = [("(", None)]
            self._gap(node, 0, out, inner)
            body = self.sub(kids[0], inner, inner)
            out += [(" " * inner + body[0][0], body[0][1])] + body[1:]
            self._gap(node, 1, out, inner)
            return out + [(" " * indent + ")", None)]
        # call or int_list: one item per line, each followed by a comma
        if d == "call":
            opener, items, closer = f"{kids[0]}(", kids[1].children, ")"
        else:
            opener, items, closer = "[", kids, "]"
        out = [(opener, None)]
        self._gap(node, 0, out, inner)
        for k, a in enumerate(items):
            pre = f"{a.children[0]}=" if a.data == "kw_arg" else ""
            value = a.children[-1] if a.data in ("kw_arg", "pos_arg") else a
            body = self.sub(value, inner, inner + len(pre))
            body[-1] = (body[-1][0] + ",", body[-1][1])
            out += [(" " * inner + pre + body[0][0], body[0][1])] + body[1:]
            self._gap(node, k + 1, out, inner)
        return out + [(" " * indent + closer, None)]

    def lay_chain(self, node, indent: int, col: int) -> list[tuple[str, str | None]]:
        """A hot chain: one operand per line, the operator first (as ``expr`` breaks a long
        chain), or a hot bracketed first (last) operand hugging a short comment-free rest
        (start), as in ``(\n    a  # c\n    | b\n) & causal``."""
        d, kids = node.data, node.children
        if d in _CHAINS:
            ops, operands = [_CHAINS[d]] * (len(kids) - 1), kids
        else:
            ops, operands = [str(t) for t in kids[1::2]], kids[::2]
        quiet = not any((id(node), k) in self.gaps for k in range(1, len(operands)))
        hot = [id(o) in self.hot for o in operands]
        if quiet and hot[0] and not any(hot[1:]) and _bracketed(operands[0]):
            rest = "".join(f" {op} {self.flat(o)}" for op, o in zip(ops, operands[1:]))
            out = self.sub(operands[0], indent, col)
            if len(rest) <= WIDTH // 3 and len(out[-1][0]) + len(rest) <= WIDTH:
                out[-1] = (out[-1][0] + rest, None)
                return out
        if quiet and hot[-1] and not any(hot[:-1]) and _bracketed(operands[-1]):
            start = "".join(f"{self.flat(o)} {op} " for o, op in zip(operands, ops))
            if len(start) <= WIDTH // 3 and col + len(start) < WIDTH:
                out = self.sub(operands[-1], indent, col + len(start))
                out[0] = (start + out[0][0], out[0][1])
                return out
        cont = indent if col == indent and indent > 0 else indent + INDENT
        out = self.sub(operands[0], cont, col)
        for k in range(1, len(operands)):
            self._gap(node, k, out, cont)
            prefix = " " * cont + ops[k - 1] + " "
            body = self.sub(operands[k], cont, len(prefix))
            out += [(prefix + body[0][0], body[0][1])] + body[1:]
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


def _bracketed(node) -> bool:
    """Whether ``node`` (behind prefix operators) is a call, list or parenthesis."""
    while isinstance(node, Tree) and node.data == "prefix":
        node = node.children[-1]
    return isinstance(node, Tree) and node.data in ("call", "int_list", "paren")


def _comment_text(tok: Token) -> str:
    return str(tok).rstrip()


def _last_code_line(span) -> int:
    """The line of the last character of ``span`` (its end is exclusive)."""
    if span.end_column == 1 and span.end_line > span.line:  # ends just after a newline
        return span.end_line - 1
    return span.end_line
