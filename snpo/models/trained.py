"""Loading a trained model from whatever the trainer or ``snpo merge`` wrote.

A source is (see :func:`load_any`):
- an snpo export (``snpo_export.json``: full denoiser or LoRA, fused);
- a diffusers model folder or hub id of any family (:mod:`snpo.models.family`: SD1.5-, SDXL-,
  SD3- or FLUX-class, or pixel space without VAE);
- a bare denoiser folder (``config.json`` of the family's ``denoiser_class``: a
  UNet2DConditionModel, SD3Transformer2DModel, FluxTransformer2DModel + weights), with
  ``base_model`` for the other components.
DeepSpeed checkpoints are recognised and refused with a message saying how to export them.
"""

from __future__ import annotations

import json
from dataclasses import replace
from pathlib import Path

import torch

# the package's public names: snpo/models/__init__.py imports this module after them
from snpo.models import (
    META_FILE,
    DiffusionModel,
    ModelLoadError,
    PromptEmbeddings,
    detect_family,
    get_family,
    load_export,
    load_families,
    load_model,
    null_embedding,
)
from snpo.precision import dtype_of

NULL_KINDS = ("empty_prompt", "zeros")
# denoiser config entries that fix its inputs and outputs, per diffusers class: a denoiser
# standing in for another's (Diffusion-NPO negative, compared model) must agree on all of them
UNET_INTERFACE = (
    "in_channels",
    "out_channels",
    "cross_attention_dim",
    "addition_embed_type",
    "projection_class_embeddings_input_dim",
    "block_out_channels",
)
DENOISER_INTERFACE: dict[str, tuple[str, ...]] = {
    "UNet2DConditionModel": UNET_INTERFACE,
    "SD3Transformer2DModel": (
        "in_channels",
        "out_channels",
        "patch_size",
        "joint_attention_dim",
        "pooled_projection_dim",
    ),
    "FluxTransformer2DModel": (
        "in_channels",
        "out_channels",
        "joint_attention_dim",
        "pooled_projection_dim",
        "guidance_embeds",
        "axes_dims_rope",
    ),
    "WanTransformer3DModel": ("in_channels", "out_channels", "patch_size", "text_dim"),
}
FLUX_DEFAULT_SAMPLE_SIZE = 128  # FluxPipeline.default_sample_size (latent pixels: 1024 px)


class IncompatibleModelError(ModelLoadError):
    """A model whose denoiser cannot stand in for another's (family or interface differ)."""


def is_deepspeed_checkpoint(path: Path) -> bool:
    """A DeepSpeed checkpoint folder: ``latest``, ``zero_to_fp32.py`` or ``global_step*/``."""
    if not path.is_dir():
        return False
    if (path / "latest").is_file() or (path / "zero_to_fp32.py").is_file():
        return True
    return any(p.is_dir() and p.name.startswith("global_step") for p in path.iterdir())


def denoiser_classes() -> dict[str, str]:
    """diffusers class name → denoiser subfolder ("unet" | "transformer") of every family."""
    return {f.denoiser_class: f.denoiser for f in load_families().values()}


def denoiser_dirs() -> set[str]:
    """The denoiser subfolder names of every family ({"unet", "transformer"})."""
    return set(denoiser_classes().values())


def denoiser_class_of(path: Path) -> str | None:
    """The ``_class_name`` of a bare denoiser folder (one of :func:`denoiser_classes`), or None
    when ``path/config.json`` is missing, unreadable or of another class."""
    cfg = Path(path) / "config.json"
    if not cfg.is_file():
        return None
    try:
        name = json.loads(cfg.read_text()).get("_class_name")
    except (OSError, ValueError, AttributeError):
        return None
    return name if name in denoiser_classes() else None


def is_denoiser_folder(path: Path) -> bool:
    """A bare denoiser folder of any family (:func:`denoiser_class_of` is not None)."""
    return denoiser_class_of(path) is not None


