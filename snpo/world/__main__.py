"""``python -m snpo.world``: build the base model, write SFT data and preference pairs, run the
fixed evaluation, score images with the known reward, draw the reward-validation figure.
See docs/world.md."""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

from .vocab import SEEDS


def _threads(n: int) -> None:
    import torch

    if n > 0:
        torch.set_num_threads(n)


def cmd_build_base(args: argparse.Namespace) -> int:
    from .base_model import build_base_model_folder

    t = time.perf_counter()
    path = build_base_model_folder(args.path, seed=args.seed)
    print(
        f"base model (untrained, seed {args.seed}) written to {path} "
        f"in {time.perf_counter() - t:.1f} s"
    )
    return 0


def cmd_sft_data(args: argparse.Namespace) -> int:
    from .pickapic import write_sft_parquet

    t = time.perf_counter()
    out = write_sft_parquet(args.out, args.n, seed=args.seed, split=args.split)
    print(
        f"{args.n} SFT rows ({args.split} prompts, seed {args.seed}) written to {out} "
        f"in {time.perf_counter() - t:.1f} s"
    )
    return 0


def cmd_pairs(args: argparse.Namespace) -> int:
    from snpo.models import load_model

    from .pairs import generate_pairs, split_prompts_and_seed, write_pairs

    prompts, seed = split_prompts_and_seed(args.split, args.prompts)
    seed = seed if args.seed is None else args.seed
    model = load_model(args.model, unet_path=args.unet)
    pairs = generate_pairs(
        model,
        prompts,
        candidates=args.candidates,
        guidance_scales=tuple(args.scales),
        steps=args.steps,
        seed=seed,
        tie_threshold=args.tie_threshold,
        tie_keep=args.tie_keep,
        max_pairs_per_prompt=args.max_pairs_per_prompt,
        batch_size=args.batch_size,
        scheduler=args.scheduler,
    )
    out = write_pairs(pairs, args.out)
    s = pairs.stats
    print(
        f"{s['rows']} rows ({s['pairs']} preference pairs, {s['ties_kept']} ties kept, "
        f"{s['ties_dropped']} near-ties dropped) from {s['prompts']} prompts × "
        f"{s['candidates']} candidates → {out} (+ {out.with_suffix('.json').name}) "
        f"in {s['total_seconds']:.1f} s"
    )
    by = ", ".join(f"cfg {g}: {r:.3f}" for g, r in s["mean_reward_by_scale"].items())
    print(f"mean reward {s['mean_reward']:.3f} ({by})")
    return 0


def cmd_evaluate(args: argparse.Namespace) -> int:
    from snpo.models import load_any, load_model

    from .evaluate import evaluate_model
    from .reward import COMPONENTS
    from .vocab import ordered_prompts

    model = load_model(args.model, unet_path=args.unet)
    neg = None
    if args.negative_unet:
        neg = load_any(args.negative_unet, base_model=args.model)[0].unet
    prompts = ordered_prompts("all")[: args.prompts] if args.prompts else None
    t = time.perf_counter()
    res = evaluate_model(
        model,
        prompts=prompts,
        guidance_scales=tuple(args.scales),
        n_seeds=args.seeds,
        steps=args.steps,
        negative_unet=neg,
        batch_size=args.batch_size,
    )
    res["settings"].update(model=args.model, unet=args.unet, negative_unet=args.negative_unet)
    res["seconds"] = round(time.perf_counter() - t, 1)
    print(
        f"{'cfg':>4} {'split':>8} {'n':>5} {'reward':>7} {'good':>6} "
        + " ".join(f"{c:>9}" for c in COMPONENTS)
    )
    for g, by_split in res["scales"].items():
        for split, r in by_split.items():
            print(
                f"{g:>4} {split:>8} {r['n']:5d} {r['reward']:7.3f} {r['good']:6.2f} "
                + " ".join(f"{r[c]:9.3f}" for c in COMPONENTS)
            )
    if args.out:
        Path(args.out).parent.mkdir(parents=True, exist_ok=True)
        Path(args.out).write_text(json.dumps(res, indent=1) + "\n")
        print(f"written to {args.out}")
    return 0


def cmd_reward(args: argparse.Namespace) -> int:
    import torch

    from .pickapic import decode_image
    from .reward import COMPONENTS, reward_components
    from .vocab import parse_prompt

    prompt = parse_prompt(args.prompt)
    images = [decode_image(Path(p).read_bytes()) for p in args.images]
    sizes = {tuple(im.shape) for im in images}
    if len(sizes) != 1:
        raise SystemExit(f"all images must have one size, got {sorted(sizes)}")
    comps = reward_components(torch.stack(images), [prompt] * len(images))
    rows = []
    for i, p in enumerate(args.images):
        row = {"image": p, "reward": round(float(comps["reward"][i]), 4)}
        row.update({c: round(float(comps[c][i]), 4) for c in COMPONENTS})
        rows.append(row)
    if args.json:
        print(json.dumps({"prompt": prompt.text, "scores": rows}, indent=1))
    else:
        print(f"prompt: {prompt.text}")
        print(f"{'reward':>7} " + " ".join(f"{c:>9}" for c in COMPONENTS) + "  image")
        for r in rows:
            print(
                f"{r['reward']:7.3f} "
                + " ".join(f"{r[c]:9.3f}" for c in COMPONENTS)
                + f"  {r['image']}"
            )
    return 0


