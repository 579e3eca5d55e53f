"""Paired statistics of a world comparison: every run shares its seed's base, data, noise and
evaluation prompts with the other runs of that seed, so a claim "A beats B" rests on the per-seed
differences d_s = metric(A, s) − metric(B, s), not on two means ± std.

For n seeds, the mean difference and its 95 % t-interval over seeds:

    d̄ = (1/n) Σ_s d_s,   s_d² = Σ_s (d_s − d̄)² / (n − 1),   d̄ ± t_{0.975, n−1} · s_d / √n

The base model is one fixed network evaluated with fixed noise, so "against the base" is the
same interval with the base's (seed-independent) value subtracted. A claim is *reproduced* only
when its interval excludes 0 in the claimed direction.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path

# two-sided 95 % quantiles of Student's t, t_{0.975, df}
T975 = {
    1: 12.706, 2: 4.303, 3: 3.182, 4: 2.776, 5: 2.571, 6: 2.447, 7: 2.365, 8: 2.306, 9: 2.262,
    10: 2.228, 11: 2.201, 12: 2.179, 13: 2.160, 14: 2.145, 15: 2.131, 16: 2.120, 17: 2.110,
    18: 2.101, 19: 2.093, 20: 2.086, 25: 2.060, 30: 2.042, 40: 2.021, 60: 2.000, 120: 1.980,
}  # fmt: skip


def t975(df: int) -> float:
    """t_{0.975, df}; between tabulated df the next smaller one (a slightly wider interval)."""
    if df < 1:
        raise ValueError(f"a t-interval needs at least 2 values (df ≥ 1), got df {df}")
    return T975[max(k for k in T975 if k <= df)]


@dataclass(frozen=True)
class Interval:
    """Mean of n values and its 95 % t-interval [lo, hi]."""

    mean: float
    lo: float
    hi: float
    n: int

    @property
    def excludes_zero(self) -> bool:
        return self.lo > 0 or self.hi < 0

    def text(self, scale: float = 1.0, digits: int = 3) -> str:
        m, lo, hi = (scale * v for v in (self.mean, self.lo, self.hi))
        mark = " *" if self.excludes_zero else ""
        return f"{m:+.{digits}f} [{lo:+.{digits}f}, {hi:+.{digits}f}]{mark}"


def t_interval(values: list[float]) -> Interval:
    """The mean of ``values`` and its 95 % t-interval (see the module docstring)."""
    n = len(values)
    if n < 2:
        raise ValueError(f"a t-interval needs at least 2 values, got {n}")
    mean = sum(values) / n
    sd = math.sqrt(sum((v - mean) ** 2 for v in values) / (n - 1))
    half = t975(n - 1) * sd / math.sqrt(n)
    return Interval(mean, mean - half, mean + half, n)


def _reward(entry: dict, scale: str, split: str, metric: str) -> float:
    return float(entry["rewards"]["scales"][scale][split][metric])


def per_seed(
    results: dict, run: str, against: str, scale: float, *, split="all", metric="reward"
) -> dict[str, float]:
    """{seed: metric(run) − metric(against)} at guidance ``scale`` over the seeds both have;
    ``against`` = "base" subtracts the base model's value."""
    key = f"{scale:g}"
    a = results["runs"][run]["seeds"]
    if against == "base":
        b0 = float(results["base"]["scales"][key][split][metric])
        return {s: _reward(e, key, split, metric) - b0 for s, e in a.items()}
    b = results["runs"][against]["seeds"]
    return {s: _reward(e, key, split, metric) - _reward(b[s], key, split, metric)
            for s, e in a.items() if s in b}  # fmt: skip


def per_seed_preference(results: dict, run: str, against: str, key: str) -> dict[str, float]:
    """{seed: preference[key](run) − preference[key](against)} (implicit accuracies, −m_w)."""
    a = results["runs"][run]["seeds"]
    b = results["runs"][against]["seeds"]
    return {
        s: float(e["preference"][key]["value"]) - float(b[s]["preference"][key]["value"])
        for s, e in a.items()
        if s in b and "preference" in e and "preference" in b[s]
    }


