"""`python -m stbench inspect`: parameter counts and saved-for-backward activation bytes, per architecture.

Saved bytes come from one training forward (loss included) under `saved_tensors_hooks`; parameters are not
counted. They are split by where the tensor was saved: inside a module whose parameters are all `spatial`,
all `temporal` (or `estimator`), or elsewhere (`other`: glue between modules, the loss).

`--device meta` builds the model without memory and still counts exactly: shapes are all the hooks need.
On meta, scaled_dot_product_attention is routed to the flash kernel (PyTorch's meta dispatch would pick the
math kernel, which saves the full attention matrix and no GPU training run would), so meta counts equal what
the CPU flash kernel saves.
"""
from __future__ import annotations

import contextlib

import torch
from torch import nn
import torch.nn.functional as F

import architectures

from .config import DTYPES, TORCH_DTYPES, Case, frame_fields, parse_set_options
from .errors import UserError
from .overrides import comma_list, one_resolution
from .measure.activations import SavedTensorCounter

GROUPS = ("spatial", "temporal", "estimator")


def add_arguments(parser):
    parser.add_argument("--arch", required=True, help="comma-separated architectures; ratios are vs the first")
    parser.add_argument("--preset", default="tiny")
    parser.add_argument("--resolution", default="64", help="frame size in pixels: one number is square, HxW is "
                        "height x width, e.g. 480x832 (default 64)")
    parser.add_argument("--frames", type=int, default=8)
    parser.add_argument("--batch", type=int, default=1)
    parser.add_argument("--mode", default="temporal", help="temporal (spatial frozen) or full")
    parser.add_argument("--dtype", default="fp32", help=f"one of {', '.join(DTYPES)}")
    parser.add_argument("--device", default="cpu", help="cpu, cuda[:N] or meta (exact bytes, no memory)")
    parser.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="config override")
    parser.add_argument("--params-only", action="store_true", help="count parameters; skip the forward pass")


def count_parameters(model: architectures.VideoModel) -> dict[str, int]:
    """Parameter counts: total, per group, and trainable (under the model's current training mode)."""
    counts = {"total": 0, "trainable": 0, **{g: 0 for g in GROUPS}}
    for name, p in model.named_parameters():
        counts["total"] += p.numel()
        counts[model.group_of(name)] += p.numel()
        counts["trainable"] += p.numel() if p.requires_grad else 0
    return counts


def module_groups(model: architectures.VideoModel) -> dict[nn.Module, str]:
    """Every submodule whose parameters all belong to one group, with that group."""
    groups = {}
    for prefix, module in model.named_modules():
        if module is model:
            continue
        kinds = {model.group_of(f"{prefix}.{name}") for name, _ in module.named_parameters()}
        if len(kinds) == 1:
            groups[module] = kinds.pop()
    return groups


@contextlib.contextmanager
def group_regions(model: architectures.VideoModel, counter: SavedTensorCounter):
    """Opens `counter.region(group)` while a single-group module runs (innermost wins; others are `other`)."""
    open_regions: list = []

    def enter(group):
        def hook(module, args):
            region = counter.region(group)
            region.__enter__()
            open_regions.append(region)
        return hook

    def leave(module, args, output):
        open_regions.pop().__exit__(None, None, None)

    handles = []
    for module, group in module_groups(model).items():
        handles += [module.register_forward_pre_hook(enter(group)), module.register_forward_hook(leave)]
    try:
        yield counter
    finally:
        for handle in handles:
            handle.remove()


@contextlib.contextmanager
def flash_attention_on_meta():
    """Routes unmasked SDPA on meta tensors to the flash kernel, which saves q, k, v, out and logsumexp."""
    original = F.scaled_dot_product_attention

    def sdpa(query, key, value, attn_mask=None, dropout_p=0.0, is_causal=False, scale=None, enable_gqa=False):
        if query.device.type != "meta" or attn_mask is not None or enable_gqa:
            return original(query, key, value, attn_mask=attn_mask, dropout_p=dropout_p, is_causal=is_causal,
                            scale=scale, enable_gqa=enable_gqa)
        return torch.ops.aten._scaled_dot_product_flash_attention_for_cpu(
            query, key, value, dropout_p, is_causal, scale=scale)[0]

    F.scaled_dot_product_attention = sdpa
    try:
        yield
    finally:
        F.scaled_dot_product_attention = original


