"""The runner: complete records, OOM and errors as results, child-process isolation, resume, run.json."""
from __future__ import annotations

import json

import pytest
import torch

import architectures

from conftest import TOY_ARCH, ToyVideoModel
from stbench import results, runfolder, runner
from stbench.config import Sweep
from stbench.errors import UserError
from stbench.measure import memory, timing


def _sweep(**fields) -> Sweep:
    return Sweep(**{"archs": (TOY_ARCH,), "resolutions": (16,), "frames": (2,), "repeats": 3, **fields})


def test_run_case_fills_every_field(toy_case):
    record = runner.run_case(toy_case(), repeats=4, warmup=2)
    assert set(results.RECORD_FIELDS) <= set(record)
    assert record["status"] == "ok" and record["error"] is None
    assert len(record["step_ms_samples"]) == 4 and 3 <= record["warmup"] <= timing.WARMUP_CAP
    assert record["load"]["cores"] >= 1 and record["load"]["own_cores"] >= 0
    assert record["step_ms_min"] <= record["step_ms_p10"] <= record["step_ms_median"] <= record["step_ms_p90"]
    for name in ("saved_activations", "param_bytes", "grad_bytes", "optimizer_bytes", "params_total",
                 "params_trainable", "flops_per_step"):
        assert isinstance(record[name], int) and record[name] > 0, name
    assert record["peak_allocated"] is None and record["mfu"] is None  # CPU
    assert record["tflops"] > 0 and record["env"]["cpu_threads"] >= 1
    assert record["dsv"] is None
    json.dumps(record)  # a record is plain JSON


def test_compile_adds_warmup(toy_case, monkeypatch):
    monkeypatch.setattr(runner.sequence, "measure_case", lambda case, record, **kwargs: None)
    assert runner.run_case(toy_case(compile=True), warmup=2)["warmup"] == runner.COMPILE_WARMUP


def test_oom_is_a_result_and_the_next_case_runs(tmp_path):
    sweep = _sweep(batches=(1, 2), overrides=(("fail", "oom"), ("fail_batch", "1")))
    records = runner.run_sweep(sweep, tmp_path, progress=False)
    assert [r["status"] for r in records] == ["oom", "ok"]
    assert "out of memory" in records[0]["error"] and records[0]["step_ms_median"] is None
    assert [r["status"] for r in results.read_records(tmp_path)] == ["oom", "ok"]


def test_model_error_keeps_the_traceback_tail(toy_case):
    record = runner.run_case(toy_case(overrides=(("fail", "error"),)))
    assert record["status"] == "error"
    assert record["error"].splitlines()[-1] == "RuntimeError: injected model error"
    assert "in _inject_fault" in record["error"]  # the frames, not just the message


def test_model_extra_stats_go_into_the_record(toy_case, monkeypatch):
    monkeypatch.setattr(ToyVideoModel, "extra_stats",
                        lambda self: {"dsv": {"sparse_head_fraction": 0.5}, "warnings": ["model note"]})
    record = runner.run_case(toy_case(), repeats=2)
    assert record["dsv"] == {"sparse_head_fraction": 0.5} and "model note" in record["warnings"]


def test_trace_hook_writes_per_case_folder(toy_case, tmp_path, monkeypatch):
    import stbench.trace

    seen = {}

    def fake_profile(step_fn, out_dir, *, device, wait=1, warmup=1, active=3, profile_memory=False):
        step_fn()
        seen.update(out_dir=out_dir, device=device)
        memory.append(profile_memory)
        return {"regions": {}}

    memory = []
    monkeypatch.setattr(stbench.trace, "profile_training_steps", fake_profile)
    record = runner.run_case(toy_case(), repeats=2, trace_dir=tmp_path)
    assert record["status"] == "ok"
    assert seen == {"out_dir": tmp_path / results.case_slug(record), "device": "cpu"}
    assert record["trace"] == str(tmp_path / results.case_slug(record))
    monkeypatch.setenv("STBENCH_TRACE_MEMORY", "1")  # what run --trace --trace-memory sets (children inherit it)
    runner.run_case(toy_case(batch=2), repeats=2, trace_dir=tmp_path)
    assert memory == [False, True]  # memory events only when asked: they multiply a trace's size


