"""Training regimes (issue 21): LoRA, bf16 parameters, 8-bit AdamW, checkpointing on one process; predicted
parameter/gradient/optimizer bytes equal run's and a hand count; old records keep their keys; bad input."""
from __future__ import annotations

import json

import pytest
import torch

from stbench import regimes, results
from stbench.cli import main
from stbench.config import Case
from stbench.measure import memory
from stbench.measure.activations import saved_activation_bytes
from stbench.predict.fake import trace_step
from stbench.step import TrainingStep

WAN = dict(arch="wan", mode="full", frames=1, resolution=32)  # tiny Wan: 2 blocks of width 64, 4 tokens
DIT = dict(arch="dit-full", mode="full", frames=2, resolution=32)


def run_bytes(case: Case) -> tuple[int, int, int, int]:
    """(trainable parameters, param, grad, optimizer bytes) of `run`'s real step, after two steps."""
    step = TrainingStep(case)
    step()
    step()
    return (sum(p.numel() for p in step.trainable), memory.param_bytes(step.model), memory.grad_bytes(step.trainable),
            memory.optimizer_bytes(step.optimizer))


def predicted_bytes(case: Case) -> tuple[int, int, int, int]:
    trace = trace_step(case)
    return trace.params_trainable, trace.param_bytes, trace.grad_bytes, trace.optimizer_bytes


def base_model(case: Case):
    """The case's model with its default regime (no adapters, fp32), on meta: the hand counts read its shapes."""
    model = Case(**{**WAN, **{k: getattr(case, k) for k in ("arch", "mode", "frames", "resolution")}}).build_model(
        "meta")
    model.set_training_mode(case.mode)
    return model


# --- LoRA -------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("shape,targets", [(WAN, ("to_q", "to_k", "to_v", "to_out.0")),
                                           (DIT, ("qkv", "q", "kv", "out"))])
def test_lora_bytes_predicted_equal_run_and_hand_count(shape, targets):
    rank = 4
    case = Case(**shape, lora=rank)
    assert case.lora_targets == targets  # the family's default
    model = base_model(case)
    adapted = [m for n, m in model.named_modules() if isinstance(m, torch.nn.Linear)
               and any(n == t or n.endswith("." + t) for t in targets)]
    lora = sum(rank * (m.in_features + m.out_features) for m in adapted)  # A: r x in, B: out x r
    total = sum(p.numel() for p in model.parameters()) + lora
    steps = len(adapted) * 2  # AdamW's fp32 `step` tensor per adapter matrix
    hand = (lora, 4 * total, 4 * lora, 2 * 4 * lora + 4 * steps)
    assert run_bytes(case) == predicted_bytes(case) == hand


def test_lora_trains_only_the_adapters_and_is_in_the_record():
    case = Case(**WAN, lora=2, lora_targets=("to_q", "to_v"))
    step = TrainingStep(case)
    step.forward_backward()
    named = dict(step.model.named_parameters())
    adapters = {n for n in named if ".lora_A." in n or ".lora_B." in n}
    assert adapters and all(n.rsplit(".", 3)[0].endswith(("to_q", "to_v")) for n in adapters)
    for name, p in named.items():
        assert (p.grad is not None) == (name in adapters), name  # the base: no gradient at all
    assert case.identity()["lora"] == {"rank": 2, "targets": ["to_q", "to_v"]}
    assert "lora2=to_q_to_v" in case.slug  # "+" is not file-name safe


def test_lora_loss_falls_in_stbench_train(tmp_path):
    out = tmp_path / "train"
    assert main(["train", "--arch", "wan", "--mode", "full", "--lora", "8", "--frames", "5", "--resolution",
                 "32", "--steps", "30", "--eval-every", "30", "--heldout", "2", "--lr", "3e-3", "--no-progress",
                 "--out", str(out)]) == 0
    [record] = results.read_records(out)
    assert record["status"] == "ok" and record["lora"]["rank"] == 8
    evals = record["train"]["eval"]
    assert evals[-1][1] < evals[0][1]  # held-out loss at the end below the one at step 0
    settings = json.loads((out / "run.json").read_text())["sweep"]
    assert settings["lora"] == 8 and settings["param_dtype"] == "fp32" and settings["optimizer"] == "adamw"


