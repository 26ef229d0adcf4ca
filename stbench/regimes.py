"""The training regimes people run (issue 21): LoRA adapters, bf16 parameters, 8-bit AdamW, activation
checkpointing on one process, resident encoders; applied alike to `run`'s real model and `predict`'s meta one.

8-bit AdamW's state layout (counted here for fake tensors, where bitsandbytes' kernels cannot run) is that of
bitsandbytes 0.50.2, `bitsandbytes/optim/optimizer.py`, `Optimizer2State.init_state` (AdamW8bit is an
Optimizer2State with optim_bits=8, min_8bit_size=4096, max_unorm=0, `bitsandbytes/optim/adamw.py`):
  * a parameter of fewer than `min_8bit_size` elements keeps 32-bit state: state1 and state2 fp32, its shape;
  * otherwise state1 and state2 uint8 of its shape, absmax1 and absmax2 fp32 of ceil(n / 256) blocks
    (blocksize 256), and qmap1 / qmap2: the signed and unsigned dynamic maps (`F.create_dynamic_map`, 256 fp32
    each), one pair per optimizer shared by every parameter's state (the same tensors, moved once per device);
  * state["step"] is a Python int (no tensor); max_unorm = 0 allocates no unorm_vec.
`tests/test_regimes.py` compares this count with bitsandbytes' own state after a real step.
"""
from __future__ import annotations

import argparse
import functools
import math

import torch

from .errors import UserError

PARAM_DTYPES = ("fp32", "bf16")
OPTIMIZERS = ("adamw", "adamw8bit")
ENCODERS = ("precomputed", "resident")
ACTIVATION_CHECKPOINTING = ("none", "blocks", "spatial")
# bitsandbytes 0.50.2 AdamW8bit defaults and Optimizer2State layout (module docstring)
BNB_MIN_8BIT_SIZE = 4096
BNB_BLOCKSIZE = 256
BNB_QMAP_SIZE = 256


# --- command line -------------------------------------------------------------------------------------

def add_regime_arguments(parser: argparse.ArgumentParser, *, checkpointing: bool = True) -> None:
    """The regime flags, one definition for run, train, predict and plan (plan has its own checkpointing axis)."""
    parser.add_argument("--lora", type=int, default=None, metavar="RANK",
                        help="train LoRA adapters of this rank (peft) on --lora-targets, the base frozen")
    parser.add_argument("--lora-targets", default=None, metavar="NAMES",
                        help="comma-separated linear layer names the adapters wrap (default: the family's, "
                             "`stbench list` shows them; to_q,to_k,to_v,to_out.0 for diffusers models)")
    parser.add_argument("--param-dtype", choices=PARAM_DTYPES, default="fp32",
                        help="fp32: fp32 weights, gradients and optimizer state (default); bf16: all three in bf16 "
                             "(needs --dtype bf16 or fp16, the autocast dtype)")
    parser.add_argument("--optimizer", choices=OPTIMIZERS, default="adamw",
                        help="adamw (torch, default) or adamw8bit (bitsandbytes' AdamW8bit: 8-bit moments)")
    if checkpointing:
        parser.add_argument("--activation-checkpointing", choices=ACTIVATION_CHECKPOINTING, default=None,
                            help="recompute in backward the activations of every block, or of each block's "
                                 "spatial layers (one process or --fsdp; default none)")
    parser.add_argument("--encoders", choices=ENCODERS, default="precomputed",
                        help="precomputed: latents and text embeddings come ready (default); resident: the "
                             "family's frozen text encoder(s) and VAE are held on the device in bf16")


def regime_settings(args: argparse.Namespace) -> dict:
    """The Case/Sweep regime fields from parsed flags (activation checkpointing goes with fsdp_settings)."""
    rank = getattr(args, "lora", None)
    targets = getattr(args, "lora_targets", None)
    if targets is not None and rank is None:
        raise UserError("--lora-targets: only with --lora RANK")
    if targets is not None:
        targets = tuple(t.strip() for t in targets.split(",") if t.strip())
        if not targets:
            raise UserError("--lora-targets: needs at least one layer name")
    return dict(lora=rank, lora_targets=targets, param_dtype=getattr(args, "param_dtype", "fp32"),
                optimizer=getattr(args, "optimizer", "adamw"), encoders=getattr(args, "encoders", "precomputed"))


