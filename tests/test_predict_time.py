"""stbench predict: the expected step time beside the roofline bound, and the allocated peak beside the reserved."""
from __future__ import annotations

import dataclasses

import pytest

from stbench.predict import efficiency, estimate, fake, hardware, memory, roofline
from stbench.predict.efficiency import Efficiency
from stbench.predict.roofline import OpCost

MiB = 1 << 20
GPUS = [hardware.get(name) for name in hardware.HARDWARE]
# one kernel of every class, from launch-bound to compute-bound
OPS = [OpCost("aten.mm.default", 2 * 4096 * 4096 * 4096, 3 * 4096 * 4096 * 2, "bf16", roofline.GEMM, (1, 4096, 4096)),
       OpCost("aten.addmm.default", 2 * 77 * 3072 * 128, 2 * (77 * 3072 + 3072 * 128), "bf16", roofline.GEMM,
              (1, 77, 128)),
       OpCost("aten.convolution.default", 10**12, 10**9, "bf16", roofline.GEMM, (1, 65536, 320)),
       OpCost("aten._scaled_dot_product_flash_attention.default", 4 * 10**12, 10**9, "bf16", roofline.ATTENTION),
       OpCost("aten._scaled_dot_product_flash_attention_backward.default", 10**13, 2 * 10**9, "bf16",
              roofline.ATTENTION_BACKWARD),
       OpCost("aten.add.Tensor", 0, 3 * 10**9, "bf16"),
       OpCost("aten.mul.Tensor", 0, 64, "fp32"),
       OpCost("aten.mm.default", 2 * 128**3, 3 * 128 * 128 * 4, "fp32", roofline.GEMM)]  # no shape: flat MAMF


@pytest.mark.parametrize("gpu", GPUS, ids=[g.name for g in GPUS])
def test_expected_time_is_never_below_the_bound_and_is_the_bound_when_every_efficiency_is_one(gpu):
    bound = roofline.step_time(OPS, gpu)
    expected = roofline.step_time(OPS, gpu, efficiency.for_hardware(gpu))
    assert expected.step_ms >= bound.step_ms and expected.compute_ms > bound.compute_ms
    assert expected.memory_ms == pytest.approx(bound.memory_ms / 0.88)
    for backend in efficiency.BACKENDS:  # every backend: never faster than the datasheet
        assert roofline.step_time(OPS, gpu, efficiency.for_hardware(gpu, backend)).step_ms >= bound.step_ms
    ones = Efficiency(gemm=1.0, attention={b: (1.0, 1.0) for b in efficiency.BACKENDS}, memory=1.0, sms=None)
    assert roofline.step_time(OPS, gpu, ones) == bound == roofline.step_time(OPS, gpu, efficiency.IDEAL)
    assert sum(expected.by_kind.values()) == pytest.approx(expected.step_ms)  # where the expected time goes
    assert set(expected.by_kind) == {roofline.GEMM, roofline.ATTENTION, roofline.ATTENTION_BACKWARD, "other"}
    # injected: a table with one class halved moves exactly that class's kernels
    half_attention = dataclasses.replace(ones, attention={"flash2": (0.5, 1.0)})
    slower = roofline.step_time(OPS, gpu, half_attention)
    attention_ms = OPS[3].flops / gpu.peak("bf16") * 1e3
    assert slower.compute_ms == pytest.approx(bound.compute_ms + attention_ms)


def test_gemm_efficiency_counts_tiles_and_waves_by_hand():
    h100 = efficiency.for_hardware(hardware.get("h100-sxm"))
    mamf = 794.5 / 989
    assert h100.sms == 132 and h100.gemm == pytest.approx(mamf)
    # one 128x128 output tile: one of 132 SMs busy for one wave
    assert h100.gemm_fraction(1, 128, 128) == pytest.approx(mamf / 132)
    # 17024 x 128 = 133 tiles of 128x128 (2 waves, 133/264 busy) or 67 tiles of 256x128 (one wave, the last half
    # empty: 17024*128 / (132*256*128)); cuBLAS' best is the latter
    assert h100.gemm_fraction(1, 128 * 133, 128) == pytest.approx(mamf * 17024 / (132 * 256))
    # a large, tile-aligned GEMM whose tiles fill whole waves runs at MAMF
    assert h100.gemm_fraction(1, 256 * 132, 128 * 8) == pytest.approx(mamf)
    assert h100.gemm_fraction(12, 128, 128) == pytest.approx(mamf * 12 / 132)  # a batch of small GEMMs


