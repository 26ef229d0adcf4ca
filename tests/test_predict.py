"""stbench predict: allocator replay, exact counts against run, CPU validation against host RSS, frontier, CLI."""
from __future__ import annotations

import dataclasses
import json
import os
import subprocess
import sys

import pytest

from conftest import REPO, TOY_ARCH
from stbench import results, runfolder, runner
from stbench.cli import main
from stbench.config import Case
from stbench.predict import command, efficiency, estimate, fake, hardware, memory, roofline
from stbench.predict.hardware import Hardware

MiB = 1 << 20


def test_caching_allocator_rounding_on_planted_sequence():
    a = memory.CachingAllocator()
    a.malloc("tiny", 1)  # 512 bytes, from a fresh 2 MiB small-pool segment
    assert (a.allocated, a.reserved) == (512, 2 * MiB)
    a.malloc("small", MiB)  # still small (<= 1 MiB): split from the same segment
    assert (a.allocated, a.reserved) == (512 + MiB, 2 * MiB)
    a.malloc("large", MiB + 1)  # large pool: rounded to 512, a 20 MiB segment (request < 10 MiB)
    assert (a.allocated, a.reserved) == (512 + MiB + MiB + 512, 22 * MiB)
    allocated = a.allocated
    a.malloc("huge", 19 * MiB)  # >= 10 MiB: its own segment, rounded up to 20 MiB; a 1 MiB rest is not split off
    assert (a.allocated, a.reserved) == (allocated + 20 * MiB, 42 * MiB)
    a.free("large")  # cached, not returned: the 20 MiB segment is whole and free again
    a.malloc("reuse", 5 * MiB)  # the cached block, split (the remainder is over 1 MiB)
    a.malloc("rest", 15 * MiB)  # fits the 15 MiB remainder exactly: no new segment
    assert a.reserved == 42 * MiB
    a.free("reuse"), a.free("rest")
    a.malloc("merged", 20 * MiB)  # the two freed halves merged back into one 20 MiB block
    assert a.reserved == a.peak_reserved == 42 * MiB
    bounded = memory.CachingAllocator(capacity=24 * MiB)
    assert bounded.malloc("a", 11 * MiB) and bounded.malloc("b", 1)  # segments of 12 MiB and 2 MiB
    bounded.free("a")
    assert bounded.malloc("c", 21 * MiB)  # 22 MiB: the free 12 MiB segment is given back first, then it fits
    assert bounded.reserved == 24 * MiB
    assert not bounded.malloc("d", 3 * MiB) and bounded.out_of_memory


def test_host_heap_maps_large_requests_and_reuses_heap_chunks():
    h = memory.HostHeap()
    h.malloc("big", 200_000)  # >= 128 KiB: mmapped in whole pages
    assert h.reserved == 49 * 4096
    h.free("big")
    assert h.reserved == 0
    h.malloc("a", 1000), h.malloc("b", 1000)
    top = h.reserved
    h.free("a")
    h.malloc("c", 500)  # best fit: a's freed chunk, the heap does not grow
    assert h.reserved == top and h.allocated == 1500


def test_replay_measures_from_the_steady_state_step():
    events = [(1, "x", 4 * MiB), (-1, "x", 4 * MiB), (1, "y", MiB)]
    assert memory.replay(events, caching=True).peak_allocated == 4 * MiB
    assert memory.replay(events, caching=True, measure_from=2) == memory.Replay(MiB, 22 * MiB, False)


