"""``snpo sample``: images from one or more models for a prompt file, with a contact sheet per prompt.

    snpo sample --model base=runs/base --model snpo=runs/snpo/export \\
        --prompts prompts.txt --out runs/samples [--seeds 0,1,2,3] [--guidance 7.5] [--steps 50]

Defaults follow the papers' protocol: 50 steps, CFG 7.5, seeds 0–3, the family's sampler
(DDIM for SD1.5/SDXL-class models, flow-matching Euler for SD3- and FLUX-class ones). Every image
of one (prompt, seed) starts from the same initial noise for every model (the noise is seeded per
image, independent of the batch), so the contact sheet compares like with like.

A model is an snpo export, a diffusers model folder or hub id, or a bare denoiser (UNet or
transformer) folder with ``--base-model`` (:func:`snpo.models.trained.load_any`), of any family.
CFG uses the null embedding recorded in an export (``null_kind``), the one its null-prompt branch
was trained with. Guidance-distilled (FLUX-class) models have no null branch: ``--guidance`` is
their embedded guidance (default: the one the export was trained with, else 3.5) and one
conditional forward per step samples them.

Diffusion-NPO: ``--negative NAME=PATH`` (or ``--negative PATH`` with one model) makes the
denoiser of PATH the unconditional branch of model NAME:
pred = pred_neg(x, ∅) + s·(pred_pos(x, c) − pred_neg(x, ∅)) (ε, or the flow velocity). The
negative is usually the output of ``snpo merge``; FLUX-class models refuse it.

``--guidance 3,7.5`` samples every model at each scale (images then named
``p<prompt>_s<seed>_g<scale>.png``).

Output: ``images/<model>/p<prompt>_s<seed>.png``, ``grids/p<prompt>.png`` (one column per model
and guidance scale, one row per seed), ``grids/sheet_000.png``, … (every prompt and seed as a row,
the prompt's caption wrapped beside it, models × scales as columns, split over sheets of at most
4096 × 4096 px: :mod:`snpo.tools.grid`) and ``manifest.json`` (model, prompt, seed, guidance, …
and file of each image).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from dataclasses import dataclass
from pathlib import Path

import torch

from snpo.atomic import atomic_write_text
from snpo.data import save_png
from snpo.models import (
    DiffusionModel,
    ExportError,
    ModelLoadError,
    PromptEmbeddings,
    check_negative_compatible,
    encode_prompts,
    load_any,
    null_for,
    resolve_device,
    resolve_dtype,
)
from snpo.models.trained import default_resolution, no_null_branch_message

MANIFEST = "manifest.json"
CFG_SCALE = 7.5  # the papers' CFG scale, the default of families with a null branch
SCHEDULERS = ("ddim", "ddpm", "euler", "flow_euler")  # what the families know (ε: the first 3)


class SampleError(RuntimeError):
    """Bad sampling arguments or inputs (the message says which)."""


@dataclass
class Entry:
    """One column of the contact sheet: a model, optionally with a negative denoiser."""

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
        if name in negatives and not model.spec.has_null_branch:
            raise SampleError(no_null_branch_message(model, f"--negative {name}"))
        if name in negatives:
            neg_model, neg_info = get(negatives[name])
            check_negative_compatible(model, neg_model, f"--negative {name}")
            # the negative's null-prompt branch was trained with its own null embedding
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


def image_name(prompt_index: int, seed: int, scale: float | None = None) -> str:
    """``p0003_s1.png``; with ``scale`` (several guidance scales): ``p0003_s1_g7.5.png``."""
    tail = "" if scale is None else f"_g{scale:g}"
    return f"p{prompt_index:04d}_s{seed}{tail}.png"


def parse_scales(text: str | None) -> list[float] | None:
    """ "7.5" → [7.5]; "3,7.5" → [3.0, 7.5]; None → None (each model's default)."""
    if text is None:
        return None
    try:
        scales = [float(p) for p in str(text).split(",") if p.strip()]
    except ValueError:
        raise SampleError(f"--guidance {text!r}: give numbers, e.g. 7.5 or 3,7.5") from None
    if not scales:
        raise SampleError(f"--guidance {text!r}: no scale given")
    if len(set(scales)) != len(scales):
        raise SampleError(f"--guidance {text!r}: a scale is repeated")
    return scales


def default_guidance(model: DiffusionModel) -> float:
    """The guidance scale when none is given: CFG :data:`CFG_SCALE` for families with a null
    branch; the embedded guidance of guidance-distilled ones (``model.extra``: the one the
    export was trained with, else the family's default)."""
    if model.spec.has_null_branch:
        return CFG_SCALE
    return float(model.extra.get("guidance_scale", CFG_SCALE))


def check_resolution(model: DiffusionModel, resolution: int) -> None:
    """Transformers (SD3, FLUX) sample sides that are multiples of the VAE factor × 2 (2×2
    latent patches); SampleError (one line) otherwise. UNets are not checked."""
    if model.spec.denoiser != "transformer":
        return
    step = model.latent_scale * 2
    if resolution < step or resolution % step:
        raise SampleError(
            f"--resolution {resolution}: {model.family}-class models need a multiple of {step}"
        )


def check_scheduler(e: Entry, name: str | None, resolution: int) -> str:
    """The sampler ``e`` uses (``name`` or its family's default), checked against the family
    (SampleError naming the family otherwise)."""
    fam = e.model.spec
    chosen = name or fam.default_sampler
    side = resolution // e.model.latent_scale
    try:
        fam.sampling_scheduler(e.model, chosen, 1, "cpu", (e.model.in_channels, side, side))
    except ValueError as err:
        raise SampleError(
            f"--scheduler {chosen}: model {e.name} is {e.model.family}-class: {err}"
        ) from None
    return chosen


def _scales(scales: tuple[float, ...] | None) -> float | list[float] | None:
    """One guidance scale as a number (the manifest's form), several as a list."""
    if scales is None:
        return None
    return scales[0] if len(scales) == 1 else list(scales)


def _common(values: list):
    """The value all of ``values`` share, else None."""
    return values[0] if values and all(v == values[0] for v in values) else None


def run_sampling(
    entries: list[Entry],
    prompts: list[str],
    seeds: list[int],
    out_dir: str | Path,
    *,
    guidance_scale: float | list[float] | None = None,
    steps: int = 50,
    scheduler: str | None = None,
    batch_size: int = 8,
    resolution: int | None = None,
    progress: bool = True,
    grids: bool = True,
) -> dict:
    """Generate every (model, guidance scale, prompt, seed) image, the grids and the manifest.

    ``guidance_scale``: one scale or a list (every model at each); None for it, ``scheduler`` or
    ``resolution``: each model's default (:func:`default_guidance`, its family's sampler,
    :func:`default_resolution`)."""
    from tqdm.auto import tqdm

    from snpo.models import generate

    if batch_size < 1:
        raise SampleError("--batch-size must be ≥ 1")
    given = guidance_scale
    if given is not None:
        given = [float(g) for g in (given if isinstance(given, (list, tuple)) else [given])]
    several = given is not None and len(given) > 1  # then file names carry the scale
    plan = {}  # model name → (guidance scales, scheduler, resolution)
    for e in entries:
        res = resolution or default_resolution(e.model)
        check_resolution(e.model, res)
        g = tuple(given) if given is not None else (default_guidance(e.model),)
        plan[e.name] = (g, check_scheduler(e, scheduler, res), res)

    def name_of(pi: int, s: int, g: float) -> str:
        return image_name(pi, s, g if several else None)

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    items = [(pi, s) for pi in range(len(prompts)) for s in seeds]
    records = []
    n_images = sum(len(plan[e.name][0]) for e in entries) * len(items)
    bar = tqdm(total=n_images, desc="sampling", unit="img", disable=not progress)
    for e, e_guidance in [(x, g) for x in entries for g in plan[x.name][0]]:
        folder = out / "images" / e.name
        _, e_scheduler, e_res = plan[e.name]
        for start in range(0, len(items), batch_size):
            chunk = items[start : start + batch_size]
            cond = encode_prompts(e.model, [prompts[pi] for pi, _ in chunk])
            imgs = generate(
                e.model,
                cond,
                e.null,
                [s for _, s in chunk],
                guidance_scale=e_guidance,
                steps=steps,
                resolution=e_res,
                negative_unet=e.negative_unet,
                scheduler=e_scheduler,
            )
            for (pi, s), img in zip(chunk, imgs):
                f = save_png(img, folder / name_of(pi, s, e_guidance))
                records.append(
                    {
                        "model": e.name,
                        "source": e.info["source"],
                        "negative": None if e.negative_info is None else e.negative_info["source"],
                        "prompt": prompts[pi],
                        "prompt_index": pi,
                        "seed": s,
                        "guidance_scale": e_guidance,
                        "steps": steps,
                        "scheduler": e_scheduler,
                        "height": img.shape[-2],
                        "width": img.shape[-1],
                        "file": f.relative_to(out).as_posix(),
                    }
                )
            bar.update(len(chunk))
    bar.close()
    grid_files, sheet_files = [], []
    if grids:
        from PIL import Image

        from snpo.tools.grid import grid_sheets, save_sheets

        columns = [(e, g) for e in entries for g in plan[e.name][0]]
        headers = [
            f"{e.name}{' (+neg)' if e.negative_unet is not None else ''} · "
            f"{'CFG' if e.model.spec.has_null_branch else 'guidance'} {g:g}"
            for e, g in columns
        ]

        def tile(pi: int, s: int, e: Entry, g: float) -> Image.Image:
            with Image.open(out / "images" / e.name / name_of(pi, s, g)) as im:
                return im.convert("RGB")

        tiles = {(pi, s): [tile(pi, s, e, g) for e, g in columns] for pi, s in items}
        for pi, prompt in enumerate(prompts):  # one sheet per prompt: a row per seed
            sheet = grid_sheets(
                [tiles[pi, s] for s in seeds],
                row_captions=[f"{prompt}\nseed {s}" for s in seeds],
                col_headers=headers,
                max_width=None,
                max_height=None,
            )[0]
            g = save_png(sheet, out / "grids" / f"p{pi:04d}.png")
            grid_files.append(
                {"prompt_index": pi, "prompt": prompt, "file": g.relative_to(out).as_posix()}
            )
        sheets = grid_sheets(  # every prompt and seed a row, over sheets of bounded size
            [tiles[pi, s] for pi, s in items],
            row_captions=[f"{prompts[pi]}\nseed {s}" for pi, s in items],
            col_headers=headers,
        )
        sheet_files = [f.relative_to(out).as_posix() for f in save_sheets(sheets, out / "grids")]
    manifest = {
        "version": 1,
        "settings": {  # a per-model default shared by every model is recorded as such
            "guidance_scale": _scales(_common([p[0] for p in plan.values()])),
            "steps": steps,
            "scheduler": _common([p[1] for p in plan.values()]),
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
                "guidance_scale": _scales(plan[e.name][0]),
                "guidance": "cfg" if e.model.spec.has_null_branch else "embedded",
                "scheduler": plan[e.name][1],
                "resolution": plan[e.name][2],
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
        "sheets": sheet_files,
    }
    atomic_write_text(out / MANIFEST, json.dumps(manifest, indent=2, ensure_ascii=False))
    return manifest


# ----------------------------------------------------------------------------- CLI


def add_model_args(ap: argparse.ArgumentParser) -> None:
    """The model-loading options shared by ``snpo sample`` and ``snpo eval``."""
    ap.add_argument(
        "--model",
        action="append",
        metavar="[NAME=]PATH",
        help="a model to use (repeat for several; one column each). PATH: an snpo export, a "
        "diffusers model folder or hub id, or a UNet/transformer folder (with --base-model)",
    )
    ap.add_argument(
        "--negative",
        action="append",
        metavar="[NAME=]PATH",
        help="Diffusion-NPO: the denoiser of PATH is the unconditional branch of model NAME "
        "(NAME may be left out when there is one --model; not for FLUX-class models)",
    )
    ap.add_argument(
        "--base-model",
        help="base diffusers model for bare UNet/transformer folders, or to override an "
        "export's recorded base",
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
    ap.add_argument(
        "--guidance",
        default=None,
        help="CFG scale, or several (3,7.5: one grid column per model and scale; default 7.5); "
        "FLUX-class: the embedded guidance (default: the trained one)",
    )
    ap.add_argument("--steps", type=int, default=50, help="sampling steps (default 50)")
    ap.add_argument(
        "--scheduler",
        default=None,
        choices=list(SCHEDULERS),
        help="default: the family's (ddim for SD1.5/SDXL, flow_euler for SD3/FLUX)",
    )
    ap.add_argument("--batch-size", type=int, default=8, help="images per forward (default 8)")
    ap.add_argument("--resolution", type=int, default=None, help="pixels (default: the denoiser's)")
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
        scales = parse_scales(args.guidance)
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
            guidance_scale=scales,
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
