"""The guidance-distilled flow family (``flux``): FLUX.1-dev-class transformers.

A folder as ``FluxPipeline.save_pretrained`` writes it: ``transformer/`` (FluxTransformer2DModel,
``guidance_embeds`` true for FLUX.1-dev), ``scheduler/`` (FlowMatchEulerDiscreteScheduler with
dynamic shifting), ``vae/``, ``text_encoder`` (CLIP-L) + ``text_encoder_2`` (T5-XXL).

FLUX.1-dev was distilled from a CFG teacher: the guidance scale is an INPUT (``guidance``, an
embedding like the timestep's) and one conditional forward reproduces the guided prediction.
There is no trained unconditional branch, so objectives that train a reversed preference on
the null prompt (snpo, snpo_naive, npo) have nothing to train: :func:`check_objective` refuses
them. (FLUX.1-schnell, timestep-distilled without a guidance input, has no CFG branch either
and is the same family; FluxFillPipeline / FluxKontextPipeline folders take image inputs and
are not matched.)
dpo / bdpo train the conditional prediction at a fixed embedded guidance (``guidance_scale``,
3.5 by default as in diffusers' FLUX training scripts) and sample with it, without CFG.

Conditioning: ``pooled`` = CLIP-L ``pooler_output`` (B, 768), ``embeds`` = T5 last hidden state
(B, 512, 4096) (``FluxPipeline.encode_prompt``). Latents (B, 16, h, w) are packed into 2×2
patches (B, h/2·w/2, 64) inside :meth:`FluxFamily.denoise`, with the positional ids the pipeline
builds; the transformer takes timestep = σ (it multiplies by 1000 itself), so denoise divides the
family-wide 1000·σ by 1000.
"""

from __future__ import annotations

from typing import ClassVar

import torch

from snpo.models.diffusion import DiffusionModel
from snpo.models.embeddings import PromptEmbeddings
from snpo.models.family import LoadRequest, register
from snpo.models.sd3 import FlowMatchingFamily, index_matches, require_text_encoders, tokenize

FLUX_PIPELINE = "FluxPipeline"
FLUX_TRANSFORMER = "FluxTransformer2DModel"
T5_MAX_LENGTH = 512  # FluxPipeline's default max_sequence_length
DEFAULT_GUIDANCE = 3.5  # FluxPipeline's default guidance_scale
NULL_BRANCH_OBJECTIVES = ("snpo", "snpo_naive", "npo")
NO_NULL_BRANCH = (
    "FLUX.1-dev-class models are guidance-distilled: they have no null (unconditional) branch "
    "to train; use objective dpo or bdpo"
)


def check_objective(objective: str, has_null_branch: bool = False) -> None:
    """ValueError (one line, :data:`NO_NULL_BRANCH`) when ``objective`` trains the null branch
    and the model has none."""
    if not has_null_branch and objective in NULL_BRANCH_OBJECTIVES:
        raise ValueError(f"objective {objective!r}: {NO_NULL_BRANCH}")


