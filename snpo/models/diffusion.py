"""Loading SD1.5- and SDXL-class diffusers models, prompt encoding and the null embedding.

A model is a diffusers-layout folder (local path or hub id) with subfolders ``unet``,
``scheduler``, ``text_encoder`` + ``tokenizer`` (SDXL-class: also ``text_encoder_2`` +
``tokenizer_2``) and optionally ``vae``. Without ``vae`` the model works in pixel space
(images in [-1, 1] are the "latents"), which is what the small world uses.

Conditioning, per sample:
- SD1.5-class: ``encoder_hidden_states`` = last hidden state of the CLIP text encoder, (B, L, D).
- SDXL-class: hidden_states[-2] of both encoders concatenated, (B, L, D1 + D2); pooled text
  embedding of encoder 2, (B, D2); ``time_ids`` = (orig_h, orig_w, crop_top, crop_left, h, w).
The null embedding (CFG's unconditional branch and Diff-SNPO's reversed-preference branch) is
the encoded empty prompt, or zeros for SDXL-class models with ``force_zeros_for_empty_prompt``.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass, field, replace
from pathlib import Path

import torch

SUPPORTED_FAMILIES = ("sd", "sdxl")


class ModelLoadError(RuntimeError):
    """A model folder or hub id could not be loaded into usable components."""


@dataclass
class PromptEmbeddings:
    """embeds: (B, L, D); pooled: (B, D2) for SDXL-class models, else None."""

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


@dataclass
class DiffusionModel:
    """The components of one text-to-image diffusion model."""

    unet: torch.nn.Module
    scheduler: object  # a diffusers noise scheduler (training: DDPMScheduler)
    text_encoders: list[torch.nn.Module]
    tokenizers: list[object]
    vae: torch.nn.Module | None
    family: str
    source: str
    force_zeros_for_empty_prompt: bool = False
    extra: dict = field(default_factory=dict)

    @property
    def prediction_type(self) -> str:
        return self.scheduler.config.prediction_type

    @property
    def in_channels(self) -> int:
        return self.unet.config.in_channels

    @property
    def latent_scale(self) -> int:
        """Pixels per latent pixel (8 for SD VAEs; 1 in pixel space)."""
        if self.vae is None:  # pixel space, or a VAE left unloaded (its config was read)
            return int(self.extra.get("latent_scale", 1))
        return 2 ** (len(self.vae.config.block_out_channels) - 1)

    @property
    def skipped(self) -> tuple[str, ...]:
        """Components :func:`load_model` was asked not to load ("vae", "text_encoders")."""
        return tuple(self.extra.get("skipped", ()))

    @property
    def null_kind(self) -> str:
        """Which null embedding CFG and the reversed-preference branch use."""
        return "zeros" if self.force_zeros_for_empty_prompt else "empty_prompt"


def _is_local(path: str) -> bool:
    return os.path.isdir(path)


def _model_index(source: str, **hub_kwargs) -> dict:
    """model_index.json of a local folder or hub repo, or {} when there is none."""
    if _is_local(source):
        f = Path(source) / "model_index.json"
        return json.loads(f.read_text()) if f.exists() else {}
    from diffusers import DiffusionPipeline

    try:
        return dict(DiffusionPipeline.load_config(source, **hub_kwargs))
    except Exception as err:  # noqa: BLE001 - re-raised with context
        raise ModelLoadError(
            f"cannot read model_index.json of {source!r}: {err}. Give a local diffusers folder "
            "or a hub id you can reach (set HF_HUB_OFFLINE=1 only with a warm cache)."
        ) from err


def _components(source: str, index: dict) -> set[str]:
    if _is_local(source):
        return {p.name for p in Path(source).iterdir() if p.is_dir()}
    return {k for k, v in index.items() if isinstance(v, list) and v[0] is not None}


def detect_family(source: str, index: dict | None = None) -> str:
    """ "sdxl" when the model has a second text encoder, else "sd"."""
    index = _model_index(source) if index is None else index
    return "sdxl" if "text_encoder_2" in _components(source, index) else "sd"


def check_tokenizer(tokenizer, source: str) -> None:
    """Fail loudly on degenerate tokenizers (HF_HUB_OFFLINE can yield a 2-token one silently)."""
    vocab = len(tokenizer)
    ids = tokenizer("a red cube", add_special_tokens=False).input_ids
    if vocab < 8 or len(set(ids)) < 2:
        raise ModelLoadError(
            f"the tokenizer of {source!r} looks degenerate (vocabulary of {vocab}, 'a red cube' → "
            f"{ids}); with HF_HUB_OFFLINE=1 transformers can return a placeholder tokenizer. "
            "Point to a complete local copy."
        )


def load_model(
    source: str,
    *,
    dtype: torch.dtype = torch.float32,
    device: torch.device | str = "cpu",
    revision: str | None = None,
    variant: str | None = None,
    unet_path: str | None = None,
    skip: tuple[str, ...] | list[str] = (),
) -> DiffusionModel:
    """Load a diffusers-layout model from a local folder or a hub id.

    ``unet_path``: an alternative UNet folder (e.g. a trained export) replacing ``source/unet``.
    ``skip``: components not to load at all, "vae" and/or "text_encoders" (a trainer whose
    latents / prompt embeddings come from ``snpo cache``): ``vae`` / ``text_encoders`` are then
    None / [] and :func:`encode_images` / :func:`encode_prompts` refuse to run; the VAE's config
    is still read, so ``latent_scale`` stays right.
    Every component is loaded in ``dtype`` explicitly (hub configs may say float16).
    """
    from diffusers import AutoencoderKL, DDPMScheduler, UNet2DConditionModel
    from transformers import (
        AutoTokenizer,
        CLIPTextModel,
        CLIPTextModelWithProjection,
    )

    if _is_local(source) and not (Path(source) / "unet").is_dir():
        raise ModelLoadError(
            f"{source!r} is not a diffusers model folder: it has no unet/ subfolder"
        )
    if not _is_local(source) and ("/" not in source or source.startswith((".", "/"))):
        raise ModelLoadError(
            f"model {source!r} is neither an existing folder nor a hub id (owner/name)"
        )
    bad = sorted(set(skip) - {"vae", "text_encoders"})
    if bad:
        raise ValueError(f"skip: unknown component(s) {bad}; choose from vae, text_encoders")
    kw = {"revision": revision} if revision else {}
    index = _model_index(source, **kw)
    family = detect_family(source, index)
    parts = _components(source, index)
    try:
        if unet_path is not None:
            unet = UNet2DConditionModel.from_pretrained(unet_path, torch_dtype=dtype)
        else:
            unet = UNet2DConditionModel.from_pretrained(
                source, subfolder="unet", torch_dtype=dtype, variant=variant, **kw
            )
        scheduler = DDPMScheduler.from_pretrained(source, subfolder="scheduler", **kw)
        tokenizers, text_encoders = [], []
        if "text_encoders" not in skip:
            tokenizers = [AutoTokenizer.from_pretrained(source, subfolder="tokenizer", **kw)]
            text_encoders = [
                CLIPTextModel.from_pretrained(
                    source, subfolder="text_encoder", torch_dtype=dtype, variant=variant, **kw
                )
            ]
        if family == "sdxl" and "text_encoders" not in skip:
            tokenizers.append(AutoTokenizer.from_pretrained(source, subfolder="tokenizer_2", **kw))
            text_encoders.append(
                CLIPTextModelWithProjection.from_pretrained(
                    source, subfolder="text_encoder_2", torch_dtype=dtype, variant=variant, **kw
                )
            )
        vae = None
        extra: dict = {"skipped": [s for s in ("vae", "text_encoders") if s in skip]}
        if "vae" in parts and "vae" in skip:
            conf = AutoencoderKL.load_config(source, subfolder="vae", **kw)
            extra["latent_scale"] = 2 ** (len(conf["block_out_channels"]) - 1)
        elif "vae" in parts:
            vae = AutoencoderKL.from_pretrained(
                source, subfolder="vae", torch_dtype=dtype, variant=variant, **kw
            )
    except (OSError, ValueError) as err:
        raise ModelLoadError(f"cannot load the model {source!r}: {err}") from err
    for tok in tokenizers:
        check_tokenizer(tok, source)
    for module in [unet, *text_encoders, *([vae] if vae is not None else [])]:
        module.to(device)
        module.requires_grad_(False)
        module.eval()
    force_zeros = bool(index.get("force_zeros_for_empty_prompt", family == "sdxl"))
    return DiffusionModel(
        unet=unet,
        scheduler=scheduler,
        text_encoders=text_encoders,
        tokenizers=tokenizers,
        vae=vae,
        family=family,
        source=source,
        force_zeros_for_empty_prompt=force_zeros if family == "sdxl" else False,
        extra=extra,
    )


@torch.no_grad()
def encode_prompts(model: DiffusionModel, prompts: list[str]) -> PromptEmbeddings:
    """Text conditioning for ``prompts`` (see the module docstring), in the encoders' dtype."""
    if not model.text_encoders:
        raise ModelLoadError(
            f"the text encoders of {model.source!r} were not loaded (skip=text_encoders: the "
            "prompt embeddings come from a cache)"
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
        if model.family == "sd":
            hidden.append(enc(ids).last_hidden_state)
        else:
            out = enc(ids, output_hidden_states=True)
            hidden.append(out.hidden_states[-2])
            if out[0].ndim == 2:
                pooled = out[0]
    return PromptEmbeddings(torch.cat(hidden, dim=-1), pooled)


def null_embedding(model: DiffusionModel) -> PromptEmbeddings:
    """The (1, L, D) unconditional embedding CFG uses for this model (see module docstring)."""
    emb = encode_prompts(model, [""])
    if model.force_zeros_for_empty_prompt:
        pooled = None if emb.pooled is None else torch.zeros_like(emb.pooled)
        emb = replace(emb, embeds=torch.zeros_like(emb.embeds), pooled=pooled)
    return emb


def time_ids(
    batch: int,
    size: tuple[int, int],
    *,
    original_size: tuple[int, int] | None = None,
    crop_top_left: tuple[int, int] = (0, 0),
    device: torch.device | str = "cpu",
    dtype: torch.dtype = torch.float32,
) -> torch.Tensor:
    """SDXL micro-conditioning: (B, 6) rows of (orig_h, orig_w, crop_top, crop_left, h, w)."""
    original_size = original_size or size
    row = torch.tensor([*original_size, *crop_top_left, *size], dtype=dtype, device=device)
    return row.expand(batch, 6)


def unet_conditioning(
    model: DiffusionModel, emb: PromptEmbeddings, time_id_rows: torch.Tensor | None = None
) -> dict:
    """Keyword arguments for ``unet(x, t, **kwargs)`` from prompt embeddings (B rows)."""
    kwargs: dict = {"encoder_hidden_states": emb.embeds}
    if model.family == "sdxl":
        if time_id_rows is None:
            raise ValueError("SDXL-class models need time_ids (see snpo.models.time_ids)")
        kwargs["added_cond_kwargs"] = {"text_embeds": emb.pooled, "time_ids": time_id_rows}
    return kwargs


def training_target(
    model: DiffusionModel, latents: torch.Tensor, noise: torch.Tensor, timesteps: torch.Tensor
) -> torch.Tensor:
    """What the UNet should predict: the noise (epsilon) or the velocity (v_prediction)."""
    kind = model.prediction_type
    if kind == "epsilon":
        return noise
    if kind == "v_prediction":
        return model.scheduler.get_velocity(latents, noise, timesteps)
    raise ValueError(f"prediction_type {kind!r} is not supported (epsilon or v_prediction)")


def encode_images(
    model: DiffusionModel, pixels: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """The latent distribution of images in [-1, 1]: (mean, logvar), each (B, C, h, w), already
    multiplied by the VAE scaling factor. Pixel space: (pixels, None), a point mass."""
    if model.vae is None:
        if "vae" in model.skipped:
            raise ModelLoadError(
                f"the VAE of {model.source!r} was not loaded (skip=vae: the latents come from a "
                "cache)"
            )
        return pixels, None
    with torch.no_grad():
        dist = model.vae.encode(pixels.to(model.vae.dtype)).latent_dist
    s = model.vae.config.scaling_factor
    shift = getattr(model.vae.config, "shift_factor", None) or 0.0
    mean = (dist.mean - shift) * s
    # scaling y = s·x scales the variance by s²: logvar + 2·log s
    logvar = dist.logvar + 2.0 * torch.log(torch.tensor(s, dtype=dist.logvar.dtype))
    return mean, logvar


def sample_latents(
    mean: torch.Tensor, logvar: torch.Tensor | None, noise: torch.Tensor
) -> torch.Tensor:
    """z = mean + exp(logvar / 2)·ε with ε given (reproducible draws); pixel space: z = mean."""
    if logvar is None:
        return mean
    return mean + torch.exp(0.5 * logvar) * noise


def decode_latents(model: DiffusionModel, latents: torch.Tensor) -> torch.Tensor:
    """Latents → images in [0, 1], (B, 3, H, W), float32."""
    if model.vae is None:
        if "vae" in model.skipped:
            raise ModelLoadError(f"the VAE of {model.source!r} was not loaded (skip=vae)")
        x = latents
    else:
        s = model.vae.config.scaling_factor
        shift = getattr(model.vae.config, "shift_factor", None) or 0.0
        with torch.no_grad():
            x = model.vae.decode((latents / s + shift).to(model.vae.dtype)).sample
    return ((x.float() + 1.0) / 2.0).clamp(0.0, 1.0)
