"""Stage 1: source text -> Lark tree (``grammars/patternc.lark``), with syntax diagnostics.

``parse_tree(text, filename)`` returns the Lark tree or raises ``PatternError`` (P1xx).
The elaborator (``patternc.elaborate``) turns the tree into the IR.

Newlines end statements, except inside brackets, after a binary operator, ``=`` or ``,``,
or before a line that starts with ``|``, ``&``, ``+``, ``-``, ``*``, ``//``, ``%``, ``=``,
``,``, ``with`` or a closing bracket (``LineJoiner``), so long expressions can be broken over lines
naturally.

``parse_tree_with_comments`` also returns the comments (for ``patternc fmt``). Syntax errors
are labelled by ``SYNTAX_EXAMPLES`` (Lark's ``match_examples``) plus bracket matching and the
end-of-input cases; the codes are listed in ``docs/diagnostics.md``.
"""

from __future__ import annotations

import functools
from importlib import resources
from pathlib import Path

from lark import Lark, Token, Tree
from lark.exceptions import UnexpectedCharacters, UnexpectedEOF, UnexpectedInput

from ..errors import Diagnostic, PatternError, Span, normalize_newlines

MAX_SOURCE_BYTES = 1 << 20  # 1 MiB: patterns are small; this bounds time and memory
MAX_NESTING = 100  # brackets / calls / parentheses deep


def _grammar_dir() -> Path:
    """The folder holding ``patternc.lark`` and ``prelude.pattern``: inside the installed
    package (the wheel force-includes ``grammars/`` as ``patternc/grammars``) or, in a source
    checkout, the top-level ``grammars/`` folder."""
    try:
        pkg = resources.files("patternc") / "grammars"
        if pkg.is_dir() and (pkg / "patternc.lark").is_file():
            return Path(str(pkg))
    except (ModuleNotFoundError, TypeError):  # pragma: no cover
        pass
    return Path(__file__).resolve().parents[2] / "grammars"


def grammar_path() -> Path:
    return _grammar_dir() / "patternc.lark"


def prelude_path() -> Path:
    return _grammar_dir() / "prelude.pattern"


_JOIN_AFTER = {"_OR", "_AND", "PLUS", "MINUS", "MUL_OP", "TILDE", "EQUAL", "COMMA", "LPAR", "LSQB", "_WITH"}
_JOIN_BEFORE = {"_OR", "_AND", "PLUS", "MINUS", "MUL_OP", "RPAR", "RSQB", "COMMA", "EQUAL", "_WITH"}
_OPEN = {"LPAR": "RPAR", "LSQB": "RSQB"}
_CLOSE = {"RPAR", "RSQB"}


class LineJoiner:
    """Lark post-lexer: drops newlines that do not end a statement (see module docstring)."""

    always_accept = ("_NL",)

    def process(self, stream):
        depth = 0
        prev = None
        pending = None
        for tok in stream:
            t = tok.type
            if t == "_NL":
                if depth > 0 or prev is None or prev in _JOIN_AFTER:
                    continue
                if pending is None:
                    pending = tok
                continue
            if pending is not None:
                if t not in _JOIN_BEFORE:
                    yield pending
                pending = None
            if t in _OPEN:
                depth += 1
            elif t in _CLOSE and depth > 0:
                depth -= 1
            prev = t
            yield tok


def _build_parser(**extra) -> Lark:
    return Lark(
        grammar_path().read_text(encoding="utf-8"),
        parser="lalr",
        lexer="basic",
        postlex=LineJoiner(),
        propagate_positions=True,
        maybe_placeholders=False,
        **extra,
    )


@functools.lru_cache(maxsize=1)
def get_parser() -> Lark:
    return _build_parser()


class _CommentSink:
    """Collects the COMMENT tokens the lexer skips (``lexer_callbacks``), for ``fmt``."""

    def __init__(self):
        self.tokens: list[Token] | None = None

    def __call__(self, tok: Token) -> Token:
        if self.tokens is not None:
            self.tokens.append(tok)
        return tok


_COMMENTS = _CommentSink()


@functools.lru_cache(maxsize=1)
def get_comment_parser() -> Lark:
    """Like ``get_parser``, but the lexer hands every comment to ``_COMMENTS``."""
    return _build_parser(lexer_callbacks={"COMMENT": _COMMENTS})


