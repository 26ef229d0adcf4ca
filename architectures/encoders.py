"""The frozen text encoder(s) and VAE a training script that encodes on the fly keeps beside the model
(`--encoders resident`): per family, at their published sizes, built from transformers' and diffusers' own model
classes (under the caller's device context: meta to count, cpu/cuda to run), in bf16, requires_grad off.

Published configurations (copied as facts from each model repository's config.json; diffusers' class defaults are
used only where they equal it, as noted):
  * UMT5-XXL encoder, Wan2.1's text_encoder: Wan-AI/Wan2.1-T2V-1.3B-Diffusers text_encoder/config.json
    (UMT5EncoderModel, d_model 4096, d_ff 10240, d_kv 64, 64 heads, 24 layers, vocab 256384, gated-gelu);
  * T5-v1.1-XXL encoder (CogVideoX, LTX-Video, Latte, Mochi): google/t5-v1_1-xxl config.json, as copied into
    THUDM/CogVideoX-2b text_encoder/config.json (T5EncoderModel, the same sizes with vocab 32128);
  * HunyuanVideo: text_encoder hunyuanvideo-community/HunyuanVideo text_encoder/config.json (LlamaModel: the
    text part of llava-llama-3-8b: hidden 4096, intermediate 14336, 32 layers, 32 heads, 8 KV heads, vocab 128320,
    rope_theta 5e5) and text_encoder_2 (CLIPTextModel, openai/clip-vit-large-patch14's text tower);
  * CLIP ViT-L/14 text (HunyuanVideo's second encoder, SD1.5's text_encoder for the UNets):
    openai/clip-vit-large-patch14 config.json text_config (hidden 768, intermediate 3072, 12 layers, 12 heads,
    vocab 49408, 77 positions, quick_gelu);
  * VAEs, each repository's vae/config.json (architecture fields; WAN_VAE ... SD_VAE below): AutoencoderKLWan
    (Wan2.1), AutoencoderKLCogVideoX (CogVideoX-2b), AutoencoderKLHunyuanVideo (HunyuanVideo), AutoencoderKLLTXVideo
    (LTX-Video 0.9.0), AutoencoderKLMochi (genmo/mochi-1-preview), AutoencoderKL (SD1.5's and Latte-1's SD VAE).
Prompt lengths are each pipeline's: the transformer's text tokens (Wan 512, CogVideoX 226, LTX 128, Latte 120,
Mochi 256), HunyuanVideo's Llama 256 + its prompt template's 95 tokens (pipeline_hunyuan_video.py crop_start),
CLIP 77.

A model whose text width differs from the published encoder's (the tiny presets) gets tiny encoders of that width
and the same VAE structure (the same spatial and temporal compression) with few channels, so that `run` on the
CPU holds and runs them. The home-made DiTs and user models have no published encoders: ValueError.
"""
from __future__ import annotations

import contextlib

import torch
from torch import nn

# --- published configurations (module docstring for the sources) ---------------------------------------

T5_XXL = dict(d_model=4096, d_ff=10240, d_kv=64, num_heads=64, num_layers=24, vocab_size=32128,
              relative_attention_num_buckets=32, relative_attention_max_distance=128, feed_forward_proj="gated-gelu",
              layer_norm_epsilon=1e-6, tie_word_embeddings=False)
UMT5_XXL = dict(T5_XXL, vocab_size=256384, scalable_attention=True)
LLAVA_LLAMA3_8B = dict(hidden_size=4096, intermediate_size=14336, num_hidden_layers=32, num_attention_heads=32,
                       num_key_value_heads=8, head_dim=128, vocab_size=128320, rms_norm_eps=1e-5,
                       rope_theta=500000.0, max_position_embeddings=8192, tie_word_embeddings=False)
CLIP_L_TEXT = dict(hidden_size=768, intermediate_size=3072, num_hidden_layers=12, num_attention_heads=12,
                   vocab_size=49408, max_position_embeddings=77, hidden_act="quick_gelu", projection_dim=768)
# VAEs: each repository's vae/config.json (architecture fields; scaling factors and latent statistics left out)
WAN_VAE = dict(base_dim=96, z_dim=16, dim_mult=[1, 2, 4, 4], num_res_blocks=2, attn_scales=[],
               temperal_downsample=[False, True, True])  # Wan-AI/Wan2.1-T2V-1.3B-Diffusers
