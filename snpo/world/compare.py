"""The longer comparison on the small world: every objective on the same base, data and budget.

    python -m snpo.world compare [--out runs/compare] [--budget default|protocol|quick]
                                 [--seeds 0 1 2] [--steps N] [--jobs J] [--overwrite]

Runs (docs/world.md, "Alignment protocol"; every run is ``snpo.train`` on the shipped pairs):
    dpo (λ 1), bdpo (λ 0.9), npo (the negative model, λ 1) + Diffusion-NPO merge used as CFG's
    null branch of the dpo model, snpo_naive (λ 1), snpo (λ 0.9), snpo λ 0.5, and snpo with the
    ELBO's weight T·ω(t) instead of the Diffusion-DPO code's weight 1. Only when named with
    ``--runs`` (docs/world.md, "The CFG 1 cost"): dpo_nonull (dpo with the null-branch pairs
    weighted 0, :mod:`.nonull`), dpo_p0.05 and snpo_p0.05 (null-branch probability 0.05; their
    own reference-error caches, ``cache-sN-p0.05``).
For each run and seed: the known reward of CFG samples at several guidance scales (training and
held-out prompts, each reward component), implicit accuracy of both branches on held-out pairs
(``snpo eval``) and the training curves (loss, per-branch accuracy, winner log-likelihood proxy,
every step from metrics.jsonl). Writes results.json, results.md (mean ± std over seeds),
curves.png and grid.png (seed 0's samples at the largest guidance scale).

Length (~700 lines): the run table, the job graph (caches, trainings, evaluations) and the
report of one comparison; each part is small and they share the job records.

How it runs: one reference-error cache per seed (``snpo.cache.build_cache``; the reference errors depend on
the seed's draws only, not on the objective, so all seven runs of a seed share it), then the
trainings and evaluations as jobs on ``--jobs`` processes of one thread each (on 2 cores two
single-threaded processes do ~1.4x the work of one two-threaded process). Every job's result is
a file; a rerun with the same settings skips what is done, so an interrupted comparison resumes.
"""

from __future__ import annotations

import json
import os
import shutil
import statistics
import time
from dataclasses import asdict, dataclass
from pathlib import Path

from snpo.atomic import atomic_write_text

from .alignment import ALIGN, run_trainer, write_config
from .jobs import Job, run_jobs

RUNS: dict[str, dict] = {
    "dpo": {"objective": "dpo", "lam": 1.0},
    "bdpo": {"objective": "bdpo", "lam": 0.9},
    "npo": {"objective": "npo", "lam": 1.0},
    "snpo_naive": {"objective": "snpo_naive", "lam": 1.0},
    "snpo": {"objective": "snpo", "lam": 0.9},
    "snpo_lam0.5": {"objective": "snpo", "lam": 0.5},
    "snpo_elbo": {"objective": "snpo", "lam": 0.9, "weighting": "elbo"},
    # --- the CFG 1 study (docs/world.md, "The CFG 1 cost"); only when named in --runs ---
    # dpo whose null-prompt-branch pairs are drawn as in dpo but weigh 0 in the loss: the same
    # conditional pairs as dpo and snpo, no null-branch training (:mod:`.nonull`)
    "dpo_nonull": {"objective": "dpo", "lam": 1.0, "null_pairs": "dropped"},
    # a pair goes to the null branch with probability 0.05 instead of ALIGN's 0.2 (the draws of
    # a seed are nested: the null pairs at 0.05 are a subset of those at 0.2, same noise)
    "dpo_p0.05": {"objective": "dpo", "lam": 1.0, "uncond_prob": 0.05},
    "snpo_p0.05": {"objective": "snpo", "lam": 0.9, "uncond_prob": 0.05},
}
# what a plain `compare` runs (the study's runs above only when named)
DEFAULT_RUNS = ("dpo", "bdpo", "npo", "snpo_naive", "snpo", "snpo_lam0.5", "snpo_elbo")
# keys of a RUNS entry that are the world's, not the trainer's: how the run is launched
WORLD_KEYS = ("null_pairs",)
NPO_MERGED = "npo+merge"  # the dpo model sampled with the merged negative model as null branch
SCALES = (1.0, 3.0, 7.5)


