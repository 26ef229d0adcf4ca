"""matplotlib figures of a run, each returned as a self-contained base64 PNG data URI."""
from __future__ import annotations

import base64
import functools
import io
from collections import defaultdict
from dataclasses import dataclass

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402 - the backend must be chosen first
import matplotlib.ticker  # noqa: E402

from .. import results  # noqa: E402
from .verdict import config_label, settings_label  # noqa: E402

MIB = 2**20
LOG_SPAN = 10  # values spanning a decade or more get a log axis
MAX_GROUPS = 2
MAX_PANELS = 3
MAX_TRACED_BARS = 24
BREAKDOWN = (("param_bytes", "parameters"), ("grad_bytes", "gradients"), ("optimizer_bytes", "optimizer state"),
             ("saved_activations", "saved activations"))
REGION_ORDER = ("spatial", "attention", "temporal", "forward", "backward", "optimizer")
REGION_COLORS = {"spatial": "#4C72B0", "attention": "#8172B3", "temporal": "#DD8452", "forward": "#93A1AD",
                 "backward": "#55A868", "optimizer": "#C44E52", "other": "#D9D9D9"}
STYLE = {"font.size": 9, "axes.spines.top": False, "axes.spines.right": False, "axes.grid": True,
         "grid.alpha": 0.3, "figure.dpi": 100}


def _styled(draw):
    """Draw under the report's matplotlib style without changing the caller's global rcParams."""
    @functools.wraps(draw)
    def wrapper(*args, **kwargs):
        with plt.rc_context(STYLE):
            return draw(*args, **kwargs)
    return wrapper


@dataclass(frozen=True)
class Figure:
    """One embedded figure: a data URI plus the words around it."""

    title: str
    caption: str
    uri: str
    alt: str


def to_data_uri(fig) -> str:
    buffer = io.BytesIO()
    fig.savefig(buffer, format="png", dpi=100, bbox_inches="tight")
    plt.close(fig)
    return "data:image/png;base64," + base64.b64encode(buffer.getvalue()).decode("ascii")


def arch_colors(archs) -> dict[str, str]:
    palette = plt.get_cmap("tab10").colors
    return {name: matplotlib.colors.to_hex(palette[i % len(palette)]) for i, name in enumerate(sorted(set(archs)))}


def groups(records: list[dict]) -> list[tuple[str, list[dict]]]:
    """Records split by the settings a figure holds fixed (preset, mode, dtype, device), biggest first."""
    from .verdict import family_of

    by_group = defaultdict(list)
    for r in records:  # UNets and DiTs differ by decades: never on one axis
        by_group[(family_of(r["arch"]),) + tuple(str(r.get(f)) for f in results.GROUP_FIELDS)].append(r)
    ordered = sorted(by_group.values(), key=len, reverse=True)[:MAX_GROUPS]
    return [(f"{family_of(rs[0]['arch']).upper()}s, {settings_label(rs[0])}", rs) for rs in ordered]


def memory_field(records: list[dict]) -> tuple[str, str]:
    """Peak allocated where the device reports it (CUDA), else bytes saved for backward."""
    if any(r.get("peak_allocated") for r in records if r["status"] == "ok"):
        return "peak_allocated", "peak allocated"
    return "saved_activations", "saved activations"


def byte_unit(values) -> tuple[float, str]:
    """GiB when the largest value is several GiB, else MiB."""
    largest = max((v for v in values if v), default=0)
    return (2**30, "GiB") if largest >= 4 * 2**30 else (MIB, "MiB")


def log_scale(ax) -> None:
    """A log y axis labelled at its decades only: minor labels would print over the major ones."""
    ax.set_yscale("log")
    ax.yaxis.set_minor_formatter(matplotlib.ticker.NullFormatter())


