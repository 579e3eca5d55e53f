"""Resuming a DeepSpeed checkpoint on a different number of processes (universal checkpoints).

A ZeRO-1/2/3 checkpoint stores the optimizer state split into one file per data-parallel rank,
and ``engine.load_checkpoint`` refuses any other world size. DeepSpeed's answer is the
*universal checkpoint*: ``deepspeed.checkpoint.ds_to_universal`` merges the shards into one
folder per parameter (``zero/<name>/{fp32,exp_avg,exp_avg_sq,step}.pt``), which an engine built
with ``{"checkpoint": {"load_universal": true}}`` re-partitions for any world size.

Procedure (decided before ``deepspeed.initialize``, since ``load_universal`` is read from the
engine's config):

1. ``old = saved_world_size(folder, tag)``; nothing to do when it is ``None`` or the current
   world size, or when the ZeRO stage is 0 (that checkpoint holds the whole optimizer state and
   loads on any world size as it is). A tag for which :func:`is_universal` is true is already
   converted: go to 4.
2. :func:`unsupported_reason` → a one-line refusal (the trainer exits 4) or ``None``.
3. Global rank 0 runs :func:`convert_to_universal` (a subprocess, CPU only; writes
   ``<tag>_universal`` next to ``<tag>`` through a temporary folder and a rename; reused when it
   is already there and current); every rank then waits at a barrier.
4. Build the engine with :func:`universal_load_config` and
   ``engine.load_checkpoint(folder, tag=<tag>_universal, ...)``: weights, AdamW moments and
   step, the LR scheduler, ``global_steps`` and the client state come back as saved.

Limits: stages 1, 2, 3 with fp32 or bf16 (fp16 too; its dynamic loss scale continues from the
saved one); ``exclude_frozen_parameters`` checkpoints (LoRA) work because a universal load
restores only the parameters the optimizer owns: frozen weights and module *buffers* are left as
the freshly built model has them (they must come from the base model). No tensor/pipeline
parallelism. The conversion needs about the checkpoint's size in free disk space and reads every
shard on one machine, so the checkpoint folder must be visible to global rank 0 (on several nodes:
a shared file system).
"""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path

UNIVERSAL_SUFFIX = "_universal"
MARKER = "snpo_universal.json"
_OPTIM = re.compile(r"^(?:bf16_)?zero_pp_rank_(\d+)_mp_rank_(\d+)_optim_states\.pt$")
_MODEL_FILES = ("mp_rank_00_model_states.pt", "zero_pp_rank_0_mp_rank_00_model_states.pt")


class UniversalError(RuntimeError):
    """The conversion to a universal checkpoint failed (the message is one line)."""


def universal_tag(tag: str) -> str:
    return tag if tag.endswith(UNIVERSAL_SUFFIX) else tag + UNIVERSAL_SUFFIX


def is_universal(folder: Path, tag: str) -> bool:
    """A converted checkpoint (loads only with :func:`universal_load_config`)."""
    return (Path(folder) / tag / "zero" / "optimizer_state.pt").is_file()


def _model_state_header(folder: Path, tag: str) -> dict | None:
    """The model-states file of ``tag`` without reading its tensors (``weights_only`` +
    ``mmap``: no code is unpickled, tensors are mapped, not read); ``None`` if unreadable."""
    import torch

    for name in _MODEL_FILES:
        f = Path(folder) / tag / name
        if f.is_file():
            try:
                return torch.load(f, map_location="cpu", weights_only=True, mmap=True)
            except Exception:  # an older/foreign format: not worth unpickling arbitrary code
                return None
    return None


