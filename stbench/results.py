"""The result record (a typed schema), append-only JSON Lines files, and pandas as their one reader.

A record travels as a plain dict (one JSON object per line of results.jsonl); `Record` is its schema: the
field names are a contract (docs/design.md) that suites, report, gate, planner and users' scripts read, and
the identity, comparison and grouping field lists are derived from the roles its fields carry.
"""
from __future__ import annotations

import dataclasses
import json
import os
import re
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterable

from .errors import UserError
from .runfolder import results_path

SCHEMA_VERSION = 1
STATUSES = ("ok", "oom", "error")
ATTENTION_PRESET = "attention"  # the preset of `stbench attention` records (no frames or resolution)

# Roles of a field. identity: names the case (resume, gate and report match on it); shape: the grid axes of a
# sweep (identity fields that vary within one comparison table).
IDENTITY = {"identity": True}
SHAPE = {"identity": True, "shape": True}


@dataclass
class Record:
    """Schema of one result record: every field, its type and its role (records themselves are dicts)."""

    schema: int = SCHEMA_VERSION
    arch: str = field(default="", metadata=IDENTITY)
    preset: str = field(default="", metadata=IDENTITY)
    overrides: dict = field(default_factory=dict, metadata=IDENTITY)  # --set values, raw text
    mode: str = field(default="", metadata=IDENTITY)
    batch: int = field(default=0, metadata=SHAPE)
    frames: int = field(default=0, metadata=SHAPE)
    resolution: int = field(default=0, metadata=SHAPE)
    dtype: str = field(default="", metadata=IDENTITY)
    device: str = field(default="", metadata=IDENTITY)
    compile: bool = field(default=False, metadata=IDENTITY)
    world_size: int = field(default=1, metadata=IDENTITY)
    context_parallel: typing.Optional[str] = field(default=None, metadata=IDENTITY)
    # FSDP (torchrun --fsdp N): None without FSDP (older records keep their keys)
    fsdp: typing.Optional[int] = field(default=None, metadata=IDENTITY)  # data-parallel (sharding) degree
    activation_checkpointing: typing.Optional[str] = field(default=None, metadata=IDENTITY)  # none|blocks|spatial
    fsdp_reshard_after_forward: typing.Optional[bool] = field(default=None, metadata=IDENTITY)
    fsdp_mixed_precision: typing.Optional[bool] = field(default=None, metadata=IDENTITY)  # bf16 params, fp32 reduce
    weights: typing.Optional[str] = field(default=None, metadata=IDENTITY)  # None: random; "trained"; a path
    # training regimes (issue 21); a record written before them reads as their defaults, under its old key
    lora: typing.Optional[dict] = field(default=None, metadata=IDENTITY)  # {rank, targets}; None: no LoRA
    param_dtype: str = field(default="fp32", metadata=IDENTITY)  # fp32 | bf16 weights, gradients, optimizer
    optimizer: str = field(default="adamw", metadata=IDENTITY)  # adamw | adamw8bit
    encoders: str = field(default="precomputed", metadata=IDENTITY)  # precomputed | resident
    # frame height and width in pixels (--resolution HxW; `resolution` is the height); out of the case key when
    # square, so records written before them (None) and square ones keep their keys
    height: typing.Optional[int] = field(default=None, metadata=SHAPE)
    width: typing.Optional[int] = field(default=None, metadata=SHAPE)
    status: str = ""  # ok | oom | error
    error: typing.Optional[str] = None
    # time (milliseconds): statistics of the measured steps, raw samples kept
    step_ms_median: typing.Optional[float] = None
    step_ms_min: typing.Optional[float] = None
    step_ms_p10: typing.Optional[float] = None
    step_ms_p90: typing.Optional[float] = None
    step_ms_samples: typing.Optional[list] = None
    warmup: typing.Optional[int] = None
    rounds: typing.Optional[int] = None  # --rounds: interleaved rounds the samples were pooled from
    sample_rounds: typing.Optional[list] = None  # the round of each sample
    load: typing.Optional[dict] = None  # the machine's load around the measured steps (the most contended round)
    # memory (bytes)
    peak_allocated: typing.Optional[int] = None
    peak_reserved: typing.Optional[int] = None
    nvml_peak_process: typing.Optional[int] = None
    nvml_peak_device: typing.Optional[int] = None
    host_peak_bytes: typing.Optional[int] = None  # CPU: peak resident memory growth during the measured steps
    saved_activations: typing.Optional[int] = None
    param_bytes: typing.Optional[int] = None
    grad_bytes: typing.Optional[int] = None
    optimizer_bytes: typing.Optional[int] = None
    # model and work
    params_total: typing.Optional[int] = None
    params_trainable: typing.Optional[int] = None
    flops_per_step: typing.Optional[int] = None
    tflops: typing.Optional[float] = None
    mfu: typing.Optional[float] = None
    warnings: list = field(default_factory=list)
    env: typing.Optional[dict] = None
    trace: typing.Optional[str] = None  # the case's trace folder (--trace)
    dsv: typing.Optional[dict] = None  # dit-dsv: sparsity, estimator recall, ...
    train: typing.Optional[dict] = None  # stbench train: losses, wall time, held-out loss
    predicted: typing.Optional[dict] = None  # stbench predict: always a prediction, never a measurement
    attention: typing.Optional[dict] = None  # stbench attention: a backend against SDPA at tokens x sparsity
    # torchrun (context parallelism): the busiest rank's bytes, and per-rank lists
    comm_bytes: typing.Optional[int] = None
    comm_bytes_by_kind: typing.Optional[dict] = None
    rank_step_ms_median: typing.Optional[list] = None
    rank_peak_allocated: typing.Optional[list] = None
    rank_nvml_peak_process: typing.Optional[list] = None
    rank_nvml_peak_device: typing.Optional[list] = None
    rank_saved_activations: typing.Optional[list] = None
    rank_comm_bytes: typing.Optional[list] = None
    rank_attention_work: typing.Optional[list] = None
    # FSDP: the device mesh, bytes sent per collective kind (counted on c10d ops), each rank's shard bytes
    mesh: typing.Optional[dict] = None  # {"fsdp": N, "cp": C, "shard_over": "fsdp x cp"}
    comm_bytes_by_collective: typing.Optional[dict] = None  # all_gather, reduce_scatter, all_to_all, ...
    rank_param_bytes: typing.Optional[list] = None
    rank_grad_bytes: typing.Optional[list] = None
    rank_optimizer_bytes: typing.Optional[list] = None
    rank_host_peak_bytes: typing.Optional[list] = None


