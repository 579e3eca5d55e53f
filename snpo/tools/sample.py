"""``snpo sample``: images from one or more models for a prompt file, with a contact sheet per prompt.

    snpo sample --model base=runs/base --model snpo=runs/snpo/export \\
        --prompts prompts.txt --out runs/samples [--seeds 0,1,2,3] [--guidance 7.5] [--steps 50]

Defaults follow the papers' protocol: DDIM, 50 steps, CFG 7.5, seeds 0–3. Every image of one
(prompt, seed) starts from the same initial noise for every model (the noise is seeded per image,
independent of the batch), so the contact sheet compares like with like.

A model is (see :func:`load_any`):
- an snpo export (``snpo_export.json``: full UNet or LoRA, fused) — CFG uses the null embedding
  recorded in the export (``null_kind``), the one its null-prompt branch was trained with;
- a diffusers model folder or hub id (SD1.5- or SDXL-class, or a pixel-space model without VAE);
- a bare UNet folder (``config.json`` + weights), with ``--base-model`` for the other parts.
DeepSpeed checkpoints are not read: export them first (the trainer writes exports).

Diffusion-NPO: ``--negative NAME=PATH`` (or ``--negative PATH`` with one model) makes the UNet of
PATH the unconditional branch of model NAME: eps = eps_neg(x, ∅) + s·(eps_pos(x, c) − eps_neg(x, ∅)).
The negative is usually the output of ``snpo merge``.

Output: ``images/<model>/p<prompt>_s<seed>.png``, ``grids/p<prompt>.png`` (one column per model,
one row per seed) and ``manifest.json`` (model, prompt, seed, guidance, … and file of each image).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from dataclasses import dataclass
from pathlib import Path

import torch

from .export import ExportError
from .images import contact_sheet, save_png
from .models import DiffusionModel, ModelLoadError, PromptEmbeddings, encode_prompts, load_model

DTYPES = {
    "float32": torch.float32,
    "fp32": torch.float32,
    "float16": torch.float16,
    "fp16": torch.float16,
    "bfloat16": torch.bfloat16,
    "bf16": torch.bfloat16,
}
MANIFEST = "manifest.json"


class SampleError(RuntimeError):
    """Bad sampling arguments or inputs (the message says which)."""


# ----------------------------------------------------------------------------- loading


def is_deepspeed_checkpoint(path: Path) -> bool:
    if not path.is_dir():
        return False
    if (path / "latest").is_file() or (path / "zero_to_fp32.py").is_file():
        return True
    return any(p.is_dir() and p.name.startswith("global_step") for p in path.iterdir())


def is_unet_folder(path: Path) -> bool:
    cfg = path / "config.json"
    if not cfg.is_file():
        return False
    try:
        return json.loads(cfg.read_text()).get("_class_name") == "UNet2DConditionModel"
    except (OSError, ValueError):
        return False


def resolve_dtype(name: str, device: str) -> torch.dtype:
    if name == "auto":
        return torch.float16 if str(device).startswith("cuda") else torch.float32
    if name not in DTYPES:
        raise SampleError(f"unknown dtype {name!r}; one of auto, {', '.join(sorted(DTYPES))}")
    return DTYPES[name]


def resolve_device(name: str) -> str:
    if name == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    return name


def load_any(
    source: str,
    *,
    dtype: torch.dtype = torch.float32,
    device: str = "cpu",
    base_model: str | None = None,
) -> tuple[DiffusionModel, dict]:
    """Load an export, a diffusers model folder / hub id, or a bare UNet folder.

    Returns the model and a description: {"source", "kind": "export-full" | "export-lora" |
    "model" | "unet", "null_kind", "family", "meta" (the export metadata or {})}.
    """
    from .export import META_FILE, load_export

    path = Path(source)
    if path.is_dir() and (path / META_FILE).is_file():
        model, meta = load_export(path, dtype=dtype, device=device, base_model=base_model)
        kind = f"export-{meta['kind']}"
    elif path.is_dir() and (path / "unet").is_dir():
        model, meta, kind = load_model(source, dtype=dtype, device=device), {}, "model"
    elif path.is_dir() and is_unet_folder(path):
        if base_model is None:
            raise SampleError(
                f"{source} is a bare UNet folder: give --base-model (the diffusers model whose "
                "text encoders, tokenizer, scheduler and VAE it goes with)"
            )
        model = load_model(base_model, dtype=dtype, device=device, unet_path=str(path))
        meta, kind = {}, "unet"
    elif is_deepspeed_checkpoint(path):
        raise SampleError(
            f"{source} looks like a DeepSpeed checkpoint; sampling reads exports (an "
            "snpo_export.json folder), diffusers model folders or UNet folders. Export the "
            "checkpoint first: the trainer writes OUTPUT_DIR/export at the end of a run (and "
            "export-step<N> with export_every)."
        )
    elif path.exists():
        raise SampleError(
            f"{source} is neither an snpo export, a diffusers model folder, nor a UNet folder"
        )
    else:
        model, meta, kind = load_model(source, dtype=dtype, device=device), {}, "model"
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


def null_for(model: DiffusionModel, kind: str) -> PromptEmbeddings:
    """The null embedding of ``kind`` ("empty_prompt" | "zeros") with ``model``'s encoders."""
    if kind not in ("empty_prompt", "zeros"):
        raise SampleError(f"unknown null embedding kind {kind!r}")
    emb = encode_prompts(model, [""])
    if kind == "zeros":
        pooled = None if emb.pooled is None else torch.zeros_like(emb.pooled)
        emb = PromptEmbeddings(torch.zeros_like(emb.embeds), pooled)
    return emb


