"""Kernel traces: a real training step is profiled, the trace is readable, time lands in the right regions."""
from __future__ import annotations

import importlib.util
import json

import pytest
import torch
from torch import nn
from torch.profiler import record_function

from stbench.trace import SUMMARY_FILE, load_summary, profile_training_steps, summarize_trace


class TwoRegionNet(nn.Module):
    """A tiny net with a spatial region (holding a nested attention region) and a temporal region."""

    def __init__(self, dim: int = 32):
        super().__init__()
        self.spatial_proj = nn.Linear(dim, dim)
        self.temporal_proj = nn.Linear(dim, dim)

    def forward(self, x):  # (N, D) -> (N, D)
        with record_function("spatial"):
            x = self.spatial_proj(x).relu()  # (N, D)
            with record_function("attention"):
                x = torch.softmax(x @ x.T, dim=-1) @ x  # (N, D)
        with record_function("temporal"):
            x = x + self.temporal_proj(x)  # (N, D)
        return x


@pytest.fixture(scope="module")
def traced(tmp_path_factory):
    torch.manual_seed(0)
    model = TwoRegionNet()
    optimizer = torch.optim.AdamW(model.parameters())
    x = torch.randn(16, 32)

    def step():  # the engine may annotate forward and backward too: attribution must stay a partition
        with record_function("forward"):
            loss = model(x).square().mean()
        with record_function("backward"):
            loss.backward()
        with record_function("optimizer"):
            optimizer.step()
            optimizer.zero_grad()

    out = tmp_path_factory.mktemp("trace")
    return out, profile_training_steps(step, out, device="cpu", wait=1, warmup=1, active=2)


def test_trace_file_is_chrome_json_in_tensorboard_layout(traced):
    out, summary = traced
    files = list(out.glob("*.pt.trace.json"))
    assert [f.name for f in files] == [summary["trace_file"]]
    trace = json.loads(files[0].read_text())
    names = {e.get("name") for e in trace["traceEvents"]}
    assert {"spatial", "temporal", "attention", "optimizer"} <= names
    assert summary["profiled_steps"] == 2 and len(summary["step_ms"]) == 2
    assert all(ms > 0 for ms in summary["step_ms"])


def test_summary_json_is_written_and_returned(traced):
    out, summary = traced
    assert json.loads((out / SUMMARY_FILE).read_text()) == summary
    assert load_summary(out) == summary
    assert load_summary(out / "missing") is None


def test_regions_inclusive_and_exclusive(traced):
    _, summary = traced
    regions = summary["regions"]
    assert {"spatial", "temporal", "attention", "optimizer"} <= set(regions)
    spatial, attention = regions["spatial"], regions["attention"]
    assert spatial["calls"] == 1 and regions["temporal"]["calls"] == 1
    # attention is nested in spatial: inclusive holds it, exclusive leaves it to attention
    assert spatial["range_ms"] > spatial["range_self_ms"] > 0
    assert spatial["range_ms"] == pytest.approx(spatial["range_self_ms"] + attention["range_ms"], abs=2e-3)
    # backward nodes are attributed to the region whose forward op created them
    for name in ("spatial", "temporal", "attention"):
        assert regions[name]["backward_ms"] > 0
    assert regions["optimizer"]["backward_ms"] == 0
    # exclusive times partition the step: backward nodes inside the `backward` range are not counted twice
    exclusive = sum(r["range_self_ms"] + r["backward_self_ms"] for r in regions.values())
    assert exclusive <= sum(summary["step_ms"]) / len(summary["step_ms"]) + 1e-3
    assert regions["backward"]["range_ms"] >= regions["backward"]["backward_ms"] > regions["spatial"]["backward_ms"]
    assert regions["forward"]["range_ms"] > regions["spatial"]["range_ms"] + regions["temporal"]["range_ms"]
    assert summary["top_operators"] and {"name", "calls", "total_ms", "self_ms"} <= set(summary["top_operators"][0])
    assert summary["top_kernels"] == [] and summary["step_gpu_ms"] is None


