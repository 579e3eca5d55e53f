"""The per-pair tail in one single-program launch (P pairs, 2P samples, S partials per row).

    e_θ(i)  = (Σ_s part_theta[i, s]) / N,   e_ref(i) likewise or ref_err[i]
    (a, b)  = (k, P+k), or (P+k, k) where swap[k]
    m_a     = w_k·(e_θ(a) − e_ref(a)),  m_b = w_k·(e_θ(b) − e_ref(b))
    m̃_b     = −log(λ·exp(−m_b) + 1 − λ)                (= m_b when λ = 1; BOUNDED=False)
    s_b     = σ(log λ − m_b − log(1 − λ))              (= ∂m̃_b/∂m_b; 1 when λ = 1)
    z_k     = −(β/2)·(m_a − m̃_b),   ℓ_k = softplus(−z_k)   (LOSS_TYPE 0, "sigmoid")
                                    ℓ_k = relu(1 − z_k)     (1, "hinge")
                                    ℓ_k = ((z_k − ½)/(β/2))² (2, "ipo", diffusers' form)
    G_k     = −∂ℓ_k/∂z_k: σ(−z_k), 1[z_k < 1], −2(z_k − ½)/(β/2)²
    c_a     = scale·G_k·(β/2)·w_k,   c_b = −c_a·s_b     (scale = 1/P for "mean", else 1)

Outputs: loss (P,) for REDUCE=0 ("none"), else one scalar (1 "sum", 2 "mean"); e_θ, e_ref,
c: (2P,) float32 in row order. The pairs are walked in blocks of BLOCK_P by one program and
every sum runs in a fixed order, so the result is deterministic. softplus, sigmoid, log1p,
expm1 and the two-term log-sum-exp are written with exp/log and max-subtraction (no
libdevice, so the interpreter runs them): finite for |m| ≤ 1e6·w in float32. m̃_b switches
between two exact forms so that it keeps full relative accuracy near m_b = 0 too (see
_bounded_margin).
"""

from __future__ import annotations

import triton
import triton.language as tl

REDUCE_NONE, REDUCE_SUM, REDUCE_MEAN = 0, 1, 2
LOSS_SIGMOID, LOSS_HINGE, LOSS_IPO = 0, 1, 2


@triton.jit
def _log1p(x):
    """log(1 + x) for x > −1, accurate for tiny |x| (Goldberg's trick, no libdevice)."""
    u = 1.0 + x
    tiny = u == 1.0
    return tl.where(tiny, x, tl.log(u) * (x / tl.where(tiny, 1.0, u - 1.0)))


@triton.jit
def _sigmoid(y):
    """1 / (1 + exp(−y)) without overflow: exp is only taken of −|y|."""
    e = tl.exp(-tl.abs(y))
    return tl.where(y >= 0, 1.0 / (1.0 + e), e / (1.0 + e))


@triton.jit
def _expm1(y):
    """exp(y) − 1, accurate near 0 (Kahan's trick: exact up to a few ulps given an accurate
    log, whatever the rounding of exp). |y| ≤ 80 here."""
    u = tl.exp(y)
    um1 = u - 1.0
    lg = tl.log(u)
    degenerate = (u == 1.0) | (lg == 0.0)
    return tl.where(degenerate, y, um1 * (y / tl.where(degenerate, 1.0, lg)))


@triton.jit
def _bounded_margin(m_b, lam, log_lam, log_rest):
    """(m̃_b, s_b) for 0 < λ < 1, finite for |m_b| up to 1e38.

    m̃_b = −log1p(λ·expm1(−m_b)) where that is well conditioned (1 + λ·expm1(−m_b) > 0.5 and
    m_b > −80): near m_b = 0 the log-sum-exp form would cancel two O(|log λ|) terms (an error
    of ~1e-8 in m̃_b, 2.5e-5 in z at β = 5000). Elsewhere the max-subtracted two-term
    log-sum-exp −lse(log λ − m_b, log(1 − λ)), which there has no cancellation.
    s_b = σ(log λ − m_b − log(1 − λ)).
    """
    x = lam * _expm1(tl.minimum(tl.maximum(-m_b, -80.0), 80.0))
    direct = -_log1p(x)
    u = log_lam - m_b
    hi = tl.maximum(u, log_rest)
    lse = hi + _log1p(tl.exp(-tl.abs(u - log_rest)))
    use_direct = (m_b > -80.0) & (x > -0.5)
    return tl.where(use_direct, direct, -lse), _sigmoid(u - log_rest)


@triton.jit
def _softplus(y):
    """log(1 + exp(y)) = max(y, 0) + log1p(exp(−|y|))."""
    return tl.maximum(y, 0.0) + _log1p(tl.exp(-tl.abs(y)))


