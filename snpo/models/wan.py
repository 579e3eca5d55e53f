"""The Wan2.x-class text-to-video family (``wan``): ``WanTransformer3DModel``, flow matching.

A folder as ``WanPipeline.save_pretrained`` writes it (``Wan-AI/Wan2.1-T2V-1.3B-Diffusers``,
``Wan-AI/Wan2.1-T2V-14B-Diffusers``): ``transformer/`` (WanTransformer3DModel, patches
(1, 2, 2)), ``vae/`` (AutoencoderKLWan: 16 channels, 8× spatial and 4× causal temporal
reduction), ``text_encoder/`` (UMT5EncoderModel, UMT5-XXL) + ``tokenizer/``, ``scheduler/``
(UniPCMultistepScheduler with flow sigmas, or FlowMatchEulerDiscreteScheduler).

Latents. A video (B, 3, F, H, W) in [-1, 1] with F = 4k + 1 frames encodes to
(B, 16, F', H/8, W/8), F' = (F − 1)/4 + 1; the first frame is encoded alone (the VAE is
causal), so an image is a video of one frame: F = F' = 1. snpo's image pairs keep their
(B, 3, H, W) / (B, 16, H/8, W/8) shapes everywhere, and this family inserts the frame axis at
the VAE and the transformer (latents of 5 dimensions — video pairs, ``num_frames`` > 1, whose
clips :mod:`snpo.data.video` reads — pass through unchanged). The Wan VAE
normalises per channel, with the ``latents_mean`` μ_c and ``latents_std`` σ_c of its config:

    z = (m − μ_c) · (1/σ_c)          (encoding; the posterior's logvar − 2·log σ_c)
    m = z / (1/σ_c) + μ_c            (decoding, exactly as WanPipeline before vae.decode)

Conditioning (exactly ``WanPipeline.encode_prompt`` at the ``max_sequence_length`` 512 of
``WanPipeline.__call__``): the prompt cleaned by the pipeline's ``prompt_clean`` (ftfy when
installed, HTML unescaping, whitespace), tokenized to 512 with the attention mask, UMT5's last
hidden state (B, 512, 4096) with every position past the prompt's own tokens (its eos
included) set to 0. No pooled embedding. The null embedding is the encoded empty prompt "",
which is what the pipeline's CFG uses (``negative_prompt`` None → ""), so the reversed-preference
branch of Diff-SNPO trains what CFG subtracts; Wan was trained with caption dropout to "".

Noising is the flow family's (:mod:`snpo.models.flow`): x_t = (1 − σ)·x0 + σ·ε, target
v = ε − x0, timestep 1000·σ, with σ's timestep shift defaulting to the folder's sampling
``flow_shift`` (UniPC) or ``shift`` (FlowMatchEuler) — 3.0 for the 480p Wan2.1 folders.

Not handled: two-expert Wan2.2 folders (``transformer_2``, ``boundary_ratio``: two denoisers
switched by noise level) are refused at loading; ``expand_timesteps`` (Wan2.2-TI2V-5B, a
per-token timestep) is passed as one timestep per row, which is the same number on every token
for text-to-video but untested; image-to-video pipelines are other classes and not matched.
"""

from __future__ import annotations

from typing import ClassVar

import torch

from snpo.models.diffusion import DiffusionModel, ModelLoadError, model_components
from snpo.models.embeddings import PromptEmbeddings
from snpo.models.family import LoadRequest, register
from snpo.models.sd3 import (
    FLOW_KEY,
    FlowMatchingFamily,
    index_class,
    index_matches,
    require_text_encoders,
)

WAN_PIPELINE = "WanPipeline"
WAN_TRANSFORMER = "WanTransformer3DModel"
WAN_VAE = "AutoencoderKLWan"
WAN_TEXT_ENCODER = "UMT5EncoderModel"
MAX_SEQUENCE_LENGTH = 512  # WanPipeline.__call__'s default max_sequence_length
SAMPLERS = ("unipc", "flow_euler")
SCHEDULER_SAMPLER = {
    "UniPCMultistepScheduler": "unipc",
    "FlowMatchEulerDiscreteScheduler": "flow_euler",
}


def training_shift(scheduler_config) -> float:
    """The σ shift of the folder's scheduler: UniPC's ``flow_shift`` (with ``use_flow_sigmas``)
    or FlowMatchEuler's ``shift``; 1 when the schedule shifts dynamically."""
    if scheduler_config.get("use_dynamic_shifting", False):
        return 1.0
    if scheduler_config.get("use_flow_sigmas", False):
        return float(scheduler_config.get("flow_shift", 1.0))
    return float(scheduler_config.get("shift", 1.0))


