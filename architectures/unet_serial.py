"""Serial 3D-UNets: diffusers' AnimateDiff `UNetMotionModel` and ModelScope `UNet3DConditionModel`, used as is.

Serial means every layer runs its spatial part S (resnet + spatial transformer) and then its temporal part
T (motion module or temporal conv/attention): `h = T(S(h))`. Weights are random; nothing is downloaded.
"""
from __future__ import annotations

import functools
from dataclasses import dataclass

import torch
import torch.utils.checkpoint
from torch import nn
from torch.profiler import record_function

from .base import LATENT_SCALE, VideoModel
from .diffusers_import import diffusers_class
from .registry import Architecture, register


@dataclass(frozen=True)
class UNetConfig:
    """Sizes of an SD-style 2D UNet plus AnimateDiff motion modules (shared by the three AnimateDiff archs)."""

    block_out_channels: tuple[int, ...] = (320, 640, 1280, 1280)
    layers_per_block: int = 2
    cross_attention_dim: int = 768
    num_attention_heads: int = 8  # spatial transformer heads (SD1.5's config calls this attention_head_dim)
    transformer_layers_per_block: int = 1
    norm_num_groups: int = 32
    motion_num_attention_heads: int = 8
    motion_max_seq_length: int = 32  # sinusoidal positions: the most frames a motion module can take
    temporal_transformer_layers_per_block: int = 1
    use_motion_mid_block: bool = True  # AnimateDiff v1.5 v2 (mm_sd_v15_v2) has a mid-block motion module
    zero_init_temporal: bool = True  # motion modules' proj_out starts at zero: the video model = the image model
    spatial_checkpointing: bool = False  # recompute resnets + spatial transformers in backward (saves activations)

    @property
    def levels(self) -> int:
        return len(self.block_out_channels)


UNET_PRESETS = {
    "tiny": lambda: UNetConfig(block_out_channels=(32, 64), layers_per_block=1, cross_attention_dim=32,
                               num_attention_heads=2, norm_num_groups=8, motion_num_attention_heads=2),
    "small": lambda: UNetConfig(block_out_channels=(128, 256, 512, 512), layers_per_block=2,
                                cross_attention_dim=768, num_attention_heads=8, norm_num_groups=32,
                                motion_num_attention_heads=8),
    # Stable Diffusion 1.5 UNet + AnimateDiff v1.5 v2 motion modules at their published sizes
    "sd15": lambda: UNetConfig(),
}


def build_motion_unet(config: UNetConfig):
    """diffusers' UNetMotionModel for `config`: cross-attention on every level but the deepest, as in SD1.5."""
    UNetMotionModel = diffusers_class("UNetMotionModel")

    levels = config.levels
    unet = UNetMotionModel(
        block_out_channels=config.block_out_channels,
        down_block_types=("CrossAttnDownBlockMotion",) * (levels - 1) + ("DownBlockMotion",),
        up_block_types=("UpBlockMotion",) + ("CrossAttnUpBlockMotion",) * (levels - 1),
        layers_per_block=config.layers_per_block,
        cross_attention_dim=config.cross_attention_dim,
        num_attention_heads=config.num_attention_heads,
        transformer_layers_per_block=config.transformer_layers_per_block,
        norm_num_groups=config.norm_num_groups,
        motion_num_attention_heads=config.motion_num_attention_heads,
        motion_max_seq_length=config.motion_max_seq_length,
        temporal_transformer_layers_per_block=config.temporal_transformer_layers_per_block,
        use_motion_mid_block=config.use_motion_mid_block,
    )
    if config.zero_init_temporal:
        for module in motion_modules(unet):
            nn.init.zeros_(module.proj_out.weight)
            nn.init.zeros_(module.proj_out.bias)
    return unet


