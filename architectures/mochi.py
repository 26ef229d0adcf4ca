"""Mochi 1 (diffusers' MochiTransformer3DModel): asymmetric joint text-video attention (video 3072 wide, text 1536,
text last), flow matching on the Mochi VAE's latents (12 channels, /8 spatial, 6x causal temporal: 163 frames ->
28), with Mochi's own time and sign convention."""
from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

from .base import NUM_TRAIN_TIMESTEPS, VideoBatch
from .diffusers_import import diffusers_class
from .video_transformers import (DiffusersVideoModel, SwapSettings, check_latent_shape,
                                 register_video_transformer, video_grid)


@dataclass(frozen=True)
class MochiConfig(SwapSettings):
    """MochiTransformer3DModel sizes (genmo/mochi-1-preview transformer/config.json, diffusers' defaults)."""

    num_attention_heads: int = 24
    attention_head_dim: int = 128
    num_layers: int = 48
    pooled_projection_dim: int = 1536  # the text stream's width inside every block
    time_embed_dim: int = 256
    text_dim: int = 4096  # T5-v1.1-XXL
    text_tokens: int = 256  # max_sequence_length: the pipeline pads prompts to 256 tokens

    def __post_init__(self):
        super().__post_init__()
        for name in ("num_attention_heads", "attention_head_dim", "num_layers", "pooled_projection_dim",
                     "time_embed_dim", "text_dim", "text_tokens"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name}: must be >= 1, got {getattr(self, name)}")
        if self.text_dim % 8:  # the caption pooler has 8 heads over the text width
            raise ValueError(f"text_dim must be a multiple of 8 (the caption pooler's heads), got {self.text_dim}")
        if self.attention_head_dim % 2:
            raise ValueError(f"attention_head_dim must be even (rotary pairs), got {self.attention_head_dim}")


def rotate_pairs(x, cos, sin):  # (B, N, H, D), (N, H, D/2) x2 -> (B, N, H, D)
    """Mochi's rotary embedding: each (even, odd) feature pair rotated, in fp32, back in x's dtype."""
    even, odd = x[..., 0::2].float(), x[..., 1::2].float()
    return torch.stack([even * cos - odd * sin, even * sin + odd * cos], dim=-1).flatten(-2).to(x.dtype)


class MochiJointAttnProcessor:
    """Mochi's joint attention over [video; text] as one attention call, every text token valid."""

    # diffusers' MochiAttnProcessor2_0 drops each sample's padding text tokens with torch.nonzero and attends
    # sample by sample: a data-dependent shape that `predict`'s fake tensors cannot run. stbench's text has no
    # padding, so one call over all tokens computes the same attention (tested against diffusers' processor);
    # projections, q/k RMS norms, rotary embedding (video only) and output projections are the module's own.

    def __call__(self, attn, hidden_states, encoder_hidden_states, attention_mask=None, image_rotary_emb=None):
        # (B, N, d), (B, L, p) -> (B, N, d), (B, L, p)
        N, L = hidden_states.shape[1], encoder_hidden_states.shape[1]

        def heads(x):  # (B, n, H*D) -> (B, n, H, D)
            return x.unflatten(2, (attn.heads, -1))

        q = attn.norm_q(heads(attn.to_q(hidden_states)))
        k = attn.norm_k(heads(attn.to_k(hidden_states)))
        v = heads(attn.to_v(hidden_states))
        text_q = attn.norm_added_q(heads(attn.add_q_proj(encoder_hidden_states)))
        text_k = attn.norm_added_k(heads(attn.add_k_proj(encoder_hidden_states)))
        text_v = heads(attn.add_v_proj(encoder_hidden_states))
        if image_rotary_emb is not None:
            q, k = rotate_pairs(q, *image_rotary_emb), rotate_pairs(k, *image_rotary_emb)
        q, k, v = (torch.cat(pair, dim=1).transpose(1, 2) for pair in ((q, text_q), (k, text_k), (v, text_v)))
        out = F.scaled_dot_product_attention(q, k, v)  # (B, H, N + L, D): text last
        video, text = out.transpose(1, 2).flatten(2, 3).split_with_sizes((N, L), dim=1)
        video = attn.to_out[1](attn.to_out[0](video))  # projection, dropout
        if hasattr(attn, "to_add_out"):  # the last block keeps no text output (context_pre_only)
            text = attn.to_add_out(text)
        return video, text