def saved_world_size(folder: Path, tag: str) -> int | None:
    """How many data-parallel ranks wrote ``folder/tag``: the number of per-rank ZeRO optimizer
    files (ZeRO-1/2/3, from the file names only), else ``dp_world_size`` of the model-states
    file (ZeRO-0, read with ``torch.load(weights_only=True, mmap=True)``). ``None`` for a
    universal checkpoint (it loads on any world size) or when the files do not tell."""
    d = Path(folder) / tag
    if is_universal(folder, tag):
        return None
    ranks: dict[int, set[int]] = {}
    if d.is_dir():
        for f in d.iterdir():
            m = _OPTIM.match(f.name)
            if m:
                ranks.setdefault(int(m.group(2)), set()).add(int(m.group(1)))
    if ranks:
        dp = ranks[min(ranks)]
        if dp != set(range(len(dp))):
            missing = sorted(set(range(max(dp) + 1)) - dp)
            raise UniversalError(
                f"checkpoint {d} is incomplete: no optimizer file for rank(s) {missing}"
            )
        return len(dp)
    header = _model_state_header(folder, tag)
    n = header.get("dp_world_size") if header else None
    return int(n) if isinstance(n, int) else None


def saved_zero_stage(folder: Path, tag: str) -> int | None:
    """The ZeRO stage ``folder/tag`` was written with (from its saved DeepSpeed config)."""
    header = _model_state_header(folder, tag)
    try:
        return int(header["ds_config"]["zero_optimization"]["stage"])  # type: ignore[index]
    except (TypeError, KeyError, ValueError):
        return 0 if header is not None else None


def needs_conversion(zero_stage: int, old_world: int | None, new_world: int) -> bool:
    """True when a ZeRO-partitioned checkpoint must become universal to load on new_world."""
    return zero_stage in (1, 2, 3) and old_world is not None and old_world != new_world


def unsupported_reason(
    zero_stage: int, lora: bool, precision: str, old_world: int | None, new_world: int
) -> str | None:
    """One line saying why (and what to do instead) when a checkpoint written by ``old_world``
    processes cannot be resumed on ``new_world``; ``None`` when it can (as it is, or through
    :func:`convert_to_universal`). ``lora`` (frozen weights excluded from the checkpoint) is
    supported: the universal load leaves frozen weights as the built model has them."""
    del lora  # supported at every stage (see the module docstring)
    if old_world is None or old_world == new_world or zero_stage == 0:
        return None
    same = f"resume on {old_world} process(es)"
    fresh = "or start a new run (resume: never, a new output_dir)"
    if zero_stage not in (1, 2, 3):
        return (
            f"resuming a zero_stage {zero_stage} checkpoint written by {old_world} process(es) "
            f"on {new_world} is not supported; {same}, {fresh}"
        )
    if precision not in ("fp32", "bf16", "fp16"):
        return (
            f"resuming a {precision} ZeRO-{zero_stage} checkpoint written by {old_world} "
            f"process(es) on {new_world} is not supported; {same}, {fresh}"
        )
    try:
        import deepspeed.checkpoint.ds_to_universal  # noqa: F401
    except Exception as err:  # pragma: no cover - depends on the installed DeepSpeed
        return (
            f"resuming a ZeRO-{zero_stage} checkpoint written by {old_world} process(es) on "
            f"{new_world} needs DeepSpeed's universal checkpoint converter, which does not "
            f"import here ({type(err).__name__}: {err}); {same}, {fresh}"
        )
    return None


def universal_load_config(conf: dict) -> dict:
    """A copy of DeepSpeed config ``conf`` that loads universal checkpoints. DeepSpeed reads
    it from the engine's config, so it must be passed to ``deepspeed.initialize``; it changes
    nothing but ``load_checkpoint`` (saving still writes ordinary per-rank checkpoints)."""
    out = dict(conf)
    out["checkpoint"] = {**dict(conf.get("checkpoint") or {}), "load_universal": True}
    return out


def _source_signature(src: Path) -> dict[str, list[int]]:
    return {
        f.name: [f.stat().st_size, f.stat().st_mtime_ns]
        for f in sorted(src.iterdir())
        if f.is_file() and f.suffix == ".pt"
    }


