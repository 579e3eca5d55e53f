"""The small world in flow matching: its base folder, its pretraining and its pairs.

The flow base is the world's base folder (:mod:`.base_model`: the same 0.8 M-param pixel-space
UNet, tokenizer and frozen CLIP text encoder) with a ``FlowMatchEulerDiscreteScheduler``
(1000 training timesteps, shift 1) in ``scheduler/``, so that it loads as the ``flow_unet``
family (:mod:`snpo.models.flow_unet`). Its UNet is pretrained with the trainer's ``sft``
objective, which for a flow family is the velocity MSE ‖v_θ(x_t, 1000σ) − (ε − x0)‖² with CFG
dropout (``snpo/configs/world_sft_flow.yaml``).

Initialisation (``init``): "eps" starts the UNet from the shipped ε base's weights (a warm
start: the features of shapes, colours and positions are there, the output must learn the
velocity), "scratch" from the untrained seeded UNet as the ε base did. The shipped flow assets
use "eps" (the CPU budget of the session that built them; see docs/world.md).

    snpo/world/assets_flow/
        base/                    the pretrained flow base
        pairs_train.parquet      pairs sampled from it (Euler, same prompts/seeds as the ε world)
        pairs_heldout.parquet

``python -m snpo.world.flow assets [--dest DIR] [--steps N] [--init eps|scratch]`` rebuilds them.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import time
from pathlib import Path

FLOW_ASSETS = Path(os.environ.get("SNPO_WORLD_FLOW_ASSETS", Path(__file__).parent / "assets_flow"))
EPS_BASE = Path(__file__).parent / "assets" / "base"
SFT_FLOW_CONFIG = Path(__file__).parent.parent / "configs" / "world_sft_flow.yaml"
SAMPLER = "flow_euler"
SCHEDULER_CLASS = "FlowMatchEulerDiscreteScheduler"


def flow_scheduler(shift: float = 1.0):
    """The training/sampling scheduler of the flow base: 1000 timesteps, static ``shift``."""
    from diffusers import FlowMatchEulerDiscreteScheduler

    return FlowMatchEulerDiscreteScheduler(num_train_timesteps=1000, shift=shift)


def to_flow_folder(path: str | Path, shift: float = 1.0) -> Path:
    """Turn a world base folder at ``path`` into a flow one: replace ``scheduler/``, name the
    scheduler class in model_index.json, record ``"objective": "flow"`` in world.json."""
    path = Path(path)
    shutil.rmtree(path / "scheduler", ignore_errors=True)
    flow_scheduler(shift).save_pretrained(path / "scheduler")
    index = json.loads((path / "model_index.json").read_text())
    index["scheduler"] = ["diffusers", SCHEDULER_CLASS]
    (path / "model_index.json").write_text(json.dumps(index, indent=2) + "\n")
    info = json.loads((path / "world.json").read_text())
    info["objective"] = "flow"
    (path / "world.json").write_text(json.dumps(info, indent=2) + "\n")
    return path


def build_flow_base_folder(path: str | Path, init: str = "eps", seed: int = 0) -> Path:
    """The untrained flow base at ``path`` (an empty folder): ``init`` "eps" copies the shipped
    ε base (UNet weights included), "scratch" builds the seeded untrained folder."""
    from .base_model import build_base_model_folder

    path = Path(path)
    if (path / "unet").exists():
        raise FileExistsError(f"{path} already holds a model (unet/); choose an empty folder")
    if init == "eps":
        shutil.copytree(EPS_BASE, path, dirs_exist_ok=True)
    elif init == "scratch":
        build_base_model_folder(path, seed=seed)
    else:
        raise ValueError(f"init must be 'eps' or 'scratch', not {init!r}")
    to_flow_folder(path)
    info = json.loads((path / "world.json").read_text())
    (path / "world.json").write_text(json.dumps(info | {"init": init}, indent=2) + "\n")
    return path


def build_flow_assets(
    dest: str | Path = FLOW_ASSETS,
    work: str | Path = "runs/world-flow",
    *,
    init: str = "eps",
    steps: int | None = None,
) -> Path:
    """Pretrain the flow base with ``snpo.train`` (sft), then sample and write its pairs (as
    :func:`snpo.world.assets.build_assets` does for the ε world, Euler sampling)."""
    from .alignment import run_trainer
    from .pairs import generate_pairs, split_prompts_and_seed, write_pairs
    from .pickapic import write_sft_parquet

    dest, work = Path(dest), Path(work)
    work.mkdir(parents=True, exist_ok=True)
    t0 = time.perf_counter()
    if not (work / "base" / "unet").exists():
        build_flow_base_folder(work / "base", init=init)
    if not (work / "sft.parquet").exists():
        write_sft_parquet(work / "sft.parquet", n=4096)
    overrides = ["--model", str(work / "base"), "--train_data", str(work / "sft.parquet")]
    overrides += ["--output_dir", str(work / "sft")]
    if steps is not None:
        overrides += ["--max_steps", str(steps)]
    if not (work / "sft" / "export" / "unet").exists():
        print(f"[flow] pretraining: {SFT_FLOW_CONFIG} {' '.join(overrides)}", flush=True)
        threads = int(os.environ.get("OMP_NUM_THREADS", "1"))
        run_trainer(SFT_FLOW_CONFIG, threads=threads, overrides=overrides)
    staged = dest.with_name(dest.name + ".partial")
    shutil.rmtree(staged, ignore_errors=True)
    shutil.copytree(work / "base", staged / "base")
    shutil.rmtree(staged / "base" / "unet")
    shutil.copytree(work / "sft" / "export" / "unet", staged / "base" / "unet")
    print(f"[flow] base pretrained at {time.perf_counter() - t0:.0f} s", flush=True)
    for split in ("train", "heldout"):
        prompts, seed = split_prompts_and_seed(split)
        pairs = generate_pairs(
            str(staged / "base"), prompts, seed=seed, scheduler=SAMPLER, progress=False
        )
        write_pairs(pairs, staged / f"pairs_{split}.parquet")
    if dest.exists():
        shutil.rmtree(dest)
    staged.rename(dest)
    print(f"[flow] written to {dest} in {time.perf_counter() - t0:.0f} s", flush=True)
    return dest


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m snpo.world.flow", description=__doc__)
    sub = ap.add_subparsers(dest="cmd", required=True)
    a = sub.add_parser("assets", help="pretrain the flow base and sample its pairs")
    a.add_argument("--dest", default=str(FLOW_ASSETS))
    a.add_argument("--work", default="runs/world-flow")
    a.add_argument("--init", choices=("eps", "scratch"), default="eps")
    a.add_argument("--steps", type=int, default=None, help="override max_steps of the config")
    args = ap.parse_args(argv)
    if args.cmd == "assets":
        build_flow_assets(args.dest, args.work, init=args.init, steps=args.steps)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
