"""Mobius 3D-UNets (arXiv 2407.06617, our reading): spatial and temporal layers side by side instead of in series.

Both are built from the same diffusers `UNetMotionModel` as `serial-unet` and rewire its forward over its
own submodules. With T(x) = x + D(x) a motion module and S a layer's resnet + spatial transformer:

* `mobius-unet` (layer-parallel): `h = S(h) + D(h)`; same parameters as serial-unet.
* `mobius-ladder-unet` (decoupled streams): the spatial UNet runs per frame as the image model (without
  autograd when frozen); the motion modules form a side stream that reads the spatial features and rejoins
  at the output, so backward never enters a spatial layer. Its additions start at zero.
"""
from __future__ import annotations

import torch
from torch import nn
import torch.nn.functional as F
from torch.profiler import record_function

from .registry import Architecture, register
from .unet_serial import UNET_PRESETS, SerialUNet, UNetConfig, batch_to_frames, check_unet_shape, frames_to_batch


def motion_delta(module, x: torch.Tensor, frames: int) -> torch.Tensor:  # (B*F,C,h,w) -> (B*F,C,h,w)
    """D(x): an AnimateDiff motion module (AnimateDiffTransformer3D) without its residual, run on its submodules."""
    bf, c, h, w = x.shape
    z = module.norm(batch_to_frames(x, frames))  # (B, C, F, h, w), GroupNorm over frames too
    z = z.permute(0, 3, 4, 2, 1).reshape(-1, frames, c)  # (B*h*w, F, C): attention runs along frames
    z = module.proj_in(z)  # (B*h*w, F, D)
    for block in module.transformer_blocks:
        z = block(z)  # (B*h*w, F, D)
    z = module.proj_out(z)  # (B*h*w, F, C)
    z = z.reshape(bf // frames, h, w, frames, c).permute(0, 3, 4, 1, 2)  # (B, F, C, h, w)
    return z.reshape(bf, c, h, w)


def time_embedding(unet, timesteps: torch.Tensor, frames: int) -> torch.Tensor:  # (B,) -> (B*F, E)
    t = unet.time_proj(timesteps).to(unet.conv_in.weight.dtype)  # (B, C0)
    return unet.time_embedding(t).repeat_interleave(frames, dim=0)  # (B*F, E)


def walk_unet(unet, x, emb, text, layer):  # (B*F,4,h,w), (B*F,E), (B*F,L,D) -> (B*F,4,h,w)
    """The UNetMotionModel's 2D path over its own submodules; at each motion-module site the layer's output is
    `layer(site, motion_module, layer_input, resnet_output, spatial_output)` (spatial_output: serial without T)."""

    def spatial(module, *args, **kwargs):
        with record_function("spatial"):
            out = module(*args, **kwargs)
        return out[0] if isinstance(out, tuple) else out

    def cross_attention(attn, h):
        return spatial(attn, h, encoder_hidden_states=text, return_dict=False)

    site = 0
    h = spatial(unet.conv_in, x)  # (B*F, C0, h, w)
    skips = [h]
    for block in unet.down_blocks:
        attentions = getattr(block, "attentions", None) or [None] * len(block.resnets)
        for resnet, attn, motion in zip(block.resnets, attentions, block.motion_modules):
            r = spatial(resnet, h, emb)  # (B*F, C, h, w)
            h, site = layer(site, motion, h, r, cross_attention(attn, r) if attn is not None else r), site + 1
            skips.append(h)
        for down in block.downsamplers or []:
            h = spatial(down, h)  # (B*F, C, h/2, w/2)
            skips.append(h)

    mid = unet.mid_block
    h = spatial(mid.resnets[0], h, emb)
    motions = getattr(mid, "motion_modules", None) or [None] * len(mid.attentions)
    for attn, resnet, motion in zip(mid.attentions, mid.resnets[1:], motions):
        s = cross_attention(attn, h)
        if motion is not None:  # diffusers' motion mid block: attention -> motion module -> resnet
            s, site = layer(site, motion, h, h, s), site + 1
        h = spatial(resnet, s, emb)

    for block in unet.up_blocks:
        attentions = getattr(block, "attentions", None) or [None] * len(block.resnets)
        for resnet, attn, motion in zip(block.resnets, attentions, block.motion_modules):
            r = spatial(resnet, torch.cat([h, skips.pop()], dim=1), emb)  # (B*F, C, h, w)
            h, site = layer(site, motion, h, r, cross_attention(attn, r) if attn is not None else r), site + 1
        for up in block.upsamplers or []:
            h = spatial(up, h)  # (B*F, C, 2h, 2w)

    with record_function("spatial"):
        return unet.conv_out(unet.conv_act(unet.conv_norm_out(h)))  # (B*F, 4, h, w)


def spatial_only(site, motion, h_in, r, s):
    """Layer rule of the per-frame text-to-image UNet: motion modules bypassed."""
    return s


class MobiusUNet(SerialUNet):
    """Layer-parallel Mobius: each layer's motion module reads the layer input beside S, `h = S(h) + D(h)`."""

    def forward(self, sample, timesteps, text):  # (B,C,F,h,w), (B,), (B,L,D) -> (B,C,F,h,w)
        frames = sample.shape[2]

        def parallel_layer(site, motion, h_in, r, s):
            # D needs the motion module's channels: where the resnet changes channels, D reads the resnet output
            source = h_in if h_in.shape == s.shape else r
            with record_function("temporal"):
                return s + motion_delta(motion, source, frames)  # (B*F, C, h, w)

        emb = time_embedding(self.unet, timesteps, frames)  # (B*F, E)
        out = walk_unet(self.unet, frames_to_batch(sample), emb, text.repeat_interleave(frames, dim=0),
                        parallel_layer)  # (B*F, 4, h, w)
        return batch_to_frames(out, frames)


def motion_sites(unet) -> list[tuple[int, int]]:
    """(channels, downsampling factor) of every motion module in forward order."""
    sites = []
    levels = len(unet.down_blocks)
    for i, block in enumerate(unet.down_blocks):
        sites += [(m.in_channels, 2 ** i) for m in block.motion_modules]
    sites += [(m.in_channels, 2 ** (levels - 1)) for m in getattr(unet.mid_block, "motion_modules", [])]
    for j, block in enumerate(unet.up_blocks):
        sites += [(m.in_channels, 2 ** (levels - 1 - j)) for m in block.motion_modules]
    return sites


class Bridge(nn.Module):
    """Carries the side stream to the next motion module's resolution and channels; zero at init."""

    def __init__(self, in_channels: int, out_channels: int, scale: float):
        super().__init__()
        self.scale = scale  # > 1 downsample, < 1 upsample
        self.proj = nn.Conv2d(in_channels, out_channels, kernel_size=1)
        nn.init.zeros_(self.proj.weight)
        nn.init.zeros_(self.proj.bias)

    def forward(self, z):  # (B*F, C_in, h, w) -> (B*F, C_out, h*s, w*s)
        if self.scale > 1:
            z = F.avg_pool2d(z, kernel_size=int(self.scale))
        elif self.scale < 1:
            z = F.interpolate(z, scale_factor=round(1 / self.scale), mode="nearest")
        return self.proj(z)


class MobiusLadderUNet(SerialUNet):
    """Decoupled Mobius: frozen per-frame image UNet + a motion-module side stream that rejoins at the output."""

    ADDITIONS = ("bridges.", "side_out.")

    def __init__(self, config: UNetConfig):
        super().__init__(config)
        sites = motion_sites(self.unet)
        self.bridges = nn.ModuleDict({
            str(i): Bridge(c0, c1, s1 / s0)
            for i, ((c0, s0), (c1, s1)) in enumerate(zip(sites, sites[1:]), start=1) if (c0, s0) != (c1, s1)})
        channels, scale = sites[-1]
        assert scale == 1, "the side stream must end at full latent resolution"
        self.side_out = nn.Conv2d(channels, self.unet.conv_out.out_channels, kernel_size=3, padding=1)
        nn.init.zeros_(self.side_out.weight)
        nn.init.zeros_(self.side_out.bias)

    def group_of(self, parameter_name: str) -> str:
        if parameter_name.startswith(self.ADDITIONS):
            return "temporal"
        return super().group_of(parameter_name)

    def added_parameter_names(self) -> list[str]:
        return [n for n in self.state_dict() if n.startswith(self.ADDITIONS)]

    def forward(self, sample, timesteps, text):  # (B,C,F,h,w), (B,), (B,L,D) -> (B,C,F,h,w)
        frames = sample.shape[2]
        features: list[tuple[nn.Module, torch.Tensor]] = []

        def record(site, motion, h_in, r, s):
            features.append((motion, s))
            return s

        with torch.set_grad_enabled(torch.is_grad_enabled() and not self.spatial_frozen):
            emb = time_embedding(self.unet, timesteps, frames)  # (B*F, E)
            image = walk_unet(self.unet, frames_to_batch(sample), emb, text.repeat_interleave(frames, dim=0),
                              record)  # (B*F, 4, h, w): the text-to-image model, frame by frame

        with record_function("temporal"):
            z = None  # side stream: what the motion modules added on top of the spatial features
            for site, (motion, feature) in enumerate(features):
                if z is not None and str(site) in self.bridges:
                    z = self.bridges[str(site)](z)  # (B*F, C_site, h_site, w_site)
                x = feature if z is None else feature + z
                delta = motion_delta(motion, x, frames)
                z = delta if z is None else z + delta
            out = image + self.side_out(z)  # (B*F, 4, h, w)
        return batch_to_frames(out, frames)


register(Architecture(
    name="mobius-unet", family="unet", config_cls=UNetConfig, presets=UNET_PRESETS, build=MobiusUNet,
    description="Mobius layer-parallel 3D-UNet: h = S(h) + D(h); same weights as serial-unet",
    check_shape=check_unet_shape))
register(Architecture(
    name="mobius-ladder-unet", family="unet", config_cls=UNetConfig, presets=UNET_PRESETS, build=MobiusLadderUNet,
    description="Mobius side-stream reading: frozen per-frame image UNet that never sees temporal features + a "
                "motion-module side stream (zero-init bridges) added at the output",
    check_shape=check_unet_shape))
