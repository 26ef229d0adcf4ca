"""scripts/gpu_check.sh: the dry run end to end (so the prepared GPU command cannot rot), its refusals, and the
predicted-vs-measured table it writes (stbench.predicted_vs_measured)."""
from __future__ import annotations

import csv
import json
import re
import subprocess
import sys
from pathlib import Path

import pytest

from stbench import predicted_vs_measured as pvm
from stbench import results

from conftest import REPO, child_env

SCRIPT = REPO / "scripts" / "gpu_check.sh"


def _check(*args, **env):
    return subprocess.run(["bash", str(SCRIPT), *map(str, args)], cwd=REPO, capture_output=True, text=True,
                          timeout=600, env=child_env(PYTHON=sys.executable, **{k: str(v) for k, v in env.items()}))


def _records(path):
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


@pytest.mark.slow
def test_dry_run_runs_every_step_that_needs_no_cuda(tmp_path):
    out = tmp_path / "check"
    done = _check("--dry-run", out, GPU_CHECK_WHEELS=tmp_path / "no-wheels")
    assert done.returncode == 0, done.stdout + done.stderr
    steps = {s["name"]: s for s in json.loads((out / "steps.json").read_text())["steps"]}
    assert list(steps) == ["setup", "env", "pytest", "sweep", "predict", "attention", "bandwidth", "suites", "gate"]
    assert steps["pytest"]["status"] == "skipped" and steps["pytest"]["note"] == "needs CUDA (dry run)"
    assert all(s["status"] == "ok" for name, s in steps.items() if name != "pytest"), steps
    assert "every step ran" in (out / "summary.txt").read_text()

    # the sweep: one record per dry case, all measured on the CPU in bf16, the forced-sparsity case traced
    sweep = _records(out / "sweep" / "results.jsonl")
    assert all(r["status"] == "ok" and r["device"] == "cpu" and r["dtype"] == "bf16" for r in sweep)
    archs = sorted(r["arch"] for r in sweep)
    assert archs[:4] == ["dit-dsv", "dit-dsv", "dit-full", "mobius-unet"] and set(archs[4:]) == {"wan"}
    traced = [r for r in sweep if r.get("trace")]  # the DiTs, for scripts/kernel_classes.py
    assert sorted((r["arch"], r["overrides"].get("sparsity", "learned")) for r in traced) == [
        ("dit-dsv", "0.9"), ("dit-dsv", "learned"), ("dit-full", "learned")]
    assert all((Path(r["trace"]) / "summary.json").exists() for r in traced)
    if any(r.get("lora") for r in sweep):  # the LoRA case, where this stbench has --lora
        assert len(sweep) == 6
    # predictions of the same cases, for an H100 and for the CPU (paired with the CPU measurements)
    predicted = _records(out / "predict" / "results.jsonl")
    assert sorted(r["predicted"]["hardware"] for r in predicted) == ["cpu"] * len(sweep) + ["h100-sxm"] * len(sweep)
    with open(out / "predict-vs-measured.csv") as f:
        rows = list(csv.DictReader(f))
    assert len(rows) == 2 * len(sweep)
    assert {r["measured_on"] for r in rows if r["hardware"] == "cpu"} == {"cpu"}
    assert all(r["process_measured"] for r in rows if r["hardware"] == "cpu")  # host peak growth
    assert {r["measured_on"] for r in rows if r["hardware"] == "h100-sxm"} == {""}  # not measured on an H100
    # attention at three sparsities, the suites' benchmark JSON, the A/A gates and the baseline folder
    attention = _records(out / "attention" / "results.jsonl")
    assert sorted(r["attention"]["sparsity"] for r in attention if r["arch"] == "attention-gather") == [0.5, 0.75, 0.9]
    assert [r["arch"] for r in attention].count("attention-sdpa") == 1
    assert json.loads((out / "suites-benchmark.json").read_text())["benchmarks"]
    gate = (out / "gate.md").read_text()
    assert gate.count("### stbench gate: PASS") == 2 and "FAIL" not in gate
    baseline = out / "reports" / "baselines" / "dry-run"
    assert sorted(p.name for p in baseline.iterdir()) == ["hbm-bandwidth.jsonl", "predict-vs-measured.txt",
                                                          "report.html", "results.jsonl", "run.json",
                                                          "suites-benchmark.json"]
    bandwidth = _records(out / "hbm-bandwidth.jsonl")  # the memory-bound kernels' microbenchmark, 8 kinds
    assert len(bandwidth) == 8 and {r["elements"] for r in bandwidth} == {4096}
    assert _records(baseline / "results.jsonl") == sweep


