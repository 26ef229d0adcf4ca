"""The one measurement sequence of a case: build, warm up, time, then every figure of the record.

One process (`stbench.runner`) and every rank of a torchrun job (`stbench.distributed`, which adds only the
gather across ranks) measure through `measure_case`, so the two cannot drift apart.
"""
from __future__ import annotations

import os
from pathlib import Path
from typing import Callable

import torch

from . import activations, flops, host, load, memory, nvml, timing

TRACE_MEMORY_ENV = "STBENCH_TRACE_MEMORY"  # "1": traces also hold memory events and shapes (run --trace-memory)
TRACE_STEPS = 1  # profiled steps per case: one serial-unet tiny 64px step is ~4.6 MB of trace, three were 13.8 MB


def soft(record: dict, what: str, fn):
    """Run a secondary measurement; a failure becomes a warning (and None), never a failed case."""
    try:
        return fn()
    except Exception as e:  # noqa: BLE001 - the case's main figures are already measured
        record["warnings"].append(f"{what}: not measured ({type(e).__name__}: {str(e).splitlines()[0][:200]})")
        memory.release_memory()
        return None


def model_sizes(record: dict, step) -> None:
    """Exact parameter counts and parameter/gradient bytes of a TrainingStep's model."""
    record["params_total"] = sum(p.numel() for p in step.model.parameters())
    record["params_trainable"] = sum(p.numel() for p in step.trainable)
    # resident encoders (--encoders resident) are held beside the model: their (frozen) bytes count
    encoders = getattr(step, "encoders", None)
    record["param_bytes"] = memory.param_bytes(step.model) + (memory.param_bytes(encoders) if encoders else 0)
    record["grad_bytes"] = memory.grad_bytes(step.trainable)


def model_stats(record: dict, model) -> None:
    """The model's own record fields (e.g. `dsv`); its 'warnings' join the record's."""
    extra = soft(record, "model stats", model.extra_stats) or {}
    record["warnings"].extend(extra.pop("warnings", []))
    record.update(extra)


def count_passes(record: dict, step) -> None:
    """Saved-activation bytes of one forward and FLOPs of one step: eager, so hooks and counters see every op
    (these passes train the model one more step: run them after anything that must not see it)."""
    record["saved_activations"] = soft(record, "saved activations", lambda: activations.saved_activation_bytes(
        step.model, lambda: step.compute_loss(eager=True)))
    record["flops_per_step"] = soft(record, "flops", lambda: flops.count_flops(lambda: step(eager=True)))


def _cuda_context(device: torch.device, record: dict) -> None:
    """Make CUDA's lazily created context exist and record what it holds before any model is built."""
    torch.empty(1, device=device)
    torch.cuda.synchronize(device)
    memory.release_memory()
    context = nvml.context_baseline_bytes(device)
    if context is not None:
        record["env"]["cuda_context_bytes"] = context
        record["warnings"].append(f"nvml: the CUDA context and libraries held {context / 2**20:.0f} MiB before the "
                                  f"model was built (included in nvml_peak_process)")


def measure_case(case, record: dict, *, repeats: int, warmup: int, time_steps=timing.time_steps,
                 trace_dir: Path | None = None, prepare: Callable | None = None, after_warmup: Callable | None = None,
                 settle: bool = True):
    """Fill `record` with the measurements of `case`; returns the TrainingStep.

    `prepare(step) -> callable`: what is warmed up and timed instead of the bare step (torchrun wraps it to count
    the bytes it sends); `after_warmup()` runs between warm-up and the measured steps. `time_steps(fn, repeats,
    device) -> StepTimes` runs the measured steps (the suites pass pytest-benchmark's). `settle`: warm up until
    step times settle (with a cap); False runs exactly the model's warm-up steps.
    """
    from ..step import TrainingStep  # noqa: local so `--help` stays fast

    device = torch.device(case.device)
    warnings = record["warnings"]
    if device.type == "cuda":
        _cuda_context(device, record)

    step = TrainingStep(case)
    model = step.model
    timed = prepare(step) if prepare is not None else step
    model_sizes(record, step)

    before = load.snapshot(device)
    # torchrun ranks must run the same number of steps: no early end of warm-up there (settle=False)
    record["warmup"], settled = timing.warm_up(timed, step.warmup_steps(warmup), device,
                                               **({} if settle else {"cap": 0}))
    if settle and not settled:
        warnings.append(f"warm-up: step times had not settled after {record['warmup']} steps (the cap)")
    if after_warmup is not None:
        after_warmup()
    memory.reset_peaks(device)
    with nvml.NvmlSampler(device) as sampler:
        times = time_steps(timed, repeats, device)
    record["load"] = load.load_fields(before, load.snapshot(device))
    warnings.extend(load.load_warnings(record["load"]))
    record.update(times.as_record_fields())
    warnings.extend(times.warnings)
    record["peak_allocated"], record["peak_reserved"] = memory.allocator_peaks(device)
    record["nvml_peak_process"], record["nvml_peak_device"] = sampler.peak_process, sampler.peak_device
    if sampler.available and sampler.peak_process is None:
        warnings.append("nvml: no per-process memory reported for this pid (container pid namespace?)")
    record["optimizer_bytes"] = memory.optimizer_bytes(step.optimizer)
    model_stats(record, model)

    if trace_dir is not None:
        if case.compile:
            warnings.append("trace: record_function regions inside the torch.compile'd graph are not captured "
                            "(the summary's region times miss them); kernels and operators are")
        from ..results import case_slug
        from ..trace import profile_training_steps

        folder = Path(trace_dir) / case_slug(record)
        # an environment variable, so that --isolate's child processes inherit the choice
        with_memory = os.environ.get(TRACE_MEMORY_ENV) == "1"
        if soft(record, "trace", lambda: profile_training_steps(step, folder, device=case.device,
                                                                active=TRACE_STEPS, profile_memory=with_memory)):
            record["trace"] = str(folder)  # trace + summary.json (stbench.trace.load_summary reads it)

    # Extra passes after timing, so they cannot disturb it; eager, so hooks and counters see every op.
    if device.type == "cpu":
        record["host_peak_bytes"] = soft(record, "host peak", lambda: host.step_peak_growth(
            timed, record["param_bytes"] + record["optimizer_bytes"]))
    if case.compile:
        warnings.append("saved_activations and flops_per_step are counted on the eager (uncompiled) step")
    count_passes(record, step)
    peak = flops.device_peak_tflops(device, case.dtype)
    record["tflops"], record["mfu"] = flops.throughput(record["flops_per_step"], record["step_ms_median"], peak)
    if record["mfu"] is not None and case.dtype == "fp32" and flops.tf32_enabled():
        warnings.append("mfu: measured against the fp32 (non-tensor-core) peak, but TF32 tensor cores are "
                        "enabled (torch.backends.cudnn/cuda.matmul.allow_tf32), so MFU may be overstated")
    record["status"] = "ok"
    return step