COGVIDEOX_VAE = dict(block_out_channels=(128, 256, 256, 512), layers_per_block=3, latent_channels=16,
                     norm_num_groups=32, temporal_compression_ratio=4)  # THUDM/CogVideoX-2b
HUNYUAN_VAE = dict(block_out_channels=(128, 256, 512, 512), layers_per_block=2, latent_channels=16,
                   norm_num_groups=32, spatial_compression_ratio=8, temporal_compression_ratio=4,
                   mid_block_add_attention=True)  # hunyuanvideo-community/HunyuanVideo
LTX_VAE = dict(block_out_channels=(128, 256, 512, 512), layers_per_block=(4, 3, 3, 3, 4), latent_channels=128,
               patch_size=4, patch_size_t=1, spatio_temporal_scaling=(True, True, True, False), encoder_causal=True,
               decoder_causal=False)  # Lightricks/LTX-Video 0.9.0 (its decoder mirrors the encoder)
MOCHI_VAE = dict(in_channels=15, encoder_block_out_channels=(64, 128, 256, 384),
                 decoder_block_out_channels=(128, 256, 512, 768), latent_channels=12, layers_per_block=(3, 3, 4, 6, 3),
                 temporal_expansions=(1, 2, 3), spatial_expansions=(2, 2, 2),
                 add_attention_block=(False, True, True, True, True))  # genmo/mochi-1-preview
SD_VAE = dict(block_out_channels=(128, 256, 512, 512), layers_per_block=2, latent_channels=4, norm_num_groups=32,
              down_block_types=("DownEncoderBlock2D",) * 4, up_block_types=("UpDecoderBlock2D",) * 4,
              sample_size=512)  # stable-diffusion-v1-5 and maxin-cn/Latte-1 vae/config.json
HUNYUAN_TEMPLATE_TOKENS = 95  # HunyuanVideo's prompt template prefix (crop_start), encoded before the prompt
CLIP_TOKENS = 77

# tiny stand-ins (the tiny presets): the same structure, few channels; GroupNorm VAEs need channels divisible by
# their groups (Mochi's are fixed at 32)
TINY_VOCAB = 256
TINY_LAYERS = 2
# family -> (diffusers class, published config, the tiny stand-in's overrides: same blocks, few channels)
VAES = {
    "wan": ("AutoencoderKLWan", WAN_VAE, dict(base_dim=8, num_res_blocks=1)),
    "cogvideox": ("AutoencoderKLCogVideoX", COGVIDEOX_VAE,
                  dict(block_out_channels=(8, 16, 16, 32), layers_per_block=1, norm_num_groups=4)),
    "hunyuan-video": ("AutoencoderKLHunyuanVideo", HUNYUAN_VAE,
                      dict(block_out_channels=(8, 16, 32, 32), layers_per_block=1, norm_num_groups=4)),
    "ltx-video": ("AutoencoderKLLTXVideo", LTX_VAE,
                  dict(block_out_channels=(8, 16, 32, 32), decoder_block_out_channels=(8, 16, 32, 32),
                       layers_per_block=(1,) * 5, decoder_layers_per_block=(1,) * 5)),
    "mochi": ("AutoencoderKLMochi", MOCHI_VAE, dict(encoder_block_out_channels=(32,) * 4,
                                                    decoder_block_out_channels=(32,) * 4, layers_per_block=(1,) * 5)),
    "sd": ("AutoencoderKL", SD_VAE, dict(block_out_channels=(8, 16, 32, 32), layers_per_block=1, norm_num_groups=4)),
}


