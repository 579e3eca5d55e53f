"""An SD3-class run resumed on another number of processes (issue 15): a full fine-tune under
ZeRO-2 on 2 CPU ranks, checkpointed at step 2, resumed on 1 process (DeepSpeed's universal
checkpoint) to step 4, then on 2 processes again to step 6. The pairs each rank trained on are
recorded (a wrapper around ``Trainer.micro_step``): the data continues exactly where it stopped,
in the epoch's order, no pair twice; the weights come back (the resumed loss is not the fresh
ln 2), the losses stay finite, and the export loads into the stock SD3 classes.

The pair-recording helpers are shared with ``test_flux_ranks.py``."""

from __future__ import annotations

import json
import math
import shutil
import subprocess
from pathlib import Path

import numpy as np
import pytest
import torch

from .conftest import REPO, child_env, free_port, read_metrics, train_here, write_config

LN2_ABS = 4e-7  # ln 2 in float32 (test_flow_training.py)
SEED = 3

_RECORDER = '''"""snpo/train.py with Trainer.micro_step recording each rank's pairs (a test wrapper)."""
import json, os, sys
sys.path.insert(0, {repo!r})
from snpo.trainer import trainer as _t

_micro_step = _t.Trainer.micro_step


def micro_step(self, batch, step):
    row = {{"rank": self.dist.rank, "world": self.dist.world, "step": step,
           "epoch": int(batch.epoch), "pairs": [int(i) for i in batch.indices]}}
    with open(os.path.join({log!r}, f"pairs-rank{{self.dist.rank}}.jsonl"), "a") as f:
        f.write(json.dumps(row) + "\\n")
    return _micro_step(self, batch, step)


_t.Trainer.micro_step = micro_step
from snpo.train import main
sys.exit(main())
'''


def recorder(folder: Path) -> tuple[Path, Path]:
    """(a copy of ``snpo/train.py`` that logs every micro-batch's pairs to
    ``folder/pairs/pairs-rank<R>.jsonl``, that log folder)."""
    log = folder / "pairs"
    log.mkdir(parents=True, exist_ok=True)
    script = folder / "train_recording.py"
    script.write_text(_RECORDER.format(repo=str(REPO), log=str(log)))
    return script, log


def launch_recorded(script: Path, config: Path, *extra: str, timeout: float = 400):
    """``deepspeed --num_gpus 2 script --config config extra...`` on the CPU (as
    :func:`conftest.launch_deepspeed`, with the recording wrapper); asserts success."""
    exe = shutil.which("deepspeed", path=str(REPO / ".venv" / "bin")) or shutil.which("deepspeed")
    assert exe, "the deepspeed launcher is not installed"
    cmd = [exe, "--master_port", str(free_port()), "--num_gpus", "2", str(script)]
    r = subprocess.run(
        [*cmd, "--config", str(config), *extra],
        cwd=REPO, env=child_env(), capture_output=True, text=True, timeout=timeout,
    )  # fmt: skip
    assert r.returncode == 0, (r.stdout + r.stderr)[-4000:]
    return r


def record_here(monkeypatch, log: Path) -> None:
    """The same recording for a run in this process (:func:`conftest.train_here`)."""
    from snpo.trainer import trainer as T

    original = T.Trainer.micro_step

    def micro_step(self, batch, step):
        row = {"rank": self.dist.rank, "world": self.dist.world, "step": step,
               "epoch": int(batch.epoch), "pairs": [int(i) for i in batch.indices]}  # fmt: skip
        with open(log / f"pairs-rank{self.dist.rank}.jsonl", "a") as f:
            f.write(json.dumps(row) + "\n")
        return original(self, batch, step)

    monkeypatch.setattr(T.Trainer, "micro_step", micro_step)


def read_pairs(log: Path) -> dict[int, dict[int, list[int]]]:
    """{step: {rank: pair indices of that rank's micro-batches in the step}} from the log."""
    out: dict[int, dict[int, list[int]]] = {}
    for f in sorted(log.glob("pairs-rank*.jsonl")):
        for line in f.read_text().splitlines():
            r = json.loads(line)
            assert r["epoch"] == 0, r
            out.setdefault(r["step"], {}).setdefault(r["rank"], []).extend(r["pairs"])
    return out


