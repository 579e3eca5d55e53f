"""The output folder of a run: what counts as a run there, and the rules that keep it safe.

- One process tree per folder: rank 0 holds an exclusive ``flock`` on ``output_dir/.lock`` for
  the whole run; a second ``snpo train`` on the same folder is refused naming the holder's pid.
- A fresh start (``resume: never``, or ``auto`` with nothing to resume) never mixes with an old
  run: a folder that holds one (``metrics.jsonl``, checkpoints, exports, TensorBoard events) is
  refused unless ``overwrite: true``, which moves the old run's files aside into
  ``<output_dir>.replaced-<UTC time>/`` (nothing is deleted). ``auto`` with nothing to resume
  restarts silently only when ``run.json`` says the folder's run had the same training options.
- Inputs never live where the run writes: ``model``, ``cache_dir`` and ``train_data`` inside
  ``output_dir/checkpoints`` or an ``output_dir/export*`` folder are refused (an export rewrite
  would delete them); with ``overwrite`` they may not lie anywhere inside ``output_dir``.
"""

from __future__ import annotations

import glob
import json
import os
import time
from pathlib import Path

from snpo.trainer.checkpoints import inside

RUN_FILE = "run.json"
LOCK_NAME = ".lock"
RUN_ENTRIES = ("metrics.jsonl", "checkpoints", "export", "export-raw", "tb", "samples", RUN_FILE)


class RunFolderError(RuntimeError):
    """The output folder holds another run, or an input lies where the run writes."""


def run_entries(out: Path) -> list[str]:
    """Names in ``out`` that belong to a run (sorted); empty for a new or empty folder."""
    if not out.is_dir():
        return []
    names = {p.name for p in out.iterdir()}
    found = [n for n in RUN_ENTRIES if n in names]
    found += sorted(n for n in names if n.startswith("export-step"))
    return found


def read_run_file(out: Path) -> dict | None:
    try:
        data = json.loads((out / RUN_FILE).read_text())
    except (OSError, ValueError):
        return None
    return data if isinstance(data, dict) else None


def write_run_file(out: Path, fingerprint: str, trajectory: dict) -> None:
    tmp = out / f".{RUN_FILE}.tmp"
    tmp.write_text(
        json.dumps({"fingerprint": fingerprint, "options": trajectory}, indent=1, default=str)
    )
    os.replace(tmp, out / RUN_FILE)


def _input_paths(cfg) -> list[tuple[str, Path]]:
    from snpo.config import expand_data_files

    paths: list[tuple[str, Path]] = []
    if cfg.model and os.path.exists(cfg.model):
        paths.append(("model", Path(cfg.model)))
    if cfg.cache_dir:
        paths.append(("cache_dir", Path(cfg.cache_dir)))
    for pat in cfg.train_data:
        hits = expand_data_files([pat]) if any(c in pat for c in "*?[") else [pat]
        paths += [("train_data", Path(h)) for h in hits if os.path.exists(h)]
    return paths


def check_inputs_outside(cfg, *, whole_folder: bool) -> None:
    """Refuse inputs inside the folders a run rewrites (see the module docstring)."""
    out = Path(cfg.output_dir)
    written = [out / "checkpoints", *map(Path, glob.glob(str(out / "export*")))]
    if not glob.glob(str(out / "export*")):
        written.append(out / "export")
    for field, p in _input_paths(cfg):
        for w in [out] if whole_folder else written:
            if inside(p, w):
                where = f"inside output_dir {out}" if whole_folder else f"inside {w}"
                raise RunFolderError(
                    f"{field}: {p} lies {where}, which this run rewrites "
                    f"({'--overwrite moves it aside' if whole_folder else 'an export or a checkpoint prune deletes it'}); "
                    "copy it elsewhere or choose another output_dir"
                )


def check_fresh_start(cfg, *, resumable: bool) -> None:
    """Refuse a fresh start that would mix with (or silently replace) the run in output_dir.

    resumable: a checkpoint will be resumed (then nothing here applies)."""
    if resumable:
        return
    out = Path(cfg.output_dir)
    found = [n for n in run_entries(out) if n != RUN_FILE or cfg.resume == "never"]
    if not found:
        return
    if cfg.resume != "never":
        old = read_run_file(out)
        if old is not None and old.get("fingerprint") == cfg.fingerprint():
            return  # the same run, killed before its first checkpoint: start it again
    if cfg.overwrite:
        return
    why = "resume: never" if cfg.resume == "never" else "nothing to resume and other options"
    raise RunFolderError(
        f"output_dir {out} already holds a run ({', '.join(found)}; {why}): give --overwrite to "
        f"move it aside into {out}.replaced-<time>/, or choose another output_dir"
    )


def move_aside(out: Path) -> Path | None:
    """Move every run entry of ``out`` (not the lock) into a new sibling folder; its path."""
    entries = [p for p in out.iterdir() if p.name != LOCK_NAME] if out.is_dir() else []
    if not entries:
        return None
    stamp = time.strftime("%Y%m%d-%H%M%S", time.gmtime())
    dest = out.with_name(f"{out.name}.replaced-{stamp}")
    n = 1
    while dest.exists():
        dest = out.with_name(f"{out.name}.replaced-{stamp}-{n}")
        n += 1
    dest.mkdir(parents=True)
    for p in entries:
        os.replace(p, dest / p.name)
    return dest