def t5_config(config: dict, width: int | None) -> dict:
    """A (U)T5 encoder's config: the published one, or (width given) a tiny one of that width."""
    if width is None:
        return config
    return dict(config, d_model=width, d_ff=2 * width, d_kv=8, num_heads=max(1, width // 8), num_layers=TINY_LAYERS,
                vocab_size=TINY_VOCAB)


def llama_config(width: int | None) -> dict:
    if width is None:
        return LLAVA_LLAMA3_8B
    return dict(LLAVA_LLAMA3_8B, hidden_size=width, intermediate_size=2 * width, num_hidden_layers=TINY_LAYERS,
                num_attention_heads=4, num_key_value_heads=2, head_dim=width // 4, vocab_size=TINY_VOCAB)


def clip_config(width: int | None) -> dict:
    if width is None:
        return CLIP_L_TEXT
    return dict(CLIP_L_TEXT, hidden_size=width, intermediate_size=2 * width, num_hidden_layers=TINY_LAYERS,
                num_attention_heads=2, vocab_size=TINY_VOCAB, projection_dim=width, bos_token_id=0, eos_token_id=1,
                pad_token_id=1)


def _t5(config: dict, width: int | None, umt5: bool = False) -> nn.Module:
    from transformers import T5Config, T5EncoderModel, UMT5Config, UMT5EncoderModel

    config = t5_config(config, width)
    if umt5:
        return UMT5EncoderModel(UMT5Config(**config))
    return T5EncoderModel(T5Config(**config))


def _llama(width: int | None) -> nn.Module:
    from transformers import LlamaConfig, LlamaModel

    return LlamaModel(LlamaConfig(**llama_config(width)))


def _clip(width: int | None) -> nn.Module:
    from transformers import CLIPTextConfig, CLIPTextModel

    return CLIPTextModel(CLIPTextConfig(**clip_config(width)))


def _vae(family: str, tiny: bool) -> nn.Module:
    from .diffusers_import import diffusers_class

    cls, config, small = VAES[family]
    return diffusers_class(cls)(**(dict(config, **small) if tiny else config))


class ResidentEncoders(nn.Module):
    """A family's frozen text encoder(s) (with their prompt lengths) and VAE, held on the training device."""

    def __init__(self, family: str, texts: dict[str, tuple[nn.Module, int]], vae: nn.Module):
        super().__init__()
        self.family = family
        self.text = nn.ModuleDict({name: module for name, (module, _) in texts.items()})
        self.tokens = {name: tokens for name, (_, tokens) in texts.items()}
        self.vae = vae


def family_of(model) -> str:
    """The encoder family of a model: its class decides (ValueError for one without published encoders)."""
    from .cogvideox import CogVideoX
    from .hunyuan_video import HunyuanVideo
    from .latte import Latte
    from .ltx_video import LTXVideo
    from .mochi import Mochi
    from .unet_serial import ModelScopeUNet, SerialUNet
    from .wan import Wan

    for cls, family in ((Wan, "wan"), (CogVideoX, "cogvideox"), (HunyuanVideo, "hunyuan-video"),
                        (LTXVideo, "ltx-video"), (Latte, "latte"), (Mochi, "mochi"), (SerialUNet, "unet"),
                        (ModelScopeUNet, "unet")):
        if isinstance(model, cls):
            return family
    raise ValueError(f"{type(model).__name__} has no published text encoder or VAE (the home-made dit-* family "
                     "and user models train on precomputed latents and text only); use --encoders precomputed")


def build_resident(model) -> ResidentEncoders:
    """The frozen encoders of `model`'s family under the current device context, bf16, requires_grad off."""
    family = family_of(model)
    with _default_dtype(torch.bfloat16):  # built in bf16: an fp32 UMT5-XXL would first take 23 GB
        return _build(model, family)


@contextlib.contextmanager
def _default_dtype(dtype: torch.dtype):
    previous = torch.get_default_dtype()
    torch.set_default_dtype(dtype)
    try:
        yield
    finally:
        torch.set_default_dtype(previous)


def _build(model, family: str) -> ResidentEncoders:
    width = model.text_dim
    tokens = model.text_tokens
    # published sizes when the model reads the published encoder's output width, tiny ones otherwise
    if family == "hunyuan-video":
        pooled = model.config.pooled_dim
        tiny = width != LLAVA_LLAMA3_8B["hidden_size"] or pooled != CLIP_L_TEXT["hidden_size"]
        texts = {"llama": (_llama(width if tiny else None), tokens + HUNYUAN_TEMPLATE_TOKENS),
                 "clip": (_clip(pooled if tiny else None), CLIP_TOKENS)}
    elif family == "unet":
        if width > CLIP_L_TEXT["hidden_size"]:
            raise ValueError(f"{type(model).__name__} reads {width}-wide text, not CLIP ViT-L/14's 768 (ModelScope "
                             "at sd15 reads OpenCLIP ViT-H/14's, whose encoder stbench does not carry); use "
                             "--encoders precomputed or a preset with 768-wide text")
        tiny = width != CLIP_L_TEXT["hidden_size"]
        texts = {"clip": (_clip(width if tiny else None), CLIP_TOKENS)}
    else:
        tiny = width != T5_XXL["d_model"]
        encoder = _t5(UMT5_XXL if family == "wan" else T5_XXL, width if tiny else None, umt5=family == "wan")
        texts = {"umt5" if family == "wan" else "t5": (encoder, tokens)}
    vae = _vae({"latte": "sd", "unet": "sd"}.get(family, family), tiny)
    encoders = ResidentEncoders(family, texts, vae).to(torch.bfloat16).eval()
    encoders.requires_grad_(False)
    return encoders


def resident_parameters(model) -> int:
    """Parameters of `model`'s resident encoders (counted on the meta device)."""
    with torch.device("meta"):
        return sum(p.numel() for p in build_resident(model).parameters())


def pixel_shape(model, latent_shape) -> tuple[int, ...]:
    """(B, 3, F, H, W) of the pixel video whose latents have `latent_shape` (B, C, F', h, w) under `model`'s VAE."""
    b, _, f, h, w = latent_shape
    t, s = model.temporal_compression, model.spatial_compression
    return (b, 3, f if t == 1 else 1 + (f - 1) * t, h * s, w * s)


@torch.no_grad()
def encode(encoders: ResidentEncoders, model, batch) -> None:
    """What an encode-on-the-fly step runs before the model: each text encoder on a prompt of its length and the
    VAE's encoder on the batch's pixel video (results discarded: the batch stays the training input)."""
    device, dtype = batch.latents.device, torch.bfloat16
    n = batch.latents.shape[0]
    for name, text in encoders.text.items():
        ids = torch.zeros(n, encoders.tokens[name], dtype=torch.long, device=device)
        # HunyuanVideo reads the Llama's third-last hidden state: the pipeline keeps all of them
        text(input_ids=ids, output_hidden_states=name == "llama")
    video = torch.zeros(pixel_shape(model, batch.latents.shape), dtype=dtype, device=device)
    vae = encoders.vae
    if encoders.family in ("latte", "unet"):  # the SD VAE is 2D: frames go through it as a batch of images
        video = video.transpose(1, 2).flatten(0, 1)  # (B*F, 3, H, W)
    vae.encode(video)


def count_t5_encoder(config: dict, umt5: bool = False) -> int:
    """Parameters of a (U)T5 encoder from its config, by hand: embedding, per layer attention (q, k, v, o), gated
    FFN (wi_0, wi_1, wo), two RMS norms, relative position bias (every layer in UMT5, the first in T5), final norm."""
    d, ff, heads, kv = config["d_model"], config["d_ff"], config["num_heads"], config["d_kv"]
    layer = 4 * d * heads * kv + 3 * d * ff + 2 * d
    bias = config["relative_attention_num_buckets"] * heads
    return config["vocab_size"] * d + config["num_layers"] * layer + bias * (config["num_layers"] if umt5 else 1) + d


def count_llama(config: dict) -> int:
    """Parameters of a LlamaModel from its config, by hand (no LM head: the text encoder is the base model)."""
    d, hd = config["hidden_size"], config["head_dim"]
    attn = d * config["num_attention_heads"] * hd * 2 + d * config["num_key_value_heads"] * hd * 2
    layer = attn + 3 * d * config["intermediate_size"] + 2 * d
    return config["vocab_size"] * d + config["num_hidden_layers"] * layer + d


def count_clip_text(config: dict) -> int:
    """Parameters of a CLIPTextModel from its config, by hand: token and position embeddings, per layer attention
    (q, k, v, out with biases), MLP (fc1, fc2 with biases), two LayerNorms, final LayerNorm."""
    d, ff = config["hidden_size"], config["intermediate_size"]
    layer = 4 * (d * d + d) + (d * ff + ff) + (ff * d + d) + 2 * 2 * d
    return (config["vocab_size"] + config["max_position_embeddings"]) * d + config["num_hidden_layers"] * layer + 2 * d