def regime_flags(case) -> list[str]:
    """The flags that reproduce a case's regime (empty for today's default regime; checkpointing excluded)."""
    flags = []
    if case.lora is not None:
        flags += ["--lora", str(case.lora), "--lora-targets", ",".join(case.lora_targets)]
    for name, default in (("param_dtype", "fp32"), ("optimizer", "adamw"), ("encoders", "precomputed")):
        if getattr(case, name) != default:
            flags += [f"--{name.replace('_', '-')}", getattr(case, name)]
    return flags


# --- LoRA ----------------------------------------------------------------------------------------------

def _matches(name: str, target: str) -> bool:
    """peft's rule for a target name in a list: the module's full name, or its last dotted components."""
    return name == target or name.endswith("." + target)


def _short_name(name: str) -> str:
    """A module's last name component, with its parent's when it is an index: `to_out.0`, `mlp.2`, `qkv`."""
    parts = name.split(".")
    return ".".join(parts[-2:]) if parts[-1].isdigit() and len(parts) > 1 else parts[-1]


@functools.lru_cache(maxsize=64)
def _module_kinds(arch: str, preset: str, overrides: tuple, mode: str) -> tuple[tuple[str, str, bool], ...]:
    """(module name, class name, trains under `mode`) of every module with a weight, from a meta build."""
    model = _meta_model(arch, preset, overrides)
    model.set_training_mode(mode)
    return tuple((name, type(m).__name__, m.weight.requires_grad) for name, m in model.named_modules()
                 if isinstance(getattr(m, "weight", None), torch.nn.Parameter))


def _meta_model(arch: str, preset: str, overrides: tuple) -> torch.nn.Module:
    """A fresh model of the config on the meta device (no memory), for checks that read its modules."""
    import architectures

    from .config import model_config  # noqa: local - config imports this module's constants

    with torch.device("meta"):
        return architectures.get(arch).build(model_config(arch, preset, overrides))


def lora_modules(case) -> list[str]:
    """The full names of the modules the case's adapters wrap: linear layers named by a target that train in
    the case's mode (a temporal fine-tune adapts the temporal layers only). UserError on a target no linear
    layer of the model matches."""
    kinds = _module_kinds(case.arch, case.preset, case.overrides, case.mode)
    chosen = []
    for target in case.lora_targets:
        found = [(n, cls, trains) for n, cls, trains in kinds if _matches(n, target)]
        linear = [n for n, cls, trains in found if cls == "Linear"]
        if not found or not linear:
            names = sorted({_short_name(n) for n, cls, _ in kinds if cls == "Linear"})
            what = f"matches only {found[0][1]} layers, not linear ones" if found else "matches no module"
            raise UserError(f"lora-targets: {target!r} {what} of {case.arch}; its linear layers are named "
                            f"{', '.join(names)}")
        chosen += [n for n, cls, trains in found if cls == "Linear" and trains and n not in chosen]
    if not chosen:
        raise UserError(f"lora-targets: none of {', '.join(case.lora_targets)} trains in mode {case.mode!r} of "
                        f"{case.arch}; pass --mode full or other targets")
    return chosen


def apply_lora(model: torch.nn.Module, case) -> None:
    """Wrap the case's target layers with peft LoRA adapters (rank r, alpha r), in place; peft freezes every
    other parameter, so only the adapters train."""
    from peft import LoraConfig, inject_adapter_in_model

    config = LoraConfig(r=case.lora, lora_alpha=case.lora, target_modules=lora_modules(case), lora_dropout=0.0,
                        init_lora_weights=True, bias="none")
    inject_adapter_in_model(config, model)


def lora_record(case) -> dict | None:
    return None if case.lora is None else {"rank": case.lora, "targets": list(case.lora_targets)}


def input_dtype(case) -> torch.dtype:
    """The dtype of the batch's floating tensors: the parameters' (bf16 weights read bf16 latents and text, as
    finetrainers casts them to the transformer's dtype); fp32 otherwise (today's batch)."""
    return torch.bfloat16 if case.param_dtype == "bf16" else torch.float32


# --- applying a case's regime to a built model --------------------------------------------------------

