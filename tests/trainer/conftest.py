"""Trainer test fixtures: tiny offline models, a synthetic Pick-a-Pic v2 parquet file (all 19
columns, PNG/JPEG/grayscale/CMYK images, a tie row, loser-first rows, a truncated JPEG), config
writing and subprocess helpers."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from snpo.data import image_bytes, write_pickapic_parquet
from snpo.models import save_tiny_model

REPO = Path(__file__).resolve().parents[2]

_WARM_SHM = (
    "from deepspeed.accelerator import get_accelerator; "
    "get_accelerator().create_op_builder('ShareMemCommBuilder').load(verbose=False)"
)


def _start_shm_op_build() -> None:
    """DeepSpeed JIT-compiles its shared-memory comm op on the first CPU start (1-2 min). When it
    is not cached yet, build it in the background at collection time so that the compile overlaps
    the fast tests instead of stalling the first DeepSpeed test (torch's build lock makes any
    concurrent loader wait for this build instead of starting its own)."""
    import torch

    if torch.cuda.is_available() or os.environ.get("SNPO_NO_WARM_BUILD"):
        return
    from torch.utils.cpp_extension import _get_build_directory

    d = Path(_get_build_directory("deepspeed_shm_comm", verbose=False))
    if (d / "deepspeed_shm_comm.so").exists():
        return
    env = child_env()
    subprocess.Popen(
        [sys.executable, "-c", _WARM_SHM],
        env=env,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
        start_new_session=True,
    )


def pytest_collection_modifyitems(config, items):
    """Slow (multi-process) tests last: the fast ones run while the op compiles."""
    here = Path(__file__).parent

    def last(it) -> bool:
        return it.get_closest_marker("slow") is not None and here in Path(str(it.fspath)).parents

    items.sort(key=last)


def pytest_configure(config):
    _start_shm_op_build()


WORDS = ["a", "photo", "of", "red", "blue", "green", "cube", "ball", "cat", "dog"]
RED, GREEN, BLUE = (220, 30, 30), (30, 200, 40), (40, 60, 230)

# Row layout of the fixture file (used by the data tests):
#   0: winner first (PNG)            1: loser first (label_0 = 0; JPEG)
#   2: tie (label 0.5, has_label False)
#   3: truncated JPEG as loser       4: grayscale winner, CMYK JPEG loser, non-square
#   5..: more good pairs (alternating winner/loser first)
N_GOOD_EXTRA = 11


def _truncated_jpeg() -> bytes:
    full = image_bytes(BLUE, (32, 32), "JPEG")
    return full[: len(full) // 2]


def pickapic_rows() -> list[dict]:
    rows = [
        {
            "caption": "a photo of a red cube",
            "jpg_0": image_bytes(RED, (24, 20)),
            "jpg_1": image_bytes(BLUE, (24, 20)),
            "label_0": 1.0,
        },
        {
            "caption": "a photo of a green ball",
            "jpg_0": image_bytes(RED, (20, 20), "JPEG"),
            "jpg_1": image_bytes(GREEN, (20, 20), "JPEG"),
            "label_0": 0.0,
        },
        {
            "caption": "a photo of a blue cat",
            "jpg_0": image_bytes(BLUE, (20, 20)),
            "jpg_1": image_bytes(RED, (20, 20)),
            "label_0": 0.5,
        },
        {
            "caption": "a photo of a blue dog",
            "jpg_0": image_bytes(BLUE, (20, 20)),
            "jpg_1": _truncated_jpeg(),
            "label_0": 1.0,
        },
        {
            "caption": "a photo of a green cube",
            "jpg_0": image_bytes(GREEN, (30, 18), "PNG", mode="L"),
            "jpg_1": image_bytes(RED, (18, 30), "JPEG", mode="CMYK"),
            "label_0": 1.0,
        },
    ]
    cols = [RED, GREEN, BLUE]
    names = ["red", "green", "blue"]
    for i in range(N_GOOD_EXTRA):
        c, o = i % 3, (i + 1) % 3
        win, lose = image_bytes(cols[c], (20 + i % 5, 20)), image_bytes(cols[o], (20 + i % 5, 20))
        first = i % 2 == 0
        rows.append(
            {
                "caption": f"a photo of a {names[c]} {['cube', 'ball', 'cat', 'dog'][i % 4]}",
                "jpg_0": win if first else lose,
                "jpg_1": lose if first else win,
                "label_0": 1.0 if first else 0.0,
            }
        )
    return rows


@pytest.fixture(scope="session")
def tiny_sd(tmp_path_factory) -> Path:
    return save_tiny_model(tmp_path_factory.mktemp("sd") / "m", family="sd", words=WORDS)


@pytest.fixture(scope="session")
def tiny_sdxl(tmp_path_factory) -> Path:
    return save_tiny_model(tmp_path_factory.mktemp("sdxl") / "m", family="sdxl", words=WORDS)


@pytest.fixture(scope="session")
def tiny_pixel(tmp_path_factory) -> Path:
    return save_tiny_model(
        tmp_path_factory.mktemp("px") / "m", family="sd", words=WORDS, with_vae=False, resolution=8
    )


@pytest.fixture(scope="session")
def pickapic(tmp_path_factory) -> Path:
    """The fixture parquet (see the row layout above)."""
    return write_pickapic_parquet(
        tmp_path_factory.mktemp("pap") / "train-0.parquet", pickapic_rows()
    )


@pytest.fixture(scope="session")
def pickapic_clean(tmp_path_factory) -> Path:
    """Only good pairs (no tie, no corrupt image): 16 pairs for training runs."""
    rows = [r for i, r in enumerate(pickapic_rows()) if i not in (2, 3)]
    rows = (rows * 2)[:16]
    return write_pickapic_parquet(tmp_path_factory.mktemp("papc") / "clean.parquet", rows)


def write_config(path: Path, **values) -> Path:
    base = {
        "resolution": 16,
        "train_batch_size_per_gpu": 2,
        "gradient_accumulation_steps": 1,
        "learning_rate": 1e-4,
        "max_steps": 3,
        "dataloader_num_workers": 0,
        "checkpoint_every": 0,
        "report_to": "none",
        "progress_bar": False,
        "beta": 500.0,
        "uncond_prob": 0.3,
    }
    base.update(values)
    base = {k: (str(v) if isinstance(v, Path) else v) for k, v in base.items()}
    if "train_data" in base and isinstance(base["train_data"], str):
        base["train_data"] = [base["train_data"]]
    path.write_text(yaml.safe_dump(base))
    return path


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture
def one_thread():
    """torch on one intra-op thread for the test, as :func:`child_env` runs its children: a
    test comparing an in-process run with a subprocess's must use the same thread count (a CPU
    matmul may split its reduction over threads, which changes the last bits)."""
    import torch

    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def child_env() -> dict:
    """The environment of a trainer child process: one intra-op thread (see :func:`one_thread`),
    DeepSpeed on the CPU, no launcher variables."""
    env = dict(os.environ)
    env.update(OMP_NUM_THREADS="1", DS_ACCELERATOR="cpu", PYTHONUNBUFFERED="1")
    env.pop("TRITON_INTERPRET", None)
    for k in ("RANK", "LOCAL_RANK", "WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT"):
        env.pop(k, None)
    return env


def run_train(
    config: Path, *extra: str, timeout: float = 240, **popen
) -> subprocess.CompletedProcess:
    """``python -m snpo.train --config config extra...`` in a fresh process."""
    cmd = [sys.executable, "-m", "snpo.train", "--config", str(config), *extra]
    return subprocess.run(
        cmd, cwd=REPO, env=child_env(), capture_output=True, text=True, timeout=timeout, **popen
    )


def deepspeed_exe() -> str:
    """The ``deepspeed`` launcher (the venv's first)."""
    import shutil

    exe = shutil.which("deepspeed", path=str(REPO / ".venv" / "bin")) or shutil.which("deepspeed")
    assert exe, "the deepspeed launcher is not installed"
    return exe


def start_deepspeed(config: Path, *extra: str, port: int | None = None) -> subprocess.Popen:
    """``deepspeed --num_gpus 2 snpo/train.py --config config extra...`` started in its own
    process group (as a batch job's: ``os.killpg`` reaches the launcher and both ranks), stdout
    and stderr merged into ``.stdout``."""
    cmd = [deepspeed_exe(), "--master_port", str(port or free_port()), "--num_gpus", "2"]
    return subprocess.Popen(
        [*cmd, "snpo/train.py", "--config", str(config), *extra],
        cwd=REPO,
        env=child_env(),
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        start_new_session=True,
    )


def kill_when(proc: subprocess.Popen, marker: str, timeout: float = 300) -> str:
    """Read ``proc``'s output until a line holds ``marker``, then SIGKILL its process group;
    → the output read (asserts that the marker came)."""
    import signal
    import time

    lines, deadline = [], time.time() + timeout
    try:
        for line in proc.stdout:
            lines.append(line)
            if marker in line or time.time() > deadline:
                break
    finally:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait(timeout=60)
    log = "".join(lines)
    assert marker in log, log[-4000:]
    return log


def launch_deepspeed(
    config: Path, *extra: str, timeout: float = 240
) -> subprocess.CompletedProcess:
    """``deepspeed --num_gpus 2 snpo/train.py --config config extra...`` (two CPU processes on a
    free port); asserts that it succeeded."""
    cmd = [deepspeed_exe(), "--master_port", str(free_port()), "--num_gpus", "2", "snpo/train.py"]
    cmd += ["--config", str(config), *extra]
    r = subprocess.run(
        cmd, cwd=REPO, env=child_env(), capture_output=True, text=True, timeout=timeout
    )
    assert r.returncode == 0, (r.stdout + r.stderr)[-4000:]
    return r


def train_here(config: Path, *extra: str) -> int:
    """``snpo.train.main`` in this process (a fresh Trainer; torch.distributed, world 1, is set
    up once and reused): much cheaper than a subprocess on a 2-core machine."""
    from snpo.train import main

    return main(["--config", str(config), *extra])


def read_metrics(output_dir: Path) -> list[dict]:
    import json

    return [json.loads(x) for x in (output_dir / "metrics.jsonl").read_text().splitlines() if x]
