"""Procedural training data: clips of moving shapes with attribute captions, no download, deterministic by seed.

Each clip holds 1..max_shapes shapes (circle, square, diamond; seven colours; two sizes; eight directions;
two speeds) that bounce off the frame edges and occlude each other in drawing order. The caption lists every
shape's attributes, and the clip is rendered from those same attributes, so the text conditioning carries
information the model can use. Captions are embedded by a fixed seeded table (word + position) into the
model's text width and length; pixels reach the model's latent shape through a fixed linear patch encoder that
stands in for a VAE (`LatentEncoder`): the model, not this module, says what shape its latents have.
"""
from __future__ import annotations

from dataclasses import asdict, dataclass

import numpy as np
import torch

from architectures.base import NUM_TRAIN_TIMESTEPS, VideoBatch

SHAPES = ("circle", "square", "diamond")
COLOURS = {"red": (1, -1, -1), "green": (-1, 1, -1), "blue": (-1, -1, 1), "yellow": (1, 1, -1),
           "cyan": (-1, 1, 1), "magenta": (1, -1, 1), "white": (1, 1, 1)}
SIZES = {"small": 0.10, "large": 0.20}  # radius as a fraction of the frame side
DIRECTIONS = {"right": (1, 0), "left": (-1, 0), "down": (0, 1), "up": (0, -1), "down-right": (1, 1),
              "down-left": (-1, 1), "up-right": (1, -1), "up-left": (-1, -1)}
SPEEDS = {"slow": 0.04, "fast": 0.10}  # frame sides per frame
VOCAB = ("<pad>", "and", *SHAPES, *COLOURS, *SIZES, *DIRECTIONS, *SPEEDS)
BACKGROUND = -1.0  # pixels in [-1, 1]; the background is black
TEXT_TABLE_SEED = 20240711  # the caption embedding table is fixed, independent of the dataset seed
ENCODER_SEED = 20240712
CALIBRATION_CLIPS = 16  # clips (a split of their own) whose latents fix the encoder's per-channel scale (as SD's VAE factor)
SPLITS = {"train": 0, "heldout": 1, "calibration": 4}


@dataclass(frozen=True)
class ShapeSpec:
    """One moving shape: the words of its caption plus where it starts."""

    shape: str
    colour: str
    size: str
    direction: str
    speed: str
    start: tuple[float, float]  # (x, y) centre at frame 0, fractions of the frame side

    def words(self) -> list[str]:
        return [self.size, self.colour, self.shape, self.direction, self.speed]


@dataclass(frozen=True)
class DatasetConfig:
    """Which clips: seed, clip shape in pixels, shapes per clip, held-out split size."""

    seed: int = 0
    frames: int = 8
    resolution: int = 64
    max_shapes: int = 3
    heldout: int = 16
    width: int | None = None  # frame width when not square (`resolution` is then the height)

    def __post_init__(self):
        for name in ("frames", "resolution", "max_shapes", "heldout", "width"):
            if getattr(self, name) is not None and getattr(self, name) < 1:
                raise ValueError(f"{name}: must be >= 1, got {getattr(self, name)}")

    @property
    def frame_hw(self) -> tuple[int, int]:
        return self.resolution, self.width or self.resolution

    def describe(self) -> dict:  # square clips are described as before non-square ones existed
        return {"name": "moving-shapes", **{k: v for k, v in asdict(self).items() if k != "width" or v is not None}}


def _rng(*key: int) -> np.random.Generator:
    return np.random.default_rng(list(key))


def sample_shapes(config: DatasetConfig, split: str, index: int) -> list[ShapeSpec]:
    """The attributes of clip `index` of a split: a pure function of (seed, split, index)."""
    rng = _rng(config.seed, SPLITS[split], index)
    specs = []
    for _ in range(int(rng.integers(1, config.max_shapes + 1))):
        size = str(rng.choice(list(SIZES)))
        r = SIZES[size]
        specs.append(ShapeSpec(shape=str(rng.choice(SHAPES)), colour=str(rng.choice(list(COLOURS))), size=size,
                               direction=str(rng.choice(list(DIRECTIONS))), speed=str(rng.choice(list(SPEEDS))),
                               start=(float(rng.uniform(r, 1 - r)), float(rng.uniform(r, 1 - r)))))
    return specs


