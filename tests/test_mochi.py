"""Mochi 1 (diffusers' MochiTransformer3DModel): its published size counted by hand, its latent space, its flow
matching convention, and stbench's one-call joint attention against diffusers' own processor."""
from __future__ import annotations

import pytest
import torch

import architectures
from architectures.mochi import MochiJointAttnProcessor
from stbench.cli import main
from stbench.config import Case
from stbench.errors import UserError


def mochi_parameters(heads=24, head_dim=128, layers=48, pooled=1536, text=4096, time=256, patch=2, channels=12):
    """MochiTransformer3DModel's parameters from its config, by hand (diffusers 0.42 transformer_mochi.py)."""
    d = heads * head_dim
    ff, ff_text = 8 * d // 3, 8 * pooled // 3  # SwiGLU inner widths: (4 * dim * 2) // 3
    patch_embed = channels * patch * patch * d + d
    time_embed = time * d + d + d * d + d  # TimestepEmbedding: two linears
    caption_pool = text * 2 * text + 2 * text + text * text + text + text * d + d  # to_kv, to_q, to_out
    caption_proj = text * pooled + pooled
    rope = 3 * heads * head_dim // 2  # learned pos_frequencies
    attention = 4 * head_dim + 3 * d * d + 3 * pooled * d + d * d + d  # 4 q/k RMS norms, video qkv, text qkv, out
    block = (d * 4 * d + 4 * d) + (d * 4 * pooled + 4 * pooled) + attention + (d * pooled + pooled) \
        + 3 * d * ff + 3 * pooled * ff_text  # modulations, attention, text out projection, FFNs (no bias)
    last = (d * 4 * d + 4 * d) + (d * pooled + pooled) + attention + 3 * d * ff  # context_pre_only: no text out
    out = d * 2 * d + 2 * d + d * patch * patch * channels + patch * patch * channels
    return patch_embed + time_embed + caption_pool + caption_proj + rope + (layers - 1) * block + last + out


def test_10b_preset_has_the_published_parameter_count_on_meta():
    model = architectures.build("mochi", "10b", device="meta")
    total = sum(p.numel() for p in model.parameters())
    assert total == mochi_parameters() == 10_027_677_744  # the model card: "10 billion parameter"
    assert abs(total / 10e9 - 1) < 0.01


def test_joint_attention_in_one_call_equals_diffusers_own_processor():
    """stbench's processor (one attention call, every text token valid) reproduces MochiAttnProcessor2_0 (per
    sample, nonzero-selected text), on a batch of two."""
    from diffusers.models.attention_processor import MochiAttnProcessor2_0

    torch.manual_seed(0)
    model = architectures.build("mochi", "tiny").eval()
    assert all(isinstance(b.attn1.processor, MochiJointAttnProcessor) for b in model.transformer.transformer_blocks)
    batch = model.make_batch(2, 13, 32, 48)
    with torch.no_grad():
        ours = model(batch.latents, batch.timesteps, batch.text)
        for block in model.transformer.transformer_blocks:
            block.attn1.processor = MochiAttnProcessor2_0()
        theirs = model(batch.latents, batch.timesteps, batch.text)
    torch.testing.assert_close(ours, theirs, rtol=1e-5, atol=1e-6)


def test_latent_space_and_flow_convention():
    with torch.device("meta"):
        model = architectures.build("mochi", "tiny")
    # Mochi's VAE: 12 channels, /8, 6x causal temporal: 163 frames -> 28 latent frames (MochiPipeline)
    assert model.latent_shape(1, 163, 480, 848) == (1, 12, 28, 60, 106)
    model = architectures.build("mochi", "tiny")
    batch = model.make_batch(2, 7, 32, 32)
    sigma = batch.timesteps.float().view(-1, 1, 1, 1, 1) / 1000
    torch.testing.assert_close(model.add_noise(batch.latents, batch.noise, batch.timesteps),
                               (1 - sigma) * batch.latents + sigma * batch.noise)
    torch.testing.assert_close(model.target(batch), batch.latents - batch.noise)  # x_0 - noise: Mochi's sign
    seen = {}
    model.transformer.time_embed.register_forward_pre_hook(lambda m, args: seen.update(t=args[0]))
    model.loss(batch)
    torch.testing.assert_close(seen["t"], 1000 - batch.timesteps)  # Mochi's time runs from noise (0) to data


def test_frames_must_fit_the_6x_temporal_vae():
    with pytest.raises(UserError, match=r"frames must be 1 \+ a multiple of 6 \(the VAE compresses time 6x; "
                                        r"e.g. 7, 13, 25, 49\), got 9"):
        Case(arch="mochi", mode="full", frames=9)
    with pytest.raises(UserError, match="mode: 'temporal' is not available for mochi"):
        Case(arch="mochi", frames=7)


def test_list_inspect_and_predict_know_mochi(capsys, tmp_path):
    assert main(["list", "--arch", "mochi"]) == 0
    listing = capsys.readouterr().out
    assert "10b (10.03B = 10,027,677,744)" in listing and "attention: full, window, dsv" in listing
    assert main(["inspect", "--arch", "mochi", "--preset", "10b", "--params-only", "--device", "meta",
                 "--mode", "full", "--frames", "7"]) == 0
    assert "mochi  10027.68M  10027.68M     0.00M  10027.68M" in capsys.readouterr().out
    assert main(["predict", "--arch", "mochi", "--preset", "tiny", "--mode", "full", "--frames", "7",
                 "--resolution", "32x48", "--hardware", "cpu", "--out", str(tmp_path / "p")]) == 0
    assert "mochi 32x48px x7" in capsys.readouterr().out