def cmd_figure(args: argparse.Namespace) -> int:
    from .render import degraded_versions
    from .viz import save_scored_figure
    from .vocab import ordered_prompts

    prompts = ordered_prompts("all")[: args.prompts]
    seeds = list(range(len(prompts)))
    out = save_scored_figure(degraded_versions(prompts, seeds), prompts, args.out)
    print(f"reward-validation figure written to {out}")
    return 0


def build_parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(
        prog="python -m snpo.world",
        description="The small synthetic preference world (docs/world.md).",
    )
    ap.add_argument(
        "--threads",
        type=int,
        default=1,
        help="torch intra-op threads (default 1; 0 = torch's default)",
    )
    sub = ap.add_subparsers(dest="command", required=True)

    p = sub.add_parser("build-base", help="write the untrained base model folder")
    p.add_argument("path")
    p.add_argument("--seed", type=int, default=int(SEEDS["base_model"]))
    p.set_defaults(func=cmd_build_base)

    p = sub.add_parser("sft-data", help="write ground-truth renders as Pick-a-Pic parquet")
    p.add_argument("out")
    p.add_argument("--n", type=int, default=4096, help="rows (default 4096)")
    p.add_argument("--seed", type=int, default=int(SEEDS["sft_data"]))
    p.add_argument(
        "--split",
        choices=["all", "train", "heldout"],
        default="all",
        help="which prompts (default all 80: the base model knows every prompt)",
    )
    p.set_defaults(func=cmd_sft_data)

    p = sub.add_parser("pairs", help="sample candidates from a model, rank them, write pairs")
    p.add_argument("--model", required=True, help="model folder (diffusers layout)")
    p.add_argument("--unet", default=None, help="alternative unet folder (a trained export)")
    p.add_argument("--out", required=True, help="output .parquet (a .json sidecar is written)")
    p.add_argument(
        "--split",
        choices=["train", "heldout"],
        default="train",
        help="train: the 64 training prompts, seed 2; heldout: all 80 prompts, "
        "seed 3 (default train)",
    )
    p.add_argument("--prompts", type=int, default=None, help="first N prompts of the split")
    p.add_argument("--candidates", type=int, default=5, help="K samples per prompt")
    p.add_argument(
        "--scales",
        type=float,
        nargs="+",
        default=[1.0, 2.0, 3.0, 5.0, 7.0],
        help="guidance scales; candidate j uses scales[j mod len]",
    )
    p.add_argument("--steps", type=int, default=20, help="sampling steps (default 20)")
    p.add_argument("--scheduler", default="ddim", choices=["ddim", "ddpm", "euler"])
    p.add_argument("--seed", type=int, default=None, help="override the split's seed")
    p.add_argument("--tie-threshold", type=float, default=0.03)
    p.add_argument("--tie-keep", type=float, default=0.2)
    p.add_argument("--max-pairs-per-prompt", type=int, default=None)
    p.add_argument("--batch-size", type=int, default=64)
    p.set_defaults(func=cmd_pairs)

    p = sub.add_parser("evaluate", help="the fixed evaluation protocol (docs/world.md)")
    p.add_argument("--model", required=True, help="model folder (diffusers layout)")
    p.add_argument("--unet", default=None, help="alternative unet folder (a trained export)")
    p.add_argument(
        "--negative-unet",
        default=None,
        help="UNet folder or export used as the null branch (Diffusion-NPO)",
    )
    p.add_argument("--out", default=None, help="write the results as JSON")
    p.add_argument(
        "--prompts",
        type=int,
        default=None,
        help="first N of ordered_prompts('all') (default: all 80)",
    )
    p.add_argument("--seeds", type=int, default=4, help="eval noise seeds per prompt")
    p.add_argument("--scales", type=float, nargs="+", default=[1.0, 3.0, 7.5])
    p.add_argument("--steps", type=int, default=20)
    p.add_argument("--batch-size", type=int, default=128)
    p.set_defaults(func=cmd_evaluate)

    p = sub.add_parser("reward", help="score PNG images against a prompt")
    p.add_argument("images", nargs="+")
    p.add_argument("--prompt", required=True, help='e.g. "a red square on the left"')
    p.add_argument("--json", action="store_true")
    p.set_defaults(func=cmd_reward)

    p = sub.add_parser("figure", help="draw ground truth vs degradations with their rewards")
    p.add_argument("out")
    p.add_argument("--prompts", type=int, default=10)
    p.set_defaults(func=cmd_figure)

    p = sub.add_parser("compare", help="every objective on the same data and budget (~30 min)")
    p.add_argument("--out", default="runs/compare")
    p.add_argument(
        "--budget",
        default="default",
        choices=["default", "evidence", "protocol", "quick"],
        help="default: fits 30 min on 2 CPU cores; evidence: the default training with rewards "
        "along the whole CFG curve (1, 2, 3, 5, 7.5, 10), for 8+ seeds; protocol: docs/world.md's "
        "full protocol; quick: a smoke run of every job. Seeds and runs are additive: a rerun "
        "into the same --out reuses finished jobs",
    )
    p.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    p.add_argument("--steps", type=int, default=None, help="override the budget's steps")
    p.add_argument(
        "--runs",
        nargs="+",
        default=None,
        help="a subset of the runs (default: the seven of the comparison; the CFG 1 study's "
        "dpo_nonull, dpo_p0.05, snpo_p0.05 only when named)",
    )
    p.add_argument("--jobs", type=int, default=None, help="processes (default: one per core)")
    p.add_argument("--overwrite", action="store_true", help="discard results of other settings")
    p.add_argument("--quick", action="store_true", help="same as --budget quick")
    p.set_defaults(func=cmd_compare)

    p = sub.add_parser(
        "paired", help="paired differences and the CFG curve of a finished comparison's results"
    )
    p.add_argument("out", help="a comparison folder (its results.json)")
    p.set_defaults(func=cmd_paired)

    p = sub.add_parser("compare-flow", help="dpo/bdpo/snpo_naive/snpo on the flow base")
    p.add_argument("--out", default="runs/compare-flow")
    p.add_argument(
        "--budget",
        default="default",
        choices=["default", "evidence", "quick"],
        help="evidence: the default training with rewards along the whole CFG curve (1, 2, 3, "
        "5, 7.5, 10), for 8+ seeds",
    )
    p.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    p.add_argument("--runs", nargs="+", default=None, help="a subset of dpo bdpo snpo_naive snpo")
    p.add_argument("--steps", type=int, default=None, help="override the budget's steps")
    p.add_argument("--beta", type=float, default=None, help="default: compare_flow.FLOW_BETA")
    p.add_argument("--jobs", type=int, default=None, help="processes (default: one per core)")
    p.add_argument("--overwrite", action="store_true", help="discard results of other settings")
    p.set_defaults(func=cmd_compare_flow)

    p = sub.add_parser("assets", help="rebuild the demo's base model and pairs (20-30 min)")
    p.add_argument("--dest", default=None, help="default: snpo/world/assets")
    p.add_argument("--work", default="runs/world", help="scratch folder (runs/world)")
    p.set_defaults(func=cmd_assets)
    return ap