# --- syntax error labelling -----------------------------------------------------------------
# The table Lark's ``match_examples`` uses to label syntax errors by parser state. It is also
# the error-message test: tests/test_diagnostics.py checks that every example is labelled
# with its code, both by ``match_examples`` alone and by the whole ``parse_tree``.
# Errors at the end of the input (P103) and bracket errors (P102) are recognised before the
# table is consulted, so their examples only go through ``parse_tree``.
SYNTAX_EXAMPLES: dict[str, list[str]] = {
    "P102": ["local(w=1", "(causal & local(w=3)", "global(at=[1, 2)", "causal)", "local(w=1]"],
    "P103": ["causal &", "local(w=1) |", "causal -", "~", "let x =", "param w =", "causal & ~",
             "def f(x) =", "local(w=1) &\n"],
    "P104": ["local(w=1) causal", "causal causal", "local(1) 3", "(causal) (causal)", "local w=3",
             "param w = 3 4", "let x = causal\nx x"],
    "P109": ["local(w=1) & & causal", "causal | | all", "causal & | all", "(| causal)", "local(,)",
             "local(w=)", "causal &\nlet x = causal", "local(=3)", "param w == 3", "causal || all"],
    "P110": ["let = causal", "param = 3", "def (x) = x", "let 3 = causal", "def f(3) = x", "let\nx = 3\nx"],
    "P112": ["let x causal", "let x local(w=1)", "param w 3", "def f = causal", "def f(x) causal",
             "def f(x, y) x", "let x", "def f"],
}

SYNTAX_MESSAGES = {
    "P103": "the input ends in the middle of an expression",
    "P104": "expected an operator or the end of the statement",
    "P109": "expected an operand",
    "P110": "expected a name",
    "P112": "this statement is incomplete",
    "P113": "unexpected input",
}

SYNTAX_HELPS = {
    "P104": "join the two parts with an operator (`|`, `&`, `-`), or start a new statement on a new line "
            "(a source ends with exactly one pattern expression)",
    "P109": "put a pattern or an integer here",
    "P110": "names start with a letter or `_`: e.g. `let window = local(w=128)`",
    "P112": "statements are `param NAME = INT`, `let NAME = EXPR` and `def NAME(PARAMS) = EXPR`",
}

TERMINAL_NAMES = {
    "NAME": "a name", "INT": "an integer", "LPAR": "`(`", "RPAR": "`)`", "LSQB": "`[`",
    "RSQB": "`]`", "COMMA": "`,`", "EQUAL": "`=`", "_OR": "`|`", "_AND": "`&`", "PLUS": "`+`",
    "MINUS": "`-`", "MUL_OP": "`*`, `//` or `%`", "TILDE": "`~`", "_NL": "a new line",
    "$END": "the end of the input", "PARAM": "`param`", "LET": "`let`", "DEF": "`def`", "_WITH": "`with`",
}

_STATEMENT_PUNCT = {"EQUAL", "LPAR"}  # what a half-written `let x` / `def f` waits for


def _expected_text(expected) -> str:
    names = sorted({TERMINAL_NAMES.get(e, f"`{e}`") for e in expected if e != "_NL"})
    if len(names) > 6:
        return "an expression or operator"
    if len(names) <= 1:
        return "".join(names) or "something else"
    return ", ".join(names[:-1]) + " or " + names[-1]


def _point_span(text: str, pos: int, width: int = 1) -> Span:
    pos = max(0, min(pos, len(text)))
    line = text.count("\n", 0, pos) + 1
    col = pos - (text.rfind("\n", 0, pos) + 1) + 1
    return Span(pos, pos + width, line, col, line, col + width)


def _end_span(text: str) -> Span:
    """Span just after the last non-blank character outside a trailing comment."""
    end = len(text)
    while True:
        stripped = text[:end].rstrip()
        line_start = stripped.rfind("\n") + 1
        hash_at = _comment_start(stripped[line_start:])
        if hash_at is None:
            return _point_span(text, len(stripped))
        end = line_start + hash_at


def _comment_start(line: str) -> int | None:
    i = line.find("#")
    return i if i >= 0 else None


def _brackets(text: str):
    """Lex ``text`` (best effort) and return (stack of unclosed openers, first mismatch)."""
    stack = []
    try:
        for tok in get_parser().lex(text, dont_ignore=False):
            if tok.type in _OPEN:
                stack.append(tok)
            elif tok.type in _CLOSE:
                if not stack:
                    return stack, (None, tok)
                if _OPEN[stack[-1].type] != tok.type:
                    return stack, (stack[-1], tok)
                stack.pop()
    except UnexpectedInput:
        pass
    return stack, None


def _unclosed(text: str):
    """The innermost unclosed bracket token, if any (lexing only)."""
    stack, _ = _brackets(text)
    return stack[-1] if stack else None


