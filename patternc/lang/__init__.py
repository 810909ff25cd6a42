"""Stage 2 — the language front end (Lark): source text -> elaborated IR.

``parser`` reads ``grammars/patternc.lark`` (LALR, newline-aware) and labels syntax errors from
a table of malformed snippets; ``elaborate`` resolves ``param``/``let``/``def``, the prelude,
arguments and their ranges into an *unnormalised* ``Pattern``; ``formatter`` is ``patternc
fmt`` (the surface layout, comments kept). Normalising and linting happen at the front door
(``patternc.source``), after this stage.
"""

from __future__ import annotations

from .elaborate import ParseResult, elaborate
from .formatter import format_source
from .parser import decode_source

__all__ = ["ParseResult", "elaborate", "format_source", "decode_source"]