@triton.jit
def _row_sums(part_ptr, rows, row_mask, S, BLOCK_P: tl.constexpr, BLOCK_S: tl.constexpr):
    """Σ_s part[rows, s] for a block of rows, in a fixed order."""
    total = tl.zeros([BLOCK_P], dtype=tl.float32)
    for s0 in range(0, S, BLOCK_S):
        cols = s0 + tl.arange(0, BLOCK_S)
        mask = row_mask[:, None] & (cols[None, :] < S)
        v = tl.load(part_ptr + rows[:, None] * S + cols[None, :], mask=mask, other=0.0)
        total += tl.sum(v, axis=1)
    return total


@triton.jit
def pair_tail_kernel(
    part_theta_ptr,
    part_ref_ptr,
    ref_err_ptr,
    swap_ptr,
    weight_ptr,
    loss_ptr,
    e_theta_ptr,
    e_ref_ptr,
    coef_ptr,
    P,
    S,
    n_elems,
    half_beta,
    lam,
    log_lam,
    log_rest,
    s_ref_err,
    s_swap,
    s_weight,
    HAS_REF_PRED: tl.constexpr,
    HAS_SWAP: tl.constexpr,
    HAS_WEIGHT: tl.constexpr,
    BOUNDED: tl.constexpr,
    REDUCE: tl.constexpr,
    LOSS_TYPE: tl.constexpr,
    BLOCK_P: tl.constexpr,
    BLOCK_S: tl.constexpr,
):
    acc = tl.zeros([BLOCK_P], dtype=tl.float32)
    for k0 in range(0, P, BLOCK_P):
        k = k0 + tl.arange(0, BLOCK_P).to(tl.int64)
        km = k < P
        kl = k + P  # the loser row of pair k
        e_th_w = _row_sums(part_theta_ptr, k, km, S, BLOCK_P, BLOCK_S) / n_elems
        e_th_l = _row_sums(part_theta_ptr, kl, km, S, BLOCK_P, BLOCK_S) / n_elems
        if HAS_REF_PRED:
            e_rf_w = _row_sums(part_ref_ptr, k, km, S, BLOCK_P, BLOCK_S) / n_elems
            e_rf_l = _row_sums(part_ref_ptr, kl, km, S, BLOCK_P, BLOCK_S) / n_elems
        else:
            e_rf_w = tl.load(ref_err_ptr + k * s_ref_err, mask=km, other=0.0).to(tl.float32)
            e_rf_l = tl.load(ref_err_ptr + kl * s_ref_err, mask=km, other=0.0).to(tl.float32)
        tl.store(e_theta_ptr + k, e_th_w, mask=km)
        tl.store(e_theta_ptr + kl, e_th_l, mask=km)
        tl.store(e_ref_ptr + k, e_rf_w, mask=km)
        tl.store(e_ref_ptr + kl, e_rf_l, mask=km)

        margin_w = e_th_w - e_rf_w
        margin_l = e_th_l - e_rf_l
        if HAS_SWAP:
            sw = tl.load(swap_ptr + k * s_swap, mask=km, other=0) != 0
            m_a = tl.where(sw, margin_l, margin_w)
            m_b = tl.where(sw, margin_w, margin_l)
        else:
            m_a = margin_w
            m_b = margin_l
        if HAS_WEIGHT:
            w = tl.load(weight_ptr + k * s_weight, mask=km, other=0.0).to(tl.float32)
            m_a = w * m_a
            m_b = w * m_b
        if BOUNDED:
            mt_b, s_b = _bounded_margin(m_b, lam, log_lam, log_rest)
        else:
            mt_b = m_b
            s_b = 1.0
        z = -half_beta * (m_a - mt_b)
        if LOSS_TYPE == 1:
            loss_k = tl.maximum(1.0 - z, 0.0)
            g = tl.where(z < 1.0, 1.0, 0.0) * half_beta
        elif LOSS_TYPE == 2:
            d = (z - 0.5) / half_beta
            loss_k = d * d
            g = -2.0 * d  # G·(β/2) = −2(z − ½)/(β/2)
        else:
            loss_k = _softplus(-z)
            g = _sigmoid(-z) * half_beta
        if HAS_WEIGHT:
            g = g * w
        if REDUCE == 2:
            g = g / P
        c_a = g
        c_b = -g * s_b
        if HAS_SWAP:
            tl.store(coef_ptr + k, tl.where(sw, c_b, c_a), mask=km)
            tl.store(coef_ptr + kl, tl.where(sw, c_a, c_b), mask=km)
        else:
            tl.store(coef_ptr + k, c_a, mask=km)
            tl.store(coef_ptr + kl, c_b, mask=km)
        if REDUCE == 0:
            tl.store(loss_ptr + k, loss_k, mask=km)
        else:
            acc += tl.where(km, loss_k, 0.0)
    if REDUCE != 0:
        total = tl.sum(acc, axis=0)
        if REDUCE == 2:
            total = total / P
        tl.store(loss_ptr, total)