class Mochi(DiffusersVideoModel):
    """Mochi 1 preview transformer (random weights), rectified flow on (B, 12, 1 + (F-1)/6, H/8, W/8) latents."""

    latent_channels = 12
    temporal_compression = 6  # MochiPipeline.vae_temporal_scale_factor: (frames - 1) // 6 + 1 latent frames
    objective = "flow"  # with Mochi's reversed time and sign: see `target` and `run`
    patch = (1, 2, 2)

    def build_transformer(self, config: MochiConfig):
        MochiTransformer3DModel = diffusers_class("MochiTransformer3DModel")

        transformer = MochiTransformer3DModel(
            patch_size=self.patch[1], num_attention_heads=config.num_attention_heads,
            attention_head_dim=config.attention_head_dim, num_layers=config.num_layers,
            pooled_projection_dim=config.pooled_projection_dim, in_channels=self.latent_channels,
            text_embed_dim=config.text_dim, time_embed_dim=config.time_embed_dim,
            max_sequence_length=config.text_tokens)
        for block in transformer.transformer_blocks:
            block.attn1.processor = MochiJointAttnProcessor()
        return transformer

    def attention_targets(self):
        return [([block.attn1 for block in self.transformer.transformer_blocks], "last", video_grid)]

    def target(self, batch: VideoBatch) -> torch.Tensor:  # -> (B, 12, F, h, w)
        # Mochi predicts x_0 - noise, the negative of the straight path's velocity: cogvideox-factory's
        # training/mochi-1/text_to_video_lora.py (`ut = z - eps`), and MochiPipeline steps its inverted sigmas
        # (FlowMatchEulerDiscreteScheduler invert_sigmas) by + (sigma - sigma_next) * prediction
        return batch.latents - batch.noise

    def run(self, latents, timesteps, text):  # (B, 12, F, h, w), (B,), (B, L, 4096) -> (B, 12, F, h, w)
        # stbench's noise level is sigma = t / 1000 (x_t = (1 - sigma) x_0 + sigma noise, base.add_noise); Mochi's
        # time runs the other way, (1 - sigma) * 1000 (the same training script; MochiPipeline's timesteps)
        mask = torch.ones(text.shape[:2], dtype=torch.bool, device=text.device)  # no padding
        return self.transformer(latents, text, NUM_TRAIN_TIMESTEPS - timesteps, mask, return_dict=False)[0]


def check_shape(config: MochiConfig, frames: int, height: int, width: int) -> None:
    check_latent_shape(Mochi, config, frames, height, width, Mochi.patch)


PRESETS = {
    "tiny": dict(num_attention_heads=2, attention_head_dim=32, num_layers=2, pooled_projection_dim=32,
                 time_embed_dim=32, text_dim=32, text_tokens=16, block_size=16, window_size=(2, 4, 4)),
    # genmo/mochi-1-preview transformer/config.json (commit e1dc92d, "Add Diffusers weights"): 24 heads x 128,
    # 48 layers, pooled_projection_dim 1536, in_channels 12, patch 2, text_embed_dim 4096, time_embed_dim 256,
    # max_sequence_length 256; the model card calls it "a 10 billion parameter diffusion model"
    "10b": dict(num_attention_heads=24, attention_head_dim=128, num_layers=48, pooled_projection_dim=1536,
                time_embed_dim=256, block_size=128),
}

register_video_transformer("mochi", MochiConfig, PRESETS, Mochi,
                           "Mochi 1 preview (diffusers MochiTransformer3DModel): asymmetric joint text-video "
                           "attention, flow matching",
                           check_shape)
