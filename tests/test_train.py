"""Training: the synthetic dataset, `stbench train`, starting weights and checkpoints, spatial checkpointing."""
from __future__ import annotations

import dataclasses
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

import architectures
from stbench import data, results, runfolder, weights
from stbench.cli import main
from stbench.config import Case
from stbench.measure.activations import saved_activation_bytes
from stbench.train import heldout_loss, train_case

REPO = Path(__file__).resolve().parents[1]
UNETS = ("serial-unet", "mobius-unet", "mobius-ladder-unet")
SAME_LOSS_TOLERANCE = 1e-5  # relative: the three UNets compute the same function at zero-init motion modules


# --- dataset ------------------------------------------------------------------------------------------

def test_dataset_is_deterministic_by_seed():
    model = architectures.build("serial-unet", "tiny")
    a = data.MovingShapes(data.DatasetConfig(seed=3, frames=4), model).train_batch(5, 2)
    b = data.MovingShapes(data.DatasetConfig(seed=3, frames=4), model).train_batch(5, 2)
    c = data.MovingShapes(data.DatasetConfig(seed=4, frames=4), model).train_batch(5, 2)
    for field in ("latents", "noise", "timesteps", "text"):
        assert torch.equal(getattr(a, field), getattr(b, field)), field
    assert not torch.equal(a.latents, c.latents) and not torch.equal(a.noise, c.noise)
    assert a.latents.shape == (2, 4, 4, 8, 8) and a.text.shape == (2, model.text_tokens, model.text_dim)


def test_captions_change_the_clips():
    config = data.DatasetConfig(seed=0, frames=6, resolution=32)
    specs = data.sample_shapes(config, "train", 0)
    clip = data.render(specs, config.frames, config.resolution)
    for field, value in (("colour", "blue"), ("direction", "up"), ("size", "small"), ("shape", "square")):
        other = [dataclasses.replace(specs[0], **{field: value if getattr(specs[0], field) != value else
                                                  ("red" if field == "colour" else "down" if field == "direction"
                                                   else "large" if field == "size" else "circle")})] + specs[1:]
        assert data.caption(other) != data.caption(specs)
        assert not torch.equal(data.render(other, config.frames, config.resolution), clip), field
    embed = data.TextEmbedder(77, 32)
    assert not torch.equal(embed(data.caption(specs)), embed(data.caption(other)))
    assert not torch.equal(clip[:, 0], clip[:, -1])  # shapes move