def _label(err: UnexpectedInput) -> str | None:
    """The code of the SYNTAX_EXAMPLES entry that fails in the same parser state, or None.
    (P102 is left out: bracket errors are found by matching brackets, not by state.)"""
    table = {k: v for k, v in SYNTAX_EXAMPLES.items() if k != "P102"}
    try:
        return err.match_examples(get_parser().parse, table, use_accepts=True)
    except Exception:  # labelling is best-effort; the heuristics below always answer
        return None


def syntax_diagnostic(err: UnexpectedInput, text: str, filename: str) -> Diagnostic:
    """The P1xx diagnostic for a Lark parse error in ``text``."""
    def diag(code, msg, span, help):
        return Diagnostic(code, msg, span, help, filename=filename, source=text)

    if isinstance(err, UnexpectedCharacters):
        ch = text[err.pos_in_stream] if err.pos_in_stream < len(text) else ""
        extra = {
            "!": "; `!` is written `~` (not)", "^": "; `^` has no meaning here: use `|` (or) or `&` (and)",
            "/": "; `/` is written `//` (integer division)", ";": "; statements are separated by new lines, not `;`",
            '"': "; there are no strings: names and integers are written bare",
            "'": "; there are no strings: names and integers are written bare",
            ".": "; numbers are integers (a length in tokens)", ":": "; a keyword argument is written `name=value`",
        }.get(ch, "")
        if not extra and ch.isalpha():
            extra = "; names use ASCII letters, digits and `_`"
        return diag("P101", f"unexpected character `{ch}`", _point_span(text, err.pos_in_stream),
                    "patterns use names, integers, ( ) [ ] , = and the operators | & - ~ + * // %" + extra)
    tok = getattr(err, "token", None)
    at_end = isinstance(err, UnexpectedEOF) or (tok is not None and tok.type == "$END")
    expected = set(getattr(err, "expected", None) or getattr(err, "accepts", None) or set())
    if expected and expected - {"_NL"} <= _STATEMENT_PUNCT:
        want = _expected_text(expected)
        shown = "the end of the input" if at_end else ("a new line" if tok.type == "_NL" else f"`{tok.value}`")
        span = _end_span(text) if at_end else _point_span(text, tok.start_pos, max(1, len(str(tok.value))))
        help_ = ("a `def` needs a parameter list, even an empty one: e.g. `def window() = local(w=128)`"
                 if expected - {"_NL"} == {"LPAR"} else SYNTAX_HELPS["P112"])
        return diag("P112", f"{SYNTAX_MESSAGES['P112']}: expected {want}, found {shown}", span, help_)
    if at_end:
        opener = _unclosed(text)
        if opener is not None:
            closer = ")" if opener.type == "LPAR" else "]"
            return diag("P102", f"unclosed `{opener.value}`", _point_span(text, opener.start_pos),
                        f"add the matching `{closer}` at the end of the expression")
        if not text.strip() or all(not ln.strip() or ln.strip().startswith("#") for ln in text.split("\n")):
            return empty_source_diagnostic(text, filename)
        return diag("P103", SYNTAX_MESSAGES["P103"] + f": expected {_expected_text(expected)}",
                    _end_span(text), "complete the expression, e.g. `causal & local(w=128)`")
    assert tok is not None
    span = _point_span(text, tok.start_pos, max(1, len(str(tok.value))))
    shown = "a new line" if tok.type == "_NL" else f"`{tok.value}`"
    if tok.type in _CLOSE:
        _stack, bad = _brackets(text[: tok.end_pos])
        if bad is not None and bad[1].start_pos == tok.start_pos:
            opener = bad[0]
            if opener is None:
                return diag("P102", f"unmatched `{tok.value}`", span, "remove it, or add the opening bracket it closes")
            want = ")" if opener.type == "LPAR" else "]"
            return diag("P102", f"`{tok.value}` does not match the `{opener.value}` opened at line {opener.line}, "
                        f"column {opener.column}", span, f"close it with `{want}`")
    if tok.type == "_WITH":
        return diag("P113", "unexpected `with`: score terms follow only the final pattern expression", span,
                    "write `with softcap(...)` / `with alibi(...)` once, after the source's last expression "
                    "(not inside `let`, `def`, `param` or brackets)")
    label = _label(err)
    if label is None:  # a parser state no example covers: say what was expected
        return diag("P113", f"unexpected {shown}: expected {_expected_text(expected)}", span,
                    "see docs/language.md for the syntax")
    if tok.type == "_NL" and label not in ("P110", "P112"):
        return diag("P103", f"the line ends in the middle of an expression: expected {_expected_text(expected)}",
                    _point_span(text, tok.start_pos), "complete the expression on this line, or break the line after an operator")
    if label == "P103":  # the operand is missing, but the input goes on
        label = "P109"
    help_ = SYNTAX_HELPS.get(label, f"expected {_expected_text(expected)}")
    if label == "P109":
        before = text[: tok.start_pos].rstrip()
        if tok.type in ("_AND", "_OR") and before.endswith(str(tok.value)):
            help_ = f"`{tok.value}{tok.value}` is written `{tok.value}`"
        elif tok.type == "EQUAL" and before.endswith("="):
            help_ = "`==` is not an operator: `=` only appears in `param`, `let`, `def` and keyword arguments"
        elif tok.type in ("PARAM", "LET", "DEF"):
            help_ = "the expression on the line above is unfinished: complete it before the next statement"
    msg = SYNTAX_MESSAGES.get(label, "unexpected input")
    return diag(label, f"{msg}, found {shown}", span, help_)


