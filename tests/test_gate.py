"""The regression gate on synthetic result files: exit codes, significance, memory, missing cases, inputs."""
import json
import re
import random
import statistics
import subprocess
import sys

import pytest

from stbench import gate, results
from stbench.cli import main

MIB = 2 ** 20


def make_record(arch="serial-unet", frames=8, median_ms=100.0, spread=0.01, n=10, seed=0, memory=512 * MIB,
                status="ok", **fields):
    """A result record whose step samples are drawn from a seeded normal distribution around `median_ms`."""
    record = results.new_record({"arch": arch, "preset": "tiny", "overrides": {}, "mode": "temporal", "batch": 1,
                                 "frames": frames, "resolution": 64, "dtype": "fp32", "device": "cpu",
                                 "compile": False, "context_parallel": None})
    rng = random.Random(seed)
    samples = [rng.gauss(median_ms, spread * median_ms) for _ in range(n)] if status == "ok" else []
    record.update(status=status, step_ms_samples=samples or None,
                  step_ms_median=statistics.median(samples) if samples else None,
                  peak_allocated=memory if status == "ok" else None, saved_activations=memory // 2,
                  param_bytes=10 * MIB, env={"torch": "2.13.0", "gpu": None})
    record.update(fields)
    return record


def write_run(path, records):
    for record in records:
        results.append_record(path, record)
    return str(path)


def run_gate(capsys, baseline, current, *extra):
    code = main(["gate", "--baseline", str(baseline), "--current", str(current), *extra])
    captured = capsys.readouterr()
    return code, captured.out, captured.err


def test_run_against_itself_passes(tmp_path, capsys):
    run = write_run(tmp_path / "a.jsonl", [make_record(frames=4, seed=1), make_record(frames=8, seed=2)])
    code, out, _ = run_gate(capsys, run, run)
    assert code == 0
    assert "gate: PASS: 0 regression(s)" in out and "over 2 compared case(s)" in out


def test_run_folder_is_read(tmp_path, capsys):
    (tmp_path / "run").mkdir()
    write_run(tmp_path / "run" / "results.jsonl", [make_record(seed=1)])
    code, _, _ = run_gate(capsys, tmp_path / "run", tmp_path / "run")
    assert code == 0


def test_much_slower_with_tight_samples_fails(tmp_path, capsys):
    base = write_run(tmp_path / "base.jsonl", [make_record(median_ms=100, spread=0.01, seed=1)])
    cur = write_run(tmp_path / "cur.jsonl", [make_record(median_ms=130, spread=0.01, seed=2)])
    code, out, _ = run_gate(capsys, base, cur)
    assert code == 1
    line = next(l for l in out.splitlines() if " step_ms " in l)
    assert "REGRESSION" in line and re.search(r"\+(29|30|31)\.\d%", line)  # about +30%
    assert "gate: FAIL: 1 regression(s)" in out


def test_slightly_slower_with_overlapping_samples_passes(tmp_path, capsys):
    base = write_run(tmp_path / "base.jsonl", [make_record(median_ms=100, spread=0.30, seed=3)])
    cur = write_run(tmp_path / "cur.jsonl", [make_record(median_ms=108, spread=0.30, seed=4)])
    outcome = gate.compare(gate.load_results(base), gate.load_results(cur))
    time_row = next(r for r in outcome.rows if r.metric == "step_ms")
    assert time_row.delta > 0.05 and time_row.p_value >= 0.05 and time_row.verdict == gate.NOISE
    code, _, _ = run_gate(capsys, base, cur)
    assert code == 0


def test_big_slowdown_passes_when_tolerance_is_wider(tmp_path, capsys):
    base = write_run(tmp_path / "base.jsonl", [make_record(median_ms=100, seed=1)])
    cur = write_run(tmp_path / "cur.jsonl", [make_record(median_ms=130, seed=2)])
    code, _, _ = run_gate(capsys, base, cur, "--time-tolerance", "0.5")
    assert code == 0


def test_too_few_samples_warns_instead_of_failing(tmp_path, capsys):
    base = write_run(tmp_path / "base.jsonl", [make_record(median_ms=100, n=2, seed=1)])
    cur = write_run(tmp_path / "cur.jsonl", [make_record(median_ms=150, n=2, seed=2)])
    code, out, _ = run_gate(capsys, base, cur)
    assert code == 0
    assert "cannot reach p < 0.05" in out


def test_faster_is_reported_as_improvement_and_passes(tmp_path, capsys):
    base = write_run(tmp_path / "base.jsonl", [make_record(median_ms=100, seed=1)])
    cur = write_run(tmp_path / "cur.jsonl", [make_record(median_ms=70, seed=2, memory=400 * MIB)])
    code, out, _ = run_gate(capsys, base, cur)
    assert code == 0
    outcome = gate.compare(gate.load_results(base), gate.load_results(cur))
    assert {r.metric for r in outcome.improvements} == {"step_ms", "peak_allocated", "saved_activations"}


