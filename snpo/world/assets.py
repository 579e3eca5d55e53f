"""The demo's shipped assets (``snpo/world/assets/``) and the command that rebuilds them.

    base/                    the pretrained base: untrained folder (build_base_model_folder, seed
                             0) whose UNet is replaced by our trainer's sft export
                             (snpo/configs/world_sft.yaml)
    pairs_train.parquet      preference pairs sampled from that base on the 64 training prompts
    pairs_heldout.parquet    held-out pairs (all 80 prompts, other noise seeds)

``python -m snpo.world assets [--dest DIR]`` rebuilds all three exactly as shipped (about 20–30
minutes on 2 CPU cores, mostly the pretraining).
"""

from __future__ import annotations

import os
import shutil
import time
from pathlib import Path

from .alignment import run_trainer

DEFAULT_DEST = Path(__file__).parent / "assets"
SFT_CONFIG = Path(__file__).parent.parent / "configs" / "world_sft.yaml"


def build_assets(dest: str | Path = DEFAULT_DEST, work: str | Path = "runs/world") -> Path:
    """Pretrain the base with ``snpo.train`` (objective sft), then sample and write the pairs."""
    from .base_model import build_base_model_folder
    from .pairs import generate_pairs, split_prompts_and_seed, write_pairs
    from .pickapic import write_sft_parquet

    dest, work = Path(dest), Path(work)
    work.mkdir(parents=True, exist_ok=True)
    t0 = time.perf_counter()
    build_base_model_folder(work / "base", seed=0)
    write_sft_parquet(work / "sft.parquet", n=4096)
    overrides = ["--model", str(work / "base"), "--train_data", str(work / "sft.parquet")]
    overrides += ["--output_dir", str(work / "sft")]
    print(f"[assets] pretraining the base: {SFT_CONFIG} {' '.join(overrides)}", flush=True)
    threads = int(os.environ.get("OMP_NUM_THREADS", "1"))
    run_trainer(SFT_CONFIG, threads=threads, overrides=overrides)
    staged = dest.with_name(dest.name + ".partial")
    shutil.rmtree(staged, ignore_errors=True)
    shutil.copytree(work / "base", staged / "base")
    shutil.rmtree(staged / "base" / "unet")
    shutil.copytree(work / "sft" / "export" / "unet", staged / "base" / "unet")
    for split in ("train", "heldout"):
        prompts, seed = split_prompts_and_seed(split)
        write_pairs(
            generate_pairs(str(staged / "base"), prompts, seed=seed),
            staged / f"pairs_{split}.parquet",
        )
    if dest.exists():
        shutil.rmtree(dest)
    staged.rename(dest)
    print(f"[assets] written to {dest} in {time.perf_counter() - t0:.0f} s", flush=True)
    return dest
