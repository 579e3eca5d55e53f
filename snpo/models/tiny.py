"""Tiny SD1.5- and SDXL-class diffusers models built offline (tests, the small world, demos).

Everything is made from configs here and saved with ``save_pretrained`` in the diffusers folder
layout that :func:`snpo.models.load_model` reads, so tests exercise the real loading code with
nothing downloaded. The tokenizer is a real CLIP BPE tokenizer over a small word list.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch

SPECIAL = ("<|startoftext|>", "<|endoftext|>")


def build_tokenizer(words: list[str], max_length: int = 16):
    """A CLIPTokenizer whose BPE merges spell each word of ``words`` as ONE token.

    Each word's merges spell it left to right; then, since BPE applies the best-ranked merge
    first and one word's merges can shadow another's ("right" adds r+i before "triangle" adds
    t+r, leaving "triangle" in 7 pieces), while a word tokenizes to several pieces the merge of
    its first two pieces is appended."""
    from transformers import CLIPTokenizer

    words = sorted({w.lower() for w in words if w})
    vocab: dict[str, int] = {tok: i for i, tok in enumerate(SPECIAL)}
    merges: list[tuple[str, str]] = []
    for c in sorted(set("".join(words))):
        vocab.setdefault(c, len(vocab))
        vocab.setdefault(c + "</w>", len(vocab))
    for w in words:
        pieces = list(w[:-1]) + [w[-1] + "</w>"]
        cur = pieces[0]
        for piece in pieces[1:]:
            if (cur, piece) not in merges:
                merges.append((cur, piece))
            cur += piece
            vocab.setdefault(cur, len(vocab))
    bad: dict[str, list[str]] = {}
    for _ in range(10 * sum(len(w) for w in words) + 1):
        tok = CLIPTokenizer(vocab=vocab, merges=merges, model_max_length=max_length)
        bad = {w: p for w in words if len(p := tok.tokenize(w)) != 1}
        if not bad:
            return tok
        for pieces in bad.values():
            pair = (pieces[0], pieces[1])
            if pair not in merges:
                merges.append(pair)
                vocab.setdefault(pair[0] + pair[1], len(vocab))
    raise RuntimeError(f"could not make every word one token: {bad}")


def clip_text_config(tokenizer, **fields):
    """A CLIPTextConfig for ``tokenizer``: its vocabulary size, length and special tokens, with
    ``fields`` (CLIPTextConfig arguments) on top."""
    from transformers import CLIPTextConfig

    eos = tokenizer.convert_tokens_to_ids(SPECIAL[1])
    base = {
        "vocab_size": len(tokenizer),
        "max_position_embeddings": tokenizer.model_max_length,
        "bos_token_id": tokenizer.convert_tokens_to_ids(SPECIAL[0]),
        "eos_token_id": eos,
        "pad_token_id": eos,
    }
    return CLIPTextConfig(**{**base, **fields})


def build_text_encoder(
    tokenizer, hidden: int = 32, layers: int = 2, with_projection: bool = False, seed: int = 0
):
    """A small CLIP text encoder sized for ``tokenizer`` (random weights, seeded)."""
    from transformers import CLIPTextModel, CLIPTextModelWithProjection

    cfg = clip_text_config(
        tokenizer,
        hidden_size=hidden,
        intermediate_size=2 * hidden,
        num_hidden_layers=layers,
        num_attention_heads=4,
        projection_dim=hidden,
    )
    torch.manual_seed(seed)
    cls = CLIPTextModelWithProjection if with_projection else CLIPTextModel
    return cls(cfg)


def build_unet(
    *,
    sample_size: int,
    in_channels: int,
    cross_attention_dim: int,
    channels: tuple[int, ...] = (32, 64),
    sdxl_pooled_dim: int | None = None,
    seed: int = 0,
):
    """A small UNet2DConditionModel; ``sdxl_pooled_dim`` adds SDXL's text_time conditioning."""
    from diffusers import UNet2DConditionModel

    n = len(channels)
    kw = {}
    if sdxl_pooled_dim is not None:
        kw = dict(
            addition_embed_type="text_time",
            addition_time_embed_dim=8,
            projection_class_embeddings_input_dim=6 * 8 + sdxl_pooled_dim,
        )
    torch.manual_seed(seed)
    return UNet2DConditionModel(
        sample_size=sample_size,
        in_channels=in_channels,
        out_channels=in_channels,
        block_out_channels=channels,
        layers_per_block=1,
        down_block_types=("CrossAttnDownBlock2D",) + ("DownBlock2D",) * (n - 1),
        up_block_types=("UpBlock2D",) * (n - 1) + ("CrossAttnUpBlock2D",),
        cross_attention_dim=cross_attention_dim,
        attention_head_dim=8,
        norm_num_groups=8,
        **kw,
    )


