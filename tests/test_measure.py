"""Measurements: timing statistics from a fake clock, exact byte and FLOP accounting for a known model."""
from __future__ import annotations

import pytest
import torch

from stbench.measure import activations, env, flops, memory, nvml, timing
from stbench.step import TrainingStep

FP32 = 4


class FakeClock:
    """Returns the given readings (seconds) in order, one per call."""

    def __init__(self, readings):
        self.readings = list(readings)

    def __call__(self):
        return self.readings.pop(0)


def test_summary_interpolates_like_numpy():
    from stbench import stats

    figures = stats.summary([float(v) for v in range(1, 11)])
    assert figures["median"] == 5.5 and figures["min"] == 1.0
    assert figures["p10"] == pytest.approx(1.9) and figures["p90"] == pytest.approx(9.1)
    assert stats.summary([3.0])["p90"] == 3.0


def test_time_steps_with_fake_clock_keeps_raw_samples_and_statistics():
    calls = []
    # step durations: 10, 12, 11, 13, 50 ms
    clock = FakeClock([0, 0.010, 1, 1.012, 2, 2.011, 3, 3.013, 4, 4.050])
    times = timing.time_steps(lambda: calls.append(1), 5, "cpu", clock=clock)
    assert len(calls) == 5
    assert times.samples_ms == pytest.approx([10, 12, 11, 13, 50])
    assert times.median_ms == pytest.approx(12)
    assert times.min_ms == pytest.approx(10)
    assert times.p10_ms == pytest.approx(10.4)
    assert times.p90_ms == pytest.approx(35.2)
    fields = times.as_record_fields()
    assert fields["step_ms_median"] == pytest.approx(12) and fields["step_ms_samples"] == times.samples_ms
    assert len(times.warnings) == 1 and times.warnings[0].startswith("unstable timing")


def test_stable_samples_have_no_warning_and_few_samples_are_flagged():
    steady = timing.time_steps(lambda: None, 5, clock=FakeClock([0, 0.1, 1, 1.1, 2, 2.1, 3, 3.1, 4, 4.1]))
    assert steady.median_ms == pytest.approx(100) and steady.warnings == []
    few = timing.StepTimes([100.0, 101.0])
    assert len(few.warnings) == 1 and few.warnings[0].startswith("few samples")


def test_warm_up_runs_until_step_times_settle_with_a_cap():
    calls = []
    # steps of 50, 30, 10, 10, 10 ms: the first three differ, steps 3-5 agree -> 5 warm-up steps
    clock = FakeClock([0, 0.050, 1, 1.030, 2, 2.010, 3, 3.010, 4, 4.010])
    assert timing.warm_up(lambda: calls.append("w"), 2, clock=clock) == (5, True)
    assert calls == ["w"] * 5
    # never settling: stops at the cap, and says so
    wild = FakeClock([x for i in range(10) for x in (i, i + 0.01 * (1 + i % 2 * 3))])
    assert timing.warm_up(lambda: None, 2, cap=10, clock=wild) == (10, False)
    # cap=0: exactly the requested steps (distributed ranks)
    assert timing.warm_up(lambda: None, 2, cap=0, clock=FakeClock([0, 1, 2, 3]))[0] == 2
    with pytest.raises(ValueError):
        timing.time_steps(lambda: None, 0)


# --- exact bytes of the toy model: Linear(4->H) -> ReLU -> Linear(H->4) over N latent pixels -----------------

