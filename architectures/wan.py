"""Wan2.1 text-to-video (diffusers' WanTransformer3DModel): 3D full attention, umT5 text cross-attention,
flow matching on the Wan VAE's latents (16 channels, /8 spatial, 4x causal temporal: 81 frames -> 21)."""
from __future__ import annotations

from dataclasses import dataclass

from .diffusers_import import diffusers_class
from .video_transformers import (DiffusersVideoModel, SwapSettings, TokenPlan, check_latent_shape,
                                 register_video_transformer, video_grid)


@dataclass(frozen=True)
class WanConfig(SwapSettings):
    """WanTransformer3DModel sizes (Wan-AI/Wan2.1-T2V-* transformer/config.json) and the text it reads."""

    num_attention_heads: int = 12
    attention_head_dim: int = 128
    ffn_dim: int = 8960
    num_layers: int = 30
    text_dim: int = 4096  # umT5-XXL
    text_tokens: int = 512  # Wan pads prompts to 512 tokens
    freq_dim: int = 256

    def __post_init__(self):
        super().__post_init__()
        for name in ("num_attention_heads", "attention_head_dim", "ffn_dim", "num_layers", "text_dim", "text_tokens"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name}: must be >= 1, got {getattr(self, name)}")


class Wan(DiffusersVideoModel):
    """Wan2.1 T2V transformer (random weights) trained with rectified flow on (B, 16, 1 + (F-1)/4, H/8, W/8)."""

    latent_channels = 16
    temporal_compression = 4
    objective = "flow"
    patch = (1, 2, 2)
    token_plan = TokenPlan(shard="transformer.blocks.0", rotary="transformer.rope", gather="transformer.proj_out")

    def build_transformer(self, config: WanConfig):
        WanTransformer3DModel = diffusers_class("WanTransformer3DModel")

        return WanTransformer3DModel(
            patch_size=self.patch, num_attention_heads=config.num_attention_heads,
            attention_head_dim=config.attention_head_dim, in_channels=self.latent_channels,
            out_channels=self.latent_channels, text_dim=config.text_dim, freq_dim=config.freq_dim,
            ffn_dim=config.ffn_dim, num_layers=config.num_layers, cross_attn_norm=True,
            qk_norm="rms_norm_across_heads", eps=1e-6)

    def attention_targets(self):
        return [([block.attn1 for block in self.transformer.blocks], "none", video_grid)]

    def run(self, latents, timesteps, text):  # (B, 16, F, h, w), (B,), (B, L, 4096) -> (B, 16, F, h, w)
        return self.transformer(latents, timesteps, text, return_dict=False)[0]


def check_shape(config: WanConfig, frames: int, height: int, width: int) -> None:
    check_latent_shape(Wan, config, frames, height, width, Wan.patch)


PRESETS = {
    "tiny": dict(num_attention_heads=2, attention_head_dim=32, ffn_dim=128, num_layers=2, text_dim=32,
                 text_tokens=16, freq_dim=32, block_size=16, window_size=(2, 4, 4)),
    "1.3b": dict(num_attention_heads=12, attention_head_dim=128, ffn_dim=8960, num_layers=30),
    "14b": dict(num_attention_heads=40, attention_head_dim=128, ffn_dim=13824, num_layers=40, block_size=128),
}

register_video_transformer("wan", WanConfig, PRESETS, Wan,
                           "Wan2.1 T2V (diffusers WanTransformer3DModel): full 3D attention + text cross-attention, flow matching",
                           check_shape)
