"""The comparison in flow matching: dpo / bdpo / snpo_naive / snpo on the world's flow base.

    python -m snpo.world compare-flow [--out runs/compare-flow] [--budget default|evidence|quick]
                                      [--seeds 0 1 2] [--runs dpo snpo ...] [--steps N]
                                      [--beta B] [--jobs J]

The same protocol as :mod:`.compare` (every run is ``snpo.train`` on the flow base's own pairs,
``snpo/world/assets_flow/``; one reference-error cache per seed; the known reward of CFG
samples, Euler sampling; per-branch implicit accuracy on held-out pairs through ``snpo eval``),
with the flow family's σ draws instead of DDPM timesteps and β for velocity errors
(:data:`FLOW_BETA`, chosen by :func:`error_scale`; docs/world.md). Besides the tables of
:func:`snpo.world.compare.results_table` it reports the ε base's reward at the same budget and
the paired difference snpo − dpo per seed with a Student-t interval (:func:`paired_difference`),
and, as :mod:`.compare` does, ``paired.md`` and ``cfg_curve.png`` (:mod:`snpo.world.paired`:
every headline pair and each run against the flow base, all prompts, with the CFG curve).
"""

from __future__ import annotations

import math
import os
import statistics
import time
from dataclasses import asdict, replace
from pathlib import Path

from .alignment import write_config
from .compare import (
    BUDGETS,
    RUNS,
    SCALES,
    Budget,
    _log,
    _write_json,
    check_settings,
    collect,
    init_worker,
    job_cache,
    job_preference,
    job_rewards,
    job_train,
    machine_name,
    plot_curves,
    record_invocation,
    results_table,
    samples_path,
    write_paired,
)
from .jobs import Job, run_jobs

FLOW_RUNS = ("dpo", "bdpo", "snpo_naive", "snpo")
# β for velocity errors: the ε world's 2000 × (std of the reference's per-pair error
# difference e_w − e_l in the ε world / in the flow world), measured by error_scale
FLOW_BETA = 1000.0
FLOW_BUDGETS: dict[str, Budget] = {
    # what fits ~25 minutes of a contended 2-core CPU next to other work (docs/world.md)
    "default": Budget(40, 16, 16, 1, 20, SCALES, 256, 1),
    # the evidence runs: the default training, rewards along the whole CFG curve (as the ε
    # world's evidence budget; meant for ≥ 8 seeds of dpo, snpo_naive and snpo)
    "evidence": Budget(40, 16, 16, 1, 20, BUDGETS["evidence"].scales, 256, 1),
    "quick": BUDGETS["quick"],
}
T_975 = {1: 12.706, 2: 4.303, 3: 3.182, 4: 2.776, 5: 2.571, 6: 2.447, 7: 2.365, 8: 2.306}


def flow_assets() -> Path:
    from .flow import FLOW_ASSETS

    return FLOW_ASSETS


# ----------------------------------------------------------------------------- jobs


def job_rewards_flow(model: str, out: str, budget: dict) -> dict:
    """Known reward of Euler CFG samples of a flow model folder or export (as job_rewards)."""
    from safetensors.torch import save_file

    from snpo.models import load_any
    from snpo.world.demo import eval_prompts
    from snpo.world.evaluate import evaluate_model

    from .flow import SAMPLER

    out_path = Path(out)
    if out_path.is_file():
        return {"rewards": out, "skipped": True}
    b = Budget(**{**budget, "scales": tuple(budget["scales"])})
    m, _ = load_any(model)
    res = evaluate_model(
        m,
        prompts=eval_prompts(b.eval_train, b.eval_heldout),
        guidance_scales=b.scales,
        n_seeds=b.eval_seeds,
        steps=b.sample_steps,
        scheduler=SAMPLER,
        progress=False,
        return_images=True,
    )
    images = res.pop("images")
    out_path.parent.mkdir(parents=True, exist_ok=True)
    save_file({g: x.contiguous() for g, x in images.items()}, samples_path(out_path))
    _write_json(out_path, res)
    return {"rewards": out, "skipped": False}


