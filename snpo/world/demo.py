"""The embedded default demo: align the small world's base model with Diff-SNPO, end to end.

1. the base: a pixel-space text-to-image model pretrained by our own trainer (objective sft) on
   the small world (docs/world.md), shipped in ``snpo/world/assets/base`` with its preference
   pairs (sampled from the base itself, ranked by the world's known reward);
2. the alignment: ``snpo.train`` (DeepSpeed, the same trainer as for SD1.5/SDXL) with Diff-SNPO
   (β 2000, λ 0.9, null-prompt branch with probability 0.2, reversed preference there);
3. the measurement, before and after: the known reward of CFG samples for training and held-out
   prompts, implicit preference accuracy of each branch on held-out pairs (``snpo eval``) and the
   winner log-likelihood proxy; a PNG grid of samples before/after.

Nothing is downloaded. ``--quick`` runs a handful of steps on a few prompts (CI).
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
import time
from pathlib import Path

from .alignment import run_trainer, write_config

# SNPO_WORLD_ASSETS points elsewhere (tests, or assets rebuilt into another folder)
ASSETS = Path(os.environ.get("SNPO_WORLD_ASSETS", Path(__file__).parent / "assets"))


def _log(msg: str) -> None:
    print(f"[demo] {msg}", flush=True)


def assets_ready(assets: Path = ASSETS) -> str | None:
    """None when the shipped base model and pairs are present, else what is missing."""
    for rel in ("base/unet", "base/text_encoder", "base/tokenizer", "base/scheduler"):
        if not (assets / rel).is_dir():
            return f"{assets / rel} is missing"
    for rel in ("pairs_train.parquet", "pairs_heldout.parquet"):
        if not (assets / rel).is_file():
            return f"{assets / rel} is missing"
    return None


def world_rewards(
    model, prompts, seeds: int, scales: tuple[float, ...], steps: int, negative_unet=None
) -> dict:
    from snpo.world.evaluate import evaluate_model

    return evaluate_model(
        model,
        prompts=prompts,
        guidance_scales=scales,
        n_seeds=seeds,
        steps=steps,
        negative_unet=negative_unet,
        progress=False,
        return_images=True,
    )


def eval_prompts(n_train: int, n_heldout: int):
    """The first n of the world's fixed prompt order from the training and held-out prompts."""
    from snpo.world.vocab import ordered_prompts

    return ordered_prompts("train")[:n_train] + ordered_prompts("heldout")[:n_heldout]


def preference_eval(
    base: str,
    models: dict[str, str],
    pairs: str,
    out: Path,
    max_pairs: int | None,
    timesteps: int,
) -> dict[str, dict]:
    """Implicit accuracy of ``models`` against ``base`` on ``pairs``
    (:func:`snpo.tools.evaluate.evaluate_preference`; also writes ``out/preference.{json,md}``):
    name → its preference metrics."""
    from snpo.tools.evaluate import evaluate_preference

    report = evaluate_preference(
        base,
        models,
        [pairs],
        out,
        timesteps=timesteps,
        max_pairs=max_pairs or None,
        batch_size=16,
        progress=False,
    )
    return report["models"]


def summary_table(rewards: dict[str, dict], pref: dict[str, dict], scales) -> str:
    """Markdown: one row per model; reward per CFG scale (train / held-out prompts), implicit
    accuracy of each branch and the winner log-likelihood proxy on held-out pairs."""
    head = ["model"] + [f"reward CFG {g:g} (train / held-out)" for g in scales]
    head += ["acc. cond. branch", "acc. null branch (reversed)", "winner log-lik. proxy"]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for name, r in rewards.items():
        cells = [name]
        for g in scales:
            s = r["scales"][f"{g:g}"]
            cells.append(f"{s['train']['reward']:.3f} / {s['heldout']['reward']:.3f}")
        p = pref.get(name)
        if p is None:
            cells += ["0.50 (reference)", "0.50 (reference)", "0 (reference)"]
        else:
            cells += [_fmt_acc(p, "accuracy_pos"), _fmt_acc(p, "accuracy_neg"), _fmt_logp(p)]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def _fmt_acc(p: dict, key: str) -> str:
    v, (lo, hi) = p[key]["value"], p[key]["ci"]
    return f"{v:.2f} [{lo:.2f}, {hi:.2f}]"


def _fmt_logp(p: dict) -> str:
    return f"{p['winner_logp_proxy']['value']:+.2e}"


