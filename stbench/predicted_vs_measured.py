"""Predicted against measured, case by case: `stbench predict` records beside `stbench run` records of the same cases.

`python -m stbench.predicted_vs_measured PREDICTED_RUN MEASURED_RUN [-o TABLE.txt] [--csv TABLE.csv]` prints one
row per prediction: peak memory the allocator's way (allocated, reserved), the process's peak (CUDA context
included: NVML on a GPU, resident-set growth on the CPU) and step time, predicted against measured, with the
error predicted / measured - 1. A prediction is paired with a measurement of the same case on the hardware it
names (`stbench.report.predicted.pair`, the report's own rule); unpaired predictions stay in the table, labelled
not measured. scripts/gpu_check.sh writes this table for the GPU it finds (`hardware_for_gpu`).
"""
from __future__ import annotations

import argparse
import csv
import re
import sys
from pathlib import Path

from . import results
from .errors import UserError
from .predict import hardware as hw
from .units import format_bytes

# (column, predicted fields, the first present is used; measured field): the allocator model's peaks against
# torch.cuda.max_memory_allocated / max_memory_reserved (allocated_bytes: the older name of peak_allocated_bytes)
MEMORY_PAIRS = (
    ("allocated", ("peak_allocated_bytes", "allocated_bytes"), "peak_allocated"),
    ("reserved", ("reserved_bytes",), "peak_reserved"),
)
CSV_FIELDS = ("case", "hardware", "fits", "measured_on", "allocated_predicted", "allocated_measured",
              "reserved_predicted", "reserved_measured", "process_predicted", "process_measured",
              "process_measured_field", "step_ms_predicted", "step_ms_bound", "step_ms_measured")


def hardware_for_gpu(gpu_name: str) -> hw.Hardware | None:
    """The hardware table's entry for a torch.cuda.get_device_name() (by each entry's gpu_pattern), or None."""
    found = [h for h in hw.HARDWARE.values() if h.gpu_pattern and re.search(h.gpu_pattern, gpu_name)]
    return found[0] if len(found) == 1 else None


def _load(run) -> list[dict]:
    records = results.read_records(run)
    results.check_records(run, records)
    return results.latest_per_case(records)


def rows(predictions: list[dict], measured: list[dict]) -> list[dict]:
    """One row per prediction (errors and oom predictions included), with its paired measurement's figures."""
    from .report.predicted import is_predicted, pair

    measured = [m for m in measured if not is_predicted(m)]
    out = []
    for prediction in predictions:
        p = prediction.get("predicted") or {}
        if not is_predicted(prediction) or "peak_bytes" not in p:
            continue  # a prediction that failed has no figures to compare
        paired = pair(prediction, measured)
        m = paired["measured"] or {}
        gpu = p["hardware"] != "cpu"
        row = {"case": results.case_slug({**prediction, "device": "DEVICE"}).replace("-DEVICE", ""),
               "hardware": p["hardware"], "fits": p.get("fits"),
               "measured_on": ((m.get("env") or {}).get("gpu") or m.get("device")) if m else None,
               "process_predicted": p["peak_bytes"],
               "process_measured": paired["measured_peak"], "process_measured_field": paired["measured_peak_field"],
               "step_ms_predicted": p.get("step_ms"), "step_ms_bound": p.get("step_ms_bound"),
               "step_ms_measured": m.get("step_ms_median")}
        for column, predicted_fields, measured_field in MEMORY_PAIRS:
            value = next((p[f] for f in predicted_fields if p.get(f) is not None), None)
            row[f"{column}_predicted"] = value if gpu else None  # a CPU has no caching allocator
            row[f"{column}_measured"] = m.get(measured_field)
        out.append(row)
    return out


def _error(predicted, measured) -> str:
    if predicted is None or not measured:
        return "-"
    return f"{predicted / measured - 1:+.1%}"


def _bytes(value) -> str:
    return "-" if value is None else format_bytes(value)


def _ms(value) -> str:
    return "-" if value is None else f"{value:.1f}"


HEADER = ("case", "hardware", "measured on", "alloc pred", "alloc meas", "err", "resv pred", "resv meas", "err",
          "process pred", "process meas", "err", "step pred", "bound", "step meas", "err")


def format_table(table: list[dict]) -> str:
    lines = [HEADER]
    for r in table:
        lines.append((
            r["case"], r["hardware"] + ("" if r["fits"] in (True, None) else " (no fit)"),
            r["measured_on"] or "not measured",
            _bytes(r["allocated_predicted"]), _bytes(r["allocated_measured"]),
            _error(r["allocated_predicted"], r["allocated_measured"]), _bytes(r["reserved_predicted"]), _bytes(r["reserved_measured"]),
            _error(r["reserved_predicted"], r["reserved_measured"]),
            _bytes(r["process_predicted"]), _bytes(r["process_measured"]),
            _error(r["process_predicted"], r["process_measured"]),
            _ms(r["step_ms_predicted"]), _ms(r["step_ms_bound"]), _ms(r["step_ms_measured"]),
            _error(r["step_ms_predicted"], r["step_ms_measured"])))
    widths = [max(len(str(line[i])) for line in lines) for i in range(len(HEADER))]
    text = ["  ".join(str(c).ljust(w) if i < 3 else str(c).rjust(w) for i, (c, w) in enumerate(zip(line, widths)))
            .rstrip() for line in lines]
    text.insert(1, "  ".join("-" * w for w in widths))
    fields = sorted({r["process_measured_field"] for r in table if r["process_measured_field"]})
    text += ["",
             "pred: PREDICTED by `stbench predict` (fake tensors, a caching-allocator model, per-kernel times); "
             "meas: measured by `stbench run`; err = pred / meas - 1.",
             "alloc/resv: allocator peaks (torch.cuda.max_memory_allocated/reserved; none on a CPU); "
             "process: the predicted peak with the CUDA context against "
             f"{', '.join(fields) or 'the process peak'}; step: predicted expected time, bound: roofline lower "
             "bound, meas: median measured step (ms)."]
    return "\n".join(text)


def write_csv(table: list[dict], path) -> None:
    with open(path, "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=CSV_FIELDS)
        writer.writeheader()
        writer.writerows({k: r.get(k) for k in CSV_FIELDS} for r in table)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m stbench.predicted_vs_measured", description=__doc__.split("\n")[0])
    parser.add_argument("predicted", help="run folder or results .jsonl of `stbench predict`")
    parser.add_argument("measured", help="run folder or results .jsonl of `stbench run` (the same cases)")
    parser.add_argument("-o", "--output", help="also write the table to this file")
    parser.add_argument("--csv", help="also write the figures (bytes, ms) as CSV")
    args = parser.parse_args(argv)
    try:
        for path in (args.predicted, args.measured):
            if not results.results_path(path).exists():
                raise UserError(f"{path}: no results file")
        table = rows(_load(args.predicted), _load(args.measured))
        if not table:
            raise UserError(f"{args.predicted}: holds no predictions")
        text = format_table(table)
        print(text)
        if args.output:
            Path(args.output).write_text(text + "\n")
        if args.csv:
            write_csv(table, args.csv)
    except UserError as e:
        print(f"stbench: error: {e}", file=sys.stderr)
        return 2
    except OSError as e:
        print(f"stbench: error: cannot write: {e}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
