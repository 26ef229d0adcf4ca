"""The report's opening answer for runs that hold predictions: per model, shape and GPU type, the layouts that
fit ranked by predicted throughput, the fewest GPUs that fit, and what does not fit and why.

Layouts are ranked as `stbench plan` ranks them (planner.Row: global samples per second, the batch of every
data-parallel rank per predicted step), so the report's best layout is plan.txt's for the same records. Every
figure here is a prediction and is labelled so.
"""
from __future__ import annotations

import math
from collections import defaultdict
from dataclasses import dataclass, field

import architectures

from .. import planner, results
from ..predict import hardware as hw
from ..predict.command import unshrinkable
from ..predict.efficiency import HOST_BOUND, is_host_bound
from ..units import format_bytes

STEPS = 1000  # GPU-hours per this many steps
# what a model is: every identity field but the shape, the layout and the hardware
MODEL_FIELDS = ("arch", "preset", "mode", "dtype", "compile", "weights", "lora", "param_dtype", "optimizer",
                "encoders")
SHAPE_FIELDS = ("height", "width", "frames", "batch")
COMPACT_ROWS = 12  # a model's one-GPU predictions beyond this many rows fold into a <details>


def is_prediction(record: dict) -> bool:
    return isinstance(record.get("predicted"), dict)


def resolution_label(record: dict) -> str:
    """'640px' for square frames, '480x832' (height x width) otherwise."""
    label = results.resolution_label(record)
    return label if "x" in label else f"{label}px"


def shape_label(record: dict) -> str:
    return f"{resolution_label(record)} x {record['frames']} frames, batch {record['batch']}"


def model_label(record: dict) -> str:
    sets = ", ".join(f"{k}={v}" for k, v in sorted((record.get("overrides") or {}).items()))
    parts = [record["arch"], record["preset"], f"mode {record['mode']}", record["dtype"]]
    lora = record.get("lora")
    if isinstance(lora, dict):
        parts.append(f"LoRA rank {lora.get('rank')}")
    for name, default in results.LATER_IDENTITY.items():
        if name != "lora" and record.get(name) not in (None, default):
            parts.append(f"{name} {record[name]}")
    if record.get("weights"):
        parts.append(f"weights {record['weights']}")
    return " ".join(parts[:2]) + ", " + ", ".join(parts[2:]) + (f" [{sets}]" if sets else "")


def hardware_label(name: str) -> str:
    target = hw.HARDWARE.get(name)
    return target.label if target is not None else name


def _key(record: dict, names) -> tuple:
    return tuple(str(record.get(n)) for n in names)


def _shape_key(record: dict) -> tuple:
    height = record.get("height") or record["resolution"]
    return (height, record.get("width") or height, record["frames"], record["batch"])


# --- one layout ----------------------------------------------------------------------------------------

def layout_of(record: dict) -> planner.Layout | None:
    """The plan's Layout of a sharded prediction; None for one GPU without FSDP (plain `stbench predict`)."""
    world = record.get("world_size") or 1
    if record.get("fsdp") is None:
        if world == 1:
            return None
        return planner.Layout(1, world, record.get("context_parallel"),
                              record.get("activation_checkpointing") or "none")
    return planner.Layout(record["fsdp"], world // record["fsdp"], record.get("context_parallel"),
                          record.get("activation_checkpointing") or "none")


def layout_name(record: dict) -> str:
    layout = layout_of(record)
    if layout is None:
        ac = record.get("activation_checkpointing")
        return "1 GPU" + (f", checkpointing {ac}" if ac not in (None, "none") else "")
    name = layout.name if record.get("fsdp") is not None else f"{layout.context_parallel} {layout.cp} (no FSDP)"
    if record.get("fsdp_mixed_precision"):
        name += ", bf16 params"
    if record.get("fsdp_reshard_after_forward") is False:
        name += ", no reshard after forward"
    return name


