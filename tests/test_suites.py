"""The pytest-benchmark suites: grid selection, and one tiny case end to end in a child pytest."""
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:  # suites/ is a folder of the checkout, not an installed package
    sys.path.insert(0, str(ROOT))

import architectures  # noqa: E402
from stbench import gate, results  # noqa: E402
from suites import grid  # noqa: E402

from conftest import child_env  # noqa: E402

# Smallest cases first; the end-to-end test runs the first one registered.
PREFERRED = ("dit-full", "serial-unet", "mobius-unet", "mobius-ladder-unet", "modelscope-unet")


def spec_from(options: dict, env: dict | None = None) -> grid.GridSpec:
    env = env or {}
    return grid.grid_spec(lambda name: options.get(name) or env.get(grid.OPTIONS[name][0]))


def test_grid_follows_the_device():
    tiny = spec_from({"device": "cpu"})
    assert (tiny.grid, tiny.resolutions, tiny.frames, tiny.batches, tiny.dtype) == ("tiny", (64,), (4, 8), (1,),
                                                                                 "fp32")
    full = spec_from({"device": "cuda"})
    assert (full.grid, full.resolutions, full.frames, full.batches, full.dtype) == ("full", (256, 512),
                                                                                 (8, 16, 24), (1, 2), "bf16")


def test_options_beat_env_and_narrow_the_grid():
    spec = spec_from({"device": "cpu", "frames": "4"}, {"STBENCH_FRAMES": "8,16", "STBENCH_ARCH": "serial-unet",
                                                        "STBENCH_OUT": "x.jsonl"})
    assert spec.frames == (4,) and spec.archs == ("serial-unet",) and spec.out == "x.jsonl"
    with pytest.raises(ValueError, match="--stbench-grid"):
        spec_from({"device": "cpu", "grid": "huge"})
    with pytest.raises(ValueError, match="--stbench-batch"):
        spec_from({"device": "cpu", "batch": "one"})


def test_entries_have_stable_ids_and_cover_the_family():
    registered = set(architectures.names())
    entries = grid.family_entries("unet", spec_from({"device": "cpu"}))
    for entry in entries:
        if entry.case is not None:
            assert entry.id == results.case_slug(results.new_record(entry.case.identity()))
    archs = {e.case.arch for e in entries if e.case is not None}
    assert archs == set(grid.UNET_ARCHS) & registered
    modes = {e.case.mode for e in entries if e.case is not None}
    assert modes == ({"temporal", "full"} if archs else set())
    skipped = {e.id for e in entries if e.case is None}
    assert skipped == {f"{a}-not-registered" for a in set(grid.UNET_ARCHS) - registered}


def test_unknown_arch_is_refused():
    with pytest.raises(ValueError, match="unknown architecture 'no-such-net'"):
        grid.family_entries("unet", spec_from({"device": "cpu", "arch": "no-such-net"}))


def test_full_grid_uses_full_size_presets():
    spec = spec_from({"device": "cuda"})
    for family in ("unet", "dit"):
        for entry in grid.family_entries(family, spec):
            if entry.case is not None:
                assert entry.case.preset not in ("tiny", "small") and entry.case.dtype == "bf16"


def _one_tiny_case() -> str:
    registered = architectures.names()
    arch = next((a for a in PREFERRED if a in registered), None)
    if arch is None:
        pytest.skip("no suite architecture is registered yet")
    family = architectures.get(arch).family
    entries = grid.family_entries(family, spec_from({"device": "cpu", "arch": arch, "frames": "4"}))
    return next(e.id for e in entries if e.case is not None)


@pytest.fixture(scope="module")
def suite_runs(tmp_path_factory):
    """The two `pytest suites/` runs of this module, started together (each spends most of its time starting
    pytest and importing): name -> (its folder, the finished process)."""
    runs = {}
    for name, command in (("one", _one_tiny_case_command), ("oom", _oom_command)):
        folder = tmp_path_factory.mktemp(name)
        argv, env = command(folder)
        runs[name] = folder, subprocess.Popen(argv, cwd=ROOT, env=env, stdout=subprocess.PIPE,
                                              stderr=subprocess.PIPE, text=True)
    done = {}
    for name, (folder, proc) in runs.items():
        stdout, stderr = proc.communicate(timeout=600)
        done[name] = folder, subprocess.CompletedProcess(proc.args, proc.returncode, stdout, stderr)
    return done