def test_toy_prediction_counts_state_exactly(toy_case):
    case = toy_case(mode="full")
    record = estimate.predict_case(case, hardware.get("h100-sxm"))
    n = 4 * 8 + 8 + 8 * 4 + 4  # toy-mlp hidden 8: two Linear layers, all trainable in mode full
    assert (record["param_bytes"], record["grad_bytes"]) == (4 * n, 4 * n)
    assert record["optimizer_bytes"] == 2 * 4 * n + 4 * 4  # exp_avg, exp_avg_sq, a float32 step per tensor
    p = record["predicted"]
    assert record["status"] == "ok" and p["fits"] and record["device"] == "h100-sxm"
    assert p["allocated_bytes"] >= record["param_bytes"] + record["grad_bytes"] + record["optimizer_bytes"]
    assert p["allocated_bytes"] % 512 == 0 and p["reserved_bytes"] == 2 * MiB  # all small blocks: one segment
    assert p["peak_bytes"] == p["reserved_bytes"] + hardware.get("h100-sxm").context_bytes
    assert p["peak_bytes"] - p["context_bytes"] == sum(p["breakdown"].values())
    assert any("predicted, not measured" in w for w in record["warnings"])
    measured = runner.run_case(case, repeats=1)
    for name in ("param_bytes", "grad_bytes", "optimizer_bytes", "saved_activations"):
        assert record[name] == measured[name], name
    assert p["flops"] == measured["flops_per_step"]


def test_flops_and_saved_bytes_equal_run():  # the UNet is compared in the host-peak test below
    case = Case(arch="dit-full", preset="tiny", frames=4, resolution=64, device="cpu")
    predicted = estimate.predict_case(case, hardware.get("cpu"))
    measured = runner.run_case(case, repeats=1)
    assert predicted["predicted"]["flops"] == measured["flops_per_step"] > 0
    assert predicted["saved_activations"] == measured["saved_activations"]
    assert predicted["predicted"]["step_ms"] is None  # no time model for the CPU


def test_trace_keeps_torchs_unfused_rms_norm_warning_to_itself():
    """wan's rms_norm under bf16 autocast (fp32 weight) warns that it runs unfused, once per process; every wan
    prediction printed it. With torch warning every time, a bare call still warns and the trace does not."""
    import warnings

    import torch

    case = Case(arch="wan", preset="tiny", mode="full", frames=5, resolution=64, device="cpu", dtype="bf16")
    was = torch.is_warn_always_enabled()
    torch.set_warn_always(True)
    try:
        with warnings.catch_warnings(record=True) as bare:
            warnings.simplefilter("always")
            with torch.autocast("cpu", dtype=torch.bfloat16):
                torch.nn.functional.rms_norm(torch.ones(2, 8, dtype=torch.bfloat16), (8,), torch.ones(8))
        with warnings.catch_warnings(record=True) as traced:
            warnings.simplefilter("always")
            fake.trace_step(case)
    finally:
        torch.set_warn_always(was)
    assert any("Mismatch dtype between input and weight" in str(w.message) for w in bare)
    assert not [w for w in traced if "Mismatch dtype" in str(w.message)]


def test_fake_step_allocates_like_the_real_step():
    from stbench.step import TrainingStep

    case = Case(arch="dit-full", preset="tiny", frames=4, resolution=64, device="cpu")
    real = fake.StepTrace()
    step = TrainingStep(case)
    with fake._Tracker(real) as tracker:
        for t in (*step.model.parameters(), *step.model.buffers(), step.batch.latents, step.batch.noise,
                  step.batch.timesteps, step.batch.text):
            tracker.track(t)
        step()
        real.measure_from = len(real.events)
        step()
    traced = estimate.cached_trace(case, False)  # AdamW's per-parameter loop, as on the CPU
    peaks = [memory.replay(t.events, caching=False, measure_from=t.measure_from).peak_allocated
             for t in (real, traced)]
    assert abs(peaks[0] - peaks[1]) <= 4096  # one scalar's storage differs (4 KiB on the real CPU path)
    sizes = sorted(n for sign, _, n in real.events[real.measure_from:] if sign > 0)
    assert sizes[-20:] == sorted(n for sign, _, n in traced.events[traced.measure_from:] if sign > 0)[-20:]


