"""The report's Training section: held-out loss against steps and wall time, time to a target loss with an
interval, and verdicts phrased at equal quality."""
from __future__ import annotations

from collections import defaultdict
from dataclasses import dataclass

import numpy as np
from scipy import stats

from .figures import Figure, _styled, arch_colors, plt, to_data_uri
from .verdict import family_of

# the point of reference of a family's group, when present; else the first label in order (an architecture
# without --set overrides sorts before its variants, e.g. wan before wan [attention=dsv])
REFERENCES = ("serial-unet", "dit-full")
TARGET_FRACTION = 0.9  # target: the reference's start loss minus this fraction of its held-out improvement
CONFIDENCE = 0.95
BOOTSTRAP_RESAMPLES = 2000
GROUP_FIELDS = ("preset", "mode", "batch", "frames", "resolution", "dtype", "device", "weights")
LADDER_NOTE = ("mobius-ladder-unet is a side-stream reading of Mobius: the frozen image UNet runs frame by frame "
               "and never sees temporal features; the motion modules add their output beside it.")


@dataclass(frozen=True)
class TimeToTarget:
    """When a trained case first reached the target held-out loss, and how sure that is."""

    arch: str
    label: str  # arch plus its --set overrides
    final_loss: float
    steps: float | None  # interpolated between evaluations; None: not reached
    seconds: float | None
    low: float | None  # CONFIDENCE interval of seconds: eval spacing and step-time noise
    high: float | None
    flops: float | None  # steps to target x FLOPs per training step: a cost the machine's load cannot change
    peak_bytes: int | None  # allocator peak (CUDA) or, on CPU, the exact saved-for-backward bytes
    peak_what: str


def label(record: dict) -> str:
    """An architecture with its --set overrides, as training results name it."""
    sets = ",".join(f"{k}={v}" for k, v in sorted((record.get("overrides") or {}).items()))
    return record["arch"] + (f" [{sets}]" if sets else "")


def trained(records: list[dict]) -> list[dict]:
    return [r for r in records if r.get("status") == "ok" and isinstance(r.get("train"), dict)
            and r["train"].get("eval")]


def _groups(records: list[dict]) -> dict[tuple, list[dict]]:
    groups = defaultdict(list)
    for r in records:
        groups[(family_of(r["arch"]),) + tuple(r.get(f) for f in GROUP_FIELDS)].append(r)
    return groups


def crossing_step(evals: list, target: float) -> tuple[float | None, int | None, int | None]:
    """(interpolated step, last eval step above target, first eval step at or below it); None if never."""
    previous = None
    for step, loss in evals:
        if loss <= target:
            if previous is None:
                return float(step), step, step
            (s0, l0) = previous
            return s0 + (step - s0) * (l0 - target) / (l0 - loss), s0, step
        previous = (step, loss)
    return None, None, None


def _wall_at(train: dict, step: float) -> float:
    """Seconds of training steps up to (fractional) `step`."""
    wall = np.concatenate([[0.0], np.asarray(train["wall_ms"], dtype=float)]) / 1e3
    return float(np.interp(step, np.arange(len(wall)), wall))


def time_to_target(record: dict, target: float) -> TimeToTarget:
    train = record["train"]
    step, low_step, high_step = crossing_step(train["eval"], target)
    peak, what = record.get("peak_allocated"), "peak allocated"
    if peak is None:
        peak, what = record.get("saved_activations"), "saved activations"
    seconds = low = high = flops = None
    if step is not None and record.get("flops_per_step"):
        flops = step * record["flops_per_step"]
    if step is not None and train.get("wall_ms"):  # a record without step times still says whether it reached
        seconds = _wall_at(train, step)
        steps_ms = np.diff(np.concatenate([[0.0], np.asarray(train["wall_ms"], dtype=float)]))
        low_ratio = high_ratio = 1.0
        if len(steps_ms) > 2 and steps_ms.mean() > 0:
            ci = stats.bootstrap((steps_ms,), np.mean, confidence_level=CONFIDENCE, n_resamples=BOOTSTRAP_RESAMPLES,
                                 random_state=0, method="percentile").confidence_interval
            low_ratio, high_ratio = ci.low / steps_ms.mean(), ci.high / steps_ms.mean()
        # the evaluations around the crossing, widened by the relative interval of the mean step time
        low, high = _wall_at(train, low_step) * low_ratio, _wall_at(train, high_step) * high_ratio
    return TimeToTarget(record["arch"], label(record), train["eval"][-1][1], step, seconds, low, high, flops,
                        peak, what)