def is_unet_folder(path: Path) -> bool:
    """A bare UNet folder: ``config.json`` whose ``_class_name`` is UNet2DConditionModel."""
    return denoiser_class_of(path) == "UNet2DConditionModel"


def is_model_folder(path: Path) -> bool:
    """A diffusers model folder: a denoiser subfolder of some family (``unet/``,
    ``transformer/``)."""
    return path.is_dir() and any((path / d).is_dir() for d in denoiser_dirs())


def resolve_device(name: str) -> str:
    """``"auto"`` → ``"cuda"`` when available, else ``"cpu"``; other names pass through."""
    if name == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    return name


def resolve_dtype(name: str, device: str) -> torch.dtype:
    """``"auto"`` → float16 on CUDA, float32 elsewhere; else a name of :mod:`snpo.precision`."""
    if name == "auto":
        return torch.float16 if str(device).startswith("cuda") else torch.float32
    try:
        return dtype_of(name)
    except ValueError as err:
        raise ModelLoadError(f"{err} (or auto)") from None


def default_resolution(model: DiffusionModel) -> int:
    """Image side in pixels when none is given: the denoiser's ``sample_size`` (latent pixels;
    UNets and SD3 transformers record it) × the VAE factor; denoisers without one (FLUX) take
    their pipeline's default, :data:`FLUX_DEFAULT_SAMPLE_SIZE` latent pixels."""
    size = model.denoiser.config.get("sample_size") or FLUX_DEFAULT_SAMPLE_SIZE
    if isinstance(size, (list, tuple)):
        size = size[0]
    return int(size) * model.latent_scale


def _bare_folder(source: str, cls: str, base_model: str | None, **kw) -> DiffusionModel:
    """A bare denoiser folder of class ``cls`` with the components of ``base_model``."""
    what = "UNet" if denoiser_classes()[cls] == "unet" else f"transformer ({cls})"
    if base_model is None:
        raise ModelLoadError(
            f"{source} is a bare {what} folder: give --base-model (the diffusers model whose "
            "text encoders, tokenizer, scheduler and VAE it goes with)"
        )
    base = get_family(detect_family(base_model))
    if base.denoiser_class != cls:
        raise IncompatibleModelError(
            f"{source} is a bare {cls} folder but the base model {base_model} is "
            f"{base.name}-class ({base.denoiser_class}): they do not go together"
        )
    return load_model(base_model, unet_path=source, **kw)


def load_any(
    source: str,
    *,
    dtype: torch.dtype = torch.float32,
    device: str = "cpu",
    base_model: str | None = None,
) -> tuple[DiffusionModel, dict]:
    """Load an export, a diffusers model folder / hub id, or a bare denoiser folder.

    Returns the model and {"source", "kind": "export-full" | "export-lora" | "model" | "unet" |
    "transformer" (a bare denoiser folder), "family", "null_kind", "meta" (the export metadata,
    or {})}."""
    path = Path(source)
    cls = denoiser_class_of(path) if path.is_dir() else None
    if path.is_dir() and (path / META_FILE).is_file():
        model, meta = load_export(path, dtype=dtype, device=device, base_model=base_model)
        kind = f"export-{meta['kind']}"
    elif is_model_folder(path):
        model, meta, kind = load_model(source, dtype=dtype, device=device), {}, "model"
    elif cls is not None:
        model = _bare_folder(source, cls, base_model, dtype=dtype, device=device)
        meta, kind = {}, denoiser_classes()[cls]
    elif is_deepspeed_checkpoint(path):
        raise ModelLoadError(
            f"{source} looks like a DeepSpeed checkpoint; the tools read exports (an "
            "snpo_export.json folder), diffusers model folders or UNet/transformer folders. "
            "Export the checkpoint first: the trainer writes OUTPUT_DIR/export at the end of a "
            "run (and export-step<N> with export_every)."
        )
    elif path.exists():
        raise ModelLoadError(
            f"{source} is neither an snpo export, a diffusers model folder, nor a UNet or "
            "transformer folder"
        )
    else:
        model, meta, kind = load_model(source, dtype=dtype, device=device), {}, "model"
    if not model.spec.has_null_branch:
        use_trained_guidance(model, meta)
    if (
        dtype == torch.float16
        and model.vae is not None
        and getattr(model.vae.config, "force_upcast", False)
    ):
        model.vae.to(torch.float32)  # SDXL's VAE overflows in float16 (diffusers upcasts too)
    info = {
        "source": str(source),
        "kind": kind,
        "family": model.family,
        "null_kind": model.null_kind,
        "meta": meta,
    }
    return model, info