def cmd_paired(args: argparse.Namespace) -> int:
    import json
    from pathlib import Path

    from .compare import write_paired

    out = Path(args.out)
    path = out / "results.json"
    if not path.is_file():
        raise SystemExit(f"{path} does not exist: run `python -m snpo.world compare` first")
    results = json.loads(path.read_text())
    write_paired(out, results, list(results["runs"]))
    print((out / "paired.md").read_text() if (out / "paired.md").is_file() else "one seed only")
    return 0


def cmd_compare(args: argparse.Namespace) -> int:
    import dataclasses

    from .compare import BUDGETS, compare

    budget = BUDGETS["quick" if args.quick else args.budget]
    if args.steps is not None:
        if args.steps < 1:
            raise SystemExit(f"--steps must be at least 1, got {args.steps}")
        budget = dataclasses.replace(budget, steps=args.steps)
    res = compare(
        args.out,
        seeds=args.seeds,
        budget=budget,
        jobs=args.jobs,
        overwrite=args.overwrite,
        runs=args.runs,
    )
    print((Path(args.out) / "results.md").read_text())
    print(f"results in {Path(args.out).resolve()} ({res['invocations'][-1]['seconds']:.0f} s)")
    return 0


def cmd_compare_flow(args: argparse.Namespace) -> int:
    from .compare_flow import FLOW_BETA, budget_for, compare_flow

    if args.steps is not None and args.steps < 1:
        raise SystemExit(f"--steps must be at least 1, got {args.steps}")
    beta = FLOW_BETA if args.beta is None else args.beta
    res = compare_flow(args.out, seeds=args.seeds, budget=budget_for(args.budget, args.steps),
                       beta=beta, jobs=args.jobs, overwrite=args.overwrite,
                       runs=args.runs)  # fmt: skip
    print((Path(args.out) / "results.md").read_text())
    print(f"results in {Path(args.out).resolve()} ({res['invocations'][-1]['seconds']:.0f} s)")
    return 0


def cmd_assets(args: argparse.Namespace) -> int:
    from .assets import DEFAULT_DEST, build_assets

    build_assets(args.dest or DEFAULT_DEST, args.work)
    return 0


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    _threads(args.threads)
    return args.func(args)


if __name__ == "__main__":
    sys.exit(main())
