"""The front-end API: ``parse`` and ``load`` (text -> canonical Pattern), torch-free."""

from __future__ import annotations

import functools
import warnings
from pathlib import Path

from ..errors import Diagnostic, PatternError, PatternWarning
from ..ir.nodes import Pattern
from ..ir.normalize import normalize
from ..lang.elaborate import ParseResult, elaborate
from ..lang.parser import decode_source
from .lint import lint


@functools.lru_cache(maxsize=512)
def _analyse_cached(source: str, params: tuple, filename: str) -> tuple[Pattern, ParseResult]:
    res = elaborate(source, params=dict(params), filename=filename)
    canonical = normalize(res.pattern)
    res.warnings.extend(lint(res.pattern, res.source, filename))
    return canonical, res


def analyse_source(source: str, *, params: dict | None = None, filename: str | None = None):
    """Elaborate and normalise; returns ``(canonical Pattern, ParseResult)`` (with warnings).

    Raises:
        PatternError: any P1xx / P2xx diagnostic.
    """
    if not isinstance(source, str):
        raise not_a_source(source)
    return _analyse_cached(source, tuple(sorted((params or {}).items())), filename or "<string>")


def not_a_source(source) -> PatternError:
    """P302 for a pattern argument that is neither text, UTF-8 bytes nor a ``Pattern``."""
    return PatternError(Diagnostic(
        "P302", f"a pattern must be source text (str), UTF-8 bytes or a patternc.Pattern, got {type(source).__name__}",
        None, "pass the pattern as text, e.g. 'local(w=128) & causal', or patternc.load(path) for a .pattern file"))


def parse(source, *, params: dict | None = None, filename: str | None = None) -> Pattern:
    """Parse pattern source text into its canonical ``Pattern`` (``str(p)`` is canonical).

    Args:
        source: pattern text (a whole ``.pattern`` file or one expression), UTF-8 bytes, or a
            Pattern (returned unchanged; ``params`` are then an error).
        params: overrides for the source's ``param`` defaults (name -> int); names the source
            does not declare become integer names it may use.
        filename: shown in diagnostics (default ``<string>``).

    Returns:
        The normalised Pattern. Warnings (W001, W002) are issued as ``PatternWarning``.

    Raises:
        PatternError: (a ``ValueError``) with the rendered diagnostic, e.g. P201 for an
            unknown primitive.

    Example:
        >>> str(parse("causal & (strided(s=64) | local(w=128))"))
        '(local(w=128) | strided(s=64)) & causal'
    """
    if isinstance(source, Pattern):
        if params:
            from ..errors import Diagnostic, PatternError

            raise PatternError(Diagnostic("P214", "params apply to source text; this is already a Pattern", None,
                                          "pass the source text with params=..., or bind the params when parsing"))
        return source
    p, res = parse_source(source, params=params, filename=filename)
    for w in res.warnings:
        warnings.warn(PatternWarning(w), stacklevel=2)
    return p


def parse_source(source, *, params: dict | None = None, filename: str | None = None):
    """Text or UTF-8 bytes -> ``(canonical Pattern, ParseResult)`` without issuing warnings
    (the caller decides how to show ``ParseResult.warnings``).

    Raises:
        PatternError: P108 for bytes that are not UTF-8, and any P1xx / P2xx diagnostic.
    """
    if isinstance(source, bytes):
        source = decode_source(source, filename or "<bytes>")
    return analyse_source(source, params=params, filename=filename)


def load(path, *, params: dict | None = None) -> Pattern:
    """Read and parse a ``.pattern`` file (UTF-8).

    Raises:
        OSError: the file cannot be read.
        PatternError: the file is not valid UTF-8 (P108) or has errors.
    """
    data = Path(path).read_bytes()
    text = decode_source(data, str(path))
    return parse(text, params=params, filename=str(path))