@dataclass(frozen=True)
class Budget:
    """What one comparison spends: training steps per run and the size of each evaluation.

    steps: alignment steps per run (16 pairs each); eval_train/eval_heldout: the first N of the
    fixed prompt order of each split; eval_seeds: noise seeds per prompt; sample_steps: DDIM
    steps; scales: CFG guidance scales; pref_pairs: held-out pairs for implicit accuracy (None:
    all 684); pref_timesteps: stratified timestep draws per pair."""

    steps: int
    eval_train: int
    eval_heldout: int
    eval_seeds: int
    sample_steps: int
    scales: tuple[float, ...]
    pref_pairs: int | None
    pref_timesteps: int


BUDGETS: dict[str, Budget] = {
    # fits 30 minutes on a 2-core CPU (measured: see docs/world.md); sized from timings only
    "default": Budget(100, 16, 16, 1, 20, SCALES, 384, 1),
    # the protocol of docs/world.md as first written (~2 h on 2 cores; minutes on a GPU)
    "protocol": Budget(300, 16, 16, 2, 20, SCALES, None, 4),
    # the evidence runs: the default training budget, rewards along the whole CFG curve (meant
    # for ≥ 8 seeds of the headline runs; docs/world.md has its time)
    "evidence": Budget(100, 16, 16, 1, 20, (1.0, 2.0, 3.0, 5.0, 7.5, 10.0), 384, 1),
    # a smoke run of every job (tests, CI)
    "quick": Budget(4, 2, 2, 1, 3, (3.0,), 16, 1),
}


def _log(msg: str) -> None:
    print(f"[compare] {msg}", flush=True)


def _write_json(path: Path, obj) -> None:
    atomic_write_text(path, json.dumps(obj, indent=1) + "\n")


# ----------------------------------------------------------------------------- jobs (workers)


def init_worker(threads: int) -> None:
    """Each worker process: ``threads`` intra-op threads, no library progress bars."""
    os.environ["OMP_NUM_THREADS"] = str(threads)
    import torch
    from diffusers.utils import logging as dlog
    from transformers.utils import logging as tlog

    torch.set_num_threads(threads)
    dlog.disable_progress_bar()
    tlog.disable_progress_bar()


def job_cache(config: str, cache: str, log: str) -> dict:
    """The reference errors (and inputs) one seed's runs need (:func:`snpo.cache.build_cache`,
    its output in ``log``); resumable."""
    import contextlib

    from snpo.cache import build_cache
    from snpo.config import load_config

    done = Path(cache) / "done.json"
    if done.is_file():
        return {"cache": cache, "skipped": True}
    with open(log, "w") as fh, contextlib.redirect_stdout(fh), contextlib.redirect_stderr(fh):
        build_cache(load_config(config), cache, verbose=False)
    _write_json(done, {"config": config})
    return {"cache": cache, "skipped": False}


def job_train(config: str, run: str, log: str, threads: int, module: str = "snpo.train") -> dict:
    """One alignment run through the real trainer (``python -m MODULE``: snpo.train, or a
    world variant of it, :func:`trainer_module`); ``run/done.json`` marks it complete."""
    run_dir = Path(run)
    if (run_dir / "done.json").is_file():
        return {"run": run, "skipped": True}
    if run_dir.exists():  # an interrupted run: start it again from scratch
        shutil.rmtree(run_dir)

    t = time.perf_counter()
    run_trainer(Path(config), Path(log), threads, module=module)
    _write_json(run_dir / "done.json", {"seconds": round(time.perf_counter() - t, 1)})
    return {"run": run, "skipped": False}