def test_ten_percent_more_memory_fails(tmp_path, capsys):
    base = write_run(tmp_path / "base.jsonl", [make_record(seed=1, memory=1000 * MIB)])
    cur = write_run(tmp_path / "cur.jsonl", [make_record(seed=1, memory=1100 * MIB)])
    code, out, _ = run_gate(capsys, base, cur)
    assert code == 1
    outcome = gate.compare(gate.load_results(base), gate.load_results(cur))
    assert {r.metric for r in outcome.regressions} == {"peak_allocated", "saved_activations"}
    assert [round(r.delta, 3) for r in outcome.regressions] == [0.1, 0.1]


def test_memory_within_tolerance_passes(tmp_path, capsys):
    base = write_run(tmp_path / "base.jsonl", [make_record(seed=1, memory=1000 * MIB)])
    cur = write_run(tmp_path / "cur.jsonl", [make_record(seed=1, memory=1010 * MIB)])
    code, _, _ = run_gate(capsys, base, cur)
    assert code == 0


def test_null_memory_figures_are_not_compared(tmp_path):
    base = [make_record(seed=1, nvml_peak_device=None)]
    cur = [make_record(seed=1, nvml_peak_device=5 * MIB)]
    outcome = gate.compare(base, cur)
    assert [r.verdict for r in outcome.rows if r.metric == "nvml_peak_device"] == [gate.NOTE]
    assert not outcome.failed


def test_ok_to_oom_is_a_regression(tmp_path, capsys):
    base = write_run(tmp_path / "base.jsonl", [make_record(seed=1)])
    cur = write_run(tmp_path / "cur.jsonl", [make_record(status="oom", error="CUDA out of memory")])
    code, out, _ = run_gate(capsys, base, cur)
    assert code == 1
    assert any(" status " in l and "oom" in l and "REGRESSION" in l for l in out.splitlines())


def test_missing_cases_are_listed(tmp_path, capsys):
    base = write_run(tmp_path / "base.jsonl", [make_record(frames=4, seed=1), make_record(frames=8, seed=2)])
    cur = write_run(tmp_path / "cur.jsonl", [make_record(frames=8, seed=2), make_record(frames=16, seed=3)])
    code, out, _ = run_gate(capsys, base, cur)
    assert code == 0
    assert "missing in current: 1\n  serial-unet-tiny-temporal-r64-f4-b1-fp32-cpu" in out
    assert "no baseline (new): 1\n  serial-unet-tiny-temporal-r64-f16-b1-fp32-cpu" in out


def test_last_record_of_a_case_wins(tmp_path):
    base = [make_record(seed=1, memory=100 * MIB)]
    cur = [make_record(seed=1, memory=200 * MIB), make_record(seed=1, memory=100 * MIB)]
    outcome = gate.compare(base, cur)
    assert not outcome.failed and any("more than once" in w for w in outcome.warnings)


def test_malformed_file_exits_2_with_one_line(tmp_path):
    good = write_run(tmp_path / "good.jsonl", [make_record()])
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"arch": "x", "schema": 1}\nnot json at all\n{"arch": "y", "schema": 1}\n')
    proc = subprocess.run([sys.executable, "-m", "stbench", "gate", "--baseline", good, "--current", str(bad)],
                          capture_output=True, text=True)
    assert proc.returncode == 2
    assert proc.stderr.count("\n") == 1 and proc.stderr.startswith("stbench: error: ")
    assert "bad.jsonl:2" in proc.stderr


def test_record_without_its_identity_is_a_user_error(tmp_path, capsys):
    good = write_run(tmp_path / "good.jsonl", [make_record()])
    (tmp_path / "partial.jsonl").write_text('{"arch": "serial-unet", "schema": 1}\n')
    code, out, err = run_gate(capsys, good, tmp_path / "partial.jsonl")
    assert code == 2 and out == ""
    assert err == f"stbench: error: {tmp_path / 'partial.jsonl'}: record 1 has no valid 'preset' (got None; " \
                  f"malformed results file)\n"


@pytest.mark.parametrize("content", ["[1, 2]", "{\"benchmarks\": 3}", "{oops"])
def test_malformed_benchmark_json_is_a_user_error(tmp_path, capsys, content):
    good = write_run(tmp_path / "good.jsonl", [make_record()])
    (tmp_path / "bench.json").write_text(content)
    code, out, err = run_gate(capsys, good, tmp_path / "bench.json")
    assert code == 2 and err.count("\n") == 1 and err.startswith("stbench: error: ")


def test_missing_file_exits_2(tmp_path, capsys):
    code, _, err = run_gate(capsys, tmp_path / "nope.jsonl", tmp_path / "nope.jsonl")
    assert code == 2 and "no such file" in err


