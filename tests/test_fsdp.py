"""FSDP2 (x context parallelism) on CPU, gloo: equivalence with one process, exact shard and collective bytes."""
from __future__ import annotations

import copy
import functools

import pytest
import torch

from stbench.measure import activations, memory
from stbench.parallel import fsdp as fsdp_lib
from stbench.parallel.context_parallel import analytic_bytes
from tests.test_distributed import MODEL_TOL, ranks_once, run_ranks

# (arch, mode, fsdp degree, context parallel, activation checkpointing): dit-full full trains everything; the
# others keep frozen (spatial) parameters inside sharded units, which FSDP2 must leave out of the reduce-scatter
WORLD2 = (("dit-full", "full", 2, None, "blocks"), ("dit-full", "temporal", 1, "ring", "none"),
          ("serial-unet", "temporal", 2, None, "spatial"), ("mobius-ladder-unet", "temporal", 2, None, "none"))
WORLD4 = (("dit-full", "full", 2, "ulysses", "none"),)  # a 2 x 2 mesh: both dimensions in use
# diffusers' Wan (tiny, 9 frames at 64 px: 48 tokens): FSDP alone, and FSDP 1 x each context-parallel mode
WAN2 = (("wan", "full", 2, None, "none"), ("wan", "full", 1, "ring", "none"), ("wan", "full", 1, "ulysses", "none"),
        ("wan", "full", 1, "ulysses", "blocks"))  # checkpointed blocks: their token hook must shard once
SHAPES = {"dit-full": (8, 64), "wan": (9, 64)}  # (frames, resolution) of the equivalence steps; UNets: (2, 32)
# what context parallelism moves per layer and at the end: (layers, heads, head_dim, tokens, gathered channels);
# dit-full tiny gathers its hidden states (64) before the final layer, wan tiny its output projection (16 x 2 x 2)
CP_SHAPES = {"dit-full": (2, 2, 32, 128, 64), "wan": (2, 2, 32, 48, 64)}


def _batch(model, seeds, frames, resolution, dtype=torch.float64):
    from architectures.base import VideoBatch

    parts = [model.make_batch(1, frames, resolution, resolution, dtype=dtype, seed=s) for s in seeds]
    return VideoBatch(*(torch.cat([getattr(p, f) for p in parts]) for f in ("latents", "noise", "timesteps",
                                                                             "text")))


def _units(model, units):
    """Parameters of each FSDP unit, the root's own last, with their shapes and which of them train."""
    unit_params = [list(u.parameters()) for u in units]
    in_units = {id(p) for ps in unit_params for p in ps}
    unit_params.append([p for p in model.parameters() if id(p) not in in_units])  # the root's own
    return (unit_params, [[p.shape for p in ps] for ps in unit_params],
            [[p.requires_grad for p in ps] for ps in unit_params])


