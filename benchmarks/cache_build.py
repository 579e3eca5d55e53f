"""What ``snpo cache`` costs against the live VAE encodes it replaces, and when it pays back.

    OMP_NUM_THREADS=1 python -m benchmarks.cache_build [--pairs 64] [--rounds 1]
        [--trainer RESULTS.json] [--out benchmarks/results] [--work DIR]

On ``sd15-small`` (``sd_models.py``: SD1.5's structure at reduced width, 256 px, latents
4×32×32) and a Pick-a-Pic-layout parquet of ``--pairs`` pairs of 512–768 px JPEGs, each
measurement in a fresh interpreter (so that one's allocator state cannot help another):

- ``live``: the trainer's live path for one micro-batch of P = 2 pairs
  (:func:`snpo.step.encode_latents`: one VAE forward over the 4 images), CPU time per image,
  as ``snpo train`` runs it; ``live_tuned``: the same under the build's allocator setting
  (``snpo.cache.build_allocator``), i.e. the VAE's compute alone;
- ``build``: ``build_cache`` of every section (text, latents with both flip variants, reference
  errors for the epochs the config's run needs), CPU time per phase; ``build_untuned``: the
  latents phase with ``SNPO_CACHE_MALLOC=0`` (the allocator left alone: the build before the
  fix).

Reported: CPU seconds per stored image variant against the live encode of one image (target:
≤ 1.1×), and the break-even: the build's CPU time over what one epoch of training from the
cache saves — (pairs / P) × (live step − cached step), from a trainer-step results file
(``--trainer``, the ``sd15-small`` rows of ``SNPO_BENCH_TRAINER=full``) — in epochs and in runs
of a sweep. Writes ``<device-slug>-cache-build-<date>.json`` and ``.md``.
"""

from __future__ import annotations

import argparse
import datetime as _dt
import io
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from . import report as R

REPO = Path(__file__).resolve().parent.parent
MODEL = "sd15-small"
TARGET_BUILD_VS_LIVE = 1.1  # CPU s per stored image variant ≤ 1.1 × one live encode