def pytest_benchmark_json(path, records, scale=1.0, seed=0):
    """A file shaped like `pytest --benchmark-json` output: samples in seconds, the record in extra_info."""
    rng = random.Random(seed)
    benchmarks = []
    for record in records:
        data = [scale * rng.gauss(0.1, 0.001) for _ in range(8)]
        slug = results.case_slug(record)
        benchmarks.append({"group": None, "name": f"test_unet[{slug}]", "fullname": f"suites/test_unet.py::"
                           f"test_unet[{slug}]", "params": {}, "extra_info": record, "options": {},
                           "stats": {"min": min(data), "median": statistics.median(data), "data": data,
                                     "rounds": len(data), "iterations": 1}})
    path.write_text(json.dumps({"machine_info": {}, "commit_info": {}, "benchmarks": benchmarks,
                                "datetime": "2026-01-01", "version": "5.3.1"}))
    return str(path)


def test_pytest_benchmark_json_is_read_in_ms_and_matched_by_identity(tmp_path, capsys):
    records = [make_record(frames=4), make_record(frames=8)]
    base = pytest_benchmark_json(tmp_path / "base.json", records, seed=1)
    loaded = gate.load_results(base)
    assert [results.case_key(r) for r in loaded] == [results.case_key(r) for r in records]
    assert 95 < loaded[0]["step_ms_median"] < 105 and len(loaded[0]["step_ms_samples"]) == 8
    assert run_gate(capsys, base, pytest_benchmark_json(tmp_path / "same.json", records, seed=2))[0] == 0
    slow = pytest_benchmark_json(tmp_path / "slow.json", records, scale=1.3, seed=3)
    code, out, _ = run_gate(capsys, base, slow)
    assert code == 1 and "2 regression(s)" in out


def test_pytest_benchmark_json_against_stbench_run(tmp_path, capsys):
    run = write_run(tmp_path / "run.jsonl", [make_record(frames=4, median_ms=100, seed=5)])
    bench = pytest_benchmark_json(tmp_path / "bench.json", [make_record(frames=4)], seed=6)
    code, out, _ = run_gate(capsys, run, bench)
    assert code == 0 and "over 1 compared case(s)" in out


def test_plain_pytest_benchmark_is_matched_by_fullname(tmp_path, capsys):
    path = pytest_benchmark_json(tmp_path / "plain.json", [make_record()])
    data = json.loads((tmp_path / "plain.json").read_text())
    data["benchmarks"][0]["extra_info"] = {}
    (tmp_path / "plain.json").write_text(json.dumps(data))
    records = gate.load_results(path)
    assert gate.record_key(records[0]).startswith("pytest:suites/test_unet.py::test_unet[")
    assert run_gate(capsys, path, path)[0] == 0


def test_markdown_is_written(tmp_path, capsys):
    base = write_run(tmp_path / "base.jsonl", [make_record(seed=1, memory=1000 * MIB)])
    cur = write_run(tmp_path / "cur.jsonl", [make_record(seed=1, memory=1100 * MIB)])
    md = tmp_path / "summary.md"
    assert run_gate(capsys, base, cur, "--markdown", str(md))[0] == 1
    text = md.read_text()
    assert text.startswith("### stbench gate: FAIL") and "| `serial-unet-tiny-temporal-r64-f8-b1-fp32-cpu` | " \
        "peak_allocated | 1000.00 MiB | 1.07 GiB | +10.0% | - | :x: regression |" in text


def test_one_sided_tests_of_stats():
    from stbench import stats

    # current [6..10] all above baseline [1..5]: the exact Mann-Whitney p is 1 / C(10, 5)
    assert stats.p_greater([6, 7, 8, 9, 10], [1, 2, 3, 4, 5]) == pytest.approx(1 / 252)
    assert stats.p_greater([1, 1], [1, 1]) == 1.0
    # paired: 9 pairs all slower -> Wilcoxon's exact p is 2**-9
    assert stats.p_greater([2] * 9, list(range(1, 10)), is_paired=True) > 0.05
    assert stats.p_greater([11 + i for i in range(9)], [10 + i for i in range(9)], is_paired=True) == \
        pytest.approx(2 ** -9)
    assert stats.min_p_value(2, 2, False) >= 0.05 and stats.min_p_value(5, 5, False) < 0.05
    assert stats.min_p_value(3, 3, True) >= 0.05 and stats.min_p_value(9, 9, True) < 0.05


def test_baseline_folder_is_named_after_the_gpu():
    assert gate.gpu_slug("NVIDIA H100 80GB HBM3") == "nvidia-h100-80gb-hbm3"
    assert str(gate.baseline_folder("reports/baselines", "NVIDIA A100-SXM4-40GB")) == \
        "reports/baselines/nvidia-a100-sxm4-40gb"


def test_bad_tolerance_is_a_user_error(tmp_path, capsys):
    run = write_run(tmp_path / "a.jsonl", [make_record()])
    code, _, err = run_gate(capsys, run, run, "--time-tolerance", "-0.1")
    assert code == 2 and err.startswith("stbench: error: --time-tolerance")