def plan_flow(
    out: Path, seeds: list[int], budget: Budget, threads: int, beta: float, names: list[str]
) -> list[Job]:
    """Every job: the two bases' rewards, then per seed a cache, the runs, their rewards and
    the held-out preference evaluation."""
    from .demo import ASSETS

    assets = flow_assets()
    base, data = str(assets / "base"), str(assets / "pairs_train.parquet")
    b = asdict(budget)
    rewards = out / "rewards"
    jobs = [
        Job("rewards base", job_rewards_flow,
            dict(model=base, out=str(rewards / "base.json"), budget=b)),
        Job("rewards eps base", job_rewards,
            dict(base=str(ASSETS / "base"), export=None, negative=None,
                 out=str(rewards / "eps_base.json"), budget=b)),
    ]  # fmt: skip
    common = {"report_to": "none", "progress_bar": False, "beta": beta}
    for seed in seeds:
        runs, cache = out / "runs", out / f"cache-s{seed}"
        runs.mkdir(parents=True, exist_ok=True)
        cache_cfg = write_config(
            runs / f"cache-s{seed}.yaml", model=base, data=data, out=runs / f"cache-s{seed}",
            steps=budget.steps, seed=seed, overrides={**RUNS["dpo"], **common},
        )  # fmt: skip
        jobs.append(Job(f"cache s{seed}", job_cache,
                        dict(config=str(cache_cfg), cache=str(cache),
                             log=str(runs / f"cache-s{seed}.log"))))  # fmt: skip
        exports = {}
        for name in names:
            run = runs / f"{name}-s{seed}"
            cfg = write_config(
                runs / f"{name}-s{seed}.yaml", model=base, data=data, out=run, steps=budget.steps,
                seed=seed,
                overrides={**RUNS[name], **common, "ref_mode": "cache", "cache_dir": str(cache)},
            )  # fmt: skip
            exports[name] = str(run / "export")
            jobs.append(Job(f"train {name} s{seed}", job_train,
                            dict(config=str(cfg), run=str(run),
                                 log=str(runs / f"{name}-s{seed}.log"), threads=threads),
                            deps=(f"cache s{seed}",)))  # fmt: skip
            jobs.append(Job(f"rewards {name} s{seed}", job_rewards_flow,
                            dict(model=exports[name], budget=b,
                                 out=str(rewards / f"{name}-s{seed}.json")),
                            deps=(f"train {name} s{seed}",)))  # fmt: skip
        jobs.append(
            Job(f"preference s{seed}", job_preference,
                dict(base=base, models=exports, pairs=str(assets / "pairs_heldout.parquet"),
                     out=str(out / "preference" / f"s{seed}"), max_pairs=budget.pref_pairs,
                     timesteps=budget.pref_timesteps),
                deps=tuple(f"train {n} s{seed}" for n in names))
        )  # fmt: skip
    return jobs


# ----------------------------------------------------------------------------- statistics


def t_interval(values: list[float], confidence_t: dict[int, float] = T_975) -> dict:
    """Mean, sample std and the two-sided 95 % Student-t interval mean ± t_{n−1}·s/√n."""
    n = len(values)
    mean = statistics.mean(values)
    if n < 2:
        return {"n": n, "mean": mean, "std": math.nan, "half_width": math.nan, "ci": None}
    sd = statistics.stdev(values)
    half = confidence_t.get(n - 1, 1.96) * sd / math.sqrt(n)
    return {"n": n, "mean": mean, "std": sd, "half_width": half, "ci": [mean - half, mean + half]}


