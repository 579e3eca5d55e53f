"""The ε-prediction (DDPM) UNet families: SD1.5-class (``sd``) and SDXL-class (``sdxl``).

Folder: ``unet/``, ``scheduler/`` (DDPM), ``text_encoder/`` + ``tokenizer/`` (SDXL: also
``text_encoder_2/`` + ``tokenizer_2/``), optionally ``vae/``. Conditioning, per row:

- sd:   ``encoder_hidden_states`` = last hidden state of the CLIP text encoder, (B, L, D);
- sdxl: hidden_states[-2] of both encoders concatenated, (B, L, D1 + D2); the pooled embedding
  of encoder 2, (B, D2); ``time_ids`` (B, 6) = (orig_h, orig_w, crop_top, crop_left, h, w).

Null embedding: the encoded empty prompt, or zeros for SDXL-class models with
``force_zeros_for_empty_prompt`` (the default of SDXL indexes).

Noising: x_t = √ᾱ_t·x0 + √(1−ᾱ_t)·ε at the pair's t ∈ [0, T); target ε, or
v = √ᾱ_t·ε − √(1−ᾱ_t)·x0 for v-prediction. ``weighting: elbo`` weighs a pair by T·ω(t),
ω(t) = β_t / (2·α_t·(1 − ᾱ_t)), the weight of the DDPM ELBO term at t for ε-prediction with
σ_t² = β_t (Ho et al. 2020, eq. 12).
"""

from __future__ import annotations

from dataclasses import replace
from typing import ClassVar

import torch

from snpo.models.diffusion import (
    DiffusionModel,
    ModelLoadError,
    check_tokenizer,
    freeze,
    load_vae,
)
from snpo.models.embeddings import PromptEmbeddings
from snpo.models.family import LoadRequest, ModelFamily, Noised, register

SAMPLERS = ("ddim", "ddpm", "euler")


# --- math ------------------------------------------------------------------------------------
def sdxl_time_ids(
    original_size: torch.Tensor, crop_top_left: torch.Tensor, size: tuple[int, int]
) -> torch.Tensor:
    """SDXL micro-conditioning rows (B, 6) float32: (orig_h, orig_w, crop_top, crop_left, h, w)
    from original_size (B, 2), crop_top_left (B, 2) and the trained size (h, w)."""
    b = original_size.shape[0]
    target = torch.tensor([int(size[0]), int(size[1])]).expand(b, 2).to(original_size.device)
    return torch.cat([original_size, crop_top_left, target], dim=1).to(torch.float32)


def time_ids(
    batch: int,
    size: tuple[int, int],
    *,
    original_size: tuple[int, int] | None = None,
    crop_top_left: tuple[int, int] = (0, 0),
    device: torch.device | str = "cpu",
    dtype: torch.dtype = torch.float32,
) -> torch.Tensor:
    """:func:`sdxl_time_ids` of ``batch`` identical rows (B, 6) (sampling, evaluation)."""
    orig = torch.tensor([list(original_size or size)]).expand(batch, 2)
    crop = torch.tensor([list(crop_top_left)]).expand(batch, 2)
    return sdxl_time_ids(orig, crop, size).to(device=device, dtype=dtype)


def training_target(
    model: DiffusionModel, latents: torch.Tensor, noise: torch.Tensor, timesteps: torch.Tensor
) -> torch.Tensor:
    """What the denoiser should predict: ε (epsilon), v (v_prediction) or ε − x0 (flow)."""
    kind = model.prediction_type
    if kind == "epsilon":
        return noise
    if kind == "v_prediction":
        return model.scheduler.get_velocity(latents, noise, timesteps)
    if kind == "flow":
        return noise - latents
    raise ValueError(f"prediction_type {kind!r} is not supported (epsilon or v_prediction)")


def elbo_weight(scheduler, timesteps: torch.Tensor) -> torch.Tensor:
    """T·ω(t), ω(t) = β_t / (2·α_t·(1 − ᾱ_t)): the DDPM ELBO weight (σ_t² = β_t), float32,
    timesteps (B,) int64 → (B,) on their device."""
    betas = scheduler.betas.to(torch.float64)
    alphas = scheduler.alphas.to(torch.float64)
    abar = scheduler.alphas_cumprod.to(torch.float64)
    t = timesteps.to("cpu")
    omega = betas[t] / (2.0 * alphas[t] * (1.0 - abar[t]))
    T = int(scheduler.config.num_train_timesteps)
    return (T * omega).to(torch.float32).to(timesteps.device)


