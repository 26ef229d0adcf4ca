"""LTX-Video (diffusers' LTXVideoTransformer3DModel): full 3D self-attention on 1x1x1 patches of a highly
compressed latent (128 channels, /32 spatial, 8x causal temporal: 121 frames -> 16), T5 cross-attention,
flow matching."""
from __future__ import annotations

from dataclasses import dataclass

import torch

from .diffusers_import import diffusers_class
from .video_transformers import (DiffusersVideoModel, SwapSettings, TokenPlan, check_latent_shape,
                                 register_video_transformer, video_grid)

FRAME_RATE = 25  # the pipeline's default; RoPE positions are scaled by (temporal compression / fps, 32, 32)


@dataclass(frozen=True)
class LTXVideoConfig(SwapSettings):
    """LTXVideoTransformer3DModel sizes (Lightricks/LTX-Video 0.9 transformer/config.json)."""

    num_attention_heads: int = 32
    attention_head_dim: int = 64
    num_layers: int = 28
    text_dim: int = 4096  # T5-XXL (caption_channels)
    text_tokens: int = 128

    def __post_init__(self):
        super().__post_init__()
        for name in ("num_attention_heads", "attention_head_dim", "num_layers", "text_dim", "text_tokens"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name}: must be >= 1, got {getattr(self, name)}")


class LTXVideo(DiffusersVideoModel):
    """LTX-Video transformer (random weights), rectified flow on (B, 128, 1 + (F-1)/8, H/32, W/32) latents."""

    latent_channels = 128
    spatial_compression = 32
    temporal_compression = 8
    objective = "flow"
    patch = (1, 1, 1)
    token_plan = TokenPlan(shard="transformer.transformer_blocks.0", rotary="transformer.rope",
                           gather="transformer.proj_out")

    def build_transformer(self, config: LTXVideoConfig):
        LTXVideoTransformer3DModel = diffusers_class("LTXVideoTransformer3DModel")

        inner = config.num_attention_heads * config.attention_head_dim
        return LTXVideoTransformer3DModel(
            in_channels=self.latent_channels, out_channels=self.latent_channels, patch_size=1, patch_size_t=1,
            num_attention_heads=config.num_attention_heads, attention_head_dim=config.attention_head_dim,
            cross_attention_dim=inner, num_layers=config.num_layers, caption_channels=config.text_dim)

    def attention_targets(self):
        return [([block.attn1 for block in self.transformer.transformer_blocks], "none", video_grid)]

    def run(self, latents, timesteps, text):  # (B, 128, F, h, w), (B,), (B, L, 4096) -> (B, 128, F, h, w)
        B, C, Fr, h, w = latents.shape
        tokens = latents.flatten(2).transpose(1, 2)  # (B, F*h*w, 128): the pipeline's packing for 1x1x1 patches
        mask = torch.ones(text.shape[:2], dtype=torch.long, device=text.device)
        scale = (self.temporal_compression / FRAME_RATE, self.spatial_compression, self.spatial_compression)
        out = self.transformer(tokens, text, timesteps, mask, num_frames=Fr, height=h, width=w,
                               rope_interpolation_scale=scale, return_dict=False)[0]  # (B, F*h*w, 128)
        return out.transpose(1, 2).reshape(B, C, Fr, h, w)


def check_shape(config: LTXVideoConfig, frames: int, height: int, width: int) -> None:
    check_latent_shape(LTXVideo, config, frames, height, width, LTXVideo.patch)


PRESETS = {
    "tiny": dict(num_attention_heads=2, attention_head_dim=32, num_layers=2, text_dim=32, text_tokens=16,
                 block_size=16, window_size=(2, 4, 4)),
    "2b": dict(num_attention_heads=32, attention_head_dim=64, num_layers=28, block_size=128),
}

register_video_transformer("ltx-video", LTXVideoConfig, PRESETS, LTXVideo,
                           "LTX-Video 0.9 (diffusers LTXVideoTransformer3DModel): full 3D attention on a /32 x /8 latent, "
                           "flow matching",
                           check_shape)
