"""diffusers' production video transformers (wan, cogvideox, hunyuan-video, ltx-video, latte, mochi), the attention swap
through attention processors, `stbench list` and `--arch package.module:factory`."""
from __future__ import annotations

import json

import pytest
import torch
import torch.nn.functional as F

import architectures
from architectures.attention import block_mask_to_token_mask, estimate_block_scores, select_blocks
from architectures.attention.processors import SwappedAttnProcessor
from stbench.cli import main
from stbench.config import Case
from stbench.errors import UserError

FAMILIES = ("wan", "cogvideox", "hunyuan-video", "ltx-video", "latte", "mochi")
# a small legal pixel shape per family: (frames, resolution)
TINY_SHAPE = {"wan": (9, 64), "cogvideox": (9, 64), "hunyuan-video": (9, 64), "ltx-video": (9, 128), "latte": (8, 64),
              "mochi": (7, 64)}
# parameters of the published configurations, counted on the meta device (see the closing note for the
# published figures they stand against: Wan2.1 1.3B/14B, CogVideoX 2B/5B, HunyuanVideo 13B, LTX-Video 2B)
PUBLISHED = {("wan", "1.3b"): 1_418_996_800, ("wan", "14b"): 14_288_491_584,
             ("cogvideox", "2b"): 1_693_783_872, ("cogvideox", "5b"): 5_570_283_072,
             ("hunyuan-video", "13b"): 12_821_012_544, ("ltx-video", "2b"): 1_923_385_472,
             ("latte", "xl"): 1_057_246_880, ("mochi", "10b"): 10_027_677_744}
NOMINAL = {("wan", "1.3b"): 1.3e9, ("wan", "14b"): 14e9, ("cogvideox", "2b"): 2e9, ("cogvideox", "5b"): 5e9,
           ("hunyuan-video", "13b"): 13e9, ("ltx-video", "2b"): 2e9, ("mochi", "10b"): 10e9}


def tiny(arch, **overrides):
    torch.manual_seed(0)
    return architectures.build(arch, "tiny", **overrides).set_training_mode("full").train()


@pytest.mark.parametrize("attention", ["full", "window", "dsv"])
@pytest.mark.parametrize("arch", FAMILIES)
def test_every_tiny_preset_trains_a_step_with_each_attention(arch, attention):
    model = tiny(arch, attention=attention, dense_steps=0, sparsity=0.5)
    frames, res = TINY_SHAPE[arch]
    batch = model.make_batch(1, frames, res, res)
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    optimizer = torch.optim.AdamW(model.trainable_parameters(), lr=1e-3)
    loss = model.loss(batch)
    loss.backward()
    optimizer.step()
    assert torch.isfinite(loss)
    changed = [n for n, p in model.named_parameters() if not torch.equal(p, before[n])]
    assert len(changed) > len(before) // 2  # the step reached the model, not just a head
    swapped = [m for m in model.modules() if isinstance(m, SwappedAttnProcessor)]
    assert (len(swapped) > 0) == (attention != "full")
    if attention == "dsv":
        # the estimators train on their own loss and optimizer in stage 1 (in stage 2 only at re-profiling)
        dense = tiny(arch, attention="dsv")
        estimators = {n: p.detach().clone() for n, p in dense.named_parameters() if n.endswith("q_estimator")}
        dense.loss(dense.make_batch(1, frames, res, res))
        assert estimators and any(not torch.equal(p, estimators[n]) for n, p in dense.named_parameters()
                                  if n in estimators)
        if arch != "latte":  # latte's per-frame and per-position sequences are single DSV blocks
            assert any(bool(layer.last_sparse_heads.any()) for layer in model.dsv_layers())
            stats = model.dsv_stats()
            assert stats["sparse_head_fraction"] > 0 and len(stats["layer_sparsity"]) == len(model.dsv_layers())