def use_trained_guidance(model: DiffusionModel, meta: dict) -> None:
    """Guidance-distilled families: make the embedded guidance an export was trained with
    (``meta["config"]["guidance_scale"]``, or ``meta["guidance_scale"]``) the model's default
    (``model.extra["guidance_scale"]``, which the family's conditioning reads)."""
    scale = meta.get("guidance_scale", (meta.get("config") or {}).get("guidance_scale"))
    if scale is not None:
        model.extra["guidance_scale"] = float(scale)


def null_for(model: DiffusionModel, kind: str) -> PromptEmbeddings:
    """The (1, L, D) null embedding of ``kind`` ("empty_prompt" | "zeros") with ``model``'s
    encoders (:func:`snpo.models.null_embedding` of that kind)."""
    if kind not in NULL_KINDS:
        raise ModelLoadError(f"unknown null embedding kind {kind!r}; one of {NULL_KINDS}")
    emb = null_embedding(replace(model, force_zeros_for_empty_prompt=kind == "zeros"))
    if kind == "zeros":  # families whose null embedding ignores the flag (SD3) get zeros too
        pooled = None if emb.pooled is None else torch.zeros_like(emb.pooled)
        emb = PromptEmbeddings(torch.zeros_like(emb.embeds), pooled)
    return emb


def _as_list(v):
    return list(v) if isinstance(v, (list, tuple)) else v


def no_null_branch_message(model: DiffusionModel, label: str) -> str:
    """The one-line refusal of a negative model for a family without a CFG null branch."""
    return (
        f"{label}: {model.family}-class models are guidance-distilled and sample without CFG: "
        "there is no unconditional branch for a negative model to replace"
    )


def check_interface(
    model: DiffusionModel, other: DiffusionModel, label: str, role: str = "negative"
) -> None:
    """``other``'s denoiser takes ``model``'s inputs: same family and the same
    :data:`DENOISER_INTERFACE` entries of the family's denoiser class, else
    :class:`IncompatibleModelError` naming the differences, prefixed by ``label`` (``role``:
    what ``other`` is, in the message)."""
    if model.family != other.family:
        raise IncompatibleModelError(
            f"{label}: the {role} model is {other.family}-class but the model is "
            f"{model.family}-class"
        )
    spec = model.spec
    keys = DENOISER_INTERFACE.get(spec.denoiser_class, ("in_channels", "out_channels"))
    a, b = model.denoiser.config, other.denoiser.config
    bad = [k for k in keys if _as_list(a.get(k)) != _as_list(b.get(k))]
    if bad:
        what = "UNet" if spec.denoiser == "unet" else spec.denoiser
        detail = ", ".join(f"{k}: {a.get(k)} vs {b.get(k)}" for k in bad)
        raise IncompatibleModelError(
            f"{label}: the {role} {what} does not match the model's ({detail})"
        )


def check_negative_compatible(model: DiffusionModel, negative: DiffusionModel, label: str) -> None:
    """``negative`` can be ``model``'s CFG null branch: the family has one (not FLUX-class)
    and :func:`check_interface` holds; :class:`IncompatibleModelError` otherwise."""
    if model.family == negative.family and not model.spec.has_null_branch:
        raise IncompatibleModelError(no_null_branch_message(model, label))
    check_interface(model, negative, label, "negative")
