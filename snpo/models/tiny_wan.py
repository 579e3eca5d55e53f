"""A tiny Wan2.1-class text-to-video folder (``WanPipeline``), built offline.

The builder assembles ``WanPipeline`` from small random components and calls its
``save_pretrained``, so the layout and ``model_index.json`` are what diffusers writes for
``Wan-AI/Wan2.1-T2V-1.3B-Diffusers``. Nothing is downloaded: the UMT5 tokenizer is
:func:`snpo.models.tiny_flow.build_t5_tokenizer`'s Unigram vocabulary (a T5 tokenizer, as the
real folder's), the text encoder a 2-layer ``UMT5EncoderModel``.

Structure kept from the real model: an ``AutoencoderKLWan`` with 16 latent channels, 8×
spatial and 4× temporal reduction (F frames → F' = (F − 1)/4 + 1 latent frames) and its
per-channel ``latents_mean`` / ``latents_std`` (the diffusers defaults, which are Wan2.1's);
a ``WanTransformer3DModel`` with patches (1, 2, 2) — images of side 32 give 4×4 latents and
2×2 tokens per frame; a ``UniPCMultistepScheduler`` with flow sigmas and ``flow_shift`` 3.0,
the scheduler the real folder ships.
"""

from __future__ import annotations

from pathlib import Path

import torch

from snpo.models.tiny_flow import WORDS, build_t5_encoder, build_t5_tokenizer

TEXT_WIDTH = 32  # UMT5 d_model (4096 in UMT5-XXL)
LATENT_CHANNELS = 16
FLOW_SHIFT = 3.0  # Wan2.1-T2V-1.3B-Diffusers' scheduler flow_shift (480p)
TINY_RESOLUTION = 32  # the smallest side with more than one token: 32 / 8 / 2 = 2


def build_umt5_encoder(tokenizer, width: int = TEXT_WIDTH, layers: int = 2, seed: int = 0):
    """A small ``UMT5EncoderModel`` (random weights, seeded; :func:`build_t5_encoder` with
    ``umt5``); UMT5 has a relative position bias in every layer (T5 only in the first)."""
    return build_t5_encoder(tokenizer, width, layers, seed, umt5=True)


def build_wan_vae(seed: int = 0):
    """An ``AutoencoderKLWan``: 16 latent channels, 8× spatial (three downsamplings), 4×
    temporal (the last two of them also in time), Wan2.1's latent mean / std."""
    from diffusers import AutoencoderKLWan

    torch.manual_seed(seed)
    return AutoencoderKLWan(
        base_dim=8,
        z_dim=LATENT_CHANNELS,
        dim_mult=[1, 1, 1, 1],
        num_res_blocks=1,
        attn_scales=[],
        temperal_downsample=[False, True, True],
    )


def build_wan_transformer(seed: int = 0):
    """A 2-layer ``WanTransformer3DModel`` (patches 1×2×2, 2 heads of 8) on 16 channels."""
    from diffusers import WanTransformer3DModel

    torch.manual_seed(seed)
    return WanTransformer3DModel(
        patch_size=(1, 2, 2),
        num_attention_heads=2,
        attention_head_dim=8,
        in_channels=LATENT_CHANNELS,
        out_channels=LATENT_CHANNELS,
        text_dim=TEXT_WIDTH,
        freq_dim=16,
        ffn_dim=32,
        num_layers=2,
        cross_attn_norm=True,
        qk_norm="rms_norm_across_heads",
        rope_max_seq_len=32,
    )


def build_wan_scheduler(flow_shift: float = FLOW_SHIFT):
    """``UniPCMultistepScheduler`` configured as the real Wan2.1 folder's (flow sigmas,
    flow_prediction, ``flow_shift``)."""
    from diffusers import UniPCMultistepScheduler

    return UniPCMultistepScheduler(
        num_train_timesteps=1000,
        prediction_type="flow_prediction",
        use_flow_sigmas=True,
        flow_shift=flow_shift,
        solver_order=2,
        predict_x0=True,
        solver_type="bh2",
        lower_order_final=True,
    )


def build_wan_pipeline(seed: int = 0, flow_shift: float = FLOW_SHIFT):
    """A tiny ``WanPipeline`` (random weights)."""
    from diffusers import WanPipeline

    tok = build_t5_tokenizer(WORDS)
    return WanPipeline(
        tokenizer=tok,
        text_encoder=build_umt5_encoder(tok, seed=seed + 1),
        vae=build_wan_vae(seed + 2),
        scheduler=build_wan_scheduler(flow_shift),
        transformer=build_wan_transformer(seed),
    )


def save_tiny_wan(path: str | Path, *, seed: int = 0, flow_shift: float = FLOW_SHIFT) -> Path:
    """Write a tiny Wan2.1-class folder (``WanPipeline.save_pretrained``); its path."""
    path = Path(path)
    build_wan_pipeline(seed, flow_shift).save_pretrained(path)
    return path
