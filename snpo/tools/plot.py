"""``snpo plot``: training curves of one or more runs in one PNG.

    snpo plot runs/dpo runs/snpo [--out plot.png] [--smooth 0.9]

Each RUN is a trainer output folder holding ``metrics.jsonl`` (or that file itself). Four panels
against the optimizer step, one line per run: the loss; the implicit accuracy of each branch
(``accuracy_cond`` solid, ``accuracy_uncond`` dashed: the null-prompt branch); the winner
log-likelihood proxy ``logp_proxy`` (−m_w: higher is likelier); and the gradient norm. A null
value (a mean over nothing: no pair of the step on that branch, or no norm reported) and NaN are
skipped, not drawn as zero; torn lines (a run killed mid-write) are skipped with a warning.
``--smooth w`` (0 ≤ w < 1, TensorBoard's slider) draws the debiased exponential moving average
of each series over the raw values, which stay as a faint line.
"""

from __future__ import annotations

import argparse
import math
import sys
import warnings
from pathlib import Path

from snpo.metrics_file import METRICS_FILE, read_records

# (panel title, [(metrics.jsonl key, line style)])
PANELS = (
    ("loss", [("loss", "-")]),
    ("implicit accuracy (solid: cond, dashed: null branch)", [
        ("accuracy_cond", "-"),
        ("accuracy_uncond", "--"),
    ]),
    ("winner log-likelihood proxy (−m_w)", [("logp_proxy", "-")]),
    ("gradient norm", [("grad_norm", "-")]),
)  # fmt: skip


class PlotError(RuntimeError):
    """A run that cannot be plotted (the message names it)."""


def metrics_file(run: str | Path) -> Path:
    """``run``/metrics.jsonl, or ``run`` when it is that file; PlotError when absent."""
    p = Path(run)
    f = p if p.is_file() else p / METRICS_FILE
    if not f.is_file():
        raise PlotError(
            f"{run}: no {METRICS_FILE} (give a trainer output folder, or the file itself)"
        )
    return f


def read_run(run: str | Path) -> list[dict]:
    """The records of a run's metrics.jsonl in file order (torn lines skipped with a warning)."""
    f = metrics_file(run)
    out, torn = read_records(f)
    if torn:
        warnings.warn(f"{f}: skipped {torn} unreadable line(s)", stacklevel=2)
    return out


def series(records: list[dict], key: str) -> tuple[list[float], list[float]]:
    """(steps, values) of ``key``, leaving out records where it is null, NaN or absent."""
    xs, ys = [], []
    for r in records:
        v = r.get(key)
        if isinstance(v, bool) or not isinstance(v, (int, float)) or not math.isfinite(v):
            continue
        xs.append(float(r["step"]))
        ys.append(float(v))
    return xs, ys


def smooth(ys: list[float], weight: float) -> list[float]:
    """Debiased exponential moving average, as TensorBoard's smoothing:
    m_k = w·m_{k−1} + (1 − w)·y_k with m_0 = 0, reported as m_k / (1 − w^k). w = 0 → ys."""
    if not 0.0 <= weight < 1.0:
        raise PlotError(f"--smooth must be in [0, 1), got {weight}")
    out, m = [], 0.0
    for k, y in enumerate(ys, start=1):
        m = weight * m + (1.0 - weight) * y
        out.append(m / (1.0 - weight**k))
    return out


def run_label(run: str | Path) -> str:
    """A run's legend label: its folder name (the folder above metrics.jsonl for a file)."""
    p = Path(run)
    return (p.parent if p.is_file() else p).resolve().name or str(run)


def plot_runs(
    runs: list[str | Path], out: str | Path = "plot.png", *, smoothing: float = 0.0
) -> Path:
    """Draw the curves of ``runs`` (see the module docstring) into the PNG ``out``; with
    ``smoothing`` > 0 each line is :func:`smooth` of the raw values, drawn faintly beneath."""
    if not runs:
        raise PlotError("give at least one RUN folder")
    smooth([], smoothing)  # refuse a bad weight before reading anything
    data = [(run_label(r), read_run(r)) for r in runs]
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(2, 2, figsize=(11, 7.5), squeeze=False)
    colors = plt.rcParams["axes.prop_cycle"].by_key().get("color", ["C0"])
    for ax, (title, keys) in zip(axes.flat, PANELS):
        for i, (label, records) in enumerate(data):
            for key, style in keys:
                xs, ys = series(records, key)
                if xs:
                    name = label if len(keys) == 1 else f"{label} {key.split('_')[-1]}"
                    color = colors[i % len(colors)]
                    if smoothing > 0:
                        ax.plot(xs, ys, style, color=color, lw=0.6, alpha=0.25)
                        ys = smooth(ys, smoothing)
                    ax.plot(xs, ys, style, color=color, label=name, lw=1.2)
        ax.set_title(title, fontsize=10)
        ax.set_xlabel("step")
        ax.grid(alpha=0.3)
        if ax.lines:
            ax.legend(fontsize=8)
        else:
            ax.text(0.5, 0.5, "no values", ha="center", va="center", transform=ax.transAxes)
    fig.tight_layout()
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out, dpi=100, format="png")
    plt.close(fig)
    return out


def build_parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(prog="snpo plot", description=__doc__.splitlines()[0])
    ap.add_argument("runs", nargs="+", metavar="RUN", help="trainer output folders (metrics.jsonl)")
    ap.add_argument("--out", default="plot.png", help="the PNG to write (default plot.png)")
    ap.add_argument(
        "--smooth",
        type=float,
        default=0.0,
        metavar="W",
        help="TensorBoard-style smoothing weight in [0, 1) (default 0: raw values)",
    )
    return ap


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        out = plot_runs(args.runs, args.out, smoothing=args.smooth)
    except PlotError as err:
        print(f"snpo plot: error: {err}", file=sys.stderr)
        return 2
    print(f"snpo plot: {len(args.runs)} run(s) → {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
