"""Context parallelism for the DiT's self-attention on torch.distributed: head-wise (Ulysses) and sequence-wise
(ring), with every byte sent counted. The DiT knows only the `cp` protocol (see `context_parallel`)."""
from __future__ import annotations

from .context_parallel import CONTEXT_PARALLEL_MODES, CommCounter, ContextParallel, UlyssesParallel
from .ring import RingParallel

MODES = {"ulysses": UlyssesParallel, "ring": RingParallel}


def make_context_parallel(mode: str, group=None, counter: CommCounter | None = None) -> ContextParallel:
    """'ulysses' (head-wise) or 'ring' (sequence-wise) over `group` (default: the whole world)."""
    if mode not in MODES:
        raise ValueError(f"context parallel mode must be one of {', '.join(CONTEXT_PARALLEL_MODES)}, got {mode!r}")
    return MODES[mode](group, counter)


__all__ = ["MODES", "make_context_parallel", "CommCounter", "ContextParallel", "UlyssesParallel", "RingParallel"]
