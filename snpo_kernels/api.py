"""Public API: :func:`preference_loss`, :func:`preference_loss_with_stats`, :class:`PreferenceLoss`.

The contract (``docs/objectives.md``), for P pairs in a (2P, ...) batch, winners first:

    e(i)  = (1/N) Σ_j (pred[i,j] − target[i,j])²          (float32 accumulation)
    m     = weight·(e_θ − e_ref)       (a, b) = preferred, rejected  (swapped where swap[k])
    m̃_b   = −log(λ·exp(−m_b) + 1 − λ)                      (Bounded-DPO mixture; = m_b at λ = 1)
    ℓ_k   = −log σ(−(β/2)·(m_a − m̃_b)),   loss = mean_k ℓ_k

Non-finite errors: ℓ_k is NaN when e_θ, e_ref or the weight of pair k is not finite (in
every backend, set here after the backend runs: no host synchronisation), so a
non-finite-loss guard sees it; without this, an infinite loser error would give ℓ_k = 0
(λ = 1 saturates σ, λ < 1 bounds m̃_b). ``PreferenceStats.nonfinite`` counts such pairs.

β: exactly one of ``beta`` (the Diffusion-DPO code's and diffusers' SDXL script's form
``-logsigmoid(-0.5·β·(model_diff − ref_diff))``) and ``beta_logit`` (diffusers' SD1.5 script's
and Diffusion-NPO's form ``-logsigmoid(β′·(ref_diff − model_diff))``, β = 2·β′): diffusers'
SD1.5 ``--beta_dpo 2500`` is ``beta_logit=2500`` (= ``beta=5000``). See :mod:`.conventions`.

loss_type: the pair loss as a function of z = −(β/2)(m_a − m̃_b), as diffusers' SD1.5 script's
``--loss_type``: "sigmoid" (−log σ(z), the papers'), "hinge" (relu(1 − z)), "ipo"
((z/β′ − 1/(2β′))², β′ = β/2). The margin, swap and λ-mixture are the same for all three.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from .conventions import resolve_beta
from .dispatch import check_backend_name, run_backend, select_backend
from .stats import PreferenceStats, nonfinite_pairs, preference_stats
from .validation import check_pair_mask, validate_inputs


@dataclass
class PreferenceOutput:
    """loss (scalar, or (P,) for reduction="none"); e_theta, e_ref: detached (2P,) errors."""

    loss: torch.Tensor
    e_theta: torch.Tensor
    e_ref: torch.Tensor
    stats: PreferenceStats
    backend: str


def _run(pred, target, ref_pred, ref_err, swap, weight, beta, lam, reduction, backend, loss_type):
    x = validate_inputs(
        pred, target, ref_pred, ref_err, swap, weight, beta, lam, reduction, loss_type
    )
    name = select_backend(backend, x)
    loss, e_theta, e_ref = run_backend(name, x)
    bad = nonfinite_pairs(e_theta, e_ref, x.weight)  # (P,) bool, on the device
    loss = torch.where(bad if reduction == "none" else bad.any(), float("nan"), loss)
    return x, name, loss, e_theta, e_ref


def preference_loss(
    pred: torch.Tensor,
    target: torch.Tensor,
    ref_pred: torch.Tensor | None = None,
    ref_err: torch.Tensor | None = None,
    *,
    swap: torch.Tensor | None = None,
    weight: torch.Tensor | float | None = None,
    beta: float | None = None,
    beta_logit: float | None = None,
    lam: float = 1.0,
    reduction: str = "mean",
    backend: str = "auto",
    loss_type: str = "sigmoid",
) -> torch.Tensor:
    """The Diff-SNPO / Diffusion-DPO / Bounded-DPO preference loss (see the module docstring).

    Args:
        pred: (2P, ...) policy predictions, winners in rows 0..P-1, losers in P..2P-1.
        target: (2P, ...) regression target (noise, velocity or flow target).
        ref_pred: (2P, ...) reference predictions, or
        ref_err: (2P,) cached reference errors e_ref (exactly one of the two).
        swap: (P,) bool; True where the pair was trained on the null-prompt branch.
        weight: scalar or (P,) per-pair weight (the ELBO's T·ω(t)), finite and ≥ 0; default 1.
        beta: KL strength in (0, 1e10] in the Diffusion-DPO code's (half) form, the same as
            diffusers' SDXL script's ``--beta_dpo`` (5000 for SD1.5/SDXL DPO); or
        beta_logit: β′ of the logit form (diffusers' SD1.5 script's ``--beta_dpo``, e.g. 2500;
            Diffusion-NPO's); β = 2·β′. Exactly one of the two (TypeError otherwise).
        lam: Bounded-DPO mixture weight in (0, 1]; 1 is plain DPO, Diff-SNPO uses 0.9.
        reduction: "mean", "sum" or "none" (→ (P,)).
        backend: "auto" (cuda → triton → torch, fused ones self-checked once: see
            :mod:`snpo_kernels.dispatch`), "torch", "triton" or "cuda".
        loss_type: "sigmoid" (default, the papers'), "hinge" or "ipo" (module docstring).

    Returns: the loss in float32 (float64 for float64 inputs), NaN for pairs with non-finite
    errors; gradients flow to ``pred`` only.
    """
    beta = resolve_beta(beta, beta_logit)
    return _run(
        pred, target, ref_pred, ref_err, swap, weight, beta, lam, reduction, backend, loss_type
    )[2]


def preference_loss_with_stats(
    pred: torch.Tensor,
    target: torch.Tensor,
    ref_pred: torch.Tensor | None = None,
    ref_err: torch.Tensor | None = None,
    *,
    swap: torch.Tensor | None = None,
    weight: torch.Tensor | float | None = None,
    beta: float | None = None,
    beta_logit: float | None = None,
    lam: float = 1.0,
    reduction: str = "mean",
    backend: str = "auto",
    loss_type: str = "sigmoid",
    uncond: torch.Tensor | None = None,
) -> PreferenceOutput:
    """:func:`preference_loss` plus the per-sample errors and statistics of the same pass.

    uncond: (P,) bool, which pairs went through the null-prompt branch, for the per-branch
    statistics (default: ``swap``); it does not change the loss."""
    beta = resolve_beta(beta, beta_logit)
    x, name, loss, e_theta, e_ref = _run(
        pred, target, ref_pred, ref_err, swap, weight, beta, lam, reduction, backend, loss_type
    )
    if uncond is not None:
        check_pair_mask("uncond", uncond, x.num_pairs, x.pred.device)
    stats = preference_stats(e_theta, e_ref, x.swap, x.weight, uncond)
    return PreferenceOutput(loss, e_theta, e_ref, stats, name)


class PreferenceLoss(nn.Module):
    """``nn.Module`` wrapper: ``PreferenceLoss(beta=5000, lam=0.9)(pred, target, ref_pred, swap=...)``
    (or ``beta_logit=2500``; ``self.beta`` is always the half-form β)."""

    def __init__(
        self,
        *,
        beta: float | None = None,
        beta_logit: float | None = None,
        lam: float = 1.0,
        reduction: str = "mean",
        backend: str = "auto",
        loss_type: str = "sigmoid",
    ) -> None:
        super().__init__()
        check_backend_name(backend)
        beta = resolve_beta(beta, beta_logit)
        validate_scalars = validate_inputs  # fail at construction on bad beta/lam/reduction
        probe = torch.zeros(2, 1)
        validate_scalars(
            probe, probe, None, torch.zeros(2), None, None, beta, lam, reduction, loss_type
        )
        self.beta, self.lam, self.reduction, self.backend = (
            float(beta),
            float(lam),
            reduction,
            backend,
        )
        self.loss_type = loss_type

    def forward(
        self,
        pred: torch.Tensor,
        target: torch.Tensor,
        ref_pred: torch.Tensor | None = None,
        ref_err: torch.Tensor | None = None,
        *,
        swap: torch.Tensor | None = None,
        weight: torch.Tensor | float | None = None,
    ) -> torch.Tensor:
        return preference_loss(
            pred,
            target,
            ref_pred,
            ref_err,
            swap=swap,
            weight=weight,
            beta=self.beta,
            lam=self.lam,
            reduction=self.reduction,
            backend=self.backend,
            loss_type=self.loss_type,
        )

    def extra_repr(self) -> str:
        return (
            f"beta={self.beta}, lam={self.lam}, reduction={self.reduction!r}, "
            f"backend={self.backend!r}, loss_type={self.loss_type!r}"
        )