# --- bf16 parameters, 8-bit AdamW ------------------------------------------------------------------------

def test_bf16_params_grads_and_state_predicted_equal_run_and_hand_count():
    case = Case(**WAN, dtype="bf16", param_dtype="bf16")
    model = base_model(case)
    n, tensors = sum(p.numel() for p in model.parameters()), len(list(model.parameters()))
    hand = (n, 2 * n, 2 * n, 2 * 2 * n + 4 * tensors)  # bf16 moments; AdamW's `step` stays an fp32 scalar
    assert run_bytes(case) == predicted_bytes(case) == hand


def test_adamw8bit_count_matches_bitsandbytes_state():
    """regimes.adamw8bit_state_bytes against bitsandbytes' own state after a real step (CPU), on parameters
    either side of min_8bit_size and of a block boundary."""
    import bitsandbytes as bnb

    shapes = [(4095,), (64, 64), (4097,), (300, 257), (7,)]
    params = [torch.nn.Parameter(torch.randn(s)) for s in shapes]
    optimizer = bnb.optim.AdamW8bit(params, lr=1e-3)
    for p in params:
        p.grad = torch.randn_like(p)
    optimizer.step()
    counted = regimes.adamw8bit_state_bytes(p.numel() for p in params)
    assert memory.optimizer_bytes(optimizer) == counted
    big = [n for n in (p.numel() for p in params) if n >= 4096]
    assert counted == (8 * (4095 + 7) + sum(2 * n + 8 * -(-n // 256) for n in big) + 2 * 256 * 4)
    assert all(isinstance(s["step"], int) for s in optimizer.state.values())  # no tensor behind `step`


@pytest.mark.parametrize("param_dtype", ["fp32"])  # bf16 weights with 8-bit state: test_run_and_predict_record_...
def test_adamw8bit_predicted_equals_run_and_count(param_dtype):
    case = Case(**WAN, dtype="bf16", param_dtype=param_dtype, optimizer="adamw8bit")
    model = base_model(case)
    n = sum(p.numel() for p in model.parameters())
    size = 2 if param_dtype == "bf16" else 4
    hand = (n, size * n, size * n, regimes.adamw8bit_state_bytes(p.numel() for p in model.parameters()))
    assert run_bytes(case) == predicted_bytes(case) == hand
    assert any("adamw8bit" in w for w in trace_step(case).warnings)


# --- resident encoders ---------------------------------------------------------------------------------

def test_resident_encoders_bytes_predicted_equal_run_and_hand_count():
    """The frozen bf16 text encoder and VAE count in param_bytes only (no gradient, no optimizer state); with
    LoRA the adapters alone train."""
    from architectures.encoders import resident_parameters
    from stbench.measure.sequence import model_sizes

    case = Case(arch="cogvideox", mode="full", frames=9, resolution=32, encoders="resident", lora=2)
    step = TrainingStep(case)
    step()
    step()
    record = {}
    model_sizes(record, step)
    run = (record["params_trainable"], record["param_bytes"], record["grad_bytes"],
           memory.optimizer_bytes(step.optimizer))
    model = Case(arch="cogvideox", mode="full", frames=9, resolution=32).build_model("meta")
    lora = sum(2 * (m.in_features + m.out_features) for n, m in model.named_modules()
               if isinstance(m, torch.nn.Linear) and n.endswith(("to_q", "to_k", "to_v", "to_out.0")))
    base = sum(p.numel() for p in model.parameters())
    encoders = resident_parameters(model)
    assert encoders > 0 and all(p.dtype == torch.bfloat16 and not p.requires_grad for p in step.encoders.parameters())
    hand = (lora, 4 * (base + lora) + 2 * encoders, 4 * lora, 8 * lora + 4 * len(list(step.trainable)))
    assert run == predicted_bytes(case) == hand


def test_resident_encoders_refused_for_a_family_without_them(capsys, tmp_path):
    assert main(["predict", "--arch", "dit-full", "--encoders", "resident", "--out", str(tmp_path / "o")]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("stbench: error: encoders: ") and "\n" not in err


# --- activation checkpointing on one process ---------------------------------------------------------

UNET = dict(arch="serial-unet", mode="temporal", frames=2, resolution=32)


# spatial on a UNet: its blocks hold their spatial layers in ModuleLists, whose members are what is recomputed
@pytest.mark.parametrize("shape,mode", [(DIT, "blocks"), (UNET, "spatial")], ids=["dit-blocks", "unet-spatial"])
def test_checkpointing_on_one_process_same_loss_and_gradients_fewer_saved_bytes(shape, mode):
    losses, grads, saved = {}, {}, {}
    for ac in (None, mode):
        step = TrainingStep(Case(**shape, activation_checkpointing=ac))
        saved[ac] = saved_activation_bytes(step.model, lambda: step.compute_loss(eager=True))
        step.model.zero_grad(set_to_none=True)
        losses[ac] = step.forward_backward()
        grads[ac] = {n: p.grad for n, p in step.model.named_parameters()}
    assert torch.equal(losses[None], losses[mode])
    for name, g in grads[None].items():
        assert (g is None and grads[mode][name] is None) or torch.equal(g, grads[mode][name]), name
    assert saved[mode] < saved[None]
    fake = {ac: trace_step(Case(**shape, activation_checkpointing=ac)).saved_activations for ac in (None, mode)}
    assert fake[mode] < fake[None]


def test_none_on_one_process_keeps_the_key_and_checkpointing_changes_it():
    plain = Case(**WAN)
    assert Case(**WAN, activation_checkpointing="none") == plain
    assert Case(**WAN, activation_checkpointing="blocks").key != plain.key


# --- record identity: old records keep their keys ----------------------------------------------------

def test_records_written_before_the_regimes_keep_their_keys():
    case = Case(**WAN)
    new = results.new_record(case.identity())
    old = {k: v for k, v in new.items() if k not in ("lora", "param_dtype", "optimizer", "encoders")}
    assert results.case_key(old) == results.case_key(new) == case.key
    assert all(name not in case.key for name in ("lora", "param_dtype", "optimizer", "encoders"))
    keys = {Case(**WAN, lora=2).key, Case(**WAN, dtype="bf16", param_dtype="bf16").key,
            Case(**WAN, optimizer="adamw8bit").key, case.key, Case(**WAN, dtype="bf16").key}
    assert len(keys) == 5


def test_old_record_reads_as_the_default_regime(tmp_path):
    record = results.new_record(Case(**WAN).identity())
    for name in ("lora", "param_dtype", "optimizer", "encoders"):
        record.pop(name)
    record["status"] = "ok"
    path = tmp_path / "results.jsonl"
    results.append_record(path, record)
    [read] = results.read_records(path)
    assert (read["lora"], read["param_dtype"], read["optimizer"], read["encoders"]) == (
        None, "fp32", "adamw", "precomputed")
    results.check_records(path, [read])


# --- bad input: one line, exit 2 -----------------------------------------------------------------------

@pytest.mark.parametrize("flags,message", [
    (["--lora", "0"], "stbench: error: lora: the rank must be an integer >= 1, got 0"),
    (["--lora", "4", "--lora-targets", "to_q,nope"],
     "stbench: error: lora-targets: 'nope' matches no module of wan; its linear layers are named linear_1, "
     "linear_2, net.2, proj, proj_out, time_proj, to_k, to_out.0, to_q, to_v"),
    (["--lora", "4", "--lora-targets", "patch_embedding"],
     "stbench: error: lora-targets: 'patch_embedding' matches only Conv3d layers, not linear ones of wan"),
    (["--lora-targets", "to_q"], "stbench: error: --lora-targets: only with --lora RANK"),
    (["--optimizer", "adamw8bit", "--fsdp", "2"], "stbench: error: optimizer: adamw8bit is not supported with --fsdp"),
    (["--param-dtype", "bf16", "--dtype", "fp32"],
     "stbench: error: param_dtype: bf16 weights need an autocast --dtype (bf16 or fp16), not fp32"),
])
@pytest.mark.parametrize("command", ["run", "predict"])
def test_bad_regime_input_is_one_line_exit_2(flags, message, command, capsys, tmp_path):
    argv = [command, "--arch", "wan", "--mode", "full", "--frames", "5", "--resolution", "32",
            "--out", str(tmp_path / "out")] + flags
    if command == "run" and "--dtype" not in flags:
        argv += ["--device", "cpu"]
    assert main(argv) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith(message) and "\n" not in err
    assert not (tmp_path / "out").exists()


def test_a_family_without_a_target_of_that_name_is_refused(capsys, tmp_path):
    # to_q is the diffusers families' default; the home-made DiT names its projections qkv / q / kv / out
    assert main(["predict", "--arch", "dit-full", "--lora", "4", "--lora-targets", "to_q",
                 "--out", str(tmp_path / "out")]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("stbench: error: lora-targets: 'to_q' matches no module of dit-full; its linear layers "
                          "are named ") and "qkv" in err


def test_list_shows_default_lora_targets(capsys):
    assert main(["list", "--no-params"]) == 0
    text = capsys.readouterr().out
    assert "to_q,to_k,to_v,to_out.0" in text and "qkv,q,kv,out" in text


# --- the flags reach the records and run.json --------------------------------------------------------------

def test_run_and_predict_record_the_regime(tmp_path):
    flags = ["--arch", "dit-full", "--mode", "full", "--frames", "2", "--resolution", "32", "--dtype", "bf16",
             "--lora", "2", "--param-dtype", "bf16", "--optimizer", "adamw8bit", "--activation-checkpointing",
             "blocks"]
    assert main(["run", *flags, "--device", "cpu", "--repeats", "1", "--no-progress",
                 "--out", str(tmp_path / "run")]) == 0
    assert main(["predict", *flags, "--hardware", "cpu", "--out", str(tmp_path / "predict")]) == 0
    run, = results.read_records(tmp_path / "run")
    predicted, = results.read_records(tmp_path / "predict")
    for record in (run, predicted):
        assert record["status"] == "ok", record["error"]
        assert (record["lora"], record["param_dtype"], record["optimizer"], record["activation_checkpointing"],
                record["fsdp"]) == ({"rank": 2, "targets": ["qkv", "q", "kv", "out"]}, "bf16", "adamw8bit",
                                    "blocks", None)
    for name in ("params_trainable", "param_bytes", "grad_bytes", "optimizer_bytes"):
        assert run[name] == predicted[name], name
    sweep = json.loads((tmp_path / "run" / "run.json").read_text())["sweep"]
    assert (sweep["lora"], sweep["param_dtype"], sweep["optimizer"], sweep["encoders"]) == (
        2, "bf16", "adamw8bit", "precomputed")
    assert results.regime_label(run) == "LoRA r2 on qkv,q,kv,out, bf16 params, adamw8bit, checkpointing blocks"


def test_plan_takes_the_regime_and_names_it_in_the_command(tmp_path, capsys):
    assert main(["plan", "--arch", "dit-full", "--mode", "full", "--frames", "2", "--resolution", "32", "--gpus", "2",
                 "--lora", "2", "--param-dtype", "bf16", "--activation-checkpointing", "none",
                 "--out", str(tmp_path / "plan")]) == 0
    text = capsys.readouterr().out
    assert "run --fsdp 2 --lora 2 --lora-targets qkv,q,kv,out --param-dtype bf16 ..." in text
    records = results.read_records(tmp_path / "plan")
    assert records and all(r["lora"] == {"rank": 2, "targets": ["qkv", "q", "kv", "out"]} for r in records)