VALIDATE = """
import json, sys
from stbench.config import Case
from stbench.measure.memory import freeze_imports
from stbench.runner import run_case
freeze_imports()  # as the command line does: each case's gc.collect() then skips the imports' objects
for arch, r, f in json.loads(sys.argv[1]):
    record = run_case(Case(arch=arch, preset="tiny", frames=f, resolution=r, device="cpu"), repeats=1)
    print(json.dumps([arch, r, f, record["host_peak_bytes"], record["flops_per_step"], record["saved_activations"]]))
"""


def test_cpu_prediction_within_25_percent_of_measured_host_peak():
    # The first case of each architecture pays one-off costs (library pages, kernel set-up): measured, not checked.
    shapes = [("serial-unet", 64, 2), ("serial-unet", 128, 8), ("dit-full", 64, 2), ("dit-full", 256, 8),
              ("dit-full", 128, 16)]
    env = {**os.environ, "MALLOC_MMAP_THRESHOLD_": "131072", "OMP_NUM_THREADS": "1", "PYTHONPATH": str(REPO)}
    child = subprocess.Popen([sys.executable, "-c", VALIDATE, json.dumps(shapes)], env=env, stdout=subprocess.PIPE,
                             stderr=subprocess.PIPE, text=True)
    # predicted meanwhile (a core each): a prediction needs no measurement, and the child's peak is its own
    records = {(arch, r, f): estimate.predict_case(Case(arch=arch, preset="tiny", frames=f, resolution=r,
                                                         device="cpu"), hardware.get("cpu"))
               for arch, r, f in shapes if (r, f) != (64, 2)}
    out, err = child.communicate(timeout=300)
    assert child.returncode == 0, err
    measured = [json.loads(line) for line in out.splitlines() if line.startswith("[")]
    checked = [m for m in measured if (m[1], m[2]) not in ((64, 2),)]
    assert len(checked) == 3
    for arch, r, f, host_peak, flops, saved in checked:
        record = records[arch, r, f]
        predicted = record["predicted"]["peak_bytes"]
        assert abs(predicted - host_peak) <= 0.25 * host_peak, (arch, r, f, predicted, host_peak)
        assert (record["predicted"]["flops"], record["saved_activations"]) == (flops, saved)


def test_frontier_largest_fitting_case_fits_and_next_does_not(tmp_path, toy_case):
    target = Hardware(name="tiny-gpu", label="a 4 MiB test device", memory_bytes=4 * MiB + 6 * MiB,
                      bandwidth_bytes_s=1e11, peak_tflops={"fp32": 1.0}, context_bytes=6 * MiB)
    predict = command.Predictor(tmp_path, {}, echo=lambda line: None)
    good, bad = command.frontier(predict, lambda f: toy_case(resolution=256, frames=f), target, limit=64)
    assert good is not None and bad == good + 1
    assert estimate.predict_case(toy_case(resolution=256, frames=good), target)["predicted"]["fits"]
    assert estimate.predict_case(toy_case(resolution=256, frames=bad), target)["status"] == "oom"
    statuses = {r["frames"]: r["status"] for r in results.read_records(tmp_path) if r["resolution"] == 256}
    assert statuses[good] == "ok" and statuses[bad] == "oom"
    assert command.frontier(predict, lambda f: toy_case(resolution=16, frames=f), target, limit=256) == (64, None)
    k, over = command.frontier(predict, lambda k: toy_case(resolution=8 * k, frames=4), target, limit=256)
    assert estimate.predict_case(toy_case(resolution=8 * k, frames=4), target)["status"] == "ok"
    assert over == k + 1 and estimate.predict_case(toy_case(resolution=8 * over, frames=4), target)["status"] == "oom"