def paired_difference(results: dict, a: str = "snpo", b: str = "dpo") -> dict:
    """Per seed, reward(a) − reward(b) at every scale and split (the same seed's draws and
    cache), with :func:`t_interval` over the seeds."""
    runs = results["runs"]
    seeds = sorted(set(runs[a]["seeds"]) & set(runs[b]["seeds"]), key=int)
    out: dict = {"a": a, "b": b, "seeds": seeds, "scales": {}}
    for g in results["settings"]["budget"]["scales"]:
        key = f"{g:g}"
        out["scales"][key] = {}
        for split in ("train", "heldout"):
            diffs = [
                runs[a]["seeds"][s]["rewards"]["scales"][key][split]["reward"]
                - runs[b]["seeds"][s]["rewards"]["scales"][key][split]["reward"]
                for s in seeds
            ]
            out["scales"][key][split] = {"per_seed": diffs, **t_interval(diffs)}
    return out


def paired_table(diff: dict, eps_base: dict, base: dict) -> str:
    """Markdown: the ε base next to the flow base, and the paired difference a − b."""
    lines = ["| base (same evaluation) | "
             + " | ".join(f"reward CFG {g} (train / held-out)" for g in diff["scales"]) + " |",
             "|---|" + "---|" * len(diff["scales"])]  # fmt: skip
    for name, r in (("ε base (DDIM)", eps_base), ("flow base (Euler)", base)):
        cells = [f"{r['scales'][g]['train']['reward']:.3f} / "
                 f"{r['scales'][g]['heldout']['reward']:.3f}" for g in diff["scales"]]  # fmt: skip
        lines.append(f"| {name} | " + " | ".join(cells) + " |")
    n = len(diff["seeds"])
    lines += [
        "",
        f"Paired difference {diff['a']} − {diff['b']} of the reward (same seed: same draws, "
        f"same cache), {n} seeds, 95 % Student-t interval (t with {n - 1} df):",
        "",
        "| CFG | split | per seed | mean | 95 % interval (± half-width) |",
        "|---|---|---|---|---|",
    ]
    for g, splits in diff["scales"].items():
        for split, d in splits.items():
            per = ", ".join(f"{x:+.4f}" for x in d["per_seed"])
            ci = "n/a" if d["ci"] is None else (
                f"[{d['ci'][0]:+.4f}, {d['ci'][1]:+.4f}] (± {d['half_width']:.4f})")  # fmt: skip
            lines.append(f"| {g} | {split} | {per} | {d['mean']:+.4f} | {ci} |")
    return "\n".join(lines) + "\n"


# ----------------------------------------------------------------------------- driver


