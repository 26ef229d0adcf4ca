"""Frozen, validated configs: one benchmark `Case` and a `Sweep` (a grid of cases)."""
from __future__ import annotations

import dataclasses
import itertools
import re
import typing
from dataclasses import dataclass, field

import torch

import architectures
from architectures import LATENT_SCALE, TRAINING_MODES
from architectures.spec import CONTEXT_PARALLEL_MODES

from . import results
from .errors import UserError
from .overrides import parse_override_value
from .regimes import ACTIVATION_CHECKPOINTING, ENCODERS, OPTIMIZERS, PARAM_DTYPES

# Case dtype -> torch dtype: fp32 runs as is; bf16 and fp16 are autocast dtypes over the weights (fp32 unless
# the case's param_dtype is bf16).
TORCH_DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}
DTYPES = tuple(TORCH_DTYPES)
DEVICE_PATTERN = re.compile(r"cpu|cuda(:\d+)?")
CONTEXT_PARALLEL = CONTEXT_PARALLEL_MODES


def parse_set_options(items: typing.Iterable[str]) -> tuple[tuple[str, str], ...]:
    """`["a=1", "b=2,3"]` -> (("a", "1"), ("b", "2,3")), sorted by key; typed later per architecture."""
    pairs = {}
    for item in items:
        key, sep, value = item.partition("=")
        if not sep or not key.strip() or not value.strip():
            raise UserError(f"--set {item!r}: expected KEY=VALUE")
        pairs[key.strip()] = value.strip()
    return tuple(sorted(pairs.items()))


def json_settings(settings) -> dict:
    """A settings dataclass (a sweep of `run`, `train` or `predict`) as JSON values, for run.json."""
    values = {f.name: getattr(settings, f.name) for f in dataclasses.fields(settings) if f.init}
    if "overrides" in values:
        values["overrides"] = dict(values["overrides"])
    return {k: list(v) if isinstance(v, tuple) else v for k, v in values.items()}


def model_config(arch: str, preset: str, overrides: tuple[tuple[str, str], ...]):
    """An architecture's config dataclass: the preset plus typed --set overrides (UserError on a bad one)."""
    spec = architectures.get(arch)
    typed = {k: parse_override_value(spec.config_cls, k, v) for k, v in overrides}
    try:
        return architectures.make_config(arch, preset, **typed)
    except (KeyError, ValueError, TypeError) as e:
        raise UserError(f"--set for {arch}: {e.args[0] if e.args else e}") from None


def frame_fields(size: int | tuple[int, int]) -> dict:
    """One entry of --resolution (a square size, or (height, width)) as Case fields."""
    if isinstance(size, int):
        return {"resolution": size}
    height, width = size
    return {"resolution": height, "width": width}


