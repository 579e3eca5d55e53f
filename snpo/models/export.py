"""Exports of trained models that diffusers loads directly, plus what sampling must know.

Layout of an export folder:
    unet/ (transformer/)                full fine-tune: the denoiser's from_pretrained(export/unet)
    pytorch_lora_weights.safetensors    LoRA: pipeline.load_lora_weights(export)  (keys "unet.…",
                                        "transformer.…")
    snpo_export.json                    base model, kind, family, its pipeline and denoiser
                                        classes, null embedding kind, objective, …
    README.md                           the model card (hub format, :mod:`snpo.models.model_card`)
The null embedding kind ("empty_prompt" | "zeros") is the one the null-prompt branch was trained
with; CFG at sampling must use the same one. The pipeline class (``StableDiffusionPipeline``,
``StableDiffusionXLPipeline``, ``StableDiffusion3Pipeline``, ``FluxPipeline``, ``WanPipeline``)
comes from the
model's family: the export is loaded into that pipeline built from the base model's folder. Writes are atomic: a new export is assembled in a
temporary folder and swapped in, so an interrupted write never replaces a good export.
The same inputs write the same bytes: sorted keys everywhere, the LoRA adapter config's module
sets as sorted lists, no timestamps.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import torch

from snpo.metrics_file import METRICS_FILE
from snpo.models.diffusion import DiffusionModel, load_model
from snpo.models.family import get_family
from snpo.models.model_card import write_model_card

META_FILE = "snpo_export.json"
LORA_FILE = "pytorch_lora_weights.safetensors"


class ExportError(RuntimeError):
    """A folder is not a usable snpo export."""


def pipeline_class(family: str):
    """The diffusers pipeline class an export of ``family`` loads into."""
    import diffusers

    return getattr(diffusers, get_family(family).pipeline_class)


def denoiser_folder(meta: dict) -> str:
    """The denoiser subfolder of an export ("unet" | "transformer") from its metadata."""
    try:
        return get_family(meta.get("family", "sd")).denoiser
    except ValueError as err:
        raise ExportError(f"export of an unknown model family: {err}") from None


def lora_state_dict(unet: torch.nn.Module) -> dict[str, torch.Tensor]:
    """The UNet's LoRA weights in PEFT key format (``….lora_A.weight`` / ``….lora_B.weight``,
    without the "unet." prefix), which diffusers' loaders read for every layer type.

    Not ``convert_state_dict_to_diffusers``: it renames attention projections only, and diffusers
    decides from the first key whether to convert a file, so a mixed file (e.g. LoRA on conv
    ``proj_in`` too) silently loses layers on loading."""
    from peft.utils import get_peft_model_state_dict

    return get_peft_model_state_dict(unet)


def sorted_adapter_config(config: dict) -> dict:
    """The PEFT adapter config ``config`` with every set (``target_modules``, …) a sorted list,
    nested dicts included: diffusers writes ``list(set)``, whose order changes from process to
    process (string hashing), so the export's bytes would too."""

    def norm(v):
        if isinstance(v, (set, frozenset)):
            return sorted(v, key=str)
        if isinstance(v, dict):
            return {k: norm(v[k]) for k in sorted(v, key=str)}
        if isinstance(v, (list, tuple)):
            return [norm(x) for x in v]
        return v

    return norm(dict(config))


def canonical_safetensors(path: str | Path) -> None:
    """Rewrite the safetensors file ``path`` with its ``__metadata__`` keys sorted: safetensors
    writes that map in a per-process hash order, so two identical exports would differ in bytes.
    The tensors (already in a fixed order, offsets relative to the data) are left as they are."""
    path = Path(path)
    raw = path.read_bytes()
    n = int.from_bytes(raw[:8], "little")
    header = json.loads(raw[8 : 8 + n])
    meta = header.pop("__metadata__", None)
    if not meta:
        return
    header = {"__metadata__": {k: meta[k] for k in sorted(meta)}, **header}
    text = json.dumps(header, separators=(",", ":"), ensure_ascii=False).encode()
    text += b" " * (-len(text) % 8)  # safetensors pads the header to 8 bytes with spaces
    path.write_bytes(len(text).to_bytes(8, "little") + text + raw[8 + n :])


