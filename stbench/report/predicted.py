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


@_styled
def fits_figure(predictions: list[dict]) -> Figure | None:
    """What fits on which GPU: per case family and hardware, the largest predicted-to-fit frame count."""
    names = [n for n in hw.NAMES if any(r["predicted"]["hardware"] == n for r in predictions)]
    families = sorted({(r["arch"], r["preset"], r["resolution"], r["batch"], r["mode"]) for r in predictions})
    if not names or not families:
        return None
    grid, notes = [], []
    for family in families:
        values, texts = [], []
        for name in names:
            cases = [r for r in predictions if r["predicted"]["hardware"] == name
                     and (r["arch"], r["preset"], r["resolution"], r["batch"], r["mode"]) == family]
            fit = max((r["frames"] for r in cases if r["predicted"]["fits"]), default=None)
            tried = max((r["frames"] for r in cases), default=None)
            values.append(fit or 0)
            texts.append("—" if tried is None else ("none" if fit is None else
                                                    (f"{fit}" if fit < tried else f"≥{fit}")))
        grid.append(values)
        notes.append(texts)
    fig, ax = plt.subplots(figsize=(1.2 * len(names) + 3.5, 0.45 * len(families) + 1.4))
    ax.imshow(grid, cmap="Greens", aspect="auto", vmin=0)
    for i, texts in enumerate(notes):
        for j, text in enumerate(texts):
            ax.text(j, i, text, ha="center", va="center", fontsize=8)
    ax.set_xticks(range(len(names)), names, rotation=30, ha="right")
    ax.set_yticks(range(len(families)), [f"{a} {p} {r}px b{b} {m}" for a, p, r, b, m in families])
    ax.grid(False)
    ax.set_title("largest frame count predicted to fit (PREDICTED, not measured)", fontsize=9)
    fig.tight_layout()
    return Figure("What fits on which GPU (predicted)",
                  "Largest frame count `stbench predict` predicts to fit in each GPU's memory, from fake-tensor "
                  "training steps (≥: the largest frame count predicted; none: even the smallest tried does not "
                  "fit). Run with --frontier for the exact boundary. Predictions, not measurements.",
                  to_data_uri(fig), "grid of the largest predicted-to-fit frame counts per architecture and GPU")


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
