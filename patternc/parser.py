"""Stage 1: source text -> Lark tree (``grammars/patternc.lark``), with syntax diagnostics.

``parse_tree(text, filename)`` returns the Lark tree or raises ``PatternError`` (P1xx).
The elaborator (``patternc.elaborate``) turns the tree into the IR.

Newlines end statements, except inside brackets, after a binary operator, ``=`` or ``,``,
or before a line that starts with ``|``, ``&``, ``+``, ``-``, ``*``, ``//`` or ``%``
(``LineJoiner``), so long expressions can be broken over lines naturally.
"""

from __future__ import annotations

import functools
from importlib import resources
from pathlib import Path

from lark import Lark, Token, Tree
from lark.exceptions import UnexpectedCharacters, UnexpectedEOF, UnexpectedInput, UnexpectedToken

from .errors import Diagnostic, PatternError
from .ir import Span

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
    return Path(__file__).resolve().parent.parent / "grammars"


def grammar_path() -> Path:
    return _grammar_dir() / "patternc.lark"


def prelude_path() -> Path:
    return _grammar_dir() / "prelude.pattern"


_JOIN_AFTER = {"_OR", "_AND", "PLUS", "MINUS", "MUL_OP", "TILDE", "EQUAL", "COMMA", "LPAR", "LSQB"}
_JOIN_BEFORE = {"_OR", "_AND", "PLUS", "MINUS", "MUL_OP", "RPAR", "RSQB", "COMMA"}
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


@functools.lru_cache(maxsize=1)
def get_parser() -> Lark:
    return Lark(
        grammar_path().read_text(encoding="utf-8"),
        parser="lalr",
        lexer="basic",
        postlex=LineJoiner(),
        propagate_positions=True,
        maybe_placeholders=False,
    )


# --- syntax error labelling -----------------------------------------------------------------
# The table Lark's ``match_examples`` uses to label syntax errors by parser state; the same
# table is the error-message test (tests/test_diagnostics.py).
SYNTAX_EXAMPLES: dict[str, list[str]] = {
    "P103": ["causal &", "local(w=1) |", "causal -", "~", "let x =", "param w =", "local(w=", "causal & ~"],
    "P104": ["local(w=1) causal", "causal causal", "local(1) 3", "(causal) (causal)"],
    "P109": ["local(w=1) & & causal", "causal | | all", "causal & | all", "(| causal)", "local(,)"],
    "P110": ["let = causal", "param = 3", "def (x) = x", "let 3 = causal", "def f(3) = x"],
}

SYNTAX_MESSAGES = {
    "P103": "the input ends in the middle of an expression",
    "P104": "expected an operator or the end of the statement",
    "P109": "expected an operand",
    "P110": "expected a name",
}

TERMINAL_NAMES = {
    "NAME": "a name", "INT": "an integer", "LPAR": "`(`", "RPAR": "`)`", "LSQB": "`[`",
    "RSQB": "`]`", "COMMA": "`,`", "EQUAL": "`=`", "_OR": "`|`", "_AND": "`&`", "PLUS": "`+`",
    "MINUS": "`-`", "MUL_OP": "`*`, `//` or `%`", "TILDE": "`~`", "_NL": "a new line",
    "$END": "the end of the input", "PARAM": "`param`", "LET": "`let`", "DEF": "`def`",
}


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
    """Span at the end of the input: after the last non-blank character."""
    stripped = text.rstrip()
    # skip a trailing comment line
    return _point_span(text, len(stripped))


def _unclosed(text: str):
    """The innermost unclosed bracket token, if any (lexing only)."""
    stack = []
    try:
        for tok in get_parser().lex(text, dont_ignore=False):
            if tok.type in _OPEN:
                stack.append(tok)
            elif tok.type in _CLOSE and stack:
                stack.pop()
    except UnexpectedInput:
        pass
    return stack[-1] if stack else None


def _label(err: UnexpectedInput) -> str | None:
    try:
        return err.match_examples(get_parser().parse, SYNTAX_EXAMPLES, use_accepts=True)
    except Exception:  # labelling is best-effort; the heuristics below always answer
        return None


def syntax_diagnostic(err: UnexpectedInput, text: str, filename: str) -> Diagnostic:
    def diag(code, msg, span, help):
        return Diagnostic(code, msg, span, help, filename=filename, source=text)

    if isinstance(err, UnexpectedCharacters):
        ch = text[err.pos_in_stream] if err.pos_in_stream < len(text) else ""
        return diag("P101", f"unexpected character `{ch}`", _point_span(text, err.pos_in_stream),
                    "patterns use names, integers, ( ) [ ] , = and the operators | & - ~ + * // %"
                    + ("; `!` is written `~` (not)" if ch == "!" else "")
                    + ("; `^` has no meaning here: use `|` (or) or `&` (and)" if ch == "^" else "")
                    + ("; `/` is written `//` (integer division)" if ch == "/" else ""))
    tok = getattr(err, "token", None)
    at_end = isinstance(err, UnexpectedEOF) or (tok is not None and tok.type == "$END")
    expected = getattr(err, "expected", None) or getattr(err, "accepts", None) or set()
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
        opener = _unclosed(text[: tok.start_pos])
        if opener is None:
            return diag("P102", f"unmatched `{tok.value}`", span, "remove it, or add the opening bracket it closes")
    label = _label(err) or ("P104" if "_NL" in expected or "$END" in expected else "P109")
    if tok.type == "_NL" and label != "P110":
        label = "P103"
        return diag("P103", f"the line ends in the middle of an expression: expected {_expected_text(expected)}",
                    _point_span(text, tok.start_pos), "complete the expression on this line, or break the line after an operator")
    helps = {
        "P104": "join the two parts with an operator (`|`, `&`, `-`) or put them on separate statements; a file ends with exactly one pattern expression",
        "P109": "put a pattern or integer between the operators",
        "P110": "names start with a letter or `_`: e.g. `let window = local(w=128)`",
    }
    msg = SYNTAX_MESSAGES.get(label, "unexpected input")
    return diag(label, f"{msg}, found {shown}", span, helps.get(label, f"expected {_expected_text(expected)}"))


def empty_source_diagnostic(text: str, filename: str) -> Diagnostic:
    return Diagnostic("P105", "no pattern: the source is empty (only blanks or comments)", None,
                      "write a pattern expression, e.g. `local(w=128) & causal`", filename=filename, source=text)


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
        PatternError: P101-P110 syntax errors, P106 too deep, P107 too large.
    """
    text = text.replace("\r\n", "\n").replace("\r", "\n")
    if len(text) > MAX_SOURCE_BYTES:
        raise PatternError(Diagnostic(
            "P107", f"the source is too large ({len(text) / 2**20:.1f} MiB; the limit is {MAX_SOURCE_BYTES >> 20} MiB)",
            None, "patterns are small: use `param`, `let` and `def` instead of spelling the pattern out",
            filename=filename, source=text))
    try:
        tree = get_parser().parse(text)
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