def job_merge(base: str, positive: str, negative: str, out: str) -> dict:
    """Diffusion-NPO's merge (α = β = 1, positive = the dpo run of the same seed)."""
    from snpo.models import META_FILE
    from snpo.tools.merge import merge

    if (Path(out) / META_FILE).is_file():
        return {"merged": out, "skipped": True}
    merge(reference=base, positive=positive, negative=negative, out=out)
    return {"merged": out, "skipped": False}


def samples_path(rewards_json: Path) -> str:
    """Where job_rewards keeps the images of ``NAME.json``: ``NAME.samples.safetensors``."""
    return str(
        rewards_json.parent / (rewards_json.name.removesuffix(".json") + ".samples.safetensors")
    )


def job_rewards(
    base: str, export: str | None, negative: str | None, out: str, budget: dict
) -> dict:
    """Known reward of CFG samples (docs/world.md protocol, sized by ``budget``); writes the
    summary JSON and the images (safetensors, one (N, 3, 16, 16) tensor per scale)."""
    from safetensors.torch import save_file

    from snpo.world.demo import eval_prompts, world_rewards

    out_path = Path(out)
    if out_path.is_file():
        return {"rewards": out, "skipped": True}
    from snpo.models import load_any

    b = Budget(**{**budget, "scales": tuple(budget["scales"])})
    model, _ = load_any(export or base)
    neg = None if negative is None else load_any(negative)[0].unet
    prompts = eval_prompts(b.eval_train, b.eval_heldout)
    res = world_rewards(model, prompts, b.eval_seeds, b.scales, b.sample_steps, negative_unet=neg)
    images = res.pop("images")
    out_path.parent.mkdir(parents=True, exist_ok=True)
    save_file({g: x.contiguous() for g, x in images.items()}, samples_path(out_path))
    _write_json(out_path, res)
    return {"rewards": out, "skipped": False}


def job_preference(
    base: str, models: dict[str, str], pairs: str, out: str, max_pairs: int | None, timesteps: int
) -> dict:
    """``snpo eval`` implicit accuracy of every model of one seed on the held-out pairs. A rerun
    with more runs evaluates only the models missing from ``preference.json`` and adds them
    (a model's accuracy depends on the pairs and the draws, not on the other models)."""
    from snpo.world.demo import preference_eval

    done = Path(out) / "preference.json"
    old = json.loads(done.read_text()) if done.is_file() else None
    todo = {n: m for n, m in models.items() if old is None or n not in old["models"]}
    if not todo:
        return {"preference": str(done), "skipped": True}
    if old is None:
        preference_eval(base, todo, pairs, Path(out), max_pairs, timesteps)
        return {"preference": str(done), "skipped": False}
    extra = Path(out) / "added"
    preference_eval(base, todo, pairs, extra, max_pairs, timesteps)
    new = json.loads((extra / "preference.json").read_text())
    old["models"].update(new["models"])
    old["settings"]["models"] = {**old["settings"]["models"], **new["settings"]["models"]}
    _write_json(done, old)
    shutil.rmtree(extra)
    return {"preference": str(done), "skipped": False}


# ----------------------------------------------------------------------------- plan


def _settings(seeds: list[int], budget: Budget, names: list[str]) -> dict:
    runs = {n: RUNS[n] for n in names}
    return {"seeds": list(seeds), "budget": asdict(budget), "runs": runs, "align": ALIGN}


def has_merge(names: list[str]) -> bool:
    """The Diffusion-NPO merge needs its positive (dpo) and negative (npo) runs."""
    return "dpo" in names and "npo" in names


def report_rows(names: list[str]) -> list[str]:
    """The report's rows: the runs, then the merged NPO sampling when it was run."""
    return [*names, *([NPO_MERGED] if has_merge(names) else [])]