_UNET_MATCH = (
    "in_channels",
    "out_channels",
    "cross_attention_dim",
    "addition_embed_type",
    "projection_class_embeddings_input_dim",
    "block_out_channels",
)


def check_negative_compatible(model: DiffusionModel, negative: DiffusionModel, label: str) -> None:
    """The negative UNet must take the positive model's inputs (same family and UNet interface)."""
    if model.family != negative.family:
        raise SampleError(
            f"{label}: the negative model is {negative.family}-class but the model is "
            f"{model.family}-class"
        )
    a, b = model.unet.config, negative.unet.config
    bad = [k for k in _UNET_MATCH if list_or(a.get(k)) != list_or(b.get(k))]
    if bad:
        detail = ", ".join(f"{k}: {a.get(k)} vs {b.get(k)}" for k in bad)
        raise SampleError(f"{label}: the negative UNet does not match the model's ({detail})")


def list_or(v):
    return list(v) if isinstance(v, (list, tuple)) else v


@dataclass
class Entry:
    """One column of the contact sheet: a model, optionally with a negative UNet."""

    name: str
    model: DiffusionModel
    info: dict
    null: PromptEmbeddings
    negative_unet: torch.nn.Module | None = None
    negative_info: dict | None = None


def split_named(value: str) -> tuple[str | None, str]:
    """ "NAME=PATH" → (NAME, PATH); a bare PATH (or an existing path containing "=") → (None, PATH)."""
    if not Path(value).exists():
        name, sep, path = value.partition("=")
        if sep and name and "/" not in name and os.path.sep not in name and path:
            return name, path
    return None, value


def parse_named(values: list[str] | None, flag: str) -> dict[str, str]:
    """["base=PATH", "PATH2"] → {"base": "PATH", "<basename of PATH2>": "PATH2"}."""
    out: dict[str, str] = {}
    for v in values or []:
        name, path = split_named(v)
        name = name or Path(path.rstrip("/")).name or path
        if name in out:
            raise SampleError(f"{flag}: the name {name!r} is given twice; use NAME=PATH")
        out[name] = path
    return out


def build_entries(
    models: dict[str, str],
    negatives: dict[str, str],
    *,
    dtype: torch.dtype,
    device: str,
    base_model: str | None = None,
) -> list[Entry]:
    """Load every model once (sources shared between names are loaded once) and its negative."""
    unknown = set(negatives) - set(models)
    if unknown:
        raise SampleError(
            f"--negative names {sorted(unknown)} match no --model (names: {sorted(models)})"
        )
    cache: dict[str, tuple[DiffusionModel, dict]] = {}

    def get(src: str) -> tuple[DiffusionModel, dict]:
        if src not in cache:
            cache[src] = load_any(src, dtype=dtype, device=device, base_model=base_model)
        return cache[src]

    entries = []
    for name, src in models.items():
        model, info = get(src)
        entry = Entry(name, model, info, null_for(model, info["null_kind"]))
        if name in negatives:
            neg_model, neg_info = get(negatives[name])
            check_negative_compatible(model, neg_model, f"--negative {name}")
            # the negative UNet's null-prompt branch was trained with its own null embedding
            kind = neg_info["null_kind"]
            if kind != info["null_kind"]:
                print(
                    f"snpo sample: {name}: the negative model records null_kind={kind!r}, the "
                    f"model {info['null_kind']!r}; the negative branch uses {kind!r}",
                    file=sys.stderr,
                )
            entry.null = null_for(model, kind)
            entry.negative_unet = neg_model.unet
            entry.negative_info = neg_info
        entries.append(entry)
    return entries


# ----------------------------------------------------------------------------- prompts