def test_attention_efficiency_by_backend_and_direction():
    h100 = hardware.get("h100-sxm")
    flash3 = efficiency.for_hardware(h100, "flash3")
    assert (flash3.attention_fraction(False), flash3.attention_fraction(True)) == (648 / 989.4, 561 / 989.4)
    default = efficiency.for_hardware(h100)  # torch >= 2.11 runs cuDNN's SDPA first on Hopper
    assert default.backend == "cudnn" and default.attention_fraction(True) == 516 / 989.4
    assert efficiency.for_hardware(hardware.get("h200")).backend == "cudnn"
    assert efficiency.for_hardware(hardware.get("a100-80g")).backend == "flash2"  # FlashAttention-2 elsewhere
    flash2 = efficiency.for_hardware(h100, "flash2")
    assert (flash2.attention_fraction(False), flash2.attention_fraction(True)) == (370 / 989.4, 322 / 989.4)
    a100 = efficiency.for_hardware(hardware.get("a100-80g"), "efficient")  # no figure: FlashAttention-2's
    assert (a100.attention_fraction(False), a100.attention_fraction(True)) == (0.73, 0.63)
    assert efficiency.for_hardware(hardware.get("cpu")) is efficiency.IDEAL
    with pytest.raises(ValueError, match="attention backend"):
        efficiency.for_hardware(h100, "sdpa")
    with pytest.raises(ValueError, match="efficiency gemm"):
        Efficiency(gemm=1.5)
    assert roofline.kind_of("aten._scaled_dot_product_cudnn_attention_backward.default") == roofline.ATTENTION_BACKWARD
    assert roofline.kind_of("aten.bmm.default") == roofline.GEMM and roofline.kind_of("aten.mul.Tensor") == "other"


def test_allocated_peak_is_a_hand_count_and_never_exceeds_the_reserved_peak():
    trace = fake.StepTrace()
    trace.events = [(1, "params", 3 * MiB + 1),  # large pool: 3 MiB + 512 allocated, a 20 MiB segment
                    (1, "a", 1000),  # small pool: 1024 allocated, a 2 MiB segment
                    (1, "b", 12 * MiB),  # split from the first segment's free ~17 MiB: no new segment
                    (-1, "a", 1000), (-1, "b", 12 * MiB),
                    (1, "c", 600)]  # 1024, from the cached small block
    trace.step_end = 5  # after b's free: params only
    p = estimate.prediction(trace, hardware.get("h100-sxm"))
    assert p["peak_allocated_bytes"] == p["allocated_bytes"] == (3 * MiB + 512) + 1024 + 12 * MiB
    assert p["reserved_bytes"] == 20 * MiB + 2 * MiB >= p["peak_allocated_bytes"]
    assert p["peak_bytes"] == p["reserved_bytes"] + 512 * MiB  # the CUDA context on top, as before
    assert p["allocated_after_step_bytes"] == 3 * MiB + 512
    assert memory.replay(trace.events, caching=True, at=6).allocated_at == 3 * MiB + 512 + 1024


def test_toy_prediction_has_expected_time_bound_and_both_peaks(toy_case):
    record = estimate.predict_case(toy_case(mode="full", dtype="bf16"), hardware.get("a100-80g"))
    p = record["predicted"]
    assert p["step_ms"] >= p["step_ms_bound"] > 0 and p["attention_backend"] == "flash2"
    assert 0 < p["peak_allocated_bytes"] <= p["reserved_bytes"] < p["peak_bytes"]
    # what stays allocated after the step: parameters, AdamW's two moments and step counts, the batch
    assert p["allocated_after_step_bytes"] >= record["param_bytes"] + record["optimizer_bytes"]
    assert p["mfu"] == pytest.approx(p["flops"] / (p["step_ms"] / 1e3) / hardware.get("a100-80g").peak("bf16"))


def test_checkpointing_recomputation_is_in_the_traced_kernels():
    """The fake step runs torch.utils.checkpoint's recomputation in backward: its kernels are traced and timed."""
    case = dict(arch="dit-full", preset="tiny", mode="full", batch=1, frames=4, resolution=64, dtype="bf16",
                device="cpu", fsdp=1)
    from stbench.config import Case

    plain, checkpointed = (fake.trace_step(Case(**case, activation_checkpointing=a), world=1)
                           for a in ("none", "blocks"))
    forward_flops = sum(op.flops for op in plain.ops if "backward" not in op.name and op.kind == roofline.GEMM)
    assert sum(op.flops for op in checkpointed.ops) > sum(op.flops for op in plain.ops)
    assert checkpointed.saved_activations < plain.saved_activations
    assert sum(op.flops for op in checkpointed.ops) <= sum(op.flops for op in plain.ops) + forward_flops * 1.01


