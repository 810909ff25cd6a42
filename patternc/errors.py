"""Diagnostics: ``error[P201]: message`` / `` --> file:line:col`` / source line / carets / ``help:``.

Codes (see ``docs/diagnostics.md`` for one example and fix each): P1xx syntax, P2xx names,
parameters and types, P3xx lowering and shapes, P4xx analysis, P9xx internal; W0xx warnings.
Library calls raise ``PatternError`` (a ``ValueError``) whose ``str()`` is the rendered
diagnostic; the CLI prints the same text, or ``to_json()`` with ``--json``.
"""

from __future__ import annotations

import difflib
import enum
import unicodedata
from dataclasses import dataclass, field

TAB_WIDTH = 4


@dataclass(frozen=True)
class Span:
    """A source range: 1-based line/column, end exclusive; offsets are 0-based characters."""

    start: int
    end: int
    line: int
    column: int
    end_line: int
    end_column: int


class ExitCode(enum.IntEnum):
    """Process exit codes of the ``patternc`` CLI (SPEC §5)."""

    OK = 0  #: success (warnings allowed)
    PROBLEMS = 1  #: the pattern has errors, or the checked property does not hold
    USAGE = 2  #: usage error, unreadable file, or internal error


@dataclass
class Diagnostic:
    """One error or warning, with the source it points into."""

    code: str
    message: str
    span: Span | None = None
    help: str | None = None
    severity: str = "error"  # 'error' | 'warning'
    filename: str = "<string>"
    source: str | None = field(default=None, repr=False)

    def render(self) -> str:
        head = f"{self.severity}[{self.code}]: {self.message}"
        lines = [head]
        if self.span is not None:
            lines.append(f" --> {self.filename}:{self.span.line}:{self.span.column}")
            src_line = _source_line(self.source, self.span.line)
            if src_line is not None:
                gutter = str(self.span.line)
                pad = " " * len(gutter)
                shown = _display(src_line)
                start = _display_col(src_line, self.span.column - 1)
                if self.span.end_line == self.span.line:
                    end = _display_col(src_line, self.span.end_column - 1)
                else:
                    end = len(shown)
                shown, start, end = _window(shown, start, max(end, start + 1))
                lines.append(f"{pad} |")
                lines.append(f"{gutter} | {shown}".rstrip())
                lines.append(f"{pad} | " + " " * start + "^" * (end - start))
        else:
            lines.append(f" --> {self.filename}")
        if self.help:
            lines.append(f"help: {self.help}")
        return "\n".join(lines)

    def to_json(self) -> dict:
        d = {"severity": self.severity, "code": self.code, "message": self.message,
             "file": self.filename, "help": self.help}
        if self.span is not None:
            d.update(line=self.span.line, column=self.span.column,
                     end_line=self.span.end_line, end_column=self.span.end_column)
        else:
            d.update(line=None, column=None, end_line=None, end_column=None)
        return d

    def __str__(self) -> str:
        return self.render()


def normalize_newlines(text: str) -> str:
    r"""``\r\n`` and lone ``\r`` as ``\n``: the one newline handling of source text (spans,
    line numbers and rendered diagnostics all count lines this way).

    Example:
        >>> normalize_newlines("causal\r\nall\rnone")
        'causal\nall\nnone'
    """
    return text.replace("\r\n", "\n").replace("\r", "\n")


def _source_line(source: str | None, line: int) -> str | None:
    if source is None:
        return None
    lines = source.split("\n")
    if 1 <= line <= len(lines):
        return lines[line - 1].rstrip("\r")
    if line == len(lines) + 1:
        return ""
    return None


MAX_SHOWN_COLUMNS = 100  # longer source lines are shown as a window around the span


def _char_width(ch: str) -> int:
    """Terminal columns of one character (wide East Asian characters take two)."""
    if unicodedata.combining(ch):
        return 0
    return 2 if unicodedata.east_asian_width(ch) in ("W", "F") else 1


