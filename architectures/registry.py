"""Name -> builder registry; the command line's --arch choices are its keys."""
from __future__ import annotations

import dataclasses
import importlib

import torch

from .base import VideoModel
from .spec import Architecture

FAMILY_MODULES = ("architectures.unet_serial", "architectures.unet_mobius", "architectures.dit", "architectures.wan",
                  "architectures.cogvideox", "architectures.hunyuan_video", "architectures.ltx_video",
                  "architectures.latte", "architectures.mochi")

_REGISTRY: dict[str, Architecture] = {}
_loaded = False


def register(arch: Architecture) -> Architecture:
    if arch.name in _REGISTRY:
        raise ValueError(f"architecture {arch.name!r} registered twice")
    _REGISTRY[arch.name] = arch
    return arch


def _load() -> None:
    global _loaded
    if not _loaded:
        _loaded = True
        for module in FAMILY_MODULES:
            importlib.import_module(module)


def names() -> list[str]:
    _load()
    return sorted(_REGISTRY)


def get(name: str) -> Architecture:
    _load()
    if ":" in name:  # package.module:factory, the user's own model
        from .user import resolve

        return resolve(name)
    if name not in _REGISTRY:
        raise KeyError(f"unknown architecture {name!r}; legal: {', '.join(sorted(_REGISTRY))}")
    return _REGISTRY[name]


def context_parallel_names() -> list[str]:
    """The registered architectures that run under --context-parallel."""
    _load()
    return sorted(name for name, arch in _REGISTRY.items() if arch.context_parallel)


def make_config(name: str, preset: str = "tiny", **overrides):
    """The preset's config with `overrides` (already typed) replacing fields."""
    arch = get(name)
    if preset not in arch.presets:
        raise KeyError(f"unknown preset {preset!r} for {name}; legal: {', '.join(arch.presets)}")
    config = arch.presets[preset]()
    fields = {f.name for f in dataclasses.fields(config)}
    unknown = sorted(set(overrides) - fields)
    if unknown:
        raise KeyError(f"unknown config field {unknown[0]!r} for {name}; legal: {', '.join(sorted(fields))}")
    return dataclasses.replace(config, **overrides)


def build(name: str, preset: str = "tiny", *, device: str | torch.device | None = None,
          **overrides) -> VideoModel:
    """Build a model with random weights; device='meta' counts parameters without memory."""
    config = make_config(name, preset, **overrides)
    if device is None:
        return get(name).build(config)
    with torch.device(device):
        return get(name).build(config)