def latent_stats(vae_config, like: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(μ, 1/σ) of the VAE config's per-channel ``latents_mean`` / ``latents_std`` as
    (1, C, 1, 1, 1) tensors in ``like``'s dtype and device (the pipeline's own construction)."""
    c = vae_config.z_dim
    mean = torch.tensor(vae_config.latents_mean).view(1, c, 1, 1, 1).to(like.device, like.dtype)
    inv_std = 1.0 / torch.tensor(vae_config.latents_std).view(1, c, 1, 1, 1)
    return mean, inv_std.to(like.device, like.dtype)


def as_video(x: torch.Tensor) -> tuple[torch.Tensor, bool]:
    """(x as (B, C, F, H, W), whether it was an image (B, C, H, W), i.e. F = 1 was inserted)."""
    if x.ndim == 4:
        return x.unsqueeze(2), True
    if x.ndim == 5:
        return x, False
    raise ValueError(
        f"expected (B, C, H, W) images or (B, C, F, H, W) videos, got {tuple(x.shape)}"
    )


def frames_back(x: torch.Tensor, image: bool) -> torch.Tensor:
    """The inverse of :func:`as_video`: drop the one-frame axis of an image."""
    return x.squeeze(2) if image else x


def normalize_latents(mean, logvar, vae_config) -> tuple[torch.Tensor, torch.Tensor]:
    """z = (m − μ_c)·(1/σ_c) and logvar − 2·log σ_c (= logvar + 2·log(1/σ_c)), (B, C, F', h, w)."""
    mu, inv_std = latent_stats(vae_config, mean)
    return (mean - mu) * inv_std, logvar + 2.0 * torch.log(inv_std.to(logvar.dtype))


def denormalize_latents(z: torch.Tensor, vae_config) -> torch.Tensor:
    """m = z / (1/σ_c) + μ_c (B, C, F', h, w): WanPipeline's own step before ``vae.decode``."""
    mu, inv_std = latent_stats(vae_config, z)
    return z / inv_std + mu


class WanFamily(FlowMatchingFamily):
    """Wan2.1-class text-to-video (see the module docstring)."""

    name: ClassVar[str] = "wan"
    pipeline_class: ClassVar[str] = WAN_PIPELINE
    denoiser_class: ClassVar[str] = WAN_TRANSFORMER
    has_null_branch: ClassVar[bool] = True
    # self-attention (attn1) and text cross-attention (attn2) of every block: the names of
    # diffusers' / finetrainers' Wan LoRA scripts (WanPipeline.load_lora_weights reads them)
    lora_targets: ClassVar[tuple[str, ...]] = ("to_q", "to_k", "to_v", "to_out.0")
    default_sampler: ClassVar[str] = "unipc"
    temporal_factor: ClassVar[int] = 4  # AutoencoderKLWan: F = 4k + 1 frames → F' = k + 1

    # --- detection and loading -------------------------------------------------------------
    def matches(self, index: dict, components: set[str]) -> bool:
        """A WanPipeline folder (or, without ``_class_name``, a WanTransformer3DModel one)."""
        return "transformer" in components and index_matches(index, WAN_PIPELINE, WAN_TRANSFORMER)

    def load(self, request: LoadRequest) -> DiffusionModel:
        import diffusers
        from transformers import AutoTokenizer, UMT5EncoderModel

        src, hub, index = request.source, request.hub or {}, request.index
        if index_class(index, "transformer_2") or index.get("boundary_ratio") is not None:
            raise ModelLoadError(
                f"{src!r} is a two-expert Wan2.2 folder (transformer_2, boundary_ratio): snpo "
                "trains one denoiser; a Wan2.1-class folder (one transformer) is supported"
            )
        if index_class(index, "vae") not in (None, WAN_VAE):
            raise ModelLoadError(f"{src!r}: a Wan folder needs an {WAN_VAE} vae")
        transformer = self.load_denoiser(request)
        sched_name = index_class(index, "scheduler") or "UniPCMultistepScheduler"
        if sched_name not in SCHEDULER_SAMPLER:
            raise ModelLoadError(f"{src!r}: unsupported Wan scheduler {sched_name}")
        scheduler = getattr(diffusers, sched_name).from_pretrained(
            src, subfolder="scheduler", **hub
        )
        tokenizers, encoders = [], []
        if "text_encoders" not in request.skip:
            if "text_encoder" not in model_components(src, index):
                raise ModelLoadError(f"{src!r} has no text_encoder/ (UMT5)")
            tokenizers.append(AutoTokenizer.from_pretrained(src, subfolder="tokenizer", **hub))
            encoders.append(
                UMT5EncoderModel.from_pretrained(
                    src, subfolder="text_encoder", torch_dtype=request.dtype,
                    variant=request.variant, **hub,
                )
            )  # fmt: skip
        from snpo.models.flow import FlowSettings

        return self.assemble(
            request, transformer, scheduler, tokenizers, encoders,
            max_sequence_length=MAX_SEQUENCE_LENGTH,
            expand_timesteps=bool(index.get("expand_timesteps", False)),
            **{FLOW_KEY: FlowSettings(shift=training_shift(scheduler.config))},
        )  # fmt: skip

    # --- latents ---------------------------------------------------------------------------
    def vae_posterior(self, model, pixels):
        """(mean, logvar) (B, 16, h, w) of images (B, 3, H, W) (or (B, 16, F', h, w) of videos
        (B, 3, F, H, W)), normalised per channel (module docstring)."""
        x, image = as_video(pixels.to(model.vae.dtype))
        with torch.no_grad():
            dist = model.vae.encode(x).latent_dist
        mean, logvar = normalize_latents(dist.mean, dist.logvar, model.vae.config)
        return frames_back(mean, image), frames_back(logvar, image)

    def vae_decode(self, model, latents):
        """Pixels in [-1, 1] (B, 3, H, W) (videos (B, 3, F, H, W)) of normalised latents."""
        z, image = as_video(latents)
        vae = model.vae
        with torch.no_grad():
            x = vae.decode(denormalize_latents(z.to(vae.dtype), vae.config)).sample
        return frames_back(x, image)

    # --- text conditioning -----------------------------------------------------------------
    @torch.no_grad()
    def encode_prompts(self, model: DiffusionModel, prompts: list[str]) -> PromptEmbeddings:
        """embeds (B, L, D): UMT5 states, zero past each prompt's tokens; pooled None."""
        from diffusers.pipelines.wan.pipeline_wan import prompt_clean

        require_text_encoders(model)
        (tok,), (enc,) = model.tokenizers, model.text_encoders
        length = int(model.extra.get("max_sequence_length", MAX_SEQUENCE_LENGTH))
        inputs = tok(
            [prompt_clean(p) for p in prompts],
            padding="max_length",
            max_length=length,
            truncation=True,
            add_special_tokens=True,
            return_attention_mask=True,
            return_tensors="pt",
        )
        device = next(enc.parameters()).device
        mask = inputs.attention_mask.to(device)
        states = enc(inputs.input_ids.to(device), mask).last_hidden_state.to(enc.dtype)
        return PromptEmbeddings(prompt_states(states, mask.gt(0).sum(dim=1)))

    def null_embedding(self, model: DiffusionModel) -> PromptEmbeddings:
        """The encoded empty prompt (1, L, D): WanPipeline's CFG negative by default."""
        return self.encode_prompts(model, [""])

    def conditioning(self, model, emb, time_ids=None, *, guidance=None) -> dict:
        """``encoder_hidden_states`` (B, L, D) (the transformer projects text_dim itself)."""
        return {"encoder_hidden_states": emb.embeds}

    def denoise(self, module, x_t, timestep, cond) -> torch.Tensor:
        """transformer(hidden_states (B, C, F', h, w), timestep (B,), encoder_hidden_states):
        the velocity, in x_t's shape ((B, C, h, w) images get F' = 1 inserted and removed)."""
        x, image = as_video(x_t)
        if timestep.ndim == 0:
            timestep = timestep.expand(x.shape[0])
        out = module(hidden_states=x, timestep=timestep, return_dict=False, **cond)
        out = out[0] if isinstance(out, (tuple, list)) else out.sample
        return frames_back(out, image)

    # --- sampling --------------------------------------------------------------------------
    def sampling_scheduler(self, model, name, steps, device, latent_shape):
        """``unipc`` (UniPCMultistepScheduler, the Wan folders' own) or ``flow_euler``
        (FlowMatchEulerDiscreteScheduler at the same shift); None → the folder's scheduler.
        Built from the folder's config and ``set_timesteps(steps)`` as WanPipeline does."""
        from diffusers import FlowMatchEulerDiscreteScheduler, UniPCMultistepScheduler

        own = SCHEDULER_SAMPLER.get(type(model.scheduler).__name__, "unipc")
        name = name or own
        if name not in SAMPLERS:
            raise ValueError(f"unknown sampler {name!r} for wan; choose one of {SAMPLERS}")
        cfg = model.scheduler.config
        if name == own:
            sched = type(model.scheduler).from_config(cfg)
        elif name == "flow_euler":
            sched = FlowMatchEulerDiscreteScheduler(
                num_train_timesteps=cfg.num_train_timesteps, shift=training_shift(cfg)
            )
        else:
            sched = UniPCMultistepScheduler(
                num_train_timesteps=cfg.num_train_timesteps,
                prediction_type="flow_prediction",
                use_flow_sigmas=True,
                flow_shift=training_shift(cfg),
            )
        sched.set_timesteps(steps, device=device)
        if hasattr(sched, "set_begin_index"):
            sched.set_begin_index(0)  # as WanPipeline: no timestep lookup per step
        return sched


def prompt_states(states: torch.Tensor, lengths: torch.Tensor) -> torch.Tensor:
    """(B, L, D) encoder states with rows past each prompt's length (B,) set to 0 — the
    pipeline's ``cat([u[:v], zeros])``, so padding carries no encoder output."""
    keep = torch.arange(states.shape[1], device=states.device)[None, :] < lengths[:, None]
    return torch.where(keep[..., None], states, torch.zeros((), dtype=states.dtype))


WAN = register(WanFamily())