# ---------------------------------------------------------------------------------------------
# the inputs
# ---------------------------------------------------------------------------------------------
def _jpeg(rng, w: int, h: int) -> bytes:
    import numpy as np
    from PIL import Image

    base = rng.integers(0, 255, (h // 32 + 1, w // 32 + 1, 3)).astype(np.uint8)
    im = Image.fromarray(base).resize((w, h), Image.BICUBIC)
    a = np.asarray(im).astype(np.int16) + rng.integers(-20, 20, (h, w, 3))
    buf = io.BytesIO()
    Image.fromarray(a.clip(0, 255).astype(np.uint8)).save(buf, "JPEG", quality=90)
    return buf.getvalue()


def make_inputs(
    work: Path,
    *,
    pairs: int,
    model: str = MODEL,
    resolution: int | None = None,
    sizes=((512, 512), (640, 512), (512, 768)),
    batch: int = 2,
) -> Path:
    """A model folder, a parquet of ``pairs`` pairs and a training YAML under ``work``; returns
    the YAML's path."""
    import numpy as np
    import yaml

    from snpo.data import write_pickapic_parquet

    from . import sd_models as SM
    from . import trainer_cases as TC

    work.mkdir(parents=True, exist_ok=True)
    spec = TC.MODELS[model]
    folder = SM.save_model(work / "model", model, spec.unet)
    rng = np.random.default_rng(0)
    caps = SM.prompts(pairs)
    rows = []
    for i in range(pairs):
        w, h = sizes[i % len(sizes)]
        rows.append(
            {
                "caption": caps[i],
                "jpg_0": _jpeg(rng, w, h),
                "jpg_1": _jpeg(rng, h, w),
                "label_0": float(i % 2),
            }
        )
    data = write_pickapic_parquet(work / "data.parquet", rows)
    cfg = {
        "model": str(folder),
        "train_data": [str(data)],
        "resolution": resolution or spec.resolution,
        "train_batch_size_per_gpu": batch,
        "precision": "fp32",
        "report_to": "none",
        "progress_bar": False,
        "max_steps": pairs,  # two epochs at P = 2
        "checkpoint_every": 0,
        "output_dir": str(work / "run"),
    }
    path = work / "train.yaml"
    path.write_text(yaml.safe_dump(cfg))
    return path


# ---------------------------------------------------------------------------------------------
# the measurements (each in its own interpreter: python -m benchmarks.cache_build --child ...)
# ---------------------------------------------------------------------------------------------
def _cpu() -> float:
    import resource

    r = resource.getrusage(resource.RUSAGE_SELF)
    c = resource.getrusage(resource.RUSAGE_CHILDREN)
    return r.ru_utime + r.ru_stime + c.ru_utime + c.ru_stime


def _sys() -> float:
    import resource

    return resource.getrusage(resource.RUSAGE_SELF).ru_stime


def child_live(cfg_path: Path, *, tuned: bool, batches: int, pairs_per_step: int = 2) -> dict:
    """CPU s per image of the trainer's live encode (encode_latents on P-pair batches)."""
    import contextlib

    import torch

    from snpo.cache import build_allocator
    from snpo.config import load_config
    from snpo.data import PairDataset, collate_pairs, open_source
    from snpo.draws import pair_draws
    from snpo.models import load_model
    from snpo.step import StepModels, encode_latents

    cfg = load_config(cfg_path)
    model = load_model(cfg.model)
    ctx = build_allocator(torch.device("cpu")) if tuned else contextlib.nullcontext(False)
    ds = PairDataset(
        open_source(cfg), resolution=cfg.resolution, seed=cfg.seed, random_crop=False,
        random_flip=True, on_bad_image="skip",
    )  # fmt: skip
    shape = (4, cfg.resolution // model.latent_scale, cfg.resolution // model.latent_scale)
    sm = StepModels(model, None, None, None, torch.device("cpu"), torch.float32)
    p = pairs_per_step
    with ctx as on:
        batch_list = [
            collate_pairs([ds[(0, i)] for i in range(k * p, (k + 1) * p)])
            for k in range(batches + 1)
        ]
        per_image, sys_per_image = [], []
        for k, batch in enumerate(batch_list):
            draws = pair_draws(cfg.seed, 0, batch.indices, shape, model.scheduler, 0.1)
            c0, s0 = _cpu(), _sys()
            encode_latents(sm, batch, draws)
            if k == 0:
                continue  # warm-up
            per_image.append((_cpu() - c0) / (2 * p))
            sys_per_image.append((_sys() - s0) / (2 * p))
    return {
        "kind": "live_tuned" if tuned else "live",
        "allocator_tuned": bool(on),
        "images_per_forward": 2 * p,
        "cpu_s_per_image": statistics.median(per_image),
        "cpu_s_per_image_min": min(per_image),
        "sys_s_per_image": statistics.median(sys_per_image),
        "batches": len(per_image),
    }


def child_build(cfg_path: Path, out: Path, *, what: str, tuned: bool) -> dict:
    import resource

    from snpo.cache import build_cache
    from snpo.config import load_config

    if not tuned:
        os.environ["SNPO_CACHE_MALLOC"] = "0"
    cfg = load_config(cfg_path)
    c0, s0 = _cpu(), _sys()
    t0 = time.perf_counter()
    summary = build_cache(cfg, out, what=what.split(","), overwrite=True, verbose=False)
    wall = time.perf_counter() - t0
    children = resource.getrusage(resource.RUSAGE_CHILDREN)
    return {
        "kind": "build" if tuned else "build_untuned",
        "what": what,
        "summary": summary,
        "cpu_s": _cpu() - c0,
        "sys_s": _sys() - s0,
        "wall_s": wall,
        "worker_cpu_s": children.ru_utime + children.ru_stime,
    }


def _run_child(args: list[str], env: dict[str, str]) -> dict:
    cmd = [sys.executable, "-m", "benchmarks.cache_build", "--child", *args]
    proc = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=7200)
    if proc.returncode != 0:
        raise RuntimeError(f"{' '.join(args)} failed:\n{proc.stderr[-4000:]}")
    for line in reversed(proc.stdout.splitlines()):
        if line.startswith("{"):
            return json.loads(line)
    raise RuntimeError(f"{' '.join(args)}: no result in\n{proc.stdout[-2000:]}")


# ---------------------------------------------------------------------------------------------
# arithmetic (unit-tested in test_cache_build.py)
# ---------------------------------------------------------------------------------------------
def break_even(
    build_cpu_s: float,
    *,
    pairs: int,
    pairs_per_step: int,
    live_step_s: float,
    cached_step_s: float,
    epochs_per_run: int,
) -> dict[str, float | None]:
    """Epochs (and runs of ``epochs_per_run``) of training from the cache whose savings pay for
    its build: one epoch = pairs / P steps, each saving live − cached."""
    saving = (pairs / pairs_per_step) * (live_step_s - cached_step_s)
    if saving <= 0:
        return {"saving_per_epoch_s": saving, "epochs": None, "runs": None}
    epochs = build_cpu_s / saving
    return {"saving_per_epoch_s": saving, "epochs": epochs, "runs": epochs / epochs_per_run}


def _trainer_steps(path: Path | None) -> dict[str, float] | None:
    if path is None:
        return None
    res = json.loads(Path(path).read_text())
    rows = {
        r["variant"]: r
        for r in res.get("trainer_rows", [])
        if r.get("model") == MODEL and r.get("status") == "ok"
    }
    need = ("reference", "live-fused-batched", "cached-fused-batched")
    if not all(k in rows for k in need):
        return None
    return {
        "file": str(path),
        "pairs": rows["live-fused-batched"]["pairs"],
        **{f"{k}_cpu_s": rows[k]["cpu_median_ms"] / 1e3 for k in need},
    }


def summarize(results: list[dict], *, pairs: int, trainer: dict | None) -> dict[str, Any]:
    by: dict[str, list[dict]] = {}
    for r in results:
        by.setdefault(r["kind"], []).append(r)

    def med(kind, fn):
        vals = [fn(r) for r in by.get(kind, [])]
        return statistics.median(vals) if vals else None

    live = med("live", lambda r: r["cpu_s_per_image"])
    live_tuned = med("live_tuned", lambda r: r["cpu_s_per_image"])
    out: dict[str, Any] = {"live_cpu_s_per_image": live, "live_tuned_cpu_s_per_image": live_tuned}
    for kind in ("build", "build_untuned"):
        runs = by.get(kind, [])
        if not runs:
            continue
        s0 = runs[0]["summary"]
        encodes = s0["vae_encodes"]
        lat_cpu = med(kind, lambda r: r["summary"]["phase_cpu_seconds"]["latents"])
        # the DataLoader workers' decode + transform, spread over the phases it ran in
        worker = med(kind, lambda r: r["worker_cpu_s"])
        entry = {
            "what": runs[0]["what"],
            "vae_encodes": encodes,
            "latents_cpu_s": lat_cpu,
            "phase_cpu_s": {
                k: med(kind, lambda r, k=k: r["summary"]["phase_cpu_seconds"][k])
                for k in s0["phase_cpu_seconds"]
            },
            "worker_cpu_s": worker,
            "sys_s": med(kind, lambda r: r["sys_s"]),
            "latents_sys_s": med(kind, lambda r: r["summary"]["phase_sys_seconds"]["latents"]),
            "cpu_s": med(kind, lambda r: r["cpu_s"]),
            "wall_s": med(kind, lambda r: r["wall_s"]),
            "break_even_line": s0.get("break_even"),
        }
        # the workers decode images for the latents phase only (ref_inputs: cache)
        per_variant = (lat_cpu + (worker or 0.0)) / encodes
        entry["cpu_s_per_variant"] = per_variant
        entry["vs_live"] = per_variant / live if live else None
        entry["vs_live_tuned"] = per_variant / live_tuned if live_tuned else None
        out[kind] = entry
    b = out.get("build")
    if b is not None:
        strict = b["vs_live_tuned"] if b["vs_live_tuned"] is not None else b["vs_live"]
        out["target"] = {
            "description": f"building latents ≤ {TARGET_BUILD_VS_LIVE}× the live encodes of the "
            "variants it stores (CPU time per stored variant over one live encode; judged "
            "against the live encode with the allocator tuned too, the stricter of the two)",
            "value": strict,
            "threshold": TARGET_BUILD_VS_LIVE,
            "pass": strict is not None and strict <= TARGET_BUILD_VS_LIVE,
        }
    if trainer is not None and b is not None:
        build_cpu = sum(b["phase_cpu_s"].values()) + (b["worker_cpu_s"] or 0.0)
        epochs = runs_e = max(1, int(round(by["build"][0]["summary"]["epochs"])))
        lat_only = b["phase_cpu_s"].get("latents", 0.0) + (b["worker_cpu_s"] or 0.0)
        common = dict(pairs=pairs, pairs_per_step=trainer["pairs"], epochs_per_run=runs_e)
        out["break_even"] = {
            "trainer": trainer,
            "build_cpu_s": build_cpu,
            "epochs_per_run": epochs,
            # the whole cache (latents + text + reference errors) against ref_mode live
            "cache_vs_live": break_even(
                build_cpu,
                live_step_s=trainer["live-fused-batched_cpu_s"],
                cached_step_s=trainer["cached-fused-batched_cpu_s"],
                **common,
            ),
            # the whole cache against the Diffusion-DPO-style reference step
            "cache_vs_reference": break_even(
                build_cpu,
                live_step_s=trainer["reference_cpu_s"],
                cached_step_s=trainer["cached-fused-batched_cpu_s"],
                **common,
            ),
            "latents_cpu_s": lat_only,
        }
    return out


def render(res: dict[str, Any]) -> str:
    s = res["summary"]
    dev = res["device"]
    lines = [
        f"# `snpo cache` build cost — {dev['name']} ({dev['detail']}), {res['date']}",
        "",
        f"{res['pairs']} pairs of 512–768 px JPEGs, model `{MODEL}` (256 px, latents 4×32×32, "
        "VAE 5.3 M, CLIP 15.0 M, UNet 37.5 M), fp32, 1 torch thread, fp16 latents with both "
        "flip variants; each measurement in a fresh interpreter; CPU time = user + system of "
        f"the process and its DataLoader workers; median of {res['rounds']} round(s). "
        "`python -m benchmarks.cache_build` (benchmarks/README.md).",
        "",
        "| measurement | CPU s per image (variant) | system s of it | × live encode | "
        "× live encode (allocator tuned) |",
        "| --- | --- | --- | --- | --- |",
    ]
    enc = s.get("build") or {}
    raw = s.get("build_untuned") or {}

    def x(v):
        return "—" if v is None else f"{v:.2f}×"

    lines.append(
        f"| live encode, `snpo train` (4 images per VAE forward) | "
        f"{s['live_cpu_s_per_image']:.3f} | {res['live_sys']:.3f} | 1.00× | — |"
    )
    if s.get("live_tuned_cpu_s_per_image"):
        lines.append(
            f"| live encode, allocator tuned | {s['live_tuned_cpu_s_per_image']:.3f} | "
            f"{res['live_tuned_sys']:.3f} | — | 1.00× |"
        )
    for label, e in (("build, before (`SNPO_CACHE_MALLOC=0`)", raw), ("build (now)", enc)):
        if e:
            lines.append(
                f"| {label}: {e['vae_encodes']} variants | {e['cpu_s_per_variant']:.3f} | "
                f"{e['latents_sys_s'] / e['vae_encodes']:.3f} | {x(e['vs_live'])} | "
                f"{x(e['vs_live_tuned'])} |"
            )
    lines.append("")
    t = s.get("target")
    if t:
        verdict = "PASS" if t["pass"] else "MISS"
        lines += [f"Target: {t['description']}: **{verdict}** ({t['value']:.2f}×).", ""]
    be = s.get("break_even")
    if be:
        cl, cr = be["cache_vs_live"], be["cache_vs_reference"]
        tr = be["trainer"]

        def f(v):
            return "—" if v is None else f"{v:.2f}"

        lines += [
            "Break-even (CPU time; step times from "
            f"`{Path(tr['file']).name}`: reference {tr['reference_cpu_s']:.2f} s, live "
            f"{tr['live-fused-batched_cpu_s']:.2f} s, cached "
            f"{tr['cached-fused-batched_cpu_s']:.2f} s per step of P = {tr['pairs']}):",
            "",
            f"- whole cache (text + latents + reference errors for {be['epochs_per_run']} "
            f"epochs): {be['build_cpu_s']:.0f} CPU s;",
            f"- against `ref_mode live`: {cl['saving_per_epoch_s']:.0f} s saved per epoch → "
            f"pays back after **{f(cl['epochs'])} epochs = {f(cl['runs'])} runs** of "
            f"{be['epochs_per_run']} epochs;",
            f"- against the reference step: {cr['saving_per_epoch_s']:.0f} s saved per epoch → "
            f"**{f(cr['epochs'])} epochs = {f(cr['runs'])} runs**.",
            "",
        ]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--child", nargs="+", help=argparse.SUPPRESS)
    ap.add_argument("--pairs", type=int, default=64)
    ap.add_argument("--rounds", type=int, default=1)
    ap.add_argument("--live-batches", type=int, default=6)
    ap.add_argument("--trainer", type=Path, default=None, help="trainer-step results JSON")
    ap.add_argument("--out", type=Path, default=REPO / ".benchmarks" / "snpo")
    ap.add_argument("--work", type=Path, default=None)
    a = ap.parse_args(argv)
    if a.child:
        kind, cfg = a.child[0], Path(a.child[1])
        if kind in ("live", "live_tuned"):
            r = child_live(cfg, tuned=kind == "live_tuned", batches=int(a.child[2]))
        else:
            what = a.child[3]
            r = child_build(cfg, Path(a.child[2]), what=what, tuned=kind == "build")
        print(json.dumps(r, default=str))
        return 0

    import torch

    from .conftest import collect_versions, describe_device

    env = dict(os.environ)
    env.setdefault("OMP_NUM_THREADS", "1")
    env["PYTHONPATH"] = str(REPO) + os.pathsep + env.get("PYTHONPATH", "")
    torch.set_num_threads(int(env["OMP_NUM_THREADS"]))
    tmp = None
    if a.work is None:
        tmp = tempfile.TemporaryDirectory(prefix="snpo-cache-build-")
        a.work = Path(tmp.name)
    cfg = make_inputs(a.work, pairs=a.pairs)
    results: list[dict] = []
    plan = [
        ("live", [str(a.live_batches)]),
        ("live_tuned", [str(a.live_batches)]),
        ("build_untuned", [str(a.work / "cache-untuned"), "latents"]),
        ("build", [str(a.work / "cache"), "latents,text,ref"]),
    ]
    for r in range(a.rounds):
        for kind, extra in plan[r % len(plan) :] + plan[: r % len(plan)]:
            print(f"round {r + 1}/{a.rounds}: {kind} ...", flush=True)
            results.append(_run_child([kind, str(cfg), *extra], env))
    trainer = _trainer_steps(a.trainer)
    now = _dt.datetime.now(_dt.timezone.utc)
    dev = describe_device(torch.device("cpu"))
    live_sys = [r["sys_s_per_image"] for r in results if r["kind"] == "live"]
    tuned_sys = [r["sys_s_per_image"] for r in results if r["kind"] == "live_tuned"]
    res = {
        "date": now.date().isoformat(),
        "timestamp": now.isoformat(timespec="seconds"),
        "device": dev,
        "versions": collect_versions(),
        "pairs": a.pairs,
        "rounds": a.rounds,
        "threads": int(env["OMP_NUM_THREADS"]),
        "live_sys": statistics.median(live_sys) if live_sys else 0.0,
        "live_tuned_sys": statistics.median(tuned_sys) if tuned_sys else 0.0,
        "measurements": results,
        "summary": summarize(results, pairs=a.pairs, trainer=trainer),
    }
    json_path, md_path = R.write_results(
        res, a.out, kind="cache-build", render=lambda r: render(r) + "\n"
    )
    print(md_path.read_text(), end="")
    print(f"wrote {json_path} and .md")
    if tmp is not None:
        tmp.cleanup()
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