def _spread(values: list[int]) -> list[int]:
    """At most MAX_PANELS values: smallest, middle, largest."""
    values = sorted(set(values))
    if len(values) <= MAX_PANELS:
        return values
    return [values[0], values[len(values) // 2], values[-1]]


@_styled
def scaling_figure(records: list[dict], label: str, x_field: str, panel_field: str) -> Figure | None:
    """Step time and memory against `x_field`, one panel per `panel_field` value, one line per arch."""
    ok = [r for r in records if r["status"] == "ok" and r.get("step_ms_median")]
    if len({r[x_field] for r in ok}) < 2:
        return None
    batch = min(r["batch"] for r in ok)
    ok = [r for r in ok if r["batch"] == batch]
    panels = _spread([r[panel_field] for r in ok])
    mem_field, mem_label = memory_field(ok)
    scale, unit_name = byte_unit(r.get(mem_field) for r in ok)
    colors = arch_colors(r["arch"] for r in records)
    fig, axes = plt.subplots(2, len(panels), figsize=(3.6 * len(panels) + 0.6, 5.4), squeeze=False)
    for col, panel in enumerate(panels):
        for arch in sorted({r["arch"] for r in ok}):
            points = sorted((r[x_field], r) for r in ok if r["arch"] == arch and r[panel_field] == panel)
            if not points:
                continue
            xs = [x for x, _ in points]
            axes[0][col].plot(xs, [r["step_ms_median"] for _, r in points], "o-", color=colors[arch], label=arch)
            mem = [(x, r[mem_field] / scale) for x, r in points if r.get(mem_field) is not None]
            if mem:
                axes[1][col].plot(*zip(*mem), "o-", color=colors[arch], label=arch)
        unit = "px" if panel_field == "resolution" else " frames"
        axes[0][col].set_title(f"{panel}{unit}, batch {batch}")
        axes[1][col].set_xlabel(x_field)
        for ax in axes[:, col]:
            ax.set_xticks(sorted({r[x_field] for r in ok}))
    for row, values in ((0, [r["step_ms_median"] for r in ok]), (1, [r.get(mem_field) for r in ok])):
        values = [v for v in values if v]
        if values and max(values) / min(values) >= LOG_SPAN:
            for ax in axes[row]:
                log_scale(ax)
    axes[0][0].set_ylabel("step time, median (ms)")
    axes[1][0].set_ylabel(f"{mem_label} ({unit_name})")
    handles, labels = axes[0][0].get_legend_handles_labels()
    for ax in axes.flat:  # the first panel may miss an arch another panel has
        for h, l in zip(*ax.get_legend_handles_labels()):
            if l not in labels:
                handles.append(h)
                labels.append(l)
    fig.legend(handles, labels, loc="upper center", ncol=min(len(labels), 5), bbox_to_anchor=(0.5, 1.04),
               frameon=False)
    fig.tight_layout()
    return Figure(f"Step time and memory vs {x_field} ({label})",
                  f"Median step time and {mem_label} of each ok case at batch {batch}; "
                  f"one panel per {panel_field}. Failed cases are not drawn (see the failures table).",
                  to_data_uri(fig), f"line charts of step time and memory against {x_field}")


@_styled
def breakdown_figure(records: list[dict], label: str) -> Figure | None:
    """Stacked memory parts per arch at the configuration most archs completed."""
    ok = [r for r in records if r["status"] == "ok" and r.get("param_bytes") is not None]
    if not ok:
        return None
    by_config = defaultdict(list)
    for r in ok:
        by_config[(r["resolution"], r["frames"], r["batch"])].append(r)
    config = max(by_config, key=lambda c: (len({r["arch"] for r in by_config[c]}), c[0] * c[0] * c[1] * c[2]))
    chosen = sorted({r["arch"]: r for r in by_config[config]}.values(), key=lambda r: r["arch"])
    fig, ax = plt.subplots(figsize=(max(4.5, 1.1 * len(chosen) + 2.5), 3.6))
    names = [r["arch"] for r in chosen]
    bottoms = [0.0] * len(chosen)
    scale, unit_name = byte_unit(sum(r.get(f) or 0 for f, _ in BREAKDOWN) for r in chosen)
    for (fld, part), color in zip(BREAKDOWN, ("#4C72B0", "#DD8452", "#55A868", "#C44E52")):
        values = [(r.get(fld) or 0) / scale for r in chosen]
        ax.bar(names, values, bottom=bottoms, color=color, label=part, width=0.6)
        bottoms = [b + v for b, v in zip(bottoms, values)]
    peaks = [(i, r["peak_allocated"] / scale) for i, r in enumerate(chosen) if r.get("peak_allocated")]
    if peaks:
        ax.scatter(*zip(*peaks), marker="_", s=900, color="black", zorder=3, label="peak allocated")
    ax.set_ylabel(unit_name)
    ax.tick_params(axis="x", rotation=20)
    ax.legend(frameon=False, fontsize=8, loc="upper left", bbox_to_anchor=(1.0, 1.0))
    fig.tight_layout()
    return Figure(f"Memory breakdown ({label})",
                  f"At {config_label(chosen[0], short=True)}: parameters, gradients, optimizer state and bytes "
                  f"saved for backward (exact, from saved_tensors_hooks); the black tick is the allocator's peak "
                  f"where the device reports one.", to_data_uri(fig), "stacked bars of memory parts per architecture")


def region_parts(summary: dict) -> tuple[dict[str, float], float, str]:
    """Exclusive ms per region, the step total they partition, and what the times are (GPU or CPU)."""
    regions = summary.get("regions") or {}
    gpu = bool(summary.get("step_gpu_ms"))
    if gpu:
        parts = {name: row.get("gpu_self_ms", 0.0) for name, row in regions.items()}
        steps = summary["step_gpu_ms"]
    else:
        parts = {name: row.get("range_self_ms", 0.0) + row.get("backward_self_ms", 0.0)
                 for name, row in regions.items()}
        steps = summary.get("step_ms") or []
    total = sum(steps) / len(steps) if steps else sum(parts.values())
    return parts, total, "GPU kernel time" if gpu else "CPU wall time"


@_styled
def region_figure(traced: list[tuple[dict, dict]]) -> Figure | None:
    """Horizontal stacked bars: each traced case's step split into its regions."""
    rows = [(record, *region_parts(summary)) for record, summary in traced[:MAX_TRACED_BARS]]
    rows = [r for r in rows if r[2] > 0]
    if not rows:
        return None
    bases = sorted({basis for *_, basis in rows})
    fig, ax = plt.subplots(figsize=(8.5, 0.42 * len(rows) + 1.4))
    labels = [f"{r['arch']} {config_label(r, short=True)}" for r, *_ in rows]
    lefts = [0.0] * len(rows)
    names = [n for n in REGION_ORDER if any(n in parts for _, parts, _, _ in rows)]
    for name in names + ["other"]:
        if name == "other":
            values = [max(total - sum(parts.values()), 0.0) for _, parts, total, _ in rows]
        else:
            values = [parts.get(name, 0.0) for _, parts, _, _ in rows]
        ax.barh(labels, values, left=lefts, color=REGION_COLORS.get(name, "#999999"), label=name, height=0.6)
        lefts = [a + b for a, b in zip(lefts, values)]
    ax.invert_yaxis()
    ax.set_xlabel(f"ms per step ({' / '.join(bases)})")
    ax.legend(frameon=False, ncol=len(names) + 1, loc="lower center", bbox_to_anchor=(0.5, 1.0), fontsize=8)
    fig.tight_layout()
    return Figure("Time by region (from traces)",
                  "Exclusive time per record_function region, averaged over the profiled steps: a region's own "
                  "range plus the backward nodes of ops it ran (a nested region keeps its own time); 'other' is "
                  "the rest of the step. On CUDA this is kernel time, on CPU wall time.",
                  to_data_uri(fig), "stacked horizontal bars of time per region per traced case")


@_styled
def oom_frontier(records: list[dict], label: str) -> tuple[Figure | None, list[dict]]:
    """Largest frame count that fit, per resolution per arch (smallest batch), when the sweep hit OOM."""
    if not any(r["status"] == "oom" for r in records):
        return None, []
    batch = min(r["batch"] for r in records)
    table = []
    for arch in sorted({r["arch"] for r in records}):
        for res in sorted({r["resolution"] for r in records if r["arch"] == arch}):
            cases = [r for r in records if r["arch"] == arch and r["resolution"] == res and r["batch"] == batch]
            fits = [r["frames"] for r in cases if r["status"] == "ok"]
            ooms = [r["frames"] for r in cases if r["status"] == "oom"]
            table.append({"arch": arch, "resolution": res, "batch": batch, "max_frames_ok": max(fits, default=None),
                          "min_frames_oom": min(ooms, default=None), "tried": sorted(r["frames"] for r in cases)})
    colors = arch_colors(r["arch"] for r in records)
    archs = sorted({row["arch"] for row in table})
    resolutions = sorted({row["resolution"] for row in table})
    width = 0.8 / len(archs)
    fig, ax = plt.subplots(figsize=(max(5.0, 1.2 * len(resolutions) * len(archs) / 2 + 2.5), 3.4))
    for i, arch in enumerate(archs):
        fits = {row["resolution"]: row["max_frames_ok"] or 0 for row in table if row["arch"] == arch}
        xs = [j + (i - (len(archs) - 1) / 2) * width for j, res in enumerate(resolutions) if res in fits]
        heights = [fits[res] for res in resolutions if res in fits]
        bars = ax.bar(xs, heights, width=width * 0.92, color=colors[arch], label=arch)
        ax.bar_label(bars, fontsize=7, padding=1)
    ax.set_xticks(range(len(resolutions)), [f"{res}px" for res in resolutions])
    ax.set_xlabel("resolution")
    ax.set_ylabel("largest frame count that fit")
    ax.legend(frameon=False, fontsize=8, loc="upper left", bbox_to_anchor=(1.0, 1.0))
    fig.tight_layout()
    return Figure(f"OOM frontier ({label})",
                  f"Largest frame count measured without running out of memory at batch {batch} (0: none fit). "
                  "The frontier is only as fine as the sweep's frame grid.",
                  to_data_uri(fig), "bar chart of the largest frame count that fit per resolution"), table