def pack_latents(x: torch.Tensor) -> torch.Tensor:
    """(B, C, h, w) → (B, (h/2)·(w/2), 4C): 2×2 patches, channel-major inside a patch."""
    b, c, h, w = x.shape
    x = x.reshape(b, c, h // 2, 2, w // 2, 2).permute(0, 2, 4, 1, 3, 5)
    return x.reshape(b, (h // 2) * (w // 2), 4 * c)


def unpack_latents(x: torch.Tensor, h: int, w: int) -> torch.Tensor:
    """The inverse of :func:`pack_latents`: (B, (h/2)·(w/2), 4C) → (B, C, h, w)."""
    b, _, d = x.shape
    c = d // 4
    x = x.reshape(b, h // 2, w // 2, c, 2, 2).permute(0, 3, 1, 4, 2, 5)
    return x.reshape(b, c, h, w)


def image_ids(h: int, w: int, device, dtype) -> torch.Tensor:
    """((h/2)·(w/2), 3) positional ids (0, row, column) of the packed patches."""
    rows = torch.arange(h // 2, device=device, dtype=dtype)[:, None].expand(h // 2, w // 2)
    cols = torch.arange(w // 2, device=device, dtype=dtype)[None, :].expand(h // 2, w // 2)
    zeros = torch.zeros_like(rows)
    return torch.stack([zeros, rows, cols], dim=-1).reshape(-1, 3)


class FluxFamily(FlowMatchingFamily):
    """FLUX.1-dev-class (see the module docstring)."""

    name: ClassVar[str] = "flux"
    pipeline_class: ClassVar[str] = FLUX_PIPELINE
    denoiser_class: ClassVar[str] = "FluxTransformer2DModel"
    has_null_branch: ClassVar[bool] = False

    def configure(self, model, options) -> None:
        """Flow σ sampling (as SD3) and the embedded guidance ``guidance_scale``."""
        super().configure(model, options)
        model.extra["guidance_scale"] = float(options.guidance_scale)

    # FLUX attention (double and single blocks) as diffusers' FLUX LoRA scripts target it
    lora_targets: ClassVar[tuple[str, ...]] = (
        "to_q",
        "to_k",
        "to_v",
        "to_out.0",
        "add_q_proj",
        "add_k_proj",
        "add_v_proj",
        "to_add_out",
    )

    def latent_channels(self, model: DiffusionModel) -> int:
        """Channels of an unpacked latent (16): the transformer's in_channels count 2×2 patches."""
        return model.unet.config.in_channels // 4

    def sampling_sigmas(self, steps: int) -> list[float]:
        """σ_i = 1 − i·(1 − 1/n)/(n − 1), i = 0…n−1 (FluxPipeline's ``np.linspace(1, 1/n, n)``)."""
        import numpy as np

        return np.linspace(1.0, 1.0 / steps, steps).tolist()

    def matches(self, index: dict, components: set[str]) -> bool:
        return "transformer" in components and index_matches(index, FLUX_PIPELINE, FLUX_TRANSFORMER)

    def load(self, request: LoadRequest) -> DiffusionModel:
        from diffusers import FlowMatchEulerDiscreteScheduler
        from transformers import AutoTokenizer, CLIPTextModel, T5EncoderModel

        src, hub, dt = request.source, request.hub or {}, request.dtype
        weights = {"torch_dtype": dt, "variant": request.variant}
        transformer = self.load_denoiser(request)
        scheduler = FlowMatchEulerDiscreteScheduler.from_pretrained(
            src, subfolder="scheduler", **hub
        )
        tokenizers, encoders = [], []
        if "text_encoders" not in request.skip:
            for tok_dir, enc_dir, cls in (
                ("tokenizer", "text_encoder", CLIPTextModel),
                ("tokenizer_2", "text_encoder_2", T5EncoderModel),
            ):
                tokenizers.append(AutoTokenizer.from_pretrained(src, subfolder=tok_dir, **hub))
                encoders.append(cls.from_pretrained(src, subfolder=enc_dir, **weights, **hub))
        return self.assemble(
            request, transformer, scheduler, tokenizers, encoders,
            max_sequence_length=T5_MAX_LENGTH,
            guidance_scale=DEFAULT_GUIDANCE,
            guidance_embeds=bool(transformer.config.guidance_embeds),
        )  # fmt: skip

    @torch.no_grad()
    def encode_prompts(self, model: DiffusionModel, prompts: list[str]) -> PromptEmbeddings:
        """embeds = T5 (B, L, D), pooled = CLIP pooler_output (B, D_clip)."""
        require_text_encoders(model)
        prompts = list(prompts)
        (clip_tok, t5_tok), (clip, t5) = model.tokenizers, model.text_encoders
        device = next(clip.parameters()).device
        ids = tokenize(clip_tok, prompts, clip_tok.model_max_length, device)
        pooled = clip(ids, output_hidden_states=False).pooler_output.to(clip.dtype)
        length = int(model.extra.get("max_sequence_length", T5_MAX_LENGTH))
        embeds = t5(tokenize(t5_tok, prompts, length, device))[0].to(t5.dtype)
        return PromptEmbeddings(embeds, pooled)

    def null_embedding(self, model: DiffusionModel) -> PromptEmbeddings:
        """The encoded empty prompt (what FluxPipeline's optional "true CFG" would use). It is
        NOT a trained unconditional branch: train with uncond_prob 0 and no null objective."""
        return self.encode_prompts(model, [""])

    def conditioning(self, model, emb, time_ids=None, *, guidance=None) -> dict:
        """T5 states, CLIP pooled, text ids (L, 3) zeros, and the embedded guidance (B,)
        (``guidance`` or ``model.extra["guidance_scale"]``; dropped for a transformer without
        ``guidance_embeds``, e.g. FLUX.1-schnell, which takes none)."""
        b, length = emb.embeds.shape[:2]
        dev = emb.embeds.device
        if not model.unet.config.guidance_embeds:
            guidance = None
        elif guidance is None:
            scale = float(model.extra.get("guidance_scale", DEFAULT_GUIDANCE))
            guidance = torch.full((b,), scale, device=dev, dtype=torch.float32)
        return {
            "encoder_hidden_states": emb.embeds,
            "pooled_projections": emb.pooled,
            "txt_ids": torch.zeros(length, 3, device=dev, dtype=emb.embeds.dtype),
            "guidance": guidance,
        }

    def denoise(self, module, x_t, timestep, cond) -> torch.Tensor:
        """Pack x_t, run the transformer at σ = timestep/1000, unpack: velocity (B, C, h, w)."""
        b, _, h, w = x_t.shape
        if timestep.ndim == 0:
            timestep = timestep.expand(b)
        packed = pack_latents(x_t)
        ids = image_ids(h, w, x_t.device, x_t.dtype)
        out = module(
            hidden_states=packed,
            timestep=timestep.to(x_t.dtype) / 1000.0,
            img_ids=ids,
            return_dict=False,
            **cond,
        )
        out = out[0] if isinstance(out, (tuple, list)) else out.sample
        return unpack_latents(out, h, w)


FLUX = register(FluxFamily())
