"""The preference objectives of ``docs/objectives.md`` in plain PyTorch.

This is the oracle every fused backend is tested against, and the ``"torch"`` backend itself
(gradients come from autograd through these formulas). One small function per formula.

Notation: ``P`` pairs, ``2P`` samples (winners in rows ``0..P-1``, losers in ``P..2P-1``),
``N`` elements per sample. Accumulation is float32 for fp32/bf16/fp16 inputs, float64 when any
input is float64.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F


def compute_dtype(*tensors: torch.Tensor | None) -> torch.dtype:
    """float64 if any given tensor is float64, else float32 (the accumulation dtype)."""
    return (
        torch.float64
        if any(t is not None and t.dtype == torch.float64 for t in tensors)
        else torch.float32
    )


def per_sample_error(pred: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """e(i) = (1/N) Σ_j (pred[i,j] − target[i,j])², accumulated in float32 (float64 stays).

    pred, target: (B, ...) → (B,)
    """
    dt = compute_dtype(pred, target)
    diff = pred.to(dt) - target.to(dt)
    return diff.reshape(diff.shape[0], -1).pow(2).mean(dim=1)


def preferred_rejected(
    values: torch.Tensor, swap: torch.Tensor | None
) -> tuple[torch.Tensor, torch.Tensor]:
    """Split (2P,) per-sample values into (preferred a, rejected b), each (P,).

    (a, b) = (k, P+k) normally, (P+k, k) where swap[k] (null-prompt branch: reversed labels).
    """
    first, second = values.chunk(2)
    if swap is None:
        return first, second
    return torch.where(swap, second, first), torch.where(swap, first, second)


def bounded_margin(m_b: torch.Tensor, lam: float) -> torch.Tensor:
    """m̃_b = −log(λ·exp(−m_b) + (1 − λ)), computed without overflow or cancellation.

    Equals m_b for λ = 1; bounded above by −log(1 − λ) for λ < 1. Two exact forms:
    −log1p(λ·expm1(−m_b)) where it is well conditioned (m_b > −80 and λ·expm1(−m_b) > −0.5:
    around m_b = 0, where the log-sum-exp form would cancel two O(|log λ|) terms), elsewhere the
    stable two-term log-sum-exp −logaddexp(log λ − m_b, log(1 − λ)). Finite for |m_b| ≤ 1e6 in
    float32, and the same branch rule as the fused kernels.
    """
    if lam == 1.0:
        return m_b
    x = lam * torch.expm1((-m_b).clamp(-80.0, 80.0))
    direct = -torch.log1p(x)
    log_lam = torch.full_like(m_b, math.log(lam))
    log_rest = torch.full_like(m_b, math.log1p(-lam))
    lse = -torch.logaddexp(log_lam - m_b, log_rest)
    return torch.where((m_b > -80.0) & (x > -0.5), direct, lse)


def bounded_margin_slope(m_b: torch.Tensor, lam: float) -> torch.Tensor:
    """s_b = ∂m̃_b/∂m_b = λ·exp(−m_b) / (λ·exp(−m_b) + 1 − λ) = σ(log λ − m_b − log(1 − λ)) ∈ (0, 1]."""
    if lam == 1.0:
        return torch.ones_like(m_b)
    return torch.sigmoid(math.log(lam) - math.log1p(-lam) - m_b)


LOSS_TYPES = ("sigmoid", "hinge", "ipo")


def pair_loss(z: torch.Tensor, beta: float, loss_type: str = "sigmoid") -> torch.Tensor:
    """ℓ_k as a function of the logit z_k (diffusers' ``--loss_type``; β′ = β/2):

    sigmoid: ℓ = −log σ(z) = softplus(−z);   hinge: ℓ = relu(1 − z);
    ipo:     ℓ = (z/β′ − 1/(2β′))² = ((z − ½)/β′)²   (diffusers: (logits − 1/(2β′))², logits = z/β′).
    """
    if loss_type == "sigmoid":
        return F.softplus(-z)
    if loss_type == "hinge":
        return torch.relu(1.0 - z)
    if loss_type == "ipo":
        return ((z - 0.5) / (0.5 * beta)).square()
    raise ValueError(f"loss_type must be one of {LOSS_TYPES}, got {loss_type!r}")


def pair_loss_slope(z: torch.Tensor, beta: float, loss_type: str = "sigmoid") -> torch.Tensor:
    """G_k = −∂ℓ_k/∂z_k: σ(−z) (sigmoid), 1[z < 1] (hinge; 0 at the kink, as autograd of relu),
    −2(z − ½)/β′² (ipo, β′ = β/2)."""
    if loss_type == "sigmoid":
        return torch.sigmoid(-z)
    if loss_type == "hinge":
        return (z < 1.0).to(z.dtype)
    if loss_type == "ipo":
        half_beta = 0.5 * beta
        return -2.0 * (z - 0.5) / (half_beta * half_beta)
    raise ValueError(f"loss_type must be one of {LOSS_TYPES}, got {loss_type!r}")


def pair_logits(
    e_theta: torch.Tensor,
    e_ref: torch.Tensor,
    swap: torch.Tensor | None,
    weight: torch.Tensor | None,
    beta: float,
    lam: float,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """z_k = −(β/2)·(m_a − m̃_b) with m = weight·(e_θ − e_ref).

    e_theta, e_ref: (2P,); swap: (P,) bool or None; weight: (P,) or None → (z, m_a, m_b), each (P,).
    """
    margin = e_theta - e_ref
    m_a, m_b = preferred_rejected(margin, swap)
    if weight is not None:
        m_a = weight * m_a
        m_b = weight * m_b
    z = -0.5 * beta * (m_a - bounded_margin(m_b, lam))
    return z, m_a, m_b


def reduce_pairs(losses: torch.Tensor, reduction: str) -> torch.Tensor:
    """ "mean" → mean over pairs, "sum" → sum, "none" → the (P,) vector."""
    if reduction == "mean":
        return losses.mean()
    if reduction == "sum":
        return losses.sum()
    return losses


def preference_loss_reference(
    pred: torch.Tensor,
    target: torch.Tensor,
    ref_pred: torch.Tensor | None,
    ref_err: torch.Tensor | None,
    swap: torch.Tensor | None,
    weight: torch.Tensor | None,
    beta: float,
    lam: float,
    reduction: str,
    loss_type: str = "sigmoid",
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """ℓ_k = :func:`pair_loss` (z_k) (−log σ(z_k) by default), reduced. Gradients flow to
    ``pred`` only.

    Returns (loss, e_theta, e_ref): the reduced loss (float32/64, differentiable w.r.t. pred)
    and the detached per-sample errors, each (2P,).
    """
    dt = compute_dtype(pred, target, ref_pred, ref_err)
    target = target.detach()
    e_theta = per_sample_error(pred, target).to(dt)
    with torch.no_grad():
        if ref_pred is not None:
            e_ref = per_sample_error(ref_pred, target).to(dt)
        else:
            e_ref = ref_err.detach().to(dt)
    w = None if weight is None else weight.detach().to(dt)
    z, _, _ = pair_logits(e_theta, e_ref, swap, w, beta, lam)
    losses = pair_loss(z, beta, loss_type)
    return reduce_pairs(losses, reduction), e_theta.detach(), e_ref


def gradient_coefficients(
    e_theta: torch.Tensor,
    e_ref: torch.Tensor,
    swap: torch.Tensor | None,
    weight: torch.Tensor | None,
    beta: float,
    lam: float,
    scale: float,
    loss_type: str = "sigmoid",
) -> torch.Tensor:
    """Per-sample c_i with ∂loss/∂pred[i,j] = c_i·2·(pred[i,j] − target[i,j])/N.

    c_a = +scale·G_k·(β/2)·w_k,  c_b = −scale·G_k·(β/2)·w_k·s_b, with G_k = −∂ℓ_k/∂z_k
    (:func:`pair_loss_slope`; σ(−z_k) for sigmoid) and scale 1/P for "mean", 1 for
    "sum"/"none" (then multiplied by grad_output). Returns (2P,) in rows order.
    """
    z, _, m_b = pair_logits(e_theta, e_ref, swap, weight, beta, lam)
    g = scale * pair_loss_slope(z, beta, loss_type) * (0.5 * beta)
    if weight is not None:
        g = g * weight
    c_a = g
    c_b = -g * bounded_margin_slope(m_b, lam)
    if swap is None:
        return torch.cat([c_a, c_b])
    first = torch.where(swap, c_b, c_a)
    second = torch.where(swap, c_a, c_b)
    return torch.cat([first, second])


def reference_of(x) -> torch.Tensor:
    """:func:`preference_loss_reference` on validated inputs (a ``validation.LossInputs``):
    the torch backend, and the fallback of the fused ones for float64 inputs."""
    return preference_loss_reference(
        x.pred, x.target, x.ref_pred, x.ref_err, x.swap, x.weight, x.beta, x.lam, x.reduction,
        x.loss_type,
    )  # fmt: skip


def has_float64_operand(x) -> bool:
    """Whether target, ref_pred or ref_err is float64 (the fused kernels compute in float32)."""
    return any(
        t is not None and t.dtype == torch.float64 for t in (x.target, x.ref_pred, x.ref_err)
    )
