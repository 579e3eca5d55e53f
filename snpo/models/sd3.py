"""The SD3-class family (``sd3``): Stable Diffusion 3 / 3.5 MMDiT transformers, flow matching.

A model folder as ``StableDiffusion3Pipeline.save_pretrained`` writes it: ``transformer/``
(SD3Transformer2DModel), ``scheduler/`` (FlowMatchEulerDiscreteScheduler), ``vae/``
(AutoencoderKL, 16 channels, with ``shift_factor``), ``text_encoder`` + ``text_encoder_2`` (CLIP-L
and CLIP-G with projection), ``text_encoder_3`` (T5-XXL encoder, optional) and their tokenizers.

Conditioning, per prompt (exactly ``StableDiffusion3Pipeline.encode_prompt``):
- CLIP-L and CLIP-G: hidden_states[-2] (B, 77, 768) and (B, 77, 1280), concatenated along the
  width (B, 77, 2048) and zero-padded to the T5 width (B, 77, 4096);
- T5: last hidden state (B, 256, 4096) (zeros of the transformer's ``joint_attention_dim``
  when the folder has no T5);
- ``embeds`` = [CLIP ; T5] along the sequence (B, 333, 4096); ``pooled`` = both CLIPs'
  ``text_embeds`` concatenated (B, 2048).
The null embedding is the encoded empty prompt of all three encoders, which is what the
pipeline's CFG uses (``negative_prompt`` None → ""); SD3 was trained with caption dropout, so
this branch is a real unconditional model and Diff-SNPO can train it.

Noising and σ sampling: :mod:`snpo.models.flow`, with σ from the pair's uniform ``draws.u`` and
the settings of :func:`flow_settings` (default: logit-normal(0, 1), then the scheduler's
``shift``, as diffusers' SD3 training scripts do). :class:`FlowMatchingFamily` holds what the
flow families share (noising, sampling schedule); :mod:`snpo.models.flux` subclasses it.
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
    model_components,
)
from snpo.models.embeddings import PromptEmbeddings
from snpo.models.family import LoadRequest, ModelFamily, Noised, register
from snpo.models.flow import FlowSettings, flow_inputs

SD3_PIPELINE = "StableDiffusion3Pipeline"
SD3_TRANSFORMER = "SD3Transformer2DModel"
T5_MAX_LENGTH = 256  # StableDiffusion3Pipeline's default max_sequence_length
FLOW_KEY = "flow"  # DiffusionModel.extra key of the model's FlowSettings


def index_class(index: dict, component: str) -> str | None:
    """The class name model_index.json gives ``component`` (["library", "Class"]), or None."""
    entry = index.get(component)
    if isinstance(entry, (list, tuple)) and len(entry) == 2:
        return entry[1]
    return None


def index_matches(index: dict, pipeline: str, transformer: str) -> bool:
    """A folder of ``pipeline``: its ``_class_name``, or without one, its transformer class.
    A related pipeline (an inpainting, control or editing variant) has another class name and
    other inputs: not matched."""
    name = index.get("_class_name")
    if name is not None:
        return name == pipeline
    return index_class(index, "transformer") == transformer


def flow_settings(model: DiffusionModel) -> FlowSettings:
    """The model's σ-sampling settings (set by :func:`configure_flow`; default: logit-normal
    (0, 1) shifted by the training scheduler's static ``shift``, as the scheduler's own
    training sigmas are: none when it shifts dynamically by resolution (FLUX))."""
    settings = model.extra.get(FLOW_KEY)
    if settings is None:
        cfg = model.scheduler.config
        shift = 1.0 if cfg.get("use_dynamic_shifting", False) else float(cfg.get("shift", 1.0))
        settings = FlowSettings(shift=shift)
    return settings


def configure_flow(model: DiffusionModel, **changes) -> FlowSettings:
    """Override fields of the model's :class:`FlowSettings` (``sampler``, ``shift``,
    ``logit_mean``, ``logit_std``, ``mode_scale``), e.g. from the training config."""
    settings = replace(flow_settings(model), **changes)
    settings.sigma(torch.tensor([0.5], dtype=torch.float64))  # validate now
    model.extra[FLOW_KEY] = settings
    return settings


def require_text_encoders(model: DiffusionModel) -> None:
    if not model.text_encoders:
        raise ModelLoadError(
            f"the text encoders of {model.source!r} were not loaded (skip=text_encoders: the "
            "prompt embeddings come from a cache)"
        )


def tokenize(tokenizer, prompts: list[str], max_length: int, device) -> torch.Tensor:
    """(B, max_length) int64 ids, padded to max_length and truncated (the pipelines' call)."""
    return tokenizer(
        prompts,
        padding="max_length",
        max_length=max_length,
        truncation=True,
        return_tensors="pt",
    ).input_ids.to(device)


def _device(module: torch.nn.Module) -> torch.device:
    return next(module.parameters()).device


class FlowMatchingFamily(ModelFamily):
    """What SD3- and FLUX-class families share: flow noising and the Euler sampling schedule."""

    denoiser: ClassVar[str] = "transformer"
    flow: ClassVar[bool] = True
    default_sampler: ClassVar[str] = "flow_euler"

    def assemble(
        self, request, transformer, scheduler, tokenizers, encoders, **extra_fields
    ) -> DiffusionModel:
        """The DiffusionModel of loaded flow components: the VAE (or its config) added, the
        tokenizers checked, everything frozen on the device; ``extra_fields`` go to ``extra``."""
        vae, extra = load_vae(request)
        for tok in tokenizers:
            check_tokenizer(tok, request.source)
        freeze([transformer, *encoders, vae], request.device)
        extra.update(extra_fields)
        return DiffusionModel(
            unet=transformer,
            scheduler=scheduler,
            text_encoders=encoders,
            tokenizers=tokenizers,
            vae=vae,
            family=self.name,
            source=request.source,
            extra=extra,
        )

    def configure(self, model, options) -> None:
        """σ sampling from ``flow_sigma_sampler``, ``flow_logit_mean``, ``flow_logit_std``,
        ``flow_mode_scale`` and ``flow_shift`` (None: the scheduler's static shift)."""
        changes = {
            "sampler": options.flow_sigma_sampler,
            "logit_mean": float(options.flow_logit_mean),
            "logit_std": float(options.flow_logit_std),
            "mode_scale": float(options.flow_mode_scale),
        }
        if options.flow_shift is not None:
            changes["shift"] = float(options.flow_shift)
        configure_flow(model, **changes)

    def noised(self, model, x0, noise, draws, *, weighting: str = "constant") -> Noised:
        """x_t = (1 − σ)·x0 + σ·ε, target ε − x0, timestep 1000·σ, σ from ``draws.u`` (B,)."""
        u = getattr(draws, "u", None)
        if u is None:
            raise ValueError(
                "flow families need the per-pair uniform draws.u (PairDraws.u, float64 in (0, 1))"
            )
        out = flow_inputs(x0, noise, u, flow_settings(model), weighting)
        return Noised(out.x_t, out.timestep, out.target, out.weight)

    def sampling_scheduler(self, model, name, steps, device, latent_shape):
        """``FlowMatchEulerDiscreteScheduler`` from the model's config, ``steps`` set; with
        ``use_dynamic_shifting`` (FLUX) the shift μ follows the image's token count as in the
        pipelines (linear in (h/2)·(w/2) between base and max)."""
        from diffusers import FlowMatchEulerDiscreteScheduler

        name = name or self.default_sampler
        if name != "flow_euler":
            raise ValueError(f"unknown sampler {name!r} for {self.name}; choose flow_euler")
        sched = FlowMatchEulerDiscreteScheduler.from_config(model.scheduler.config)
        kw = {}
        cfg = sched.config
        if cfg.get("use_dynamic_shifting", False):
            _, h, w = latent_shape
            kw["mu"] = dynamic_shift_mu(
                (h // 2) * (w // 2),
                cfg.get("base_image_seq_len", 256),
                cfg.get("max_image_seq_len", 4096),
                cfg.get("base_shift", 0.5),
                cfg.get("max_shift", 1.15),
            )
        sigmas = self.sampling_sigmas(steps)
        if sigmas is not None:
            kw["sigmas"] = sigmas
        sched.set_timesteps(None if sigmas is not None else steps, device=device, **kw)
        return sched

    def latent_channels(self, model: DiffusionModel) -> int:
        """Channels of a latent (B, C, h, w) as the VAE, noising and sampling see it."""
        return model.unet.config.in_channels

    def sampling_sigmas(self, steps: int) -> list[float] | None:
        """The unshifted σ grid the family's pipeline passes to ``set_timesteps`` (None: the
        scheduler's own, linear in t from σ_max to σ_min, as StableDiffusion3Pipeline)."""
        return None


def dynamic_shift_mu(
    seq_len: int, base_len: int, max_len: int, base_shift: float, max_shift: float
) -> float:
    """μ = base_shift + (max_shift − base_shift)·(seq_len − base_len)/(max_len − base_len):
    the resolution-dependent (exponential) shift of FLUX's sampling schedule."""
    slope = (max_shift - base_shift) / (max_len - base_len)
    return base_shift + slope * (seq_len - base_len)


class SD3Family(FlowMatchingFamily):
    """SD3 / SD3.5 (see the module docstring)."""

    name: ClassVar[str] = "sd3"
    pipeline_class: ClassVar[str] = SD3_PIPELINE
    denoiser_class: ClassVar[str] = "SD3Transformer2DModel"
    has_null_branch: ClassVar[bool] = True
    # the joint attention of every MMDiT block: image stream (to_*) and text stream (add_*);
    # the names of diffusers' SD3 LoRA scripts (the last block has no to_add_out: skipped)
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

    def matches(self, index: dict, components: set[str]) -> bool:
        return "transformer" in components and index_matches(index, SD3_PIPELINE, SD3_TRANSFORMER)

    def load(self, request: LoadRequest) -> DiffusionModel:
        from diffusers import FlowMatchEulerDiscreteScheduler
        from transformers import AutoTokenizer, CLIPTextModelWithProjection, T5EncoderModel

        src, hub, dt = request.source, request.hub or {}, request.dtype
        weights = {"torch_dtype": dt, "variant": request.variant}
        transformer = self.load_denoiser(request)
        scheduler = FlowMatchEulerDiscreteScheduler.from_pretrained(
            src, subfolder="scheduler", **hub
        )
        tokenizers, encoders = [], []
        if "text_encoders" not in request.skip:
            parts = model_components(src, request.index)
            clip = CLIPTextModelWithProjection
            pairs = [("tokenizer", "text_encoder", clip), ("tokenizer_2", "text_encoder_2", clip)]
            if "text_encoder_3" in parts:
                pairs.append(("tokenizer_3", "text_encoder_3", T5EncoderModel))
            for tok_dir, enc_dir, cls in pairs:
                tokenizers.append(AutoTokenizer.from_pretrained(src, subfolder=tok_dir, **hub))
                encoders.append(cls.from_pretrained(src, subfolder=enc_dir, **weights, **hub))
        return self.assemble(
            request, transformer, scheduler, tokenizers, encoders,
            max_sequence_length=T5_MAX_LENGTH,
        )  # fmt: skip

    @torch.no_grad()
    def encode_prompts(self, model: DiffusionModel, prompts: list[str]) -> PromptEmbeddings:
        """embeds (B, L_clip + L_t5, D_t5), pooled (B, D_l + D_g) (module docstring)."""
        require_text_encoders(model)
        prompts = list(prompts)
        clip_len = model.tokenizers[0].model_max_length  # the pipeline uses CLIP-L's for both
        first = model.text_encoders[0]
        device = _device(first)
        hidden, pooled = [], []
        for tok, enc in zip(model.tokenizers[:2], model.text_encoders[:2]):
            out = enc(tokenize(tok, prompts, clip_len, device), output_hidden_states=True)
            pooled.append(out[0])
            hidden.append(out.hidden_states[-2].to(dtype=first.dtype, device=device))
        clip = torch.cat(hidden, dim=-1)
        t5 = self._t5_embeds(model, prompts, device)
        clip = torch.nn.functional.pad(clip, (0, t5.shape[-1] - clip.shape[-1]))
        return PromptEmbeddings(torch.cat([clip, t5], dim=-2), torch.cat(pooled, dim=-1))

    @staticmethod
    def _t5_embeds(model: DiffusionModel, prompts: list[str], device) -> torch.Tensor:
        """(B, max_sequence_length, D) T5 hidden states; zeros when the folder has no T5."""
        length = int(model.extra.get("max_sequence_length", T5_MAX_LENGTH))
        if len(model.text_encoders) < 3:
            width = model.unet.config.joint_attention_dim
            dtype = model.text_encoders[0].dtype
            return torch.zeros(len(prompts), length, width, device=device, dtype=dtype)
        tok, enc = model.tokenizers[2], model.text_encoders[2]
        ids = tokenize(tok, prompts, length, _device(enc))
        return enc(ids)[0].to(dtype=enc.dtype, device=device)

    def null_embedding(self, model: DiffusionModel) -> PromptEmbeddings:
        """The encoded empty prompt (1, L, D) of all three encoders (the pipeline's CFG null)."""
        return self.encode_prompts(model, [""])

    def conditioning(self, model, emb, time_ids=None, *, guidance=None) -> dict:
        """``encoder_hidden_states`` (B, L, D) and ``pooled_projections`` (B, D2)."""
        if emb.pooled is None:
            raise ValueError(
                "SD3-class models need pooled prompt embeddings (PromptEmbeddings.pooled)"
            )
        return {"encoder_hidden_states": emb.embeds, "pooled_projections": emb.pooled}

    def denoise(self, module, x_t, timestep, cond) -> torch.Tensor:
        """transformer(hidden_states=x_t, timestep=1000·σ (B,), **cond): the velocity (B, C, h, w)."""
        if timestep.ndim == 0:
            timestep = timestep.expand(x_t.shape[0])
        out = module(hidden_states=x_t, timestep=timestep, return_dict=False, **cond)
        return out[0] if isinstance(out, (tuple, list)) else out.sample


SD3 = register(SD3Family())