def test_encoder_asks_the_model_for_its_latent_shape():
    class Compressed(architectures.VideoModel):  # a Wan-like VAE: 16 channels, 4x in time, 8x in space
        text_tokens, latent_channels = 8, 16

        @property
        def text_dim(self):
            return 12

        def latent_shape(self, batch, frames, height, width):
            return (batch, 16, frames // 4, height // 8, width // 8)

    batch = data.MovingShapes(data.DatasetConfig(frames=8, resolution=32, heldout=2), Compressed(None)).train_batch(0, 3)
    assert batch.latents.shape == (3, 16, 2, 4, 4) and batch.text.shape == (3, 8, 12)


def test_causal_vae_latents_read_the_first_frame_alone():
    """Wan's 4x causal VAE: 9 frames -> 3 latent frames; the first latent frame depends on frame 0 only."""
    with torch.device("meta"):
        shape = architectures.build("wan", "tiny").latent_shape(1, 9, 32, 32)
    assert shape == (1, 16, 3, 4, 4)
    encoder = data.LatentEncoder(shape, 9, 32, causal=True)
    clips = torch.rand(1, 3, 9, 32, 32)
    changed = clips.clone()
    changed[:, :, 1:] = 0.0  # every frame but the first
    first, other = encoder.encode(clips), encoder.encode(changed)
    assert first.shape == (1, 16, 3, 4, 4)
    torch.testing.assert_close(first[:, :, 0], other[:, :, 0])
    assert not torch.allclose(first[:, :, 1:], other[:, :, 1:])


# --- starting weights, spatial checkpointing -------------------------------------------------------------

def test_spatial_checkpointing_saves_activations_and_keeps_gradients():
    grads, saved = {}, {}
    for on in (False, True):
        torch.manual_seed(0)
        model = architectures.build("serial-unet", "tiny", spatial_checkpointing=on).set_training_mode("temporal")
        batch = model.make_batch(1, 4, 64, 64)
        saved[on] = saved_activation_bytes(model, lambda: model.loss(batch))
        model.loss(batch).backward()
        grads[on] = {k: p.grad for k, p in model.named_parameters() if p.grad is not None}
    assert saved[True] < 0.8 * saved[False]
    assert grads[True].keys() == grads[False].keys() and grads[True]
    for k in grads[False]:
        assert torch.equal(grads[True][k], grads[False][k]), k


@pytest.mark.parametrize("family,archs", [("unet", UNETS + ("modelscope-unet",)),
                                          ("dit", ("dit-full", "dit-dsv", "dit-window"))])
def test_committed_checkpoints_load_strictly(family, archs):
    paths = sorted(weights.CHECKPOINT_DIR.glob(f"{family}-*.pt"))
    assert paths, f"no committed {family} checkpoint"
    for path in paths:
        preset = path.stem.split("-", 1)[1]
        for arch in archs:
            if architectures.get(arch).family != family or weights.reference_arch(Case(arch, preset)) != \
                    weights.REFERENCE_ARCH[family]:
                continue  # another config class (modelscope-unet): not this checkpoint's architecture
            model = Case(arch, preset).build_model()
            state, _ = weights.read_checkpoint(path)
            result = model.load_state_dict(state, strict=False)
            assert not result.unexpected_keys, (arch, result.unexpected_keys[:3])
            # only the architecture's own additions (ladder bridges, DSV estimators) keep their init
            assert set(result.missing_keys) == set(weights._expected(Case(arch, preset))[1]), arch
            if arch == weights.REFERENCE_ARCH[family]:
                assert not result.missing_keys


def test_unets_agree_from_the_text_to_image_checkpoint_and_all_learn(tmp_path):
    from stbench.step import TrainingStep

    cases = [Case(a, "tiny", frames=4, batch=2, weights="trained") for a in UNETS]
    first = {}
    for case in cases:
        step = TrainingStep(case)
        d = data.MovingShapes(data.DatasetConfig(seed=0, frames=4), step.model)
        with torch.no_grad():
            first[case.arch] = float(step.model.loss(d.train_batch(0, 2)))
    ref = first["serial-unet"]
    for arch, loss in first.items():
        assert abs(loss - ref) <= SAME_LOSS_TOLERANCE * ref, first
    for case in cases:
        record = train_case(case, steps=12, eval_every=12, seed=0, lr=2e-3, heldout=4)
        assert record["status"] == "ok", record["error"]
        (_, before), (_, after) = record["train"]["eval"][0], record["train"]["eval"][-1]
        assert after < before, (case.arch, before, after)
        assert len(record["train"]["losses"]) == 12 and record["train"]["wall_ms"] == sorted(record["train"]["wall_ms"])


# --- the command ----------------------------------------------------------------------------------------

def _bad(argv, capsys) -> str:
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and err.startswith("stbench: error: "), err
    return err


def test_bad_weights_exit_2_with_one_line(tmp_path, capsys):
    base = ["train", "--arch", "serial-unet", "--steps", "1", "--out", str(tmp_path / "run"), "--weights"]
    assert "no such file" in _bad(base + [str(tmp_path / "nope.pt")], capsys)
    assert "no committed checkpoint" in _bad(base + ["trained", "--preset", "sd15"], capsys)
    tiny = str(weights.checkpoint_path("serial-unet", "tiny"))
    assert "preset tiny" in _bad(base + [tiny, "--preset", "small"], capsys)
    dit = architectures.build("dit-full", "tiny").state_dict()
    torch.save(dit, tmp_path / "dit.pt")
    assert "keys not in serial-unet" in _bad(base + [str(tmp_path / "dit.pt")], capsys)
    unet = architectures.build("serial-unet", "tiny").state_dict()
    unet.pop(next(iter(unet)))
    torch.save(unet, tmp_path / "partial.pt")
    assert "missing" in _bad(base + [str(tmp_path / "partial.pt")], capsys)
    (tmp_path / "junk.pt").write_text("not a checkpoint")
    assert "not a torch state dict" in _bad(base + [str(tmp_path / "junk.pt")], capsys)
    assert "no such file" in _bad(["run", "--arch", "dit-full", "--out", str(tmp_path / "run"), "--weights",
                                   str(tmp_path / "nope.pt")], capsys)
    assert "--repeats" in _bad(["train", "--arch", "dit-full", "--repeats", "3"], capsys)
    assert "--save" in _bad(["train", "--arch", "dit-full,dit-dsv", "--save", str(tmp_path / "x.pt")], capsys)
    assert not (tmp_path / "run" / runfolder.RESULTS_FILE).exists()


def test_save_then_load_roundtrip(tmp_path):
    path = tmp_path / "ckpt.pt"
    record = train_case(Case("dit-full", "tiny", frames=2, resolution=32), steps=2, eval_every=1, heldout=2,
                        save=str(path))
    assert record["status"] == "ok" and record["train"]["saved"] == str(path)
    assert len(record["train"]["eval"]) == 3
    model = Case("dit-dsv", "tiny", frames=2, resolution=32, weights=str(path)).build_model()
    weights.load_weights(model, Case("dit-dsv", "tiny", frames=2, resolution=32, weights=str(path)))
    saved, meta = weights.read_checkpoint(path)
    assert meta["preset"] == "tiny" and meta["family"] == "dit" and meta["steps"] == 2
    assert torch.equal(model.state_dict()["blocks.0.attn.qkv.weight"], saved["blocks.0.attn.qkv.weight"])


def test_dense_wan_checkpoint_starts_dsv_fresh_and_other_missing_keys_are_refused(tmp_path, capsys):
    """A tiny wan trained with full attention loads into --set attention=dsv: only the DSV layers' estimators and
    profiles (absent from a dense checkpoint) start fresh, with a warning for the record; any other missing key,
    or DSV state for some layers only, stays an error."""
    dense = architectures.build("wan", "tiny")
    weights.save_checkpoint(dense, tmp_path / "dense.pt", {"family": "video-transformer", "preset": "tiny"})
    case = Case("wan", "tiny", mode="full", frames=9, overrides=(("attention", "dsv"),),
                weights=str(tmp_path / "dense.pt"))
    model = case.build_model()
    weights.load_weights(model, case)
    state, fresh = model.state_dict(), weights._expected(case)[2]
    assert len(fresh) == 4 * len(model.dsv_layers()) == 8  # 2 blocks x (2 estimators + 2 profile buffers)
    assert set(state) - set(dense.state_dict()) == fresh
    for k, v in dense.state_dict().items():  # every dense weight loaded, under diffusers' processor wrapping
        assert torch.equal(state[k], v), k
    note = ("weights: " + str(tmp_path / "dense.pt") + " holds no DSV estimator or sparsity profile for 2 "
            "layer(s) (a dense model's checkpoint): they start fresh (random estimator, empty profile), as DSV "
            "training from a dense model does")
    assert all(layer.warnings == [note] for layer in model.dsv_layers())
    assert all(int(layer.profile_updates) == 0 for layer in model.dsv_layers())
    base = ["run", "--arch", "wan", "--mode", "full", "--frames", "9", "--set", "attention=dsv",
            "--out", str(tmp_path / "run"), "--weights"]
    # another missing key: refused, naming it
    partial = dense.state_dict()
    partial.pop("transformer.proj_out.weight")
    torch.save(partial, tmp_path / "partial.pt")
    assert "missing: transformer.proj_out.weight" in _bad(base + [str(tmp_path / "partial.pt")], capsys)
    # DSV state for one layer but not the other: not a dense checkpoint, refused
    sparse = architectures.build("wan", "tiny", attention="dsv").state_dict()
    torch.save({k: v for k, v in sparse.items() if not (k in fresh and ".blocks.1." in k)}, tmp_path / "half.pt")
    assert "a dense checkpoint holds none" in _bad(base + [str(tmp_path / "half.pt")], capsys)
    # an unexpected key stays an error too
    torch.save({**dense.state_dict(), "extra.weight": torch.zeros(1)}, tmp_path / "extra.pt")
    assert "keys not in wan (tiny): extra.weight" in _bad(base + [str(tmp_path / "extra.pt")], capsys)
    assert not (tmp_path / "run" / runfolder.RESULTS_FILE).exists()


def test_killed_train_resumes_without_losing_or_duplicating_a_case(tmp_path, capsys):
    out = tmp_path / "run"
    argv = [sys.executable, "-m", "stbench", "train", "--arch", "dit-full,dit-window", "--frames", "2",
            "--resolution", "32", "--steps", "60", "--eval-every", "60", "--heldout", "2", "--no-progress",
            "--out", str(out)]
    env = {**os.environ, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1"}
    child = subprocess.Popen(argv, cwd=REPO, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    path = out / runfolder.RESULTS_FILE
    deadline = time.monotonic() + 120
    while not (path.exists() and path.read_text().count("\n") >= 1) and time.monotonic() < deadline:
        assert child.poll() is None, "train ended before it could be killed"
        time.sleep(0.05)
    child.send_signal(signal.SIGKILL)  # during the second case
    child.wait()
    assert [r["arch"] for r in results.read_records(path)] == ["dit-full"]
    # resuming with other training settings would mix cases trained differently: refused, nothing written (in
    # this process: the refusal comes before any training, where a new interpreter would spend seconds importing)
    other = argv[3:argv.index("--steps") + 1] + ["3"] + argv[argv.index("--steps") + 2:] + ["--resume"]
    assert main(other) == 2 and capsys.readouterr().err.strip() == (
        f"stbench: error: --resume: {out} holds dit-full trained with other settings (--steps 60 there, 3 now); "
        f"pass the same settings or another --out")
    assert main(argv[3:] + ["--resume"]) == 0, capsys.readouterr().err
    records = results.read_records(path)
    assert sorted(r["arch"] for r in records) == ["dit-full", "dit-window"]
    assert len({results.case_key(r) for r in records}) == 2
    assert records[0]["train"]["steps"] == records[1]["train"]["steps"] == 60
    assert len(json.loads((out / runfolder.RUN_FILE).read_text())["invocations"]) == 2


# --- the report's Training section ------------------------------------------------------------------------

def test_time_to_target_interpolates_between_evaluations():
    from stbench.report.training import crossing_step, time_to_target

    assert crossing_step([[0, 1.0], [10, 0.8], [20, 0.4]], 0.6) == (pytest.approx(15.0), 10, 20)
    assert crossing_step([[0, 1.0], [10, 0.8]], 0.5) == (None, None, None)
    record = {"arch": "serial-unet", "overrides": {}, "peak_allocated": None, "saved_activations": 1000,
              "train": {"eval": [[0, 1.0], [10, 0.8], [20, 0.4]], "wall_ms": [100.0 * (i + 1) for i in range(20)]}}
    record["flops_per_step"] = 10
    row = time_to_target(record, 0.6)
    assert row.steps == pytest.approx(15.0) and row.seconds == pytest.approx(1.5)
    assert row.low == pytest.approx(1.0) and row.high == pytest.approx(2.0)  # constant step times: eval spacing only
    assert row.flops == pytest.approx(150)
    assert row.peak_bytes == 1000 and row.peak_what == "saved activations"


def test_report_has_a_training_section(tmp_path):
    from stbench.report.render import render_report

    for arch in ("dit-full", "dit-window"):
        results.append_record(tmp_path / runfolder.RESULTS_FILE, train_case(
            Case(arch, "tiny", frames=2, resolution=32), steps=4, eval_every=2, heldout=2, lr=3e-3))
    text = render_report(tmp_path).read_text()
    assert 'id="training"' in text and "dit-full (reference)" in text
    assert "dit-window reached held-out loss" in text or "dit-window did not reach held-out loss" in text