def caption(specs: list[ShapeSpec]) -> str:
    return " and ".join(" ".join(s.words()) for s in specs)


def _bounce(x: torch.Tensor, low: float, high: float) -> torch.Tensor:
    # reflecting walls: unfold the straight path onto a triangle wave between low and high
    span = high - low
    y = torch.remainder(x - low, 2 * span)
    return low + span - (y - span).abs()


def render(specs: list[ShapeSpec], frames: int, resolution: int,
           width: int | None = None) -> torch.Tensor:  # -> (3, F, H, W) in [-1, 1]
    """Draw the shapes frame by frame; later shapes cover earlier ones (occlusion). Positions and sizes are
    fractions of each side (`resolution` is the height; `width` defaults to it)."""
    width = width or resolution

    def coords(n: int) -> torch.Tensor:
        return (torch.arange(n, dtype=torch.float32) + 0.5) / n

    ys, xs = coords(resolution).view(1, -1, 1), coords(width).view(1, 1, -1)  # (1, H, 1), (1, 1, W)
    t = torch.arange(frames, dtype=torch.float32).view(-1, 1, 1)  # (F, 1, 1)
    clip = torch.full((3, frames, resolution, width), BACKGROUND)
    for s in specs:
        r = SIZES[s.size]
        dx, dy = DIRECTIONS[s.direction]
        norm = SPEEDS[s.speed] / (dx * dx + dy * dy) ** 0.5
        cx = _bounce(s.start[0] + dx * norm * t, r, 1 - r)  # (F, 1, 1)
        cy = _bounce(s.start[1] + dy * norm * t, r, 1 - r)
        ax, ay = (xs - cx).abs(), (ys - cy).abs()  # (F, H, W) after broadcasting
        if s.shape == "circle":
            inside = ax ** 2 + ay ** 2 <= r ** 2
        elif s.shape == "square":
            inside = torch.maximum(ax, ay) <= r * 0.85  # about the circle's area
        else:
            inside = ax + ay <= r * 1.2
        colour = torch.tensor(COLOURS[s.colour], dtype=torch.float32).view(3, 1, 1, 1)
        clip = torch.where(inside.unsqueeze(0), colour, clip)
    return clip


class TextEmbedder:
    """Caption -> (L, D): a fixed seeded word table plus a position table, zero beyond the caption."""

    def __init__(self, tokens: int, dim: int):
        g = torch.Generator().manual_seed(TEXT_TABLE_SEED)
        self.tokens = tokens
        self.words = torch.randn(len(VOCAB), dim, generator=g)  # (V, D), unit-variance entries
        self.positions = 0.5 * torch.randn(tokens, dim, generator=g)  # (L, D): binds words to their shape
        self.index = {w: i for i, w in enumerate(VOCAB)}

    def __call__(self, text: str) -> torch.Tensor:  # -> (L, D)
        ids = [self.index[w] for w in text.split()][: self.tokens]
        out = torch.zeros(self.tokens, self.words.shape[1])
        out[: len(ids)] = self.words[ids] + self.positions[: len(ids)]
        return out


