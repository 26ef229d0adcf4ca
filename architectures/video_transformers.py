"""What diffusers' production video transformers share in stbench: the attention-swap settings and the adapter
from a diffusers transformer to the `VideoModel` interface (latent batch, objective, DSV stages and stats)."""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import torch

from .attention.processors import ATTENTION_CHOICES, SwappedAttnProcessor, install_attention
from .base import VideoModel
from .dit import SPARSE_BACKENDS, VideoDiT

VIDEO_TRANSFORMER_MODES = ("full",)  # one 3D attention per block: no temporal part to train alone


@dataclass(frozen=True)
class SwapSettings:
    """Attention choice and its window / DSV settings (the same meanings as the home-made DiT's)."""

    attention: str = "full"  # full (diffusers' own processor) | window | dsv
    window_size: tuple[int, ...] = (4, 8, 8)  # tokens per 3D window (frames, rows, cols), shrunk to fit
    estimator_rank: int = 16
    block_size: int = 64
    dense_steps: int = 2
    sparsity_threshold: float = 0.5
    sparsity: float | None = None  # None: from profiling; a float forces it for every head (labelled forced)
    topk_min: int = 1
    profile_momentum: float = 0.9
    mass_coverage: float = 0.9
    estimator_samples: int = 64
    estimator_loss_weight: float = 1.0
    sparse_backend: str = "auto"
    sparse_recompute: bool = False

    def __post_init__(self):
        if self.attention not in ATTENTION_CHOICES:
            raise ValueError(f"attention: {self.attention!r} is not legal; legal: {', '.join(ATTENTION_CHOICES)}")
        if self.sparse_backend not in SPARSE_BACKENDS:
            raise ValueError(f"sparse_backend: {self.sparse_backend!r}; legal: {', '.join(SPARSE_BACKENDS)}")
        for name in ("estimator_rank", "block_size", "topk_min", "estimator_samples"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name}: must be >= 1, got {getattr(self, name)}")
        if len(self.window_size) != 3 or min(self.window_size) < 1:
            raise ValueError("window_size: three positive ints (frames, rows, cols)")
        if self.sparsity is not None and not 0.0 <= self.sparsity < 1.0:
            raise ValueError(f"sparsity: must be in [0, 1) or None, got {self.sparsity}")
        if self.dense_steps < 0:
            raise ValueError(f"dense_steps: must be >= 0, got {self.dense_steps}")


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


class DiffusersVideoModel(VideoModel):
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
        self._dsv = [p.dsv for p, _ in self.swapped if p.dsv is not None]  # a plain list: not registered twice
        self.steps_done = 0
        self._last_inputs = None

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

    def loss(self, batch):
        """The objective's MSE plus DSV's estimator loss (which reaches only the estimators)."""
        loss = super().loss(batch)
        if not self._dsv:
            return loss
        if self.training and torch.is_grad_enabled():
            self._count_step()
        estimator = [m.estimator_loss for m in self._dsv if m.estimator_loss is not None]
        if estimator:
            loss = loss + self.config.estimator_loss_weight * torch.stack(estimator).float().mean()
        return loss

    # DSV's stage switch, step counter and stats are the home-made DiT's, on this model's layers
    _begin_forward = VideoDiT._begin_forward
    _count_step = VideoDiT._count_step
    dsv_stats = VideoDiT.dsv_stats

    def dsv_layers(self):
        return list(self._dsv)

    def warmup_steps(self, requested: int) -> int:
        """Warm-up past DSV's stage switch and first sparse step (see stbench.step)."""
        return max(requested, self.config.dense_steps + 2) if self._dsv else requested

    def extra_stats(self) -> dict:
        stats = self.dsv_stats() if self._dsv else None
        return {"dsv": stats} if stats is not None else {}


def video_grid(grid):  # the grid a full 3D self-attention sees: every video token of the sample
    return grid
