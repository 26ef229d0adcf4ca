"""Comparisons on a busy machine: interleaved rounds, load warnings, one verdict shared by gate and report."""
import os
import subprocess
import sys
import time

import pytest

from conftest import TOY_ARCH
from stbench import gate, results, rounds, runfolder, runner, stats
from stbench.cli import main
from stbench.config import Sweep
from stbench.measure import load
from stbench.report import verdict
from test_gate import make_record, write_run


def _sweep(sleep_ms, **fields):
    return Sweep(**{"archs": (TOY_ARCH,), "resolutions": (16,), "frames": (2,), "batches": (1, 2),
                    "repeats": 3, "overrides": (("sleep_ms", sleep_ms),), **fields})


def _strip_sleep(path):
    """The same cases under the baseline's identity: what a code change that slowed the step would record."""
    records = results.read_records(path)
    for record in records:
        record["overrides"] = {}
    out = path.parent / "stripped.jsonl"
    write_run(out, records)
    return out


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    """Three runs of 3 rounds x 3 repeats: baseline (20 ms sleep), an A/A repeat, and a planted ~30% slowdown."""
    made = {}
    for name, sleep_ms in (("base", 20.0), ("again", 20.0), ("slow", 27.0)):
        folder = tmp_path_factory.mktemp(name)
        runner.run_sweep(_sweep(sleep_ms), folder, progress=False, rounds=3)
        made[name] = _strip_sleep(folder / runfolder.RESULTS_FILE)
    return made


def test_rounds_pool_samples_with_their_round(runs):
    for record in results.read_records(runs["base"]):
        assert record["status"] == "ok" and record["rounds"] == 3
        assert record["sample_rounds"] == [0, 0, 0, 1, 1, 1, 2, 2, 2] and len(record["step_ms_samples"]) == 9
        assert record["step_ms_median"] == pytest.approx(stats.summary(record["step_ms_samples"])["median"])
        assert record["load"]["cores"] >= 1 and record["warmup"] >= 3


def test_round_order_is_shuffled_and_seeded():
    cases = list("abcdefgh")
    orders = [rounds.round_order(cases, i, seed=0) for i in range(4)]
    assert all(sorted(o) == cases for o in orders) and len({tuple(o) for o in orders}) > 1
    assert rounds.round_order(cases, 2, seed=0) == orders[2] != rounds.round_order(cases, 2, seed=1)


def test_a_a_comparison_passes_and_the_report_says_no_difference(runs, capsys):
    code = main(["gate", "--baseline", str(runs["base"]), "--current", str(runs["again"])])
    assert code == 0 and "gate: PASS: 0 regression(s)" in capsys.readouterr().out
    rows, _, _ = verdict.baseline_deltas(results.read_records(runs["again"]), results.read_records(runs["base"]))
    assert len(rows) == 2 and {row.time.verdict for row in rows} == {"no difference"}


def test_planted_30_percent_slowdown_is_detected_with_3_rounds_of_3(runs, capsys):
    code = main(["gate", "--baseline", str(runs["base"]), "--current", str(runs["slow"])])
    out = capsys.readouterr().out
    assert code == 1 and "gate: FAIL: 2 regression(s)" in out
    rows, _, _ = verdict.baseline_deltas(results.read_records(runs["slow"]), results.read_records(runs["base"]))
    assert {row.time.verdict for row in rows} == {"slower"}


def test_rounds_pair_samples_within_a_run_only():
    rounds_ = [0, 0, 0, 1, 1, 1, 2, 2, 2]
    base = {"step_ms_samples": [10, 10.4, 10.2, 14, 14.5, 14.2, 11, 11.2, 11.1], "sample_rounds": rounds_}
    slow = {"step_ms_samples": [s * 1.3 for s in base["step_ms_samples"]], "sample_rounds": rounds_}
    paired = stats.compare_times(slow, base, same_run=True)
    assert paired.test.startswith("Wilcoxon") and paired.verdict == stats.SLOWER
    assert stats.compare_times(slow, base).test == "Mann-Whitney U"  # two runs: rounds ran at other times


