"""The report's predicted section: `stbench predict` figures per hardware, beside measured ones where both exist."""
from __future__ import annotations

import re

import matplotlib.pyplot as plt

from .. import results
from ..predict import hardware as hw
from .figures import Figure, _styled, to_data_uri

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
           "measured_peak": None, "measured_peak_field": None}
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


def _family(record: dict) -> tuple:
    """What a row of the what-fits figure holds fixed: the model, batch, mode, dtype and the layout of GPUs."""
    return (record["arch"], record["preset"], f"b{record['batch']}", record["mode"], record["dtype"],
            results.layout_label(record))


def _largest(cases: list[dict], field: str) -> str:
    """'N' (largest value that fits; '≥N' if every tried value fits) or 'none' over cases varying in `field`."""
    fit = max((r[field] for r in cases if r["predicted"]["fits"]), default=None)
    if fit is None:
        return "none"
    return f"{fit}" if fit < max(r[field] for r in cases) else f"≥{fit}"


def _most_tried(cases: list[dict], fixed: str, varied: str):
    """The value of `fixed` at which the most values of `varied` were tried (where a frontier search ran)."""
    return max(sorted({r[fixed] for r in cases}), key=lambda v: len({r[varied] for r in cases if r[fixed] == v}))


@_styled
def fits_figure(predictions: list[dict]) -> Figure | None:
    """What fits on which GPU: per architecture and hardware, the largest frames and resolution predicted to fit."""
    names = [n for n in hw.NAMES if any(r["predicted"]["hardware"] == n for r in predictions)]
    families = sorted({_family(r) for r in predictions})
    if not names or not families:
        return None
    grid, notes = [], []
    for family in families:
        values, texts = [], []
        for name in names:
            cases = [r for r in predictions if r["predicted"]["hardware"] == name
                     and _family(r) == family]
            if not cases:
                values.append(0)
                texts.append("—")
                continue
            res = _most_tried(cases, "resolution", "frames")
            at_res = [r for r in cases if r["resolution"] == res]
            frames = _largest(at_res, "frames")
            text = f"{frames} frames @ {res}px"
            fr = _most_tried(cases, "frames", "resolution")
            at_frames = [r for r in cases if r["frames"] == fr]
            if len({r["resolution"] for r in at_frames}) > 1:
                text += f"\n{_largest(at_frames, 'resolution')}px @ {fr} frames"
            values.append(max((r["frames"] for r in at_res if r["predicted"]["fits"]), default=0))
            texts.append(text)
        grid.append(values)
        notes.append(texts)
    fig, ax = plt.subplots(figsize=(1.9 * len(names) + 3.5, 0.6 * len(families) + 1.4))
    ax.imshow(grid, cmap="Greens", aspect="auto", vmin=0, vmax=max(max(row) for row in grid) * 1.6 or 1)
    for i, texts in enumerate(notes):
        for j, text in enumerate(texts):
            ax.text(j, i, text, ha="center", va="center", fontsize=8)
    ax.set_xticks(range(len(names)), names, rotation=30, ha="right")
    ax.set_yticks(range(len(families)), [" ".join(f for f in family if f) for family in families])
    ax.grid(False)
    ax.set_title("largest case predicted to fit (PREDICTED, not measured)", fontsize=9)
    fig.tight_layout()
    return Figure("What fits on which GPU (predicted)",
                  "Largest frame count (at the resolution where most frame counts were tried) and largest "
                  "resolution (at the frame count where most resolutions were tried) that `stbench predict` "
                  "predicts to fit in each GPU's memory, from fake-tensor training steps. ≥: the largest value "
                  "tried (or legal) fits; none: not even the smallest tried. Run with --frontier for the exact "
                  "boundary. Predictions, not measurements.",
                  to_data_uri(fig), "grid of the largest predicted-to-fit frame counts and resolutions per "
                  "architecture and GPU")


def section(records: list[dict]) -> dict | None:
    """Context of `_predicted.html`: rows (prediction, measured twin, errors) and the what-fits figure."""
    predictions = [r for r in records if is_predicted(r) and "peak_bytes" in r["predicted"]]  # not failed ones
    if not predictions:
        return None
    measured = [r for r in records if not is_predicted(r)]
    rows = [pair(r, measured) for r in sorted(predictions, key=lambda r: (
        r["arch"], r["preset"], r["resolution"], r["frames"], r["batch"], r["dtype"], r["device"]))]
    return {"rows": rows, "figure": fits_figure(predictions),
            "compared": sum(row["measured"] is not None for row in rows)}