def test_trace_loads_in_tensorboard_plugin(traced, tmp_path):
    pytest.importorskip("torch_tb_profiler")
    from torch_tb_profiler.profiler.data import RunProfileData
    from torch_tb_profiler.profiler.run_generator import RunGenerator

    out, summary = traced
    data = RunProfileData.parse("worker0", None, str(out / summary["trace_file"]), str(tmp_path))
    assert len(data.steps_names) == summary["profiled_steps"]
    views = {view.name for view in RunGenerator("worker0", None, data).generate_run_profile().views}
    assert {"overall", "operator", "trace"} <= views


def _x(name, cat, ts, dur, tid, **args):
    return {"ph": "X", "cat": cat, "name": name, "pid": 1, "tid": tid, "ts": ts, "dur": dur, "args": args}


def test_gpu_time_follows_launches_into_regions_and_backward():
    """A hand-written CUDA trace: forward on thread 1, backward on the autograd thread 2."""
    events = [
        _x("ProfilerStep#3", "user_annotation", 0, 1000, 1),
        _x("spatial", "user_annotation", 10, 100, 1),
        _x("aten::mm", "cpu_op", 20, 50, 1, **{"Sequence number": 7}),
        _x("cudaLaunchKernel", "cuda_runtime", 30, 5, 1, correlation=1),
        _x("attention", "user_annotation", 80, 20, 1),
        _x("cudaLaunchKernel", "cuda_runtime", 85, 5, 1, correlation=2),
        _x("temporal", "user_annotation", 200, 50, 1),
        _x("cudaLaunchKernel", "cuda_runtime", 210, 5, 1, correlation=3),
        _x("autograd::engine::evaluate_function: MmBackward0", "cpu_op", 400, 60, 2, **{"Sequence number": 7}),
        _x("cudaLaunchKernel", "cuda_runtime", 410, 5, 2, correlation=4),
        _x("optimizer", "user_annotation", 600, 100, 1),
        _x("cudaLaunchKernel", "cuda_runtime", 610, 5, 1, correlation=5),
        _x("gemm", "kernel", 40, 300, 7, correlation=1),
        _x("softmax", "kernel", 100, 200, 7, correlation=2),
        _x("gemm", "kernel", 400, 1000, 7, correlation=3),
        _x("gemm_bwd", "kernel", 500, 4000, 7, correlation=4),
        _x("adam", "kernel", 700, 10000, 7, correlation=5),
    ]
    summary = summarize_trace({"traceEvents": events})
    regions = summary["regions"]
    assert regions["spatial"]["gpu_ms"] == pytest.approx((300 + 200 + 4000) / 1000)
    assert regions["spatial"]["gpu_self_ms"] == pytest.approx((300 + 4000) / 1000)
    assert regions["attention"]["gpu_ms"] == pytest.approx(0.2)
    assert regions["temporal"]["gpu_ms"] == pytest.approx(1.0)
    assert regions["optimizer"]["gpu_ms"] == pytest.approx(10.0)
    assert regions["backward"]["gpu_ms"] == pytest.approx(4.0)
    assert regions["spatial"]["backward_ms"] == pytest.approx(0.06)
    assert summary["step_gpu_ms"] == [pytest.approx(15.5)]
    assert summary["top_kernels"][0] == {"name": "adam", "calls": 1, "total_ms": 10.0}
    assert {k["name"]: k["calls"] for k in summary["top_kernels"]}["gemm"] == 2


def _serial_unet_available() -> bool:
    try:
        import architectures

        return "serial-unet" in architectures.names() and importlib.util.find_spec("stbench.step") is not None
    except Exception:
        return False


@pytest.mark.slow
@pytest.mark.skipif(not _serial_unet_available(), reason="serial-unet or stbench.step not available yet")
def test_real_tiny_unet_step_is_traced(tmp_path):
    from stbench import step as step_module
    from stbench.config import Case

    case = Case(arch="serial-unet", preset="tiny", frames=2, resolution=64, mode="temporal")
    training_step = step_module.TrainingStep(case)
    summary = profile_training_steps(training_step, tmp_path, device="cpu", wait=0, warmup=1, active=1)
    assert {"spatial", "temporal", "optimizer"} <= set(summary["regions"])
    assert summary["regions"]["temporal"]["backward_ms"] > 0
