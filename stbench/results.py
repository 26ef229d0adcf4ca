"""Append-only, schema-versioned JSON Lines result files <-> pandas DataFrames."""
from __future__ import annotations

import json
import os
import re
from pathlib import Path
from typing import Iterable

from .errors import UserError

SCHEMA_VERSION = 1
RESULTS_FILE = "results.jsonl"
RUN_FILE = "run.json"  # beside results.jsonl: the command lines and sweep settings that produced the run

# The record's field names are a contract (DESIGN.md): suites, report, gate and users' scripts read them.
IDENTITY_FIELDS = ("arch", "preset", "overrides", "mode", "batch", "frames", "resolution", "dtype", "device",
                   "compile", "world_size", "context_parallel", "weights")
RECORD_FIELDS = (
    "schema", "arch", "preset", "overrides", "mode", "batch", "frames", "resolution", "dtype", "device", "compile",
    "status", "error",
    "step_ms_median", "step_ms_min", "step_ms_p10", "step_ms_p90", "step_ms_samples", "warmup",
    "peak_allocated", "peak_reserved", "nvml_peak_process", "nvml_peak_device",
    "saved_activations", "param_bytes", "grad_bytes", "optimizer_bytes",
    "params_total", "params_trainable", "flops_per_step", "tflops", "mfu",
    "warnings", "env", "dsv", "world_size", "context_parallel", "comm_bytes",
    "weights", "train",
)
STATUSES = ("ok", "oom", "error")
REQUIRED_TEXT = ("arch", "preset", "mode", "dtype", "device", "status")
REQUIRED_INT = ("batch", "frames", "resolution")


def new_record(identity: dict) -> dict:
    """A record with every field present (None where not measured) and the case's identity filled in."""
    record = {name: None for name in RECORD_FIELDS}
    record.update(schema=SCHEMA_VERSION, warnings=[], world_size=1, context_parallel=None)
    record.update(identity)
    return record


def case_key(record: dict) -> str:
    """A stable string naming the case of a record (same case -> same key across runs and versions)."""
    ident = {name: record.get(name) for name in IDENTITY_FIELDS}
    ident["overrides"] = dict(sorted((ident["overrides"] or {}).items()))
    ident["world_size"] = ident["world_size"] or 1
    return json.dumps(ident, sort_keys=True, separators=(",", ":"))


def case_slug(record: dict) -> str:
    """A short, file-name-safe, readable id of a case: used for trace folders and pytest ids."""
    parts = [record["arch"], record["preset"], record["mode"], f"r{record['resolution']}", f"f{record['frames']}",
             f"b{record['batch']}", record["dtype"], record["device"].replace(":", "")]
    if record.get("compile"):
        parts.append("compiled")
    for key, value in sorted((record.get("overrides") or {}).items()):
        parts.append(f"{key}={value}")
    if record.get("weights"):
        parts.append(f"weights={Path(record['weights']).stem}")
    if (record.get("world_size") or 1) > 1:
        parts.append(f"{record.get('context_parallel')}x{record['world_size']}")
    return re.sub(r"[^A-Za-z0-9_.=-]+", "_", "-".join(str(p) for p in parts))


def results_path(run: str | os.PathLike) -> Path:
    """A run is a folder holding results.jsonl, or the .jsonl file itself."""
    path = Path(run)
    return path / RESULTS_FILE if path.is_dir() or not path.suffix else path


def append_record(path: str | os.PathLike, record: dict) -> None:
    """Append one record as one line and fsync it, so a crash never loses or corrupts earlier records.

    A torn last line left by a killed writer is cut off first, so the new line starts clean.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    line = json.dumps(record, sort_keys=False, default=str) + "\n"
    with open(path, "a+b") as f:
        size = f.seek(0, os.SEEK_END)
        if size:
            f.seek(size - 1)
            if f.read(1) != b"\n":
                f.seek(0)
                data = f.read()
                f.truncate(data.rfind(b"\n") + 1)
                f.seek(0, os.SEEK_END)
        f.write(line.encode())
        f.flush()
        os.fsync(f.fileno())


def read_records(run: str | os.PathLike, *, strict: bool = False) -> list[dict]:
    """All complete records of a run; a torn final line (killed writer) is skipped unless strict."""
    path = results_path(run)
    try:
        text = path.read_text()
    except (OSError, UnicodeDecodeError) as e:
        raise UserError(f"cannot read results file {path}: {getattr(e, 'strerror', None) or e}") from None
    records = []
    lines = text.split("\n")
    for number, line in enumerate(lines, 1):
        if not line.strip():
            continue
        try:
            record = json.loads(line)
        except json.JSONDecodeError:
            if number == len(lines) and not strict:  # torn last line: the writer was killed mid-write
                continue
            raise UserError(f"{path}:{number}: not a JSON object (malformed results file)") from None
        if not isinstance(record, dict) or "arch" not in record or not isinstance(record.get("schema"), int):
            raise UserError(f"{path}:{number}: not a stbench result record")
        if record["schema"] > SCHEMA_VERSION:
            raise UserError(f"{path}:{number}: schema {record['schema']} is newer than this stbench "
                            f"({SCHEMA_VERSION}); upgrade stbench")
        records.append({**{name: None for name in RECORD_FIELDS}, **record})
    return records


def check_records(run: str | os.PathLike, records: list[dict]) -> None:
    """The identity and status fields that report and gate rely on must be present and typed (UserError if not)."""
    for number, record in enumerate(records, 1):
        for name in REQUIRED_TEXT + REQUIRED_INT:
            value = record.get(name)
            kind = int if name in REQUIRED_INT else str
            if not isinstance(value, kind) or isinstance(value, bool):
                raise UserError(f"{results_path(run)}: record {number} has no valid {name!r} "
                                f"(got {value!r}; malformed results file)")
        if record["status"] not in STATUSES:
            raise UserError(f"{results_path(run)}: record {number} has status {record['status']!r}; "
                            f"legal: {', '.join(STATUSES)}")


def to_frame(records: Iterable[dict]):
    """Records -> DataFrame with one row per record, every schema field a column, plus `case_key`."""
    import pandas as pd

    records = list(records)
    frame = pd.DataFrame(records, columns=list(RECORD_FIELDS) + sorted(
        {k for r in records for k in r} - set(RECORD_FIELDS)))
    frame["case_key"] = [case_key(r) for r in records]
    return frame


def load_run(run: str | os.PathLike):
    return to_frame(read_records(run))
