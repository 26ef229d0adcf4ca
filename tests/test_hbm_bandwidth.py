"""scripts/hbm_bandwidth.py: the kernel microbenchmark behind predict's upcast and foreach bandwidths, on the CPU."""
from __future__ import annotations

import importlib.util
import json

from conftest import REPO

SPEC = importlib.util.spec_from_file_location("hbm_bandwidth", REPO / "scripts" / "hbm_bandwidth.py")
bw = importlib.util.module_from_spec(SPEC)
SPEC.loader.exec_module(bw)


def test_each_kind_moves_its_minimum_bytes_and_is_written_as_a_line(tmp_path):
    out = tmp_path / "bw.jsonl"
    assert bw.main(["--device", "cpu", "--sizes", "4096", "--repeats", "2", "--out", str(out)]) == 0
    rows = {r["kind"]: r for r in map(json.loads, out.read_text().splitlines())}
    n = 4096
    params = sum(bw._parameter_like(n))
    assert params >= n and bw._parameter_like(n)[-1] == 1536  # matrices and their biases
    assert {k: r["bytes"] for k, r in rows.items()} == {
        "copy bf16": n * 4, "cast fp32->bf16": n * 6, "cast bf16->fp32": n * 6, "add bf16": n * 6,
        "mul_ fp32": n * 8, "row sum bf16->fp32": n * 2 + 4 * 4, "_foreach_add_ fp32": 3 * 4 * params,
        "AdamW foreach": 28 * params}
    assert all(r["seconds"] > 0 and r["fraction_of_datasheet"] is None and r["timing"] == "back to back"
               for r in rows.values())