def read_prompts(path: str | Path) -> list[str]:
    """One prompt per line (blank lines skipped), or JSONL with a "prompt" (or "caption") field."""
    path = Path(path)
    if not path.is_file():
        raise SampleError(f"prompt file {path} does not exist")
    lines = [ln for ln in path.read_text(encoding="utf-8").splitlines() if ln.strip()]
    jsonl = path.suffix == ".jsonl" or (lines and lines[0].lstrip().startswith("{"))
    prompts = []
    for i, ln in enumerate(lines, 1):
        if not jsonl:
            prompts.append(ln.strip())
            continue
        try:
            rec = json.loads(ln)
        except ValueError as err:
            raise SampleError(f"{path}:{i}: not JSON ({err})") from err
        text = rec.get("prompt", rec.get("caption")) if isinstance(rec, dict) else None
        if not isinstance(text, str):
            raise SampleError(f'{path}:{i}: a JSONL prompt needs a "prompt" string field')
        prompts.append(text)
    if not prompts:
        raise SampleError(f"prompt file {path} has no prompts")
    return prompts


def parse_seeds(text: str) -> list[int]:
    """ "0,1,2,3" or "0-3" → [0, 1, 2, 3]."""
    seeds: list[int] = []
    for part in text.split(","):
        part = part.strip()
        if not part:
            continue
        lo, sep, hi = part.partition("-")
        if sep and lo:
            seeds.extend(range(int(lo), int(hi) + 1))
        else:
            seeds.append(int(part))
    if not seeds:
        raise SampleError(f"no seeds in {text!r}")
    if len(set(seeds)) != len(seeds):
        raise SampleError(f"repeated seeds in {text!r}")
    return seeds


# ----------------------------------------------------------------------------- sampling


def image_name(prompt_index: int, seed: int) -> str:
    return f"p{prompt_index:04d}_s{seed}.png"


def _write_json_atomic(path: Path, obj) -> None:
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(obj, indent=2, ensure_ascii=False))
    tmp.replace(path)


def run_sampling(
    entries: list[Entry],
    prompts: list[str],
    seeds: list[int],
    out_dir: str | Path,
    *,
    guidance_scale: float = 7.5,
    steps: int = 50,
    scheduler: str = "ddim",
    batch_size: int = 8,
    resolution: int | None = None,
    progress: bool = True,
    grids: bool = True,
) -> dict:
    """Generate every (model, prompt, seed) image, the contact sheets and the manifest."""
    from tqdm.auto import tqdm

    from .sampler import generate

    if batch_size < 1:
        raise SampleError("--batch-size must be ≥ 1")
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    items = [(pi, s) for pi in range(len(prompts)) for s in seeds]
    records = []
    bar = tqdm(total=len(entries) * len(items), desc="sampling", unit="img", disable=not progress)
    for e in entries:
        folder = out / "images" / e.name
        for start in range(0, len(items), batch_size):
            chunk = items[start : start + batch_size]
            cond = encode_prompts(e.model, [prompts[pi] for pi, _ in chunk])
            imgs = generate(
                e.model,
                cond,
                e.null,
                [s for _, s in chunk],
                guidance_scale=guidance_scale,
                steps=steps,
                resolution=resolution,
                negative_unet=e.negative_unet,
                scheduler=scheduler,
            )
            for (pi, s), img in zip(chunk, imgs):
                f = save_png(img, folder / image_name(pi, s))
                records.append(
                    {
                        "model": e.name,
                        "source": e.info["source"],
                        "negative": None if e.negative_info is None else e.negative_info["source"],
                        "prompt": prompts[pi],
                        "prompt_index": pi,
                        "seed": s,
                        "guidance_scale": guidance_scale,
                        "steps": steps,
                        "scheduler": scheduler,
                        "height": img.shape[-2],
                        "width": img.shape[-1],
                        "file": f.relative_to(out).as_posix(),
                    }
                )
            bar.update(len(chunk))
    bar.close()
    grid_files = []
    if grids:
        from PIL import Image

        for pi, prompt in enumerate(prompts):
            tiles = [
                [Image.open(out / "images" / e.name / image_name(pi, s)) for e in entries]
                for s in seeds
            ]
            cols = [e.name + (" (+neg)" if e.negative_unet is not None else "") for e in entries]
            sheet = contact_sheet(
                tiles,
                col_labels=cols,
                row_labels=[f"seed {s}" for s in seeds],
                title=prompt[:80],
            )
            g = save_png(sheet, out / "grids" / f"p{pi:04d}.png")
            grid_files.append(
                {"prompt_index": pi, "prompt": prompt, "file": g.relative_to(out).as_posix()}
            )
    manifest = {
        "version": 1,
        "settings": {
            "guidance_scale": guidance_scale,
            "steps": steps,
            "scheduler": scheduler,
            "resolution": resolution,
            "seeds": seeds,
            "batch_size": batch_size,
        },
        "models": {
            e.name: {
                "source": e.info["source"],
                "kind": e.info["kind"],
                "family": e.info["family"],
                "null_kind": e.info["null_kind"],
                "negative": None
                if e.negative_info is None
                else {
                    "source": e.negative_info["source"],
                    "kind": e.negative_info["kind"],
                    "null_kind": e.negative_info["null_kind"],
                },
                "export_meta": e.info["meta"],
            }
            for e in entries
        },
        "prompts": prompts,
        "images": records,
        "grids": grid_files,
    }
    _write_json_atomic(out / MANIFEST, manifest)
    return manifest


