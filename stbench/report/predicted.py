"""The report's predicted section: `stbench predict` figures per hardware, beside measured ones where both exist."""
from __future__ import annotations

import re

import matplotlib.pyplot as plt
import matplotlib.ticker

from .. import results
from ..predict import hardware as hw
from ..predict.efficiency import is_host_bound
from . import answer
from .figures import LOG_SPAN, Figure, _styled, arch_colors, log_scale, to_data_uri


def is_predicted(record: dict) -> bool:
    return bool(record.get("predicted"))


def _runs_on(measured: dict, name: str) -> bool:
    """Whether a measured record ran on the hardware a prediction names (the CPU, or a GPU by its name)."""
    if name == "cpu":
        return measured["device"] == "cpu"
    target = hw.HARDWARE.get(name)
    gpu = (measured.get("env") or {}).get("gpu") or ""
    return (measured["device"].startswith("cuda") and target is not None and target.gpu_pattern is not None
            and re.search(target.gpu_pattern, gpu) is not None)


def _error(predicted, measured):
    return predicted / measured - 1 if predicted is not None and measured else None


def pair(prediction: dict, measured: list[dict]) -> dict:
    """One table row: the prediction and, where the same case was measured on that hardware, the error."""
    p = prediction["predicted"]
    row = {"record": prediction, "p": p, "measured": None, "peak_error": None, "time_error": None,
           "measured_peak": None, "measured_peak_field": None, "host_bound": is_host_bound(prediction)}
    key = results.case_key({**prediction, "device": None, "predicted": None})
    for m in measured:
        if m["status"] != "ok" or not _runs_on(m, p["hardware"]):
            continue
        if results.case_key({**m, "device": None}) != key:
            continue
        if p["hardware"] == "cpu":
            field, value = "host_peak_bytes", m.get("host_peak_bytes")
        elif m.get("nvml_peak_process") is not None:
            field, value = "nvml_peak_process", m["nvml_peak_process"]  # includes the CUDA context, as peak_bytes
        else:
            field, value = "peak_reserved + context", (m["peak_reserved"] + p["context_bytes"]
                                                       if m.get("peak_reserved") is not None else None)
        row.update(measured=m, measured_peak=value, measured_peak_field=field,
                   peak_error=_error(p["peak_bytes"], value), time_error=_error(p["step_ms"], m.get("step_ms_median")))
    return row


PARTS = (("params", "parameters", "#4C72B0"), ("grads", "gradients", "#DD8452"), ("optimizer", "optimizer state",
         "#55A868"), ("activations", "activations", "#C44E52"), ("transient", "transient (temporaries, cache)",
         "#8172B3"), ("context", "CUDA context", "#93A1AD"))
TIME_PARTS = (("compute", "compute alone", "#4C72B0"), ("hidden", "compute with communication hidden behind it",
              "#8EBAD9"), ("exposed", "communication exposed (the step waits)", "#C44E52"))
GIB = 2**30
MIN_POINTS = 3  # a frontier line needs this many shapes (two are read better off the tables)


def _bar_label(o) -> str:
    return o.name + ("" if o.fits else " (does not fit)")


def _stacked_bars(labels: list[str], series: list[tuple[str, str, list[float]]]):
    """A figure of horizontal bars, one per label, stacked from `series` [(legend name, color, values)] in order."""
    fig, ax = plt.subplots(figsize=(9.0, 0.34 * len(labels) + 1.6))
    lefts = [0.0] * len(labels)
    for name, color, values in series:
        ax.barh(labels, values, left=lefts, color=color, label=name, height=0.62)
        lefts = [a + b for a, b in zip(lefts, values)]
    return fig, ax


def _finish_bars(fig, ax, xlabel: str) -> None:
    """First bar on top, small layout labels, the legend outside the axes (it never covers a bar)."""
    ax.invert_yaxis()
    ax.set_xlabel(xlabel)
    ax.tick_params(axis="y", labelsize=8)
    ax.legend(frameon=False, fontsize=8, loc="upper left", bbox_to_anchor=(1.01, 1.0))
    fig.tight_layout()


@_styled
def memory_figure(group) -> Figure | None:
    """Per layout, the per-rank peak stacked by kind against a line at the GPU's memory."""
    options = sorted(group.ranked + group.unfit, key=lambda o: (o.gpus, o.name))
    options = [o for o in options if o.p.get("breakdown")]
    if not options:
        return None
    fig, ax = _stacked_bars([_bar_label(o) for o in options], [
        (name, color, [((o.p.get("context_bytes") or 0) if key == "context" else (o.p["breakdown"].get(key) or 0))
                       / GIB for o in options]) for key, name, color in PARTS])
    if group.memory_bytes:
        ax.axvline(group.memory_bytes / GIB, color="black", linestyle="--", linewidth=1.2,
                   label=f"{group.hardware_label}: {group.memory_bytes / GIB:.1f} GiB")
    _finish_bars(fig, ax, "predicted peak per rank (GiB)")
    return Figure(f"Per-rank peak by layout: {group.model}, {group.shape} on {group.hardware} (PREDICTED)",
                  "What each rank holds at its predicted peak: parameters, gradients and optimizer state (sharded by "
                  "FSDP), activations kept for backward, transient memory (temporaries, allocator rounding and "
                  "cache) and the CUDA context; the dashed line is the GPU's memory (a bar just past it may still fit: "
                  "at the limit the caching allocator releases its cache and retries, which the fit replays). "
                  "Predictions, not measurements.",
                  to_data_uri(fig), "stacked horizontal bars of the predicted per-rank peak per layout")


