"""Units: human-readable byte sizes for tables and progress lines (records keep exact bytes); UTC timestamps."""
from __future__ import annotations

import datetime

UNITS = (("GiB", 2**30), ("MiB", 2**20), ("KiB", 2**10))


def format_bytes(value: float) -> str:
    """1536 -> '1.50 KiB', 1000 -> '1000 B' (binary units, two decimals)."""
    for unit, size in UNITS:
        if abs(value) >= size:
            return f"{value / size:.2f} {unit}"
    return f"{int(value)} B"


def utc_now() -> str:
    """Now, in UTC, ISO 8601 to the second: the time stamp of records and run.json."""
    return datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds")