def motion_modules(unet) -> list[nn.Module]:
    """Every AnimateDiff motion module of a UNetMotionModel, in forward order (down, mid, up)."""
    blocks = [*unet.down_blocks, unet.mid_block, *unet.up_blocks]
    return [m for block in blocks for m in getattr(block, "motion_modules", [])]


def _recomputed(forward, *args, **kwargs):
    if not torch.is_grad_enabled():
        return forward(*args, **kwargs)
    return torch.utils.checkpoint.checkpoint(forward, *args, use_reentrant=False, **kwargs)


def checkpoint_spatial_layers(unet) -> None:
    """Activation checkpointing of every resnet and spatial transformer: backward recomputes them from their
    inputs instead of keeping their intermediates. (diffusers' own gradient checkpointing wraps whole blocks,
    motion modules included, so it is not this.)"""
    for block in [*unet.down_blocks, unet.mid_block, *unet.up_blocks]:
        for module in [*block.resnets, *(getattr(block, "attentions", None) or [])]:
            module.forward = functools.partial(_recomputed, module.forward)


def check_unet_shape(config, frames: int, height: int, width: int) -> None:
    """Latents must halve cleanly at every downsampler; motion modules know at most motion_max_seq_length frames."""
    factor = LATENT_SCALE * 2 ** (len(config.block_out_channels) - 1)
    if height % factor or width % factor:
        raise ValueError(f"{height}x{width} pixels cannot be downsampled {len(config.block_out_channels) - 1} times "
                         f"(latents /8 must divide by {factor // LATENT_SCALE}): use a multiple of {factor}")
    max_frames = getattr(config, "motion_max_seq_length", None)
    if max_frames is not None and frames > max_frames:
        raise ValueError(f"{frames} frames exceed the motion modules' motion_max_seq_length={max_frames}")


class ProfilerRegions:
    """Labels forward time `spatial`, switching to `temporal` inside the given modules (profiler ranges)."""

    def __init__(self, temporal: list[nn.Module]):
        self._open: list[record_function] = []
        for module in temporal:
            module.register_forward_pre_hook(lambda *_: self.switch("temporal"))
            module.register_forward_hook(lambda *_: self.switch("spatial"))

    def switch(self, name: str | None) -> None:
        if self._open:
            self._open.pop().__exit__(None, None, None)
        if name is not None:
            region = record_function(name)
            region.__enter__()
            self._open.append(region)


def frames_to_batch(sample: torch.Tensor) -> torch.Tensor:  # (B, C, F, h, w) -> (B*F, C, h, w)
    b, c, f, h, w = sample.shape
    return sample.permute(0, 2, 1, 3, 4).reshape(b * f, c, h, w)


