"""The interface every stbench model implements: synthetic batch, loss, parameter groups, training mode."""
from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn
import torch.nn.functional as F

LATENT_SCALE = 8  # pixels per latent cell (the SD VAE's downsampling)
TRAINING_MODES = ("temporal", "full", "image")
NUM_TRAIN_TIMESTEPS = 1000


@dataclass(frozen=True)
class VideoBatch:
    """One synthetic training batch: clean latents, the noise to predict, timesteps and text embeddings."""

    latents: torch.Tensor  # (B, C, F, h, w)
    noise: torch.Tensor  # (B, C, F, h, w)
    timesteps: torch.Tensor  # (B,) int64
    text: torch.Tensor  # (B, L, D)

    def to(self, device=None, dtype=None) -> "VideoBatch":
        def move(t: torch.Tensor) -> torch.Tensor:
            return t.to(device=device, dtype=dtype if t.is_floating_point() else None)

        return VideoBatch(move(self.latents), move(self.noise), self.timesteps.to(device), move(self.text))


def scaled_linear_alphas_cumprod(steps: int = NUM_TRAIN_TIMESTEPS) -> torch.Tensor:
    """Stable Diffusion's training schedule (scaled linear betas 0.00085..0.012)."""
    betas = torch.linspace(0.00085**0.5, 0.012**0.5, steps, dtype=torch.float64) ** 2
    return torch.cumprod(1.0 - betas, dim=0).float()