def test_dsv_predicted_from_computed_tiles():
    def predict(*overrides):
        case = Case(arch="dit-dsv", preset="tiny", frames=8, resolution=64, device="cpu", dtype="bf16",
                    overrides=overrides)
        return estimate.predict_case(case, hardware.get("h100-sxm"))

    dense, sparse = predict(), predict(("sparsity", "0.75"))
    assert dense["status"] == sparse["status"] == "ok"
    assert any("unknown before training" in w for w in dense["warnings"])
    assert any("forced sparsity 0.75" in w for w in sparse["warnings"])
    assert sparse["predicted"]["flops"] < dense["predicted"]["flops"]
    # the computed tiles are fused attention, timed at the attention kernel's rate (they were once a GEMM's)
    case = Case(arch="dit-dsv", preset="tiny", frames=8, resolution=64, device="cpu", dtype="bf16",
                overrides=(("sparsity", "0.75"),))
    tiles = [op for op in estimate.cached_trace(case, True).ops if op.name.startswith("dsv.block_sparse")]
    assert tiles and {op.kind for op in tiles} == {roofline.ATTENTION, roofline.ATTENTION_BACKWARD}
    h100 = efficiency.for_hardware(hardware.get("h100-sxm"))
    assert roofline.compute_fraction(tiles[0], h100) == h100.attention_fraction(False) == 595 / 989.4
    assert sparse["predicted"]["step_ms_by_kind"]["attention_backward"] > 0