def compare_flow(
    out: str | Path,
    *,
    seeds: list[int],
    budget: Budget,
    beta: float = FLOW_BETA,
    jobs: int | None = None,
    overwrite: bool = False,
    runs: list[str] | None = None,
) -> dict:
    """Plan, run (resuming) and report the flow comparison; returns results.json's dict.
    ``runs``: a subset of FLOW_RUNS (default all four), additive like the seeds."""
    from .compare import default_jobs

    out = Path(out)
    names = flow_run_names(runs)
    settings = {"seeds": list(seeds), "budget": asdict(budget), "beta": beta,
                "runs": {n: RUNS[n] for n in names}, "family": "flow_unet",
                "assets": str(flow_assets())}  # fmt: skip
    check_settings(out, settings, overwrite)
    out.mkdir(parents=True, exist_ok=True)
    _write_json(out / "settings.json", settings)
    workers = jobs or default_jobs()
    threads = max(1, (os.cpu_count() or 1) // workers)
    job_list = plan_flow(out, seeds, budget, threads, beta, names)
    t0 = time.perf_counter()
    _log(f"flow: {len(job_list)} jobs on {workers} process(es) × {threads} thread(s) → {out}")

    def on_event(kind: str, job: Job, secs: float, done: int, total: int) -> None:
        if kind == "done":
            _log(f"{done}/{total} done at {time.perf_counter() - t0:.0f} s: {job.key} "
                 f"({secs:.0f} s)")  # fmt: skip

    done = run_jobs(job_list, workers=workers, on_event=on_event, initializer=init_worker,
                    initargs=(threads,))  # fmt: skip
    ran = sum(not r["skipped"] for r in done.values())
    invocations = record_invocation(out, {
        "seconds": round(time.perf_counter() - t0, 1), "jobs_run": ran,
        "jobs_skipped": len(done) - ran, "machine": machine_name(), "processes": workers,
        "threads": threads})  # fmt: skip
    results = collect(out, seeds, budget, names)
    results["settings"] |= {"beta": beta, "family": "flow_unet"}
    results["invocations"] = invocations
    import json

    results["eps_base"] = json.loads((out / "rewards" / "eps_base.json").read_text())
    pair = "snpo" in names and "dpo" in names and len(seeds)
    results["paired"] = paired_difference(results) if pair else {}
    _write_json(out / "results.json", results)
    text = results_table(results).replace("Small world comparison", "Small world, flow matching")
    text = text.replace("noise seed(s), DDIM", "noise seed(s), Euler (ε base: DDIM)")
    text += f"\nβ = {beta:g} (velocity errors; the ε world uses 2000).\n\n"
    if pair:
        text += paired_table(results["paired"], results["eps_base"], results["base"])
    (out / "results.md").write_text(text)
    plot_curves(results, out / "curves.png")
    write_paired(out, results, names)  # paired.md, cfg_curve.png (snpo.world.paired)
    return results


def flow_run_names(runs: list[str] | None) -> list[str]:
    """The flow runs asked for, in FLOW_RUNS' order (all four by default)."""
    if not runs:
        return list(FLOW_RUNS)
    unknown = [r for r in runs if r not in FLOW_RUNS]
    if unknown:
        raise SystemExit(f"unknown flow run(s) {unknown}; choose from {list(FLOW_RUNS)}")
    return [n for n in FLOW_RUNS if n in runs]


def budget_for(name: str, steps: int | None) -> Budget:
    b = FLOW_BUDGETS[name]
    return b if steps is None else replace(b, steps=steps)


# ----------------------------------------------------------------------------- β check


def error_scale(model_dir: str, pairs: str, n: int = 256, seed: int = 0) -> dict:
    """The reference's per-sample errors on ``n`` pairs at the training draws (uncond_prob 0):
    mean e (winners and losers) and std of the per-pair difference e_w − e_l. The loss sees
    β·(margin differences), so β scaled by the inverse ratio of the std between two worlds
    gives the same sigmoid argument at the start of training."""
    import itertools

    import torch

    from snpo.draws import pair_draws
    from snpo.models import encode_prompts, load_model, null_embedding
    from snpo.step import EncodedBatch, StepModels, reference_errors, unet_fn

    from .pickapic import iter_pairs

    model = load_model(model_dir)
    pairs_ = list(itertools.islice(iter_pairs(pairs), n))
    w = torch.stack([p.winner for p in pairs_]) * 2 - 1
    lo = torch.stack([p.loser for p in pairs_]) * 2 - 1
    errs = []
    for start in range(0, len(pairs_), 64):
        rows = list(range(start, min(start + 64, len(pairs_))))
        models = StepModels(model, None, unet_fn(model.unet, model.spec), null_embedding(model),
                            torch.device("cpu"), torch.float32)  # fmt: skip
        batch = EncodedBatch(torch.cat([w[rows], lo[rows]]),
                             encode_prompts(model, [pairs_[i].caption for i in rows]))  # fmt: skip
        d = pair_draws(seed, 0, rows, tuple(w.shape[1:]), model.scheduler, uncond_prob=0.0)
        e = reference_errors(models, batch, d)
        errs.append(e.reshape(2, -1))
    e = torch.cat(errs, dim=1).double()
    return {"pairs": e.shape[1], "mean_error": float(e.mean()),
            "std_diff": float((e[0] - e[1]).std()), "family": model.family}  # fmt: skip