def test_refuses_an_output_folder_that_holds_files(tmp_path):
    (tmp_path / "old.txt").write_text("x")
    done = _check("--dry-run", tmp_path)
    assert done.returncode == 2 and "is not empty" in done.stderr


@pytest.mark.skipif(__import__("torch").cuda.is_available(), reason="checks the refusal without CUDA")
def test_gpu_mode_without_cuda_fails_at_env_and_starts_nothing_else(tmp_path):
    out = tmp_path / "check"
    done = _check(out, GPU_CHECK_WHEELS=tmp_path / "no-wheels")
    assert done.returncode == 1
    steps = {s["name"]: s for s in json.loads((out / "steps.json").read_text())["steps"]}
    assert steps["env"]["status"] == "FAILED" and "torch sees no CUDA device" in steps["env"]["note"]
    assert all(s["status"] == "FAILED" and s["note"].startswith("not started") for name, s in steps.items()
               if name not in ("setup", "env"))
    assert not (out / "sweep").exists()


@pytest.mark.parametrize("name, hardware", [
    ("NVIDIA H100 80GB HBM3", "h100-sxm"), ("NVIDIA H100 PCIe", "h100-pcie"), ("NVIDIA H200", "h200"),
    ("NVIDIA A100-SXM4-80GB", "a100-80g"), ("NVIDIA GH200 480GB", None), ("Tesla T4", None)])
def test_hardware_for_gpu_maps_device_names_to_the_table(name, hardware):
    found = pvm.hardware_for_gpu(name)
    assert (found.name if found else None) == hardware


def _measured(**fields):
    record = results.new_record(dict(arch="dit-full", preset="0.8b", mode="full", batch=1, frames=16,
                                     resolution=512, dtype="bf16", device="cuda", status="ok"))
    record.update({"env": {"gpu": "NVIDIA H100 80GB HBM3"}, **fields})
    return record


def _prediction(hardware="h100-sxm", **predicted):
    record = _measured()
    record.update(device=hardware, env={}, predicted={"hardware": hardware, "fits": True, **predicted})
    return record


def test_table_pairs_a_prediction_with_the_same_case_on_its_gpu():
    measured = _measured(peak_allocated=8 * 2**30, peak_reserved=10 * 2**30, nvml_peak_process=11 * 2**30,
                         step_ms_median=400.0)
    p = dict(peak_bytes=int(11.5 * 2**30), allocated_bytes=7 * 2**30, reserved_bytes=10 * 2**30,
             context_bytes=2**29, peak_allocated_bytes=9 * 2**30, step_ms=300.0, step_ms_bound=200.0)
    other_gpu = _measured(env={"gpu": "NVIDIA A100-SXM4-80GB"}, peak_allocated=1, peak_reserved=1,
                          step_ms_median=1.0)
    rows = pvm.rows([_prediction(**p), _prediction("l4", **p)], [other_gpu, measured])
    h100, l4 = rows
    assert h100["measured_on"] == "NVIDIA H100 80GB HBM3" and l4["measured_on"] is None
    assert (h100["allocated_predicted"], h100["allocated_measured"]) == (9 * 2**30, 8 * 2**30)  # peak_allocated_bytes
    older = {k: v for k, v in p.items() if k not in ("peak_allocated_bytes", "step_ms_bound")}  # before issue 22
    assert pvm.rows([_prediction(**older)], [measured])[0]["allocated_predicted"] == 7 * 2**30
    assert (h100["reserved_predicted"], h100["reserved_measured"]) == (10 * 2**30, 10 * 2**30)
    assert (h100["process_measured"], h100["process_measured_field"]) == (11 * 2**30, "nvml_peak_process")
    assert (h100["step_ms_predicted"], h100["step_ms_bound"], h100["step_ms_measured"]) == (300.0, 200.0, 400.0)
    text = pvm.format_table(rows)
    line = next(l for l in text.splitlines() if l.startswith("dit-full-0.8b-full-r512-f16-b1-bf16  h100-sxm"))
    # allocated +12.5%, reserved +0.0%, process +4.5%, step -25.0%
    cells = re.split(r"\s{2,}", line)
    assert cells[2] == "NVIDIA H100 80GB HBM3" and cells[12:] == ["300.0", "200.0", "400.0", "-25.0%"]
    assert (cells[5], cells[8], cells[11]) == ("+12.5%", "+0.0%", "+4.5%")
    assert "PREDICTED" in text and "not measured" in text


def test_table_command_refuses_a_missing_run_in_one_line(tmp_path, capsys):
    assert pvm.main([str(tmp_path / "none"), str(tmp_path)]) == 2
    assert capsys.readouterr().err.startswith("stbench: error: ")
