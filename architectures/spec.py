"""What the registry knows of an architecture (a module of its own, so that families, the registry and user
models all import it without importing each other)."""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable

from .base import TRAINING_MODES, VideoModel

CONTEXT_PARALLEL_MODES = ("ulysses", "ring")  # head-wise, sequence-wise (stbench.parallel runs them)
# the attention projections of diffusers' Attention (the layers finetrainers' and diffusers' LoRA scripts adapt)
DIFFUSERS_LORA_TARGETS = ("to_q", "to_k", "to_v", "to_out.0")


@dataclass(frozen=True)
class Architecture:
    """One registered architecture: its config class, size presets and builder."""

    name: str
    family: str  # "unet", "dit" or "video-transformer"
    config_cls: type
    presets: dict[str, Callable[[], Any]]
    build: Callable[[Any], VideoModel]
    description: str = ""
    # raises ValueError when the model cannot take a (frames, height, width) pixel shape
    check_shape: Callable[[Any, int, int, int], None] | None = None
    modes: tuple[str, ...] = TRAINING_MODES  # `temporal` only where spatial and temporal parameters separate
    attention: tuple[str, ...] = ()  # choices of --set attention=..., where the model has them
    # video tokens one self-attention sees for (config, frames, height, width): what context parallelism shards
    tokens: Callable[[Any, int, int, int], int] | None = None
    # --context-parallel modes the model runs: its forward follows the `cp` protocol once `model.context_parallel`
    # is set (tokens sharded after patch embedding, self-attention through cp.attention, gathered at the end)
    context_parallel: tuple[str, ...] = ()
    # --lora's default --lora-targets: names of linear layers (a module's full name or its last dotted parts)
    lora_targets: tuple[str, ...] = DIFFUSERS_LORA_TARGETS