def saved_bytes_by_group(model: architectures.VideoModel, compute_loss) -> dict[str, int]:
    """Bytes saved for backward by `compute_loss()`: total and per group (spatial/temporal/estimator/other)."""
    counter = SavedTensorCounter().exclude_parameters(model)
    with flash_attention_on_meta(), group_regions(model, counter), counter:
        loss = compute_loss()
    del loss
    return {"total": counter.total_bytes, **{g: counter.region_bytes.get(g, 0) for g in (*GROUPS, "other")}}


def inspect_arch(case: Case, device: str, dtype: str, params_only: bool) -> dict:
    """One row of the table: parameter counts and (unless params_only) saved-activation bytes."""
    with torch.device(device):
        model = architectures.get(case.arch).build(case.model_config())
    model = model.to(TORCH_DTYPES[dtype]).set_training_mode(case.mode)
    row = {"arch": case.arch, "params": count_parameters(model)}
    if not params_only:
        batch = model.make_batch(case.batch, case.frames, *case.frame_hw, device=device,
                                 dtype=TORCH_DTYPES[dtype])
        model.train()
        row["saved"] = saved_bytes_by_group(model, lambda: model.loss(batch))
    return row


def _millions(n: int) -> str:
    return f"{n / 1e6:.2f}M"


def _mib(n: int) -> str:
    return f"{n / 2**20:.2f} MiB"


def format_table(rows: list[dict]) -> str:
    show_estimator = any(r["params"]["estimator"] for r in rows)
    header = ["arch", "params", "spatial", "temporal"] + (["estimator"] if show_estimator else []) + ["trainable"]
    with_saved = all("saved" in r for r in rows)
    if with_saved:
        header += ["saved", "saved spatial", "saved temporal", "saved other", "saved bytes", "vs first"]
    lines = []
    for r in rows:
        p = r["params"]
        cells = [r["arch"], _millions(p["total"]), _millions(p["spatial"]), _millions(p["temporal"])]
        cells += [_millions(p["estimator"])] if show_estimator else []
        cells += [_millions(p["trainable"])]
        if with_saved:
            s, first = r["saved"], rows[0]["saved"]["total"]
            ratio = f"{s['total'] / first:.3f}x" if first else "-"
            cells += [_mib(s["total"]), _mib(s["spatial"]), _mib(s["temporal"] + s["estimator"]), _mib(s["other"]),
                      str(s["total"]), ratio]
        lines.append(cells)
    widths = [max(len(str(c)) for c in column) for column in zip(header, *lines)]
    out = ["  ".join(h.ljust(w) if i == 0 else h.rjust(w) for i, (h, w) in enumerate(zip(header, widths)))]
    out += ["  ".join(c.ljust(w) if i == 0 else c.rjust(w) for i, (c, w) in enumerate(zip(cells, widths)))
            for cells in lines]
    return "\n".join(out)


def execute(args) -> int:
    archs = list(comma_list(args.arch, "arch", str))
    device = args.device
    if device != "meta" and device.split(":")[0] not in ("cpu", "cuda"):
        raise UserError(f"--device: {device!r} is not legal; legal: cpu, cuda, cuda:N, meta")
    if device.startswith("cuda") and not torch.cuda.is_available():
        raise UserError("--device cuda: no CUDA device is available")
    overrides = parse_set_options(args.set)
    # Case validates arch, preset, mode, shape, dtype and overrides; meta is checked like cpu
    cases = [Case(arch=a, preset=args.preset, mode=args.mode, batch=args.batch, frames=args.frames,
                  **frame_fields(one_resolution(args.resolution)), dtype=args.dtype,
                  device="cpu" if device == "meta" else device,
                  overrides=overrides) for a in archs]
    rows = [inspect_arch(case, device, args.dtype, args.params_only) for case in cases]
    what = "" if args.params_only else (f", saved for backward by one training forward at {args.batch}x"
                                        f"{args.frames}x{'x'.join(map(str, cases[0].frame_hw))}, {args.dtype}")
    print(f"preset {args.preset}, mode {args.mode}, device {device}{what}")
    print(format_table(rows))
    return 0
