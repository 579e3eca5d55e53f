"""Extreme margins (±1e6, ×100 by a weight) compared with the float64 oracle pair by pair.

The case: 3 pairs, N = 64, winners exactly at the reference and losers 1000 away from the
target on one side (margins ±1e6, weighted 1, 100 and 0.01), pair 1 swapped. Every pair is
either in the linear regime (ℓ_k = −z_k, up to 2.5e11) or saturated (ℓ_k = 0 exactly,
coefficients 0); a reduced mean is dominated by its largest pair, so only a per-pair
comparison sees a wrong β, a wrong weight or a dropped pair in the others. The bounds are
those of :mod:`.tolerances` for the gradient's dtype; every input is exact in bfloat16.

:func:`extreme_failures` runs a backend (optionally *mutated*: β scaled, one weight scaled,
one pair dropped) and returns the list of disagreements, empty when it matches.
"""

from __future__ import annotations

import torch

import snpo_kernels as sk

from . import tolerances as tol
from .oracle import oracle

BETA = 5000.0
P, N = 3, 64


def extreme_case(dtype: torch.dtype, sign: float):
    """(pred, target, ref, swap, weight): pred, target, ref in ``dtype``."""
    target = torch.zeros(2 * P, N)
    pred = torch.full((2 * P, N), 1000.0 if sign > 0 else 0.0)
    ref = torch.full((2 * P, N), 0.0 if sign > 0 else 1000.0)
    pred[:P] = ref[:P]  # winners exactly at the reference; losers' margin is ±1e6
    swap = torch.tensor([False, True, False])
    weight = torch.tensor([1.0, 100.0, 0.01])
    return pred.to(dtype), target.to(dtype), ref.to(dtype), swap, weight


def extreme_failures(
    backend: str,
    dtype: torch.dtype,
    lam: float,
    sign: float,
    *,
    beta_factor: float = 1.0,
    weight_factor: tuple[int, float] | None = None,
    drop: int | None = None,
) -> list[str]:
    """Disagreements of ``backend`` (mutated as asked) with the oracle on the extreme case:
    per-pair losses ("none"), the gradient of their sum, and the "mean" loss."""
    pred, target, ref, swap, weight = extreme_case(dtype, sign)
    w_impl = weight.clone()
    if weight_factor is not None:
        w_impl[weight_factor[0]] *= weight_factor[1]
    keep = torch.ones(P, dtype=torch.bool)
    if drop is not None:
        keep[drop] = False
    kw = dict(swap=swap, weight=w_impl, beta=BETA * beta_factor, lam=lam, backend=backend)
    x = pred.detach().clone().requires_grad_(True)
    per_pair = sk.preference_loss(x, target, ref, reduction="none", **kw)
    if drop is None:
        mean = sk.preference_loss(x.detach(), target, ref, reduction="mean", **kw)
    else:  # a dropped pair: no loss, no gradient, and the mean over the others
        mean = per_pair.detach()[keep].mean()
        per_pair = torch.where(keep, per_pair, torch.zeros_like(per_pair))
    (grad,) = torch.autograd.grad(per_pair.sum(), x)

    failures = []
    if not (torch.isfinite(per_pair).all() and torch.isfinite(grad.float()).all()):
        failures.append("non-finite loss or gradient")
    okw = dict(swap=swap, weight=weight, beta=BETA, lam=lam)
    want, want_grad, e_th, e_rf = oracle(pred, target, ref, reduction="none", **okw)
    want_mean, _, _, _ = oracle(pred, target, ref, reduction="mean", **okw)
    s_cond, k_cond = tol.pair_conditions(e_th, e_rf, swap, weight, BETA, lam)
    bounds = tol.loss_bounds(want, s_cond, N)
    checks = [
        ("per-pair loss", per_pair, want, bounds),
        ("gradient", grad, want_grad, tol.grad_bounds(want_grad, k_cond, N, dtype)),
        ("mean loss", mean, want_mean, bounds.mean() + tol.loss_bounds([want_mean], [0.0], N)),
    ]
    for what, got, w, b in checks:
        try:
            tol.assert_within(got, w, b, f"{what} ({dtype}, lam={lam}, sign={sign})")
        except AssertionError as err:
            failures.append(str(err))
    return failures