# ----------------------------------------------------------------------------- CLI


def add_model_args(ap: argparse.ArgumentParser) -> None:
    """The model-loading options shared by ``snpo sample`` and ``snpo eval``."""
    ap.add_argument(
        "--model",
        action="append",
        metavar="[NAME=]PATH",
        help="a model to use (repeat for several; one column each). PATH: an snpo export, a "
        "diffusers model folder or hub id, or a UNet folder (with --base-model)",
    )
    ap.add_argument(
        "--negative",
        action="append",
        metavar="[NAME=]PATH",
        help="Diffusion-NPO: the UNet of PATH is the unconditional branch of model NAME "
        "(NAME may be left out when there is one --model)",
    )
    ap.add_argument(
        "--base-model",
        help="base diffusers model for bare UNet folders, or to override an export's recorded base",
    )
    ap.add_argument("--device", default="auto", help="auto (cuda if available), cpu, cuda:0, …")
    ap.add_argument(
        "--dtype",
        default="auto",
        help="auto (float16 on CUDA, float32 on CPU), float32, bfloat16, …",
    )


def model_specs(args) -> tuple[dict[str, str], dict[str, str]]:
    if not args.model:
        raise SampleError("give at least one --model [NAME=]PATH")
    models = parse_named(args.model, "--model")
    negatives: dict[str, str] = {}
    for v in args.negative or []:
        name, path = split_named(v)
        if name is None:
            if len(models) != 1:
                raise SampleError(
                    f"--negative {v!r}: with several models say which one it is for: "
                    f"NAME=PATH with NAME one of {sorted(models)}"
                )
            name = next(iter(models))
        if name not in models:
            raise SampleError(f"--negative {v!r}: no --model is named {name!r} ({sorted(models)})")
        if name in negatives:
            raise SampleError(f"--negative: model {name!r} has two negatives")
        negatives[name] = path
    return models, negatives


def build_parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(
        prog="snpo sample", description=__doc__.split("\n\n")[0].replace("``", "")
    )
    add_model_args(ap)
    ap.add_argument("--prompts", help="prompt file: one per line, or JSONL with a prompt field")
    ap.add_argument("--prompt", action="append", help="a prompt (repeatable; adds to --prompts)")
    ap.add_argument("--out", required=True, help="output folder")
    ap.add_argument("--seeds", default="0,1,2,3", help="seeds, e.g. 0,1,2,3 or 0-3 (default 0-3)")
    ap.add_argument("--guidance", type=float, default=7.5, help="CFG scale (default 7.5)")
    ap.add_argument("--steps", type=int, default=50, help="sampling steps (default 50)")
    ap.add_argument("--scheduler", default="ddim", choices=["ddim", "ddpm", "euler"])
    ap.add_argument("--batch-size", type=int, default=8, help="images per forward (default 8)")
    ap.add_argument("--resolution", type=int, default=None, help="pixels (default: the UNet's)")
    ap.add_argument("--no-grid", action="store_true", help="skip the contact sheets")
    ap.add_argument("--no-progress", action="store_true", help="no progress bar")
    return ap


def collect_prompts(args) -> list[str]:
    prompts = read_prompts(args.prompts) if args.prompts else []
    prompts += list(args.prompt or [])
    if not prompts:
        raise SampleError("give --prompts FILE or --prompt TEXT")
    return prompts


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        prompts = collect_prompts(args)
        seeds = parse_seeds(args.seeds)
        models, negatives = model_specs(args)
        device = resolve_device(args.device)
        entries = build_entries(
            models,
            negatives,
            dtype=resolve_dtype(args.dtype, device),
            device=device,
            base_model=args.base_model,
        )
        manifest = run_sampling(
            entries,
            prompts,
            seeds,
            args.out,
            guidance_scale=args.guidance,
            steps=args.steps,
            scheduler=args.scheduler,
            batch_size=args.batch_size,
            resolution=args.resolution,
            progress=not args.no_progress,
            grids=not args.no_grid,
        )
    except (SampleError, ModelLoadError, ExportError) as err:
        print(f"snpo sample: error: {err}", file=sys.stderr)
        return 2
    print(
        f"snpo sample: {len(manifest['images'])} images, {len(manifest['grids'])} grids → "
        f"{Path(args.out) / MANIFEST}"
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
