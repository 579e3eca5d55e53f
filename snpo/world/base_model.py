"""The world's base model folder: a pixel-space text-to-image diffusion model in the diffusers
layout that :func:`snpo.models.load_model` reads (untrained weights; the trainer's ``sft``
objective pretrains it on :func:`snpo.world.pickapic.write_sft_parquet`'s data).

Components (the tiny-model builders of :mod:`snpo.models`):
- ``unet``: UNet2DConditionModel on 3×16×16 pixels in [−1, 1] (no VAE), channels (32, 64),
  one cross-attention level, cross_attention_dim 32; about 0.8 M parameters.
- ``tokenizer``: a CLIP BPE tokenizer whose vocabulary is the world's words, each word ONE
  token (:func:`build_world_tokenizer`), model_max_length 16.
- ``text_encoder``: a 2-layer CLIP text encoder, hidden size 32 (random weights, seeded; token
  embeddings scaled ×128 so that words stay distinguishable, :func:`build_text_encoder_for_world`).
- ``scheduler``: DDPM, 1000 steps, scaled-linear betas 0.00085–0.012, epsilon prediction.
- ``world.json``: which world the model belongs to (resolution, vocabulary, null embedding).

The null embedding (CFG's unconditional branch, Diff-SNPO's reversed-preference branch) is the
encoded empty prompt (``snpo.models.null_embedding``; SD1.5-class, no zeroing).
"""

from __future__ import annotations

import json
from pathlib import Path

from .vocab import COLOURS, POSITIONS, SHAPES, WORDS

RESOLUTION = 16
UNET_CHANNELS: tuple[int, ...] = (32, 64)
TEXT_HIDDEN = 32
TOKEN_EMBEDDING_SCALE = 128.0
WORLD_VERSION = 1


def world_info(resolution: int = RESOLUTION) -> dict:
    """The contents of ``world.json``."""
    return {
        "world": "snpo-small-world",
        "version": WORLD_VERSION,
        "resolution": resolution,
        "pixel_space": True,
        "null_embedding": "empty_prompt",
        "colours": list(COLOURS),
        "shapes": list(SHAPES),
        "positions": list(POSITIONS),
        "words": WORDS,
    }


def build_world_tokenizer(words: list[str] | None = None, max_length: int = 16):
    """A CLIPTokenizer that spells every word of ``words`` (default: the world's) as ONE token
    (``snpo.models.build_tokenizer``)."""
    from snpo.models import build_tokenizer

    return build_tokenizer(list(words or WORDS), max_length)


def build_text_encoder_for_world(tokenizer, seed: int = 0):
    """The frozen random CLIP text encoder (2 layers, hidden 32) with its token embeddings
    multiplied by TOKEN_EMBEDDING_SCALE.

    Why: at the default initialisation (token and position embeddings both N(0, 0.02²)) the
    random layers wash the words out: two prompts differing in one position word get hidden
    states of cosine 0.99 at that word, and a UNet pretrained on them learns colour but
    hardly shape or position. Scaled up, each word's hidden state is dominated by its own
    embedding (worst cosine between two words of one kind ≈ 0.3), as a pretrained encoder's
    distinct word embeddings would be. It is still a standard CLIPTextModel."""
    import torch

    from snpo.models import build_text_encoder

    te = build_text_encoder(tokenizer, hidden=TEXT_HIDDEN, seed=seed)
    with torch.no_grad():
        te.embeddings.token_embedding.weight.mul_(TOKEN_EMBEDDING_SCALE)
    return te


def build_base_model_folder(path: str | Path, seed: int = 0, resolution: int = RESOLUTION) -> Path:
    """Write the untrained base model folder at ``path`` and return it.

    Weights are a pure function of ``seed`` (torch.manual_seed before each module is built).
    The folder loads with ``snpo.models.load_model(str(path))`` and samples with
    ``snpo.models.generate``."""
    from snpo.models import build_scheduler, build_unet

    path = Path(path)
    if (path / "unet").exists():
        raise FileExistsError(f"{path} already holds a model (unet/); choose an empty folder")
    path.mkdir(parents=True, exist_ok=True)
    tok = build_world_tokenizer(WORDS)
    tok.save_pretrained(path / "tokenizer")
    build_text_encoder_for_world(tok, seed=seed).save_pretrained(path / "text_encoder")
    unet = build_unet(
        sample_size=resolution,
        in_channels=3,
        cross_attention_dim=TEXT_HIDDEN,
        channels=UNET_CHANNELS,
        seed=seed,
    )
    unet.save_pretrained(path / "unet")
    build_scheduler("epsilon", "scaled_linear").save_pretrained(path / "scheduler")
    index = {
        "_class_name": "SnpoPixelDiffusion",
        "_diffusers_version": "0.42.1",
        "unet": ["diffusers", "UNet2DConditionModel"],
        "scheduler": ["diffusers", "DDPMScheduler"],
        "text_encoder": ["transformers", "CLIPTextModel"],
        "tokenizer": ["transformers", "CLIPTokenizer"],
        "vae": [None, None],
        "safety_checker": [None, None],
        "feature_extractor": [None, None],
        "requires_safety_checker": False,
    }
    (path / "model_index.json").write_text(json.dumps(index, indent=2) + "\n")
    info = world_info(resolution) | {"seed": seed}
    (path / "world.json").write_text(json.dumps(info, indent=2) + "\n")
    return path


def read_world_info(path: str | Path) -> dict | None:
    """``world.json`` of a model folder, or None when the folder is not a world model."""
    f = Path(path) / "world.json"
    return json.loads(f.read_text()) if f.exists() else None
