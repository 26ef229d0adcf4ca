"""3D-UNet family: parameter names, state-dict compatibility, equivalences, frozen-spatial training, profiler regions."""
import pytest
import torch

import architectures
from architectures.unet_mobius import motion_delta, time_embedding, walk_unet
from architectures.unet_serial import batch_to_frames, frames_to_batch
from stbench.errors import UserError
from stbench.config import Case
from stbench.inspect import saved_bytes_by_group

UNET_ARCHS = ("serial-unet", "mobius-unet", "mobius-ladder-unet", "modelscope-unet")
ANIMATEDIFF_ARCHS = ("serial-unet", "mobius-unet", "mobius-ladder-unet")
TOLERANCE = 1e-5  # fp32, same weights, same kernels; only summation order may differ


def build(name, preset="tiny", device=None, seed=0, **overrides):
    torch.manual_seed(seed)
    return architectures.build(name, preset, device=device, **overrides)


def shapes(model):
    return {name: tuple(t.shape) for name, t in model.state_dict().items()}


@pytest.mark.parametrize("preset", ["tiny", "small", "sd15"])
def test_state_dicts_move_between_serial_and_mobius(preset):
    device = "cpu" if preset == "tiny" else "meta"
    serial = build("serial-unet", preset, device)
    mobius = build("mobius-unet", preset, device)
    ladder = build("mobius-ladder-unet", preset, device)
    assert shapes(serial) == shapes(mobius)
    mobius.load_state_dict(serial.state_dict(), strict=True)
    serial.load_state_dict(mobius.state_dict(), strict=True)

    added = ladder.added_parameter_names()
    assert added and all(n.startswith(("bridges.", "side_out.")) for n in added)
    assert {n: s for n, s in shapes(ladder).items() if n not in added} == shapes(serial)
    result = ladder.load_state_dict(serial.state_dict(), strict=False)
    assert sorted(result.missing_keys) == sorted(added) and result.unexpected_keys == []
    if device == "cpu":
        assert all(ladder.state_dict()[n].abs().max() == 0 for n in added)  # additions stay at zero


def test_sd15_matches_published_sizes():
    model = build("serial-unet", "sd15", "meta")
    params = dict(model.named_parameters())
    groups = {g: sum(params[n].numel() for n in names) for g, names in model.parameter_groups().items()}
    assert groups["spatial"] == 859_520_964  # Stable Diffusion 1.5 UNet
    assert groups["temporal"] == 453_209_280  # AnimateDiff mm_sd_v15_v2 (diffusers MotionAdapter v1-5-2)


@pytest.mark.parametrize("name", UNET_ARCHS)
def test_group_of_names_motion_modules_temporal(name):
    model = build(name)
    groups = model.parameter_groups()
    assert set(groups) == {"spatial", "temporal"}
    temporal_words = ("motion_modules", "bridges", "side_out", "temp_convs", "temp_attentions", "transformer_in")
    for n in groups["temporal"]:
        assert any(w in n for w in temporal_words), n
    for n in groups["spatial"]:
        assert not any(w in n for w in temporal_words), n


def image_unet_per_frame(serial, sample, timesteps, text):  # -> (B, C, F, h, w)
    """diffusers' 2D UNet (the text-to-image model) holding serial's spatial weights, run frame by frame."""
    from diffusers import UNet2DConditionModel

    c, levels = serial.unet.config, len(serial.config.block_out_channels)
    unet2d = UNet2DConditionModel(
        block_out_channels=c.block_out_channels, layers_per_block=c.layers_per_block,
        down_block_types=("CrossAttnDownBlock2D",) * (levels - 1) + ("DownBlock2D",),
        up_block_types=("UpBlock2D",) + ("CrossAttnUpBlock2D",) * (levels - 1),
        cross_attention_dim=c.cross_attention_dim, attention_head_dim=c.num_attention_heads,
        norm_num_groups=c.norm_num_groups)
    weights = {k.removeprefix("unet."): v for k, v in serial.state_dict().items() if ".motion_modules." not in k}
    unet2d.load_state_dict(weights, strict=True)
    frames = sample.shape[2]
    out = unet2d(frames_to_batch(sample), timesteps.repeat_interleave(frames), text.repeat_interleave(frames, 0),
                 return_dict=False)[0]
    return batch_to_frames(out, frames)


def noisy_batch(model, frames=4):
    batch = model.make_batch(1, frames, 64, 64)
    return model.add_noise(batch.latents, batch.noise, batch.timesteps), batch.timesteps, batch.text


