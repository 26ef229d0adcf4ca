"""Video DiT (patchify 1x2x2, adaLN-zero blocks, text cross-attention) with pluggable self-attention:
full, 3D window, factorised serial / parallel spatial-temporal, and DSV learned sparse attention."""
from __future__ import annotations

import contextlib
import math
import re
from dataclasses import dataclass

import torch
from torch import nn
from torch.profiler import record_function

from .attention import ATTENTION_KINDS, CrossAttention, TemporalAttention, make_self_attention
from .attention.dsv_stages import DSVSettings, DSVStages
from .base import LATENT_SCALE, VideoModel
from .registry import Architecture, register
from .spec import CONTEXT_PARALLEL_MODES

# LoRA's default targets: the attention projections (self-attention's fused qkv, cross-attention's q and kv, and
# each attention's output `out`), as DIFFUSERS_LORA_TARGETS name them in diffusers' Attention
DIT_LORA_TARGETS = ("qkv", "q", "kv", "out")


@dataclass(frozen=True)
class DiTConfig(DSVSettings):
    """Size, attention kind and DSV settings of a video DiT (every field settable with --set)."""

    hidden_size: int = 64
    depth: int = 2
    heads: int = 2
    head_dim: int = 32
    mlp_ratio: float = 4.0
    text_dim: int = 64
    in_channels: int = 4
    patch_size: tuple[int, ...] = (1, 2, 2)  # (frames, rows, cols) per token
    attention: str = "full"  # full | window | serial | parallel | dsv
    window_size: tuple[int, ...] = (4, 8, 8)  # tokens per 3D window (frames, rows, cols), shrunk to fit the grid

    def tokens(self, frames: int, height: int, width: int) -> int:
        """Tokens of a video of `frames` x `height` x `width` pixels (latents /8, then patchified)."""
        pt, ph, pw = self.patch_size
        return (frames // pt) * (height // LATENT_SCALE // ph) * (width // LATENT_SCALE // pw)

    def __post_init__(self):
        if self.attention not in ATTENTION_KINDS:
            raise ValueError(f"attention: {self.attention!r} is not legal; legal: {', '.join(ATTENTION_KINDS)}")
        for name in ("hidden_size", "depth", "heads", "head_dim", "text_dim"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name}: must be >= 1, got {getattr(self, name)}")
        if len(self.patch_size) != 3 or len(self.window_size) != 3 or min(self.patch_size + self.window_size) < 1:
            raise ValueError("patch_size and window_size: three positive ints (frames, rows, cols)")
        self.check_dsv()


def modulate(x, shift, scale):  # (B, N, C), (B, 1, C) x2 -> (B, N, C)
    return x * (1 + scale) + shift


def sincos_1d(dim: int, positions: torch.Tensor) -> torch.Tensor:  # (P,) -> (P, dim)
    freqs = 1.0 / 10000 ** (torch.arange(dim // 2, dtype=torch.float64) / (dim // 2))
    angles = positions.double()[:, None] * freqs[None]
    return torch.cat([angles.sin(), angles.cos()], dim=1)


def sincos_3d(dim: int, grid) -> torch.Tensor:  # -> (F*h*w, dim), tokens in (frame, row, col) order
    """Fixed 3D sin-cos position embedding: a third of the (even) channels per axis, zeros in the rest."""
    f, h, w = grid
    axis_dim = (dim // 6) * 2
    t, r, c = torch.meshgrid(torch.arange(f), torch.arange(h), torch.arange(w), indexing="ij")
    parts = [sincos_1d(axis_dim, p.reshape(-1)) for p in (t, r, c)]
    emb = torch.cat(parts + [torch.zeros(f * h * w, dim - 3 * axis_dim, dtype=torch.float64)], dim=1)
    return emb.float()


class TimestepEmbedder(nn.Module):
    """Sinusoidal timestep features -> MLP -> hidden size."""

    def __init__(self, dim: int, freq_dim: int = 256):
        super().__init__()
        self.freq_dim = freq_dim
        self.mlp = nn.Sequential(nn.Linear(freq_dim, dim), nn.SiLU(), nn.Linear(dim, dim))

    def forward(self, t):  # (B,) -> (B, C)
        half = self.freq_dim // 2
        freqs = torch.exp(-math.log(10000) * torch.arange(half, device=t.device, dtype=torch.float32) / half)
        args = t.float()[:, None] * freqs[None]
        emb = torch.cat([args.cos(), args.sin()], dim=-1).to(self.mlp[0].weight.dtype)  # (B, freq_dim)
        return self.mlp(emb)


class DiTBlock(nn.Module):
    """adaLN-zero block: self-attention, text cross-attention, MLP (serial-st adds a temporal sublayer)."""

    def __init__(self, cfg: DiTConfig):
        super().__init__()
        C = cfg.hidden_size
        self.norm1 = nn.LayerNorm(C, elementwise_affine=False, eps=1e-6)
        self.attn = make_self_attention(cfg.attention, C, cfg.heads, cfg.head_dim, cfg)
        self.temporal_attn = None
        if cfg.attention == "serial":  # a motion module after the image model's attention, starting at zero
            self.temporal_norm = nn.LayerNorm(C, eps=1e-6)
            self.temporal_attn = TemporalAttention(C, cfg.heads, cfg.head_dim, zero_out=True)
        self.norm2 = nn.LayerNorm(C, eps=1e-6)
        self.cross_attn = CrossAttention(C, cfg.heads, cfg.head_dim)
        self.norm3 = nn.LayerNorm(C, elementwise_affine=False, eps=1e-6)
        hidden = int(C * cfg.mlp_ratio)
        self.mlp = nn.Sequential(nn.Linear(C, hidden), nn.GELU(approximate="tanh"), nn.Linear(hidden, C))
        self.adaLN = nn.Sequential(nn.SiLU(), nn.Linear(C, 6 * C))
        nn.init.zeros_(self.adaLN[1].weight)
        nn.init.zeros_(self.adaLN[1].bias)

    def forward(self, x, c, text, grid, cp=None):  # (B, N, C), (B, C), (B, L, C) -> (B, N, C)
        shift1, scale1, gate1, shift2, scale2, gate2 = self.adaLN(c)[:, None].chunk(6, dim=-1)  # 6 x (B, 1, C)
        with record_function("spatial") if self.temporal_attn is not None else contextlib.nullcontext():
            x = x + gate1 * self.attn(modulate(self.norm1(x), shift1, scale1), grid, cp)  # (B, N, C)
        if self.temporal_attn is not None:
            with record_function("temporal"):
                x = x + self.temporal_attn(self.temporal_norm(x), grid, cp)  # (B, N, C)
        x = x + self.cross_attn(self.norm2(x), text)  # (B, N, C)
        return x + gate2 * self.mlp(modulate(self.norm3(x), shift2, scale2))  # (B, N, C)


class FinalLayer(nn.Module):
    """adaLN modulation and a zero-initialised projection back to patch pixels."""

    def __init__(self, dim: int, patch_volume: int, out_channels: int):
        super().__init__()
        self.norm = nn.LayerNorm(dim, elementwise_affine=False, eps=1e-6)
        self.adaLN = nn.Sequential(nn.SiLU(), nn.Linear(dim, 2 * dim))
        self.proj = nn.Linear(dim, patch_volume * out_channels)
        for layer in (self.adaLN[1], self.proj):
            nn.init.zeros_(layer.weight)
            nn.init.zeros_(layer.bias)

    def forward(self, x, c):  # (B, N, C), (B, C) -> (B, N, p*Cout)
        shift, scale = self.adaLN(c)[:, None].chunk(2, dim=-1)
        return self.proj(modulate(self.norm(x), shift, scale))


class VideoDiT(DSVStages, VideoModel):
    """Text-to-video DiT on latents (B, 4, F, h, w); self-attention kind chosen by config.attention."""

    def __init__(self, config: DiTConfig):
        super().__init__(config)
        C, (pt, ph, pw) = config.hidden_size, config.patch_size
        self.patch_embed = nn.Linear(config.in_channels * pt * ph * pw, C)
        self.time_embed = TimestepEmbedder(C)
        self.text_embed = nn.Sequential(nn.Linear(config.text_dim, C), nn.GELU(approximate="tanh"), nn.Linear(C, C))
        self.blocks = nn.ModuleList(DiTBlock(config) for _ in range(config.depth))
        self.final = FinalLayer(C, pt * ph * pw, config.in_channels)
        self.context_parallel = None  # set to a context-parallel helper (shard_tokens/gather_tokens/attention)
        self._pos_cache: dict = {}
        self.init_dsv()

    @property
    def text_dim(self) -> int:
        return self.config.text_dim

    def group_of(self, parameter_name: str) -> str:
        if self.is_estimator(parameter_name):
            return "estimator"
        if ".temporal" in parameter_name:  # temporal_attn / temporal_norm (serial), attn.temporal (parallel)
            return "temporal"
        # full / window / dsv have no separate temporal layers; their self-attention mixes frames, so its
        # projections are what a video fine-tune adapts ('temporal'); everything else is the image DiT's.
        if self.config.attention in ("full", "window", "dsv") and re.match(r"blocks\.\d+\.attn\.(qkv|out)\.",
                                                                           parameter_name):
            return "temporal"
        return "spatial"

    def position_embedding(self, grid, device, dtype):  # -> (N, C), cached per grid
        key = (tuple(grid), str(device), dtype)
        if key not in self._pos_cache:
            self._pos_cache[key] = sincos_3d(self.config.hidden_size, grid).to(device=device, dtype=dtype)
        return self._pos_cache[key]

    def patchify(self, sample):  # (B, Cin, F, h, w) -> (B, N, Cin*pt*ph*pw), grid
        B, Cin, Fr, h, w = sample.shape
        pt, ph, pw = self.config.patch_size
        grid = (Fr // pt, h // ph, w // pw)
        x = sample.view(B, Cin, grid[0], pt, grid[1], ph, grid[2], pw).permute(0, 2, 4, 6, 1, 3, 5, 7)
        return x.reshape(B, grid[0] * grid[1] * grid[2], Cin * pt * ph * pw), grid

    def unpatchify(self, x, grid):  # (B, N, Cout*pt*ph*pw) -> (B, Cout, F, h, w)
        B = x.shape[0]
        (pt, ph, pw), Cout = self.config.patch_size, self.config.in_channels
        x = x.view(B, *grid, Cout, pt, ph, pw).permute(0, 4, 1, 5, 2, 6, 3, 7)
        return x.reshape(B, Cout, grid[0] * pt, grid[1] * ph, grid[2] * pw)

    def forward(self, sample, timesteps, text):  # (B,4,F,h,w), (B,), (B,L,Dt) -> (B,4,F,h,w)
        if self._dsv:
            self._begin_forward(sample, timesteps, text)
        tokens, grid = self.patchify(sample)
        x = self.patch_embed(tokens) + self.position_embedding(grid, sample.device, sample.dtype)  # (B, N, C)
        c = self.time_embed(timesteps)  # (B, C)
        text = self.text_embed(text)  # (B, L, C)
        cp = self.context_parallel
        if cp is not None:
            x = cp.shard_tokens(x)  # (B, N/world, C)
        for block in self.blocks:
            x = block(x, c, text, grid, cp)  # (B, N, C)
        if cp is not None:
            x = cp.gather_tokens(x)  # (B, N, C)
        return self.unpatchify(self.final(x, c), grid)  # (B, 4, F, h, w)

def check_shape(config: DiTConfig, frames: int, height: int, width: int) -> None:
    pt, ph, pw = config.patch_size
    if frames % pt:
        raise ValueError(f"frames must be a multiple of {pt} (temporal patch), got {frames}")
    for name, size, p in (("height", height, ph), ("width", width, pw)):
        if size % (LATENT_SCALE * p):
            raise ValueError(f"{name} must be a multiple of {LATENT_SCALE * p} (latent /{LATENT_SCALE}, "
                             f"patch {p}), got {size}")


PRESETS = {  # sizes; the attention kind is filled in per architecture
    "tiny": dict(hidden_size=64, depth=2, heads=2, head_dim=32, text_dim=64),
    "small": dict(hidden_size=384, depth=12, heads=6, head_dim=64, text_dim=768),
    # DSV's 0.8B and 2.7B; GPU-sized, so 128-token DSV blocks: FlexAttention's native block size
    "0.8b": dict(hidden_size=1152, depth=28, heads=12, head_dim=96, text_dim=4096, block_size=128),
    "2.7b": dict(hidden_size=2048, depth=32, heads=16, head_dim=128, text_dim=4096, block_size=128),
}

ARCHS = {
    "dit-full": ("full", "video DiT, full 3D self-attention (SDPA)"),
    "dit-window": ("window", "video DiT, 3D local window attention (DSV's baseline)"),
    "dit-serial-st": ("serial", "video DiT, spatial then temporal attention (image DiT + motion modules)"),
    "dit-parallel-st": ("parallel", "video DiT, spatial and temporal attention side by side (Mobius in a DiT)"),
    "dit-dsv": ("dsv", "video DiT, DSV learned block-sparse attention (estimator + profiled sparsity)"),
}


def _preset(kind: str, sizes: dict):
    return lambda: DiTConfig(attention=kind, **sizes)


for _name, (_kind, _description) in ARCHS.items():
    register(Architecture(name=_name, family="dit", config_cls=DiTConfig,
                          presets={p: _preset(_kind, s) for p, s in PRESETS.items()}, build=VideoDiT,
                          description=_description, check_shape=check_shape, tokens=DiTConfig.tokens,
                          context_parallel=CONTEXT_PARALLEL_MODES, lora_targets=DIT_LORA_TARGETS))