def run_names(runs: list[str] | None) -> list[str]:
    """The runs asked for, in RUNS' order (DEFAULT_RUNS by default); unknown names are
    refused."""
    if not runs:
        return list(DEFAULT_RUNS)
    unknown = [r for r in runs if r not in RUNS]
    if unknown:
        raise SystemExit(f"unknown run(s) {unknown}; choose from {list(RUNS)}")
    return [n for n in RUNS if n in runs]


def check_settings(out: Path, settings: dict, overwrite: bool) -> None:
    """A rerun into ``out`` resumes only with the same budget and alignment settings; otherwise
    refuse, naming what differs (or clear it with ``overwrite``). Seeds and runs are additive: a
    rerun with more seeds or other runs reuses every finished job and adds the rest."""
    path = out / "settings.json"
    if not path.is_file():
        return
    additive = ("seeds", "runs")
    stored = json.loads(path.read_text())
    settings = json.loads(json.dumps(settings))  # as stored: tuples are lists
    # a run of the same name must be the same run (its objective, λ, uncond_prob, …)
    new_runs, old_runs = settings.get("runs"), stored.get("runs")
    changed = []
    if isinstance(new_runs, dict) and isinstance(old_runs, dict):
        changed = [n for n, r in new_runs.items() if n in old_runs and old_runs[n] != r]
    old = {k: v for k, v in stored.items() if k not in additive}
    settings = {k: v for k, v in settings.items() if k not in additive}
    if changed:
        old["runs"], settings["runs"] = (
            {n: stored["runs"][n] for n in changed},
            {n: new_runs[n] for n in changed},
        )
    if old == settings:
        return
    if overwrite:
        shutil.rmtree(out)
        return
    diff = [k for k in sorted(set(old) | set(settings)) if old.get(k) != settings.get(k)]
    if "budget" in diff:
        ob, nb = old.get("budget", {}), settings["budget"]
        diff += [f"budget.{k}: {ob.get(k)} → {nb[k]}" for k in nb if ob.get(k) != nb[k]]
    raise SystemExit(
        f"{out} holds a comparison with other settings ({', '.join(diff)}); use another --out "
        "or --overwrite to discard it"
    )