def empty_source_diagnostic(text: str, filename: str) -> Diagnostic:
    return Diagnostic("P105", "no pattern: the source is empty (only blanks or comments)", None,
                      "write a pattern expression, e.g. `local(w=128) & causal`", filename=filename, source=text)


def too_large_diagnostic(size: int, filename: str) -> Diagnostic:
    """P107 for a source of ``size`` characters (or bytes) over MAX_SOURCE_BYTES."""
    return Diagnostic(
        "P107", f"the source is too large ({size / 2**20:.1f} MiB; the limit is {MAX_SOURCE_BYTES >> 20} MiB)",
        None, "patterns are small: use `param`, `let` and `def` instead of spelling the pattern out",
        filename=filename)


def decode_source(data: bytes, filename: str) -> str:
    """Decode UTF-8 (BOM allowed) or raise P108 pointing at the first bad byte."""
    try:
        text = data.decode("utf-8-sig")
    except UnicodeDecodeError as e:
        good = data[: e.start].decode("utf-8", errors="replace")
        line = good.count("\n") + 1
        col = e.start - (data.rfind(b"\n", 0, e.start) + 1) + 1
        shown = good.split("\n")[-1] + "\ufffd"
        span = Span(e.start, e.start + 1, line, col, line, col + 1)
        raise PatternError(Diagnostic("P108", f"the source is not valid UTF-8 (byte 0x{data[e.start]:02x})", span,
                                      "save the file as UTF-8", filename=filename,
                                      source="\n" * (line - 1) + shown)) from None
    return text


def parse_tree(text: str, filename: str = "<string>") -> Tree:
    """Parse source text into a Lark tree.

    Raises:
        PatternError: P101-P113 syntax errors, P106 too deep, P107 too large.
    """
    return _parse(text, filename, get_parser())


def parse_tree_with_comments(text: str, filename: str = "<string>") -> tuple[Tree, list[Token]]:
    """``parse_tree`` that also returns the comments (COMMENT tokens, in source order).

    Raises:
        PatternError: as ``parse_tree``.
    """
    comments: list[Token] = []
    _COMMENTS.tokens = comments
    try:
        tree = _parse(text, filename, get_comment_parser())
    finally:
        _COMMENTS.tokens = None
    return tree, comments


def _parse(text: str, filename: str, parser: Lark) -> Tree:
    text = normalize_newlines(text)
    if len(text) > MAX_SOURCE_BYTES:
        raise PatternError(too_large_diagnostic(len(text), filename))
    try:
        tree = parser.parse(text)
    except UnexpectedInput as e:
        raise PatternError(syntax_diagnostic(e, text, filename)) from None
    _check_depth(tree, text, filename)
    return tree


_NESTING_NODES = {"paren", "call", "int_list", "prefix"}


def _check_depth(tree: Tree, text: str, filename: str) -> None:
    stack = [(tree, 0)]
    while stack:
        node, depth = stack.pop()
        if not isinstance(node, Tree):
            continue
        if node.data in _NESTING_NODES:
            # each prefix operator of ``~~~p`` is one level of nesting
            depth += len(node.children) - 1 if node.data == "prefix" else 1
            if depth > MAX_NESTING:
                m = node.meta
                span = Span(m.start_pos, m.start_pos + 1, m.line, m.column, m.line, m.column + 1)
                raise PatternError(Diagnostic(
                    "P106", f"the expression is nested more than {MAX_NESTING} levels deep", span,
                    "name inner parts with `let` (e.g. `let inner = ...`) to flatten the expression",
                    filename=filename, source=text))
        for c in node.children:
            if isinstance(c, Tree):
                stack.append((c, depth))


def span_of(node) -> Span | None:
    if isinstance(node, Token):
        if node.line is None:
            return None
        return Span(node.start_pos, node.end_pos, node.line, node.column, node.end_line, node.end_column)
    m = node.meta
    if getattr(m, "empty", True):
        return None
    return Span(m.start_pos, m.end_pos, m.line, m.column, m.end_line, m.end_column)
