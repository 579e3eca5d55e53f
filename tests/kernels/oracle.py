"""An independent float64 oracle of docs/objectives.md, written element by element with the
math module (nothing shared with snpo_kernels.reference), for the tests."""

from __future__ import annotations

import math

import torch


def _softplus(x: float) -> float:
    return max(x, 0.0) + math.log1p(math.exp(-abs(x)))


def _sigmoid(x: float) -> float:
    return 1.0 / (1.0 + math.exp(-x)) if x >= 0 else math.exp(x) / (1.0 + math.exp(x))


def oracle(
    pred,
    target,
    ref_pred=None,
    ref_err=None,
    swap=None,
    weight=None,
    beta=1.0,
    lam=1.0,
    reduction="mean",
    loss_type="sigmoid",
):
    """loss_type: ℓ(z) = −log σ(z) ("sigmoid"), max(1 − z, 0) ("hinge") or
    (z/β′ − 1/(2β′))² with β′ = β/2 ("ipo", diffusers' form); G = −dℓ/dz.

    Returns (loss float or list, grad (2P, N) float64 tensor for d(sum or mean)/dpred,
    e_theta list, e_ref list). For reduction="none" the gradient is that of the sum."""
    x = pred.detach().double().reshape(pred.shape[0], -1)
    t = target.detach().double().reshape(pred.shape[0], -1)
    two_p, n = x.shape
    p = two_p // 2
    e_th = [float(((x[i] - t[i]) ** 2).sum()) / n for i in range(two_p)]
    if ref_pred is not None:
        r = ref_pred.detach().double().reshape(two_p, -1)
        e_rf = [float(((r[i] - t[i]) ** 2).sum()) / n for i in range(two_p)]
    else:
        e_rf = [float(v) for v in ref_err.detach().double()]
    sw = [False] * p if swap is None else [bool(s) for s in swap]
    if weight is None:
        w = [1.0] * p
    elif isinstance(weight, (int, float)):
        w = [float(weight)] * p
    else:
        w = [float(v) for v in weight.detach().double()]
    losses, coef = [], [0.0] * two_p
    scale = 1.0 / p if reduction == "mean" else 1.0
    for k in range(p):
        a, b = (p + k, k) if sw[k] else (k, p + k)
        m_a = w[k] * (e_th[a] - e_rf[a])
        m_b = w[k] * (e_th[b] - e_rf[b])
        if lam == 1.0:
            mt_b, s_b = m_b, 1.0
        else:
            # two-term log-sum-exp of (log λ − m_b, log(1−λ)) with max subtraction
            u, v = math.log(lam) - m_b, math.log(1.0 - lam)
            hi = max(u, v)
            mt_b = -(hi + math.log(math.exp(u - hi) + math.exp(v - hi)))
            s_b = _sigmoid(u - v)
        z = -0.5 * beta * (m_a - mt_b)
        hb = 0.5 * beta
        if loss_type == "sigmoid":
            losses.append(_softplus(-z))
            slope = _sigmoid(-z)
        elif loss_type == "hinge":
            losses.append(max(1.0 - z, 0.0))
            slope = 1.0 if z < 1.0 else 0.0
        elif loss_type == "ipo":
            raw = z / hb  # diffusers' `logits` = ref_diff − model_diff (bounded)
            losses.append((raw - 1.0 / (2.0 * hb)) ** 2)
            slope = -2.0 * (raw - 1.0 / (2.0 * hb)) / hb
        else:
            raise ValueError(loss_type)
        g = scale * slope * hb * w[k]
        coef[a] += g
        coef[b] += -g * s_b
    grad = torch.stack([coef[i] * 2.0 * (x[i] - t[i]) / n for i in range(two_p)])
    if reduction == "mean":
        loss = sum(losses) / p
    elif reduction == "sum":
        loss = sum(losses)
    else:
        loss = losses
    return loss, grad.reshape(pred.shape), e_th, e_rf
