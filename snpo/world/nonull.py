"""``python -m snpo.world.nonull --config C.yaml``: ``snpo.train`` with the null-prompt-branch
pairs' loss weight set to 0 (the CFG 1 study's control run ``dpo_nonull``, docs/world.md).

The pairs are drawn exactly as in any run of the same seed (a pair still goes to the null
branch with probability ``uncond_prob``), so the conditional pairs — their pairs, timesteps and
noise — are the same as in dpo and snpo; only the null-branch pairs contribute nothing. With
weight 0 both margins of such a pair are 0, z = 0 and its gradient coefficients are 0 (the mean
over the micro-batch still divides by all P pairs, as in dpo: the conditional pairs' gradients
are dpo's). The null-branch statistics of the training log are then meaningless (margins 0).

A world-only variant, done by wrapping :func:`snpo_kernels.preference_loss_with_stats` as
:mod:`snpo.step` calls it, in this process only; the trainer itself has no such option.
"""

from __future__ import annotations

import sys


def drop_null_pairs() -> None:
    """Make :func:`snpo.step.preference_step` weigh the null-branch pairs 0."""
    import torch

    import snpo.step as step

    original = step.preference_loss_with_stats
    if getattr(original, "_drops_null_pairs", False):
        return

    def dropped(*args, weight=None, uncond=None, **kwargs):
        if uncond is None:
            raise ValueError("snpo.world.nonull needs the branch mask (uncond)")
        keep = (~uncond.to(torch.bool)).to(torch.float32)
        if weight is not None:
            weight = weight * keep.to(weight.dtype)
        else:
            weight = keep
        return original(*args, weight=weight, uncond=uncond, **kwargs)

    dropped._drops_null_pairs = True  # type: ignore[attr-defined]
    step.preference_loss_with_stats = dropped


def main(argv: list[str] | None = None) -> int:
    drop_null_pairs()
    from snpo.train import main as train_main

    return train_main(argv)


if __name__ == "__main__":
    sys.exit(main())
