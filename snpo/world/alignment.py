"""The world's alignment runs: the fixed settings of docs/world.md ("Alignment protocol"), their
config files, and the real trainer run in its own process (demo, comparison, assets)."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

ALIGN = {
    "objective": "snpo",
    "beta": 2000,
    "lam": 0.9,
    "uncond_prob": 0.2,
    "weighting": "constant",
    "resolution": 16,
    "random_crop": False,
    "random_flip": False,
    "lora_rank": 0,
    "train_batch_size_per_gpu": 16,
    "gradient_accumulation_steps": 1,
    "learning_rate": 1.0e-4,
    "scale_lr": False,
    "lr_schedule": "constant",
    "lr_warmup_steps": 20,
    "zero_stage": 0,
    "precision": "fp32",
    "dataloader_num_workers": 0,
    "checkpoint_every": 0,
    "log_every": 25,
    "report_to": "tensorboard",
}


def write_config(
    path: Path,
    *,
    model: str,
    data: str,
    out: Path,
    steps: int,
    seed: int,
    overrides: dict | None = None,
) -> Path:
    """Write the YAML config of one alignment run: :data:`ALIGN`, then the run's model, data
    (one file), output folder, steps and seed, then ``overrides``."""
    import yaml

    cfg = {
        **ALIGN,
        "model": model,
        "train_data": [data],
        "output_dir": str(out),
        "max_steps": steps,
        "seed": seed,
        **(overrides or {}),
    }
    path.write_text(yaml.safe_dump(cfg, sort_keys=False))
    return path


LAUNCHER_VARIABLES = ("RANK", "LOCAL_RANK", "WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT")


def run_trainer(
    config: Path,
    log: Path | None = None,
    threads: int | None = None,
    overrides: list[str] | tuple[str, ...] = (),
    module: str = "snpo.train",
) -> None:
    """``python -m snpo.train --config CONFIG [OVERRIDES]`` in its own process (the trainer owns
    its process: DeepSpeed, signal handlers), its output in ``log`` (None: this process's
    stdout); SystemExit, with the log's tail, when it fails. ``threads``: its OMP_NUM_THREADS
    (default: every core, or SNPO_DEMO_THREADS). ``module``: what ``python -m`` runs (a world
    variant of the trainer such as :mod:`snpo.world.nonull`)."""
    if threads is None:
        threads = int(os.environ.get("SNPO_DEMO_THREADS", str(os.cpu_count() or 1)))
    env = {**os.environ, "OMP_NUM_THREADS": str(threads)}
    for name in LAUNCHER_VARIABLES:  # an independent run: its own rank 0 and its own free port
        env.pop(name, None)
    cmd = [sys.executable, "-m", module, "--config", str(config), *overrides]
    if log is None:
        proc = subprocess.run(cmd, env=env)
        if proc.returncode != 0:
            raise SystemExit(f"training failed (exit {proc.returncode}): {' '.join(cmd)}")
        return
    with open(log, "w") as fh:
        proc = subprocess.run(cmd, stdout=fh, stderr=subprocess.STDOUT, env=env)
    if proc.returncode != 0:
        tail = log.read_text()[-2000:]
        raise SystemExit(
            f"training failed (exit {proc.returncode}); log {log}, last output:\n{tail}"
        )