# --- the families ----------------------------------------------------------------------------
class EpsilonUNetFamily(ModelFamily):
    """DDPM-trained UNet2DConditionModel families with CLIP text encoders."""

    denoiser: ClassVar[str] = "unet"
    second_encoder: ClassVar[bool] = False  # SDXL: text_encoder_2 (with projection)

    def load(self, request: LoadRequest) -> DiffusionModel:
        from diffusers import DDPMScheduler, UNet2DConditionModel
        from transformers import AutoTokenizer, CLIPTextModel, CLIPTextModelWithProjection

        src, hub, dtype, variant = request.source, request.hub or {}, request.dtype, request.variant
        if request.denoiser_path is not None:
            unet = UNet2DConditionModel.from_pretrained(request.denoiser_path, torch_dtype=dtype)
        else:
            unet = UNet2DConditionModel.from_pretrained(
                src, subfolder="unet", torch_dtype=dtype, variant=variant, **hub
            )
        scheduler = DDPMScheduler.from_pretrained(src, subfolder="scheduler", **hub)
        tokenizers, encoders = [], []
        if "text_encoders" not in request.skip:
            subfolders = [("tokenizer", "text_encoder", CLIPTextModel)]
            if self.second_encoder:
                subfolders.append(("tokenizer_2", "text_encoder_2", CLIPTextModelWithProjection))
            for tok_dir, enc_dir, cls in subfolders:
                tokenizers.append(AutoTokenizer.from_pretrained(src, subfolder=tok_dir, **hub))
                encoders.append(
                    cls.from_pretrained(
                        src, subfolder=enc_dir, torch_dtype=dtype, variant=variant, **hub
                    )
                )
        vae, extra = load_vae(request)
        for tok in tokenizers:
            check_tokenizer(tok, src)
        freeze([unet, *encoders, vae], request.device)
        return DiffusionModel(
            unet=unet,
            scheduler=scheduler,
            text_encoders=encoders,
            tokenizers=tokenizers,
            vae=vae,
            family=self.name,
            source=src,
            force_zeros_for_empty_prompt=self.null_kind(request.index) == "zeros",
            extra=extra,
        )

    @torch.no_grad()
    def encode_prompts(self, model: DiffusionModel, prompts: list[str]) -> PromptEmbeddings:
        if not model.text_encoders:
            raise ModelLoadError(
                f"the text encoders of {model.source!r} were not loaded (skip=text_encoders: "
                "the prompt embeddings come from a cache)"
            )
        device = next(model.text_encoders[0].parameters()).device
        hidden, pooled = [], None
        for tok, enc in zip(model.tokenizers, model.text_encoders):
            ids = tok(
                prompts,
                padding="max_length",
                max_length=tok.model_max_length,
                truncation=True,
                return_tensors="pt",
            ).input_ids.to(device)
            if not self.second_encoder:
                hidden.append(enc(ids).last_hidden_state)
            else:
                out = enc(ids, output_hidden_states=True)
                hidden.append(out.hidden_states[-2])
                if out[0].ndim == 2:
                    pooled = out[0]
        return PromptEmbeddings(torch.cat(hidden, dim=-1), pooled)

    def null_embedding(self, model: DiffusionModel) -> PromptEmbeddings:
        emb = self.encode_prompts(model, [""])
        if model.force_zeros_for_empty_prompt:
            pooled = None if emb.pooled is None else torch.zeros_like(emb.pooled)
            emb = replace(emb, embeds=torch.zeros_like(emb.embeds), pooled=pooled)
        return emb

    def conditioning(self, model, emb, time_ids=None, *, guidance=None) -> dict:
        kwargs: dict = {"encoder_hidden_states": emb.embeds}
        if self.needs_time_ids:
            if time_ids is None:
                raise ValueError("SDXL-class models need time_ids (see snpo.models.time_ids)")
            kwargs["added_cond_kwargs"] = {"text_embeds": emb.pooled, "time_ids": time_ids}
        return kwargs

    def denoise(self, module, x_t, timestep, cond) -> torch.Tensor:
        out = module(x_t, timestep, **cond)
        if isinstance(out, torch.Tensor):  # a wrapper that already returns the prediction
            return out
        return out.sample if hasattr(out, "sample") else out[0]

    def noised(self, model, x0, noise, draws, *, weighting: str = "constant") -> Noised:
        t = draws.timesteps
        x_t = model.scheduler.add_noise(x0, noise, t)
        target = training_target(model, x0, noise, t)
        if weighting == "constant":
            weight = None
        elif weighting == "elbo":
            weight = elbo_weight(model.scheduler, t)
        else:
            raise ValueError(f"weighting {weighting!r} is not defined for {self.name}")
        return Noised(x_t, t, target, weight)

    def sampling_scheduler(self, model, name, steps, device, latent_shape):
        from diffusers import DDIMScheduler, DDPMScheduler, EulerDiscreteScheduler

        classes = {"ddim": DDIMScheduler, "ddpm": DDPMScheduler, "euler": EulerDiscreteScheduler}
        name = name or self.default_sampler
        if name not in classes:
            raise ValueError(f"unknown scheduler {name!r}; choose one of {sorted(classes)}")
        sched = classes[name].from_config(model.scheduler.config)
        sched.set_timesteps(steps, device=device)
        return sched


class SD15Family(EpsilonUNetFamily):
    """SD1.5-class: one CLIP text encoder."""

    name = "sd"
    pipeline_class = "StableDiffusionPipeline"

    def matches(self, index: dict, components: set[str]) -> bool:
        scheduler = (index.get("scheduler") or [None, None])[-1]
        flow = scheduler == "FlowMatchEulerDiscreteScheduler"  # a flow-matching UNet: flow_unet
        return "unet" in components and "text_encoder_2" not in components and not flow


class SDXLFamily(EpsilonUNetFamily):
    """SDXL-class: two CLIP text encoders, pooled embedding, micro-conditioning time ids."""

    name = "sdxl"
    pipeline_class = "StableDiffusionXLPipeline"
    second_encoder = True
    needs_time_ids = True

    def matches(self, index: dict, components: set[str]) -> bool:
        return "unet" in components and "text_encoder_2" in components

    def null_kind(self, index: dict) -> str:
        return "zeros" if index.get("force_zeros_for_empty_prompt", True) else "empty_prompt"


SD15 = register(SD15Family())
SDXL = register(SDXLFamily())
