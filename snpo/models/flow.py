"""Flow-matching math (SD3 / FLUX-class rectified flow): noise levels, noising, target, weights.

Pure functions on tensors, no model objects. A pair's noise level σ ∈ (0, 1) comes from ONE
uniform u ∈ (0, 1) (``PairDraws.u``), shared by winner and loser, as is the noise ε:

    x_t = (1 − σ)·x0 + σ·ε          (σ = 0: data, σ = 1: noise)
    v   = ε − x0                    (the velocity the transformer predicts, dx_t/dσ)
    timestep = 1000·σ               (what SD3 / FLUX transformers take)

σ sampling (Esser et al. 2024, "Scaling Rectified Flow Transformers", §3.1), from u:

    logit_normal:  σ = sigmoid(m + s·Φ⁻¹(u))                      (m = 0, s = 1 by default)
    uniform:       σ = u
    mode:          σ = 1 − u − s·(cos²(πu/2) − 1 + u)              (s = 1.29 by default)

then optionally the timestep shift of SD3's scheduler (``FlowMatchEulerDiscreteScheduler``'s
``shift``; §5.3.2 of the paper), a monotone map of (0, 1) onto itself:

    σ' = shift·σ / (1 + (shift − 1)·σ)

Weights of the per-sample velocity MSE (``docs/flow.md`` explains each):

    constant:    1
    elbo:        (1 − σ)/σ        the continuous-time ELBO integrand in v-MSE units
    sigma_sqrt:  σ⁻²              diffusers' ``compute_loss_weighting_for_sd3``
    cosmap:      2 / (π·(1 − 2σ + 2σ²))   idem

All σ functions take and return float64 (P,) tensors; clamping keeps σ strictly inside (0, 1).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

SIGMA_SAMPLERS = ("logit_normal", "uniform", "mode")
WEIGHTINGS = ("constant", "elbo", "sigma_sqrt", "cosmap")
TIMESTEP_SCALE = 1000.0  # SD3 / FLUX transformers take timestep = 1000·σ

# σ is kept in [1e-6, 1 − 1e-6]: never exactly data or noise, and (1 − σ)/σ stays finite
_TINY = 1e-6


def _open_unit(x: torch.Tensor) -> torch.Tensor:
    """Clamp to [1e-6, 1 − 1e-6], so σ and 1 − σ are never 0 (x_t never exactly data/noise)."""
    return x.clamp(_TINY, 1.0 - _TINY)


def _check_uniform(u: torch.Tensor) -> torch.Tensor:
    """u itself after checking it is float64 and, on the CPU, strictly inside (0, 1) (on an
    accelerator the range check would cost a host sync per step: the draws are made on the
    CPU, where it runs)."""
    if u.dtype != torch.float64:
        raise TypeError(f"u must be float64 (PairDraws.u), got {u.dtype}")
    if u.device.type == "cpu" and u.numel() and (u.min() <= 0 or u.max() >= 1):
        raise ValueError("u must lie strictly inside (0, 1)")
    return u


def sigma_logit_normal(u: torch.Tensor, mean: float = 0.0, std: float = 1.0) -> torch.Tensor:
    """σ = sigmoid(m + s·Φ⁻¹(u)): u (P,) float64 uniforms → σ (P,) float64, logit(σ) ~ N(m, s²)."""
    z = torch.special.ndtri(_check_uniform(u))
    return _open_unit(torch.sigmoid(mean + std * z))


def sigma_uniform(u: torch.Tensor) -> torch.Tensor:
    """σ = u (P,) float64 (clamped away from the ends)."""
    return _open_unit(_check_uniform(u).clone())


def sigma_mode(u: torch.Tensor, scale: float = 1.29) -> torch.Tensor:
    """σ = 1 − u − s·(cos²(πu/2) − 1 + u) (P,) float64: SD3's "mode" density (heavier mid-σ
    for s > 0). Monotone in u for −1 ≤ s ≤ 2/(π − 2) ≈ 1.75, so σ ∈ (0, 1) there."""
    if not -1.0 <= scale <= 2.0 / (math.pi - 2.0):
        raise ValueError(f"mode scale must be in [-1, {2 / (math.pi - 2):.4f}], got {scale}")
    u = _check_uniform(u)
    return _open_unit(1.0 - u - scale * (torch.cos(math.pi * u / 2.0) ** 2 - 1.0 + u))


def shift_sigma(sigma: torch.Tensor, shift: float) -> torch.Tensor:
    """σ' = shift·σ / (1 + (shift − 1)·σ), (P,) → (P,): SD3's timestep shift (shift = 1: σ)."""
    if shift <= 0:
        raise ValueError(f"shift must be > 0, got {shift}")
    return _open_unit(shift * sigma / (1.0 + (shift - 1.0) * sigma))


def sample_sigma(
    u: torch.Tensor,
    sampler: str = "logit_normal",
    *,
    shift: float = 1.0,
    logit_mean: float = 0.0,
    logit_std: float = 1.0,
    mode_scale: float = 1.29,
) -> torch.Tensor:
    """σ (P,) float64 ∈ (0, 1) from uniforms u (P,) float64: ``sampler`` then the shift."""
    if sampler == "logit_normal":
        sigma = sigma_logit_normal(u, logit_mean, logit_std)
    elif sampler == "uniform":
        sigma = sigma_uniform(u)
    elif sampler == "mode":
        sigma = sigma_mode(u, mode_scale)
    else:
        raise ValueError(f"unknown σ sampler {sampler!r}; choose one of {SIGMA_SAMPLERS}")
    return shift_sigma(sigma, shift) if shift != 1.0 else sigma


def _per_row(sigma: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    """σ (B,) reshaped to (B, 1, …, 1) to broadcast against ``like`` (B, …)."""
    return sigma.reshape(-1, *([1] * (like.ndim - 1)))


def flow_noise(x0: torch.Tensor, noise: torch.Tensor, sigma: torch.Tensor) -> torch.Tensor:
    """x_t = (1 − σ)·x0 + σ·ε: x0, noise (B, …), σ (B,) → (B, …) in x0's dtype."""
    s = _per_row(sigma, x0).to(x0.dtype)
    return (1.0 - s) * x0 + s * noise.to(x0.dtype)