_FIELDS = dataclasses.fields(Record)
_TYPES = typing.get_type_hints(Record)
RECORD_FIELDS = tuple(f.name for f in _FIELDS)
IDENTITY_FIELDS = tuple(f.name for f in _FIELDS if f.metadata.get("identity"))
SHAPE_FIELDS = tuple(f.name for f in _FIELDS if f.metadata.get("shape"))
# Records of different architectures are compared when these agree (same settings, same shape).
MATCH_FIELDS = tuple(n for n in IDENTITY_FIELDS if n not in ("arch", "overrides"))
# A sweep's fixed settings: records sharing them go into one figure.
GROUP_FIELDS = tuple(n for n in MATCH_FIELDS if n not in SHAPE_FIELDS)
# Identity fields added after records were first written: a record without one reads as its default, and a
# default value stays out of the case key, so older records keep their keys.
LATER_IDENTITY = {f.name: f.default for f in _FIELDS if f.name in ("lora", "param_dtype", "optimizer", "encoders")}
# Identity fields every readable record must carry, with their JSON type.
REQUIRED = {n: _TYPES[n] for n in IDENTITY_FIELDS if _TYPES[n] in (str, int) and n not in LATER_IDENTITY} | {
    "status": str}


def new_record(identity: dict) -> dict:
    """A record with every field present (its default) and the case's identity filled in."""
    record = dataclasses.asdict(Record())
    record.update(identity)
    return record


def case_key(record: dict) -> str:
    """A stable string naming the case of a record (same case -> same key across runs and versions)."""
    ident = {name: record.get(name) for name in IDENTITY_FIELDS}
    ident["overrides"] = dict(sorted((ident["overrides"] or {}).items()))
    ident["world_size"] = ident["world_size"] or 1
    for name, default in LATER_IDENTITY.items():
        if ident[name] is None or ident[name] == default:
            del ident[name]
    if is_square(record):
        del ident["height"], ident["width"]
    if record.get("predicted"):  # `stbench predict --hardware cpu` names the same device as a measured CPU case
        ident["predicted"] = True
    return json.dumps(ident, sort_keys=True, separators=(",", ":"))


def is_square(record: dict) -> bool:
    """Whether a record's frames are square (records without height/width are: they predate non-square frames)."""
    return all(record.get(n) in (None, record.get("resolution")) for n in ("height", "width"))


def resolution_label(record: dict) -> str:
    """A record's frame size as shown: "64" when square, "480x832" (height x width) otherwise."""
    if is_square(record):
        return str(record["resolution"])
    return f"{record.get('height') or record['resolution']}x{record.get('width') or record['resolution']}"


def case_slug(record: dict) -> str:
    """A short, file-name-safe, readable id of a case: used for trace folders and pytest ids."""
    parts = [record["arch"], record["preset"], record["mode"], f"r{resolution_label(record)}", f"f{record['frames']}",
             f"b{record['batch']}", record["dtype"], record["device"].replace(":", "")]
    if record.get("compile"):
        parts.append("compiled")
    for key, value in sorted((record.get("overrides") or {}).items()):
        parts.append(f"{key}={value}")
    if record.get("weights"):
        parts.append(f"weights={Path(record['weights']).stem}")
    if (record.get("world_size") or 1) > 1 and record.get("context_parallel"):
        parts.append(f"{record.get('context_parallel')}x{record['world_size']}")
    if record.get("fsdp"):
        parts.append(f"fsdp{record['fsdp']}of{record.get('world_size')}-ac={record.get('activation_checkpointing')}"
                     + ("-reshard" if record.get("fsdp_reshard_after_forward") else "")
                     + ("-mp" if record.get("fsdp_mixed_precision") else ""))
    elif record.get("activation_checkpointing") not in (None, "none"):
        parts.append(f"ac={record['activation_checkpointing']}")
    if record.get("lora"):
        parts.append(f"lora{record['lora']['rank']}={'+'.join(record['lora']['targets'])}")
    for name, default in LATER_IDENTITY.items():
        if name != "lora" and record.get(name) not in (None, default):
            parts.append(f"{name}={record[name]}")
    return re.sub(r"[^A-Za-z0-9_.=-]+", "_", "-".join(str(p) for p in parts))