def batch_to_frames(x: torch.Tensor, frames: int) -> torch.Tensor:  # (B*F, C, h, w) -> (B, C, F, h, w)
    bf, c, h, w = x.shape
    return x.reshape(bf // frames, frames, c, h, w).permute(0, 2, 1, 3, 4)


class SerialUNet(VideoModel):
    """AnimateDiff: SD UNet with a motion module after every resnet+transformer layer (diffusers UNetMotionModel)."""

    def __init__(self, config: UNetConfig):
        super().__init__(config)
        self.unet = build_motion_unet(config)
        if config.spatial_checkpointing:
            checkpoint_spatial_layers(self.unet)
        self._regions = ProfilerRegions(motion_modules(self.unet))

    @property
    def text_dim(self) -> int:
        return self.config.cross_attention_dim

    def group_of(self, parameter_name: str) -> str:
        return "temporal" if ".motion_modules." in parameter_name else "spatial"

    def forward(self, sample, timesteps, text):  # (B,C,F,h,w), (B,), (B,L,D) -> (B,C,F,h,w)
        frames = sample.shape[2]
        text = text.repeat_interleave(frames, dim=0)  # (B*F, L, D): UNetMotionModel wants text per frame
        self._regions.switch("spatial")
        try:
            return self.unet(sample, timesteps, text, return_dict=False)[0]  # (B, C, F, h, w)
        finally:
            self._regions.switch(None)


@dataclass(frozen=True)
class ModelScopeConfig:
    """Sizes of diffusers' UNet3DConditionModel (ModelScope text-to-video): temporal conv + attention per layer."""

    block_out_channels: tuple[int, ...] = (320, 640, 1280, 1280)
    layers_per_block: int = 2
    cross_attention_dim: int = 1024
    attention_head_dim: int = 64  # diffusers uses it as the number of heads (see its issue #2011)
    norm_num_groups: int = 32
    zero_init_temporal: bool = True  # temporal attention proj_out zero (diffusers already zeroes the temporal convs)


MODELSCOPE_PRESETS = {
    "tiny": lambda: ModelScopeConfig(block_out_channels=(32, 64), layers_per_block=1, cross_attention_dim=32,
                                     attention_head_dim=2, norm_num_groups=8),
    "small": lambda: ModelScopeConfig(block_out_channels=(128, 256, 512, 512), cross_attention_dim=768,
                                      attention_head_dim=8),
    # ModelScope text-to-video-ms-1.7b at its published sizes (an SD2-style UNet; text 1024-d)
    "sd15": lambda: ModelScopeConfig(),
}


class ModelScopeUNet(VideoModel):
    """ModelScope T2V: temporal conv and temporal attention after each spatial layer (diffusers UNet3DConditionModel)."""

    TEMPORAL_PARTS = ("transformer_in", "temp_convs", "temp_attentions")

    def __init__(self, config: ModelScopeConfig):
        super().__init__(config)
        UNet3DConditionModel = diffusers_class("UNet3DConditionModel")

        levels = len(config.block_out_channels)
        self.unet = UNet3DConditionModel(
            block_out_channels=config.block_out_channels,
            down_block_types=("CrossAttnDownBlock3D",) * (levels - 1) + ("DownBlock3D",),
            up_block_types=("UpBlock3D",) + ("CrossAttnUpBlock3D",) * (levels - 1),
            layers_per_block=config.layers_per_block,
            cross_attention_dim=config.cross_attention_dim,
            attention_head_dim=config.attention_head_dim,
            norm_num_groups=config.norm_num_groups,
        )
        temporal = [m for name, m in self.unet.named_modules()
                    if name == "transformer_in" or name.split(".")[-2:-1] in (["temp_convs"], ["temp_attentions"])]
        if config.zero_init_temporal:
            for module in temporal:
                if hasattr(module, "proj_out"):
                    nn.init.zeros_(module.proj_out.weight)
                    nn.init.zeros_(module.proj_out.bias)
        self._regions = ProfilerRegions(temporal)

    @property
    def text_dim(self) -> int:
        return self.config.cross_attention_dim

    def group_of(self, parameter_name: str) -> str:
        parts = parameter_name.split(".")
        return "temporal" if any(p in self.TEMPORAL_PARTS for p in parts) else "spatial"

    def forward(self, sample, timesteps, text):  # (B,C,F,h,w), (B,), (B,L,D) -> (B,C,F,h,w)
        self._regions.switch("spatial")
        try:
            return self.unet(sample, timesteps, text, return_dict=False)[0]  # repeats text per frame itself
        finally:
            self._regions.switch(None)


register(Architecture(
    name="serial-unet", family="unet", config_cls=UNetConfig, presets=UNET_PRESETS, build=SerialUNet,
    description="AnimateDiff 3D-UNet (diffusers UNetMotionModel): motion module after each spatial layer",
    check_shape=check_unet_shape))
register(Architecture(
    name="modelscope-unet", family="unet", config_cls=ModelScopeConfig, presets=MODELSCOPE_PRESETS,
    build=ModelScopeUNet,
    description="ModelScope T2V 3D-UNet (diffusers UNet3DConditionModel): temporal conv + attention per layer",
    check_shape=check_unet_shape))