def _verdict(row: TimeToTarget, ref: TimeToTarget, target: float) -> str:
    if row.seconds is None:
        return (f"{row.label} did not reach held-out loss {target:.4f} in its training run "
                f"(final {row.final_loss:.4f}), so it is not cheaper at this quality.")
    text = f"{row.label} reached held-out loss {target:.4f} in {row.seconds:.1f} s ({row.steps:.0f} steps)"
    if row is ref or not ref.seconds:
        return text + "."
    change = 1 - row.seconds / ref.seconds
    overlap = not (row.high < ref.low or row.low > ref.high)
    text += f", {abs(change):.0%} {'sooner' if change > 0 else 'later'} than {ref.label}"
    text += " (intervals overlap: not distinguishable)" if overlap else ""
    if row.flops and ref.flops:
        fewer = 1 - row.flops / ref.flops
        text += f"; {abs(fewer):.0%} {'fewer' if fewer > 0 else 'more'} training FLOPs to get there"
    return text + "."


@_styled
def _curves(records: list[dict], title: str, target: float) -> Figure:
    colors = arch_colors(label(r) for r in records)
    fig, (by_step, by_time) = plt.subplots(1, 2, figsize=(10, 3.6), sharey=True)
    for r in records:
        evals = np.asarray(r["train"]["eval"], dtype=float)
        seconds = [_wall_at(r["train"], s) for s in evals[:, 0]]
        kw = dict(color=colors[label(r)], marker="o", markersize=3, label=label(r))
        by_step.plot(evals[:, 0], evals[:, 1], **kw)
        by_time.plot(seconds, evals[:, 1], **kw)
    for ax, xlabel in ((by_step, "training steps"), (by_time, "training time, s (steps only)")):
        ax.axhline(target, color="#888", linestyle="--", linewidth=1)
        ax.set_xlabel(xlabel)
    by_step.set_ylabel("held-out loss (noise-prediction MSE)")
    by_time.legend(fontsize=7)
    return Figure(title=f"Held-out loss ({title})",
                  caption=f"Dashed: the target {target:.4f} ({TARGET_FRACTION:.0%} of the reference's held-out "
                          f"improvement). Same data, noise and starting weights for every curve.",
                  uri=to_data_uri(fig), alt=f"held-out loss against steps and time, {title}")


@dataclass(frozen=True)
class Outcome:
    """One training group (same data, shape and starting weights): its target and each architecture's result."""

    key: tuple
    title: str
    records: list
    target: float
    rows: list  # TimeToTarget, the reference first
    notes: list

    def missed(self) -> list[TimeToTarget]:
        """The architectures that did not reach the target (never the reference, which defines it)."""
        return [row for row in self.rows[1:] if row.steps is None]


def outcomes(records: list[dict]) -> list[Outcome]:
    """Each group of trained records with its target (TARGET_FRACTION of the reference's held-out improvement)
    and every architecture's time to it."""
    out = []
    for key, group in sorted(_groups(trained(records)).items(), key=lambda kv: str(kv[0])):
        group = sorted(group, key=lambda r: (r["arch"] not in REFERENCES, label(r)))
        ref = group[0]
        start, final = ref["train"]["eval"][0][1], ref["train"]["eval"][-1][1]
        target = start - TARGET_FRACTION * max(start - final, 0.0)
        rows = [time_to_target(r, target) for r in group]
        notes = [] if final < start else [f"{label(ref)} did not lower its held-out loss ({start:.4f} -> "
                                          f"{final:.4f}): the target is its starting loss, not a quality reached."]
        family, preset, mode, batch, frames, resolution, dtype, device, weights = key
        title = (f"{family} {preset}, mode {mode}, {resolution}px x {frames} frames, batch {batch}, {dtype} on "
                 f"{device}, weights {weights or 'random'}")
        out.append(Outcome(key, title, group, target, rows, notes))
    return out


def training_section(records: list[dict]) -> dict | None:
    """Context of the Training section, or None when the run holds no `train` records."""
    found = outcomes(records)
    if not found:
        return None
    groups = []
    for o in found:
        archs = {r["arch"] for r in o.records}
        groups.append({"title": o.title, "target": o.target, "rows": o.rows, "reference": o.rows[0].label,
                       "figure": _curves(o.records, o.title, o.target),
                       "verdicts": o.notes + [_verdict(row, o.rows[0], o.target) for row in o.rows[1:]],
                       "ladder": LADDER_NOTE if "mobius-ladder-unet" in archs else None,
                       "device": o.key[7]})
    return {"groups": groups, "confidence": CONFIDENCE, "fraction": TARGET_FRACTION}