def test_widening_copies_and_foreach_kernels_take_their_measured_bandwidth_on_hopper():
    import torch
    aten = torch.ops.aten
    from torch._subclasses.fake_tensor import FakeTensorMode

    with FakeTensorMode():
        bf16, fp32 = torch.empty(1 << 20, dtype=torch.bfloat16), torch.empty(1 << 20)
        up = aten._to_copy.default(bf16, dtype=torch.float32)
        down = aten._to_copy.default(fp32, dtype=torch.bfloat16)
        ops = {"up": roofline.op_cost(aten._to_copy.default, (bf16,), {"dtype": torch.float32}, up),
               "down": roofline.op_cost(aten._to_copy.default, (fp32,), {"dtype": torch.bfloat16}, down),
               "copy_ up": roofline.op_cost(aten.copy_.default, (fp32, bf16), {}, fp32),
               "copy_ down": roofline.op_cost(aten.copy_.default, (bf16, fp32), {}, bf16),
               "foreach": roofline.op_cost(aten._foreach_add_.List, ([fp32], [fp32]), {}, None)}
        mask = torch.empty(1 << 20, dtype=torch.bool)  # a mask or an index made float: not the measured cast
        ops["bool"] = roofline.op_cost(aten._to_copy.default, (mask,), {"dtype": torch.float32},
                                       aten._to_copy.default(mask, dtype=torch.float32))
    assert {k: op.memory for k, op in ops.items()} == {"up": roofline.UPCAST, "down": "", "copy_ up": roofline.UPCAST,
                                                       "copy_ down": "", "foreach": roofline.FOREACH, "bool": ""}
    assert ops["up"].bytes == ops["down"].bytes == (1 << 20) * 6  # read 2 B, write 4 B (or the reverse) each
    h200, a100 = hardware.get("h200"), hardware.get("a100-80g")
    hopper = efficiency.for_hardware(h200)
    seconds = {k: roofline.op_seconds(op, h200, hopper)[1] for k, op in ops.items()}
    assert seconds["up"] == pytest.approx(ops["up"].bytes / (h200.bandwidth_bytes_s * 0.434))
    assert seconds["down"] == pytest.approx(ops["down"].bytes / (h200.bandwidth_bytes_s * 0.88))
    assert seconds["foreach"] == pytest.approx(ops["foreach"].bytes / (h200.bandwidth_bytes_s * 0.716))
    # no such measurement for the A100: every memory-bound kernel at the common 88%
    ampere = efficiency.for_hardware(a100)
    common = ops["up"].bytes / (a100.bandwidth_bytes_s * 0.88)
    assert roofline.op_seconds(ops["up"], a100, ampere)[1] == pytest.approx(common)
    assert roofline.op_seconds(ops["up"], h200)[1] == pytest.approx(ops["up"].bytes / h200.bandwidth_bytes_s)  # bound
    with pytest.raises(ValueError, match="memory upcast"):
        Efficiency(memory_by_class={"upcast": 0.0})
    with pytest.raises(ValueError, match="memory class"):  # a misspelt class would silently take 88%
        Efficiency(memory_by_class={"upcasts": 0.5})


def test_host_bound_warning_when_the_cpu_may_not_launch_kernels_as_fast_as_the_gpu_runs_them():
    # 6,000 kernels: 30-150 ms of CPU launch work at 5-25 us each
    assert estimate.host_bound({"step_ms": 400.0, "kernels": 6000}) is None  # 67 us of GPU time each
    warning = estimate.host_bound({"step_ms": 56.0, "kernels": 6000})  # 9.3 us each
    assert warning.startswith(estimate.HOST_BOUND) and "6000 kernels of 9.3 us" in warning
    assert "30-150 ms a step beside 56 ms of kernels" in warning
    # a sharded rank compares its kernels' time, not the step with communication
    assert estimate.host_bound({"step_ms": 400.0, "kernels_ms": 100.0, "kernels": 6000}) is not None
    assert estimate.host_bound({"step_ms": None, "kernels": 6000}) is None  # the CPU: no time model
    assert estimate.host_bound({"hardware": "h200"}) is None  # an error record


def test_a_predicted_record_carries_the_host_bound_warning_and_predict_prints_it(toy_case):
    from stbench.predict import command
    record = estimate.predict_case(toy_case(mode="full", dtype="bf16"), hardware.get("h100-sxm"))
    p = record["predicted"]
    flagged = [w for w in record["warnings"] if w.startswith(estimate.HOST_BOUND)]
    # a tiny model's kernels are microseconds each: the CPU's launches dominate
    assert p["kernels"] * 25e-3 >= p["step_ms"] and len(flagged) == 1
    assert f"{estimate.HOST_BOUND}: {p['kernels']} kernels" in command.describe(record)
