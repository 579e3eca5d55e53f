"""The three sections of a cache, their labels and the relative paths of their shards
(K: shard index, S: pairs or prompts per shard, E: epoch)::

    text/index.safetensors        pair → prompt id
    text/null.safetensors         the null embedding
    text/tKKKKK.safetensors       distinct prompts K·S .. (K+1)·S − 1
    latents/sKKKKK.safetensors    pairs K·S .. (K+1)·S − 1, every flip variant (center crop)
    latents/eEEEE/sKKKKK...       the same pairs, the drawn crop+flip of epoch E
    ref/eEEEE/sKKKKK.safetensors  reference errors of those pairs in epoch E
"""

from __future__ import annotations

import re

from snpo.config import CACHE_SECTIONS

SECTIONS = CACHE_SECTIONS  # ("latents", "text", "ref"), named in TrainConfig.cache_use
SECTION_LABEL = {
    "latents": "VAE latent distributions",
    "text": "text embeddings",
    "ref": "reference errors",
}
TEXT_INDEX = "text/index.safetensors"
TEXT_NULL = "text/null.safetensors"
EPOCH_RE = re.compile(r"/e(\d{4})/s\d{5}\.safetensors$")


def text_rel(k: int) -> str:
    """Path of text shard ``k`` (distinct prompts k·S .. (k+1)·S − 1)."""
    return f"text/t{k:05d}.safetensors"


def latent_rel(k: int, epoch: int | None) -> str:
    """Path of latent shard ``k``: epoch-independent (``epoch`` None) or of one epoch."""
    if epoch is None:
        return f"latents/s{k:05d}.safetensors"
    return f"latents/e{epoch:04d}/s{k:05d}.safetensors"


def ref_rel(k: int, epoch: int) -> str:
    """Path of reference-error shard ``k`` of ``epoch``."""
    return f"ref/e{epoch:04d}/s{k:05d}.safetensors"


def shard_epoch(rel: str) -> int | None:
    """The epoch a per-epoch shard path names (None for epoch-independent shards)."""
    m = EPOCH_RE.search(rel)
    return int(m.group(1)) if m else None


def span(epochs: list[int]) -> str:
    """Epochs in words: "no epoch", "epoch 3", "epochs 0–4" or "epochs 0, 2, 5"."""
    if not epochs:
        return "no epoch"
    if epochs == list(range(epochs[0], epochs[-1] + 1)):
        return f"epoch {epochs[0]}" if len(epochs) == 1 else f"epochs {epochs[0]}–{epochs[-1]}"
    return "epochs " + ", ".join(map(str, epochs))