def samples_per_s(record: dict) -> float | None:
    """Global samples per second, exactly as `stbench plan` ranks layouts (planner.Row.samples_per_s)."""
    layout = layout_of(record)
    if layout is not None and record.get("fsdp") is not None:
        return planner.Row(layout, record).samples_per_s
    p = record.get("predicted") or {}
    if record["status"] != "ok" or not p.get("step_ms"):
        return None
    return record["batch"] / (p["step_ms"] / 1e3)  # every rank on the same sample (one GPU, or CP without FSDP)


def time_parts(p: dict) -> dict | None:
    """The expected step split so the parts add up to it: compute alone, compute with communication hidden
    behind it, communication exposed (the step waits for it); None without a time model."""
    step = p.get("step_ms")
    if step is None:
        return None
    kernels = p.get("kernels_ms")
    if kernels is None:  # one GPU: no communication
        return {"compute": step, "hidden": 0.0, "exposed": 0.0}
    hidden = min(p.get("comm_overlapped_ms") or 0.0, kernels)
    return {"compute": kernels - hidden, "hidden": hidden, "exposed": max(step - kernels, 0.0)}


@dataclass
class Option:
    """One predicted layout of a group, with what a planning user reads off it."""

    record: dict
    name: str
    gpus: int
    fits: bool
    samples_per_s: float | None
    parts: dict | None

    @property
    def p(self) -> dict:
        return self.record["predicted"]

    @property
    def step_ms(self) -> float | None:
        return self.p.get("step_ms")

    @property
    def bound_only(self) -> bool:
        """Predicted before expected times existed: its `step_ms` is the roofline lower bound."""
        return self.step_ms is not None and "step_ms_bound" not in self.p

    @property
    def host_bound(self) -> bool:
        return is_host_bound(self.record)

    @property
    def gpu_hours(self) -> float | None:
        return None if self.step_ms is None else self.step_ms * STEPS * self.gpus / 3.6e6

    @property
    def mfu_percent(self) -> float | None:
        mfu = self.p.get("mfu")
        return None if mfu is None else 100.0 * mfu  # the record holds a fraction

    @property
    def frames_per_s(self) -> float | None:
        return None if self.samples_per_s is None else self.samples_per_s * self.record["frames"]


def option(record: dict) -> Option:
    return Option(record, layout_name(record), record.get("world_size") or 1, record["status"] == "ok",
                  samples_per_s(record), time_parts(record["predicted"]))


def ranked(options: list[Option]) -> list[Option]:
    """Fitting layouts first, fastest (global samples/s) first, as planner.plan sorts; then those without a time."""
    fit = [o for o in options if o.fits]
    return sorted(fit, key=lambda o: (o.samples_per_s is None, -(o.samples_per_s or 0.0), o.gpus))


# --- why a layout does not fit ---------------------------------------------------------------------------

def _suggestion(record: dict, checkpointing: bool, context_parallel: bool) -> str:
    tries = []
    if not checkpointing:
        tries.append("activation checkpointing (--activation-checkpointing blocks)")
    if not context_parallel:
        try:
            cp = architectures.get(record["arch"]).context_parallel
        except Exception:  # noqa: BLE001 - a user's model this install cannot name
            cp = ()
        if cp:
            tries.append("context parallelism (--context-parallel " + "|".join(cp) + ")")
        else:
            tries.append(f"a smaller shape ({record['arch']} has no context parallelism in stbench)")
    return " or ".join(tries) if tries else "a smaller shape or batch"