def plan(
    out: Path, seeds: list[int], budget: Budget, threads: int, names: list[str] | None = None
) -> list[Job]:
    """Every job of the comparison, in the order they should start when ready."""
    from snpo.world.demo import ASSETS

    base = str(ASSETS / "base")
    data = str(ASSETS / "pairs_train.parquet")
    b = asdict(budget)
    names = run_names(names)
    jobs = [Job("rewards base", job_rewards, dict(base=base, export=None, negative=None,
                                                   out=str(out / "rewards" / "base.json"),
                                                   budget=b))]  # fmt: skip
    for seed in seeds:
        runs = out / "runs"
        runs.mkdir(parents=True, exist_ok=True)
        common = {"report_to": "none", "progress_bar": False}
        caches: dict[str, Path] = {}  # cache tag → folder, one per null-branch probability
        for name in names:
            tag = cache_tag(RUNS[name])
            if tag in caches:
                continue
            caches[tag] = cache = out / f"cache-s{seed}{tag}"
            p = {"uncond_prob": RUNS[name]["uncond_prob"]} if tag else {}
            cache_cfg = write_config(
                runs / f"cache-s{seed}{tag}.yaml", model=base, data=data,
                out=runs / f"cache-s{seed}{tag}", steps=budget.steps, seed=seed,
                overrides={**RUNS["dpo"], **p, **common},
            )  # fmt: skip
            jobs.append(
                Job(
                    f"cache s{seed}{tag}",
                    job_cache,
                    dict(config=str(cache_cfg), cache=str(cache),
                         log=str(runs / f"cache-s{seed}{tag}.log")),
                )
            )  # fmt: skip
        exports = {}
        for name in names:
            run = runs / f"{name}-s{seed}"
            tag = cache_tag(RUNS[name])
            cfg = write_config(
                runs / f"{name}-s{seed}.yaml", model=base, data=data, out=run, steps=budget.steps,
                seed=seed,
                overrides={**trainer_options(RUNS[name]), **common, "ref_mode": "cache",
                           "cache_dir": str(caches[tag])},
            )  # fmt: skip
            exports[name] = str(run / "export")
            jobs.append(
                Job(
                    f"train {name} s{seed}",
                    job_train,
                    dict(config=str(cfg), run=str(run), log=str(runs / f"{name}-s{seed}.log"),
                         threads=threads, module=trainer_module(RUNS[name])),
                    deps=(f"cache s{seed}{tag}",),
                )
            )  # fmt: skip
        for name in names:
            jobs.append(
                Job(
                    f"rewards {name} s{seed}",
                    job_rewards,
                    dict(base=base, export=exports[name], negative=None, budget=b,
                         out=str(out / "rewards" / f"{name}-s{seed}.json")),
                    deps=(f"train {name} s{seed}",),
                )
            )  # fmt: skip
        models = dict(exports)
        deps = tuple(f"train {n} s{seed}" for n in names)
        if has_merge(names):
            merged = str(runs / f"npo_merged-s{seed}")
            jobs.append(
                Job(
                    f"merge s{seed}",
                    job_merge,
                    dict(base=base, positive=exports["dpo"], negative=exports["npo"], out=merged),
                    deps=(f"train dpo s{seed}", f"train npo s{seed}"),
                )
            )
            jobs.append(
                Job(
                    f"rewards {NPO_MERGED} s{seed}",
                    job_rewards,
                    dict(base=base, export=exports["dpo"], negative=merged, budget=b,
                         out=str(out / "rewards" / f"{NPO_MERGED}-s{seed}.json")),
                    deps=(f"merge s{seed}",),
                )
            )  # fmt: skip
            models["npo_merged"] = merged
            deps += (f"merge s{seed}",)
        jobs.append(
            Job(
                f"preference s{seed}",
                job_preference,
                dict(base=base, models=models, pairs=str(ASSETS / "pairs_heldout.parquet"),
                     out=str(out / "preference" / f"s{seed}"), max_pairs=budget.pref_pairs,
                     timesteps=budget.pref_timesteps),
                deps=deps,
            )
        )  # fmt: skip
    return jobs


def cache_tag(run: dict) -> str:
    """The suffix of the reference-error cache a run trains from: "" for ALIGN's null-branch
    probability, "-p0.05" for another one (the draws, hence the reference errors, depend on
    it; the cache refuses a run with another uncond_prob)."""
    p = run.get("uncond_prob", ALIGN["uncond_prob"])
    return "" if p == ALIGN["uncond_prob"] else f"-p{p:g}"


def trainer_options(run: dict) -> dict:
    """A RUNS entry without the world's own keys (WORLD_KEYS): what goes into the config."""
    return {k: v for k, v in run.items() if k not in WORLD_KEYS}


def trainer_module(run: dict) -> str:
    """``python -m`` this: the trainer, or :mod:`snpo.world.nonull` for null_pairs "dropped"."""
    mode = run.get("null_pairs", "trained")
    if mode == "trained":
        return "snpo.train"
    if mode == "dropped":
        return "snpo.world.nonull"
    raise ValueError(f"null_pairs: {mode!r} (trained | dropped)")


def default_jobs() -> int:
    """One single-threaded job per core on the CPU; two at a time on a GPU."""
    import torch

    return 2 if torch.cuda.is_available() else max(1, os.cpu_count() or 1)


