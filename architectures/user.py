"""`--arch package.module:factory`: a user's own model, resolved by import, behind the registry's interface.

The factory is called as `factory(preset)` and returns a `VideoModel` (a diffusers model goes in through a small
`VideoModel` subclass: see examples/). Optional attributes of the factory: `presets` (names it accepts, default
`("tiny",)`), `modes` (default both training modes), `description`.
"""
from __future__ import annotations

import importlib
from dataclasses import dataclass

from . import diffusers_import
from .base import TRAINING_MODES, VideoModel
from .spec import Architecture

_RESOLVED: dict[str, Architecture] = {}


@dataclass(frozen=True)
class UserConfig:
    """The preset name handed to a user's factory."""

    preset: str = "tiny"


def _load_factory(spec: str):
    module_name, _, attr = spec.partition(":")
    if not module_name or not attr:
        raise KeyError(f"unknown architecture {spec!r}: expected package.module:factory")
    try:
        module = importlib.import_module(module_name)
    except ImportError as e:
        raise KeyError(f"unknown architecture {spec!r}: cannot import {module_name!r} ({e})") from None
    factory = getattr(module, attr, None)
    if not callable(factory):
        raise KeyError(f"unknown architecture {spec!r}: {module_name!r} has no callable {attr!r}")
    return factory


def resolve(spec: str) -> Architecture:
    """The Architecture of a `package.module:factory` spec; KeyError (naming what is wrong) if it has none."""
    if spec not in _RESOLVED:
        diffusers_import.whole()
        factory = _load_factory(spec)

        def build(config: UserConfig) -> VideoModel:
            model = factory(config.preset)
            if not isinstance(model, VideoModel):
                raise TypeError(f"{spec} returned {type(model).__name__}, not an architectures.VideoModel")
            return model

        presets = tuple(getattr(factory, "presets", ("tiny",)))
        _RESOLVED[spec] = Architecture(
            name=spec, family="user", config_cls=UserConfig,
            presets={p: (lambda p=p: UserConfig(p)) for p in presets}, build=build,
            description=getattr(factory, "description", f"user model from {spec}"),
            check_shape=getattr(factory, "check_shape", None),
            modes=tuple(getattr(factory, "modes", TRAINING_MODES)))
    return _RESOLVED[spec]
