"""The reward-validation figure (matplotlib): images of the world titled with their reward."""

from __future__ import annotations

from pathlib import Path

import torch

from .reward import reward_components
from .vocab import Prompt


def save_scored_figure(
    columns: dict[str, torch.Tensor], prompts: list[Prompt], path: str | Path
) -> Path:
    """A figure: one row per prompt, one column per named image set, each image titled with
    its reward (and the column's mean reward in the header)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    names = list(columns)
    n = len(prompts)
    fig, axes = plt.subplots(
        n, len(names), figsize=(1.25 * len(names), 1.3 * n + 0.4), squeeze=False
    )
    for j, name in enumerate(names):
        r = reward_components(columns[name], prompts)["reward"]
        for i in range(n):
            ax = axes[i, j]
            ax.imshow(
                columns[name][i].permute(1, 2, 0).clamp(0, 1).numpy(), interpolation="nearest"
            )
            ax.set_xticks([])
            ax.set_yticks([])
            head = f"{name}\nmean {r.mean():.2f}\n" if i == 0 else ""
            ax.set_title(f"{head}{r[i]:.2f}", fontsize=7, pad=2)
            if j == 0:
                ax.set_ylabel(prompts[i].text[2:], fontsize=6)
    fig.tight_layout()
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path
