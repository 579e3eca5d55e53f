"""Resuming on a different number of processes through DeepSpeed's universal checkpoint
(:mod:`snpo.trainer.universal`): a tiny model (one frozen layer, saved with exclude_frozen_parameters as
LoRA runs do), ZeRO-2, torch AdamW + LambdaLR, trained on 2 CPU ranks and resumed on 1, and
the other way round. The loaded fp32 weights, AdamW moments and step, scheduler state and client
state equal the saved ones, and the next step equals the uninterrupted run's."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from snpo.trainer.universal import (
    MARKER,
    UniversalError,
    convert_to_universal,
    is_universal,
    needs_conversion,
    saved_world_size,
    universal_load_config,
    universal_tag,
    unsupported_reason,
)

from .conftest import REPO, child_env, free_port

# The DeepSpeed side: run by the `deepspeed` launcher (2 ranks) or as one plain process.
SCRIPT = r"""
import argparse, json
import torch

p = argparse.ArgumentParser()
p.add_argument("--dir", required=True)
p.add_argument("--stage", type=int, default=2)
p.add_argument("--bf16", action="store_true")
p.add_argument("--steps", type=int, required=True)     # train steps start..steps-1
p.add_argument("--start", type=int, default=0)
p.add_argument("--save_at", type=int, default=-1)      # save (and dump) after this many steps
p.add_argument("--load", default="")                   # tag to load before training
p.add_argument("--universal", action="store_true")
p.add_argument("--out", required=True)                 # dump prefix
p.add_argument("--local_rank", type=int, default=0)
a = p.parse_args()

import deepspeed
from deepspeed.utils import safe_get_full_fp32_param, safe_get_full_optimizer_state
from safetensors.torch import save_file
from snpo.trainer.universal import universal_load_config

deepspeed.init_distributed(dist_backend="gloo")
rank, world = torch.distributed.get_rank(), torch.distributed.get_world_size()
GLOBAL = 4
torch.manual_seed(0)
model = torch.nn.Sequential(torch.nn.Linear(5, 7), torch.nn.Tanh(), torch.nn.Linear(7, 9),
                            torch.nn.Tanh(), torch.nn.Linear(9, 1))
model[0].requires_grad_(False)  # the "base model": frozen, excluded from the checkpoint
params = [q for q in model.parameters() if q.requires_grad]
opt = torch.optim.AdamW(params, lr=1e-2, weight_decay=0.01)
sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: 1.0 / (1 + s))
conf = {"train_micro_batch_size_per_gpu": GLOBAL // world, "gradient_accumulation_steps": 1,
        "train_batch_size": GLOBAL, "zero_optimization": {"stage": a.stage},
        "zero_allow_untested_optimizer": True, "steps_per_print": 10**9, "gradient_clipping": 1.0}
if a.bf16:
    conf["bf16"] = {"enabled": True}
if a.universal:
    conf = universal_load_config(conf)
engine, _, _, _ = deepspeed.initialize(model=model, model_parameters=params, optimizer=opt,
                                       lr_scheduler=sched, config=conf)
dtype = torch.bfloat16 if a.bf16 else torch.float32


def dump(name, client=None):
    out = {}
    for n, q in engine.module.named_parameters():
        out["module." + n] = q.detach().float().clone()
        if q.requires_grad:  # gathers across ranks: every rank calls it
            out["fp32." + n] = safe_get_full_fp32_param(q).float().clone()
            for k in ("exp_avg", "exp_avg_sq"):
                out[k + "." + n] = safe_get_full_optimizer_state(q, k).float().clone()
    if rank == 0:
        save_file(out, f"{a.out}{name}.safetensors")
        base = engine.optimizer.optimizer
        meta = {"world": world, "global_steps": engine.global_steps,
                "sched": {k: v for k, v in engine.lr_scheduler.state_dict().items()
                          if k != "lr_lambdas"},
                "adam_step": sorted({float(s["step"]) for s in base.state.values()}),
                "groups": [{k: v for k, v in g.items() if k != "params"} for g in base.param_groups],
                "client": client}
        with open(f"{a.out}{name}.json", "w") as f:
            json.dump(meta, f)


if a.load:
    path, state = engine.load_checkpoint(a.dir, tag=a.load, load_module_strict=False,
                                         load_optimizer_states=True, load_lr_scheduler_states=True)
    assert path is not None
    dump("loaded", {k: v for k, v in state.items() if k.startswith("snpo_")})
