"""The README's training pictures from the small world: a Diffusion-DPO and a Diff-SNPO run of
150 steps with validation images every 50 steps, then ``snpo plot`` of both runs and one sheet
of their validation grids (prompts as rows; base, dpo and snpo × CFG as columns).

    python docs/results/training-pictures/make_pictures.py [--work runs/pictures]

About 6 minutes on 2 CPU cores. Writes validation.png and curves.png beside this file.
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
from PIL import Image

HERE = Path(__file__).resolve().parent
REPO = HERE.parents[2]
PROMPTS = [
    "a blue cross at the top",
    "a red ring in the center",
    "a green square on the left",
    "a yellow triangle at the bottom",
]
SCALES = [1.0, 3.0, 7.5]
RUNS = {"dpo": 1.0, "snpo": 0.9}  # objective → λ
STEPS = 150


def train(work: Path) -> None:
    from snpo.world.alignment import write_config

    env = dict(os.environ, OMP_NUM_THREADS="1")
    for objective, lam in RUNS.items():
        out = work / objective
        if (out / "export").exists():
            continue
        cfg = write_config(
            work / f"{objective}.yaml",
            model="snpo/world/assets/base",
            data="snpo/world/assets/pairs_train.parquet",
            out=out,
            steps=STEPS,
            seed=0,
            overrides={
                "objective": objective,
                "lam": lam,
                "log_every": 5,
                "validation_prompts": PROMPTS,
                "validation_every": 50,
                "validation_cfg": SCALES,
                "validation_steps": 20,
            },
        )
        cmd = [sys.executable, "-m", "snpo.train", "--config", str(cfg)]
        subprocess.run(cmd, cwd=REPO, env=env, check=True)


def tiles(grid: Path) -> list[list[Image.Image]]:
    """A validation grid (rows: prompts, columns: scales) → its tiles ``[prompt][scale]``."""
    a = np.asarray(Image.open(grid).convert("RGB"))
    h, w = a.shape[0] // len(PROMPTS), a.shape[1] // len(SCALES)
    return [
        [Image.fromarray(a[r * h : (r + 1) * h, c * w : (c + 1) * w]) for c in range(len(SCALES))]
        for r in range(len(PROMPTS))
    ]


def pictures(work: Path) -> None:
    from snpo.tools.grid import grid_sheets
    from snpo.trainer.validation import grid_path

    base = tiles(grid_path(work / "dpo", 0))  # step 0: the policy is the base
    runs = {name: tiles(grid_path(work / name, STEPS)) for name in RUNS}
    columns = [("base", base)] + [(f"{n} step {STEPS}", t) for n, t in runs.items()]
    headers = [f"{name} CFG {s:g}" for name, _ in columns for s in SCALES]
    cells = [[t[r][c] for _, t in columns for c in range(len(SCALES))] for r in range(len(PROMPTS))]
    (sheet,) = grid_sheets(cells, row_captions=PROMPTS, col_headers=headers, tile_size=64)
    sheet.save(HERE / "validation.png", optimize=True)
    cmd = [sys.executable, "-m", "snpo", "plot", *(str(work / n) for n in RUNS)]
    subprocess.run(
        [*cmd, "--smooth", "0.9", "--out", str(HERE / "curves.png")], cwd=REPO, check=True
    )


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--work", type=Path, default=REPO / "runs" / "pictures")
    args = ap.parse_args()
    train(args.work.resolve())
    pictures(args.work.resolve())


if __name__ == "__main__":
    main()
