"""Tiny SD3-class and FLUX.1-dev-class flow-matching model folders, built offline.

Each builder assembles the diffusers pipeline itself (``StableDiffusion3Pipeline`` /
``FluxPipeline``) from small random components and calls its ``save_pretrained``, so the folder
layout and ``model_index.json`` are exactly what diffusers writes for the real models. Nothing
is downloaded: the CLIP tokenizers are :func:`snpo.models.tiny.build_tokenizer`'s word-level
BPE, the T5 tokenizer a Unigram vocabulary of the same words (transformers ≥ 5 builds it from
``(piece, score)`` pairs, no sentencepiece model needed).

Sizes (seconds on one CPU core): CLIP encoders of width 16, a T5 of width 48 (so the SD3
encoder zero-pads the CLIP features 32 → 48, as it pads 2048 → 4096 in SD3), a 2-layer
transformer on 16-channel latents, a VAE with 2× reduction and SD3's ``shift_factor`` /
``scaling_factor``.
"""

from __future__ import annotations

from pathlib import Path

import torch

from snpo.models.tiny import build_text_encoder, build_tokenizer

WORDS = ["a", "photo", "of", "red", "blue", "green", "cube", "ball", "cat", "dog"]
CLIP_WIDTH = 16
T5_WIDTH = 48
LATENT_CHANNELS = 16
# SD3's VAE normalisation (stabilityai/stable-diffusion-3-medium vae/config.json)
VAE_SHIFT = 0.0609
VAE_SCALE = 1.5305


def build_t5_tokenizer(words: list[str], max_length: int = 512):
    """A T5 tokenizer (Unigram) with ``<pad>`` 0, ``</s>`` 1, ``<unk>`` 2, then "▁word" per word."""
    from transformers import T5Tokenizer

    vocab = [("<pad>", 0.0), ("</s>", 0.0), ("<unk>", 0.0), ("▁", -2.0)]
    vocab += [("▁" + w, -1.0) for w in sorted({w.lower() for w in words if w})]
    return T5Tokenizer(vocab=vocab, extra_ids=0, model_max_length=max_length)


def build_t5_encoder(
    tokenizer, width: int = T5_WIDTH, layers: int = 2, seed: int = 0, *, umt5: bool = False
):
    """A small ``T5EncoderModel`` (random weights, seeded); ``umt5``: a gated-GELU
    ``UMT5EncoderModel`` instead (:func:`snpo.models.tiny_wan.build_umt5_encoder`)."""
    from transformers import T5Config, T5EncoderModel, UMT5Config, UMT5EncoderModel

    config_cls, model_cls = (UMT5Config, UMT5EncoderModel) if umt5 else (T5Config, T5EncoderModel)
    extra = {"feed_forward_proj": "gated-gelu"} if umt5 else {}
    cfg = config_cls(
        vocab_size=len(tokenizer),
        d_model=width,
        d_kv=width // 4,
        d_ff=2 * width,
        num_layers=layers,
        num_heads=4,
        relative_attention_num_buckets=8,
        relative_attention_max_distance=32,
        **extra,
        pad_token_id=0,
        eos_token_id=1,
    )
    torch.manual_seed(seed)
    return model_cls(cfg)


def build_flow_vae(seed: int = 0):
    """An ``AutoencoderKL`` with 16 latent channels, 2× reduction, SD3's shift and scale."""
    from diffusers import AutoencoderKL

    torch.manual_seed(seed)
    return AutoencoderKL(
        in_channels=3,
        out_channels=3,
        down_block_types=("DownEncoderBlock2D", "DownEncoderBlock2D"),
        up_block_types=("UpDecoderBlock2D", "UpDecoderBlock2D"),
        block_out_channels=(16, 32),
        latent_channels=LATENT_CHANNELS,
        norm_num_groups=8,
        layers_per_block=1,
        scaling_factor=VAE_SCALE,
        shift_factor=VAE_SHIFT,
        use_quant_conv=False,
        use_post_quant_conv=False,
    )