class VideoModel(nn.Module):
    """Base class of all stbench models: diffusion training on latent video."""

    # The latent space and objective a model was published with; the defaults are SD1.5's (4 channels,
    # /8 VAE per frame, CLIP text, eps-prediction), which the UNets and the home-made DiT use.
    latent_channels: int = 4
    spatial_compression: int = LATENT_SCALE
    temporal_compression: int = 1  # a causal video VAE keeps the first frame: F -> 1 + (F - 1) / t
    text_tokens: int = 77
    objective: str = "eps"

    def __init__(self, config):
        super().__init__()
        self.config = config
        self.register_buffer("alphas_cumprod", scaled_linear_alphas_cumprod(), persistent=False)

    # --- what subclasses provide -------------------------------------------------------------
    @property
    def text_dim(self) -> int:
        raise NotImplementedError

    def group_of(self, parameter_name: str) -> str:
        """'spatial', 'temporal' or 'estimator' for a parameter name of this model."""
        raise NotImplementedError

    def forward(self, sample, timesteps, text):  # (B,C,F,h,w), (B,), (B,L,D) -> (B,C,F,h,w)
        raise NotImplementedError

    # --- what subclasses may refine (the harness calls these; defaults suit a plain model) ---------
    def warmup_steps(self, requested: int) -> int:
        """Unmeasured steps before timing, given the `requested` number: a model whose first steps differ from
        its steady state (e.g. a stage switch that builds kernels) extends it."""
        return requested

    def extra_stats(self) -> dict:
        """Record fields this model adds after the measured steps (e.g. {"dsv": {...}}); {} when none; a
        'warnings' list is appended to the record's warnings."""
        return {}

    def fsdp_units(self) -> list[nn.Module]:
        """The blocks sharded as one unit each (FSDP): by default every element of the outermost ModuleLists of
        two or more elements that all hold parameters (a DiT's blocks, a UNet's down/up blocks; not e.g. a
        [Linear, Dropout] output projection); a model may name its own."""
        units: list[nn.Module] = []

        def visit(module: nn.Module) -> None:
            for child in module.children():
                if isinstance(child, nn.ModuleList) and len(child) > 1 and all(
                        next(m.parameters(), None) is not None for m in child):
                    units.extend(child)
                else:
                    visit(child)

        visit(self)
        return units

    # --- shared behaviour ----------------------------------------------------------------------
    @classmethod
    def latent_frames(cls, frames: int) -> int:  # a causal VAE keeps the first frame and compresses the rest
        t = cls.temporal_compression
        return frames if t == 1 else 1 + (frames - 1) // t

    def latent_shape(self, batch: int, frames: int, height: int, width: int) -> tuple[int, ...]:
        """(B, C, F', h, w) of the latents of a `frames` x `height` x `width` pixel video."""
        s = self.spatial_compression
        if height % s or width % s:
            raise ValueError(f"height and width must be multiples of {s}, got {height}x{width}")
        if self.temporal_compression > 1 and (frames - 1) % self.temporal_compression:
            raise ValueError(f"frames must be 1 + a multiple of {self.temporal_compression}, got {frames}")
        return (batch, self.latent_channels, self.latent_frames(frames), height // s, width // s)

    def make_batch(self, batch: int, frames: int, height: int, width: int, *, device="cpu",
                   dtype=torch.float32, seed: int = 0) -> VideoBatch:
        """Random latents/noise/text for a video of `frames` x `height` x `width` pixels."""
        g = torch.Generator().manual_seed(seed)
        shape = self.latent_shape(batch, frames, height, width)
        out = VideoBatch(
            latents=torch.randn(shape, generator=g),
            noise=torch.randn(shape, generator=g),
            timesteps=torch.randint(0, NUM_TRAIN_TIMESTEPS, (batch,), generator=g),
            text=torch.randn(batch, self.text_tokens, self.text_dim, generator=g),
        )
        return out.to(device=device, dtype=dtype)

    def add_noise(self, latents, noise, timesteps):  # -> (B, C, F, h, w)
        if self.objective == "flow":  # rectified flow: x_t = (1 - sigma) x_0 + sigma noise, sigma = t / T
            sigma = (timesteps.to(latents.dtype) / NUM_TRAIN_TIMESTEPS).view(-1, 1, 1, 1, 1)
            return (1 - sigma) * latents + sigma * noise
        a = self.alphas_cumprod.to(latents.device)[timesteps].to(latents.dtype).view(-1, 1, 1, 1, 1)
        return a.sqrt() * latents + (1 - a).sqrt() * noise

    def target(self, batch: VideoBatch) -> torch.Tensor:  # -> (B, C, F, h, w) what the model predicts
        if self.objective == "flow":
            return batch.noise - batch.latents  # the velocity of the straight path
        if self.objective == "v":
            a = self.alphas_cumprod.to(batch.latents.device)[batch.timesteps].view(-1, 1, 1, 1, 1)
            return a.sqrt() * batch.noise.float() - (1 - a).sqrt() * batch.latents.float()
        return batch.noise

    def loss(self, batch: VideoBatch) -> torch.Tensor:
        """MSE against the model's objective (eps, v or flow velocity), computed in fp32."""
        noisy = self.add_noise(batch.latents, batch.noise, batch.timesteps)
        pred = self(noisy, batch.timesteps, batch.text)  # (B, C, F, h, w)
        return F.mse_loss(pred.float(), self.target(batch).float())

    def parameter_groups(self) -> dict[str, list[str]]:
        groups: dict[str, list[str]] = {}
        for name, _ in self.named_parameters():
            groups.setdefault(self.group_of(name), []).append(name)
        return groups

    def set_training_mode(self, mode: str) -> "VideoModel":
        """`temporal`: spatial (text-to-image) weights frozen; `full`: everything trains; `image`: only the
        spatial weights train (text-to-image pretraining: motion modules and other additions stay at init)."""
        if mode not in TRAINING_MODES:
            raise ValueError(f"mode must be one of {', '.join(TRAINING_MODES)}, got {mode!r}")
        for name, p in self.named_parameters():
            spatial = self.group_of(name) == "spatial"
            p.requires_grad_(mode == "full" or (spatial if mode == "image" else not spatial))
        self.training_mode = mode
        return self

    @property
    def spatial_frozen(self) -> bool:
        return getattr(self, "training_mode", "full") == "temporal"

    def trainable_parameters(self) -> list[nn.Parameter]:
        return [p for p in self.parameters() if p.requires_grad]
