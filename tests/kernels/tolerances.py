"""Tolerances derived from the loss's condition number, per pair, for the kernel tests.

For pair k (preferred a, rejected b, weight w, logit z, slope s_b = ∂m̃_b/∂m_b) the float64
oracle gives

    S_k = Σ_i |∂ℓ_k/∂e_i|·(|e_θ,i| + |e_ref,i|) = σ(−z)·(β/2)·w·(E_a + s_b·E_b)
    K_k = σ(z)·(β/2)·w·(E_a + s_b·E_b) + (1 − s_b)·w·E_b,     E_i = |e_θ,i| + |e_ref,i|

S_k is the loss's sensitivity to relative perturbations of the errors; K_k the relative
sensitivity of the gradient coefficients c_i = σ(−z)·(β/2)·w·(1 or s_b) (d log σ(−z)/dz = −σ(z)
and d log s_b/dm_b = −(1 − s_b)). A float32 computation on the same (rounded) inputs is
then within

    |Δℓ_k|  ≤ k·ε₃₂·(|ℓ_k| + S_k) + tiny
    |Δg_ij| ≤ (ε_out + k·ε₃₂·(1 + K_k))·|g_ij| + tiny_out

where ε_out = finfo(gradient dtype).eps covers the gradient's final rounding (one ulp: the
Triton interpreter truncates instead of rounding to nearest) and k = 8 + 2·⌈log₂ N⌉ covers
the N-term float32 sums (tree / pairwise order: ≤ log₂ N levels) plus the handful of
roundings of the pair tail. Saturated pairs get S_k = 0 (σ(−z) = 0): their loss and
coefficients must then be exactly 0, which is what makes a wrong weight, β or swap visible.
"""

from __future__ import annotations

import math

import torch

F32 = torch.finfo(torch.float32)


def _sigmoid(x: float) -> float:
    return 1.0 / (1.0 + math.exp(-x)) if x >= 0 else math.exp(x) / (1.0 + math.exp(x))


def accumulation_factor(n: int) -> float:
    """k = 8 + 2·⌈log₂ N⌉ (see the module docstring)."""
    return 8.0 + 2.0 * math.ceil(math.log2(max(n, 2)))


def _loss_slopes(z: float, beta: float, loss_type: str) -> tuple[float, float]:
    """(|G|, r) with G = −dℓ/dz and r = |dG/dz|/|G| (σ(−z) and σ(z) for the sigmoid)."""
    if loss_type == "hinge":
        return (1.0 if z < 1.0 else 0.0), 0.0
    if loss_type == "ipo":
        hb = 0.5 * beta
        return 2.0 * abs(z - 0.5) / (hb * hb), 1.0 / max(abs(z - 0.5), 1e-300)
    return _sigmoid(-z), _sigmoid(z)


def pair_conditions(e_th, e_rf, swap, weight, beta, lam, loss_type="sigmoid"):
    """(S, K): lists of the per-pair condition numbers of the module docstring (float64);
    for the hinge and ipo losses σ(−z) becomes |G| and σ(z) becomes r = |dG/dz|/|G|."""
    two_p = len(e_th)
    p = two_p // 2
    sw = [False] * p if swap is None else [bool(s) for s in swap]
    if weight is None:
        w = [1.0] * p
    elif isinstance(weight, (int, float)):
        w = [float(weight)] * p
    else:
        w = [float(v) for v in weight]
    s_out, k_out = [], []
    for k in range(p):
        a, b = (p + k, k) if sw[k] else (k, p + k)
        m_a = w[k] * (e_th[a] - e_rf[a])
        m_b = w[k] * (e_th[b] - e_rf[b])
        if lam == 1.0:
            mt_b, s_b = m_b, 1.0
        else:
            u, v = math.log(lam) - m_b, math.log1p(-lam)
            hi = max(u, v)
            mt_b = -(hi + math.log(math.exp(u - hi) + math.exp(v - hi)))
            s_b = _sigmoid(u - v)
        z = -0.5 * beta * (m_a - mt_b)
        e_a = abs(e_th[a]) + abs(e_rf[a])
        e_b = abs(e_th[b]) + abs(e_rf[b])
        lin = 0.5 * beta * w[k] * (e_a + s_b * e_b)
        g_abs, r = _loss_slopes(z, beta, loss_type)
        s_out.append(g_abs * lin)
        k_out.append(r * lin + (1.0 - s_b) * w[k] * e_b)
    return s_out, k_out


def loss_bounds(want_losses, s_cond, n: int) -> torch.Tensor:
    """(P,) float64 bounds on |Δℓ_k| for a float32 computation (module docstring)."""
    k = accumulation_factor(n)
    want = torch.as_tensor(want_losses, dtype=torch.float64).abs()
    return k * F32.eps * (want + torch.tensor(s_cond, dtype=torch.float64)) + F32.tiny


def grad_bounds(want_grad: torch.Tensor, k_cond, n: int, dtype: torch.dtype) -> torch.Tensor:
    """Per-element float64 bounds on |Δg| for a gradient returned in ``dtype``."""
    k = accumulation_factor(n)
    two_p = want_grad.shape[0]
    kk = torch.tensor(k_cond + k_cond, dtype=torch.float64).reshape(
        two_p, *([1] * (want_grad.dim() - 1))
    )
    fin = torch.finfo(dtype)
    return (fin.eps + k * F32.eps * (1.0 + kk)) * want_grad.abs() + fin.tiny


def violations(got: torch.Tensor, want, bound: torch.Tensor) -> torch.Tensor:
    """Bool mask of the elements where |got − want| > bound (NaN counts as a violation)."""
    want = torch.as_tensor(want, dtype=torch.float64).reshape(got.shape)
    err = (got.detach().double().cpu() - want).abs()
    return ~(err <= bound.reshape(got.shape))


def assert_within(got: torch.Tensor, want, bound: torch.Tensor, what: str) -> None:
    """Assert |got − want| ≤ bound elementwise; the message lists the first offenders."""
    bad = violations(got, want, bound)
    if bool(bad.any()):
        want_t = torch.as_tensor(want, dtype=torch.float64).reshape(got.shape)
        idx = bad.nonzero()[:5].tolist()
        rows = [
            f"{tuple(i)}: got {got.detach().double().cpu()[tuple(i)].item():.9g}, "
            f"want {want_t[tuple(i)].item():.9g}, bound {bound.reshape(got.shape)[tuple(i)].item():.3g}"
            for i in idx
        ]
        raise AssertionError(
            f"{what}: {int(bad.sum())} element(s) out of bounds; " + "; ".join(rows)
        )