class LatentEncoder:
    """A fixed linear patch encoder standing in for a VAE: (3, F, H, W) pixels -> the model's (C, f, h, w).

    Each (F/f) x (H/h) x (W/w) x 3 pixel patch is projected onto C fixed orthonormal directions (seeded), then
    every channel is shifted and scaled to zero mean, unit variance over calibration clips. Deterministic and
    not trained: it preserves colour, position and motion at latent resolution, as a VAE's latents do.
    """

    def __init__(self, latent_shape: tuple[int, ...], frames: int, resolution: int, causal: bool = False,
                 width: int | None = None):
        _, self.channels, self.frames, self.h, self.w = latent_shape
        # A causal video VAE (Wan, CogVideoX, ...) encodes the first frame alone, then groups of tf frames:
        # F = 1 + (f - 1) tf. Its first latent frame reads tf - 1 copies of frame 0 before frame 0 itself.
        self.pad = (frames - 1) // (self.frames - 1) - 1 if causal and self.frames > 1 else 0
        width = width or resolution
        if (frames + self.pad) % self.frames or resolution % self.h or width % self.w:
            raise ValueError(f"latent shape {latent_shape} does not divide a {frames}x{resolution}x{width} clip")
        self.tf, self.sh, self.sw = (frames + self.pad) // self.frames, resolution // self.h, width // self.w
        patch = 3 * self.tf * self.sh * self.sw
        if self.channels > patch:
            raise ValueError(f"{self.channels} latent channels exceed the {patch} values of a pixel patch")
        g = torch.Generator().manual_seed(ENCODER_SEED)
        self.projection = torch.linalg.qr(torch.randn(patch, self.channels, generator=g))[0]  # (P, C)
        self.shift = torch.zeros(self.channels)
        self.scale = torch.ones(self.channels)

    def calibrate(self, clips: torch.Tensor) -> "LatentEncoder":  # clips (N, 3, F, H, W)
        z = self.encode(clips).transpose(0, 1).reshape(self.channels, -1)  # (C, N*f*h*w)
        self.shift, self.scale = z.mean(dim=1), z.std(dim=1).clamp_min(1e-6)
        return self

    def encode(self, clips: torch.Tensor) -> torch.Tensor:  # (N, 3, F, H, W) -> (N, C, f, h, w)
        n = clips.shape[0]
        if self.pad:
            clips = torch.cat([clips[:, :, :1].expand(-1, -1, self.pad, -1, -1), clips], dim=2)  # causal front pad
        x = clips.reshape(n, 3, self.frames, self.tf, self.h, self.sh, self.w, self.sw)
        x = x.permute(0, 2, 4, 6, 1, 3, 5, 7).reshape(n, self.frames, self.h, self.w, -1)  # (N, f, h, w, P)
        z = (x @ self.projection - self.shift) / self.scale  # (N, f, h, w, C)
        return z.permute(0, 4, 1, 2, 3).contiguous()


class MovingShapes:
    """Train and held-out batches for one model: latents, text, noise and timesteps, all fixed by the seed.

    Every model built for the same dataset config and latent shape sees the same batches and the same noise in
    the same order: batch `step` of the train split depends only on (seed, step, batch size).
    """

    def __init__(self, config: DatasetConfig, model):
        self.config = config
        shape = model.latent_shape(1, config.frames, *config.frame_hw)
        self.encoder = LatentEncoder(shape, config.frames, config.resolution,
                                     causal=getattr(model, "temporal_compression", 1) > 1, width=config.width)
        self.encoder.calibrate(torch.stack([self.clip("calibration", i) for i in range(CALIBRATION_CLIPS)]))
        self.text = TextEmbedder(model.text_tokens, model.text_dim)

    def clip(self, split: str, index: int) -> torch.Tensor:  # -> (3, F, H, W)
        return render(sample_shapes(self.config, split, index), self.config.frames, *self.config.frame_hw)

    def examples(self, split: str, indices) -> tuple[torch.Tensor, torch.Tensor]:  # -> (N,C,f,h,w), (N,L,D)
        specs = [sample_shapes(self.config, split, i) for i in indices]
        clips = torch.stack([render(s, self.config.frames, *self.config.frame_hw) for s in specs])
        return self.encoder.encode(clips), torch.stack([self.text(caption(s)) for s in specs])

    def train_batch(self, step: int, batch: int) -> VideoBatch:
        """Batch `step` of the training stream: clips step*batch .. step*batch+batch-1, noise and timesteps."""
        latents, text = self.examples("train", range(step * batch, (step + 1) * batch))
        g = torch.Generator().manual_seed(int(_rng(self.config.seed, 2, step).integers(2 ** 62)))
        return VideoBatch(latents=latents, noise=torch.randn(latents.shape, generator=g),
                          timesteps=torch.randint(0, NUM_TRAIN_TIMESTEPS, (batch,), generator=g), text=text)

    def heldout_batches(self, batch: int) -> list[VideoBatch]:
        """The held-out split with fixed noise and evenly spread timesteps, so eval loss has no sampling noise
        across evaluations and models."""
        n = self.config.heldout
        latents, text = self.examples("heldout", range(n))
        g = torch.Generator().manual_seed(int(_rng(self.config.seed, 3).integers(2 ** 62)))
        noise = torch.randn(latents.shape, generator=g)
        timesteps = torch.linspace(0, NUM_TRAIN_TIMESTEPS - 1, n).round().long()
        return [VideoBatch(latents[i:i + batch], noise[i:i + batch], timesteps[i:i + batch], text[i:i + batch])
                for i in range(0, n, batch)]