def scales_of(results: dict) -> list[float]:
    return [float(g) for g in results["settings"]["budget"]["scales"]]


def paired_table(results: dict, pairs: list[tuple[str, str]], *, split: str = "all") -> str:
    """Markdown: for each (run, against) the per-scale mean paired reward difference with its
    95 % t-interval over seeds (* = excludes 0), and the seed count."""
    scales = scales_of(results)
    lines = [
        "| difference (reward, " + split + " prompts) | seeds | "
        + " | ".join(f"CFG {g:g}" for g in scales) + " |",
        "|---|---|" + "---|" * len(scales),
    ]  # fmt: skip
    for run, against in pairs:
        if run not in results["runs"] or (against != "base" and against not in results["runs"]):
            continue
        cells, n = [], 0
        for g in scales:
            d = per_seed(results, run, against, g, split=split)
            if len(d) < 2:
                cells.append("—")
                continue
            iv = t_interval(list(d.values()))
            n = iv.n
            cells.append(iv.text())
        lines.append(f"| {run} − {against} | {n} | " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def preference_table(results: dict, pairs: list[tuple[str, str]]) -> str:
    """Markdown: paired differences of the held-out implicit accuracies and −m_w (×10³)."""
    keys = (
        ("accuracy_pos", "acc. cond.", 1.0),
        ("accuracy_neg", "acc. null (reversed)", 1.0),
        ("winner_logp_proxy", "−m_w ×10³", 1e3),
    )
    lines = [
        "| difference | seeds | " + " | ".join(label for _, label, _ in keys) + " |",
        "|---|---|" + "---|" * len(keys),
    ]
    for run, against in pairs:
        if run not in results["runs"] or against not in results["runs"]:
            continue
        cells, n = [], 0
        for key, _, scale in keys:
            d = per_seed_preference(results, run, against, key)
            if len(d) < 2:
                cells.append("—")
                continue
            iv = t_interval(list(d.values()))
            n = iv.n
            cells.append(iv.text(scale=scale, digits=3 if scale == 1.0 else 1))
        lines.append(f"| {run} − {against} | {n} | " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def cfg_curve(results: dict, run: str, *, split="all", metric="reward") -> list[tuple]:
    """[(scale, mean, lo, hi)] of ``metric`` over seeds along the CFG scales (the base: its one
    value, lo = hi = mean)."""
    out = []
    for g in scales_of(results):
        key = f"{g:g}"
        if run == "base":
            v = float(results["base"]["scales"][key][split][metric])
            out.append((g, v, v, v))
            continue
        vals = [_reward(e, key, split, metric) for e in results["runs"][run]["seeds"].values()]
        if len(vals) >= 2:
            iv = t_interval(vals)
            out.append((g, iv.mean, iv.lo, iv.hi))
        elif vals:
            out.append((g, vals[0], vals[0], vals[0]))
    return out


def cfg_curve_table(results: dict, runs: list[str], *, split: str = "all") -> str:
    """Markdown: reward, sharpness and the "good" fraction (mean over seeds) along the scales."""
    scales = scales_of(results)
    lines = [
        "| run | metric | " + " | ".join(f"CFG {g:g}" for g in scales) + " |",
        "|---|---|" + "---|" * len(scales),
    ]
    for run in ["base", *runs]:
        if run != "base" and run not in results["runs"]:
            continue
        for metric in ("reward", "sharpness", "good"):
            pts = cfg_curve(results, run, split=split, metric=metric)
            lines.append(
                f"| {run} | {metric} | " + " | ".join(f"{m:.3f}" for _, m, _, _ in pts) + " |"
            )
    return "\n".join(lines) + "\n"


def plot_cfg_curve(results: dict, runs: list[str], path: str | Path, *, split="all") -> Path:
    """Reward against the guidance scale, one line per run with its 95 % interval over seeds."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(10, 3.8))
    for ax, metric in zip(axes, ("reward", "sharpness"), strict=True):
        for run in ["base", *runs]:
            if run != "base" and run not in results["runs"]:
                continue
            pts = cfg_curve(results, run, split=split, metric=metric)
            g = [p[0] for p in pts]
            ax.plot(g, [p[1] for p in pts], marker="o", label=run,
                    linestyle="--" if run == "base" else "-")  # fmt: skip
            if run != "base":
                ax.fill_between(g, [p[2] for p in pts], [p[3] for p in pts], alpha=0.15)
        ax.set_xlabel("guidance scale")
        ax.set_ylabel(f"{metric} ({split} prompts)")
        ax.grid(alpha=0.3)
    n = max((len(results["runs"][r]["seeds"]) for r in runs if r in results["runs"]), default=0)
    axes[0].legend(fontsize=8)
    fig.suptitle(f"the CFG curve: mean and 95 % t-interval over {n} seeds", fontsize=10)
    fig.tight_layout()
    path = Path(path)
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


HEADLINE = [("snpo", "dpo"), ("snpo_naive", "dpo"), ("snpo", "snpo_naive")]
# the CFG 1 study (docs/world.md, "The CFG 1 cost"): which pairs separate its hypotheses
STUDY = [
    ("dpo_nonull", "dpo"),  # what dpo's normal-label null-branch pairs add
    ("snpo_naive", "dpo_nonull"),  # what reversed null-branch pairs cost (λ 1 both)
    ("snpo", "dpo_nonull"),
    ("snpo_p0.05", "dpo_p0.05"),  # the snpo − dpo gap at p = 0.05
    ("snpo_p0.05", "snpo"),
    ("dpo_p0.05", "dpo"),
]
# (a − b) − (c − d) per seed: does the snpo − dpo gap change with p?
CONTRASTS = [(("snpo", "dpo"), ("snpo_p0.05", "dpo_p0.05"))]


def contrast_table(results: dict, contrasts: list[tuple], *, split: str = "all") -> str:
    """Markdown: per seed (a − b) − (c − d) of the reward at each scale, with its 95 %
    t-interval (a difference of two paired differences of the same seeds)."""
    scales = scales_of(results)
    lines = [
        "| difference of differences (reward) | seeds | "
        + " | ".join(f"CFG {g:g}" for g in scales) + " |",
        "|---|---|" + "---|" * len(scales),
    ]  # fmt: skip
    for (a, b), (c, d) in contrasts:
        if any(r not in results["runs"] for r in (a, b, c, d)):
            continue
        cells, n = [], 0
        for g in scales:
            d1, d2 = (
                per_seed(results, a, b, g, split=split),
                per_seed(results, c, d, g, split=split),
            )
            vals = [d1[s] - d2[s] for s in d1 if s in d2]
            if len(vals) < 2:
                cells.append("—")
                continue
            iv = t_interval(vals)
            n = iv.n
            cells.append(iv.text())
        lines.append(f"| ({a} − {b}) − ({c} − {d}) | {n} | " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def report(results: dict, runs: list[str]) -> str:
    """The paired-statistics section of a comparison's results (markdown)."""
    pairs = [p for p in HEADLINE if p[0] in runs and p[1] in runs]
    pairs += [p for p in STUDY if p[0] in runs and p[1] in runs]
    covered = {"dpo", "snpo", "snpo_naive"} | {a for a, _ in pairs}
    pairs += [(r, "dpo") for r in runs if r not in covered and "dpo" in runs]
    base_pairs = [(r, "base") for r in runs]
    contrasts = [c for c in CONTRASTS if all(r in runs for pair in c for r in pair)]
    extra = (
        "\nDoes the gap change with the null-branch probability p?\n\n"
        + contrast_table(results, contrasts)
        if contrasts
        else ""
    )
    return (
        "## Paired differences (95 % t-interval over seeds; * = the interval excludes 0)\n\n"
        + paired_table(results, pairs + base_pairs)
        + extra
        + "\nHeld-out implicit accuracy and winner log-likelihood proxy:\n\n"
        + preference_table(results, pairs)
        + "\n## The CFG curve (mean over seeds)\n\n"
        + cfg_curve_table(results, runs)
    )


# ----------------------------------------------------------------------------- merging


def merge_results(parts: list[dict], sources: list[str] | None = None) -> dict:
    """One results.json from comparisons that share their world, budget, alignment settings
    and base evaluation but hold other runs (e.g. committed runs and new ones of the same
    seeds): the union of the runs, each seed's entries as measured. Refuses parts whose
    settings (other than seeds and runs) or base rewards differ, and a run of the same name
    defined differently or measured differently at a seed both hold."""
    if not parts:
        raise ValueError("nothing to merge")
    sources = sources or [f"part {i}" for i in range(len(parts))]
    first = parts[0]

    def fixed(r: dict) -> dict:
        return {k: v for k, v in r["settings"].items() if k not in ("seeds", "runs")}

    out = {
        "settings": {**first["settings"], "seeds": [], "runs": {}},
        "runs": {},
        "base": first["base"],
        "invocations": [],
        "merged_from": list(sources),
    }
    seeds: set[int] = set()
    for part, src in zip(parts, sources, strict=True):
        if fixed(part) != fixed(first):
            diff = sorted(k for k in set(fixed(part)) | set(fixed(first))
                          if fixed(part).get(k) != fixed(first).get(k))  # fmt: skip
            raise ValueError(f"{src}: other settings than {sources[0]} ({', '.join(diff)})")
        if part["base"] != first["base"]:
            raise ValueError(f"{src}: another base evaluation than {sources[0]}")
        seeds |= set(part["settings"]["seeds"])
        for name, definition in part["settings"]["runs"].items():
            known = out["settings"]["runs"].setdefault(name, definition)
            if known != definition:
                raise ValueError(f"{src}: run {name} is defined otherwise ({definition} ≠ {known})")
        for name, entry in part["runs"].items():
            have = out["runs"].setdefault(name, {"seeds": {}})["seeds"]
            for seed, e in entry["seeds"].items():
                if seed in have and have[seed]["rewards"] != e["rewards"]:
                    raise ValueError(f"{src}: {name} seed {seed} differs from an earlier part")
                have.setdefault(seed, e)
        out["invocations"] += [{**i, "source": src} for i in part.get("invocations", [])]
    out["settings"]["seeds"] = sorted(seeds)
    return out


def write_merged(out: str | Path, results_files: list[str | Path]) -> dict:
    """Merge ``results_files`` (:func:`merge_results`) into ``out``: results.json, results.md,
    paired.md and cfg_curve.png, as ``compare`` writes them."""
    import json

    from snpo.atomic import atomic_write_text

    from .compare import results_table

    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    parts = [json.loads(Path(f).read_text()) for f in results_files]
    results = merge_results(parts, [str(f) for f in results_files])
    runs = list(results["runs"])
    atomic_write_text(out / "results.json", json.dumps(results, indent=1) + "\n")
    atomic_write_text(out / "results.md", results_table(results))
    if len(results["settings"]["seeds"]) >= 2:
        atomic_write_text(out / "paired.md", report(results, runs))
        plot_cfg_curve(results, runs, out / "cfg_curve.png")
    return results


def main(argv: list[str] | None = None) -> int:
    """``python -m snpo.world.paired OUT RESULTS.json [RESULTS.json ...]``: merge comparisons
    of the same seeds' world (see :func:`write_merged`) and report them."""
    import argparse

    ap = argparse.ArgumentParser(prog="python -m snpo.world.paired", description=main.__doc__)
    ap.add_argument("out", help="folder for the merged results.json, results.md, paired.md")
    ap.add_argument("results", nargs="+", help="results.json files of finished comparisons")
    args = ap.parse_args(argv)
    try:
        write_merged(args.out, args.results)
    except ValueError as err:
        raise SystemExit(f"cannot merge: {err}") from None
    print((Path(args.out) / "paired.md").read_text())
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