def apply_regimes(model: torch.nn.Module, case) -> list[torch.nn.Module]:
    """LoRA, parameter dtype and (on one process) activation checkpointing on a freshly built model whose
    training mode is set; returns the checkpointed modules. FSDP checkpoints in its own path (apply_fsdp)."""
    if case.lora is not None:
        apply_lora(model, case)
    if case.param_dtype == "bf16":
        with torch.no_grad():  # parameters only: buffers (the noise schedule) keep their precision
            for p in model.parameters():
                p.data = p.data.to(torch.bfloat16)
    if case.fsdp is None and case.activation_checkpointing not in (None, "none"):
        from .parallel.fsdp import apply_checkpointing

        return apply_checkpointing(model, model.fsdp_units(), case.activation_checkpointing)
    return []


def make_optimizer(case, params: list, *, lr: float, foreach: bool | None = None):
    """The case's optimizer over `params`: torch AdamW or bitsandbytes' AdamW8bit (its defaults)."""
    if case.optimizer == "adamw8bit":
        import bitsandbytes as bnb

        return bnb.optim.AdamW8bit(params, lr=lr)
    return torch.optim.AdamW(params, lr=lr, foreach=foreach)


# --- 8-bit AdamW state, counted -----------------------------------------------------------------------

def adamw8bit_state_bytes(numels) -> int:
    """Bytes of AdamW8bit's state for parameters of these element counts (layout: module docstring)."""
    numels = list(numels)
    total = 0
    for n in numels:
        if n < BNB_MIN_8BIT_SIZE:
            total += 2 * 4 * n  # state1, state2 fp32
        else:
            total += 2 * n + 2 * 4 * math.ceil(n / BNB_BLOCKSIZE)  # uint8 moments, fp32 absmax per block
    if any(n >= BNB_MIN_8BIT_SIZE for n in numels):
        total += 2 * 4 * BNB_QMAP_SIZE  # qmap1, qmap2: one pair shared by all parameters
    return total


class AdamW8bitState:
    """AdamW8bit's state tensors at bitsandbytes' exact layout, made on the first step(), without its update
    kernels: what a fake-tensor trace allocates (they do not run on fake tensors)."""

    def __init__(self, params: list[torch.nn.Parameter]):
        self.params = list(params)
        self.state: dict = {}
        self.qmaps: tuple | None = None

    def step(self) -> None:
        for p in self.params:
            if p.grad is None or p in self.state:
                continue
            n = p.numel()
            if n < BNB_MIN_8BIT_SIZE:
                self.state[p] = {"step": 0, "state1": torch.zeros_like(p, dtype=torch.float32),
                                 "state2": torch.zeros_like(p, dtype=torch.float32)}
                continue
            if self.qmaps is None:
                self.qmaps = (torch.zeros(BNB_QMAP_SIZE, device=p.device), torch.zeros(BNB_QMAP_SIZE, device=p.device))
            blocks = math.ceil(n / BNB_BLOCKSIZE)
            self.state[p] = {"step": 0, "state1": torch.zeros_like(p, dtype=torch.uint8), "qmap1": self.qmaps[0],
                             "state2": torch.zeros_like(p, dtype=torch.uint8), "qmap2": self.qmaps[1],
                             "absmax1": torch.zeros(blocks, device=p.device),
                             "absmax2": torch.zeros(blocks, device=p.device)}

    def zero_grad(self, set_to_none: bool = True) -> None:
        for p in self.params:
            p.grad = None


# --- resident encoders ---------------------------------------------------------------------------------

def resident_encoders(model) -> torch.nn.Module:
    """The family's frozen text encoder(s) and VAE, bf16, built on the current torch.device (architectures/
    encoders.py, helper B's part of issue 21); ValueError for a family without published encoders."""
    from architectures.encoders import build_resident

    encoders = build_resident(model)
    encoders.requires_grad_(False)
    return encoders


@functools.lru_cache(maxsize=64)
def check_resident_encoders(arch: str, preset: str, overrides: tuple) -> None:
    """ValueError when the model has no resident encoders (built once per config, on meta)."""
    with torch.device("meta"):
        resident_encoders(_meta_model(arch, preset, overrides))


def encode_on_the_fly(encoders: torch.nn.Module, model, batch) -> None:
    """What an encode-on-the-fly step runs before the model (architectures.encoders.encode): the text encoder(s)
    on prompts of the family's length and the VAE's encoder on the batch's pixel video, without gradients."""
    from architectures.encoders import encode

    with torch.no_grad():
        encode(encoders, model, batch)
