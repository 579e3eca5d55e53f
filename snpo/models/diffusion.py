"""A loaded text-to-image diffusion model and :func:`load_model`, which picks its family.

A model is a diffusers-layout folder (local path or hub id): its denoiser (``unet/`` or
``transformer/``), ``scheduler/``, text encoders + tokenizers and optionally ``vae/``. Without
``vae`` the model works in pixel space (images in [-1, 1] are the "latents"), which is what the
small world uses. The family (:mod:`snpo.models.family`) is detected from the folder's
components and ``model_index.json``; it loads the components and defines the conditioning.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass, field
from pathlib import Path

import torch

from snpo.models.family import LoadRequest, find_family, get_family, load_families

SKIPPABLE = ("vae", "text_encoders")


class ModelLoadError(RuntimeError):
    """A model folder or hub id could not be loaded into usable components."""


@dataclass
class DiffusionModel:
    """The components of one text-to-image diffusion model.

    unet: the denoiser (a UNet2DConditionModel, or the transformer of flow families; also
    reachable as ``denoiser``); family: the family's name (``spec`` is the family object).
    """

    unet: torch.nn.Module
    scheduler: object  # the training noise scheduler (ε-families: DDPMScheduler)
    text_encoders: list[torch.nn.Module]
    tokenizers: list[object]
    vae: torch.nn.Module | None
    family: str
    source: str
    force_zeros_for_empty_prompt: bool = False
    extra: dict = field(default_factory=dict)

    @property
    def denoiser(self) -> torch.nn.Module:
        return self.unet

    @denoiser.setter
    def denoiser(self, module: torch.nn.Module) -> None:
        self.unet = module

    @property
    def spec(self):
        """The :class:`snpo.models.family.ModelFamily` of this model."""
        return get_family(self.family)

    @property
    def prediction_type(self) -> str:
        """ "epsilon" | "v_prediction" | "flow"."""
        return self.spec.prediction_type(self)

    @property
    def in_channels(self) -> int:
        """Channels of a latent (B, C, h, w): the family's :meth:`ModelFamily.latent_channels`."""
        return self.spec.latent_channels(self)

    @property
    def latent_scale(self) -> int:
        """Pixels per latent pixel (8 for SD VAEs; 1 in pixel space)."""
        if self.vae is None:  # pixel space, or a VAE left unloaded (its config was read)
            return int(self.extra.get("latent_scale", 1))
        return vae_spatial_scale(self.vae.config)

    @property
    def skipped(self) -> tuple[str, ...]:
        """Components :func:`load_model` was asked not to load ("vae", "text_encoders")."""
        return tuple(self.extra.get("skipped", ()))

    @property
    def null_kind(self) -> str:
        """Which null embedding CFG and the reversed-preference branch use."""
        return "zeros" if self.force_zeros_for_empty_prompt else "empty_prompt"


def is_local(path: str) -> bool:
    return os.path.isdir(path)


def model_index(source: str, **hub_kwargs) -> dict:
    """model_index.json of a local folder or hub repo, or {} when there is none."""
    if is_local(source):
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


def model_components(source: str, index: dict) -> set[str]:
    """Component names: subfolders of a local folder, non-null index entries of a hub repo."""
    if is_local(source):
        return {p.name for p in Path(source).iterdir() if p.is_dir()}
    return {k for k, v in index.items() if isinstance(v, list) and v[0] is not None}


def detect_family(source: str, index: dict | None = None) -> str:
    """The name of the family of a model folder; ModelLoadError when none matches."""
    index = model_index(source) if index is None else index
    parts = model_components(source, index)
    family = find_family(index, parts)
    if family is None:
        by_folder: dict[str, list[str]] = {}
        for name, fam in sorted(load_families().items()):
            by_folder.setdefault(fam.denoiser, []).append(name)
        missing = [f"no {d}/ subfolder ({', '.join(n)})" for d, n in by_folder.items()]
        raise ModelLoadError(
            f"{source!r} is not a diffusers model folder of a known family: it has "
            f"{' and '.join(missing)}; components found: {', '.join(sorted(parts)) or 'none'}"
        )
    return family.name


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