def _display(line: str) -> str:
    """The line as shown: tabs expanded to TAB_WIDTH stops, control characters as `?`."""
    out = []
    col = 0
    for ch in line:
        if ch == "\t":
            n = TAB_WIDTH - col % TAB_WIDTH
            out.append(" " * n)
            col += n
        else:
            if unicodedata.category(ch) in ("Cc", "Cf", "Zl", "Zp"):
                ch = "?"
            out.append(ch)
            col += _char_width(ch)
    return "".join(out)


def _display_col(line: str, col: int) -> int:
    """Display column of character offset ``col`` (0-based) once ``line`` is shown with
    ``_display`` (tabs expanded, wide characters counted twice)."""
    col = max(0, min(col, len(line)))
    return sum(_char_width(ch) for ch in _display(line[:col]))


def _window(shown: str, start: int, end: int) -> tuple[str, int, int]:
    """Cut a long display line to about MAX_SHOWN_COLUMNS around ``start`` (display columns).
    Returns the shown text and the caret range within it. Assumes narrow characters when it
    has to cut (long lines are generated text, not prose)."""
    if len(shown) <= MAX_SHOWN_COLUMNS:
        return shown, start, end
    lo = max(0, start - MAX_SHOWN_COLUMNS // 3)
    hi = min(len(shown), lo + MAX_SHOWN_COLUMNS)
    lo = max(0, min(lo, hi - MAX_SHOWN_COLUMNS))
    head = "..." if lo > 0 else ""
    tail = "..." if hi < len(shown) else ""
    start2 = start - lo + len(head)
    end2 = min(end, hi) - lo + len(head)
    return head + shown[lo:hi] + tail, start2, max(end2, start2 + 1)


class PatternError(ValueError):
    """An input problem; ``str()`` is the rendered diagnostic (all of them, errors first).

    Attributes:
        diagnostics: list[Diagnostic], the first is the primary error.
    """

    def __init__(self, diagnostics):
        if isinstance(diagnostics, Diagnostic):
            diagnostics = [diagnostics]
        self.diagnostics = list(diagnostics)
        super().__init__("\n\n".join(d.render() for d in self.diagnostics))

    def with_source(self, text: str, filename: str = "<string>") -> "PatternError":
        """This error with ``text`` attached to diagnostics that point into it but were
        raised without it (P301 when lengths are bound), so they render the source line."""
        text = normalize_newlines(text)
        for d in self.diagnostics:
            if d.source is None and d.span is not None:
                d.source, d.filename = text, filename
        return PatternError(self.diagnostics)

    @property
    def code(self) -> str:
        return self.diagnostics[0].code

    @property
    def diagnostic(self) -> Diagnostic:
        return self.diagnostics[0]


class PatternWarning(UserWarning):
    """A W-coded diagnostic issued through Python's ``warnings`` (by ``parse``, ``compile``,
    ``analyze``). ``str()`` is the rendering; ``.diagnostic`` the ``Diagnostic`` itself.

    Args:
        diagnostic: a ``Diagnostic`` with a W code.
    """

    def __init__(self, diagnostic):
        if not isinstance(diagnostic, Diagnostic):
            raise TypeError("PatternWarning takes a Diagnostic with a W code")
        self.diagnostic = diagnostic
        super().__init__(diagnostic.render())


def did_you_mean(name: str, candidates) -> str | None:
    """``"did you mean `x`?"`` for the closest candidate, or None.

    Example:
        >>> did_you_mean("locl", ["local", "chunk"])
        'did you mean `local`?'
    """
    cands = sorted(set(candidates))
    m = difflib.get_close_matches(name, cands, n=1, cutoff=0.6)
    if not m:
        lower = {c.lower(): c for c in cands}
        if name.lower() in lower:
            m = [lower[name.lower()]]
    return f"did you mean `{m[0]}`?" if m else None
