"""Diagnostics: ``error[P201]: message`` / `` --> file:line:col`` / source line / carets / ``help:``.

Codes (see ``docs/diagnostics.md`` for one example and fix each): P1xx syntax, P2xx names,
parameters and types, P3xx lowering and shapes, P4xx analysis, P9xx internal; W0xx warnings.
Library calls raise ``PatternError`` (a ``ValueError``) whose ``str()`` is the rendered
diagnostic; the CLI prints the same text, or ``to_json()`` with ``--json``.
"""

from __future__ import annotations

import difflib
import enum
from dataclasses import dataclass, field

from .ir import Span

TAB_WIDTH = 4


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
                shown = src_line.expandtabs(TAB_WIDTH)
                start = _display_col(src_line, self.span.column - 1)
                if self.span.end_line == self.span.line:
                    end = _display_col(src_line, self.span.end_column - 1)
                else:
                    end = len(shown)
                width = max(1, end - start)
                lines.append(f"{pad} |")
                lines.append(f"{gutter} | {shown}")
                lines.append(f"{pad} | " + " " * start + "^" * width)
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


def _source_line(source: str | None, line: int) -> str | None:
    if source is None:
        return None
    lines = source.split("\n")
    if 1 <= line <= len(lines):
        return lines[line - 1].rstrip("\r")
    if line == len(lines) + 1:
        return ""
    return None


def _display_col(line: str, col: int) -> int:
    """Display column of character offset ``col`` once tabs are expanded."""
    col = max(0, min(col, len(line)))
    return len(line[:col].expandtabs(TAB_WIDTH))


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

    @property
    def code(self) -> str:
        return self.diagnostics[0].code

    @property
    def diagnostic(self) -> Diagnostic:
        return self.diagnostics[0]


class PatternWarning(UserWarning):
    """Emitted by ``patternc.parse`` for W-coded diagnostics (the message is the rendering)."""


def did_you_mean(name: str, candidates) -> str | None:
    """``"did you mean `x`?"`` for the closest candidate, or None."""
    cands = sorted(set(candidates))
    m = difflib.get_close_matches(name, cands, n=1, cutoff=0.6)
    if not m:
        lower = {c.lower(): c for c in cands}
        if name.lower() in lower:
            m = [lower[name.lower()]]
    return f"did you mean `{m[0]}`?" if m else None


def error(code, message, span=None, help=None, **kw) -> Diagnostic:
    return Diagnostic(code=code, message=message, span=span, help=help, **kw)