@pytest.mark.slow
def test_isolated_crashes_become_errors_and_the_sweep_goes_on(tmp_path):
    sweep = _sweep(batches=(1, 2), overrides=(("fail", "segfault"), ("fail_batch", "1")), repeats=2)
    records = runner.run_sweep(sweep, tmp_path, isolate=True, progress=False)
    assert [r["status"] for r in records] == ["error", "ok"]
    assert "SIGSEGV" in records[0]["error"] and "Fatal Python error" in records[0]["error"]
    exit_sweep = _sweep(overrides=(("fail", "exit"),), repeats=2)
    [record] = runner.run_sweep(exit_sweep, tmp_path / "exit", isolate=True, progress=False)
    assert record["status"] == "error"
    assert "exit code 3" in record["error"] and "os._exit(3)" in record["error"]
    assert len(results.read_records(tmp_path)) == 2


def test_resume_skips_recorded_cases_and_appends_invocations(tmp_path):
    first = runner.run_sweep(_sweep(batches=(1,)), tmp_path, progress=False, command="python -m stbench run A")
    assert len(first) == 1
    with pytest.raises(UserError, match="--resume"):
        runner.run_sweep(_sweep(batches=(1, 2)), tmp_path, progress=False)
    second = runner.run_sweep(_sweep(batches=(1, 2)), tmp_path, resume=True, progress=False,
                              command="python -m stbench run B --resume")
    assert [r["batch"] for r in second] == [2]
    assert [r["batch"] for r in results.read_records(tmp_path)] == [1, 2]
    info = json.loads((tmp_path / runfolder.RUN_FILE).read_text())
    assert info["command"] == "python -m stbench run A"
    assert [i["command"] for i in info["invocations"]] == ["python -m stbench run A",
                                                           "python -m stbench run B --resume"]
    assert info["sweep"]["batches"] == [1, 2] and info["sweep"]["archs"] == [TOY_ARCH]


def test_resume_counts_failed_cases_as_done(tmp_path):
    sweep = _sweep(overrides=(("fail", "error"),))
    runner.run_sweep(sweep, tmp_path, progress=False)
    assert runner.run_sweep(sweep, tmp_path, resume=True, progress=False) == []


def test_oom_is_recognised_when_wrapped():
    try:
        try:
            raise torch.OutOfMemoryError("CUDA out of memory.")
        except torch.OutOfMemoryError as inner:
            raise RuntimeError("backend compiler failed") from inner
    except RuntimeError as outer:
        assert memory.is_out_of_memory(outer)
    assert memory.is_out_of_memory(
        RuntimeError("[enforce fail at alloc_cpu.cpp:117] DefaultCPUAllocator: can't allocate memory"))
    assert not memory.is_out_of_memory(ValueError("shape mismatch"))


def test_isolated_child_stopped_by_ctrl_c_is_not_recorded(toy_case, monkeypatch):
    class Interrupted:
        def __init__(self, *args, **kwargs):
            pass

        def wait(self):
            return runner.INTERRUPTED

    monkeypatch.setattr(runner.subprocess, "Popen", Interrupted)
    with pytest.raises(KeyboardInterrupt):
        runner.run_case_isolated(toy_case())


@pytest.mark.slow
@pytest.mark.skipif("dit-dsv" not in architectures.names(), reason="dit-dsv not registered")
def test_real_dsv_model_reports_its_sparsity():
    from stbench.config import Case

    record = runner.run_case(Case("dit-dsv", frames=2, resolution=32, mode="full"), repeats=2)
    assert record["status"] == "ok", record["error"]
    assert {"layer_sparsity", "estimator_recall", "sparse_head_fraction", "rel_error"} <= set(record["dsv"])
    assert record["saved_activations"] > 0 and record["flops_per_step"] > 0