def write_export(
    out_dir: str | Path, model: DiffusionModel, unet: torch.nn.Module, *, lora: bool, meta: dict
) -> Path:
    """Write the denoiser ``unet`` (full weights, or its LoRA adapter when ``lora``), the
    metadata (``meta`` on top of what the model says) and the model card ``README.md``. The
    card's metrics come from ``meta["config"]["output_dir"]``/metrics.jsonl (a trainer run's),
    up to ``meta["step"]``, when that file exists."""
    from snpo_kernels import __version__

    out = Path(out_dir)
    tmp = out.with_name(out.name + ".partial")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    part = model.spec.denoiser
    if lora:
        weights = {k: v.detach().cpu().contiguous() for k, v in lora_state_dict(unet).items()}
        # the adapter config (r, lora_alpha, patterns) rides along: without it diffusers loads
        # every layer with scale 1 instead of lora_alpha / r
        # (diffusers ≥ 0.34 reads and writes it; older ones load scale 1 whatever we do)
        import inspect

        save = pipeline_class(model.family).save_lora_weights
        kw = {f"{part}_lora_layers": weights}
        if f"{part}_lora_adapter_metadata" in inspect.signature(save).parameters:
            config = unet.peft_config.get("default") or next(iter(unet.peft_config.values()))
            kw[f"{part}_lora_adapter_metadata"] = sorted_adapter_config(config.to_dict())
        save(tmp, safe_serialization=True, **kw)
        canonical_safetensors(tmp / LORA_FILE)
    else:
        unet.save_pretrained(tmp / part, safe_serialization=True)
    family = model.spec
    info = {
        "base_model": str(Path(model.source).resolve())
        if Path(model.source).is_dir()
        else model.source,
        "kind": "lora" if lora else "full",
        "family": model.family,
        "pipeline_class": family.pipeline_class,
        "denoiser": family.denoiser,
        "denoiser_class": family.denoiser_class,
        "null_kind": model.null_kind,
        "prediction_type": model.prediction_type,
        "snpo_version": __version__,
        **meta,
    }
    (tmp / META_FILE).write_text(json.dumps(info, indent=2, sort_keys=True))
    run_dir = (meta.get("config") or {}).get("output_dir")
    write_model_card(tmp, info, Path(run_dir) / METRICS_FILE if run_dir else None)
    old = out.with_name(out.name + ".old")
    shutil.rmtree(old, ignore_errors=True)
    if out.exists():
        out.rename(old)
    tmp.rename(out)
    shutil.rmtree(old, ignore_errors=True)
    return out


def read_export_meta(path: str | Path) -> dict:
    f = Path(path) / META_FILE
    if not f.is_file():
        raise ExportError(f"{path} is not an snpo export: {META_FILE} is missing")
    meta = json.loads(f.read_text())
    kind = meta.get("kind")
    part = denoiser_folder(meta)
    if kind == "full" and not (Path(path) / part).is_dir():
        raise ExportError(f"export {path} says kind=full but has no {part}/ folder")
    if kind == "lora" and not (Path(path) / LORA_FILE).is_file():
        raise ExportError(f"export {path} says kind=lora but has no {LORA_FILE}")
    if kind not in ("full", "lora"):
        raise ExportError(f"export {path} has unknown kind {kind!r}")
    return meta


def load_lora_into(
    unet: torch.nn.Module, path: str | Path, adapter_name: str = "default", *, prefix: str = "unet"
) -> None:
    """Attach the LoRA adapter saved in export ``path`` to the denoiser ``unet`` (diffusers
    PEFT loader); ``prefix``: the denoiser's key prefix ("unet" | "transformer")."""
    unet.load_lora_adapter(
        str(path), prefix=prefix, weight_name=LORA_FILE, adapter_name=adapter_name
    )


def load_export(
    path: str | Path,
    *,
    dtype: torch.dtype = torch.float32,
    device: torch.device | str = "cpu",
    base_model: str | None = None,
    fuse_lora: bool = True,
) -> tuple[DiffusionModel, dict]:
    """The base model with the exported denoiser (or LoRA, fused by default) and the metadata.

    ``base_model`` overrides the recorded base (e.g. the export moved to another machine)."""
    meta = read_export_meta(path)
    base = base_model or meta["base_model"]
    part = denoiser_folder(meta)
    if meta["kind"] == "full":
        model = load_model(base, dtype=dtype, device=device, unet_path=str(Path(path) / part))
    else:
        model = load_model(base, dtype=dtype, device=device)
        load_lora_into(model.unet, path, prefix=part)
        if fuse_lora:
            model.unet.fuse_lora()
            model.unet.unload_lora()
    if model.null_kind != meta["null_kind"]:
        model.force_zeros_for_empty_prompt = meta["null_kind"] == "zeros"
    return model, meta
