"""HunyuanVideo (diffusers' HunyuanVideoTransformer3DModel): dual-stream then single-stream blocks with joint
text-video 3D attention (text last), flow matching on the HunyuanVideo VAE's latents (16 channels, /8 spatial,
4x causal temporal: 129 frames -> 33)."""
from __future__ import annotations

from dataclasses import dataclass

import torch

from .diffusers_import import diffusers_class
from .video_transformers import (DiffusersVideoModel, SwapSettings, check_latent_shape,
                                 register_video_transformer, video_grid)

GUIDANCE = 6.0  # the distilled guidance the released T2V model is sampled with (pipeline default), x1000


@dataclass(frozen=True)
class HunyuanVideoConfig(SwapSettings):
    """HunyuanVideoTransformer3DModel sizes (hunyuanvideo-community/HunyuanVideo transformer/config.json)."""

    num_attention_heads: int = 24
    attention_head_dim: int = 128
    num_layers: int = 20  # dual-stream blocks
    num_single_layers: int = 40
    num_refiner_layers: int = 2
    rope_axes_dim: tuple[int, ...] = (16, 56, 56)  # (frames, rows, cols) share of each head's dims
    text_dim: int = 4096  # LLaVA-LLaMA-3 hidden states
    text_tokens: int = 256
    pooled_dim: int = 768  # CLIP-L pooled embedding

    def __post_init__(self):
        super().__post_init__()
        for name in ("num_attention_heads", "attention_head_dim", "num_layers", "text_dim", "text_tokens",
                     "pooled_dim"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name}: must be >= 1, got {getattr(self, name)}")
        if sum(self.rope_axes_dim) != self.attention_head_dim or len(self.rope_axes_dim) != 3:
            raise ValueError(f"rope_axes_dim: three values summing to attention_head_dim ({self.attention_head_dim}), "
                             f"got {self.rope_axes_dim}")
        if self.pooled_dim > self.text_dim:
            raise ValueError(f"pooled_dim ({self.pooled_dim}) must not exceed text_dim ({self.text_dim})")


class HunyuanVideo(DiffusersVideoModel):
    """HunyuanVideo T2V transformer (random weights), rectified flow on (B, 16, 1 + (F-1)/4, H/8, W/8) latents."""

    latent_channels = 16
    temporal_compression = 4
    objective = "flow"
    patch = (1, 2, 2)

    def build_transformer(self, config: HunyuanVideoConfig):
        HunyuanVideoTransformer3DModel = diffusers_class("HunyuanVideoTransformer3DModel")

        return HunyuanVideoTransformer3DModel(
            in_channels=self.latent_channels, out_channels=self.latent_channels,
            num_attention_heads=config.num_attention_heads, attention_head_dim=config.attention_head_dim,
            num_layers=config.num_layers, num_single_layers=config.num_single_layers,
            num_refiner_layers=config.num_refiner_layers, patch_size=self.patch[1], patch_size_t=self.patch[0],
            guidance_embeds=True, text_embed_dim=config.text_dim, pooled_projection_dim=config.pooled_dim,
            rope_axes_dim=tuple(config.rope_axes_dim))

    def attention_targets(self):
        blocks = list(self.transformer.transformer_blocks) + list(self.transformer.single_transformer_blocks)
        return [([block.attn for block in blocks], "last", video_grid)]  # not the text refiner's attention

    def run(self, latents, timesteps, text):  # (B, 16, F, h, w), (B,), (B, L, 4096) -> (B, 16, F, h, w)
        B, L, _ = text.shape
        # stbench's batch has one random text tensor: the CLIP pooled vector stands in as its first token's
        # leading features (random either way); every text token is valid (no padding)
        pooled = text[:, 0, :self.config.pooled_dim]  # (B, 768)
        mask = torch.ones(B, L, dtype=torch.long, device=text.device)
        guidance = torch.full((B,), GUIDANCE * 1000.0, dtype=latents.dtype, device=latents.device)
        return self.transformer(latents, timesteps, text, mask, pooled, guidance=guidance, return_dict=False)[0]


def check_shape(config: HunyuanVideoConfig, frames: int, height: int, width: int) -> None:
    check_latent_shape(HunyuanVideo, config, frames, height, width, HunyuanVideo.patch)


PRESETS = {
    "tiny": dict(num_attention_heads=2, attention_head_dim=32, num_layers=1, num_single_layers=1,
                 num_refiner_layers=1, rope_axes_dim=(8, 12, 12), text_dim=32, text_tokens=16, pooled_dim=16,
                 block_size=16, window_size=(2, 4, 4)),
    "13b": dict(num_attention_heads=24, attention_head_dim=128, num_layers=20, num_single_layers=40, block_size=128),
}

register_video_transformer("hunyuan-video", HunyuanVideoConfig, PRESETS, HunyuanVideo,
                           "HunyuanVideo (diffusers HunyuanVideoTransformer3DModel): dual- then single-stream joint "
                           "text-video attention, flow matching",
                           check_shape)