def _complete(dest: Path, src: Path) -> bool:
    try:
        marker = json.loads((dest / MARKER).read_text())
    except (OSError, ValueError):
        return False
    return is_universal(dest.parent, dest.name) and marker.get("source") == _source_signature(src)


def convert_to_universal(
    folder: Path,
    tag: str,
    *,
    zero_stage: int,
    workers: int | None = None,
    log: Callable[[str], None] | None = print,
) -> str:
    """Convert ZeRO-``zero_stage`` checkpoint ``folder/tag`` to the universal checkpoint
    ``folder/<tag>_universal`` and return that tag. Call it on one process (global rank 0) and
    barrier afterwards. Runs ``python -m deepspeed.checkpoint.ds_to_universal`` on the CPU in a
    subprocess (its output goes to a log file; ``log`` gets a start and an end line). The result
    is written to ``folder/.<new tag>.partial`` and renamed into place, with a marker recording
    the source files, so an interrupted conversion leaves nothing that looks usable, and a
    complete, current one is reused. Raises :class:`UniversalError` (one line) on failure."""
    folder = Path(folder)
    src, new = folder / tag, universal_tag(tag)
    dest = folder / new
    if zero_stage not in (1, 2, 3):
        raise ValueError(f"zero_stage {zero_stage}: only ZeRO-1/2/3 checkpoints are converted")
    if is_universal(folder, tag):
        return tag
    if not src.is_dir():
        raise UniversalError(f"no checkpoint {src}")
    if dest.exists():
        if _complete(dest, src):
            if log:
                log(f"universal checkpoint {dest} is already there: reusing it")
            return new
        if not (dest / MARKER).is_file():
            raise UniversalError(
                f"{dest} exists but was not written by snpo's conversion; move it away and resume "
                "again"
            )
        shutil.rmtree(dest)  # ours, but made from an older checkpoint of the same tag
    old_world = saved_world_size(folder, tag)
    staging = folder / f".{new}.partial"
    shutil.rmtree(staging, ignore_errors=True)
    staging.mkdir(parents=True)
    out = staging / new  # ds_to_universal also writes "latest_universal" next to its output
    logfile = staging / "convert.log"
    n = workers or max(1, min(4, os.cpu_count() or 1, old_world or 1))
    cmd = [
        sys.executable,
        "-m",
        "deepspeed.checkpoint.ds_to_universal",
        "--input_folder",
        str(src),
        "--output_folder",
        str(out),
        "--num_extract_workers",
        str(n),
        "--num_merge_workers",
        str(max(1, min(2, n))),
        "--inject_missing_state",  # plain (non-Megatron) models record no universal info
    ]
    env = dict(os.environ, DS_ACCELERATOR="cpu", CUDA_VISIBLE_DEVICES="")
    env.setdefault("OMP_NUM_THREADS", "1")
    if log:
        log(
            f"converting checkpoint {src} (ZeRO-{zero_stage}, {old_world or '?'} process(es)) to "
            f"a universal checkpoint {new} …"
        )
    t0 = time.monotonic()
    with open(logfile, "w") as fh:
        r = subprocess.run(cmd, stdout=fh, stderr=subprocess.STDOUT, env=env, check=False)
    if r.returncode != 0 or not is_universal(staging, new):
        lines = [x for x in logfile.read_text(errors="replace").splitlines() if x.strip()]
        last = lines[-1].strip() if lines else "no output"
        raise UniversalError(
            f"converting {src} to a universal checkpoint failed (exit {r.returncode}: {last}); "
            f"full log: {logfile}"
        )
    (out / MARKER).write_text(
        json.dumps(
            {
                "source_tag": tag,
                "source_world": old_world,
                "zero_stage": zero_stage,
                "source": _source_signature(src),
            }
        )
    )
    os.replace(out, dest)
    shutil.rmtree(staging, ignore_errors=True)
    if log:
        log(f"universal checkpoint {dest} written in {time.monotonic() - t0:.1f}s")
    return new