def series_of(o: Option) -> tuple:
    """(checkpointing, context-parallel mode, its degree): what stays fixed while FSDP's degree varies."""
    r = o.record
    cp = (o.gpus // r["fsdp"]) if r.get("fsdp") else o.gpus if r.get("context_parallel") else 1
    return (r.get("activation_checkpointing") or "none", r.get("context_parallel"), cp)


def not_fitting(options: list[Option], fitting: list[Option]) -> list[str]:
    """One sentence per series of layouts (the same checkpointing and context parallelism over FSDP degrees)
    that does not fit: what more GPUs would not shrink, or how far over the GPU's memory they are."""
    series = defaultdict(list)
    for o in options:
        if not o.fits and o.record["status"] == "oom":
            series[series_of(o)].append(o)
    out = []
    for (ac, cp_mode, cp), members in sorted(series.items(), key=lambda kv: str(kv[0])):
        members.sort(key=lambda o: o.gpus)
        p = members[0].p
        usable = p["memory_bytes"] - p.get("context_bytes", 0)
        what = "without activation checkpointing" if ac == "none" else f"with checkpointing {ac}"
        if cp_mode:
            what += f", {cp_mode} {cp}"
        gpus = ", ".join(str(o.gpus) for o in members)
        # sharded layouts only: one unsharded GPU has no FSDP gathered copies, so its peak lies off their line
        sharded = [o for o in members if o.p.get("reserved_bytes") is not None and o.record.get("fsdp")]
        fit = unshrinkable([(o.gpus // cp, o.p["reserved_bytes"]) for o in sharded])
        fitted_on = " and ".join(str(w * cp) for w in fit[2]) if fit is not None else ""  # in GPUs
        fitting_here = [f for f in fitting if series_of(f) == (ac, cp_mode, cp)]
        peaks = ", ".join(f"{format_bytes(o.p['peak_bytes'])} on {o.gpus}" for o in members)
        if fit is not None and fit[0] >= usable:
            text = (f"{what}: does not fit on {gpus} GPUs; the part of a rank's peak that more GPUs do not shrink "
                    f"(activations, gathered parameters, temporaries) is about {format_bytes(fit[0])} per rank "
                    f"(fitted on {fitted_on} GPUs), over the {format_bytes(usable)} a GPU has beside its CUDA context: "
                    f"more GPUs do not help; try {_suggestion(members[0].record, ac != 'none', cp_mode is not None)}.")
        elif fitting_here and min(f.gpus for f in fitting_here) > members[-1].gpus:
            fewest = min(f.gpus for f in fitting_here)
            text = (f"{what}: fewer than {fewest} GPUs do not fit (per-rank peak {peaks} GPUs, against "
                    f"{format_bytes(p['memory_bytes'])} per GPU).")
        elif fit is not None:
            need = 2 ** math.ceil(math.log2(max(fit[1] / (usable - fit[0]), 1.0)))
            text = (f"{what}: does not fit on {gpus} GPUs (per-rank peak {peaks}); a rank's peak falls as "
                    f"{format_bytes(fit[0])} + {format_bytes(fit[1])} / GPUs, which fits from about {need} "
                    f"GPUs (fitted, not predicted: predict that layout to confirm).")
        else:
            top = max(((k, v) for k, v in (p.get("breakdown") or {}).items()), key=lambda kv: kv[1],
                      default=None)
            largest = f"; the largest part is {top[0]} at {format_bytes(top[1])}" if top else ""
            instead = (f"{fitting[0].name} fits" if fitting else
                       f"try {_suggestion(members[0].record, ac != 'none', cp_mode is not None)}")
            text = (f"{what}: per-rank peak {peaks} GPUs, over {format_bytes(p['memory_bytes'])} per GPU"
                    f"{largest}; {instead}.")
        out.append(text)
    return out


# --- groups --------------------------------------------------------------------------------------------

@dataclass
class Group:
    """One model at one shape on one GPU type: its layouts, ranked, and the sentences that answer."""

    model: str
    shape: str
    hardware: str
    hardware_label: str
    memory_bytes: int | None
    ranked: list[Option]
    unfit: list[Option]
    failed: list[Option]
    fewest: Option | None
    headline: str
    reasons: list[str]
    figures: list = field(default_factory=list)
    sharded: bool = False


def _headline(model: str, shape: str, label: str, best: Option | None, fewest: Option | None,
              options: list[Option]) -> str:
    where = f"{model} at {shape} on {label} (predicted)"
    if best is None:
        fits = [o for o in options if o.fits]
        if fits:
            return (f"{where}: fits ({', '.join(o.name for o in fits)}, {format_bytes(fits[0].p['peak_bytes'])} "
                    f"per rank) but this hardware has no time model, so nothing is ranked.")
        return f"{where}: no predicted layout fits."
    from .render import fmt_duration, fmt_sig  # noqa: local - render imports this module

    text = (f"{where}: best {best.name} on {best.gpus} GPU{'s' if best.gpus > 1 else ''}, "
            f"{fmt_sig(best.samples_per_s)} samples/s ({fmt_sig(best.frames_per_s)} frames/s), "
            f"{format_bytes(best.p['peak_bytes'])} per rank of {format_bytes(best.p['memory_bytes'])}, "
            f"{fmt_duration(best.step_ms)} per step{' (a roofline lower bound: predicted before expected times)' if best.bound_only else ''}, "
            f"{fmt_sig(best.gpu_hours)} GPU-hours per 1,000 steps.")
    if best.host_bound:
        text += (f" {HOST_BOUND[0].upper()}{HOST_BOUND[1:]}: its kernels are too small and many for an eager CPU "
                 f"to launch as fast as the GPU runs them, so a step may take longer than this (the record's "
                 f"warnings give the figures).")
    if fewest is not None and fewest is not best:
        text += (f" Fewest GPUs that fit: {fewest.gpus} ({fewest.name}, {fmt_sig(fewest.samples_per_s)} samples/s, "
                 f"{fmt_sig(fewest.gpu_hours)} GPU-hours per 1,000 steps).")
    return text


def groups(records: list[dict]) -> list[Group]:
    """Predictions grouped by model, shape and hardware, models and shapes in order."""
    by_group = defaultdict(list)
    for r in records:
        if is_prediction(r) and r["predicted"].get("hardware"):
            by_group[(_key(r, MODEL_FIELDS), str(sorted((r.get("overrides") or {}).items())), _shape_key(r),
                      r["predicted"]["hardware"])].append(r)
    order = {name: i for i, name in enumerate(hw.NAMES)}
    out = []
    for key in sorted(by_group, key=lambda k: (k[0], k[1], k[2], order.get(k[3], 99), k[3])):
        members = by_group[key]
        first = members[0]
        options = [option(r) for r in members if r["status"] != "error" and "peak_bytes" in r["predicted"]]
        failed = [option(r) for r in members if r not in [o.record for o in options]]
        best_first = ranked(options)
        with_time = [o for o in best_first if o.samples_per_s is not None]
        fewest = min((o for o in best_first), key=lambda o: (o.gpus, -(o.samples_per_s or 0.0)), default=None)
        model, shape, label = model_label(first), shape_label(first), hardware_label(key[3])
        unfit = sorted((o for o in options if not o.fits), key=lambda o: (o.gpus, o.name))
        out.append(Group(model, shape, key[3], label, first["predicted"].get("memory_bytes"), best_first, unfit,
                         failed, fewest, _headline(model, shape, label, with_time[0] if with_time else None,
                                                   fewest, options),
                         not_fitting(options, best_first),
                         sharded=any(layout_of(o.record) is not None for o in options)))
    return out


def section(records: list[dict], figures_for=None, frontier_figures=None, frontier_lines=()) -> dict | None:
    """Context of `_answer.html`: sharded groups in full, one-GPU predictions as a table per model; None
    without predictions. `figures_for(group)` draws a group's figures (predicted.group_figures),
    `frontier_figures(predictions)` the peak-against-shape figures (predicted.frontier_figure); frontier_lines
    are the run's frontier.txt."""
    all_groups = groups(records)
    if not all_groups:
        return None
    full = [g for g in all_groups if g.sharded or len(g.ranked) + len(g.unfit) > 1]
    compact = defaultdict(list)
    for g in all_groups:
        if g not in full:
            compact[g.model].append(g)
    if figures_for is not None:
        for g in full:
            g.figures = [f for f in figures_for(g) if f is not None]
    return {"groups": full,
            "compact": [{"model": model, "groups": gs, "fold": len(gs) > COMPACT_ROWS}
                        for model, gs in compact.items()],
            "frontiers": frontier_figures([r for r in records if is_prediction(r) and r["status"] != "error"
                                           and "peak_bytes" in r["predicted"]]) if frontier_figures else [],
            "frontier_lines": list(frontier_lines)}
