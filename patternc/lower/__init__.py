"""Stage 3 — lowering (numpy): a specialised pattern -> exact block layouts.

``lowering`` classifies every (query block, key block) tile as FULL / PARTIAL / EMPTY
analytically (``lower_to_layout``), counts allowed pairs exactly, and evaluates the predicate
on index arrays (``evaluate``: the product's evaluator, also behind ``check``'s witnesses);
``layout`` is the torch-free ``BlockLayout`` format. Loaded lazily: ``import patternc`` and
``parse`` stay free of numpy.
"""

from __future__ import annotations

_LAZY = {
    "BlockLayout": "layout", "EMPTY": "layout", "PARTIAL": "layout", "FULL": "layout",
    "normalize_block_size": "layout",
    "lower_to_layout": "lowering", "evaluate": "lowering", "count_allowed": "lowering",
    "dense_from_layout": "lowering",
}

__all__ = list(_LAZY)


def __getattr__(name):
    if name in _LAZY:
        import importlib

        return getattr(importlib.import_module(f".{_LAZY[name]}", __name__), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