@torch.no_grad()
def test_zero_init_motion_modules_give_the_image_model_per_frame():
    serial = build("serial-unet")  # zero_init_temporal=True by default
    sample, timesteps, text = noisy_batch(serial)
    reference = image_unet_per_frame(serial, sample, timesteps, text)
    for name in ANIMATEDIFF_ARCHS:
        model = build(name, seed=1)
        model.load_state_dict(serial.state_dict(), strict=name != "mobius-ladder-unet")
        torch.testing.assert_close(model(sample, timesteps, text), reference, atol=TOLERANCE, rtol=0, msg=name)


@torch.no_grad()
def test_random_motion_modules_make_serial_and_mobius_differ():
    serial = build("serial-unet", zero_init_temporal=False)
    mobius = build("mobius-unet")
    mobius.load_state_dict(serial.state_dict(), strict=True)
    sample, timesteps, text = noisy_batch(serial)
    difference = (serial(sample, timesteps, text) - mobius(sample, timesteps, text)).abs().max()
    assert difference > 1e-2


@torch.no_grad()
def test_walk_unet_with_the_serial_rule_reproduces_diffusers():
    """The Mobius rewiring runs diffusers' own submodules; with T(S(h)) at each site it must be UNetMotionModel.

    This is the guard of the diffusers version bound in pyproject.toml: a release that changes UNetMotionModel's
    forward fails here before any Mobius figure is wrong."""
    serial = build("serial-unet", zero_init_temporal=False)
    sample, timesteps, text = noisy_batch(serial)
    frames, unet = sample.shape[2], serial.unet

    def serial_layer(site, motion, h_in, r, s):
        return s + motion_delta(motion, s, frames)

    out = walk_unet(unet, frames_to_batch(sample), time_embedding(unet, timesteps, frames),
                    text.repeat_interleave(frames, 0), serial_layer)
    torch.testing.assert_close(batch_to_frames(out, frames), serial(sample, timesteps, text), atol=TOLERANCE, rtol=0)


@pytest.mark.parametrize("name", UNET_ARCHS)
def test_temporal_mode_trains_only_temporal_parameters(name):
    model = build(name, zero_init_temporal=False).set_training_mode("temporal")
    model.loss(model.make_batch(1, 4, 64, 64)).backward()
    with_grad = {n for n, p in model.named_parameters() if p.grad is not None}
    assert with_grad == set(model.parameter_groups()["temporal"])


@pytest.mark.parametrize("name", ANIMATEDIFF_ARCHS)
def test_full_mode_trains_every_parameter(name):
    model = build(name, zero_init_temporal=False).set_training_mode("full")
    model.loss(model.make_batch(1, 2, 32, 32)).backward()
    assert all(p.grad is not None for p in model.parameters())


def test_ladder_saves_nothing_inside_spatial_layers_and_mobius_no_more_than_serial():
    saved = {}
    for name in ANIMATEDIFF_ARCHS:
        model = build(name).set_training_mode("temporal")
        batch = model.make_batch(1, 8, 64, 64)
        saved[name] = saved_bytes_by_group(model, lambda: model.loss(batch))
    assert saved["serial-unet"]["spatial"] > 0
    assert saved["mobius-ladder-unet"]["spatial"] == 0
    assert saved["mobius-ladder-unet"]["total"] < saved["serial-unet"]["total"]
    assert saved["mobius-unet"]["total"] <= saved["serial-unet"]["total"]


@pytest.mark.parametrize("name", UNET_ARCHS)
def test_profiler_trace_has_spatial_and_temporal_regions(name):
    model = build(name).set_training_mode("temporal")
    batch = model.make_batch(1, 2, 32, 32)
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU]) as prof:
        model.loss(batch).backward()
    names = {event.name for event in prof.events()}
    assert {"spatial", "temporal"} <= names


@pytest.mark.parametrize("name", UNET_ARCHS)
def test_check_shape_rejects_shapes_the_unet_cannot_take(name):
    arch = architectures.get(name)
    config = architectures.make_config(name, "sd15")
    arch.check_shape(config, 16, 256, 256)
    with pytest.raises(ValueError, match="multiple of 64"):
        arch.check_shape(config, 16, 264, 264)  # 33 latents cannot halve three times
    with pytest.raises(UserError, match="resolution/frames for"):
        Case(arch=name, preset="tiny", resolution=72)  # tiny halves once: needs a multiple of 16
    if name != "modelscope-unet":
        with pytest.raises(ValueError, match="motion_max_seq_length"):
            arch.check_shape(config, 33, 256, 256)
