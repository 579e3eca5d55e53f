"""The model card of an export: ``README.md`` in the Hugging Face hub's diffusers format.

    text = model_card(info, metrics=read_metrics(run / "metrics.jsonl", until_step=step))

``info`` is what :func:`snpo.models.write_export` writes to ``snpo_export.json`` (base model,
kind, family, pipeline and denoiser classes, null embedding kind, objective, β, λ, the run's
config and data identity, or a merge's recipe). The card opens with a YAML header the hub reads
(``base_model`` when it is a hub id, ``library_name: diffusers``, ``pipeline_tag``, ``tags``,
``license`` only when the metadata knows it), then says what was trained on what, the last
logged metrics, how to sample with diffusers, and for a Diffusion-NPO negative model how to merge
it (``snpo merge``). A pure function of its inputs: no clock, no paths of its own, sorted keys,
so the same run writes the same bytes.
"""

from __future__ import annotations

import hashlib
import json
import re
from pathlib import Path

import yaml

from snpo.metrics_file import read_records

CARD_FILE = "README.md"

# the hub's tag of each family (the hub groups models by these)
FAMILY_TAGS = {
    "sd": "stable-diffusion",
    "flow_unet": "stable-diffusion",
    "sdxl": "stable-diffusion-xl",
    "sd3": "stable-diffusion-3",
    "flux": "flux",
}
NULL_KINDS = {
    "empty_prompt": 'the text encoding of the empty prompt `""` (diffusers\' default negative '
    "prompt)",
    "zeros": "all-zero prompt embeddings (diffusers' `force_zeros_for_empty_prompt`)",
}
OBJECTIVES = {
    "sft": "supervised fine-tuning on the winners (noise-prediction MSE)",
    "dpo": "Diffusion-DPO",
    "bdpo": "Bounded DPO",
    "npo": "Diffusion-NPO negative model (preferences reversed on every pair)",
    "snpo_naive": "naive Diff-SNPO (preferences reversed on the null-prompt branch)",
    "snpo": "Diff-SNPO (preferences reversed on the null-prompt branch)",
    "npo_merged": "a merged Diffusion-NPO negative model (`snpo merge`)",
}
# metrics.jsonl fields the card shows, in this order (timings and memory vary run to run)
CARD_METRICS = (
    "loss",
    "accuracy_cond",
    "accuracy_uncond",
    "logp_proxy",
    "mse_policy",
    "mse_ref",
    "grad_norm",
    "lr",
)
HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]*/[\w.-]+$")


def read_metrics(path: str | Path, until_step: int | None = None) -> list[dict]:
    """The records of a run's ``metrics.jsonl`` with step ≤ ``until_step`` ([] when the file is
    absent; torn lines are skipped)."""
    path = Path(path)
    return read_records(path, until_step)[0] if path.is_file() else []


def data_fingerprint(data: list[dict]) -> str:
    """16 hex digits of SHA-256 over the data identity (one dict per file, keys sorted)."""
    blob = json.dumps(data, sort_keys=True, separators=(",", ":"), default=str)
    return hashlib.sha256(blob.encode()).hexdigest()[:16]


def is_hub_id(name: str) -> bool:
    """ "owner/name" and not a local path."""
    return bool(HUB_ID.match(name)) and not Path(name).is_absolute()


def card_header(info: dict) -> dict:
    """The YAML header of the card (the hub's model-card metadata)."""
    family = info.get("family", "sd")
    objective = info.get("objective")
    tags = ["diffusers", "text-to-image", FAMILY_TAGS.get(family, family), "snpo"]
    if objective:
        tags.append(str(objective).replace("_", "-"))
    if info.get("kind") == "lora":
        tags.append("lora")
    header: dict = {
        "library_name": "diffusers",
        "pipeline_tag": "text-to-image",
        "tags": list(dict.fromkeys(tags)),
    }
    base = str(info.get("base_model", ""))
    if is_hub_id(base):
        header["base_model"] = base
    if info.get("license"):
        header["license"] = str(info["license"])
    return header


def _fmt(v) -> str:
    if v is None:
        return "–"
    if isinstance(v, bool):
        return str(v).lower()
    if isinstance(v, float):
        return f"{v:.6g}"
    return str(v)


def _lora_note(info: dict, cfg: dict) -> str:
    """ " (LoRA rank r, alpha a, on to_k, to_q, …)" of a LoRA export, "" otherwise."""
    rank = cfg.get("lora_rank") or info.get("lora_rank")
    if info.get("kind") != "lora" or not rank:
        return ""
    parts = [f"LoRA rank {rank}"]
    if cfg.get("lora_rank"):
        parts.append(f"alpha {_fmt(cfg.get('lora_alpha') or cfg['lora_rank'])}")
    if cfg.get("lora_targets"):
        parts.append("on " + ", ".join(f"`{t}`" for t in sorted(cfg["lora_targets"])))
    return " (" + ", ".join(parts) + ")"