def _one_tiny_case_command(tmp_path):
    case_id = _one_tiny_case()
    out, bench_json = tmp_path / "suite" / "results.jsonl", tmp_path / "bench.json"
    env = child_env(drop=("STBENCH_",))
    return [sys.executable, "-m", "pytest", "suites/", "--benchmark-only", "-q", "-p", "no:cacheprovider",
            "-k", case_id, "--stbench-device", "cpu", "--stbench-grid", "tiny", "--stbench-rounds", "3",
            "--stbench-out", str(out), f"--benchmark-json={bench_json}"], env


@pytest.mark.slow
def test_suite_runs_one_tiny_case_and_records_it(suite_runs):
    case_id = _one_tiny_case()
    tmp_path, proc = suite_runs["one"]
    out, bench_json = tmp_path / "suite" / "results.jsonl", tmp_path / "bench.json"
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert "1 passed" in proc.stdout

    benchmarks = json.loads(bench_json.read_text())["benchmarks"]
    assert [b["name"].split("[")[1].rstrip("]") for b in benchmarks] == [case_id]
    for bench in benchmarks:
        info = bench["extra_info"]
        assert info["status"] == "ok"
        for name in ("saved_activations", "param_bytes", "grad_bytes", "optimizer_bytes", "flops_per_step",
                     "params_total"):
            assert isinstance(info[name], int) and info[name] > 0, name
        assert info["env"]["torch"]
        # one set of samples: the record's are pytest-benchmark's own, in ms
        assert info["step_ms_samples"] == pytest.approx([1e3 * s for s in bench["stats"]["data"]])
        assert len(info["step_ms_samples"]) == 3

    records = results.read_records(out)
    assert len(records) == 1 and results.case_slug(records[0]) == case_id
    assert records[0]["saved_activations"] == benchmarks[0]["extra_info"]["saved_activations"]

    # the gate reads the suite's JSON and matches it to the stbench record by identity
    loaded = gate.load_results(bench_json)
    assert results.case_key(loaded[0]) == results.case_key(records[0])
    assert gate.compare(records, loaded).compared == 1


OOM_PLUGIN = '''
"""A test-only architecture that runs out of memory at batch 2 (registered before the suites collect)."""
from dataclasses import dataclass

import torch

import architectures
from architectures import Architecture, VideoModel


@dataclass(frozen=True)
class OomConfig:
    """Which batch size raises CUDA's out-of-memory error."""

    failing_batch: int = 2


class OomModel(VideoModel):
    """A per-pixel linear map that pretends a batch of `failing_batch` does not fit."""

    def __init__(self, config):
        super().__init__(config)
        self.spatial = torch.nn.Linear(4, 4)
        self.temporal = torch.nn.Linear(4, 4)

    @property
    def text_dim(self):
        return 8

    def group_of(self, name):
        return name.split(".")[0]

    def forward(self, sample, timesteps, text):
        if sample.shape[0] == self.config.failing_batch:
            raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 80.00 GiB (injected)")
        x = self.temporal(self.spatial(sample.permute(0, 2, 3, 4, 1)))  # (B, F, h, w, C)
        return x.permute(0, 4, 1, 2, 3)  # (B, C, F, h, w)


architectures.register(Architecture("oom-toy", "unet", OomConfig, {"tiny": OomConfig}, OomModel))
'''


def _oom_command(tmp_path):
    (tmp_path / "oom_toy_arch.py").write_text(OOM_PLUGIN)
    out = tmp_path / "suite" / "results.jsonl"
    env = child_env(drop=("STBENCH_",))
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(tmp_path), env.get("PYTHONPATH")]))
    return [sys.executable, "-m", "pytest", "-p", "oom_toy_arch", "suites/", "--benchmark-disable", "-q", "-rs",
            "-p", "no:cacheprovider", "--stbench-device", "cpu", "--stbench-arch", "oom-toy", "--stbench-batch",
            "1,2", "--stbench-frames", "2", "--stbench-resolution", "16", "--stbench-mode", "full",
            "--stbench-out", str(out)], env


@pytest.mark.slow
def test_out_of_memory_is_recorded_and_skipped_and_disabled_benchmark_runs_once(suite_runs):
    tmp_path, proc = suite_runs["oom"]
    out = tmp_path / "suite" / "results.jsonl"
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert "1 passed, 3 skipped" in proc.stdout  # batch 2 ran out of memory; the DiT and video suites have no case
    assert "oom-toy-tiny-full-r16-f2-b2-fp32-cpu: out of memory (recorded as oom)" in proc.stdout

    records = {r["batch"]: r for r in results.read_records(out)}
    assert records[2]["status"] == "oom" and "CUDA out of memory" in records[2]["error"]
    assert records[1]["status"] == "ok" and len(records[1]["step_ms_samples"]) == 1  # benchmark disabled: once
    assert records[1]["param_bytes"] == 2 * (4 * 4 + 4) * 4
