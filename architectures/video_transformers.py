"""What diffusers' production video transformers share in stbench: the attention-swap settings, the adapter
from a diffusers transformer to the `VideoModel` interface (latent batch, objective, DSV stages and stats), and
context parallelism through the home-made DiT's `cp` protocol.

Context parallelism (a family with a `token_plan`): setting `model.context_parallel = cp` (what `cp.attach`
does) hooks three modules of the diffusers model, the places diffusers' own `_cp_plan` names: the first block's
`hidden_states` input is sharded (`cp.shard_tokens`, right after patch embedding), the rotary embedding's
(cos, sin) are sliced to the same local tokens, and the output projection's output is gathered
(`cp.gather_tokens`: the projection runs on local tokens, and its output, 64 channels in Wan, is much smaller
than the hidden states it reads, 1536 in Wan 1.3b). Every video self-attention's processor is wrapped (full
included) and routes its attention call to `cp.attention`; text cross-attention reads local queries and the
whole (replicated) text, so it stays local. Families whose self-attention joins text and video (CogVideoX,
HunyuanVideo) or alternates spatial and temporal sequences (Latte) have no plan.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

from .attention.dsv_stages import DSVSettings, DSVStages
from .attention.processors import ATTENTION_CHOICES, SwappedAttnProcessor, install_attention, wrap_processors
from .base import VideoModel
from .registry import Architecture, register
from .spec import CONTEXT_PARALLEL_MODES

VIDEO_TRANSFORMER_MODES = ("full",)  # one 3D attention per block: no temporal part to train alone


@dataclass(frozen=True)
class TokenPlan:
    """Where context parallelism shards and gathers a diffusers video transformer's tokens (module paths)."""

    shard: str  # the first block: its `hidden_states` input (B, N, C) is sharded along dim 1
    rotary: str  # the rotary embedding: each tensor of its output is sliced along dim 1 (tokens)
    gather: str  # the output projection: its output (B, n, Cout) is gathered along dim 1


@dataclass(frozen=True)
class SwapSettings(DSVSettings):
    """Attention choice and its window / DSV settings (the same meanings as the home-made DiT's)."""

    attention: str = "full"  # full (diffusers' own processor) | window | dsv
    window_size: tuple[int, ...] = (4, 8, 8)  # tokens per 3D window (frames, rows, cols), shrunk to fit

    def __post_init__(self):
        if self.attention not in ATTENTION_CHOICES:
            raise ValueError(f"attention: {self.attention!r} is not legal; legal: {', '.join(ATTENTION_CHOICES)}")
        if len(self.window_size) != 3 or min(self.window_size) < 1:
            raise ValueError("window_size: three positive ints (frames, rows, cols)")
        self.check_dsv()


def check_latent_shape(model_cls, config, frames: int, height: int, width: int, patch: tuple[int, int, int]):
    """ValueError naming the legal values when a pixel shape does not map onto whole latent patches."""
    t, s = model_cls.temporal_compression, model_cls.spatial_compression
    if t > 1 and (frames < 1 or (frames - 1) % t):
        raise ValueError(f"frames must be 1 + a multiple of {t} (the VAE compresses time {t}x; e.g. "
                         f"{', '.join(str(1 + t * k) for k in (1, 2, 4, 8))}), got {frames}")
    latent_frames = model_cls.latent_frames(frames)
    if latent_frames % patch[0]:
        raise ValueError(f"latent frames ({latent_frames}) must be a multiple of the temporal patch {patch[0]}")
    for name, size, p in (("height", height, patch[1]), ("width", width, patch[2])):
        if size % (s * p):
            raise ValueError(f"{name} must be a multiple of {s * p} (VAE /{s}, patch {p}), got {size}")


