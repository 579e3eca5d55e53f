// Host driver of the CUDA finalize kernel's per-pair math (csrc/pair_math.h), for
// tests/kernels/test_cuda_math_host.py. Compiled by g++ (plain C++) and by nvcc (-x cu, where
// the same functions are __host__ __device__), so the expressions the kernel runs are checked
// in float32 on a machine without a GPU.
//
// stdin, one case per line (C hex floats, e.g. from Python's float.hex()):
//     beta lam w e_theta_a e_ref_a e_theta_b e_ref_b loss_type
// (loss_type as a number: 0 sigmoid, 1 hinge, 2 ipo, snpo::math::LossType)
// beta and lam are read as double and go through snpo::ForwardParams exactly as the binding
// assigns them, then snpo::math::loss_scalars as the launcher calls it; w and the errors are
// rounded to float as the kernel receives them.
// stdout, one line per case (hex floats of the float32 results):
//     bounded loss coef_a coef_b m_a m_b mt_b s_b
#include <cstdio>
#include <cstdlib>

#include "pair_math.h"
#include "preference_loss.h"

int main() {
  double v[8];
  while (std::scanf("%la %la %la %la %la %la %la %la", &v[0], &v[1], &v[2], &v[3], &v[4], &v[5],
                    &v[6], &v[7]) == 8) {
    snpo::ForwardParams p{};
    p.beta = v[0];  // as binding.cpp assigns them
    p.lam = v[1];
    const snpo::math::LossScalars s = snpo::math::loss_scalars(p.beta, p.lam);
    const float f[5] = {static_cast<float>(v[2]), static_cast<float>(v[3]),
                        static_cast<float>(v[4]), static_cast<float>(v[5]),
                        static_cast<float>(v[6])};
    const snpo::math::PairTerms t = snpo::math::pair_terms(
        f[1], f[2], f[3], f[4], f[0], s.half_beta, s.bounded, s.lam, s.log_lam, s.log_rest,
        static_cast<int>(v[7]));
    std::printf("%d %a %a %a %a %a %a %a\n", s.bounded ? 1 : 0, static_cast<double>(t.loss),
                static_cast<double>(t.coef_a), static_cast<double>(t.coef_b),
                static_cast<double>(t.m_a), static_cast<double>(t.m_b),
                static_cast<double>(t.mt_b), static_cast<double>(t.s_b));
  }
  return 0;
}