def flow_target(x0: torch.Tensor, noise: torch.Tensor) -> torch.Tensor:
    """v = ε − x0 (B, …): the velocity dx_t/dσ."""
    return noise.to(x0.dtype) - x0


def flow_timestep(sigma: torch.Tensor) -> torch.Tensor:
    """The transformer's timestep 1000·σ, (B,) float32."""
    return (TIMESTEP_SCALE * sigma).to(torch.float32)


def flow_weight(sigma: torch.Tensor, weighting: str = "constant") -> torch.Tensor | None:
    """Per-row weight (B,) float32 of the velocity MSE (module docstring); None for constant."""
    s = sigma.to(torch.float64)
    if weighting == "constant":
        return None
    if weighting == "elbo":
        w = (1.0 - s) / s
    elif weighting == "sigma_sqrt":
        w = s**-2.0
    elif weighting == "cosmap":
        w = 2.0 / (math.pi * (1.0 - 2.0 * s + 2.0 * s**2))
    else:
        raise ValueError(f"unknown flow weighting {weighting!r}; choose one of {WEIGHTINGS}")
    return w.to(torch.float32)


@dataclass(frozen=True)
class FlowSettings:
    """How a flow family draws σ from u: ``sampler`` (one of :data:`SIGMA_SAMPLERS`), its
    parameters, and the timestep ``shift`` applied after it (1: none)."""

    sampler: str = "logit_normal"
    shift: float = 1.0
    logit_mean: float = 0.0
    logit_std: float = 1.0
    mode_scale: float = 1.29

    def sigma(self, u: torch.Tensor) -> torch.Tensor:
        """σ (P,) float64 from u (P,) float64."""
        return sample_sigma(
            u,
            self.sampler,
            shift=self.shift,
            logit_mean=self.logit_mean,
            logit_std=self.logit_std,
            mode_scale=self.mode_scale,
        )


@dataclass
class FlowInputs:
    """x_t (B, …) in x0's dtype, timestep (B,) float32 = 1000·σ, target v (B, …) float32,
    weight (B,) float32 or None (constant), sigma (B,) float64."""

    x_t: torch.Tensor
    timestep: torch.Tensor
    target: torch.Tensor
    weight: torch.Tensor | None
    sigma: torch.Tensor


def flow_inputs(
    x0: torch.Tensor,
    noise: torch.Tensor,
    u: torch.Tensor,
    settings: FlowSettings,
    weighting: str = "constant",
) -> FlowInputs:
    """The training inputs of B rows from x0, ε (B, …) and their uniforms u (B,) float64
    (a pair's winner and loser carry the same u and ε, hence the same σ, x_t − x0 direction
    and weight): σ = settings.sigma(u), x_t = (1 − σ)·x0 + σ·ε, v = ε − x0, timestep 1000·σ."""
    if u.shape != (x0.shape[0],):
        raise ValueError(f"u must be ({x0.shape[0]},), got {tuple(u.shape)}")
    sigma = settings.sigma(u.to(torch.float64))
    x0f, nf = x0.to(torch.float32), noise.to(torch.float32)
    weight = flow_weight(sigma, weighting)
    dev = x0.device
    return FlowInputs(
        x_t=flow_noise(x0f, nf, sigma.to(dev)).to(x0.dtype),
        timestep=flow_timestep(sigma).to(dev),
        target=flow_target(x0f, nf),
        weight=None if weight is None else weight.to(dev),
        sigma=sigma,
    )