@dataclass(frozen=True)
class Case:
    """One benchmark configuration: what to build and the shape of the training step to measure."""

    arch: str
    preset: str = "tiny"
    mode: str = "temporal"
    batch: int = 1
    frames: int = 8
    resolution: int = 64  # square frames, pixels
    dtype: str = "fp32"
    device: str = "cpu"
    compile: bool = False
    overrides: tuple[tuple[str, str], ...] = ()  # raw --set pairs, sorted by key
    context_parallel: str | None = None  # "ulysses" | "ring" under torchrun; None on one process
    # FSDP (torchrun): data-parallel degree; None = no FSDP. The three settings below are None without FSDP,
    # so records written before FSDP existed keep their case keys.
    fsdp: int | None = None
    # none | blocks | spatial; on one process "none" is stored as None (records before it keep their keys)
    activation_checkpointing: str | None = None
    fsdp_reshard_after_forward: bool | None = None
    fsdp_mixed_precision: bool | None = None  # bf16 params, fp32 reduce (FSDP's MixedPrecisionPolicy)
    weights: str | None = None  # None: random; "trained": the committed checkpoint; else a state dict path
    # training regimes (stbench.regimes); the defaults are the regime stbench measured before them
    lora: int | None = None  # LoRA rank; None: full training of the mode's parameters
    lora_targets: tuple[str, ...] | None = None  # layer names; None with LoRA: the architecture's default
    param_dtype: str = "fp32"  # fp32 | bf16: weights, gradients and optimizer state
    optimizer: str = "adamw"  # adamw | adamw8bit
    encoders: str = "precomputed"  # precomputed | resident
    # frame width when it differs from `resolution` (then the height): --resolution 480x832; None = square frames
    # (a width equal to the height is stored as None, so square cases keep their keys)
    width: int | None = None

    def __post_init__(self):
        try:
            arch = architectures.get(self.arch)
        except KeyError as e:
            raise UserError(f"arch: {e.args[0]}") from None
        if self.preset not in arch.presets:
            raise UserError(f"preset: unknown preset {self.preset!r} for {self.arch}; legal: "
                            f"{', '.join(arch.presets)}")
        if self.mode not in TRAINING_MODES:
            raise UserError(f"mode: {self.mode!r} is not legal; legal: {', '.join(TRAINING_MODES)}")
        if self.mode not in arch.modes:
            raise UserError(f"mode: {self.mode!r} is not available for {self.arch} (no separable temporal "
                            f"layers); legal: {', '.join(arch.modes)}")
        if self.width == self.resolution:
            object.__setattr__(self, "width", None)
        for name in ("batch", "frames", "resolution") + (("width",) if self.width is not None else ()):
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value < 1:
                raise UserError(f"{name}: must be an integer >= 1, got {value!r}")
        if self.resolution % LATENT_SCALE or (self.width or 0) % LATENT_SCALE:
            raise UserError(f"resolution: must be a multiple of {LATENT_SCALE}, got {self.resolution_label}")
        if self.dtype not in DTYPES:
            raise UserError(f"dtype: {self.dtype!r} is not legal; legal: {', '.join(DTYPES)}")
        if not DEVICE_PATTERN.fullmatch(self.device):
            raise UserError(f"device: {self.device!r} is not legal; legal: cpu, cuda, cuda:N")
        if self.context_parallel is not None and (self.context_parallel not in CONTEXT_PARALLEL
                                                  or self.context_parallel not in arch.context_parallel):
            raise UserError(f"context_parallel: {self.context_parallel!r} is not legal for {self.arch}; legal: "
                            f"{', '.join(CONTEXT_PARALLEL)} with one of the archs "
                            f"{', '.join(architectures.context_parallel_names())}")
        self._check_fsdp()
        config = self.model_config()  # validates the overrides
        self._check_regimes(arch)
        if arch.check_shape is not None:
            try:
                arch.check_shape(config, self.frames, *self.frame_hw)
            except ValueError as e:
                raise UserError(f"resolution/frames for {self.arch}: {e}") from None
        if self.weights is not None:
            from .weights import validate  # noqa: local, a checkpoint is read only when one is named

            validate(self)

    def _check_fsdp(self) -> None:
        ac = self.activation_checkpointing
        if ac is not None and ac not in ACTIVATION_CHECKPOINTING:
            raise UserError(f"activation_checkpointing: {ac!r} is not legal; legal: "
                            f"{', '.join(ACTIVATION_CHECKPOINTING)}")
        if self.fsdp is None:
            if ac == "none":  # one process: today's behaviour, under today's key
                object.__setattr__(self, "activation_checkpointing", None)
            extra = [n for n in ("fsdp_reshard_after_forward", "fsdp_mixed_precision") if getattr(self, n) is not None]
            if extra:
                raise UserError(f"{extra[0]}: only with --fsdp N")
            return
        if not isinstance(self.fsdp, int) or isinstance(self.fsdp, bool) or self.fsdp < 1:
            raise UserError(f"fsdp: must be an integer >= 1, got {self.fsdp!r}")
        if ac is None:
            raise UserError(f"activation_checkpointing: {ac!r} is not legal with --fsdp; legal: "
                            f"{', '.join(ACTIVATION_CHECKPOINTING)}")
        if self.compile:
            raise UserError("compile: --compile is not supported with --fsdp")

    def _check_regimes(self, arch) -> None:
        for name, legal in (("param_dtype", PARAM_DTYPES), ("optimizer", OPTIMIZERS), ("encoders", ENCODERS)):
            if getattr(self, name) not in legal:
                raise UserError(f"{name}: {getattr(self, name)!r} is not legal; legal: {', '.join(legal)}")
        if self.optimizer == "adamw8bit" and self.fsdp is not None:
            raise UserError("optimizer: adamw8bit is not supported with --fsdp (bitsandbytes' kernels do not take "
                            "FSDP2's DTensor shards); use --optimizer adamw")
        if self.param_dtype == "bf16" and self.dtype == "fp32":
            raise UserError("param_dtype: bf16 weights need an autocast --dtype (bf16 or fp16), not fp32")
        if self.lora is None:
            if self.lora_targets is not None:
                raise UserError("lora_targets: only with --lora RANK")
        else:
            if not isinstance(self.lora, int) or isinstance(self.lora, bool) or self.lora < 1:
                raise UserError(f"lora: the rank must be an integer >= 1, got {self.lora!r}")
            if self.lora_targets is None:
                object.__setattr__(self, "lora_targets", tuple(arch.lora_targets))
            object.__setattr__(self, "lora_targets", tuple(self.lora_targets))
            from .regimes import lora_modules  # noqa: local - builds the model on meta once per config

            lora_modules(self)  # UserError on a target the model lacks
        if self.encoders == "resident":
            from .regimes import check_resident_encoders  # noqa: local - built on meta once per config

            try:
                check_resident_encoders(self.arch, self.preset, self.overrides)
            except ValueError as e:
                raise UserError(f"encoders: {e}") from None

    @property
    def height(self) -> int:
        return self.resolution

    @property
    def frame_hw(self) -> tuple[int, int]:
        """(height, width) of the frames in pixels."""
        return self.resolution, self.width or self.resolution

    @property
    def resolution_label(self) -> str:
        """"64" for square frames, "480x832" (height x width) otherwise."""
        return results.resolution_label({"resolution": self.resolution, "width": self.width})

    @property
    def override_dict(self) -> dict[str, str]:
        return dict(self.overrides)

    def model_config(self):
        """The architecture's config dataclass: preset plus typed --set overrides."""
        return model_config(self.arch, self.preset, self.overrides)

    def build_model(self, device=None):
        config = self.model_config()
        with torch.device(device or self.device):
            return architectures.get(self.arch).build(config)

    def identity(self, world_size: int = 1) -> dict:
        """The record's identity fields for this case (results are matched on them: resume, gate, report)."""
        fields = {**dataclasses.asdict(self), "overrides": self.override_dict, "world_size": world_size}
        fields["height"], fields["width"] = self.frame_hw
        fields["lora"] = None if self.lora is None else {"rank": self.lora, "targets": list(self.lora_targets)}
        return {name: fields[name] for name in results.IDENTITY_FIELDS}

    @property
    def key(self) -> str:
        """The case's key among results (results.case_key of its record)."""
        return results.case_key(self.identity())

    @property
    def slug(self) -> str:
        """A short, file-name-safe id (trace folders, pytest ids)."""
        return results.case_slug(self.identity())