def compare(
    out: str | Path,
    *,
    seeds: list[int],
    budget: Budget,
    jobs: int | None = None,
    overwrite: bool = False,
    runs: list[str] | None = None,
) -> dict:
    """Plan, run (resuming what is done) and report the comparison; returns results.json.
    ``runs``: a subset of RUNS (default all; the merge row needs dpo and npo)."""
    out = Path(out)
    names = run_names(runs)
    settings = _settings(seeds, budget, names)
    check_settings(out, settings, overwrite)
    out.mkdir(parents=True, exist_ok=True)
    _write_json(out / "settings.json", settings)
    workers = jobs or default_jobs()
    threads = max(1, (os.cpu_count() or 1) // workers)
    job_list = plan(out, seeds, budget, threads, names)
    t0 = time.perf_counter()
    _log(
        f"{len(job_list)} jobs ({len(names)} runs × {len(seeds)} seeds of {budget.steps} steps, "
        f"caches, merges, evaluations) on {workers} process(es) × {threads} thread(s); "
        f"outputs in {out.resolve()}"
    )

    def on_event(kind: str, job: Job, secs: float, done: int, total: int) -> None:
        wall = time.perf_counter() - t0
        if kind == "done":
            _log(f"{done}/{total} done at {wall:.0f} s: {job.key} ({secs:.0f} s)")

    done = run_jobs(job_list, workers=workers, on_event=on_event, initializer=init_worker,
                    initargs=(threads,))  # fmt: skip
    ran = sum(not r["skipped"] for r in done.values())
    invocations = record_invocation(
        out,
        {
            "seconds": round(time.perf_counter() - t0, 1),
            "jobs_run": ran,
            "jobs_skipped": len(done) - ran,
            "machine": machine_name(),
            "processes": workers,
            "threads": threads,
        },
    )
    results = collect(out, seeds, budget, names)
    results["invocations"] = invocations
    _write_json(out / "results.json", results)
    (out / "results.md").write_text(results_table(results))
    plot_curves(results, out / "curves.png")
    write_paired(out, results, names)
    write_grid(out, seeds[0], budget, out / "grid.png", names)
    return results


def write_paired(out: Path, results: dict, names: list[str]) -> None:
    """``paired.md`` (paired differences with intervals, the CFG curve) and ``cfg_curve.png``
    beside results.json (:mod:`snpo.world.paired`); needs ≥ 2 seeds."""
    from snpo.world.paired import plot_cfg_curve, report

    if len(results["settings"]["seeds"]) < 2:
        return
    atomic_write_text(out / "paired.md", report(results, names))
    plot_cfg_curve(results, names, out / "cfg_curve.png")


def record_invocation(out: Path, entry: dict) -> list[dict]:
    """Append this invocation's wall time and job counts to ``out/invocations.json`` (so that
    a resumed comparison reports the time of every part, not only of the last)."""
    path = out / "invocations.json"
    log = json.loads(path.read_text()) if path.is_file() else []
    log.append(entry)
    _write_json(path, log)
    return log


def wall_time(results: dict) -> str:
    """The wall time of the invocations that ran jobs, with the machine and processes."""
    parts = [i for i in results.get("invocations", []) if i["jobs_run"]]
    if not parts:
        return "no jobs run"
    total = sum(i["seconds"] for i in parts)
    where = "; ".join(
        f"{i['jobs_run']} jobs in {i['seconds']:.0f} s on {i['machine']}, "
        f"{i['processes']} process(es) × {i['threads']} thread(s)"
        for i in parts
    )
    return f"{total:.0f} s of wall time ({where})"


def machine_name() -> str:
    import platform

    import torch

    if torch.cuda.is_available():
        return torch.cuda.get_device_name(0)
    cpu = platform.processor() or platform.machine()
    info = Path("/proc/cpuinfo")
    if info.is_file():
        names = [ln.split(":", 1)[1].strip() for ln in info.read_text().splitlines()
                 if ln.startswith("model name")]  # fmt: skip
        cpu = names[0] if names else cpu
    return f"{cpu} CPU, {os.cpu_count()} cores"


# ----------------------------------------------------------------------------- report


def _curves(run: Path) -> list[dict]:
    rows = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    keep = ("step", "loss", "accuracy_cond", "accuracy_uncond", "logp_proxy")
    return [{k: r.get(k) for k in keep} for r in rows]


def collect(out: Path, seeds: list[int], budget: Budget, names: list[str]) -> dict:
    """results.json from the jobs' files: base rewards, and per run and seed the rewards, the
    preference evaluation and the training curves."""
    results: dict = {"settings": _settings(seeds, budget, names), "runs": {}}
    results["base"] = json.loads((out / "rewards" / "base.json").read_text())
    for seed in seeds:
        pref = json.loads((out / "preference" / f"s{seed}" / "preference.json").read_text())
        pref = pref["models"]
        for name in report_rows(names):
            entry = results["runs"].setdefault(name, {"seeds": {}})
            rew = json.loads((out / "rewards" / f"{name}-s{seed}.json").read_text())
            s: dict = {"rewards": rew}
            if name in RUNS:
                s["curves"] = _curves(out / "runs" / f"{name}-s{seed}")
                s["preference"] = pref[name]
            else:  # the merged negative model's own accuracy (the papers' measure)
                s["preference"] = pref["npo_merged"]
            entry["seeds"][str(seed)] = s
    return results


def _ms(values: list[float], digits: int = 3) -> str:
    if not values:
        return "n/a"
    if len(values) == 1:
        return f"{values[0]:.{digits}f}"
    return f"{statistics.mean(values):.{digits}f} ± {statistics.stdev(values):.{digits}f}"


def results_table(results: dict) -> str:
    """Markdown, mean ± std over seeds: (1) reward under CFG per scale for training / held-out
    prompts; (2) at the largest scale the sharpness component and the share of good images,
    implicit accuracy of both branches on held-out pairs, the winner log-likelihood proxy."""
    st = results["settings"]
    b = st["budget"]
    scales = b["scales"]
    top = f"{max(scales):g}"
    lines = [
        f"Small world comparison: {b['steps']} steps per run, "
        f"seeds {st['seeds']}; rewards of {b['eval_train']} training + {b['eval_heldout']} "
        f"held-out prompts × {b['eval_seeds']} noise seed(s), DDIM {b['sample_steps']}; "
        f"accuracy on {b['pref_pairs'] or 'all'} held-out pairs × {b['pref_timesteps']} "
        f"timestep(s). {wall_time(results)}.",
        "",
        "| run | " + " | ".join(f"reward CFG {g:g} (train / held-out)" for g in scales) + " |",
        "|---|" + "---|" * len(scales),
    ]
    base = results["base"]["scales"]
    lines.append(
        "| base | "
        + " | ".join(
            f"{base[f'{g:g}']['train']['reward']:.3f} / {base[f'{g:g}']['heldout']['reward']:.3f}"
            for g in scales
        )
        + " |"
    )
    rows = list(results["runs"].items())
    for name, entry in rows:
        seeds = list(entry["seeds"].values())
        cells = []
        for g in scales:
            r = [s["rewards"]["scales"][f"{g:g}"] for s in seeds]
            cells.append(
                f"{_ms([x['train']['reward'] for x in r])} / "
                f"{_ms([x['heldout']['reward'] for x in r])}"
            )
        lines.append(f"| {name} | " + " | ".join(cells) + " |")
    lines += [
        "",
        f"| run | sharpness CFG {top} | good CFG {top} | acc. cond. branch (normal labels) | "
        "acc. null branch (reversed labels) | winner log-lik. proxy −m_w |",
        "|---|---|---|---|---|---|",
        f"| base | {base[top]['all']['sharpness']:.3f} | {base[top]['all']['good']:.3f} | "
        "0.5 (ref.) | 0.5 (ref.) | 0 (ref.) |",
    ]
    for name, entry in rows:
        seeds = list(entry["seeds"].values())
        cells = [
            _ms([s["rewards"]["scales"][top]["all"]["sharpness"] for s in seeds]),
            _ms([s["rewards"]["scales"][top]["all"]["good"] for s in seeds]),
        ]
        for key in ("accuracy_pos", "accuracy_neg"):
            cells.append(_ms([s["preference"][key]["value"] for s in seeds]))
        cells.append(
            _ms([1e3 * s["preference"]["winner_logp_proxy"]["value"] for s in seeds], 2) + " e-3"
        )
        lines.append(f"| {name} | " + " | ".join(cells) + " |")
    note = "Accuracy and −m_w: `snpo eval` on held-out pairs, unweighted (the ELBO run too)."
    if NPO_MERGED in results["runs"]:
        note += (
            f" `{NPO_MERGED}`: the dpo run sampled with the Diffusion-NPO merge (α = β = 1) of "
            "the npo run as CFG's null branch; its accuracy columns are the merged negative "
            "model's."
        )
    lines += ["", note]
    return "\n".join(lines) + "\n"


def plot_curves(results: dict, path: Path) -> Path:
    """Training curves (mean over seeds, running mean over ~5 % of training): winner
    log-likelihood proxy, accuracy of the conditional and of the null-prompt branch."""
    import math

    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    keys = ("logp_proxy", "accuracy_cond", "accuracy_uncond")
    fig, axes = plt.subplots(1, 3, figsize=(16, 4.5))
    for name, entry in results["runs"].items():
        curves = [s["curves"] for s in entry["seeds"].values() if "curves" in s]
        if not curves:
            continue
        n = min(len(c) for c in curves)
        steps = [r["step"] for r in curves[0][:n]]
        for ax, key in zip(axes, keys):
            vals = []
            for i in range(n):
                xs = [c[i][key] for c in curves if c[i][key] is not None]
                vals.append(statistics.mean(xs) if xs else math.nan)
            w = max(1, n // 20)
            smooth = []
            for i in range(n):
                xs = [v for v in vals[max(0, i - w + 1) : i + 1] if not math.isnan(v)]
                smooth.append(statistics.mean(xs) if xs else math.nan)
            ax.plot(steps, smooth, label=name)
    titles = {
        "logp_proxy": "winner log-lik. proxy −m_w (batch; snpo_elbo: × T·ω(t))",
        "accuracy_cond": "implicit accuracy, conditional branch",
        "accuracy_uncond": "implicit accuracy, null branch (its labels)",
    }
    for ax, key in zip(axes, keys):
        ax.set_title(titles[key])
        ax.set_xlabel("step")
    axes[0].legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path


def write_grid(
    out: Path, seed: int, budget: Budget, path: Path, names: list[str], rows: int = 8
) -> Path:
    """Samples of the first ``rows`` evaluation images at the largest scale: base and every run
    of ``seed`` side by side (same prompts, same noise)."""
    from safetensors.torch import load_file

    from snpo.data import contact_sheet
    from snpo.world.demo import eval_prompts

    key = f"{max(budget.scales):g}"
    names = ["base", *report_rows(names)]
    files = {"base": out / "rewards" / "base.json"}
    files.update({n: out / "rewards" / f"{n}-s{seed}.json" for n in names[1:]})
    images = {n: load_file(samples_path(f))[key] for n, f in files.items()}
    labels = [
        f"{p.text}{' (held out)' if p.heldout else ''}"
        for p in eval_prompts(budget.eval_train, budget.eval_heldout)
        for _ in range(budget.eval_seeds)
    ]
    rows = min(rows, len(labels))
    picks = list(range(rows // 2)) + list(range(len(labels) - (rows - rows // 2), len(labels)))
    sheet = contact_sheet(
        [[images[n][i] for n in names] for i in picks],
        col_labels=names,
        row_labels=[labels[i] for i in picks],
        title=f"CFG {key}, seed {seed}: every objective on the same prompts and noise",
        tile_size=48,
    )
    sheet.save(path)
    return path
