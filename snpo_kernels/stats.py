"""Training statistics of the contract, computed from per-sample errors (no extra pass).

- implicit accuracy: fraction of pairs with m_a < m_b (ties count one half) under each pair's
  own labels (a, b after swap), per branch: conditional and null-prompt. The branch is the
  ``uncond`` mask when given (the trainer passes the drawn branch), else ``swap`` (the two agree
  for the Diff-SNPO presets; for DPO the null branch keeps normal labels and is not swapped).
- winner log-likelihood proxy: mean of −m_a over the preferred samples.
- nonfinite: the number of pairs with a non-finite e_θ, e_ref or weight (NaN / inf). The loss
  of such a pair is NaN too (:func:`snpo_kernels.preference_loss` sets it, whatever the
  backend), so a trainer's non-finite-loss guard skips the step instead of training on a loss
  that an infinite error made 0 (λ < 1 bounds the loser's margin; λ = 1 saturates it).
Each branch's statistics are computed over that branch's pairs only (masked selection, not a
multiplication by 0): a NaN in one branch does not leak into the other.
All results are tensors on the input's device (no host synchronisation).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from .reference import preferred_rejected
from .validation import check_pair_mask


@dataclass
class PreferenceStats:
    """Per-micro-batch statistics. Means over an empty branch are NaN (its count is 0)."""

    accuracy_cond: torch.Tensor
    accuracy_uncond: torch.Tensor
    count_cond: torch.Tensor
    count_uncond: torch.Tensor
    logp_proxy: torch.Tensor
    logp_proxy_cond: torch.Tensor
    logp_proxy_uncond: torch.Tensor
    nonfinite: torch.Tensor

    def as_dict(self) -> dict[str, float]:
        """Python floats (this synchronises: call it when logging, not inside the step)."""
        return {k: float(v) for k, v in vars(self).items()}

    def sums(self) -> torch.Tensor:
        """(7,) float64 of additive quantities, in :data:`SUM_FIELDS` order: per-branch counts,
        Σ correct and Σ (−m_a), and the non-finite count. Add them over micro-batches and
        reduce over ranks in one collective (``dist.all_reduce(t)``), then
        :func:`stats_from_sums`. No host synchronisation."""

        def total(mean: torch.Tensor, count: torch.Tensor) -> torch.Tensor:
            return torch.where(count > 0, mean * count, torch.zeros_like(mean))

        c, u = self.count_cond, self.count_uncond
        return torch.stack(
            [
                c,
                u,
                total(self.accuracy_cond, c),
                total(self.accuracy_uncond, u),
                total(self.logp_proxy_cond, c),
                total(self.logp_proxy_uncond, u),
                self.nonfinite,
            ]
        ).to(torch.float64)


SUM_FIELDS = (
    "count_cond",
    "count_uncond",
    "correct_cond",
    "correct_uncond",
    "logp_sum_cond",
    "logp_sum_uncond",
    "nonfinite",
)


def stats_from_sums(sums: torch.Tensor) -> dict[str, float]:
    """Means from (summed) :meth:`PreferenceStats.sums`: accuracy_cond/uncond and
    logp_proxy_cond/uncond = Σ/count, logp_proxy over both branches, the counts and nonfinite.
    A branch with count 0 is left out (no key, never NaN). Synchronises (Python floats)."""
    if not isinstance(sums, torch.Tensor) or sums.shape != (len(SUM_FIELDS),):
        raise ValueError(
            f"sums must be a tensor of shape ({len(SUM_FIELDS)},) from PreferenceStats.sums(), "
            f"got {getattr(sums, 'shape', type(sums).__name__)}"
        )
    v = dict(zip(SUM_FIELDS, sums.detach().double().cpu().tolist(), strict=True))
    out = {"count_cond": v["count_cond"], "count_uncond": v["count_uncond"]}
    for b in ("cond", "uncond"):
        n = v[f"count_{b}"]
        if n > 0:
            out[f"accuracy_{b}"] = v[f"correct_{b}"] / n
            out[f"logp_proxy_{b}"] = v[f"logp_sum_{b}"] / n
    n = v["count_cond"] + v["count_uncond"]
    if n > 0:
        out["logp_proxy"] = (v["logp_sum_cond"] + v["logp_sum_uncond"]) / n
    out["nonfinite"] = v["nonfinite"]
    return out


def _masked_mean(values: torch.Tensor, mask: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Mean of ``values`` where ``mask`` (bool), and the count; values outside the mask are
    never read into the sum (torch.where, not values·mask: NaN·0 is NaN)."""
    count = mask.sum().to(values.dtype)
    return torch.where(mask, values, torch.zeros_like(values)).sum() / count, count


def nonfinite_pairs(
    e_theta: torch.Tensor, e_ref: torch.Tensor, weight: torch.Tensor | float | None = None
) -> torch.Tensor:
    """(P,) bool: pairs with a non-finite e_θ or e_ref in either sample, or a non-finite weight
    (e_theta, e_ref: (2P,)). No host synchronisation."""
    ok = torch.isfinite(e_theta) & torch.isfinite(e_ref)
    first, second = ok.chunk(2)
    ok = first & second
    if isinstance(weight, torch.Tensor):
        ok = ok & torch.isfinite(weight.detach()).to(ok.device)
    return ~ok


def preference_stats(
    e_theta: torch.Tensor,
    e_ref: torch.Tensor,
    swap: torch.Tensor | None = None,
    weight: torch.Tensor | float | None = None,
    uncond: torch.Tensor | None = None,
) -> PreferenceStats:
    """Statistics from e_θ, e_ref (each (2P,)), swap (P,) bool, weight (P,) or scalar and the
    null-prompt branch mask uncond (P,) bool (default: swap)."""
    e_theta = e_theta.detach().to(torch.float64)
    e_ref = e_ref.detach().to(torch.float64)
    margin = e_theta - e_ref
    m_a, m_b = preferred_rejected(margin, swap)
    if weight is not None:
        w = weight.detach().to(torch.float64) if isinstance(weight, torch.Tensor) else weight
        m_a, m_b = w * m_a, w * m_b
    correct = (m_a < m_b).to(torch.float64) + 0.5 * (m_a == m_b).to(torch.float64)
    if uncond is not None:
        check_pair_mask("uncond", uncond, m_a.shape[0], e_theta.device)
    branch = uncond if uncond is not None else swap
    if branch is None:
        branch = torch.zeros_like(m_a, dtype=torch.bool)
    uncond = branch
    cond = ~uncond
    acc_c, n_c = _masked_mean(correct, cond)
    acc_u, n_u = _masked_mean(correct, uncond)
    lp_c, _ = _masked_mean(-m_a, cond)
    lp_u, _ = _masked_mean(-m_a, uncond)
    bad = nonfinite_pairs(e_theta, e_ref, weight).sum().to(torch.float64)
    return PreferenceStats(acc_c, acc_u, n_c, n_u, (-m_a).mean(), lp_c, lp_u, bad)