def test_predict_command_writes_resumes_and_rejects_bad_input(tmp_path, capsys):
    out = tmp_path / "run"
    argv = ["predict", "--arch", TOY_ARCH, "--resolution", "16", "--frames", "2,4", "--hardware",
            "h100-sxm,cpu", "--out", str(out)]
    assert main(argv) == 0
    records = results.read_records(out)
    assert [(r["device"], r["frames"], r["dtype"]) for r in records] == [
        ("h100-sxm", 2, "bf16"), ("h100-sxm", 4, "bf16"), ("cpu", 2, "fp32"), ("cpu", 4, "fp32")]
    assert all(r["predicted"]["hardware"] == r["device"] for r in records)
    assert json.loads((out / runfolder.RUN_FILE).read_text())["sweep"]["hardware"] == ["h100-sxm", "cpu"]
    assert main(argv) == 2 and "--resume" in capsys.readouterr().err
    assert main(argv + ["--resume"]) == 0 and len(results.read_records(out)) == 4
    capsys.readouterr()
    assert main(["predict", "--arch", TOY_ARCH, "--hardware", "h100,cpu", "--out", str(tmp_path / "x")]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("stbench: error: hardware: unknown 'h100'; legal: h100-sxm") and "\n" not in err
    assert main(["predict", "--arch", TOY_ARCH, "--resolution", "12", "--out", str(tmp_path / "y")]) == 2
    assert not (tmp_path / "x").exists() and not (tmp_path / "y").exists()
    frontier_argv = ["predict", "--arch", TOY_ARCH, "--resolution", "16", "--frames", "2", "--hardware", "cpu",
                     "--frontier", "--out", str(tmp_path / "f")]
    assert main(frontier_argv) == 0
    lines = capsys.readouterr().out
    assert "16px b1 on cpu: largest fitting frames 64 (predicted)" in lines  # 64: the toy's largest legal
    assert "2 frames b1 on cpu: largest fitting resolution 8192px (predicted)" in lines
    assert (tmp_path / "f" / "frontier.txt").read_text().splitlines() == [
        line for line in lines.splitlines() if line.startswith("frontier ")]
    assert main([*frontier_argv[:-4], "h100-sxm", "--frontier", "gpus", "--out", str(tmp_path / "g")]) == 0
    assert (tmp_path / "g" / "frontier.txt").read_text() == \
        "frontier toy-mlp 16px x2 b1 on h100-sxm: fewest GPUs that fit 1 (one GPU, unsharded; predicted)\n"


def test_predictions_that_do_not_fit_end_with_the_plan_to_run(tmp_path, capsys, monkeypatch):
    """A sweep with predictions that do not fit ends with one line: the `stbench plan` command for the first of
    them, with the case's own shape, regime and overrides, which plan's parser accepts."""
    from stbench.cli import build_parser

    small = dataclasses.replace(hardware.get("h100-sxm"), memory_bytes=(512 << 20) + (1 << 20))  # a 1 MiB GPU
    monkeypatch.setitem(hardware.HARDWARE, "h100-sxm", small)
    argv = ["predict", "--arch", TOY_ARCH, "--resolution", "16,32", "--frames", "2", "--hardware", "h100-sxm,cpu",
            "--dtype", "bf16", "--param-dtype", "bf16", "--set", "hidden=32", "--out", str(tmp_path / "p")]
    assert main(argv) == 0
    lines = [line for line in capsys.readouterr().err.splitlines() if "predicted not to fit" in line]
    assert len(lines) == 1 and lines[0].startswith("stbench: 2 of 4 predicted not to fit; rerun with "
                                                   "--activation-checkpointing blocks, or see every layout of 8 GPUs")
    plan = lines[0].split(": ", 2)[2].split()
    assert plan[:2] == ["stbench", "plan"]
    args = build_parser().parse_args(plan[1:])
    assert (args.arch, args.resolution, args.frames, args.gpus, args.hardware, args.param_dtype, args.set) == \
        (TOY_ARCH, "16", 2, 8, "h100-sxm", "bf16", ["hidden=32"])
    capsys.readouterr()
    assert main([*argv[:-1], str(tmp_path / "q"), "--hardware", "cpu"]) == 0  # all fit: no such line
    assert "predicted not to fit" not in capsys.readouterr().err


def test_report_shows_predictions_labelled_with_their_error(tmp_path, toy_case):
    from stbench.report import predicted as section
    from stbench.report.render import render_report

    case = toy_case(resolution=32, frames=4)
    measured = runner.run_case(case, repeats=1)
    for record in (measured, estimate.predict_case(case, hardware.get("cpu")),
                   estimate.predict_case(case, hardware.get("h100-sxm"))):
        results.append_record(tmp_path / runfolder.RESULTS_FILE, record)
    context = section.section(results.read_records(tmp_path))
    by_hardware = {row["p"]["hardware"]: row for row in context["rows"]}
    cpu = by_hardware["cpu"]
    assert cpu["measured_peak"] == measured["host_peak_bytes"]
    assert cpu["peak_error"] == pytest.approx(cpu["p"]["peak_bytes"] / measured["host_peak_bytes"] - 1)
    assert by_hardware["h100-sxm"]["measured"] is None  # measured on the CPU, not on an H100
    assert context["compared"] == 1
    html = render_report(tmp_path).read_text()
    assert "Predictions in detail (stbench predict; not measurements)" in html
    assert "What to run, on how many GPUs (predicted)" in html
    assert "OOM frontier" not in html  # predictions never enter the measured figures


def _sharded(case: Case, world: int) -> Case:
    return dataclasses.replace(case, fsdp=case.fsdp or world, activation_checkpointing="none",
                               fsdp_reshard_after_forward=True, fsdp_mixed_precision=False)


def test_ring_chunks_are_traced_as_the_target_runs_them_and_timed_at_their_backend():
    """Predicting for a GPU, bf16 ring chunks run CUDA's FlashAttention-2 by name (on fake tensors, by its meta
    function) and are timed at FlashAttention-2's rate, not at the H100's default (cuDNN); fp32 ring chunks form
    their scores as on CUDA; for the CPU every chunk is the CPU's flash kernel."""
    def attention_ops(dtype, foreach):
        case = Case(arch="dit-full", preset="tiny", mode="full", frames=8, resolution=64, device="cpu", dtype=dtype,
                    fsdp=1, context_parallel="ring", activation_checkpointing="none")
        return [op for op in fake.trace_step(case, foreach=foreach, world=2).ops if "attention" in op.name]

    names = lambda ops: sorted({op.name.split(".")[1] for op in ops})  # noqa: E731
    gpu_bf16 = attention_ops("bf16", True)
    assert names(gpu_bf16) == ["_scaled_dot_product_flash_attention", "_scaled_dot_product_flash_attention_backward",
                               "_scaled_dot_product_flash_attention_for_cpu",  # text cross-attention: SDPA's pick
                               "_scaled_dot_product_flash_attention_for_cpu_backward"]
    h100 = efficiency.for_hardware(hardware.get("h100-sxm"))
    fractions = {(op.name.split(".")[1], roofline.compute_fraction(op, h100)) for op in gpu_bf16}
    assert fractions == {("_scaled_dot_product_flash_attention", 370 / 989.4),
                         ("_scaled_dot_product_flash_attention_backward", 322 / 989.4),
                         ("_scaled_dot_product_flash_attention_for_cpu", 595 / 989.4),
                         ("_scaled_dot_product_flash_attention_for_cpu_backward", 516 / 989.4)}
    assert names(attention_ops("fp32", True)) == ["_scaled_dot_product_flash_attention_for_cpu",
                                                  "_scaled_dot_product_flash_attention_for_cpu_backward"]
    assert {op.backend for op in attention_ops("bf16", False)} == {""}


def test_storage_resizes_are_a_free_then_an_allocation():
    """FSDP2 frees gathered parameters with `storage.resize_(0)` and re-allocates them with `resize_(n)`."""
    import gc

    from torch._subclasses.fake_tensor import FakeTensorMode

    from stbench.predict import sharded

    trace = fake.StepTrace()
    with FakeTensorMode(), fake._Tracker(trace) as tracker:
        import torch

        t = torch.empty(100)
        key = tracker.track(t)
        with sharded.storage_resizes(tracker.resized):
            t.untyped_storage().resize_(0)
            t.untyped_storage().resize_(400)
        again = tracker.key_of(t)
        del t
        gc.collect()
    assert trace.events[:4] == [(1, key, 400), (-1, key, 400), (1, again, 400), (-1, again, 400)] and again != key


def test_link_time_per_collective_and_how_it_adds_to_the_step():
    from stbench.predict import sharded

    h100 = hardware.get("h100-sxm")
    comm = {("all_gather", 8): [450_000_000, 2],  # 8 ranks: one node, NVLink 450 GB/s per direction
            ("reduce_scatter", 16): [50_000_000, 1],  # 16 ranks: two nodes, InfiniBand 50 GB/s per GPU
            ("all_to_all", 2): [45_000_000, 4]}
    t = sharded.comm_time(comm, h100)
    assert t.by_kind_ms == pytest.approx({"all_gather": 1.0 + 0.02, "reduce_scatter": 1.0 + 0.02,
                                          "all_to_all": 0.1 + 0.04})
    assert (t.overlapped_ms, t.blocking_ms) == pytest.approx((2.04, 0.14))
    assert t.links == {"all_gather": "NVLink 4 (NVSwitch)", "reduce_scatter": "InfiniBand NDR 400 Gb/s per GPU",
                       "all_to_all": "NVLink 4 (NVSwitch)"}
    assert sharded.comm_time({("all_gather", 2): [1, 1]}, hardware.get("cpu")) is None  # no link model
    assert all(h.intra_link and h.inter_link and h.sources["intra_link"] for h in hardware.HARDWARE.values())


def test_sharded_prediction_holds_one_padded_shard_and_counts_fsdp_bytes(toy_case):
    import architectures
    from stbench.parallel import fsdp as fsdp_lib

    case = _sharded(toy_case(mode="full"), 4)
    record = estimate.predict_case(case, hardware.get("h100-sxm"), world=4)
    model = architectures.build(TOY_ARCH, "tiny")
    units = [list(u.parameters()) for u in model.fsdp_units()]
    in_units = {id(p) for ps in units for p in ps}
    units.append([p for p in model.parameters() if id(p) not in in_units])
    padded = 4 * sum(fsdp_lib.padded_shard_numel(p.shape, 4) for p in model.parameters())
    assert record["status"] == "ok" and record["world_size"] == 4 and record["mesh"]["fsdp"] == 4
    assert record["param_bytes"] == record["grad_bytes"] == padded and record["rank_param_bytes"] == [padded] * 4
    assert record["comm_bytes_by_collective"] == fsdp_lib.analytic_fsdp_bytes(
        [[p.shape for p in ps] for ps in units], [[True] * len(ps) for ps in units], 4, element_size=4,
        param_element_size=4)
    p = record["predicted"]
    assert p["step_ms"] == pytest.approx(max(p["kernels_ms"], p["comm_overlapped_ms"]) + p["comm_blocking_ms"])
    assert p["step_ms_serial"] == pytest.approx(p["kernels_ms"] + p["comm_ms"]) and p["comm_ms"] > 0
    assert p["rank_peak_bytes"] == [p["peak_bytes"]] * 4


def test_resharding_after_forward_frees_the_gathered_parameters():
    base = Case(arch="dit-full", preset="tiny", mode="full", frames=8, resolution=64, device="cpu")
    cpu = hardware.get("cpu")
    kept, freed = (estimate.predict_case(dataclasses.replace(_sharded(base, 4), fsdp_reshard_after_forward=r),
                                         cpu, world=4)["predicted"] for r in (False, True))
    assert freed["allocated_bytes"] < kept["allocated_bytes"]


def test_fewest_gpus_that_fit(tmp_path):
    base = Case(arch="dit-full", preset="tiny", mode="full", frames=8, resolution=64, device="cpu")
    cpu = hardware.get("cpu")
    peaks = {w: estimate.predict_case(_sharded(base, w) if w > 1 else base, cpu, world=w)["predicted"]["peak_bytes"]
             for w in (1, 2, 4, 8)}
    assert peaks[1] > peaks[2] > peaks[4] > peaks[8]  # shards of parameters, gradients and AdamW state shrink
    target = Hardware(name="small", label="a host between 2 and 4 ranks' needs", memory_bytes=(peaks[2] + peaks[4]) // 2,
                      bandwidth_bytes_s=None, caching_allocator=False, context_bytes=0)
    predict = command.Predictor(tmp_path, {}, echo=lambda line: None)

    def make(world):
        return _sharded(base, world) if world > 1 else base

    assert command.fewest_gpus(predict, make, target, start=1) == (4, "fits")
    tight = Hardware(name="tight", label="smaller than any rank's activations", memory_bytes=peaks[8] // 2,
                     bandwidth_bytes_s=None, caching_allocator=False, context_bytes=0)
    n, why = command.fewest_gpus(predict, make, tight, start=1)
    assert n is None and "more GPUs do not help" in why
    assert "(fitted on 2 and 4 GPUs)" in why  # not on 1: one GPU runs unsharded, off the sharded ranks' line


def test_predict_layout_bad_input_is_one_line(tmp_path, capsys):
    for args, message in ((["--world-size", "3", "--fsdp", "2"], "world-size 3: --fsdp 2 does not divide the world"),
                          (["--world-size", "0"], "world-size: must be >= 1"),
                          (["--world-size", "2", "--fsdp", "1"], "pass --context-parallel ulysses|ring"),
                          (["--world-size", "2", "--context-parallel", "ring"], "context-parallel: predict models "
                                                                                 "FSDP layouts; pass --fsdp F")):
        assert main(["predict", "--arch", "dit-full", "--mode", "full", "--resolution", "64", "--frames", "8",
                     *args, "--out", str(tmp_path / "x")]) == 2, args
        err = capsys.readouterr().err.strip()
        assert err.startswith("stbench: error: ") and message in err and "\n" not in err, (args, err)
    assert not (tmp_path / "x").exists()


def test_report_labels_a_predicted_layout_per_rank(tmp_path, toy_case):
    from stbench.report.render import render_report

    record = estimate.predict_case(_sharded(toy_case(mode="full"), 2), hardware.get("h100-sxm"), world=2)
    results.append_record(tmp_path / runfolder.RESULTS_FILE, record)
    html = render_report(tmp_path).read_text()
    assert "2 ranks: fsdp 2" in html and "per rank; communication" in html
    assert "every rank holds the same shapes" in html
