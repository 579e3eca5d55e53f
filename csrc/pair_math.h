// The per-pair math of the fused preference loss (docs/objectives.md), shared by the CUDA
// finalize kernel (device) and a host test program (tests/kernels/finalize_host.cpp, compiled
// by g++ and by nvcc on machines without a GPU), so that the very expressions the kernel runs
// are checked in float32 against a float64 truth.
//
// Plain C++ with float and the C math functions (expf, expm1f, log1pf: accurate versions in
// both CUDA and glibc, no fast-math); no CUDA and no torch headers. Under nvcc the functions
// are __host__ __device__.
#pragma once

#include <math.h>

#include <cmath>

#if defined(__CUDACC__)
#define SNPO_HOST_DEVICE __host__ __device__ __forceinline__
#else
#define SNPO_HOST_DEVICE inline
#endif

namespace snpo {
namespace math {

// softplus(x) = log(1 + e^x) = max(x, 0) + log1p(e^{−|x|}); NaN propagates.
SNPO_HOST_DEVICE float softplus_f(float x) { return fmaxf(x, 0.0f) + log1pf(expf(-fabsf(x))); }

// σ(x) without overflow for either sign.
SNPO_HOST_DEVICE float sigmoid_f(float x) {
  if (x >= 0.0f) return 1.0f / (1.0f + expf(-x));
  const float e = expf(x);
  return e / (1.0f + e);
}

// The bounded margin m̃_b = −log(λ·e^{−m_b} + 1 − λ) and its slope s_b = ∂m̃_b/∂m_b, for
// 0 < λ < 1, with the branch rule every backend shares (snpo_kernels/reference.py
// bounded_margin, the Triton pair kernel):
//   direct form −log1p(λ·expm1(−m_b))           when m_b > −80 and λ·expm1(−m_b) > −0.5
//       (around m_b = 0, where training starts: full relative accuracy; the log-sum-exp
//       would subtract two ≈ |log λ| numbers there, an absolute error ≈ ε·|log(1 − λ)| that
//       z = −(β/2)(m_a − m̃_b) multiplies by β/2);
//   else −logaddexp(log λ − m_b, log(1 − λ))    (max-subtracted, never overflows).
// Ternaries, not fminf/fmaxf, so that a NaN margin stays NaN (it takes the log-sum-exp
// branch, whose every step propagates NaN).
struct BoundedMargin {
  float value;  // m̃_b
  float slope;  // s_b = σ(log λ − m_b − log(1 − λ))
};

SNPO_HOST_DEVICE BoundedMargin bounded_margin(float m_b, float lam, float log_lam,
                                              float log_rest) {
  const float y = -m_b;
  const float y_clamped = y < -80.0f ? -80.0f : (y > 80.0f ? 80.0f : y);
  const float x = lam * expm1f(y_clamped);
  const float u = log_lam - m_b;
  const float v = log_rest;
  float value;
  if (m_b > -80.0f && x > -0.5f) {
    value = -log1pf(x);
  } else {
    const float hi = u > v ? u : v;
    const float lo = u > v ? v : u;
    value = -(hi + log1pf(expf(lo - hi)));
  }
  return BoundedMargin{value, sigmoid_f(u - v)};
}

// The scalars of one forward call, decided on the host in double: `bounded` is λ < 1 in
// double (a λ within 2⁻²⁵ of 1 rounds to 1.0f, but still bounds m̃_b by −log(1 − λ) ≈ 17),
// and log λ, log(1 − λ) are taken in double before the one rounding to float.
struct LossScalars {
  float half_beta;  // β/2
  bool bounded;     // λ < 1
  float lam;        // λ, rounded to float (only the direct form uses it)
  float log_lam;    // log λ          (0 when not bounded)
  float log_rest;   // log(1 − λ)     (0 when not bounded)
};

inline LossScalars loss_scalars(double beta, double lam) {
  const bool bounded = lam < 1.0;
  return LossScalars{static_cast<float>(0.5 * beta), bounded, static_cast<float>(lam),
                     bounded ? static_cast<float>(std::log(lam)) : 0.0f,
                     bounded ? static_cast<float>(std::log1p(-lam)) : 0.0f};
}

// The pair loss as a function of the logit z (diffusers' --loss_type; β′ = β/2), and
// G = −dℓ/dz (snpo_kernels/reference.py pair_loss, pair_loss_slope):
//   kSigmoid: ℓ = softplus(−z),        G = σ(−z)
//   kHinge:   ℓ = max(1 − z, 0),       G = 1 if z < 1 else 0 (autograd's relu at the kink)
//   kIpo:     ℓ = ((z − ½)/β′)²,       G = −2(z − ½)/β′²   (diffusers: (logits − 1/(2β′))²)
enum LossType : int { kSigmoid = 0, kHinge = 1, kIpo = 2 };

struct LossAndSlope {
  float loss;
  float g_half_beta;  // G·β/2
};

SNPO_HOST_DEVICE LossAndSlope pair_loss(float neg_z, float half_beta, int loss_type) {
  const float z = -neg_z;
  if (loss_type == kHinge) {
    const float l = 1.0f - z;
    return LossAndSlope{l > 0.0f ? l : 0.0f, z < 1.0f ? half_beta : 0.0f};
  }
  if (loss_type == kIpo) {
    const float d = (z - 0.5f) / half_beta;
    return LossAndSlope{d * d, -2.0f * d};
  }
  return LossAndSlope{softplus_f(neg_z), sigmoid_f(neg_z) * half_beta};
}

// One pair k: preferred sample a, rejected sample b, weight w.
//   m_a = w·(e_θ(a) − e_ref(a)),  m_b = w·(e_θ(b) − e_ref(b)),  m̃_b = bounded_margin(m_b)
//   −z = (β/2)·(m_a − m̃_b),  ℓ = pair_loss(z),  c_a = G·(β/2)·w,  c_b = −c_a·s_b
// (c at scale 1: without 1/P and grad_output).
struct PairTerms {
  float loss;
  float coef_a;
  float coef_b;
  float m_a;
  float m_b;
  float mt_b;  // m̃_b
  float s_b;
};

SNPO_HOST_DEVICE PairTerms pair_terms(float e_theta_a, float e_ref_a, float e_theta_b,
                                      float e_ref_b, float w, float half_beta, bool bounded,
                                      float lam, float log_lam, float log_rest,
                                      int loss_type = kSigmoid) {
  const float m_a = w * (e_theta_a - e_ref_a);
  const float m_b = w * (e_theta_b - e_ref_b);
  float mt_b = m_b;
  float s_b = 1.0f;
  if (bounded) {
    const BoundedMargin bm = bounded_margin(m_b, lam, log_lam, log_rest);
    mt_b = bm.value;
    s_b = bm.slope;
  }
  const float neg_z = half_beta * (m_a - mt_b);  // −z_k
  const LossAndSlope ls = pair_loss(neg_z, half_beta, loss_type);
  const float g = ls.g_half_beta * w;
  return PairTerms{ls.loss, g, -g * s_b, m_a, m_b, mt_b, s_b};
}

}  // namespace math
}  // namespace snpo
