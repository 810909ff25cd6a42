"""``patternc.distributed``: context parallelism, one sequence's attention over several processes.

``ContextParallel(cp, group=None, balance="tiles")`` (SPEC §7) shards a sequence across the ranks
of a torch.distributed process group (gloo on CPU, nccl on GPU) and moves between them only
the key/value blocks the pattern's computed tiles read. ``balance`` (numpy only) computes the
schedule; ``launch`` spawns local gloo workers (``patternc run --nproc N``). See
``docs/distributed.md``.
"""

from __future__ import annotations

__all__ = ["ContextParallel", "Schedule", "make_schedule"]


def __getattr__(name):  # lazy: the schedule is numpy-only, ContextParallel needs torch.distributed
    if name == "ContextParallel":
        from .context import ContextParallel

        return ContextParallel
    if name in ("Schedule", "make_schedule"):
        from . import balance

        return getattr(balance, name)
    raise AttributeError(f"module 'patternc.distributed' has no attribute {name!r}")
