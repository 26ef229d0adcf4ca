"""Frozen, validated configs: one benchmark `Case` and a `Sweep` (a grid of cases)."""
from __future__ import annotations

import dataclasses
import itertools
import re
import types
import typing
from dataclasses import dataclass, field

import torch

import architectures
from architectures import LATENT_SCALE, TRAINING_MODES

from .errors import UserError

DTYPES = ("fp32", "bf16", "fp16")
DEVICE_PATTERN = re.compile(r"cpu|cuda(:\d+)?")
CONTEXT_PARALLEL = ("ulysses", "ring")


def _parse_scalar(text: str, kind: type, key: str):
    try:
        if kind is bool:
            if text.lower() in ("1", "true", "yes", "on"):
                return True
            if text.lower() in ("0", "false", "no", "off"):
                return False
            raise ValueError
        return kind(text)
    except ValueError:
        raise UserError(f"--set {key}={text}: expected {kind.__name__}") from None


def parse_override_value(config_cls: type, key: str, text: str):
    """Turn the text of `--set key=text` into the type of the config field `key`."""
    hints = typing.get_type_hints(config_cls)
    if key not in hints:
        legal = ", ".join(sorted(f.name for f in dataclasses.fields(config_cls)))
        raise UserError(f"--set {key}: unknown field of {config_cls.__name__}; legal: {legal}")
    hint = hints[key]
    origin, args = typing.get_origin(hint), typing.get_args(hint)
    if origin in (typing.Union, types.UnionType):
        if text.lower() in ("none", "null"):
            return None
        hint = next(a for a in args if a is not type(None))
        origin, args = typing.get_origin(hint), typing.get_args(hint)
    if origin is tuple:
        kind = args[0] if args else str
        try:
            return tuple(_parse_scalar(part.strip(), kind, key) for part in text.split(",") if part.strip())
        except UserError:  # name the whole value, not just the bad element
            raise UserError(f"--set {key}={text}: expected comma-separated {kind.__name__} values") from None
    return _parse_scalar(text, hint if hint in (int, float, bool, str) else str, key)


def parse_set_options(items: typing.Iterable[str]) -> tuple[tuple[str, str], ...]:
    """`["a=1", "b=2,3"]` -> (("a", "1"), ("b", "2,3")), sorted by key; typed later per architecture."""
    pairs = {}
    for item in items:
        key, sep, value = item.partition("=")
        if not sep or not key.strip() or not value.strip():
            raise UserError(f"--set {item!r}: expected KEY=VALUE")
        pairs[key.strip()] = value.strip()
    return tuple(sorted(pairs.items()))


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
    weights: str | None = None  # None: random; "trained": the committed checkpoint; else a state dict path

    def __post_init__(self):
        try:
            arch = architectures.get(self.arch)
        except KeyError:
            raise UserError(f"arch: unknown architecture {self.arch!r}; legal: "
                            f"{', '.join(architectures.names())}") from None
        if self.preset not in arch.presets:
            raise UserError(f"preset: unknown preset {self.preset!r} for {self.arch}; legal: "
                            f"{', '.join(arch.presets)}")
        if self.mode not in TRAINING_MODES:
            raise UserError(f"mode: {self.mode!r} is not legal; legal: {', '.join(TRAINING_MODES)}")
        for name in ("batch", "frames", "resolution"):
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value < 1:
                raise UserError(f"{name}: must be an integer >= 1, got {value!r}")
        if self.resolution % LATENT_SCALE:
            raise UserError(f"resolution: must be a multiple of {LATENT_SCALE}, got {self.resolution}")
        if self.dtype not in DTYPES:
            raise UserError(f"dtype: {self.dtype!r} is not legal; legal: {', '.join(DTYPES)}")
        if not DEVICE_PATTERN.fullmatch(self.device):
            raise UserError(f"device: {self.device!r} is not legal; legal: cpu, cuda, cuda:N")
        if self.context_parallel is not None and (self.context_parallel not in CONTEXT_PARALLEL
                                                  or arch.family != "dit"):
            raise UserError(f"context_parallel: {self.context_parallel!r} is not legal for {self.arch}; legal: "
                            f"{', '.join(CONTEXT_PARALLEL)} with a dit-* architecture")
        config = self.model_config()  # validates the overrides
        if arch.check_shape is not None:
            try:
                arch.check_shape(config, self.frames, self.resolution, self.resolution)
            except ValueError as e:
                raise UserError(f"resolution/frames for {self.arch}: {e}") from None
        if self.weights is not None:
            from .weights import validate  # noqa: local, a checkpoint is read only when one is named

            validate(self)

    @property
    def override_dict(self) -> dict[str, str]:
        return dict(self.overrides)

    def model_config(self):
        """The architecture's config dataclass: preset plus typed --set overrides."""
        arch = architectures.get(self.arch)
        typed = {k: parse_override_value(arch.config_cls, k, v) for k, v in self.overrides}
        try:
            return architectures.make_config(self.arch, self.preset, **typed)
        except (KeyError, ValueError, TypeError) as e:
            raise UserError(f"--set for {self.arch}: {e.args[0] if e.args else e}") from None

    def build_model(self, device=None):
        config = self.model_config()
        with torch.device(device or self.device):
            return architectures.get(self.arch).build(config)

    def identity(self) -> dict:
        """The fields that name a case: results are matched on these (resume, gate, report)."""
        return {"arch": self.arch, "preset": self.preset, "overrides": self.override_dict, "mode": self.mode,
                "batch": self.batch, "frames": self.frames, "resolution": self.resolution,
                "dtype": self.dtype, "device": self.device, "compile": self.compile,
                "context_parallel": self.context_parallel, "weights": self.weights}


@dataclass(frozen=True)
class Sweep:
    """A grid of cases (arch x resolution x frames x batch) measured with the same settings."""

    archs: tuple[str, ...]
    resolutions: tuple[int, ...] = (64,)
    frames: tuple[int, ...] = (8,)
    batches: tuple[int, ...] = (1,)
    preset: str = "tiny"
    mode: str = "temporal"
    dtype: str = "fp32"
    device: str = "cpu"
    compile: bool = False
    overrides: tuple[tuple[str, str], ...] = ()
    context_parallel: str | None = None
    repeats: int = 5
    warmup: int = 2
    weights: str | None = None
    cases: tuple[Case, ...] = field(init=False, repr=False, compare=False)

    def __post_init__(self):
        for name in ("archs", "resolutions", "frames", "batches"):
            if not getattr(self, name):
                raise UserError(f"{name}: needs at least one value")
        if self.repeats < 1:
            raise UserError(f"repeats: must be >= 1, got {self.repeats}")
        if self.warmup < 2:
            raise UserError(f"warmup: must be >= 2 (first steps pay allocation and autotuning), got {self.warmup}")
        cases = tuple(
            Case(arch=a, preset=self.preset, mode=self.mode, batch=b, frames=f, resolution=r, dtype=self.dtype,
                 device=self.device, compile=self.compile, overrides=self.overrides,
                 context_parallel=self.context_parallel, weights=self.weights)
            for a, r, f, b in itertools.product(self.archs, self.resolutions, self.frames, self.batches))
        object.__setattr__(self, "cases", cases)
