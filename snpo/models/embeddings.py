"""Prompt embeddings and the family-independent text front-ends.

``encode_prompts`` / ``null_embedding`` / ``unet_conditioning`` route to the model's family
(:mod:`snpo.models.family`); the embedding layout per family is described in its module.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from snpo.models.family import family_of


@dataclass
class PromptEmbeddings:
    """embeds: (B, L, D); pooled: (B, D2) for families with a pooled text embedding, else None."""

    embeds: torch.Tensor
    pooled: torch.Tensor | None = None

    def __len__(self) -> int:
        return self.embeds.shape[0]

    def to(self, *args, **kwargs) -> PromptEmbeddings:
        pooled = None if self.pooled is None else self.pooled.to(*args, **kwargs)
        return PromptEmbeddings(self.embeds.to(*args, **kwargs), pooled)

    def index(self, idx: torch.Tensor | slice) -> PromptEmbeddings:
        return PromptEmbeddings(self.embeds[idx], None if self.pooled is None else self.pooled[idx])

    def expand(self, batch: int) -> PromptEmbeddings:
        """Broadcast a single embedding (B = 1) to ``batch`` rows."""
        pooled = None if self.pooled is None else self.pooled.expand(batch, -1)
        return PromptEmbeddings(self.embeds.expand(batch, -1, -1), pooled)

    @staticmethod
    def cat(items: list[PromptEmbeddings]) -> PromptEmbeddings:
        pooled = None if items[0].pooled is None else torch.cat([i.pooled for i in items])
        return PromptEmbeddings(torch.cat([i.embeds for i in items]), pooled)

    @staticmethod
    def where(mask: torch.Tensor, a: PromptEmbeddings, b: PromptEmbeddings) -> PromptEmbeddings:
        """Row-wise choice: a where mask (B,) is True, else b."""
        embeds = torch.where(mask[:, None, None], a.embeds, b.embeds)
        pooled = None if a.pooled is None else torch.where(mask[:, None], a.pooled, b.pooled)
        return PromptEmbeddings(embeds, pooled)


def encode_prompts(model, prompts: list[str]) -> PromptEmbeddings:
    """Text conditioning of B prompts in the encoders' dtype (the family's layout)."""
    return family_of(model).encode_prompts(model, prompts)


def null_embedding(model) -> PromptEmbeddings:
    """The (1, L, D) unconditional embedding of CFG and of the reversed-preference branch."""
    return family_of(model).null_embedding(model)


def unet_conditioning(
    model, emb: PromptEmbeddings, time_id_rows: torch.Tensor | None = None
) -> dict:
    """Keyword arguments of the denoiser for B rows of embeddings (SDXL: and (B, 6) time ids)."""
    return family_of(model).conditioning(model, emb, time_id_rows)
