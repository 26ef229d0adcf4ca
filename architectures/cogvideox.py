"""CogVideoX 1.0 (diffusers' CogVideoXTransformer3DModel): joint text-video 3D attention (226 T5 tokens first),
v-prediction on the CogVideoX VAE's latents (16 channels, /8 spatial, 4x causal temporal: 49 frames -> 13)."""
from __future__ import annotations

from dataclasses import dataclass

from .diffusers_import import diffusers_class
from .video_transformers import (DiffusersVideoModel, SwapSettings, check_latent_shape,
                                 register_video_transformer, video_grid)


@dataclass(frozen=True)
class CogVideoXConfig(SwapSettings):
    """CogVideoXTransformer3DModel sizes (THUDM/CogVideoX-2b and -5b transformer/config.json) and schedule."""

    num_attention_heads: int = 30
    attention_head_dim: int = 64
    num_layers: int = 30
    time_embed_dim: int = 512
    text_dim: int = 4096  # T5-XXL
    text_tokens: int = 226  # max_text_seq_length: the position table covers exactly this many text tokens
    use_rotary_positional_embeddings: bool = False  # 2b: 3D sin-cos table; 5b: 3D RoPE
    snr_shift_scale: float = 3.0  # CogVideoXDDIMScheduler's SNR shift: 3.0 for 2b, 1.0 for 5b

    def __post_init__(self):
        super().__post_init__()
        for name in ("num_attention_heads", "attention_head_dim", "num_layers", "time_embed_dim", "text_dim",
                     "text_tokens"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name}: must be >= 1, got {getattr(self, name)}")


def crop_region(grid_hw, base_hw):  # -> ((top, left), (bottom, right)) of the grid fitted inside the base grid
    """The centred region the pipeline's RoPE uses (its pipeline module needs `transformers`, so not imported)."""
    (h, w), (bh, bw) = grid_hw, base_hw
    rh, rw = (bh, round(bh / h * w)) if h / w > bh / bw else (round(bw / w * h), bw)
    top, left = round((bh - rh) / 2), round((bw - rw) / 2)
    return (top, left), (top + rh, left + rw)


class CogVideoX(DiffusersVideoModel):
    """CogVideoX T2V transformer (random weights), v-prediction on (B, 16, 1 + (F-1)/4, H/8, W/8) latents."""

    latent_channels = 16
    temporal_compression = 4
    objective = "v"
    patch = (1, 2, 2)
    sample_size = (60, 90)  # latent (h, w) of 480x720, the trained size; RoPE crops are relative to it

    def __init__(self, config: CogVideoXConfig):
        CogVideoXDDIMScheduler = diffusers_class("CogVideoXDDIMScheduler")

        super().__init__(config)
        # the published schedule: scaled-linear betas, zero terminal SNR, SNR shifted by snr_shift_scale
        scheduler = CogVideoXDDIMScheduler(beta_schedule="scaled_linear", beta_start=0.00085, beta_end=0.012,
                                           prediction_type="v_prediction", rescale_betas_zero_snr=True,
                                           snr_shift_scale=config.snr_shift_scale)
        self.alphas_cumprod = scheduler.alphas_cumprod.float().to(self.alphas_cumprod.device)
        self._rope_cache: dict = {}

    def build_transformer(self, config: CogVideoXConfig):
        CogVideoXTransformer3DModel = diffusers_class("CogVideoXTransformer3DModel")

        return CogVideoXTransformer3DModel(
            num_attention_heads=config.num_attention_heads, attention_head_dim=config.attention_head_dim,
            in_channels=self.latent_channels, out_channels=self.latent_channels,
            time_embed_dim=config.time_embed_dim, text_embed_dim=config.text_dim, num_layers=config.num_layers,
            sample_height=self.sample_size[0], sample_width=self.sample_size[1], sample_frames=49,
            patch_size=self.patch[1], temporal_compression_ratio=self.temporal_compression,
            max_text_seq_length=config.text_tokens,
            use_rotary_positional_embeddings=config.use_rotary_positional_embeddings)

    def attention_targets(self):
        return [([block.attn1 for block in self.transformer.transformer_blocks], "first", video_grid)]

    def rotary_embedding(self, grid, device):  # -> (cos, sin), each (F*h*w, head_dim); as the pipeline makes it
        key = (grid, str(device))
        if key not in self._rope_cache:
            from diffusers.models.embeddings import get_3d_rotary_pos_embed

            base = tuple(s // self.patch[1] for s in self.sample_size)
            crops = crop_region(grid[1:], base)
            self._rope_cache[key] = get_3d_rotary_pos_embed(
                embed_dim=self.config.attention_head_dim, crops_coords=crops, grid_size=grid[1:],
                temporal_size=grid[0], device=device)
        return self._rope_cache[key]

    def run(self, latents, timesteps, text):  # (B, 16, F, h, w), (B,), (B, 226, 4096) -> (B, 16, F, h, w)
        rope = None
        if self.config.use_rotary_positional_embeddings:
            grid = tuple(n // p for n, p in zip(latents.shape[2:], self.patch))
            rope = self.rotary_embedding(grid, latents.device)
        out = self.transformer(latents.transpose(1, 2), text, timesteps, image_rotary_emb=rope,
                               return_dict=False)[0]  # (B, F, 16, h, w): CogVideoX puts frames first
        return out.transpose(1, 2)


def check_shape(config: CogVideoXConfig, frames: int, height: int, width: int) -> None:
    check_latent_shape(CogVideoX, config, frames, height, width, CogVideoX.patch)


PRESETS = {
    "tiny": dict(num_attention_heads=2, attention_head_dim=32, num_layers=2, time_embed_dim=32, text_dim=32,
                 text_tokens=16, block_size=16, window_size=(2, 4, 4)),
    "2b": dict(num_attention_heads=30, attention_head_dim=64, num_layers=30, snr_shift_scale=3.0),
    "5b": dict(num_attention_heads=48, attention_head_dim=64, num_layers=42, use_rotary_positional_embeddings=True,
               snr_shift_scale=1.0, block_size=128),
}

register_video_transformer("cogvideox", CogVideoXConfig, PRESETS, CogVideoX,
                           "CogVideoX 1.0 (diffusers CogVideoXTransformer3DModel): joint text-video 3D attention, v-prediction",
                           check_shape)