# VAE classes loaded as model_index.json names them; any other entry loads as AutoencoderKL
VAE_CLASSES = ("AutoencoderKL", "AutoencoderKLWan")


def vae_spatial_scale(conf) -> int:
    """Pixels per latent pixel of a VAE config: its ``scale_factor_spatial`` (the Wan video
    VAE) or 2^(number of down blocks − 1) (AutoencoderKL)."""
    scale = conf.get("scale_factor_spatial")
    return int(scale) if scale else 2 ** (len(conf["block_out_channels"]) - 1)


def vae_class(index: dict):
    """The diffusers VAE class of a folder: model_index.json's ``vae`` entry when it is one of
    :data:`VAE_CLASSES`, else AutoencoderKL."""
    import diffusers

    entry = index.get("vae")
    name = entry[1] if isinstance(entry, (list, tuple)) and len(entry) == 2 else None
    return getattr(diffusers, name if name in VAE_CLASSES else "AutoencoderKL")


def load_vae(request: LoadRequest) -> tuple[torch.nn.Module | None, dict]:
    """(the VAE (:func:`vae_class`) or None, extra) — None in pixel space or when skipped; a
    skipped VAE's config still gives ``extra["latent_scale"]``."""
    cls = vae_class(request.index)
    extra: dict = {"skipped": [s for s in SKIPPABLE if s in request.skip]}
    hub = request.hub or {}
    parts = model_components(request.source, request.index)
    if "vae" not in parts:
        return None, extra
    if "vae" in request.skip:
        conf = cls.load_config(request.source, subfolder="vae", **hub)
        extra["latent_scale"] = vae_spatial_scale(conf)
        return None, extra
    vae = cls.from_pretrained(
        request.source,
        subfolder="vae",
        torch_dtype=request.dtype,
        variant=request.variant,
        **hub,
    )
    return vae, extra


def freeze(modules: list[torch.nn.Module | None], device: torch.device | str) -> None:
    """Move to ``device``, no gradients, eval mode."""
    for module in modules:
        if module is not None:
            module.to(device)
            module.requires_grad_(False)
            module.eval()


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
    """Load a diffusers-layout model from a local folder or a hub id, through its family.

    ``unet_path``: an alternative denoiser folder (e.g. a trained export) replacing
    ``source/unet`` (``source/transformer``). ``skip``: components not to load at all, "vae"
    and/or "text_encoders" (a trainer whose latents / prompt embeddings come from
    ``snpo cache``): ``vae`` / ``text_encoders`` are then None / [] and :func:`encode_images` /
    :func:`encode_prompts` refuse to run; the VAE's config is still read, so ``latent_scale``
    stays right. Every component is loaded in ``dtype`` explicitly (hub configs may say float16).
    """
    if not is_local(source) and ("/" not in source or source.startswith((".", "/"))):
        raise ModelLoadError(
            f"model {source!r} is neither an existing folder nor a hub id (owner/name)"
        )
    bad = sorted(set(skip) - set(SKIPPABLE))
    if bad:
        raise ValueError(f"skip: unknown component(s) {bad}; choose from {', '.join(SKIPPABLE)}")
    hub = {"revision": revision} if revision else {}
    index = model_index(source, **hub)
    family = get_family(detect_family(source, index))
    request = LoadRequest(
        source=source,
        index=index,
        dtype=dtype,
        device=device,
        variant=variant,
        hub=hub,
        denoiser_path=unet_path,
        skip=tuple(skip),
    )
    try:
        return family.load(request)
    except (OSError, ValueError) as err:
        raise ModelLoadError(f"cannot load the model {source!r}: {err}") from err
