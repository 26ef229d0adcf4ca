"""reports/predict/published: the committed table is what its command makes of the committed records."""
from __future__ import annotations

import importlib.util
import json

import pytest

from conftest import REPO

SPEC = importlib.util.spec_from_file_location("published_runs", REPO / "scripts" / "published_runs.py")
published = importlib.util.module_from_spec(SPEC)
SPEC.loader.exec_module(published)


def test_committed_table_and_summary_are_what_the_records_give():
    data, records = published.load_runs(), published.read_records()
    assert len({r["id"] for r in data["run"]}) == len(data["run"])  # ids are unique
    assert sum(len(r["figures"]) for r in data["run"]) >= 8
    for path, text in published.outputs(data, records).items():
        assert path.read_text() == text, f"{path.name} is stale: run python scripts/published_runs.py --from-records"
    assert published.main(["--from-records", "--check"]) == 0
    summary = json.loads(published.SUMMARY.read_text())
    assert summary["rows"] == summary["memory_rows"] + summary["time_rows"]


def test_each_metric_is_compared_with_the_same_predicted_quantity():
    gib = 2**30
    run = {"id": "x", "model": "m", "figures": [
        {"metric": "allocated_after_step", "published": 4.0, "unit": "GiB"},
        {"metric": "max_allocated", "published": 8.0, "unit": "GiB"},
        {"metric": "max_reserved", "published": 10.0, "unit": "GiB"},
        {"metric": "nvidia_smi", "published": 12.0, "unit": "GiB"},
        {"metric": "seconds_per_step", "published": 2.0, "unit": "s"}]}
    predicted = {"allocated_after_step_bytes": 5 * gib, "peak_allocated_bytes": 8 * gib, "reserved_bytes": 9 * gib,
                 "peak_bytes": 9 * gib + 512 * 2**20, "step_ms": 2500.0, "step_ms_bound": 1000.0}
    records = {"x": {"record": {"status": "ok", "predicted": predicted}}}
    table = published.rows([run], records)
    assert [r["error"] for r in table] == pytest.approx([0.25, 0.0, -0.1, (9.5 - 12) / 12, 0.25])
    summary = published.summary(table)
    assert (summary["memory_rows"], summary["time_rows"], summary["within_10pct_memory"]) == (4, 1, 2)
    assert summary["median_abs_memory_error"] == pytest.approx(round((0.1 + 2.5 / 12) / 2, 4))  # of 0, .1, .21, .25
    assert summary["within_25pct_time"] == 1  # 25% exactly is within
    # a run that failed to predict shows its status and stays out of the summary
    failed = published.rows([run], {"x": {"record": {"status": "error", "error": "boom"}}})
    assert all(r["error"] is None for r in failed) and published.summary(failed)["rows"] == 0
