"""`python -m stbench list`: every architecture with its family, presets (parameter counts on the meta device),
attention choices, training modes and a one-line description."""
from __future__ import annotations

import torch

import architectures

from .errors import UserError
from .overrides import comma_list


def add_arguments(parser):
    parser.add_argument("--arch", default=None, help="comma-separated architectures (default: all registered)")
    parser.add_argument("--no-params", action="store_true", help="skip counting parameters (builds nothing)")


def count_parameters(arch: str, preset: str) -> int:
    """Parameters of a preset, built on the meta device (no memory, no weights)."""
    with torch.device("meta"):
        model = architectures.get(arch).build(architectures.make_config(arch, preset))
    return sum(p.numel() for p in model.parameters())


def _count(n: int) -> str:
    return f"{n / 1e9:.2f}B" if n >= 1e9 else f"{n / 1e6:.2f}M"


def describe(arch: str, with_params: bool = True) -> dict:
    spec = architectures.get(arch)
    presets = {p: (count_parameters(arch, p) if with_params else None) for p in spec.presets}
    default = {"dit": (_dit_attention(spec),) if spec.family == "dit" else (), "user": ("the model's own",)}
    attention = spec.attention or default.get(spec.family) or ("full",)
    return {"arch": arch, "family": spec.family, "presets": presets, "attention": attention, "modes": spec.modes,
            "description": spec.description, "lora_targets": spec.lora_targets}


def _dit_attention(spec) -> str:  # the home-made DiT names its default attention kind per architecture
    return spec.presets[next(iter(spec.presets))]().attention


def format_listing(rows: list[dict]) -> str:
    lines = []
    for r in rows:
        presets = ", ".join(p if n is None else f"{p} ({_count(n)} = {n:,})" for p, n in r["presets"].items())
        lines += [f"{r['arch']}  [{r['family']}]  {r['description']}",
                  f"    presets: {presets}",
                  f"    attention: {', '.join(r['attention'])}    modes: {', '.join(r['modes'])}    "
                  f"lora targets: {','.join(r['lora_targets'])}"]
    return "\n".join(lines)


def execute(args) -> int:
    names = architectures.names()
    wanted = list(comma_list(args.arch, "arch", str)) if args.arch else names
    for arch in wanted:
        try:
            architectures.get(arch)
        except KeyError as e:
            raise UserError(f"--arch: {e.args[0]}") from None
    print(format_listing([describe(a, not args.no_params) for a in wanted]))
    print("parameter counts: the preset built on the meta device (random-weight architecture, no download); "
          "--arch package.module:factory adds your own model")
    return 0