GATE_TO_STATS = {gate.REGRESSION: stats.SLOWER, gate.IMPROVED: stats.FASTER, gate.OK: stats.SAME,
                 gate.NOISE: stats.SAME, gate.UNSURE: stats.UNSURE}


@pytest.mark.parametrize("current", [
    dict(seed=2), dict(median_ms=130, seed=2), dict(median_ms=70, seed=2), dict(median_ms=108, spread=0.2, seed=2),
    dict(median_ms=104, spread=0.001, seed=2), dict(median_ms=150, n=2, seed=2)], ids=str)
def test_gate_and_report_reach_the_same_verdict(tmp_path, current):
    base, cur = [make_record(seed=1)], [make_record(**current)]
    row = next(r for r in gate.compare(base, cur).rows if r.metric == "step_ms")
    rows, _, _ = verdict.baseline_deltas(cur, base)
    assert GATE_TO_STATS[row.verdict] == rows[0].time.verdict


def test_load_warning_from_fields():
    quiet = {"cores": 2, "own_cores": 1.0, "wait_cores": 0.0, "other_cores": 0.1}
    busy = {"cores": 2, "own_cores": 0.6, "wait_cores": 0.4, "other_cores": 1.4}
    assert load.load_warnings(quiet) == []
    [note] = load.load_warnings(busy)
    assert note.startswith("load: other processes used 1.40 of 2 CPU cores") and "waited 67%" in note
    # without schedstat: saturated cores with others' work
    assert load.load_warnings({**busy, "wait_cores": None})
    assert load.load_warnings({"cores": 1, "own_cores": 0, "other_cores": None, "gpu_other_pids": [7]})


def test_an_injected_cpu_hog_produces_the_load_warning(toy_case, capsys):
    hogs = [subprocess.Popen([sys.executable, "-c", "while True: pass"]) for _ in range(os.cpu_count() or 1)]
    try:
        time.sleep(0.3)
        record = runner.run_case(toy_case(resolution=64, frames=8, overrides=(("hidden", 256),)), repeats=10)
    finally:
        for hog in hogs:
            hog.kill()
            hog.wait()
    assert record["status"] == "ok"
    assert any(w.startswith("load: ") for w in record["warnings"]) and load.was_loaded(record)
    assert record["load"]["other_cores"] > 0.5
    # the gate flags a comparison that involves it
    outcome = gate.compare([record], [record])
    assert any("measured under load" in w for w in outcome.warnings)


def test_run_prints_where_things_are(tmp_path, capsys):
    out = tmp_path / "run"
    assert main(["run", "--arch", TOY_ARCH, "--resolution", "16", "--frames", "2", "--repeats", "2",
                 "--rounds", "2", "--no-progress", "--out", str(out)]) == 0
    err = capsys.readouterr().err
    assert f"stbench: results: {out / 'results.jsonl'}" in err
    assert f"stbench: report: python -m stbench report {out}" in err and "warning(s) on" in err
    assert main(["run", "--arch", TOY_ARCH, "--resolution", "16", "--frames", "2", "--resume",
                 "--out", str(out)]) == 0
    assert "0 case(s) measured (0 not ok), 1 skipped" in capsys.readouterr().err
    assert main(["run", "--arch", TOY_ARCH, "--rounds", "0", "--out", str(tmp_path / "x")]) == 2
    assert capsys.readouterr().err.strip() == "stbench: error: --rounds: must be >= 1, got 0"


def test_profiler_notices_stay_out_of_the_terminal(tmp_path, capfd):
    from stbench.trace import PROFILER_LOG, profile_training_steps
    from stbench.step import TrainingStep
    from stbench.config import Case

    step = TrainingStep(Case(arch=TOY_ARCH, frames=2, resolution=16))
    profile_training_steps(step, tmp_path, device="cpu", wait=0, warmup=1, active=1)
    assert capfd.readouterr().err == "" and (tmp_path / PROFILER_LOG).exists()
    trace = next(tmp_path.glob("*.pt.trace.json"))
    assert '"Input Dims"' not in trace.read_text()  # shapes and memory events are opt-in