class DiffusersVideoModel(DSVStages, VideoModel):
    """A diffusers video transformer behind the VideoModel interface, with its self-attention swappable."""

    # Subclasses set the latent space and objective (class attributes of VideoModel), build `self.transformer`
    # in `build_transformer`, name the self-attention modules to swap in `attention_targets`, and call the
    # diffusers model in `run`.

    patch: tuple[int, int, int] = (1, 2, 2)  # latent (frames, rows, cols) per token
    temporal_prefixes: tuple[str, ...] = ()  # parameter-name prefixes of separable temporal layers
    token_plan: TokenPlan | None = None  # where context parallelism shards and gathers; None: not supported

    def __init__(self, config):
        super().__init__(config)
        self._context_parallel = None
        self._cp_hooks: list = []
        self.transformer = self.build_transformer(config)
        self.swapped: list[tuple[SwappedAttnProcessor, Callable]] = []
        for modules, text, grid_of in self.attention_targets():
            for processor in install_attention(modules, config.attention, config, text):
                self.swapped.append((processor, grid_of))
        self.init_dsv()

    # --- context parallelism: the `cp` protocol on a diffusers model, through hooks --------------------
    @property
    def context_parallel(self):
        return self._context_parallel

    @context_parallel.setter
    def context_parallel(self, cp) -> None:
        """Install `cp` (None removes it): hooks on the plan's modules, full attention wrapped to be routed."""
        for handle in self._cp_hooks:
            handle.remove()
        self._cp_hooks = []
        self._context_parallel = cp
        if cp is None:
            return
        plan = self.token_plan
        if plan is None:
            raise ValueError(f"{type(self).__name__} has no context-parallel token plan")
        if self.config.attention == "full" and not self.swapped:  # once: diffusers' own processor can't be routed
            for modules, text, grid_of in self.attention_targets():
                self.swapped += [(p, grid_of) for p in wrap_processors(modules, "full", self.config, text)]

        def shard(module, args, kwargs):  # hidden_states (B, N, C) -> (B, N/world, C)
            if args:
                return (cp.shard_tokens(args[0]),) + tuple(args[1:]), kwargs
            return args, {**kwargs, "hidden_states": cp.shard_tokens(kwargs["hidden_states"])}

        def rotary(module, args, output):  # (cos, sin), tokens on dim 1 -> this rank's tokens
            return tuple(cp.shard_tokens(t) for t in output)

        def gather(module, args, output):  # (B, N/world, Cout) -> (B, N, Cout)
            return cp.gather_tokens(output)

        self._cp_hooks = [
            self.get_submodule(plan.shard).register_forward_pre_hook(shard, with_kwargs=True),
            self.get_submodule(plan.rotary).register_forward_hook(rotary),
            self.get_submodule(plan.gather).register_forward_hook(gather)]

    # --- what families provide -----------------------------------------------------------------
    def build_transformer(self, config):
        raise NotImplementedError

    def attention_targets(self):
        """[(attention modules, text position 'none'|'first'|'last', grid_of(video grid) -> grid they see)]."""
        raise NotImplementedError

    def run(self, latents, timesteps, text):  # (B, C, F, h, w), (B,), (B, L, D) -> (B, C, F, h, w)
        raise NotImplementedError

    # --- VideoModel ----------------------------------------------------------------------------
    @property
    def text_dim(self) -> int:
        return self.config.text_dim

    @property
    def text_tokens(self) -> int:
        return self.config.text_tokens

    def group_of(self, parameter_name: str) -> str:
        if self.is_estimator(parameter_name):
            return "estimator"
        if parameter_name.startswith(tuple(f"transformer.{p}" for p in self.temporal_prefixes)):
            return "temporal"
        return "spatial"

    def forward(self, sample, timesteps, text):  # (B, C, F, h, w), (B,), (B, L, D) -> (B, C, F, h, w)
        if self._dsv:
            self._begin_forward(sample, timesteps, text)
        grid = tuple(n // p for n, p in zip(sample.shape[2:], self.patch))
        for processor, grid_of in self.swapped:
            processor.grid = grid_of(grid)
            processor.cp = self._context_parallel
        return self.run(sample, timesteps, text)


def video_grid(grid):  # the grid a full 3D self-attention sees: every video token of the sample
    return grid


def video_tokens(model_cls, frames: int, height: int, width: int) -> int:
    """Video tokens of a pixel shape: latent frames and spatial size over the patch (what self-attention sees)."""
    s, (pt, ph, pw) = model_cls.spatial_compression, model_cls.patch
    return (model_cls.latent_frames(frames) // pt) * (height // s // ph) * (width // s // pw)


def register_video_transformer(name: str, config_cls, presets: dict[str, dict], build, description: str,
                               check_shape, modes: tuple[str, ...] = VIDEO_TRANSFORMER_MODES) -> None:
    """Register one diffusers video transformer (`build`: its DiffusersVideoModel class): presets are size
    overrides of its config dataclass; context parallelism where the class has a token plan."""
    register(Architecture(
        name=name, family="video-transformer", config_cls=config_cls,
        presets={preset: (lambda sizes=sizes: config_cls(**sizes)) for preset, sizes in presets.items()},
        build=build, description=description, check_shape=check_shape, modes=modes, attention=ATTENTION_CHOICES,
        tokens=lambda config, frames, height, width: video_tokens(build, frames, height, width),
        context_parallel=CONTEXT_PARALLEL_MODES if getattr(build, "token_plan", None) else ()))
