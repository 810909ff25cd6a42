"""patternc: a compiler for sparse-attention patterns.

A pattern such as ``(local(w=128) | strided(s=64)) & causal`` is parsed into a checked,
canonical IR (``parse`` / ``load``), compiled analytically to FlexAttention-style block
layouts (``compile``), executed with torch (``CompiledPattern.attention``), and analysed
for reachability through a layer stack (``analyze``). See SPEC §2 and ``docs/``.

``import patternc`` does not import torch (execution imports it on first use), nor numpy:
the layout, oracle, compiler, analysis and ``nn`` load when first used.
"""

from __future__ import annotations

from .errors import Diagnostic, ExitCode, PatternError, PatternWarning
from .ir.nodes import Pattern
from .source import load, parse

__version__ = "0.1.0"

__all__ = [
    "parse", "load", "compile", "load_compiled", "analyze", "reference", "nn",
    "Pattern", "BlockLayout", "CompiledPattern", "ReachReport", "PatternError", "PatternWarning",
    "Diagnostic", "ExitCode", "EMPTY", "PARTIAL", "FULL", "__version__",
]

_LAZY = {
    "BlockLayout": ("lower.layout", "BlockLayout"),
    "EMPTY": ("lower.layout", "EMPTY"),
    "PARTIAL": ("lower.layout", "PARTIAL"),
    "FULL": ("lower.layout", "FULL"),
    "compile": ("compiler", "compile"),
    "CompiledPattern": ("compiler", "CompiledPattern"),
    "load_compiled": ("compiler", "load_compiled"),
    "analyze": ("analysis", "analyze"),
    "ReachReport": ("analysis", "ReachReport"),
}


def __getattr__(name):
    if name in _LAZY:
        import importlib

        mod, attr = _LAZY[name]
        return getattr(importlib.import_module(f".{mod}", __name__), attr)
    if name in ("nn", "reference", "execute", "transformers", "distributed", "show"):  # subpackages, loaded on first use
        import importlib

        return importlib.import_module(f".{name}", __name__)
    raise AttributeError(f"module 'patternc' has no attribute {name!r}")