def layout_label(record: dict) -> str:
    """'' on one device; else the ranks and how they split the work, e.g. '8 ranks: fsdp 4 x ring 2, checkpointing
    blocks' (a prediction's ranks are the GPUs of its layout)."""
    world = record.get("world_size") or 1
    if record.get("fsdp") is None:
        return f"{record.get('context_parallel')} x{world}" if world > 1 else ""
    cp = world // record["fsdp"]
    text = f"{world} ranks: fsdp {record['fsdp']}" + (f" x {record.get('context_parallel')} {cp}" if cp > 1 else "")
    if record.get("activation_checkpointing") not in (None, "none"):
        text += f", checkpointing {record['activation_checkpointing']}"
    return text + (", bf16 params" if record.get("fsdp_mixed_precision") else "")


def regime_label(record: dict) -> str:
    """'' for the default regime; else e.g. 'LoRA r32, bf16 params, adamw8bit, checkpointing blocks, resident
    encoders' (checkpointing here only on one process: layout_label names it under FSDP)."""
    parts = []
    if record.get("lora"):
        parts.append(f"LoRA r{record['lora']['rank']} on {','.join(record['lora']['targets'])}")
    if record.get("param_dtype") not in (None, "fp32"):
        parts.append(f"{record['param_dtype']} params")
    if record.get("optimizer") not in (None, "adamw"):
        parts.append(record["optimizer"])
    if record.get("fsdp") is None and record.get("activation_checkpointing") not in (None, "none"):
        parts.append(f"checkpointing {record['activation_checkpointing']}")
    if record.get("encoders") not in (None, "precomputed"):
        parts.append(f"{record['encoders']} encoders")
    return ", ".join(parts)


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
        read = {**{name: None for name in RECORD_FIELDS}, **LATER_IDENTITY, **record}
        for side in ("height", "width"):  # written before non-square frames: square, as every new square record
            if read[side] is None:
                read[side] = read["resolution"]
        records.append(read)
    return records


def check_records(run: str | os.PathLike, records: list[dict]) -> None:
    """The identity and status fields that report and gate rely on must be present and typed (UserError if not)."""
    for number, record in enumerate(records, 1):
        for name, kind in REQUIRED.items():
            if name in SHAPE_FIELDS and record.get("preset") == ATTENTION_PRESET:
                continue  # `stbench attention` times attention alone: tokens, not a video shape
            value = record.get(name)
            if not isinstance(value, kind) or isinstance(value, bool):
                raise UserError(f"{results_path(run)}: record {number} has no valid {name!r} "
                                f"(got {value!r}; malformed results file)")
        if record["status"] not in STATUSES:
            raise UserError(f"{results_path(run)}: record {number} has status {record['status']!r}; "
                            f"legal: {', '.join(STATUSES)}")


def recorded_keys(run: str | os.PathLike) -> set[str]:
    """Keys of the cases a run already holds (none when it has no results yet): what --resume skips."""
    path = results_path(run)
    return {case_key(r) for r in read_records(path)} if path.exists() else set()


def latest_per_case(records: Iterable[dict]) -> list[dict]:
    """One record per case: the last one written wins (a resumed or repeated case replaces the earlier)."""
    by_key = {}
    for record in records:
        by_key[case_key(record)] = record
    return list(by_key.values())


def to_frame(records: Iterable[dict]):
    """Records -> DataFrame, one row per record, every schema field a column, plus `case_key`. Object dtype from
    the start: values stay as written (exact integer bytes stay integers, a missing value is None, not NaN)."""
    import pandas as pd

    records = list(records)
    extra = sorted({k for r in records for k in r} - set(RECORD_FIELDS))
    frame = pd.DataFrame(records, columns=list(RECORD_FIELDS) + extra, dtype=object)
    frame = frame.where(frame.notna(), None) if len(frame) else frame
    frame["case_key"] = [case_key(r) for r in records]
    return frame


def load_frame(run: str | os.PathLike, *, latest: bool = False):
    """The records of a run (folder or .jsonl) as a validated DataFrame; `latest`: the last record per case."""
    records = read_records(run)
    check_records(run, records)
    return to_frame(latest_per_case(records) if latest else records)


def frame_records(frame) -> list[dict]:
    """DataFrame rows back to record dicts (without the derived `case_key` column)."""
    return [{k: v for k, v in row.items() if k != "case_key"} for row in frame.to_dict("records")]