@pytest.mark.parametrize("arch", ["wan", "cogvideox", "hunyuan-video", "latte", "mochi"])
def test_window_covering_the_whole_video_equals_diffusers_own_attention(arch):
    """The processor swap changes the attention only: a window as large as the video (text kept global in the
    joint-attention models) reproduces the published model's output."""
    full = tiny(arch).eval()
    window = tiny(arch, attention="window", window_size=(64, 64, 64)).eval()
    window.load_state_dict(full.state_dict())
    frames, res = TINY_SHAPE[arch]
    batch = full.make_batch(1, frames, res, res)
    with torch.no_grad():
        expected = full(batch.latents, batch.timesteps, batch.text)
        actual = window(batch.latents, batch.timesteps, batch.text)
    torch.testing.assert_close(actual, expected, rtol=1e-4, atol=1e-5)


def test_dsv_inside_wan_is_exact_against_dense_attention_on_the_same_blocks():
    model = tiny("wan", attention="dsv", dense_steps=0, sparsity=0.6, block_size=8)
    processor = next(m for m in model.modules() if isinstance(m, SwappedAttnProcessor))
    seen = {}
    attend = processor.attend

    def recording(q, k, v, attn_mask, scale):
        out = attend(q, k, v, attn_mask, scale)
        seen.update(q=q.detach(), k=k.detach(), v=v.detach(), out=out.detach())
        return out

    processor.attend = recording
    batch = model.make_batch(1, 9, 64, 64)
    model.loss(batch)
    q, k, v, out = (seen[n] for n in ("q", "k", "v", "out"))
    core, (_, H, N, D) = processor.dsv, q.shape
    assert bool(core.last_sparse_heads.all())
    with torch.no_grad():
        q_est, k_est = core.estimate(q, k, slice(None))
        nk = -(-N // core.block_size)
        blocks = select_blocks(estimate_block_scores(q_est, k_est, core.block_size, D ** -0.5), core.head_topk(nk))
    mask = block_mask_to_token_mask(blocks, core.block_size, N, N)
    assert 0 < mask.float().mean() < 1  # really sparse
    expected = F.scaled_dot_product_attention(q, k, v, attn_mask=mask)
    torch.testing.assert_close(out, expected, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("key", sorted(PUBLISHED))
def test_published_presets_have_their_parameter_counts_on_meta(key):
    model = architectures.build(*key, device="meta")
    total = sum(p.numel() for p in model.parameters())
    assert total == PUBLISHED[key]
    if key in NOMINAL:  # model cards round: "1.3B" is 1.42B, "2B" is 1.69B
        assert abs(total / NOMINAL[key] - 1) < 0.16


def test_latent_space_follows_each_vae():
    with torch.device("meta"):
        wan = architectures.build("wan", "tiny")
        ltx = architectures.build("ltx-video", "tiny")
        latte = architectures.build("latte", "tiny")
    assert wan.latent_shape(1, 81, 480, 832) == (1, 16, 21, 60, 104)  # Wan: 81 frames -> 21 latent frames
    assert ltx.latent_shape(2, 121, 512, 768) == (2, 128, 16, 16, 24)
    assert latte.latent_shape(1, 16, 256, 256) == (1, 4, 16, 32, 32)
    assert (wan.objective, ltx.objective, latte.objective, architectures.get("cogvideox").build(
        architectures.make_config("cogvideox", "tiny")).objective) == ("flow", "flow", "eps", "v")


def test_flow_matching_target_is_the_straight_path_velocity():
    model = tiny("wan")
    batch = model.make_batch(2, 5, 32, 32)
    t = batch.timesteps.float().view(-1, 1, 1, 1, 1) / 1000
    torch.testing.assert_close(model.add_noise(batch.latents, batch.noise, batch.timesteps),
                               (1 - t) * batch.latents + t * batch.noise)
    torch.testing.assert_close(model.target(batch), batch.noise - batch.latents)


@pytest.mark.parametrize("fields, message", [
    (dict(arch="wan", frames=8, mode="full"), "frames must be 1 + a multiple of 4 (the VAE compresses time 4x; "
                                              "e.g. 5, 9, 17, 33), got 8"),
    (dict(arch="ltx-video", frames=9, resolution=48, mode="full"), "height must be a multiple of 32"),
    (dict(arch="latte", frames=16), "frames must equal video_length (8"),
    (dict(arch="cogvideox", frames=9, mode="temporal"), "mode: 'temporal' is not available for cogvideox"),
    (dict(arch="wan", frames=9, mode="full", overrides=(("attention", "flash"),)), "attention: 'flash' is not legal"),
    (dict(arch="nosuch.module:build"), "cannot import 'nosuch.module'"),
    (dict(arch="examples.my_video_model:nothing"), "has no callable 'nothing'"),
])
def test_bad_inputs_are_user_errors(fields, message):
    with pytest.raises(UserError, match=None) as error:
        Case(**fields)
    assert message in str(error.value)


def test_bad_arch_is_one_line_and_exit_2(capsys, tmp_path):
    assert main(["run", "--arch", "nosuch.module:build", "--out", str(tmp_path)]) == 2
    err = capsys.readouterr().err.strip()
    assert err.count("\n") == 0 and err.startswith("stbench: error: arch: unknown architecture")


def test_latte_trains_its_temporal_blocks_alone():
    model = architectures.build("latte", "tiny").set_training_mode("temporal")
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert trainable and all(n.startswith("transformer.temporal_transformer_blocks.") for n in trainable)


def test_the_example_user_model_runs_through_the_command_line(tmp_path, capsys):
    out = tmp_path / "run"
    assert main(["run", "--arch", "examples.my_video_model:build", "--mode", "full", "--frames", "5",
                 "--resolution", "32", "--repeats", "1", "--out", str(out)]) == 0
    record = json.loads((out / "results.jsonl").read_text().splitlines()[-1])
    assert record["status"] == "ok" and record["arch"] == "examples.my_video_model:build"
    assert record["saved_activations"] > 0 and record["params_total"] > 0


def test_inspect_and_list_work_on_the_video_transformers(capsys):
    assert main(["inspect", "--arch", "wan,cogvideox,hunyuan-video,ltx-video", "--preset", "tiny", "--frames", "9",
                 "--resolution", "64", "--mode", "full", "--device", "meta"]) == 0
    table = capsys.readouterr().out
    assert all(name in table for name in ("wan", "cogvideox", "hunyuan-video", "ltx-video"))
    assert main(["list", "--arch", "wan,latte"]) == 0
    listing = capsys.readouterr().out
    assert "1.3b (1.42B = 1,418,996,800)" in listing and "modes: temporal, full" in listing
    assert "attention: full, window, dsv" in listing


def test_suite_grids_run_each_video_transformer_at_its_own_shape():
    from suites import grid

    def spec(device):
        return grid.grid_spec(lambda name: {"device": device}.get(name))

    tiny = [e for e in grid.family_entries("video-transformer", spec("cpu"))]
    assert all(e.case is not None for e in tiny) and {e.case.arch for e in tiny} == set(FAMILIES)
    assert all(e.case.preset == "tiny" and e.case.mode == "full" for e in tiny)
    full = [e.case for e in grid.family_entries("video-transformer", spec("cuda")) if e.case is not None]
    assert {(c.arch, c.preset, c.resolution, c.frames, c.dtype) for c in full} == {
        ("wan", "1.3b", 480, 81, "bf16"), ("cogvideox", "2b", 480, 49, "bf16")}


@pytest.mark.parametrize("attention", ["full", "window"])
def test_video_transformers_run_on_fake_tensors(attention):
    """`predict` runs the real step on fake tensors: no data-dependent Python outside DSV."""
    from torch._subclasses.fake_tensor import FakeTensorMode

    for arch in FAMILIES:
        frames, res = TINY_SHAPE[arch]
        with FakeTensorMode():
            model = architectures.build(arch, "tiny", attention=attention).set_training_mode("full").train()
            model.loss(model.make_batch(1, frames, res, res)).backward()


class IdentityContextParallel:
    """One-process stand-in for the `cp` object: identity sharding, the layer's own core; records calls."""

    world, rank = 1, 0

    def __init__(self):
        self.calls = []

    def shard_tokens(self, x):
        self.calls.append(("shard", tuple(x.shape)))
        return x

    def gather_tokens(self, x):
        self.calls.append(("gather", tuple(x.shape)))
        return x

    def attention(self, q, k, v, core):
        self.calls.append(("attention", tuple(q.shape)))
        return core.core(q, k, v)


@pytest.mark.parametrize("name, attention", [("wan", "full"), ("wan", "window"), ("ltx-video", "full")])
def test_context_parallel_hooks_follow_the_cp_protocol(name, attention):
    """Hidden states sharded at the first block, rotary (cos, sin) sliced, every self-attention through
    cp.attention, the output projection gathered; with identity sharding the output is the plain one."""
    torch.manual_seed(0)
    model = architectures.build(name, "tiny", attention=attention)
    frames, resolution = TINY_SHAPE[name]
    batch = model.make_batch(1, frames, resolution, resolution)
    with torch.no_grad():
        plain = model(batch.latents, batch.timesteps, batch.text)
        cp = model.context_parallel = IdentityContextParallel()
        hooked = model(batch.latents, batch.timesteps, batch.text)
        model.context_parallel = None  # hooks removed: nothing recorded
        model(batch.latents, batch.timesteps, batch.text)
    torch.testing.assert_close(hooked, plain)
    tokens = architectures.get(name).tokens(model.config, frames, resolution, resolution)
    kinds = [kind for kind, _ in cp.calls]
    # rotary first (cos, sin), then the first block's input, one attention per block, the output gathered
    assert kinds == ["shard", "shard", "shard", "attention", "attention", "gather"]
    assert all(shape[1] == tokens for _, shape in cp.calls[:3] + cp.calls[5:])
    assert cp.calls[3][1] == (1, 2, tokens, 32)  # (B, H, N, D)


def test_context_parallel_is_refused_for_families_without_a_token_plan():
    for name in ("cogvideox", "hunyuan-video", "latte", "mochi"):
        with pytest.raises(UserError, match=r"^context_parallel: 'ring' is not legal for " + name +
                           r"; legal: ulysses, ring with one of the archs dit-dsv, dit-full, .*ltx-video, wan$"):
            Case(arch=name, mode="full", frames=9, context_parallel="ring")
    assert Case(arch="wan", mode="full", frames=9, context_parallel="ulysses").context_parallel == "ulysses"


def test_token_count_must_split_over_the_context_parallel_ranks():
    from stbench.config import Sweep
    from stbench.distributed import check_sweep

    # wan: 1 frame at 48 px is 1 x 3 x 3 = 9 tokens
    sweep = Sweep(archs=("wan",), frames=(1,), resolutions=(48,), mode="full", context_parallel="ulysses")
    with pytest.raises(UserError, match="9 video tokens do not split over 2 context-parallel ranks"):
        check_sweep(sweep, 2)
    check_sweep(sweep, 3)
    fsdp = Sweep(archs=("wan",), frames=(1,), resolutions=(48,), mode="full", context_parallel="ring", fsdp=1,
                 activation_checkpointing="none")
    with pytest.raises(UserError, match="9 video tokens do not split over 4"):
        check_sweep(fsdp, 4)
    check_sweep(Sweep(archs=("wan",), frames=(1,), resolutions=(48,), mode="full", fsdp=2,
                      activation_checkpointing="none"), 2)  # no CP: any token count