for step in range(a.start, a.steps):
    g = torch.Generator().manual_seed(1000 + step)  # one global batch per step, split by rank
    x, y = torch.randn(GLOBAL, 5, generator=g), torch.randn(GLOBAL, 1, generator=g)
    mb = GLOBAL // world
    xs, ys = x[rank * mb:(rank + 1) * mb].to(dtype), y[rank * mb:(rank + 1) * mb]
    engine.backward(torch.nn.functional.mse_loss(engine(xs).float(), ys))
    engine.step()
    if step + 1 == a.save_at:
        engine.save_checkpoint(a.dir, tag=f"step_{step + 1}", exclude_frozen_parameters=True,
                               client_state={"snpo_step": step + 1, "snpo_world": world})
        dump("saved")
dump("end")
"""


def _launch(tmp_path: Path, nproc: int, *args: str) -> None:
    script = tmp_path / "ds_run.py"
    script.write_text(SCRIPT)
    env = child_env()
    env["PYTHONPATH"] = str(REPO)
    if nproc == 1:
        env.update(RANK="0", LOCAL_RANK="0", WORLD_SIZE="1", MASTER_ADDR="127.0.0.1")
        env["MASTER_PORT"] = str(free_port())
        cmd = [sys.executable, str(script), *args]
    else:
        exe = shutil.which("deepspeed", path=str(Path(sys.executable).parent)) or shutil.which(
            "deepspeed"
        )
        assert exe, "the deepspeed launcher is not installed"
        cmd = [exe, "--master_port", str(free_port()), "--num_gpus", str(nproc), str(script)]
        cmd += list(args)
    r = subprocess.run(cmd, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=240)
    assert r.returncode == 0, (r.stdout + r.stderr)[-4000:]


def _read(prefix: Path, name: str) -> tuple[dict[str, torch.Tensor], dict]:
    from safetensors.torch import load_file

    return (
        load_file(f"{prefix}{name}.safetensors"),
        json.loads(Path(f"{prefix}{name}.json").read_text()),
    )


def _resume_on_other_world(tmp_path: Path, old: int, new: int, *flags: str, atol: float) -> None:
    ck = tmp_path / "ck"
    a, b = tmp_path / "a_", tmp_path / "b_"
    # 4 steps on `old` ranks, checkpoint after 3
    _launch(
        tmp_path, old, "--dir", str(ck), "--steps", "4", "--save_at", "3", "--out", str(a), *flags
    )
    assert saved_world_size(ck, "step_3") == old
    assert needs_conversion(2, old, new)
    assert unsupported_reason(2, True, "bf16" if flags else "fp32", old, new) is None
    lines: list[str] = []
    tag = convert_to_universal(ck, "step_3", zero_stage=2, log=lines.append)
    assert tag == universal_tag("step_3") == "step_3_universal"
    assert is_universal(ck, tag) and (ck / tag / MARKER).is_file()
    assert saved_world_size(ck, tag) is None
    assert [p.name for p in ck.iterdir() if p.name.startswith(".")] == []  # staging removed
    assert not (ck / "latest_universal").exists() and (ck / "latest").read_text() == "step_3"
    assert len(lines) == 2 and "ZeRO-2" in lines[0]
    # a second call reuses it
    assert convert_to_universal(ck, "step_3", zero_stage=2, log=lines.append) == tag
    assert "reusing" in lines[-1]
    # resume on `new` ranks, 1 step
    _launch(
        tmp_path,
        new,
        "--dir",
        str(ck),
        "--load",
        tag,
        "--universal",
        "--start",
        "3",
        "--steps",
        "4",
        "--out",
        str(b),
        *flags,
    )
    saved, saved_meta = _read(a, "saved")
    loaded, loaded_meta = _read(b, "loaded")
    assert loaded.keys() == saved.keys()
    assert any(k.startswith("exp_avg_sq.") for k in saved)
    for k in saved:  # weights (incl. the frozen layer), fp32 master, exp_avg, exp_avg_sq
        assert torch.equal(loaded[k], saved[k]), k
    assert loaded_meta["client"] == {"snpo_step": 3, "snpo_world": old}
    assert loaded_meta["adam_step"] == saved_meta["adam_step"] == [3.0]
    assert loaded_meta["global_steps"] == saved_meta["global_steps"] == 3
    assert loaded_meta["sched"] == saved_meta["sched"]
    assert loaded_meta["sched"]["last_epoch"] == 3
    assert loaded_meta["groups"] == saved_meta["groups"]
    # the next step is the uninterrupted run's step 4 (the same global batch, split differently)
    ref, ref_meta = _read(a, "end")
    end, end_meta = _read(b, "end")
    for k in ref:
        torch.testing.assert_close(end[k], ref[k], atol=atol, rtol=0, msg=k)
    assert not torch.equal(end["fp32.2.weight"], saved["fp32.2.weight"])  # it trained
    assert end_meta["sched"] == ref_meta["sched"] and end_meta["adam_step"] == [4.0]


@pytest.mark.slow
def test_zero2_two_ranks_to_one(tmp_path):
    _resume_on_other_world(tmp_path, 2, 1, atol=1e-6)


@pytest.mark.slow
def test_zero2_bf16_one_rank_to_two(tmp_path):
    _resume_on_other_world(tmp_path, 1, 2, "--bf16", atol=1e-3)


# ----------------------------------------------------------------------------------------------
# without DeepSpeed processes
def _fake_ckpt(d: Path, ranks, *, bf16: bool = False) -> None:
    d.mkdir(parents=True)
    pre = "bf16_" if bf16 else ""
    for r in ranks:
        (d / f"{pre}zero_pp_rank_{r}_mp_rank_00_optim_states.pt").write_bytes(b"")
    (d / "mp_rank_00_model_states.pt").write_bytes(b"")


def test_saved_world_size_from_file_names(tmp_path):
    _fake_ckpt(tmp_path / "step_1", range(4))
    _fake_ckpt(tmp_path / "step_2", [0], bf16=True)
    _fake_ckpt(tmp_path / "step_3", [0, 2])
    assert saved_world_size(tmp_path, "step_1") == 4
    assert saved_world_size(tmp_path, "step_2") == 1
    with pytest.raises(UniversalError, match=r"no optimizer file for rank\(s\) \[1\]"):
        saved_world_size(tmp_path, "step_3")
    (tmp_path / "u" / "zero").mkdir(parents=True)
    (tmp_path / "u" / "zero" / "optimizer_state.pt").write_bytes(b"")
    assert is_universal(tmp_path, "u") and saved_world_size(tmp_path, "u") is None
    assert saved_world_size(tmp_path, "missing") is None


def test_saved_world_size_zero0_reads_header_only(tmp_path):
    d = tmp_path / "step_1"
    d.mkdir()
    torch.save(
        {"module": {"w": torch.zeros(3)}, "dp_world_size": 3, "ds_config": {}},
        d / "mp_rank_00_model_states.pt",
    )
    assert saved_world_size(tmp_path, "step_1") == 3


def test_unsupported_reason_and_config():
    assert unsupported_reason(2, True, "bf16", 2, 2) is None
    assert unsupported_reason(0, False, "bf16", 2, 1) is None  # ZeRO-0 loads as it is
    for stage in (1, 2, 3):
        assert unsupported_reason(stage, True, "fp32", 2, 1) is None
        assert unsupported_reason(stage, False, "bf16", 1, 2) is None
    why = unsupported_reason(7, False, "fp32", 2, 1)
    assert why and "\n" not in why and "resume on 2 process(es)" in why
    assert not needs_conversion(0, 2, 1) and not needs_conversion(2, 2, 2)
    assert not needs_conversion(2, None, 1) and needs_conversion(3, 1, 2)
    conf = {"zero_optimization": {"stage": 2}, "checkpoint": {"tag_validation": "WARN"}}
    new = universal_load_config(conf)
    assert new["checkpoint"] == {"tag_validation": "WARN", "load_universal": True}
    assert conf["checkpoint"] == {"tag_validation": "WARN"}  # not modified
    assert universal_tag("step_5") == "step_5_universal" == universal_tag("step_5_universal")


def test_convert_refusals(tmp_path):
    with pytest.raises(ValueError, match="ZeRO-1/2/3"):
        convert_to_universal(tmp_path, "step_1", zero_stage=0)
    with pytest.raises(UniversalError, match="no checkpoint"):
        convert_to_universal(tmp_path, "step_1", zero_stage=2, log=None)
    _fake_ckpt(tmp_path / "step_1", range(2))
    (tmp_path / "step_1_universal").mkdir()  # someone else's folder: not overwritten
    with pytest.raises(UniversalError, match="not written by snpo"):
        convert_to_universal(tmp_path, "step_1", zero_stage=2, log=None)


def test_convert_failure_is_one_line_and_leaves_nothing_usable(tmp_path):
    _fake_ckpt(tmp_path / "step_1", range(2))  # empty files: DeepSpeed cannot read them
    with pytest.raises(UniversalError) as err:
        convert_to_universal(tmp_path, "step_1", zero_stage=2, log=None)
    msg = str(err.value)
    assert "\n" not in msg and "failed" in msg and "convert.log" in msg
    assert not (tmp_path / "step_1_universal").exists()