def test_closing_lines_judge_compared_architectures_and_say_when_samples_cannot_tell_them_apart(tmp_path):
    """The run's closing lines compare the archs of each configuration with stbench.stats (the gate's test)."""
    from stbench.closing import closing_lines
    from test_gate import make_record

    def case(arch, median_ms, seed, frames=8, **fields):
        record = make_record(arch=arch, median_ms=median_ms, seed=seed, n=9, frames=frames, **fields)
        record.update(sample_rounds=[0, 0, 0, 1, 1, 1, 2, 2, 2], rounds=3)
        return record

    records = [case("dit-full", 100, 1), case("dit-dsv", 101, 2), case("dit-window", 130, 3),
               case("dit-full", 50, 4, frames=4)]  # alone at its configuration: nothing to compare
    lines = closing_lines(records, 0, tmp_path, trace=False)
    compared = [line for line in lines if "step time at" in line]
    assert len(compared) == 1 and compared[0].startswith("stbench: step time at 64px, 8 frames, batch 1: fastest "
                                                         "dit-full 10")
    assert "dit-dsv 1.0" in compared[0] and "(no difference, Wilcoxon signed-rank, paired by round, n=9+9" in compared[0]
    assert "dit-window 1.3" in compared[0] and "(slower, Wilcoxon" in compared[0]
    # 1% apart: within the gate's 5% tolerance, which is the verdict whatever p is (the samples are not at fault)
    assert ("stbench: dit-dsv within 5% of dit-full's step time (the gate's tolerance): treat them as equally "
            "fast") in lines and not any("cannot tell" in line for line in lines)
    assert lines[-1].startswith("stbench: report: ")
    # --set variants of one architecture are compared too; two samples each cannot reach p < 0.05: unsure
    pair = [make_record(arch="wan", median_ms=100, seed=5, n=2),
            make_record(arch="wan", median_ms=150, seed=6, n=2, overrides={"attention": "dsv"})]
    lines = closing_lines(pair, 0, tmp_path, trace=False)
    assert "wan [attention=dsv] 1.5" in lines[-3] and "(unsure, Mann-Whitney U, n=2+2)" in lines[-3]
    assert "cannot tell wan [attention=dsv] apart from wan (1 round(s))" in lines[-2]


def test_rounds_default_to_a_comparison_worth_its_verdict_and_one_for_a_single_case(tmp_path, capsys, monkeypatch):
    """Two or more cases on one process: DEFAULT_ROUNDS interleaved rounds, so their comparison pairs by round;
    one case: 1 round; under torchrun the default is 1 (an explicit --rounds N > 1 is refused there)."""
    from stbench import rounds
    from stbench.cli import main

    monkeypatch.delenv("WORLD_SIZE", raising=False)
    assert rounds.DEFAULT_ROUNDS == 12  # reports/trust/rounds-power.txt
    monkeypatch.setattr(rounds, "DEFAULT_ROUNDS", 3)  # the plumbing, at a quarter of the steps
    DEFAULT_ROUNDS = 3
    base = ["run", "--arch", TOY_ARCH, "--resolution", "16", "--repeats", "2", "--no-progress"]
    assert main(base + ["--frames", "2,4", "--out", str(tmp_path / "two")]) == 0
    two = results.read_records(tmp_path / "two")
    assert [r["rounds"] for r in two] == [DEFAULT_ROUNDS] * 2
    assert sorted(set(two[0]["sample_rounds"])) == list(range(DEFAULT_ROUNDS))
    assert len(two[0]["step_ms_samples"]) == 2 * DEFAULT_ROUNDS
    assert main(base + ["--frames", "2", "--out", str(tmp_path / "one")]) == 0
    (one,) = results.read_records(tmp_path / "one")
    assert one.get("rounds") in (None, 1) and len(one["step_ms_samples"]) == 2
    capsys.readouterr()
    monkeypatch.setenv("WORLD_SIZE", "2")
    assert main(["run", "--arch", "dit-full,dit-dsv", "--device", "cpu", "--rounds", "2", "--context-parallel",
                 "ulysses", "--out", str(tmp_path / "cp")]) == 2
    assert "--rounds: not supported with torchrun" in capsys.readouterr().err