@_styled
def time_figure(group) -> Figure | None:
    """Per layout that fits, the expected step split into compute, hidden and exposed communication."""
    options = [o for o in group.ranked if o.parts is not None]
    if not options:
        return None
    scale, unit = (1e3, "s") if max(o.step_ms for o in options) >= 1000 else (1.0, "ms")
    fig, ax = _stacked_bars([o.name for o in options],
                            [(name, color, [o.parts[key] / scale for o in options]) for key, name, color in TIME_PARTS])
    bounds = [(o.p["step_ms_bound"] / scale, i) for i, o in enumerate(options) if o.p.get("step_ms_bound")]
    if bounds:
        ax.scatter(*zip(*bounds), marker="|", s=260, color="black", zorder=3, label="roofline lower bound")
    ax.xaxis.set_major_locator(matplotlib.ticker.MaxNLocator(7))
    _finish_bars(fig, ax, f"predicted step time per rank ({unit})")
    return Figure(f"Step time by layout: {group.model}, {group.shape} on {group.hardware} (PREDICTED)",
                  "The expected step of each layout that fits, fastest first: compute alone, compute with FSDP's "
                  "and the ring's communication hidden behind it, and communication the step waits for (Ulysses "
                  "all-to-alls, traffic longer than the compute it overlaps); the bars add up to the step time. "
                  "The tick is the roofline lower bound where the record has one. Predictions, not measurements.",
                  to_data_uri(fig), "stacked horizontal bars of predicted step time per layout")


def group_figures(group) -> list[Figure | None]:
    return [memory_figure(group), time_figure(group)]


def _series_key(record: dict) -> tuple:
    """What a frontier line holds fixed: model, batch and layout (the hardware is the line)."""
    return (answer.model_label(record), record["batch"], answer.layout_name(record))


def _most_tried(cases: list[dict], fixed: str, varied: str):
    """The value of `fixed` at which the most values of `varied` were tried (where a frontier search ran)."""
    return max(sorted({r[fixed] for r in cases}), key=lambda v: len({r[varied] for r in cases if r[fixed] == v}))


@_styled
def frontier_figure(predictions: list[dict]) -> list[Figure]:
    """Per model: the predicted peak against frames (at the resolution where most frame counts were tried) and
    against resolution (at the frame count where most resolutions were tried), one line per GPU type, each
    with its capacity as a dashed line of the same colour."""
    by_series = {}
    for r in predictions:
        if results.is_square(r):
            by_series.setdefault(_series_key(r), []).append(r)
    out = []
    for (model, batch, layout), cases in sorted(by_series.items()):
        panels = []
        res = _most_tried(cases, "resolution", "frames")
        at_res = [r for r in cases if r["resolution"] == res]
        if len({r["frames"] for r in at_res}) >= MIN_POINTS:
            panels.append(("frames", at_res, f"frames at {res}px"))
        fr = _most_tried(cases, "frames", "resolution")
        at_frames = [r for r in cases if r["frames"] == fr]
        if len({r["resolution"] for r in at_frames}) >= MIN_POINTS:
            panels.append(("resolution", at_frames, f"resolution (px, square) at {fr} frames"))
        if not panels:
            continue
        names = [n for n in hw.NAMES if any(r["predicted"]["hardware"] == n for r in cases)]
        colors = arch_colors(names)
        fig, axes = plt.subplots(1, len(panels), figsize=(5.0 * len(panels) + 2.6, 3.6), squeeze=False)
        for ax, (field, rows, xlabel) in zip(axes[0], panels):
            for name in names:
                points = sorted((r[field], r["predicted"]["peak_bytes"] / GIB) for r in rows
                                if r["predicted"]["hardware"] == name)
                if not points:
                    continue
                ax.plot(*zip(*points), "o-", color=colors[name], markersize=3, label=f"{name} peak")
                memory = next(r["predicted"].get("memory_bytes") for r in rows if r["predicted"]["hardware"] == name)
                if memory:
                    ax.axhline(memory / GIB, color=colors[name], linestyle="--", linewidth=1,
                               label=f"{name} memory {memory / GIB:.0f} GiB")
            values = [r["predicted"]["peak_bytes"] for r in rows]
            if max(values) / max(min(values), 1) >= LOG_SPAN:
                log_scale(ax)
            ax.set_xlabel(xlabel)
        axes[0][0].set_ylabel("predicted peak per rank (GiB)")
        handles, labels = [], []
        for ax in axes[0]:
            for h, l in zip(*ax.get_legend_handles_labels()):
                if l not in labels:
                    handles.append(h)
                    labels.append(l)
        axes[0][-1].legend(handles, labels, frameon=False, fontsize=8, loc="upper left", bbox_to_anchor=(1.02, 1.0))
        fig.tight_layout()
        where = f", {layout}" if layout != "1 GPU" else ""
        out.append(Figure(f"Memory frontier: {model}, batch {batch}{where} (PREDICTED)",
                          "Predicted peak per rank against the frame count and the frame size, one line per GPU "
                          "type; a dashed line of the same colour is that GPU's memory: a case fits where its line "
                          "is below its dashed line. Predictions, not measurements.", to_data_uri(fig),
                          "predicted peak memory against frames and resolution per GPU type, with capacity lines"))
    return out


def section(records: list[dict]) -> dict | None:
    """Context of `_predicted.html`: rows (prediction, measured twin, errors) and the what-fits figure."""
    predictions = [r for r in records if is_predicted(r) and "peak_bytes" in r["predicted"]]  # not failed ones
    if not predictions:
        return None
    measured = [r for r in records if not is_predicted(r)]
    rows = [pair(r, measured) for r in sorted(predictions, key=lambda r: (
        r["arch"], r["preset"], r["resolution"], r["frames"], r["batch"], r["dtype"], r["device"]))]
    return {"rows": rows,
            "compared": sum(row["measured"] is not None for row in rows)}