def _toy_sizes(case):
    hidden, channels = 8, 4
    pixels = case.batch * case.frames * (case.resolution // 8) ** 2
    spatial = channels * hidden + hidden
    temporal = hidden * channels + channels
    return pixels, hidden, channels, spatial, temporal


@pytest.mark.parametrize("mode", ["temporal", "full"])
def test_exact_parameter_gradient_and_adamw_bytes(toy_case, mode):
    case = toy_case(mode=mode, batch=2)
    _, _, _, spatial, temporal = _toy_sizes(case)
    step = TrainingStep(case)
    trainable_params = temporal if mode == "temporal" else spatial + temporal
    trainable_tensors = 2 if mode == "temporal" else 4
    assert memory.param_bytes(step.model) == (spatial + temporal) * FP32
    assert memory.grad_bytes(step.trainable) == trainable_params * FP32
    assert memory.optimizer_bytes(step.optimizer) == 0  # AdamW state appears at the first step
    step()
    # exp_avg + exp_avg_sq per trainable tensor, plus a float32 `step` scalar per tensor
    assert memory.optimizer_bytes(step.optimizer) == 2 * trainable_params * FP32 + trainable_tensors * FP32
    assert all(p.grad is None for p in step.trainable)  # zero_grad(set_to_none=True)


def test_gradient_bytes_match_real_gradients(toy_case):
    step = TrainingStep(toy_case(mode="full"))
    step.forward_backward()
    assert memory.tensor_bytes(p.grad for p in step.trainable) == memory.grad_bytes(step.trainable)


@pytest.mark.parametrize("mode", ["temporal", "full"])
def test_saved_activation_bytes_by_hand(toy_case, mode):
    case = toy_case(mode=mode, batch=2, frames=3)
    pixels, hidden, channels, _, _ = _toy_sizes(case)
    step = TrainingStep(case)
    saved = activations.saved_activation_bytes(step.model, lambda: step.compute_loss(eager=True))
    # ReLU output (saved for the temporal Linear's weight gradient; also ReLU's own backward in full mode),
    # the prediction and the target noise (MSE backward). Frozen spatial layer: its input is not saved.
    expected = pixels * hidden * FP32 + 2 * pixels * channels * FP32
    if mode == "full":
        expected += pixels * channels * FP32  # the noisy input, for the spatial Linear's weight gradient
    assert saved == expected


def test_counting_saved_activations_leaves_no_model_alive():
    # A forward that saves its own output (exp) counted with the hooks: returning the tensor itself from the
    # pack hook made output -> grad_fn -> saved output a cycle in autograd's C++ graph that no collector frees,
    # holding every parameter (on a GPU, each measured case kept the previous models' weights and gradients).
    import gc
    import weakref

    model = torch.nn.Sequential(torch.nn.Linear(8, 8), torch.nn.Linear(8, 8))

    def loss():
        return model(torch.randn(4, 8)).exp().sum()

    saved = activations.saved_activation_bytes(model, loss)
    assert saved == 3 * 4 * 8 * 4  # each Linear's input (for its weight gradient) and exp's output
    alive = weakref.ref(model[0].weight)
    del model
    gc.collect()
    assert alive() is None


@pytest.mark.parametrize("mode", ["temporal", "full"])
def test_training_step_flops_by_hand(toy_case, mode):
    case = toy_case(mode=mode)
    pixels, hidden, channels, _, _ = _toy_sizes(case)
    step = TrainingStep(case)
    matmul = 2 * pixels * channels * hidden  # one (N x 4) @ (4 x H) product, either layer, either direction
    # forward: 2 matmuls; backward: the temporal weight gradient, and in full mode also its input
    # gradient and the spatial weight gradient.
    expected = (2 + 1) * matmul if mode == "temporal" else (2 + 3) * matmul
    assert flops.count_flops(step) == expected


def test_peak_table_and_mfu():
    assert flops.peak_tflops("NVIDIA H100 80GB HBM3", "bf16") == 989.4
    assert flops.peak_tflops("NVIDIA H100 PCIe", "bf16") == 756.5
    assert flops.peak_tflops("NVIDIA H200", "fp32") == 66.9
    assert flops.peak_tflops("NVIDIA A100-SXM4-80GB", "fp16") == 312.0
    assert flops.peak_tflops("NVIDIA L4", "bf16") == 121.0
    assert flops.peak_tflops("NVIDIA L40S", "bf16") == 362.05
    assert flops.peak_tflops("NVIDIA GeForce RTX 4090", "bf16") == 165.2
    assert flops.peak_tflops("Some Future GPU", "bf16") is None
    assert flops.device_peak_tflops("cpu", "fp32") is None
    tflops, mfu = flops.throughput(int(2e12), 100.0, 40.0)  # 2 TFLOP in 0.1 s
    assert tflops == pytest.approx(20.0) and mfu == pytest.approx(0.5)
    assert flops.throughput(int(2e12), 100.0, None) == (pytest.approx(20.0), None)
    assert flops.throughput(None, 100.0, 40.0) == (None, None)


def test_cpu_has_no_allocator_or_nvml_figures():
    assert memory.allocator_peaks("cpu") == (None, None)
    with nvml.NvmlSampler("cpu") as sampler:
        pass
    assert not sampler.available and sampler.peak_process is None and sampler.peak_device is None


def test_env_fields():
    info = env.collect_env("cpu")
    for key in ("torch", "cuda", "gpu", "driver", "cpu", "host", "git_sha", "stbench", "time"):
        assert key in info
    assert info["torch"] == torch.__version__ and info["gpu"] is None
    assert info["cpu_threads"] == torch.get_num_threads()
    assert info["time"].endswith("+00:00")


def test_warm_up_runs_past_the_dsv_stage_switch(toy_case):
    from stbench.config import Case

    assert TrainingStep(toy_case()).warmup_steps(2) == 2
    dsv = TrainingStep(Case("dit-dsv", frames=4, resolution=32, overrides=(("dense_steps", "3"),)))
    assert dsv.warmup_steps(2) == 5 and dsv.warmup_steps(9) == 9  # dense steps, then two sparse ones
    full = TrainingStep(Case("dit-full", frames=4, resolution=32))
    assert full.warmup_steps(2) == 2


def test_bf16_autocast_on_cpu_trains(toy_case):
    step = TrainingStep(toy_case(dtype="bf16", mode="full"))
    before = [p.detach().clone() for p in step.trainable]
    loss = step()
    assert torch.isfinite(loss) and loss.dtype == torch.float32
    assert any(not torch.equal(a, p) for a, p in zip(before, step.trainable))


@pytest.mark.cuda
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_cuda_memory_figures(toy_case):
    from stbench.runner import run_case

    record = run_case(toy_case(device="cuda", dtype="bf16"), repeats=3)
    assert record["status"] == "ok", record["error"]
    assert record["peak_allocated"] > 0 and record["peak_reserved"] >= record["peak_allocated"]
    assert record["env"]["gpu"] == torch.cuda.get_device_name()
    if nvml.device_handle("cuda") is not None:
        assert record["nvml_peak_device"] > 0


class FakeNvml:
    """Stands in for pynvml: scripted per-process and device readings, one per call."""

    def __init__(self, process_readings, device_readings, pid):
        self.process_readings, self.device_readings, self.pid = list(process_readings), list(device_readings), pid

    def nvmlDeviceGetComputeRunningProcesses(self, handle):
        used = self.process_readings.pop(0) if len(self.process_readings) > 1 else self.process_readings[0]
        other = type("Proc", (), {"pid": self.pid + 1, "usedGpuMemory": 10**12})
        return [other, type("Proc", (), {"pid": self.pid, "usedGpuMemory": used})]

    def nvmlDeviceGetMemoryInfo(self, handle):
        used = self.device_readings.pop(0) if len(self.device_readings) > 1 else self.device_readings[0]
        return type("Info", (), {"used": used})


def test_nvml_sampler_tracks_this_process_and_the_device(monkeypatch):
    import os

    fake = FakeNvml([500, 900, 700], [2000, 5000, 3000], os.getpid())
    monkeypatch.setattr(nvml, "pynvml", fake)
    monkeypatch.setattr(nvml, "device_handle", lambda device: "handle")
    with nvml.NvmlSampler("cuda", period_s=0.001) as sampler:
        while sampler.samples < 4:
            pass
    assert sampler.available and (sampler.baseline_process, sampler.baseline_device) == (500, 2000)
    assert (sampler.peak_process, sampler.peak_device) == (900, 5000)  # another pid's 1 TB is not ours


def test_nvml_without_our_pid_reports_none(monkeypatch):
    import os

    monkeypatch.setattr(nvml, "pynvml", FakeNvml([123], [4000], os.getpid() + 1000))
    monkeypatch.setattr(nvml, "device_handle", lambda device: "handle")
    with nvml.NvmlSampler("cuda", period_s=0.001) as sampler:
        pass
    assert sampler.peak_process is None and sampler.peak_device == 4000


@pytest.mark.parametrize("used", [0, nvml.NVML_VALUE_NOT_AVAILABLE])
def test_nvml_zero_or_unavailable_process_memory_is_unknown(monkeypatch, used):
    """Some containers list this pid with usedGpuMemory 0 (or NVML's not-available value): unknown, not bytes."""
    import os

    monkeypatch.setattr(nvml, "pynvml", FakeNvml([used], [4000], os.getpid()))
    assert nvml.process_used_bytes("handle") is None


class FakeNvmlDevices:
    """Stands in for pynvml's handle lookups: NVML knows GPUs by prefixed UUID and by its own (PCI) index."""

    def __init__(self, uuids):
        self.uuids = uuids

    def nvmlDeviceGetHandleByUUID(self, uuid):
        if uuid not in self.uuids:
            raise LookupError(uuid)
        return f"handle of {uuid}"

    def nvmlDeviceGetHandleByIndex(self, index):
        return f"handle of {self.uuids[index]}"


@pytest.mark.parametrize("torch_uuid, count, visible, expected", [
    ("bbbb", 2, "", "handle of GPU-bbbb"),  # torch's bare UUID gets NVML's prefix, whatever the numbering
    ("zzzz", 2, "", None),  # unknown UUID, two GPUs: CUDA and NVML numbering may differ
    ("zzzz", 1, "1", None),  # renumbered by CUDA_VISIBLE_DEVICES: index 0 is not NVML's 0
    ("zzzz", 1, "", "handle of GPU-aaaa"),  # one GPU, nothing renumbered: the index is safe
])
def test_nvml_handle_is_found_by_uuid(monkeypatch, torch_uuid, count, visible, expected):
    monkeypatch.setattr(nvml, "pynvml", FakeNvmlDevices(["GPU-aaaa", "GPU-bbbb"]))
    monkeypatch.setattr(nvml, "_init", lambda: True)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: count)
    monkeypatch.setattr(torch.cuda, "get_device_properties", lambda index: type("P", (), {"uuid": torch_uuid}))
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", visible)
    monkeypatch.delenv("CUDA_DEVICE_ORDER", raising=False)
    assert nvml.device_handle("cuda:0") == expected


def test_cpu_flash_attention_is_counted_like_the_cuda_kernels():
    # CPU SDPA dispatches to a flash kernel that torch's FlopCounter does not know; stbench registers it
    batch, heads, tokens, dim = 1, 2, 128, 32
    q = torch.randn(batch, heads, tokens, dim, requires_grad=True)

    def attention_step():
        torch.nn.functional.scaled_dot_product_attention(q, q, q).sum().backward()

    forward = 4 * batch * heads * tokens * tokens * dim  # QK^T and PV, 2 FLOPs per multiply-add
    assert flops.count_flops(attention_step) == forward + forward * 5 // 2  # backward: 5 matmuls of that size
