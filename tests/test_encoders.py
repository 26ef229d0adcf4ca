"""Resident encoders (`--encoders resident`): each family's text encoder(s) and VAE at their published sizes on
the meta device, against parameter counts computed by hand from the published configs; tiny ones for the tiny
presets; what one encode-on-the-fly step feeds them; the families without published encoders refused."""
from __future__ import annotations

import pytest
import torch

import architectures
from architectures import encoders as E
from stbench.config import Case
from stbench.errors import UserError

T5 = E.count_t5_encoder(E.T5_XXL)
UMT5 = E.count_t5_encoder(E.UMT5_XXL, umt5=True)
LLAMA = E.count_llama(E.LLAVA_LLAMA3_8B)
CLIP = E.count_clip_text(E.CLIP_L_TEXT)
# (arch, preset) -> text encoders' parameters by hand, and the VAE's (diffusers' class at the published config)
PUBLISHED = {("wan", "1.3b"): ({"umt5": UMT5}, 126_892_531), ("cogvideox", "2b"): ({"t5": T5}, 215_583_907),
             ("hunyuan-video", "13b"): ({"llama": LLAMA, "clip": CLIP}, 246_478_803),
             ("ltx-video", "2b"): ({"t5": T5}, 419_193_649), ("latte", "xl"): ({"t5": T5}, 83_653_863),
             ("mochi", "10b"): ({"t5": T5}, 459_748_611), ("serial-unet", "sd15"): ({"clip": CLIP}, 83_653_863)}


def test_hand_counts_are_the_published_sizes():
    # UMT5-XXL's and T5-v1.1-XXL's encoders, LLaVA-Llama-3-8B without its LM head, CLIP ViT-L/14's text tower
    assert (UMT5, T5, LLAMA, CLIP) == (5_680_910_336, 4_762_310_656, 7_505_186_816, 123_060_480)


@pytest.mark.parametrize("key", sorted(PUBLISHED))
def test_published_encoders_on_meta_match_the_hand_counts(key):
    with torch.device("meta"):
        model = architectures.build(*key)
        encoders = E.build_resident(model)
    texts, vae = PUBLISHED[key]
    assert {name: sum(p.numel() for p in m.parameters()) for name, m in encoders.text.items()} == texts
    assert sum(p.numel() for p in encoders.vae.parameters()) == vae
    assert all(p.dtype == torch.bfloat16 and not p.requires_grad for p in encoders.parameters())
    assert E.resident_parameters(model) == sum(texts.values()) + vae


@pytest.mark.parametrize("arch", ["wan", "hunyuan-video", "serial-unet"])
def test_tiny_presets_get_tiny_encoders_counted_by_hand(arch):
    model = architectures.build(arch, "tiny")
    encoders = E.build_resident(model)
    width = model.text_dim
    if arch == "wan":
        hand = {"umt5": E.count_t5_encoder(E.t5_config(E.UMT5_XXL, width), umt5=True)}
    elif arch == "hunyuan-video":
        hand = {"llama": E.count_llama(E.llama_config(width)),
                "clip": E.count_clip_text(E.clip_config(model.config.pooled_dim))}
    else:
        hand = {"clip": E.count_clip_text(E.clip_config(width))}
    assert {name: sum(p.numel() for p in m.parameters()) for name, m in encoders.text.items()} == hand
    assert sum(hand.values()) < 1_000_000 and sum(p.numel() for p in encoders.vae.parameters()) < 1_000_000


def test_one_step_encodes_prompts_of_the_family_lengths_and_the_pixel_video():
    model = architectures.build("hunyuan-video", "tiny")
    encoders = E.build_resident(model)
    seen = {}
    for name, text in encoders.text.items():
        text.register_forward_pre_hook(lambda m, a, k, name=name: seen.update({name: k["input_ids"].shape}),
                                       with_kwargs=True)
    encoders.vae.encoder.register_forward_pre_hook(lambda m, a: seen.update(vae=(a[0].shape, a[0].dtype)))
    batch = model.make_batch(2, 9, 32, 64)
    E.encode(encoders, model, batch)
    # Llama: the 16-token prompt after HunyuanVideo's 95-token template; CLIP: 77; video: 9 frames of 32x64 pixels
    assert seen == {"llama": (2, 16 + 95), "clip": (2, 77), "vae": ((2, 3, 9, 32, 64), torch.bfloat16)}


def test_families_without_published_encoders_are_refused():
    with torch.device("meta"):
        dit = architectures.build("dit-full", "tiny")
        modelscope = architectures.build("modelscope-unet", "sd15")
    with pytest.raises(ValueError, match="VideoDiT has no published text encoder or VAE"):
        E.build_resident(dit)
    with pytest.raises(ValueError, match="reads 1024-wide text, not CLIP ViT-L/14's 768"):
        E.build_resident(modelscope)
    with pytest.raises(UserError, match="^encoders: VideoDiT has no published text encoder or VAE"):
        Case(arch="dit-full", mode="full", encoders="resident")
