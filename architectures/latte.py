"""Latte (diffusers' LatteTransformer3DModel): a serial spatial-temporal video transformer, each spatial block
(per-frame self-attention, T5 cross-attention) followed by a temporal block (per-position attention over frames),
eps-prediction on SD VAE latents (4 channels, /8 per frame)."""
from __future__ import annotations

from dataclasses import dataclass

from .base import TRAINING_MODES
from .diffusers_import import diffusers_class
from .video_transformers import DiffusersVideoModel, SwapSettings, check_latent_shape, register_video_transformer


@dataclass(frozen=True)
class LatteConfig(SwapSettings):
    """LatteTransformer3DModel sizes (maxin-cn/Latte-1 transformer/config.json: Latte-XL/2, 16 frames)."""

    num_attention_heads: int = 16
    attention_head_dim: int = 72
    num_layers: int = 28  # spatial blocks; as many temporal blocks
    text_dim: int = 4096  # T5-XXL (caption_channels)
    text_tokens: int = 120
    video_length: int = 16  # the temporal position table is this long: Latte takes exactly this many frames
    sample_size: int = 64  # latent size of the 2D position table (512 px)

    def __post_init__(self):
        super().__post_init__()
        for name in ("num_attention_heads", "attention_head_dim", "num_layers", "text_dim", "text_tokens",
                     "video_length", "sample_size"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name}: must be >= 1, got {getattr(self, name)}")


class Latte(DiffusersVideoModel):
    """Latte T2V transformer (random weights), eps-prediction on (B, 4, F, H/8, W/8) latents."""

    latent_channels = 4
    objective = "eps"
    patch = (1, 2, 2)
    temporal_prefixes = ("temporal_transformer_blocks.",)

    def __init__(self, config: LatteConfig):
        DDPMScheduler = diffusers_class("DDPMScheduler")

        super().__init__(config)
        # Latte trains on DiT's linear schedule (betas 1e-4..0.02), not SD's scaled-linear one
        schedule = DDPMScheduler(beta_schedule="linear").alphas_cumprod
        self.alphas_cumprod = schedule.float().to(self.alphas_cumprod.device)

    def build_transformer(self, config: LatteConfig):
        LatteTransformer3DModel = diffusers_class("LatteTransformer3DModel")

        inner = config.num_attention_heads * config.attention_head_dim
        return LatteTransformer3DModel(
            num_attention_heads=config.num_attention_heads, attention_head_dim=config.attention_head_dim,
            in_channels=self.latent_channels, out_channels=2 * self.latent_channels,  # eps and learned variance
            num_layers=config.num_layers, cross_attention_dim=inner, attention_bias=True,
            sample_size=config.sample_size, patch_size=self.patch[1], activation_fn="gelu-approximate",
            num_embeds_ada_norm=1000, norm_type="ada_norm_single", norm_elementwise_affine=False, norm_eps=1e-6,
            caption_channels=config.text_dim, video_length=config.video_length)

    def attention_targets(self):
        t = self.transformer
        return [([b.attn1 for b in t.transformer_blocks], "none", lambda g: (1, g[1], g[2])),  # one frame
                ([b.attn1 for b in t.temporal_transformer_blocks], "none", lambda g: (g[0], 1, 1))]  # one position

    def run(self, latents, timesteps, text):  # (B, 4, F, h, w), (B,), (B, L, 4096) -> (B, 4, F, h, w)
        out = self.transformer(latents, timesteps, text, return_dict=False)[0]  # (B, 8, F, h, w)
        # eps only: the learned-variance half (Latte's VLB term) is not part of stbench's loss
        return out[:, :self.latent_channels]


def check_shape(config: LatteConfig, frames: int, height: int, width: int) -> None:
    if frames != config.video_length:
        raise ValueError(f"frames must equal video_length ({config.video_length}; --set video_length=N for "
                         f"another), got {frames}")
    check_latent_shape(Latte, config, frames, height, width, Latte.patch)


PRESETS = {
    "tiny": dict(num_attention_heads=2, attention_head_dim=32, num_layers=2, text_dim=32, text_tokens=16,
                 video_length=8, sample_size=8, block_size=16, window_size=(2, 4, 4)),
    "xl": dict(num_attention_heads=16, attention_head_dim=72, num_layers=28, video_length=16, sample_size=64),
}

register_video_transformer("latte", LatteConfig, PRESETS, Latte,
                           "Latte-1 (diffusers LatteTransformer3DModel): serial spatial then temporal transformer blocks, "
                           "eps-prediction",
                           check_shape, modes=TRAINING_MODES)