def _summary(info: dict, cfg: dict) -> list[str]:
    objective = info.get("objective")
    lines = [
        f"- **base model**: `{info.get('base_model')}`"
        + (f" (revision `{cfg['revision']}`)" if cfg.get("revision") else ""),
        f"- **family**: `{info.get('family')}` — pipeline `{info.get('pipeline_class')}`, "
        f"denoiser `{info.get('denoiser_class')}` in `{info.get('denoiser')}/`",
        f"- **export kind**: {info.get('kind')}{_lora_note(info, cfg)}",
        f"- **objective**: `{objective}` — {OBJECTIVES.get(objective, 'see snpo docs')}",
    ]
    if "beta" in info:
        lines.append(
            f"- **β**: {_fmt(info['beta'])} (Diffusion-DPO code convention, "
            "`-logsigmoid(-0.5·β·(model_diff − ref_diff))`: diffusers' `beta_dpo=2500` is "
            "β 5000 here)"
        )
    if "lam" in info:
        lines.append(f"- **λ**: {_fmt(info['lam'])}")
    if "uncond_prob" in info:
        lines.append(f"- **null-prompt branch probability**: {_fmt(info['uncond_prob'])}")
    if "weighting" in info:
        lines.append(f"- **weighting**: `{info['weighting']}`")
    null = info.get("null_kind")
    lines.append(
        f"- **null embedding** (`{null}`): {NULL_KINDS.get(null, null)}; the null-prompt branch "
        "was trained with it, so CFG at sampling must use the same one"
    )
    if info.get("prediction_type"):
        lines.append(f"- **prediction type**: `{info['prediction_type']}`")
    if info.get("snpo_version"):
        lines.append(f"- **snpo version**: {info['snpo_version']}")
    return lines


def _data(info: dict, cfg: dict) -> list[str]:
    data = info.get("data")
    files = cfg.get("train_data") or []
    if not data and not files:
        return []
    lines = ["## Training data", ""]
    if data:
        lines.append(f"Fingerprint `{data_fingerprint(data)}` (SHA-256 of the identity below).")
        lines.append("")
        lines.append("| file | identity |")
        lines.append("| --- | --- |")
        for d in data:
            name = d.get("file") or d.get("hub") or "?"
            rest = ", ".join(f"{k} {d[k]}" for k in sorted(d) if k not in ("file", "hub"))
            lines.append(f"| `{name}` | {rest} |")
    else:
        lines.extend(f"- `{Path(str(f)).name}`" for f in files)
    if info.get("inputs"):
        src = ", ".join(f"{k}: {v}" for k, v in sorted(info["inputs"].items()))
        lines += ["", f"Inputs: {src}."]
    return lines + [""]


def _training(info: dict, metrics: list[dict]) -> list[str]:
    if "step" not in info and not metrics:
        return []
    lines = ["## Training", ""]
    if "step" in info:
        lines.append(f"- **optimizer steps**: {info['step']}")
    if metrics:
        seen = sum(int(r.get("pairs") or 0) for r in metrics)
        lines.append(f"- **pairs seen**: {seen}")
        last = metrics[-1]
        lines += ["", f"Last logged metrics (step {last.get('step')}):", ""]
        lines += ["| metric | value |", "| --- | --- |"]
        lines += [f"| {k} | {_fmt(last[k])} |" for k in CARD_METRICS if k in last]
    return lines + [""]


