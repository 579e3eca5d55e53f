"""The VAE and text-encoder configs of the benchmark's models, and whole models built from them.

The UNet configs live in ``trainer_cases.py``. Here: the real SD1.5 / SDXL VAE and CLIP text
encoder configs (random weights, nothing downloaded; the parameter counts and hence the costs are
the real ones), the reduced SD1.5-structured model of the CPU rows (``sd15-small``: UNet channels
64/128/256/256 = 37.5 M parameters, a 5.3 M VAE of SD's VAE structure at a quarter of its width,
a 15.0 M two-layer CLIP text encoder of CLIP-L's width, 256 px → latents 4×32×32) and the tiny
models of the CI subset (``snpo.models.tiny``'s shapes). For the SD3-class rows
(:func:`build_flow_parts`): SD3's 16-channel VAE structure at a quarter width, CLIP-L / CLIP-G at
a quarter width and a width-512 T5 encoder, 2 layers each (``sd35m-small``), tiny ones, and
the full-size SD3.5-Medium set (``sd35m``: SD3's VAE 83.8 M, CLIP-L 123.7 M and OpenCLIP bigG
694.7 M with projections, the T5 v1.1 XXL encoder 4762.3 M; GPU rows only, or ``device="meta"``
to count parameters without allocating).

:func:`build_parts` makes the components in memory; :func:`save_model` writes the same model as a
diffusers folder (:func:`snpo.models.tiny.save_model_folder`) that :func:`snpo.models.load_model`
(and therefore ``snpo cache`` / ``snpo train``) reads — the cache-build benchmark uses it.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch

# words of the benchmark tokenizer (a real CLIP BPE tokenizer over a small vocabulary, one token
# per word, snpo.models.tiny.build_tokenizer); the prompts below are made of them
WORDS = (
    "a photo of the an in on with at red blue green yellow black white orange purple pink "
    "brown gray cat dog cube ball car tree house bird horse flower boat city mountain river "
    "portrait painting drawing sunset night morning small large old new happy sad bright dark "
    "detailed realistic cartoon style beautiful cinematic lighting"
).split()

# SD's VAE structure (stable-diffusion-v1-5/vae/config.json: 83,653,863 parameters)
SD_VAE: dict[str, Any] = {
    "in_channels": 3,
    "out_channels": 3,
    "down_block_types": ("DownEncoderBlock2D",) * 4,
    "up_block_types": ("UpDecoderBlock2D",) * 4,
    "block_out_channels": (128, 256, 512, 512),
    "layers_per_block": 2,
    "act_fn": "silu",
    "latent_channels": 4,
    "norm_num_groups": 32,
    "sample_size": 512,
    "scaling_factor": 0.18215,
}
SDXL_VAE: dict[str, Any] = {**SD_VAE, "sample_size": 1024, "scaling_factor": 0.13025}
# the same structure at a quarter of the width: 5,252,487 parameters
SMALL_VAE: dict[str, Any] = {**SD_VAE, "block_out_channels": (32, 64, 128, 128), "sample_size": 256}
# snpo.models.tiny.build_vae: a 2× VAE
TINY_VAE: dict[str, Any] = {
    "in_channels": 3,
    "out_channels": 3,
    "down_block_types": ("DownEncoderBlock2D",) * 2,
    "up_block_types": ("UpDecoderBlock2D",) * 2,
    "block_out_channels": (8, 16),
    "latent_channels": 4,
    "norm_num_groups": 8,
    "layers_per_block": 1,
}

# CLIPTextConfig keyword arguments. CLIP ViT-L/14's text tower (SD1.5's and SDXL's first):
# 123,060,480 parameters, 123,650,304 with its 768 × 768 projection (SD3's text_encoder);
# OpenCLIP ViT-bigG/14's (SDXL's and SD3's second, with projection): 694,659,840.
CLIP_L: dict[str, Any] = {
    "vocab_size": 49408,
    "hidden_size": 768,
    "intermediate_size": 3072,
    "num_hidden_layers": 12,
    "num_attention_heads": 12,
    "max_position_embeddings": 77,
    "hidden_act": "quick_gelu",
    "projection_dim": 768,
}
CLIP_BIGG: dict[str, Any] = {
    "vocab_size": 49408,
    "hidden_size": 1280,
    "intermediate_size": 5120,
    "num_hidden_layers": 32,
    "num_attention_heads": 20,
    "max_position_embeddings": 77,
    "hidden_act": "gelu",
    "projection_dim": 1280,
}
# CLIP-L's width and 2 of its layers, a 1024-token vocabulary: 15,030,528 parameters
CLIP_SMALL: dict[str, Any] = {**CLIP_L, "vocab_size": 1024, "num_hidden_layers": 2}
TINY_CLIP: dict[str, Any] = {
    "vocab_size": 1024,
    "hidden_size": 32,
    "intermediate_size": 64,
    "num_hidden_layers": 2,
    "num_attention_heads": 4,
    "max_position_embeddings": 16,
    "projection_dim": 32,
}

# per model of trainer_cases.MODELS: (VAE config, text-encoder configs, tokens per prompt)
COMPONENTS: dict[str, tuple[dict[str, Any], tuple[dict[str, Any], ...], int]] = {
    "sd15": (SD_VAE, (CLIP_L,), 77),
    "sdxl": (SDXL_VAE, (CLIP_L, CLIP_BIGG), 77),
    "sd15-small": (SMALL_VAE, (CLIP_SMALL,), 77),
    "tiny-sd": (TINY_VAE, (TINY_CLIP,), 16),
    "tiny-sdxl": (TINY_VAE, (TINY_CLIP, TINY_CLIP), 16),
}


def tokenizer(max_length: int):
    from snpo.models import build_tokenizer

    return build_tokenizer(list(WORDS), max_length=max_length)


def prompts(n: int, seed: int = 0) -> list[str]:
    """``n`` prompts of 6–14 benchmark words (distinct with near certainty)."""
    gen = torch.Generator().manual_seed(seed)
    out = []
    for _ in range(n):
        k = int(torch.randint(6, 15, (1,), generator=gen))
        idx = torch.randint(0, len(WORDS), (k,), generator=gen).tolist()
        out.append(" ".join(WORDS[i] for i in idx))
    return out


def _quiet():
    from diffusers.utils import logging as dl

    class _Q:
        def __enter__(self):
            self.v = dl.get_verbosity()
            dl.set_verbosity_error()

        def __exit__(self, *a):
            dl.set_verbosity(self.v)

    return _Q()


def build_parts(
    name: str,
    unet_config: dict[str, Any],
    *,
    seed: int = 0,
    device: torch.device | str = "cpu",
    dtype: torch.dtype = torch.float32,
):
    """(unet, vae, text encoders, tokenizers) of model ``name`` with seeded random weights in
    ``dtype`` on ``device`` (initialised there: seconds, not minutes, for SDXL on a GPU); the
    VAE and text encoders in eval mode without gradients, the UNet as constructed."""
    from diffusers import AutoencoderKL, UNet2DConditionModel
    from transformers import CLIPTextModel, CLIPTextModelWithProjection

    from snpo.models import clip_text_config

    vae_cfg, text_cfgs, tokens = COMPONENTS[name]
    device = torch.device(device)
    torch.manual_seed(seed)
    with _quiet(), torch.device(device):
        unet = UNet2DConditionModel(**unet_config)
        vae = AutoencoderKL(**vae_cfg)
    toks, encs = [], []
    for j, tc in enumerate(text_cfgs):
        tok = tokenizer(tokens)
        conf = clip_text_config(tok, **{**tc, "max_position_embeddings": tokens})
        if len(tok) > conf.vocab_size:
            raise ValueError(f"tokenizer of {len(tok)} tokens > vocab_size {conf.vocab_size}")
        cls = CLIPTextModelWithProjection if j == 1 else CLIPTextModel
        torch.manual_seed(seed + 1 + j)
        with torch.device(device):
            encs.append(cls(conf))
        toks.append(tok)
    with _quiet():  # diffusers: "modules to keep in float32: []" on .to(bf16)
        unet, vae = unet.to(dtype), vae.to(dtype)
    encs = [e.to(dtype) for e in encs]
    for m in (vae, *encs):
        m.requires_grad_(False).eval()
    return unet, vae, encs, toks


def save_model(path: str | Path, name: str, unet_config: dict[str, Any], *, seed: int = 0) -> Path:
    """Write model ``name`` as a diffusers folder (unet, vae, text encoder(s), tokenizer(s),
    scheduler, model_index.json) that :func:`snpo.models.load_model` reads."""
    from snpo.models import build_scheduler, save_model_folder

    unet, vae, encs, toks = build_parts(name, unet_config, seed=seed)
    with _quiet():
        return save_model_folder(
            path,
            unet=unet,
            text_encoders=encs,
            tokenizers=toks,
            scheduler=build_scheduler(),
            vae=vae,
        )


# ---------------------------------------------------------------------------------------------
# SD3.5-Medium-structured flow-matching models (family "sd3")
# ---------------------------------------------------------------------------------------------
# SD3's VAE: SD's structure with 16 latent channels, no quant convs, shift and scale
# (stable-diffusion-3-medium and -3.5-medium vae/config.json: block_out_channels 128/256/512/512,
# shift_factor 0.0609, scaling_factor 1.5305): 83,819,683 parameters (SD_VAE's 83,653,863 +
# 110,616 for the 32-channel moments conv + 55,296 for the 16-channel decoder input − 92 for
# the two 1×1 quant convs)
SD3_VAE: dict[str, Any] = {
    **SD_VAE,
    "latent_channels": 16,
    "use_quant_conv": False,
    "use_post_quant_conv": False,
    "scaling_factor": 1.5305,
    "shift_factor": 0.0609,
    "sample_size": 1024,
}
# the same structure at a quarter of the width (as SMALL_VAE): 256 px → latents 16×32×32
SD3_SMALL_VAE: dict[str, Any] = {
    **SD3_VAE,
    "block_out_channels": (32, 64, 128, 128),
    "sample_size": 256,
}
TINY_SD3_VAE: dict[str, Any] = {
    **TINY_VAE,
    "latent_channels": 16,
    "use_quant_conv": False,
    "use_post_quant_conv": False,
    "scaling_factor": 1.5305,
    "shift_factor": 0.0609,
}
# reduced text encoders of SD3's three: CLIP-L (768) and CLIP-G (1280) at a quarter of their
# widths, 2 layers each, and a 2-layer T5 encoder of width 512 (T5-XXL: 4096): the CLIP
# features (192 + 320 = 512) fill the T5 width exactly, as 768 + 1280 = 2048 are zero-padded to
# 4096 in SD3.5
CLIP_L_SMALL: dict[str, Any] = {
    **CLIP_L,
    "vocab_size": 1024,
    "hidden_size": 192,
    "intermediate_size": 768,
    "num_hidden_layers": 2,
    "num_attention_heads": 3,
    "projection_dim": 192,
}
CLIP_G_SMALL: dict[str, Any] = {
    **CLIP_BIGG,
    "vocab_size": 1024,
    "hidden_size": 320,
    "intermediate_size": 1280,
    "num_hidden_layers": 2,
    "num_attention_heads": 5,
    "projection_dim": 320,
}
# T5 sizes: {"width", "layers"} for snpo.models.tiny_flow.build_t5_encoder's small encoder, or
# T5Config keyword arguments (a dict with "d_model") for a full one
T5_SMALL: dict[str, Any] = {"width": 512, "layers": 2}
TINY_T5: dict[str, Any] = {"width": 48, "layers": 2}
# google/t5-v1_1-xxl's encoder (SD3.5's text_encoder_3): 4,762,310,656 parameters = the
# 32128 × 4096 embedding + 24 × (4 · 4096² attention + 3 · 4096 · 10240 gated-GELU FF + 2 · 4096
# norms) + the 32 × 64 relative-position bias + the final 4096 norm. The embedding keeps the real
# vocabulary; the benchmark's T5 tokenizer uses only its first ids.
T5_XXL: dict[str, Any] = {
    "vocab_size": 32128,
    "d_model": 4096,
    "d_kv": 64,
    "d_ff": 10240,
    "num_layers": 24,
    "num_heads": 64,
    "relative_attention_num_buckets": 32,
    "relative_attention_max_distance": 128,
    "feed_forward_proj": "gated-gelu",  # dense_act_fn gelu_new, gated
    "layer_norm_epsilon": 1e-6,
    "dropout_rate": 0.1,
    "tie_word_embeddings": False,
}
T5_TOKENS = 256  # StableDiffusion3Pipeline's max_sequence_length

# per flow model of trainer_cases.MODELS: (VAE config, (CLIP-L, CLIP-G) configs, T5 size,
# CLIP tokens per prompt)
FLOW_COMPONENTS: dict[str, tuple[dict[str, Any], tuple[dict[str, Any], ...], dict, int]] = {
    "sd35m": (SD3_VAE, (CLIP_L, CLIP_BIGG), T5_XXL, 77),
    "sd35m-small": (SD3_SMALL_VAE, (CLIP_L_SMALL, CLIP_G_SMALL), T5_SMALL, 77),
    "tiny-sd3": (TINY_SD3_VAE, (TINY_CLIP, TINY_CLIP), TINY_T5, 16),
}


def build_t5(tokenizer, size: dict[str, Any], *, seed: int = 0):
    """A seeded random ``T5EncoderModel`` of ``size`` (see :data:`T5_SMALL`, :data:`T5_XXL`)
    for ``tokenizer``: hidden states (batch, tokens, width). A T5Config size keeps its
    ``vocab_size`` (≥ the tokenizer's) and takes the tokenizer's pad / eos ids."""
    from transformers import T5Config, T5EncoderModel

    from snpo.models.tiny_flow import build_t5_encoder

    if "width" in size:
        return build_t5_encoder(tokenizer, size["width"], size["layers"], seed=seed)
    conf = T5Config(
        **size, pad_token_id=tokenizer.pad_token_id, eos_token_id=tokenizer.eos_token_id
    )
    if len(tokenizer) > conf.vocab_size:
        raise ValueError(f"tokenizer of {len(tokenizer)} tokens > vocab_size {conf.vocab_size}")
    torch.manual_seed(seed)
    return T5EncoderModel(conf)


def build_flow_parts(
    name: str,
    transformer_config: dict[str, Any],
    *,
    seed: int = 0,
    device: torch.device | str = "cpu",
    dtype: torch.dtype = torch.float32,
):
    """(transformer, vae, [CLIP-L, CLIP-G, T5], tokenizers) of SD3-class model ``name``
    (``FLOW_COMPONENTS``) with seeded random weights in ``dtype`` on ``device``; the VAE and the
    encoders in eval mode without gradients. Both CLIPs carry a projection (their pooled
    ``text_embeds``), the T5 tokenizer is :func:`snpo.models.tiny_flow.build_t5_tokenizer`'s
    Unigram vocabulary of :data:`WORDS`."""
    from diffusers import AutoencoderKL, SD3Transformer2DModel
    from transformers import CLIPTextModelWithProjection

    from snpo.models import clip_text_config
    from snpo.models.tiny_flow import build_t5_tokenizer

    vae_cfg, clip_cfgs, t5_cfg, tokens = FLOW_COMPONENTS[name]
    device = torch.device(device)
    torch.manual_seed(seed)
    with _quiet(), torch.device(device):
        transformer = SD3Transformer2DModel(**transformer_config)
        vae = AutoencoderKL(**vae_cfg)
    toks, encs = [], []
    for j, tc in enumerate(clip_cfgs):
        tok = tokenizer(tokens)
        conf = clip_text_config(tok, **{**tc, "max_position_embeddings": tokens})
        torch.manual_seed(seed + 1 + j)
        with torch.device(device):
            encs.append(CLIPTextModelWithProjection(conf))
        toks.append(tok)
    t5_tok = build_t5_tokenizer(list(WORDS), max_length=T5_TOKENS)
    with torch.device(device):
        t5 = build_t5(t5_tok, t5_cfg, seed=seed + 3)
    encs.append(t5)
    toks.append(t5_tok)
    with _quiet():
        transformer, vae = transformer.to(dtype), vae.to(dtype)
    encs = [e.to(dtype) for e in encs]
    for m in (vae, *encs):
        m.requires_grad_(False).eval()
    return transformer, vae, encs, toks
