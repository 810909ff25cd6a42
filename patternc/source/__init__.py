"""Stage 4 — the one front door for sources: text -> canonical ``Pattern`` with diagnostics.

``frontdoor`` runs the language front end (``patternc.lang``: parse + elaborate), the IR's
normaliser and the lints (``lint``: W002, which needs the lowering evaluator to find a
witness), and caches the result per (text, params). ``properties`` is what ``patternc check``
reports (causal, symmetric, with witnesses from the lowering evaluator). The door sits after
lowering because the lint and the witnesses evaluate the pattern; everything that takes a
source (compiler, analysis, CLI, ``nn``) enters here.
"""

from __future__ import annotations

from .frontdoor import analyse_source, load, parse, parse_source

__all__ = ["analyse_source", "load", "parse", "parse_source"]
