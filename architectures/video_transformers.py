"""What diffusers' production video transformers share in stbench: the attention-swap settings and the adapter
from a diffusers transformer to the `VideoModel` interface (latent batch, objective, DSV stages and stats)."""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import torch

from .attention.dsv_stages import DSVSettings, DSVStages
from .attention.processors import ATTENTION_CHOICES, SwappedAttnProcessor, install_attention
from .base import VideoModel
from .registry import Architecture, register

VIDEO_TRANSFORMER_MODES = ("full",)  # one 3D attention per block: no temporal part to train alone


@dataclass(frozen=True)
class SwapSettings(DSVSettings):
    """Attention choice and its window / DSV settings (the same meanings as the home-made DiT's)."""

    attention: str = "full"  # full (diffusers' own processor) | window | dsv
    window_size: tuple[int, ...] = (4, 8, 8)  # tokens per 3D window (frames, rows, cols), shrunk to fit

    def __post_init__(self):
        if self.attention not in ATTENTION_CHOICES:
            raise ValueError(f"attention: {self.attention!r} is not legal; legal: {', '.join(ATTENTION_CHOICES)}")
        if len(self.window_size) != 3 or min(self.window_size) < 1:
            raise ValueError("window_size: three positive ints (frames, rows, cols)")
        self.check_dsv()


def check_latent_shape(model_cls, config, frames: int, height: int, width: int, patch: tuple[int, int, int]):
    """ValueError naming the legal values when a pixel shape does not map onto whole latent patches."""
    t, s = model_cls.temporal_compression, model_cls.spatial_compression
    if t > 1 and (frames < 1 or (frames - 1) % t):
        raise ValueError(f"frames must be 1 + a multiple of {t} (the VAE compresses time {t}x; e.g. "
                         f"{', '.join(str(1 + t * k) for k in (1, 2, 4, 8))}), got {frames}")
    latent_frames = frames if t == 1 else 1 + (frames - 1) // t
    if latent_frames % patch[0]:
        raise ValueError(f"latent frames ({latent_frames}) must be a multiple of the temporal patch {patch[0]}")
    for name, size, p in (("height", height, patch[1]), ("width", width, patch[2])):
        if size % (s * p):
            raise ValueError(f"{name} must be a multiple of {s * p} (VAE /{s}, patch {p}), got {size}")


class DiffusersVideoModel(DSVStages, VideoModel):
    """A diffusers video transformer behind the VideoModel interface, with its self-attention swappable."""

    # Subclasses set the latent space and objective (class attributes of VideoModel), build `self.transformer`
    # in `build_transformer`, name the self-attention modules to swap in `attention_targets`, and call the
    # diffusers model in `run`.

    patch: tuple[int, int, int] = (1, 2, 2)  # latent (frames, rows, cols) per token
    temporal_prefixes: tuple[str, ...] = ()  # parameter-name prefixes of separable temporal layers

    def __init__(self, config):
        super().__init__(config)
        self.transformer = self.build_transformer(config)
        self.swapped: list[tuple[SwappedAttnProcessor, Callable]] = []
        for modules, text, grid_of in self.attention_targets():
            for processor in install_attention(modules, config.attention, config, text):
                self.swapped.append((processor, grid_of))
        self.init_dsv()

    # --- what families provide -----------------------------------------------------------------
    def build_transformer(self, config):
        raise NotImplementedError

    def attention_targets(self):
        """[(attention modules, text position 'none'|'first'|'last', grid_of(video grid) -> grid they see)]."""
        raise NotImplementedError

    def run(self, latents, timesteps, text):  # (B, C, F, h, w), (B,), (B, L, D) -> (B, C, F, h, w)
        raise NotImplementedError

    # --- VideoModel ----------------------------------------------------------------------------
    @property
    def text_dim(self) -> int:
        return self.config.text_dim

    @property
    def text_tokens(self) -> int:
        return self.config.text_tokens

    def group_of(self, parameter_name: str) -> str:
        if parameter_name.endswith(("q_estimator", "k_estimator")):
            return "estimator"
        if parameter_name.startswith(tuple(f"transformer.{p}" for p in self.temporal_prefixes)):
            return "temporal"
        return "spatial"

    def forward(self, sample, timesteps, text):  # (B, C, F, h, w), (B,), (B, L, D) -> (B, C, F, h, w)
        if self._dsv:
            self._begin_forward(sample, timesteps, text)
        grid = tuple(n // p for n, p in zip(sample.shape[2:], self.patch))
        for processor, grid_of in self.swapped:
            processor.grid = grid_of(grid)
        return self.run(sample, timesteps, text)


def video_grid(grid):  # the grid a full 3D self-attention sees: every video token of the sample
    return grid


def register_video_transformer(name: str, config_cls, presets: dict[str, dict], build, description: str,
                               check_shape, modes: tuple[str, ...] = VIDEO_TRANSFORMER_MODES) -> None:
    """Register one diffusers video transformer: presets are size overrides of its config dataclass."""
    register(Architecture(
        name=name, family="video-transformer", config_cls=config_cls,
        presets={preset: (lambda sizes=sizes: config_cls(**sizes)) for preset, sizes in presets.items()},
        build=build, description=description, check_shape=check_shape, modes=modes, attention=ATTENTION_CHOICES))
