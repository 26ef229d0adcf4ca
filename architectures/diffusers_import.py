"""diffusers' classes, imported as diffusers is where the integrations stbench never calls through it are absent.

When they are installed, diffusers imports these packages with its own modules, for features stbench does not use
through diffusers:
  peft           diffusers' LoRA loading and scaling, and its layerwise casting of LoRA layers (stbench injects
                 LoRA with peft itself and never passes a LoRA scale);
  transformers   pipelines' text encoders and their quantization configs (stbench builds encoders itself);
  bitsandbytes   quantized loading (stbench calls bitsandbytes' 8-bit AdamW itself);
  accelerate     from_pretrained's device maps and offloading (stbench builds models from configs);
  scipy          schedulers' beta sigmas.
Importing one diffusers model and running its first forward took 3.5-4.5 s on 2 cores with them, about 1 s without
(`python -X importtime`), a cost every `stbench` process paid before its first step.

diffusers decides what is installed once, when it is first imported (importlib.util.find_spec): while it and the
model's modules are imported these packages are hidden (None in sys.modules, which find_spec and import read as
absent), so diffusers settles in the configuration it has without them, consistently (USE_PEFT_BACKEND included).
They are unhidden at once: stbench's own LoRA, 8-bit AdamW, encoders and statistics import them on use.

A user's model (`package.module:factory`) may need them through diffusers (from_pretrained, LoRA loading): once
one is resolved (`whole()`), diffusers is imported whole. A command resolves its models before it builds any, so
a command that builds a user's model never imports diffusers without them.
"""
from __future__ import annotations

import sys
from contextlib import contextmanager

UNUSED = ("peft", "transformers", "bitsandbytes", "accelerate", "scipy")
_whole = False  # set once a user's model is resolved


@contextmanager
def _hidden(packages: tuple[str, ...]):
    """Within: `packages` not imported yet look absent to find_spec and import."""
    hidden = [name for name in packages if name not in sys.modules]
    for name in hidden:
        sys.modules[name] = None
    try:
        yield
    finally:
        for name in hidden:
            if name in sys.modules and sys.modules[name] is None:
                del sys.modules[name]


def _absent() -> tuple[str, ...]:
    """What to hide: every UNUSED package at diffusers' first import; none once diffusers is imported, a user's
    model resolved, or any of them imported already (hiding some but not others breaks their own imports:
    transformers' modeling_utils imports accelerate)."""
    if _whole or "diffusers" in sys.modules or any(name in sys.modules for name in UNUSED):
        return ()
    return UNUSED


def diffusers_class(name: str):
    """`diffusers.<name>` (a model, scheduler or function). At diffusers' first import the UNUSED packages are
    hidden (see _absent); modules imported later skip them too where diffusers guards their import, as it decided
    they are absent."""
    with _hidden(_absent()):
        import diffusers

        return getattr(diffusers, name)


def whole() -> None:
    """From now on this process imports diffusers with every installed integration (a user's model needs them)."""
    global _whole
    _whole = True