def _sampling(info: dict, cfg: dict) -> list[str]:
    pipe = info.get("pipeline_class", "StableDiffusionPipeline")
    part = info.get("denoiser", "unet")
    base = info.get("base_model", "BASE_MODEL")
    cfg_scale = 7.5
    flux = info.get("family") == "flux"
    if flux:
        cfg_scale = cfg.get("guidance_scale") or 3.5
    code = ["import torch"]
    if info.get("kind") == "lora":
        code += [
            f"from diffusers import {pipe}",
            "",
            f'pipe = {pipe}.from_pretrained("{base}", torch_dtype=torch.float16).to("cuda")',
            'pipe.load_lora_weights("path/to/this/folder")',
        ]
    else:
        cls = info.get("denoiser_class", "UNet2DConditionModel")
        code += [
            f"from diffusers import {cls}, {pipe}",
            "",
            f"{part} = {cls}.from_pretrained(",
            f'    "path/to/this/folder", subfolder="{part}", torch_dtype=torch.float16',
            ")",
            f"pipe = {pipe}.from_pretrained(",
            f'    "{base}", {part}={part}, torch_dtype=torch.float16',
            ').to("cuda")',
        ]
    if info.get("family") == "wan":  # WanPipeline returns videos: an image is one frame
        code.append(
            'image = pipe("a photo of a cat", negative_prompt="", guidance_scale=5, '
            'num_frames=1, num_inference_steps=50, output_type="pil").frames[0][0]'
        )
    else:
        code.append(
            f'image = pipe("a photo of a cat", guidance_scale={cfg_scale:g}, '
            "num_inference_steps=50).images[0]"
        )
    lines = ["## Sampling", "", "```python", *code, "```", ""]
    if flux:
        lines.append(
            "FLUX-class models are guidance-distilled: `guidance_scale` is the embedded "
            "guidance, there is no null branch."
        )
    elif info.get("null_kind") == "zeros":
        lines.append(
            "The null branch is all-zero embeddings: keep the pipeline's "
            "`force_zeros_for_empty_prompt` (SDXL's default) and no negative prompt."
        )
    else:
        lines.append(
            "The null branch is the empty prompt: diffusers' default (no negative prompt)."
        )
    lines += [
        "",
        "Or with snpo (same seeds and noise for every model, grids of models × scales):",
        "",
        "```bash",
        'snpo sample --model this=path/to/this/folder --prompt "a photo of a cat" '
        f"--guidance {cfg_scale:g} --out samples",
        "```",
        "",
    ]
    return lines


def _npo(info: dict) -> list[str]:
    objective = info.get("objective")
    if objective == "npo":
        return [
            "## Using this negative model (Diffusion-NPO)",
            "",
            "This model was trained on reversed preferences: it is the unconditional branch of "
            "CFG, not a model to sample alone. Merge it with the reference (and optionally a "
            "preference-aligned positive model), then sample with it as the negative:",
            "",
            "```bash",
            f"snpo merge --reference {info.get('base_model')} --negative path/to/this/folder \\",
            "    [--positive path/to/aligned/export] --alpha 1 --beta 1 --out npo-merged",
            "snpo sample --model aligned=path/to/aligned/export --negative aligned=npo-merged \\",
            '    --prompt "a photo of a cat" --out samples',
            "```",
            "",
        ]
    if objective == "npo_merged":
        m = info.get("merge") or {}
        recipe = ", ".join(f"{k}: `{_fmt(m[k])}`" for k in sorted(m))
        return [
            "## Merge (Diffusion-NPO)",
            "",
            f"θ⁻_merged = θ_ref + α·(θ⁺ − θ_ref) + β·(θ⁻ − θ_ref); {recipe}.",
            "",
            "Use it as the unconditional branch: `snpo sample --model aligned=POSITIVE "
            "--negative aligned=path/to/this/folder`.",
            "",
        ]
    return []


def model_card(info: dict, metrics: list[dict] | None = None) -> str:
    """The ``README.md`` text of an export whose ``snpo_export.json`` is ``info``; ``metrics``:
    the run's metrics.jsonl records up to the exported step (pairs seen, last metrics)."""
    cfg = info.get("config") or {}
    metrics = list(metrics or [])
    header = yaml.safe_dump(card_header(info), sort_keys=True, allow_unicode=True)
    objective = info.get("objective", "snpo")
    title = f"{objective} {'LoRA' if info.get('kind') == 'lora' else 'fine-tune'}"
    body = [
        "---",
        header.rstrip("\n"),
        "---",
        "",
        f"# {title} of {info.get('base_model')}",
        "",
        "Trained with snpo (Diff-SNPO / Diffusion-DPO preference training). `snpo_export.json` in this folder holds the full metadata.",
        "",
        *_summary(info, cfg),
        "",
        *_data(info, cfg),
        *_training(info, metrics),
        *_sampling(info, cfg),
        *_npo(info),
    ]
    return "\n".join(body).rstrip("\n") + "\n"


def write_model_card(folder: str | Path, info: dict, metrics_file: str | Path | None) -> Path:
    """Write ``folder/README.md`` from ``info`` and the run's metrics file (None or absent: no
    metrics section) → its path."""
    until = info.get("step") if isinstance(info.get("step"), int) else None
    metrics = read_metrics(metrics_file, until) if metrics_file else []
    path = Path(folder) / CARD_FILE
    path.write_text(model_card(info, metrics), encoding="utf-8")
    return path