def _fsdp_equivalence(layouts, rank, world):
    """A sharded training step next to a one-process copy on the global batch, on every rank."""
    import torch.distributed as dist

    import architectures
    from stbench.fsdp import _broadcast_from_rank0
    from stbench.parallel import make_context_parallel

    summary = {}
    for arch, mode, degree, cp_mode, checkpointing in layouts:
        frames, resolution = SHAPES.get(arch, (2, 32))
        layout = fsdp_lib.FSDPLayout(fsdp=degree, cp=world // degree, activation_checkpointing=checkpointing)
        mesh = fsdp_lib.build_mesh(layout, "cpu")
        torch.manual_seed(0)
        model = architectures.build(arch, "tiny").double().set_training_mode(mode)
        _broadcast_from_rank0(model)
        reference = copy.deepcopy(model)
        names = [n for n, _ in model.named_parameters()]
        dp = mesh.get_local_rank("fsdp")
        cp = make_context_parallel(cp_mode, mesh.get_group("cp")) if layout.cp > 1 else None
        units = fsdp_lib.apply_fsdp(model, mesh, layout, cp)
        # the step: sharded forward + backward (reduce-scatter) under the counter
        with fsdp_lib.CollectiveCounter() as counter:
            loss = model.loss(_batch(model, [dp], frames, resolution))
            loss.backward()
        ref_loss = reference.loss(_batch(reference, range(degree), frames, resolution))
        ref_loss.backward()
        mean_loss = loss.detach().clone()
        dist.all_reduce(mean_loss)
        torch.testing.assert_close(mean_loss / world, ref_loss.detach(), **MODEL_TOL)
        params = dict(model.named_parameters())
        for name, p_ref in zip(names, reference.parameters()):
            p = params[name]
            if p_ref.grad is None:
                assert p.grad is None, f"{arch} {name}: a frozen parameter got a gradient"
                continue
            torch.testing.assert_close(p.grad.full_tensor(), p_ref.grad, **MODEL_TOL, msg=lambda m: f"{arch} {name}: {m}")
        # bytes: this rank's shards and what each collective sent, against the analytic counts
        unit_params, shapes, trains = _units(model, units)
        trainable = [p for p in model.parameters() if p.requires_grad]
        summary[f"{arch}/{mode}/{degree}/{cp_mode}/{checkpointing}"] = {
            "sent": counter.bytes_by_kind,
            # the ladder runs its frozen image UNet without autograd: those units are not gathered in backward
            "analytic": fsdp_lib.analytic_fsdp_bytes(shapes, trains, world, element_size=8, in_backward=[
                any(t) or arch != "mobius-ladder-unet" for t in trains]),
            "param_bytes": memory.tensor_bytes(model.parameters()),
            "padded_param_bytes": 8 * sum(fsdp_lib.padded_shard_numel(p.shape, world) for p in model.parameters()),
            # gradients are shards of the parameters' layout (they live in FSDP's flat reduce-scatter buffers)
            "grads_sharded": all(p.grad.to_local().shape == p.to_local().shape for p in trainable),
            "grad_bytes": memory.tensor_bytes(trainable),
            # AdamW's moments are zeros_like the unpadded local part: no padding, nothing on an empty part
            "unpadded_grad_bytes": 8 * sum(p.to_local().numel() for p in trainable),
            "padded_grad_bytes": 8 * sum(fsdp_lib.padded_shard_numel(p.shape, world) for p in trainable),
            "total_param_bytes": 8 * sum(p.numel() for p in reference.parameters()),
            # at most W-1 padding rows per parameter (Wan's (1, 6, C) modulation tables: one row of 6 C)
            "padding_bound": 8 * (world - 1) * sum(p.numel() // max(p.shape[0], 1) if p.dim() else 1
                                                   for p in reference.parameters()),
            "frozen_unit_gather_bytes": [8 * (world - 1) * sum(fsdp_lib.padded_shard_numel(p.shape, world) for p in ps)
                                         for ps in unit_params[:-1] if not any(p.requires_grad for p in ps)],
            "cp": layout.cp,
            "checkpointing": checkpointing,
            "cp_mode": cp_mode,
            "cp_sent": cp.counter.bytes_by_kind if cp is not None else {},
        }
        if layout.cp == 1 and checkpointing == "none":  # one rank's batch: the activations one process saves
            def forward(m):
                return lambda: m.loss(_batch(m, [dp], frames, resolution))
            summary[f"{arch}/{mode}/{degree}/{cp_mode}/{checkpointing}"]["saved"] = (
                activations.saved_activation_bytes(model, forward(model)),
                activations.saved_activation_bytes(reference, forward(reference)))
        # AdamW's state is sharded with the parameters: two moments of the local shard, plus a step count each
        optimizer = torch.optim.AdamW(trainable)
        optimizer.step()
        summary[f"{arch}/{mode}/{degree}/{cp_mode}/{checkpointing}"]["optimizer_bytes"] = memory.tensor_bytes(
            v for s in optimizer.state.values() for v in s.values() if isinstance(v, torch.Tensor))
        summary[f"{arch}/{mode}/{degree}/{cp_mode}/{checkpointing}"]["step_bytes"] = sum(
            s["step"].numel() * s["step"].element_size() for s in optimizer.state.values())
    return summary


def _check_bytes(results, world):
    for key in results[0]:
        everyone = [r[key] for r in results]
        for r in everyone:
            # sharded: one padded shard (ceil(dim0 / W) rows) of every parameter and gradient, AdamW's moments of
            # the unpadded part
            assert r["param_bytes"] == r["padded_param_bytes"], key
            assert r["grads_sharded"] and r["grad_bytes"] == r["padded_grad_bytes"], key
            assert r["optimizer_bytes"] == 2 * r["unpadded_grad_bytes"] + r["step_bytes"], key
            # the padding is all that separates world x a shard from the whole
            assert r["padded_param_bytes"] * world >= r["total_param_bytes"]
            assert r["padded_param_bytes"] * world - r["total_param_bytes"] <= r["padding_bound"], key
            expected = dict(r["analytic"])
            cp = r["cp"]
            if cp > 1:  # ulysses: q, k, v, o all-to-all; ring: key/value hops point-to-point; both gather tokens
                expected["all_to_all" if r["cp_mode"] == "ulysses" else "point_to_point"] = r["cp_sent"]["attention"]
                expected["all_gather"] += r["cp_sent"]["tokens"]
                layers, heads, head_dim, tokens, gathered = CP_SHAPES[key.split("/")[0]]  # fp64, batch 1
                shape = dict(batch=1, heads=heads, tokens=tokens, head_dim=head_dim, world=cp, element_size=8)
                # checkpointed blocks run their attention forward again in backward: its exchange once more
                again = analytic_bytes(r["cp_mode"], **shape, backward=False) if r["checkpointing"] == "blocks" else 0
                assert r["cp_sent"]["attention"] == layers * (analytic_bytes(r["cp_mode"], **shape) + again), key
                # (W-1) x a (1, n, gathered) shard
                assert r["cp_sent"]["tokens"] == (cp - 1) * 1 * (tokens // cp) * gathered * 8, key
            if key.startswith("mobius-ladder-unet"):
                # FSDP2 prefetches, in backward, the unit before the earliest one backward runs through: here the
                # last unit of the frozen image pass, which backward never enters: one extra gather of it
                extra = r["sent"]["all_gather"] - expected["all_gather"]
                assert extra in r["frozen_unit_gather_bytes"], key
                expected["all_gather"] += extra
            if "saved" in r:  # FSDP's gathered weights are parameters, freed after forward: not activations
                assert r["saved"][0] == r["saved"][1], (key, r["saved"])
            # one rank: FSDP2 issues no collective at all (the analytic count is zero bytes)
            assert r["sent"] == {kind: sent for kind, sent in expected.items() if sent or world > 1}, key


@pytest.fixture(scope="module")
def two_ranks(tmp_path_factory):
    """The 2-rank equivalences (the DiT and UNets, Wan, mixed precision) on one start of the ranks."""
    return ranks_once({"world2": functools.partial(_fsdp_equivalence, WORLD2),
                       "wan2": functools.partial(_fsdp_equivalence, WAN2), "mixed": _mixed_precision},
                      tmp_path_factory.mktemp("two_ranks"), world=2)


@pytest.mark.slow
def test_fsdp_and_fsdp_x_ring_step_equal_one_process(two_ranks):
    _check_bytes(two_ranks["world2"], 2)


@pytest.mark.slow
def test_wan_under_fsdp_and_fsdp_x_ring_and_ulysses_equals_one_process(two_ranks):
    """diffusers' Wan: loss and every gathered gradient equal one process; bytes equal the analytic count."""
    _check_bytes(two_ranks["wan2"], 2)


@pytest.mark.slow
def test_fsdp_on_one_rank_is_the_plain_step(tmp_path):
    """World size 1 (what `torchrun --nproc-per-node 1 ... --fsdp 1` builds): the plain step, no bytes sent."""
    results = run_ranks(functools.partial(_fsdp_equivalence, (("wan", "full", 1, None, "none"),)), tmp_path, world=1)
    _check_bytes(results, 1)
    assert results[0]["wan/full/1/None/none"]["sent"] == {}


def _mixed_precision(rank, world):
    """Wan tiny (fp32) under FSDP 2 with bf16 parameters and fp32 reduction next to the fp32 one-process step."""
    import torch.distributed as dist

    import architectures
    from stbench.fsdp import _broadcast_from_rank0

    frames, resolution = SHAPES["wan"]
    layout = fsdp_lib.FSDPLayout(fsdp=world, mixed_precision=True)
    mesh = fsdp_lib.build_mesh(layout, "cpu")
    torch.manual_seed(0)
    model = architectures.build("wan", "tiny").set_training_mode("full")
    _broadcast_from_rank0(model)
    reference = copy.deepcopy(model)
    names = [n for n, _ in model.named_parameters()]
    _, shapes, trains = _units(model, fsdp_lib.apply_fsdp(model, mesh, layout))
    with fsdp_lib.CollectiveCounter() as counter:
        loss = model.loss(_batch(model, [rank], frames, resolution, torch.float32))
        loss.backward()
    ref_loss = reference.loss(_batch(reference, range(world), frames, resolution, torch.float32))
    ref_loss.backward()
    mean_loss = loss.detach().clone()
    dist.all_reduce(mean_loss)
    params = dict(model.named_parameters())
    errors = {}  # per parameter: |g - g_ref| / |g_ref| (norms over the whole tensor)
    for name, p_ref in zip(names, reference.parameters()):
        g = params[name].grad.full_tensor()
        errors[name] = [float((g - p_ref.grad).norm() / p_ref.grad.norm().clamp_min(1e-30)), str(g.dtype)]
    return {"loss": float(mean_loss / world), "ref_loss": float(ref_loss), "errors": errors,
            "sent": counter.bytes_by_kind, "analytic": fsdp_lib.analytic_fsdp_bytes(
                shapes, trains, world, element_size=4, param_element_size=2)}


@pytest.mark.slow
def test_mixed_precision_step_is_close_to_the_fp32_step(two_ranks):
    """bf16 parameters, fp32 reduction: loss and gradients within bf16's error of the fp32 step.

    bf16 keeps 8 significant bits (unit roundoff 2^-9 = 2e-3). The loss is a mean over 3072 squared errors, so
    its rounding errors average out: within one roundoff (2e-3; measured 5e-5). Gradients are rounded at every
    matmul of forward and backward and errors of a few roundoffs per op add up; a gradient that is nearly zero
    in exact arithmetic (the key biases: softmax ignores a shift of every key) keeps a relatively large error:
    each parameter's gradient within 10% of its fp32 norm (measured: mean 0.9%, largest 3.1%, attn2.to_k.bias).
    A bug (a missing reduction, a wrong scale, an unsynchronised shard) is off by 50% or more."""
    (r0, r1) = two_ranks["mixed"]
    assert r0["loss"] == r1["loss"]
    assert r0["loss"] == pytest.approx(r0["ref_loss"], rel=2e-3)
    for name, (error, dtype) in r0["errors"].items():
        assert dtype == "torch.float32", name  # reduced and kept in fp32
        assert error < 0.1, (name, error)
    # the all-gather moves bf16 parameters, the reduce-scatter fp32 gradients
    assert r0["sent"] == r1["sent"] == r0["analytic"]


@pytest.mark.slow
def test_fsdp_x_ulysses_on_a_2x2_mesh_equals_one_process(tmp_path):
    results = run_ranks(functools.partial(_fsdp_equivalence, WORLD4), tmp_path, world=4)
    _check_bytes(results, 4)


def test_analytic_fsdp_bytes_by_hand():
    # one unit of a (3, 4) weight and a (3,) bias, the root with a (5,) vector, over 2 ranks, fp32:
    # shards of 2x4 + 2 = 10 and 3 elements; the unit is gathered twice (forward, backward), the root once
    shapes = [[torch.Size([3, 4]), torch.Size([3])], [torch.Size([5])]]
    sent = fsdp_lib.analytic_fsdp_bytes(shapes, [[True, False], [True]], 2)
    assert sent == {"all_gather": 4 * (2 * 10 + 3), "reduce_scatter": 4 * (8 + 3)}
    assert fsdp_lib.analytic_fsdp_bytes(shapes, [[True, False], [True]], 2, reshard_after_forward=False) == {
        "all_gather": 4 * (10 + 3), "reduce_scatter": 4 * (8 + 3)}


def test_default_fsdp_units_are_the_repeated_blocks():
    import architectures

    dit = architectures.build("dit-full", "tiny")
    assert dit.fsdp_units() == list(dit.blocks)
    unet = architectures.build("serial-unet", "tiny")
    assert unet.fsdp_units()[:len(unet.unet.down_blocks)] == list(unet.unet.down_blocks)
    # Mobius calls the blocks' parts, not the blocks: its units are those parts
    mobius = architectures.build("mobius-unet", "tiny")
    assert mobius.unet.down_blocks[0].resnets[0] in mobius.fsdp_units()
    assert mobius.unet.down_blocks[0] not in mobius.fsdp_units()


def test_fsdp_needs_torchrun_and_its_settings_need_fsdp(capsys):
    from stbench.cli import main

    assert main(["run", "--arch", "dit-full", "--device", "cpu", "--fsdp", "2", "--out", "/nonexistent/x"]) == 2
    assert "stbench: error: --fsdp: needs several processes" in capsys.readouterr().err
    # (--activation-checkpointing runs on one process too: tests/test_regimes.py)
    assert main(["run", "--arch", "dit-full", "--device", "cpu", "--fsdp-mixed-precision"]) == 2
    assert "stbench: error: fsdp_mixed_precision: only with --fsdp N" in capsys.readouterr().err


def _launch(tmp_path, world, args, extra_env=None, fixture=None):
    import os
    import subprocess
    import sys
    from pathlib import Path

    from tests.test_distributed import _free_port

    port, procs = _free_port(), []
    for rank in range(world):
        env = {**os.environ, "RANK": str(rank), "LOCAL_RANK": str(rank), "WORLD_SIZE": str(world),
               "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(port), "OMP_NUM_THREADS": "1", **(extra_env or {})}
        head = [str(Path(__file__).parent / "fixtures" / fixture)] if fixture else ["-m", "stbench"]
        procs.append(subprocess.Popen([sys.executable, *head, "run", *args, "--out", str(tmp_path / "run")],
                                      env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True))
    errs = [p.communicate(timeout=180)[1] for p in procs]
    return [p.returncode for p in procs], errs


@pytest.mark.slow
def test_run_records_mesh_shards_and_collective_bytes(tmp_path):
    """`stbench run --fsdp 2 --fsdp-mixed-precision --activation-checkpointing blocks` on 2 processes: the record
    names its layout, and FSDP's bytes equal the analytic count (bf16 all-gather, fp32 reduce-scatter)."""
    import architectures
    from stbench import results

    codes, errs = _launch(tmp_path, 2, ["--arch", "dit-full", "--device", "cpu", "--repeats", "2", "--fsdp", "2",
                                        "--fsdp-mixed-precision", "--activation-checkpointing", "blocks",
                                        "--no-progress"])
    assert codes == [0, 0], errs
    (r,) = results.read_records(tmp_path / "run")
    assert r["status"] == "ok" and r["mesh"] == {"fsdp": 2, "cp": 1, "shard_over": "fsdp x cp"}
    assert (r["fsdp"], r["activation_checkpointing"], r["fsdp_reshard_after_forward"], r["fsdp_mixed_precision"]) \
        == (2, "blocks", True, True)
    model = architectures.build("dit-full", "tiny").set_training_mode("temporal")
    units = [list(u.parameters()) for u in model.fsdp_units()]
    in_units = {id(p) for ps in units for p in ps}
    units.append([p for p in model.parameters() if id(p) not in in_units])
    expected = fsdp_lib.analytic_fsdp_bytes([[p.shape for p in ps] for ps in units],
                                            [[p.requires_grad for p in ps] for ps in units], 2,
                                            element_size=4, param_element_size=2)
    assert r["comm_bytes_by_collective"] == expected
    assert r["comm_bytes"] == sum(expected.values()) and r["rank_comm_bytes"] == [r["comm_bytes"]] * 2
    padded = 4 * sum(fsdp_lib.padded_shard_numel(p.shape, 2) for p in model.parameters())
    assert r["rank_param_bytes"] == [padded, padded] and len(r["rank_host_peak_bytes"]) == 2


@pytest.mark.slow
def test_out_of_memory_on_any_rank_makes_the_case_oom_and_ends_every_rank(tmp_path):
    from stbench import results

    codes, errs = _launch(tmp_path, 2, ["--arch", "dit-full", "--device", "cpu", "--repeats", "2", "--fsdp", "2",
                                        "--no-progress"],
                          {"STBENCH_TEST_OOM_RANK": "1", "STBENCH_DIST_TIMEOUT": "20"}, fixture="oom_fsdp_rank.py")
    assert all(code != 0 for code in codes), errs
    for err in errs:  # one line on every rank names the failing rank and the error
        assert "stbench: error: rank 1 failed in case dit-full-tiny" in err and "[out of memory]" in err, err
    (record,) = results.read_records(tmp_path / "run")
    assert record["status"] == "oom" and record["fsdp"] == 2 and record["world_size"] == 2


def _predicted(args: list[str], tmp_path) -> dict:
    from stbench import results
    from stbench.cli import main

    assert main(["predict", "--preset", "tiny", *args, "--out", str(tmp_path / "predicted")]) == 0
    (record,) = results.read_records(tmp_path / "predicted")
    return record


@pytest.mark.slow
def test_predicted_rank_matches_the_gloo_run_bytes_exactly_and_host_peak_within_25_percent(tmp_path):
    """`stbench predict --world-size 2 --fsdp 2 --hardware cpu` (one rank in a fake process group) against the
    same layout run on 2 gloo processes: shards, saved activations and every collective's bytes exact, the peak
    within 25% of each rank's measured host_peak_bytes (dit-full 256 px x 8 frames: activations dominate, as at
    full size)."""
    from stbench import results

    shape = ["--arch", "dit-full", "--mode", "full", "--resolution", "256", "--frames", "8", "--fsdp", "2"]
    codes, errs = _launch(tmp_path, 2, [*shape, "--device", "cpu", "--repeats", "2", "--no-progress"],
                          extra_env={"MALLOC_MMAP_THRESHOLD_": "131072"})  # as test_predict's CPU validation
    assert codes == [0, 0], errs
    (measured,) = results.read_records(tmp_path / "run")
    predicted = _predicted([*shape, "--world-size", "2", "--hardware", "cpu"], tmp_path)
    assert predicted["status"] == "ok" and predicted["world_size"] == 2 and predicted["mesh"] == measured["mesh"]
    for name in ("param_bytes", "grad_bytes", "optimizer_bytes", "comm_bytes", "comm_bytes_by_collective",
                 "rank_param_bytes", "rank_grad_bytes", "rank_optimizer_bytes", "saved_activations"):
        assert predicted[name] == measured[name], name
    peak = predicted["predicted"]["rank_peak_bytes"]
    for rank, host_peak in enumerate(measured["rank_host_peak_bytes"]):
        assert abs(peak[rank] - host_peak) <= 0.25 * host_peak, (rank, peak[rank], host_peak)
    assert any("rank 0 of 2 traced in a fake process group" in w for w in predicted["warnings"])


def test_predicted_ring_layout_sends_what_the_gloo_run_sent(tmp_path):
    """wan tiny, fsdp 1 x ring 2 (world 2) and fsdp 2 x ring 2 (world 4): the predicted rank's bytes per
    collective equal those of the committed gloo runs (reports/cpu/fsdp/wan-w*-ring, fp32)."""
    import json
    from pathlib import Path

    root = Path(__file__).resolve().parents[1] / "reports" / "cpu" / "fsdp"
    for world, folder in ((2, "wan-w2-fsdp1-ring"), (4, "wan-w4-fsdp2-ring")):
        measured = [json.loads(line) for line in (root / folder / "results.jsonl").read_text().splitlines()][-1]
        predicted = _predicted(["--arch", "wan", "--mode", "full", "--resolution", "64", "--frames", "29",
                                "--world-size", str(world), "--fsdp", str(world // 2), "--context-parallel", "ring",
                                "--hardware", "cpu"], tmp_path / str(world))
        assert predicted["mesh"] == measured["mesh"] == {"fsdp": world // 2, "cp": 2, "shard_over": "fsdp x cp"}
        for name in ("comm_bytes", "comm_bytes_by_collective", "param_bytes", "grad_bytes", "optimizer_bytes"):
            assert predicted[name] == measured[name], (world, name)


@pytest.mark.slow
def test_context_parallel_record_counts_only_the_timed_steps(tmp_path):
    """`comm_bytes_by_kind` is per timed step, like `comm_bytes`: the passes after timing (host peak, stats,
    FLOPs) send bytes too, and must not be in it (every step of a dense layer sends the same bytes)."""
    from stbench import results

    codes, errs = _launch(tmp_path, 2, ["--arch", "dit-full", "--device", "cpu", "--repeats", "3",
                                        "--context-parallel", "ulysses", "--no-progress"])
    assert codes == [0, 0], errs
    (r,) = results.read_records(tmp_path / "run")
    assert r["status"] == "ok" and r["comm_bytes"] > 0
    assert sum(r["comm_bytes_by_kind"].values()) == r["comm_bytes"]