@pytest.fixture(scope="module")
def tiny_sd3(tmp_path_factory):
    from snpo.models.tiny_flow import save_tiny_sd3

    return save_tiny_sd3(tmp_path_factory.mktemp("sd3ws") / "m")


@pytest.mark.slow
def test_sd3_zero2_resume_two_to_one_and_back(
    tmp_path, tiny_sd3, pickapic_clean, monkeypatch, recwarn
):
    from diffusers import SD3Transformer2DModel, StableDiffusion3Pipeline

    from snpo.draws import epoch_permutation
    from snpo.models import read_export_meta
    from snpo.trainer.checkpoints import complete_tags

    out = tmp_path / "run"
    cfg = write_config(
        tmp_path / "c.yaml", model=tiny_sd3, train_data=pickapic_clean, output_dir=out,
        objective="snpo", beta=100.0, uncond_prob=0.5, seed=SEED, zero_stage=2,
        train_batch_size_per_gpu=1, max_steps=2, checkpoint_every=2, keep_checkpoints=0,
    )  # fmt: skip
    script, log = recorder(tmp_path)
    launch_recorded(script, cfg)  # 2 processes → steps 1, 2
    record_here(monkeypatch, log)
    assert train_here(cfg, "--max_steps", "4") == 0  # 1 process → steps 3, 4
    said = " ".join(str(w.message) for w in recwarn.list)
    assert "saved with 2 process(es) on 1" in said and "exactly where it stopped" in said
    assert (out / "checkpoints" / "step_00000002_universal").is_dir()
    launch_recorded(script, cfg, "--max_steps", "6")  # and back: 1 → 2 processes, steps 5, 6
    assert complete_tags(out / "checkpoints")[-3:] == [
        "step_00000002", "step_00000004", "step_00000006"
    ]  # fmt: skip

    rows = read_metrics(out)
    assert [r["step"] for r in rows] == [1, 2, 3, 4, 5, 6]
    assert [r["pairs"] for r in rows] == [2, 2, 1, 1, 2, 2]
    assert all(r["epoch"] == 0 for r in rows)
    assert rows[0]["loss"] == pytest.approx(math.log(2), abs=LN2_ABS)  # policy == reference
    for r in rows:
        assert math.isfinite(r["loss"]) and math.isfinite(r["grad_norm"]) and r["grad_norm"] > 0
    # the trained weights came back after each change (a fresh policy would give ln 2 again)
    assert abs(rows[2]["loss"] - math.log(2)) > 1e-5 and abs(rows[4]["loss"] - math.log(2)) > 1e-5

    # the data: step by step, ranks in order, exactly the epoch's permutation from its start
    seen = read_pairs(log)
    assert sorted(seen) == [1, 2, 3, 4, 5, 6]
    assert [sorted(seen[s]) for s in seen] == [[0, 1], [0, 1], [0], [0], [0, 1], [0, 1]]
    order = [i for s in sorted(seen) for r in sorted(seen[s]) for i in seen[s][r]]
    assert order == epoch_permutation(SEED, 0, 16).tolist()[:10]  # none twice, none left out

    export = out / "export"
    assert read_export_meta(export)["family"] == "sd3"
    got = SD3Transformer2DModel.from_pretrained(str(export / "transformer"))
    base = SD3Transformer2DModel.from_pretrained(str(tiny_sd3 / "transformer"))
    a, b = got.state_dict(), base.state_dict()
    assert a.keys() == b.keys() and any(not torch.equal(a[k], b[k]) for k in a)
    assert all(torch.isfinite(v).all() for v in a.values())
    pipe = StableDiffusion3Pipeline.from_pretrained(str(tiny_sd3), transformer=got)
    img = pipe(
        "a red cube", num_inference_steps=2, height=16, width=16, output_type="np",
        generator=torch.Generator().manual_seed(0),
    ).images  # fmt: skip
    assert img.shape == (1, 16, 16, 3) and np.isfinite(img).all()
