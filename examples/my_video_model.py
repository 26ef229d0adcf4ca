"""Your own model in stbench: `python -m stbench run --arch examples.my_video_model:build --mode full ...`.

`build(preset)` returns an `architectures.VideoModel`; here a diffusers transformer with a small adapter that
states its latent space, text encoder width and objective, names parameter groups and calls the model.
"""
from __future__ import annotations

from diffusers import WanTransformer3DModel

from architectures import VideoModel

SIZES = {"tiny": dict(num_attention_heads=2, attention_head_dim=16, ffn_dim=64, num_layers=1),
         "small": dict(num_attention_heads=4, attention_head_dim=32, ffn_dim=256, num_layers=4)}


class MyVideoModel(VideoModel):
    """A small Wan-style transformer trained with rectified flow on 16-channel latents."""

    latent_channels = 16
    temporal_compression = 4  # causal video VAE: 1 + 4k frames -> 1 + k latent frames
    objective = "flow"  # or "eps" / "v"
    text_tokens = 16

    def __init__(self, preset: str):
        super().__init__(config=preset)
        self.net = WanTransformer3DModel(in_channels=16, out_channels=16, text_dim=self.text_dim, freq_dim=32,
                                         **SIZES[preset])

    @property
    def text_dim(self) -> int:
        return 32

    def group_of(self, parameter_name: str) -> str:
        return "spatial"  # one 3D attention per block: nothing to freeze separately (mode `full` only)

    def forward(self, sample, timesteps, text):  # (B, 16, F, h, w), (B,), (B, 16, 32) -> (B, 16, F, h, w)
        return self.net(sample, timesteps, text, return_dict=False)[0]


def build(preset: str) -> MyVideoModel:
    return MyVideoModel(preset)


def check_shape(config, frames: int, height: int, width: int) -> None:
    if (frames - 1) % 4 or height % 16 or width % 16:
        raise ValueError(f"frames must be 1 + 4k and the resolution a multiple of 16, got {frames}, {height}x{width}")


# optional attributes stbench reads from the factory
build.presets = tuple(SIZES)
build.modes = ("full",)
build.check_shape = check_shape
build.description = "example: a small diffusers Wan transformer behind a VideoModel adapter"