def _text_parts(seed: int, clip_max_length: int = 16):
    tok = build_tokenizer(WORDS, max_length=clip_max_length)
    clip_l = build_text_encoder(tok, hidden=CLIP_WIDTH, with_projection=True, seed=seed)
    clip_g = build_text_encoder(tok, hidden=CLIP_WIDTH, with_projection=True, seed=seed + 1)
    t5_tok = build_t5_tokenizer(WORDS)
    t5 = build_t5_encoder(t5_tok, seed=seed + 2)
    return tok, clip_l, clip_g, t5_tok, t5


def build_sd3_pipeline(resolution: int = 16, shift: float = 3.0, seed: int = 0):
    """A tiny ``StableDiffusion3Pipeline`` (random weights) for ``resolution``² images."""
    from diffusers import (
        FlowMatchEulerDiscreteScheduler,
        SD3Transformer2DModel,
        StableDiffusion3Pipeline,
    )

    tok, clip_l, clip_g, t5_tok, t5 = _text_parts(seed)
    torch.manual_seed(seed)
    transformer = SD3Transformer2DModel(
        sample_size=resolution // 2,
        patch_size=2,
        in_channels=LATENT_CHANNELS,
        out_channels=LATENT_CHANNELS,
        num_layers=2,
        attention_head_dim=8,
        num_attention_heads=4,
        joint_attention_dim=T5_WIDTH,
        caption_projection_dim=32,
        pooled_projection_dim=2 * CLIP_WIDTH,
        pos_embed_max_size=resolution,
    )
    return StableDiffusion3Pipeline(
        transformer=transformer,
        scheduler=FlowMatchEulerDiscreteScheduler(num_train_timesteps=1000, shift=shift),
        vae=build_flow_vae(seed),
        text_encoder=clip_l,
        tokenizer=tok,
        text_encoder_2=clip_g,
        tokenizer_2=tok,
        text_encoder_3=t5,
        tokenizer_3=t5_tok,
    )


def build_flux_pipeline(resolution: int = 16, seed: int = 0):
    """A tiny FLUX.1-dev-class ``FluxPipeline``: ``guidance_embeds=True`` (guidance-distilled)."""
    from diffusers import FlowMatchEulerDiscreteScheduler, FluxPipeline, FluxTransformer2DModel

    tok, _, _, t5_tok, t5 = _text_parts(seed)
    clip_l = build_text_encoder(tok, hidden=CLIP_WIDTH, seed=seed)  # FLUX: pooler_output
    torch.manual_seed(seed)
    transformer = FluxTransformer2DModel(
        patch_size=1,
        in_channels=4 * LATENT_CHANNELS,  # 2×2 patches packed into channels
        num_layers=1,
        num_single_layers=1,
        attention_head_dim=8,
        num_attention_heads=2,
        joint_attention_dim=T5_WIDTH,
        pooled_projection_dim=CLIP_WIDTH,
        guidance_embeds=True,
        axes_dims_rope=(2, 2, 4),
    )
    scheduler = FlowMatchEulerDiscreteScheduler(
        num_train_timesteps=1000,
        shift=3.0,
        use_dynamic_shifting=True,
        base_shift=0.5,
        max_shift=1.15,
        base_image_seq_len=256,
        max_image_seq_len=4096,
    )
    return FluxPipeline(
        transformer=transformer,
        scheduler=scheduler,
        vae=build_flow_vae(seed),
        text_encoder=clip_l,
        tokenizer=tok,
        text_encoder_2=t5,
        tokenizer_2=t5_tok,
    )


def save_tiny_sd3(path: str | Path, *, resolution: int = 16, shift: float = 3.0, seed: int = 0):
    """Write a tiny SD3-class folder (``StableDiffusion3Pipeline.save_pretrained``); its path."""
    path = Path(path)
    build_sd3_pipeline(resolution, shift, seed).save_pretrained(path)
    return path


def save_tiny_flux(path: str | Path, *, resolution: int = 16, seed: int = 0) -> Path:
    """Write a tiny FLUX.1-dev-class folder (``FluxPipeline.save_pretrained``); its path."""
    path = Path(path)
    build_flux_pipeline(resolution, seed).save_pretrained(path)
    return path