@dataclass(frozen=True)
class Sweep:
    """A grid of cases (arch x resolution x frames x batch) measured with the same settings."""

    archs: tuple[str, ...]
    resolutions: tuple[int | tuple[int, int], ...] = (64,)  # square sizes or (height, width)
    frames: tuple[int, ...] = (8,)
    batches: tuple[int, ...] = (1,)
    preset: str = "tiny"
    mode: str = "temporal"
    dtype: str = "fp32"
    device: str = "cpu"
    compile: bool = False
    overrides: tuple[tuple[str, str], ...] = ()
    context_parallel: str | None = None
    fsdp: int | None = None
    activation_checkpointing: str | None = None
    fsdp_reshard_after_forward: bool | None = None
    fsdp_mixed_precision: bool | None = None
    repeats: int = 5
    warmup: int = 2
    weights: str | None = None
    lora: int | None = None
    lora_targets: tuple[str, ...] | None = None
    param_dtype: str = "fp32"
    optimizer: str = "adamw"
    encoders: str = "precomputed"
    cases: tuple[Case, ...] = field(init=False, repr=False, compare=False)

    def settings(self) -> dict:
        """The sweep's settings as JSON values (run.json records them)."""
        return json_settings(self)

    def __post_init__(self):
        for name in ("archs", "resolutions", "frames", "batches"):
            if not getattr(self, name):
                raise UserError(f"{name}: needs at least one value")
        if self.repeats < 1:
            raise UserError(f"repeats: must be >= 1, got {self.repeats}")
        if self.warmup < 2:
            raise UserError(f"warmup: must be >= 2 (first steps pay allocation and autotuning), got {self.warmup}")
        cases = tuple(
            Case(arch=a, preset=self.preset, mode=self.mode, batch=b, frames=f, **frame_fields(r), dtype=self.dtype,
                 device=self.device, compile=self.compile, overrides=self.overrides,
                 context_parallel=self.context_parallel, fsdp=self.fsdp,
                 activation_checkpointing=self.activation_checkpointing,
                 fsdp_reshard_after_forward=self.fsdp_reshard_after_forward,
                 fsdp_mixed_precision=self.fsdp_mixed_precision,
                 weights=self.weights, lora=self.lora, lora_targets=self.lora_targets,
                 param_dtype=self.param_dtype, optimizer=self.optimizer, encoders=self.encoders)
            for a, r, f, b in itertools.product(self.archs, self.resolutions, self.frames, self.batches))
        object.__setattr__(self, "cases", cases)
