"""Reward scores of generated images (``snpo eval --rewards``).

    snpo eval --rewards pickscore,aesthetic --images runs/samples --pickscore-model P … --out D
    snpo eval --rewards pickscore --model base=B --model snpo=E --prompts p.txt --out D

scores the images of a ``snpo sample`` folder (its manifest says model, prompt and seed of each
image; a folder of ``MODEL/*.png`` with same-named ``.txt`` prompts works too), or samples them
first (into ``OUT/samples``, the papers' protocol). Per model: the mean over prompts for each
seed, then mean ± std over seeds. Output: ``rewards.{json,md}``.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from pathlib import Path

import torch

from snpo.atomic import atomic_write_text
from snpo.models import resolve_device, resolve_dtype
from snpo.tools.preference import EvalError


def image_records(images_dir: str | Path) -> list[dict]:
    """Images to score: from a ``snpo sample`` manifest, or MODEL/*.png with .txt prompts."""
    from snpo.tools.sample import MANIFEST

    d = Path(images_dir)
    if not d.is_dir():
        raise EvalError(f"--images {d} is not a folder")
    mf = d / MANIFEST
    if mf.is_file():
        man = json.loads(mf.read_text())
        recs = []
        for r in man["images"]:
            recs.append(
                {
                    "model": r["model"],
                    "prompt": r["prompt"],
                    "prompt_index": r["prompt_index"],
                    "seed": r["seed"],
                    "path": str(d / r["file"]),
                }
            )
        return recs
    recs = []
    prompts: dict[str, int] = {}
    for sub in sorted(p for p in d.iterdir() if p.is_dir()):
        for png in sorted(sub.glob("*.png")):
            txt = png.with_suffix(".txt")
            if not txt.is_file():
                raise EvalError(f"{png} has no {txt.name} with its prompt (and {d} no {MANIFEST})")
            prompt = txt.read_text(encoding="utf-8").strip()
            pi = prompts.setdefault(prompt, len(prompts))
            recs.append(
                {
                    "model": sub.name,
                    "prompt": prompt,
                    "prompt_index": pi,
                    "seed": 0,
                    "path": str(png),
                }
            )
    if not recs:
        raise EvalError(f"no images in {d}: expected a {MANIFEST} or MODEL/*.png + .txt prompts")
    return recs


def score_records(
    records: list[dict], scorers: dict, *, batch_size: int = 16, progress=True
) -> None:
    """Adds records[i]["scores"][metric] for every scorer (in place)."""
    from PIL import Image
    from tqdm.auto import tqdm

    bar = tqdm(total=len(records) * len(scorers), desc="rewards", unit="img", disable=not progress)
    for r in records:
        r.setdefault("scores", {})
    for name, scorer in scorers.items():
        for start in range(0, len(records), batch_size):
            chunk = records[start : start + batch_size]
            images = [Image.open(r["path"]).convert("RGB") for r in chunk]
            values = scorer.score(images, [r["prompt"] for r in chunk])
            for r, v in zip(chunk, values):
                r["scores"][name] = float(v)
            bar.update(len(chunk))
    bar.close()


def summarize_rewards(records: list[dict], metrics: list[str]) -> dict:
    """Per model and metric: mean over prompts per seed, then mean and std over seeds."""
    out: dict = {}
    for model in dict.fromkeys(r["model"] for r in records):
        rs = [r for r in records if r["model"] == model]
        entry: dict = {"images": len(rs), "prompts": len({r["prompt_index"] for r in rs})}
        for metric in metrics:
            per_seed: dict[int, list[float]] = {}
            for r in rs:
                per_seed.setdefault(int(r["seed"]), []).append(r["scores"][metric])
            means = {s: sum(v) / len(v) for s, v in sorted(per_seed.items())}
            vals = torch.tensor(list(means.values()), dtype=torch.float64)
            std = float(vals.std(unbiased=True)) if len(vals) > 1 else 0.0
            entry[metric] = {
                "mean": float(vals.mean()),
                "std_over_seeds": std,
                "per_seed": {str(s): m for s, m in means.items()},
            }
        out[model] = entry
    return out


def rewards_table(summary: dict, metrics: list[str]) -> str:
    from snpo.tools.rewards import DISPLAY, METRICS

    cols = [m for m in METRICS if m in metrics]
    lines = [
        "| model | " + " | ".join(DISPLAY[c] for c in cols) + " | images |",
        "| --- | " + " | ".join("---" for _ in cols) + " | --- |",
    ]
    for name, e in summary.items():
        cells = [f"{e[c]['mean']:.4g} ± {e[c]['std_over_seeds']:.2g}" for c in cols]
        lines.append(f"| {name} | " + " | ".join(cells) + f" | {e['images']} |")
    return "\n".join(lines) + "\n"


def evaluate_rewards(
    metrics: list[str],
    out: str | Path,
    *,
    images: str | Path | None = None,
    models: dict[str, str] | None = None,
    negatives: dict[str, str] | None = None,
    prompts: list[str] | None = None,
    sample_seeds: Sequence[int] = (0, 1, 2, 3),
    guidance_scale: float | None = None,
    steps: int = 50,
    sample_batch_size: int = 4,
    device: str = "auto",
    dtype: str = "auto",
    base_model: str | None = None,
    reward_options: dict | None = None,
    reward_batch_size: int = 16,
    progress: bool = True,
) -> dict:
    """Reward scores (``metrics``) of the images of ``images`` (a ``snpo sample`` folder), or of
    ``models`` sampled first on ``prompts`` into ``out/samples``; writes
    ``out/rewards.{json,md}`` and returns the report {"settings", "models", "images"}.

    ``reward_options``: the scorers' weights and flags (:func:`snpo.tools.rewards.build_scorers`);
    ``guidance_scale`` None: each model's default (:func:`snpo.tools.sample.default_guidance`)."""
    from snpo.tools.rewards import build_scorers
    from snpo.tools.sample import build_entries, run_sampling

    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    device = resolve_device(device)
    opts = dict(reward_options or {})
    scorers = build_scorers(metrics, opts, device=device)  # fail early, before sampling
    if images is None:
        if not models or not prompts:
            raise EvalError("--rewards needs --images DIR, or --model … with --prompts FILE")
        entries = build_entries(
            models,
            negatives or {},
            dtype=resolve_dtype(dtype, device),
            device=device,
            base_model=base_model,
        )
        images = out / "samples"
        run_sampling(
            entries,
            prompts,
            list(sample_seeds),
            images,
            guidance_scale=guidance_scale,
            steps=steps,
            batch_size=max(1, sample_batch_size),
            progress=progress,
        )
        del entries
    records = image_records(images)
    score_records(records, scorers, batch_size=reward_batch_size, progress=progress)
    summary = summarize_rewards(records, metrics)
    report = {
        "settings": {"images": str(images), "metrics": metrics, "reward_options": opts},
        "models": summary,
        "images": records,
    }
    atomic_write_text(out / "rewards.json", json.dumps(report, indent=2))
    head = (
        f"Reward scores of `{images}`: per model, mean over prompts per seed, then mean ± std "
        "over seeds.\n\n"
    )
    atomic_write_text(out / "rewards.md", head + rewards_table(summary, metrics))
    return report