def write_grid(images: dict[str, dict], prompts, n_seeds: int, scale: float, path: Path) -> Path:
    """Samples before/after at CFG ``scale``: a row per prompt and seed (the prompt beside it),
    a column per model (:mod:`snpo.tools.grid`). More rows than a sheet holds go on
    ``grid_001.png``, … next to ``path``."""
    from snpo.tools.grid import grid_sheets

    key = f"{scale:g}"
    names = list(images)
    rows, labels = [], []
    for i, p in enumerate(prompts):
        for k in range(n_seeds):
            rows.append([images[n][key][i * n_seeds + k] for n in names])
            labels.append(f"{p.text}{' (held out)' if p.heldout else ''}")
    sheets = grid_sheets(
        rows,
        row_captions=labels,
        col_headers=[f"{n} · CFG {key}" for n in names],
        tile_size=64,
    )
    sheets[0].save(path)
    for i, sheet in enumerate(sheets[1:], 1):
        sheet.save(path.with_name(f"{path.stem}_{i:03d}{path.suffix}"))
    return path


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", default="runs/demo", help="output folder (runs/demo)")
    ap.add_argument("--steps", type=int, default=150, help="alignment steps (150)")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument(
        "--quick",
        action="store_true",
        help="a handful of steps on few prompts (CI smoke run, not a result)",
    )
    args = ap.parse_args(argv)
    t0 = time.perf_counter()
    missing = assets_ready()
    if missing:
        from snpo.world.assets import build_assets

        _log(
            f"the small world's shipped base is missing ({missing}): building it now with our "
            "trainer (sft) — about 25 minutes on 2 CPU cores, once"
        )
        build_assets(ASSETS, Path(args.out).parent / "world-assets-build")
    import torch
    from diffusers.utils import logging as dlog
    from transformers.utils import logging as tlog

    dlog.disable_progress_bar()
    tlog.disable_progress_bar()
    torch.set_num_threads(int(os.environ.get("SNPO_DEMO_THREADS", str(os.cpu_count() or 1))))
    steps = 4 if args.quick else args.steps
    n_train, n_held, n_seeds = (2, 2, 1) if args.quick else (12, 12, 2)
    scales = (3.0, 7.5)
    sample_steps = 5 if args.quick else 20
    max_pairs, timesteps = (16, 1) if args.quick else (256, 2)

    out = Path(args.out)
    if out.exists():
        shutil.rmtree(out)
    out.mkdir(parents=True)
    base = str(ASSETS / "base")
    _log(
        f"aligning the small world's base with Diff-SNPO for {steps} steps (snpo.train, "
        "DeepSpeed) ..."
    )
    cfg = write_config(
        out / "snpo.yaml",
        model=base,
        data=str(ASSETS / "pairs_train.parquet"),
        out=out / "train",
        steps=steps,
        seed=args.seed,
    )
    run_trainer(cfg, out / "train.log")
    export = out / "train" / "export"
    _log(f"trained in {time.perf_counter() - t0:.0f} s; export: {export}")

    from snpo.models import load_export, load_model

    prompts = eval_prompts(n_train, n_held)
    _log(f"sampling {len(prompts)} prompts x {n_seeds} seeds at CFG {scales} before and after ...")
    before = load_model(base)
    after, _ = load_export(export)
    rewards = {
        "base": world_rewards(before, prompts, n_seeds, scales, sample_steps),
        "Diff-SNPO": world_rewards(after, prompts, n_seeds, scales, sample_steps),
    }
    images = {name: r.pop("images") for name, r in rewards.items()}
    _log("implicit accuracy on held-out pairs (snpo eval) ...")
    pref = preference_eval(
        base,
        {"Diff-SNPO": str(export)},
        str(ASSETS / "pairs_heldout.parquet"),
        out / "eval",
        max_pairs,
        timesteps,
    )
    table = summary_table(rewards, pref, scales)
    write_grid(images, prompts, n_seeds, 7.5, out / "grid.png")
    note = (
        f"Small world, {steps} Diff-SNPO steps, seed {args.seed}; reward in [0, 1] of "
        f"{n_seeds} samples per prompt ({sample_steps} DDIM steps), "
        f"{n_train} training and {n_held} held-out prompts.\n\n"
    )
    (out / "summary.md").write_text(note + table + "\n")
    (out / "summary.json").write_text(
        json.dumps({"rewards": rewards, "preference": pref}, indent=2)
    )
    print()
    print(note + table)
    print()
    _log(f"done in {time.perf_counter() - t0:.0f} s. Outputs in {out.resolve()}:")
    _log("  summary.md / summary.json  the table above; eval/preference.md  accuracy details")
    _log("  grid.png                   samples before/after (CFG 7.5)")
    _log("  train/export               the aligned model (diffusers UNet + snpo_export.json)")
    _log("  train/metrics.jsonl, train.log   training curves and log")
    return 0


if __name__ == "__main__":
    sys.exit(main())