def build_vae(latent_channels: int = 4, seed: int = 0):
    """A small AutoencoderKL with a 2× spatial reduction (random weights)."""
    from diffusers import AutoencoderKL

    torch.manual_seed(seed)
    return AutoencoderKL(
        in_channels=3,
        out_channels=3,
        down_block_types=("DownEncoderBlock2D", "DownEncoderBlock2D"),
        up_block_types=("UpDecoderBlock2D", "UpDecoderBlock2D"),
        block_out_channels=(8, 16),
        latent_channels=latent_channels,
        norm_num_groups=8,
        layers_per_block=1,
    )


def build_scheduler(prediction_type: str = "epsilon", beta_schedule: str = "scaled_linear"):
    from diffusers import DDPMScheduler

    return DDPMScheduler(
        num_train_timesteps=1000,
        beta_start=0.00085,
        beta_end=0.012,
        beta_schedule=beta_schedule,
        prediction_type=prediction_type,
        clip_sample=False,
    )


def model_index(family: str, *, with_vae: bool = True) -> dict:
    """The model_index.json of an ``sd`` / ``sdxl`` folder (pixel space: no VAE entry)."""
    cls = "StableDiffusionXLPipeline" if family == "sdxl" else "StableDiffusionPipeline"
    index = {
        "_class_name": cls if with_vae else "SnpoPixelDiffusion",
        "_diffusers_version": "0.42.1",
        "unet": ["diffusers", "UNet2DConditionModel"],
        "scheduler": ["diffusers", "DDPMScheduler"],
        "text_encoder": ["transformers", "CLIPTextModel"],
        "tokenizer": ["transformers", "CLIPTokenizer"],
        "vae": ["diffusers", "AutoencoderKL"] if with_vae else [None, None],
    }
    if family == "sdxl":
        index["text_encoder_2"] = ["transformers", "CLIPTextModelWithProjection"]
        index["tokenizer_2"] = ["transformers", "CLIPTokenizer"]
        index["force_zeros_for_empty_prompt"] = True
    else:
        index.update(
            safety_checker=[None, None],
            feature_extractor=[None, None],
            requires_safety_checker=False,
        )
    return index


def save_model_folder(
    path: str | Path,
    *,
    unet,
    text_encoders: list,
    tokenizers: list,
    scheduler,
    vae=None,
) -> Path:
    """Save UNet-family components in the diffusers layout: unet/, scheduler/, text_encoder/ +
    tokenizer/ (a second encoder: text_encoder_2/ + tokenizer_2/, the sdxl family), vae/ if
    given, and model_index.json."""
    path = Path(path)
    path.mkdir(parents=True, exist_ok=True)
    for j, (enc, tok) in enumerate(zip(text_encoders, tokenizers)):
        sfx = "" if j == 0 else f"_{j + 1}"
        tok.save_pretrained(path / f"tokenizer{sfx}")
        enc.save_pretrained(path / f"text_encoder{sfx}")
    unet.save_pretrained(path / "unet")
    if vae is not None:
        vae.save_pretrained(path / "vae")
    scheduler.save_pretrained(path / "scheduler")
    family = "sdxl" if len(text_encoders) == 2 else "sd"
    index = model_index(family, with_vae=vae is not None)
    (path / "model_index.json").write_text(json.dumps(index, indent=2))
    return path


def save_tiny_model(
    path: str | Path,
    *,
    family: str = "sd",
    words: list[str] | None = None,
    resolution: int = 16,
    with_vae: bool = True,
    prediction_type: str = "epsilon",
    beta_schedule: str = "scaled_linear",
    unet_channels: tuple[int, ...] = (32, 64),
    text_hidden: int = 32,
    seed: int = 0,
) -> Path:
    """Write a complete tiny model folder (diffusers layout) and return its path.

    family "sd": unet + text_encoder + tokenizer (+ vae); "sdxl": also text_encoder_2 +
    tokenizer_2 and a text_time UNet. Without a VAE the UNet works on 3-channel pixels.
    """
    if family not in ("sd", "sdxl"):
        raise ValueError(f"family must be 'sd' or 'sdxl', got {family!r}")
    words = words or ["a", "photo", "of", "red", "blue", "green", "cube", "ball", "cat", "dog"]
    tok = build_tokenizer(words)
    encoders = [build_text_encoder(tok, hidden=text_hidden, seed=seed)]
    cross, pooled = text_hidden, None
    if family == "sdxl":
        encoders.append(
            build_text_encoder(tok, hidden=text_hidden, with_projection=True, seed=seed + 1)
        )
        cross, pooled = 2 * text_hidden, text_hidden
    scale = 2 if with_vae else 1
    unet = build_unet(
        sample_size=resolution // scale,
        in_channels=4 if with_vae else 3,
        cross_attention_dim=cross,
        channels=unet_channels,
        sdxl_pooled_dim=pooled,
        seed=seed,
    )
    return save_model_folder(
        path,
        unet=unet,
        text_encoders=encoders,
        tokenizers=[tok] * len(encoders),
        scheduler=build_scheduler(prediction_type, beta_schedule),
        vae=build_vae(seed=seed) if with_vae else None,
    )
