"""``snpo eval``: the command line of :func:`snpo.tools.preference.evaluate_preference`
(``--pairs``: implicit preference accuracy on held-out pairs) and of
:func:`snpo.tools.reward_scores.evaluate_rewards` (``--rewards``: reward scores of images)."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from snpo.models import ModelLoadError
from snpo.tools.preference import EvalError, evaluate_preference, preference_table
from snpo.tools.reward_scores import evaluate_rewards, rewards_table


def build_parser() -> argparse.ArgumentParser:
    from snpo.tools.sample import add_model_args

    ap = argparse.ArgumentParser(
        prog="snpo eval",
        description="Implicit preference accuracy on held-out pairs (--pairs) and reward scores "
        "of generated images (--rewards).",
    )
    add_model_args(ap)
    ap.add_argument("--out", required=True, help="output folder for the JSON and markdown tables")
    g = ap.add_argument_group("preference pairs")
    g.add_argument("--pairs", action="append", help="Pick-a-Pic parquet or own pairs JSONL/CSV")
    g.add_argument("--reference", help="the reference (base) model of the margins")
    g.add_argument("--timesteps", type=int, default=4, help="draws (timesteps) per pair (4)")
    g.add_argument("--max-pairs", type=int, default=None, help="use the first N pairs")
    g.add_argument("--seed", type=int, default=0, help="seed of the draws (0)")
    g.add_argument("--batch-size", type=int, default=4, help="pairs per forward (4)")
    g.add_argument("--resolution", type=int, default=None, help="pixels (default: the denoiser's)")
    g.add_argument(
        "--allow-outside-paths",
        action="store_true",
        help="accept image paths of own pairs that are absolute or leave the pairs file's "
        "folder (the trainer's allow_outside_paths)",
    )
    r = ap.add_argument_group("rewards")
    r.add_argument("--rewards", help="comma list of pickscore, hpsv2, imagereward, aesthetic")
    r.add_argument("--images", help="a `snpo sample` output folder (or MODEL/*.png + .txt)")
    r.add_argument("--prompts", help="prompt file: sample the --model's first, then score")
    r.add_argument("--sample-seeds", default="0,1,2,3", help="seeds when sampling (0-3)")
    r.add_argument(
        "--guidance",
        type=float,
        default=None,
        help="CFG when sampling (7.5; FLUX-class: the embedded guidance, default the trained one)",
    )
    r.add_argument("--steps", type=int, default=50, help="steps when sampling (50)")
    r.add_argument(
        "--pickscore-model", help=f"PickScore CLIP (default {'yuvalkirstain/PickScore_v1'})"
    )
    r.add_argument("--pickscore-processor", help="its processor (default the LAION CLIP-H one)")
    r.add_argument("--hps-checkpoint", help="HPS_v2.1_compressed.pt (needs hpsv2/open_clip)")
    r.add_argument("--imagereward-checkpoint", help="ImageReward.pt (needs image-reward)")
    r.add_argument("--imagereward-med-config", help="ImageReward's med_config.json")
    r.add_argument("--aesthetic-head", help="LAION aesthetic head (.pth or .safetensors)")
    r.add_argument("--aesthetic-clip", help="CLIP ViT-L/14 for it (openai/clip-vit-large-patch14)")
    r.add_argument("--reward-batch-size", type=int, default=16)
    r.add_argument(
        "--trust-pickle",
        action="store_true",
        help="unpickle an --hps-checkpoint / --aesthetic-head .pt in full when it holds more "
        "than tensors (runs code from the file: only for files you trust; off by default, "
        "when such a file is refused; a .safetensors copy needs no trust)",
    )
    ap.add_argument("--no-progress", action="store_true")
    return ap


REWARD_OPTIONS = (
    "pickscore_model",
    "pickscore_processor",
    "hps_checkpoint",
    "imagereward_checkpoint",
    "imagereward_med_config",
    "aesthetic_head",
    "aesthetic_clip",
    "trust_pickle",
)


def run_preference(args) -> dict:
    """:func:`evaluate_preference` with the command line's arguments."""
    from snpo.tools.sample import model_specs

    if not args.reference:
        raise EvalError("--pairs needs --reference (the base model the margins are taken against)")
    models, negatives = model_specs(args)
    return evaluate_preference(
        args.reference,
        models,
        args.pairs,
        args.out,
        negatives=negatives,
        timesteps=args.timesteps,
        max_pairs=args.max_pairs,
        seed=args.seed,
        batch_size=args.batch_size,
        resolution=args.resolution,
        device=args.device,
        dtype=args.dtype,
        base_model=args.base_model,
        allow_outside_paths=args.allow_outside_paths,
        progress=not args.no_progress,
    )


def run_rewards(args) -> dict:
    """:func:`evaluate_rewards` with the command line's arguments."""
    from snpo.tools.sample import model_specs, parse_seeds, read_prompts

    metrics = [m.strip().lower() for m in args.rewards.split(",") if m.strip()]
    models = negatives = prompts = None
    seeds: list[int] = []
    if args.images is None and args.prompts:
        models, negatives = model_specs(args)
        prompts = read_prompts(args.prompts)
        seeds = parse_seeds(args.sample_seeds)
    return evaluate_rewards(
        metrics,
        args.out,
        images=args.images,
        models=models,
        negatives=negatives,
        prompts=prompts,
        sample_seeds=seeds,
        guidance_scale=args.guidance,
        steps=args.steps,
        sample_batch_size=args.batch_size,
        device=args.device,
        dtype=args.dtype,
        base_model=args.base_model,
        reward_options={k: getattr(args, k) for k in REWARD_OPTIONS},
        reward_batch_size=args.reward_batch_size,
        progress=not args.no_progress,
    )


def main(argv: list[str] | None = None) -> int:
    from snpo.data import DataError
    from snpo.models import ExportError
    from snpo.tools.rewards import RewardError
    from snpo.tools.sample import SampleError

    args = build_parser().parse_args(argv)
    if not args.pairs and not args.rewards:
        print(
            "snpo eval: error: give --pairs (preference accuracy) and/or --rewards", file=sys.stderr
        )
        return 2
    out = Path(args.out)
    try:
        if args.pairs:
            rep = run_preference(args)
            print(preference_table(rep["models"], rep["settings"]["null_branch"]), end="")
        if args.rewards:
            rep = run_rewards(args)
            print(rewards_table(rep["models"], rep["settings"]["metrics"]), end="")
    except (EvalError, SampleError, ModelLoadError, ExportError, RewardError, DataError) as err:
        print(f"snpo eval: error: {err}", file=sys.stderr)
        return 2
    print(f"snpo eval: results in {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
