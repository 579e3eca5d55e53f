// Fused preference loss (Diffusion-DPO / Bounded DPO / Diffusion-NPO / Diff-SNPO): the CUDA
// kernels and their launchers. Only CUDA headers here; torch is bound in binding.cpp.
//
// Forward, two launches, deterministic:
//   1. sq_err_partials_kernel: grid = rows·splits blocks of kStreamThreads; block (r, s) sums
//      (pred − target)² and (ref_pred − target)² over its chunk of row r in float32, with
//      16-byte vector loads when every row start is aligned, and writes ONE partial per row
//      and split (no atomics).
//   2. finalize_kernel: one block; e(i) = Σ_s partial[i, s] / n in a fixed order, then per
//      pair (pair_math.h) the margins, the bounded margin (direct form −log1p(λ·expm1(−m_b))
//      near m_b = 0, else the two-term log-sum-exp: the branch rule of every backend), the
//      softplus loss, the per-sample gradient coefficients c_i, and a fixed-order block
//      reduction of the loss.
// Backward, one launch: grad[i, j] = c_i · scale · grad_loss[k(i)] · 2/n · (pred − target),
// in pred's dtype, grad_loss read on the device (no host synchronisation anywhere).
//
// All offsets are int64. Math in float32 with the accurate expf/log1pf (no fast-math).

#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>

#include <atomic>
#include <cmath>
#include <cstdint>

#include "pair_math.h"
#include "preference_loss.h"

namespace snpo {
namespace kernels {

// ------------------------------------------------------------------ element conversion
// Each element type knows how to unpack one 32-bit word into floats and pack floats back.
template <typename T>
struct Elem;

template <>
struct Elem<float> {
  static constexpr int kPerWord = 1;
  __device__ __forceinline__ static float load(const float* p) { return __ldg(p); }
  __device__ __forceinline__ static void unpack(uint32_t w, float* out) {
    out[0] = __uint_as_float(w);
  }
  __device__ __forceinline__ static uint32_t pack(const float* v) { return __float_as_uint(v[0]); }
  __device__ __forceinline__ static void store(float* p, float v) { *p = v; }
};

template <>
struct Elem<__nv_bfloat16> {
  static constexpr int kPerWord = 2;
  __device__ __forceinline__ static float load(const __nv_bfloat16* p) {
    return __bfloat162float(__ldg(p));
  }
  // bf16 → float is exact: the bf16 bits are the high half of the float's bits.
  __device__ __forceinline__ static void unpack(uint32_t w, float* out) {
    out[0] = __uint_as_float(w << 16);
    out[1] = __uint_as_float(w & 0xffff0000u);
  }
  __device__ __forceinline__ static uint32_t pack(const float* v) {
    const uint32_t lo = __bfloat16_as_ushort(__float2bfloat16_rn(v[0]));
    const uint32_t hi = __bfloat16_as_ushort(__float2bfloat16_rn(v[1]));
    return lo | (hi << 16);
  }
  __device__ __forceinline__ static void store(__nv_bfloat16* p, float v) {
    *p = __float2bfloat16_rn(v);
  }
};

template <>
struct Elem<__half> {
  static constexpr int kPerWord = 2;
  __device__ __forceinline__ static float load(const __half* p) { return __half2float(__ldg(p)); }
  __device__ __forceinline__ static void unpack(uint32_t w, float* out) {
    out[0] = __half2float(__ushort_as_half(static_cast<unsigned short>(w & 0xffffu)));
    out[1] = __half2float(__ushort_as_half(static_cast<unsigned short>(w >> 16)));
  }
  __device__ __forceinline__ static uint32_t pack(const float* v) {
    const uint32_t lo = __half_as_ushort(__float2half_rn(v[0]));
    const uint32_t hi = __half_as_ushort(__float2half_rn(v[1]));
    return lo | (hi << 16);
  }
  __device__ __forceinline__ static void store(__half* p, float v) { *p = __float2half_rn(v); }
};

// VEC consecutive elements from a 16-byte-aligned address, as float. VEC·sizeof(T) is a
// multiple of 16 (VEC is pred's 16-byte width and sizeof(T) ≥ sizeof(pred's type)), so this
// is one or two 128-bit loads.
template <int VEC, typename T>
__device__ __forceinline__ void load_vec(const T* __restrict__ p, float (&out)[VEC]) {
  static_assert((VEC * sizeof(T)) % 16 == 0, "vector must be whole 16-byte words");
  constexpr int kQuads = static_cast<int>(VEC * sizeof(T) / 16);
  constexpr int kPerQuad = VEC / kQuads;
  const uint4* q = reinterpret_cast<const uint4*>(p);
#pragma unroll
  for (int i = 0; i < kQuads; ++i) {
    const uint4 u = __ldg(q + i);
    float* o = out + i * kPerQuad;
    Elem<T>::unpack(u.x, o + 0 * Elem<T>::kPerWord);
    Elem<T>::unpack(u.y, o + 1 * Elem<T>::kPerWord);
    Elem<T>::unpack(u.z, o + 2 * Elem<T>::kPerWord);
    Elem<T>::unpack(u.w, o + 3 * Elem<T>::kPerWord);
  }
}

template <int VEC, typename T>
__device__ __forceinline__ void store_vec(T* __restrict__ p, const float (&v)[VEC]) {
  static_assert(VEC * sizeof(T) == 16, "stores are one 16-byte word");
  uint4 u;
  u.x = Elem<T>::pack(v + 0 * Elem<T>::kPerWord);
  u.y = Elem<T>::pack(v + 1 * Elem<T>::kPerWord);
  u.z = Elem<T>::pack(v + 2 * Elem<T>::kPerWord);
  u.w = Elem<T>::pack(v + 3 * Elem<T>::kPerWord);
  *reinterpret_cast<uint4*>(p) = u;
}

// ------------------------------------------------------------------ deterministic reductions
__device__ __forceinline__ float warp_sum(float v) {
#pragma unroll
  for (int off = 16; off > 0; off >>= 1) v += __shfl_xor_sync(0xffffffffu, v, off);
  return v;
}

// Sum over the block (blockDim.x = THREADS, a multiple of 32), valid in thread 0. The order
// is fixed by the thread layout, so the result is bitwise reproducible. `smem` holds
// THREADS/32 floats; the trailing __syncthreads lets the caller reuse it.
template <int THREADS>
__device__ __forceinline__ float block_sum(float v, float* smem) {
  constexpr int kWarps = THREADS / 32;
  const int lane = threadIdx.x & 31;
  const int warp = threadIdx.x >> 5;
  v = warp_sum(v);
  if (lane == 0) smem[warp] = v;
  __syncthreads();
  v = (threadIdx.x < kWarps) ? smem[lane] : 0.0f;
  if (warp == 0) v = warp_sum(v);
  __syncthreads();
  return v;
}

// The per-pair scalar math (margins, bounded margin, softplus loss, coefficients) lives in
// pair_math.h as __host__ __device__ functions, so that a host test runs the same code.

// ------------------------------------------------------------------ kernel 1: partial errors
template <typename TP, typename TT, typename TR, bool kHasRef>
__global__ void __launch_bounds__(kStreamThreads)
    sq_err_partials_kernel(const TP* __restrict__ pred, const TT* __restrict__ target,
                           const TR* __restrict__ ref, int64_t n, int64_t chunk, int64_t splits,
                           bool vectorized, float* __restrict__ part_theta,
                           float* __restrict__ part_ref) {
  constexpr int VEC = static_cast<int>(16 / sizeof(TP));
  __shared__ float smem[2][kStreamThreads / 32];
  const int64_t blk = blockIdx.x;
  const int64_t row = blk / splits;
  const int64_t start = (blk - row * splits) * chunk;
  const int64_t end = min(n, start + chunk);
  const int64_t base = row * n;
  const TP* __restrict__ p = pred + base;
  const TT* __restrict__ t = target + base;
  const TR* __restrict__ r = kHasRef ? ref + base : nullptr;

  float acc_t = 0.0f;
  float acc_r = 0.0f;
  int64_t tail = start;
  if (vectorized) {
    // start is a multiple of VEC (chunk is), and every row start is 16-byte aligned.
    const int64_t vend = start + (end - start) / VEC * VEC;
    for (int64_t j = start + static_cast<int64_t>(threadIdx.x) * VEC; j < vend;
         j += static_cast<int64_t>(kStreamThreads) * VEC) {
      float vp[VEC], vt[VEC];
      load_vec<VEC>(p + j, vp);
      load_vec<VEC>(t + j, vt);
#pragma unroll
      for (int q = 0; q < VEC; ++q) {
        const float d = vp[q] - vt[q];
        acc_t = fmaf(d, d, acc_t);
      }
      if constexpr (kHasRef) {
        float vr[VEC];
        load_vec<VEC>(r + j, vr);
#pragma unroll
        for (int q = 0; q < VEC; ++q) {
          const float d = vr[q] - vt[q];
          acc_r = fmaf(d, d, acc_r);
        }
      }
    }
    tail = vend;
  }
  // Scalar path: the whole chunk when rows are not 16-byte aligned, else the (< VEC) tail.
  for (int64_t j = tail + threadIdx.x; j < end; j += kStreamThreads) {
    const float tv = Elem<TT>::load(t + j);
    const float d = Elem<TP>::load(p + j) - tv;
    acc_t = fmaf(d, d, acc_t);
    if constexpr (kHasRef) {
      const float dr = Elem<TR>::load(r + j) - tv;
      acc_r = fmaf(dr, dr, acc_r);
    }
  }
  acc_t = block_sum<kStreamThreads>(acc_t, smem[0]);
  if constexpr (kHasRef) acc_r = block_sum<kStreamThreads>(acc_r, smem[1]);
  if (threadIdx.x == 0) {
    part_theta[blk] = acc_t;
    if constexpr (kHasRef) part_ref[blk] = acc_r;
  }
}

// ------------------------------------------------------------------ kernel 2: finalize
// One block. Writes e_theta, e_ref (2P,), coef (2P,) at scale 1, and the loss.
__global__ void __launch_bounds__(kFinalizeThreads)
    finalize_kernel(const float* __restrict__ part_theta, const float* __restrict__ part_ref,
                    const float* __restrict__ ref_err, int64_t splits, int64_t num_pairs,
                    int64_t n, const uint8_t* __restrict__ swap, const float* __restrict__ weight,
                    float half_beta, bool bounded, float lam, float log_lam, float log_rest,
                    int reduction, int loss_type,
                    float* __restrict__ e_theta, float* __restrict__ e_ref,
                    float* __restrict__ coef, float* __restrict__ loss) {
  __shared__ float smem[kFinalizeThreads / 32];
  const int64_t rows = 2 * num_pairs;
  const double inv_n = 1.0 / static_cast<double>(n);
  // Per-sample errors: partials summed in split order (fixed), one thread per sample.
  for (int64_t i = threadIdx.x; i < rows; i += kFinalizeThreads) {
    const float* pt = part_theta + i * splits;
    float st = 0.0f;
    for (int64_t s = 0; s < splits; ++s) st += pt[s];
    e_theta[i] = static_cast<float>(static_cast<double>(st) * inv_n);
    if (ref_err != nullptr) {
      e_ref[i] = ref_err[i];
    } else {
      const float* pr = part_ref + i * splits;
      float sr = 0.0f;
      for (int64_t s = 0; s < splits; ++s) sr += pr[s];
      e_ref[i] = static_cast<float>(static_cast<double>(sr) * inv_n);
    }
  }
  __syncthreads();  // e_theta / e_ref (global) written by this block are now visible to it

  float local = 0.0f;
  for (int64_t k = threadIdx.x; k < num_pairs; k += kFinalizeThreads) {
    const bool swapped = swap != nullptr && swap[k] != 0;
    const int64_t a = swapped ? num_pairs + k : k;
    const int64_t b = swapped ? k : num_pairs + k;
    const float w = weight != nullptr ? weight[k] : 1.0f;
    const math::PairTerms t = math::pair_terms(e_theta[a], e_ref[a], e_theta[b], e_ref[b], w,
                                               half_beta, bounded, lam, log_lam, log_rest,
                                               loss_type);
    const float l = t.loss;
    coef[a] = t.coef_a;
    coef[b] = t.coef_b;
    if (reduction == static_cast<int>(Reduction::kNone)) {
      loss[k] = l;
    } else {
      local += l;
    }
  }
  if (reduction != static_cast<int>(Reduction::kNone)) {
    const float total = block_sum<kFinalizeThreads>(local, smem);
    if (threadIdx.x == 0) {
      loss[0] = reduction == static_cast<int>(Reduction::kMean)
                    ? total / static_cast<float>(num_pairs)
                    : total;
    }
  }
}

// ------------------------------------------------------------------ kernel 3: backward
template <typename TP, typename TT>
__global__ void __launch_bounds__(kStreamThreads)
    grad_kernel(const float* __restrict__ grad_loss, bool per_pair, int64_t num_pairs,
                const float* __restrict__ coef, float scale_2_over_n, const TP* __restrict__ pred,
                const TT* __restrict__ target, TP* __restrict__ grad, int64_t n, int64_t chunk,
                int64_t splits, bool vectorized) {
  constexpr int VEC = static_cast<int>(16 / sizeof(TP));
  const int64_t blk = blockIdx.x;
  const int64_t row = blk / splits;
  const int64_t start = (blk - row * splits) * chunk;
  const int64_t end = min(n, start + chunk);
  const int64_t base = row * n;
  // All scalar factors folded in float32 before the one rounding to pred's dtype.
  const float go = grad_loss[per_pair ? row % num_pairs : 0];
  const float f = coef[row] * go * scale_2_over_n;
  const TP* __restrict__ p = pred + base;
  const TT* __restrict__ t = target + base;
  TP* __restrict__ g = grad + base;

  int64_t tail = start;
  if (vectorized) {
    const int64_t vend = start + (end - start) / VEC * VEC;
    for (int64_t j = start + static_cast<int64_t>(threadIdx.x) * VEC; j < vend;
         j += static_cast<int64_t>(kStreamThreads) * VEC) {
      float vp[VEC], vt[VEC], out[VEC];
      load_vec<VEC>(p + j, vp);
      load_vec<VEC>(t + j, vt);
#pragma unroll
      for (int q = 0; q < VEC; ++q) out[q] = f * (vp[q] - vt[q]);
      store_vec<VEC>(g + j, out);
    }
    tail = vend;
  }
  for (int64_t j = tail + threadIdx.x; j < end; j += kStreamThreads) {
    Elem<TP>::store(g + j, f * (Elem<TP>::load(p + j) - Elem<TT>::load(t + j)));
  }
}

}  // namespace kernels

namespace {

using kernels::finalize_kernel;
using kernels::grad_kernel;
using kernels::sq_err_partials_kernel;

// ------------------------------------------------------------------ host helpers
constexpr Status kOk{0, nullptr, nullptr};

Status cuda_status(cudaError_t err, const char* where) {
  if (err == cudaSuccess) return kOk;
  if (err == cudaErrorNoKernelImageForDevice) {
    return Status{static_cast<int>(err), where,
                  "no kernel image is available for this GPU: the extension was compiled for "
                  "other architectures; rebuild it with SNPO_CUDA_ARCHS set to this GPU's "
                  "compute capability (e.g. SNPO_CUDA_ARCHS=8.6)"};
  }
  return Status{static_cast<int>(err), where, cudaGetErrorString(err)};
}

Status bad_arg(const char* where, const char* detail) { return Status{-1, where, detail}; }

Status check_plan(const Plan& plan, int64_t rows, int64_t n) {
  if (plan.splits < 1 || plan.chunk < 1 || plan.splits * plan.chunk < n ||
      (plan.splits - 1) * plan.chunk >= n) {
    return bad_arg("plan", "inconsistent split plan (splits/chunk do not cover n exactly)");
  }
  if (rows * plan.splits > 0x7fffffffLL) {
    return bad_arg("plan", "too many blocks (2P · splits exceeds the 1-D grid limit 2^31 − 1)");
  }
  return kOk;
}

template <typename TP, typename TT, typename TR, bool kHasRef>
Status launch_partials(const ForwardParams& p, cudaStream_t stream) {
  const int64_t rows = 2 * p.num_pairs;
  const int64_t blocks = rows * p.plan.splits;
  float* part_theta = p.workspace;
  float* part_ref = p.workspace + blocks;
  sq_err_partials_kernel<TP, TT, TR, kHasRef>
      <<<static_cast<unsigned>(blocks), kStreamThreads, 0, stream>>>(
          static_cast<const TP*>(p.pred), static_cast<const TT*>(p.target),
          static_cast<const TR*>(p.ref_pred), p.n, p.plan.chunk, p.plan.splits, p.vectorized,
          part_theta, part_ref);
  return cuda_status(cudaGetLastError(), "launch of sq_err_partials_kernel");
}

template <typename TP, typename TT>
Status dispatch_ref(const ForwardParams& p, cudaStream_t stream) {
  if (p.ref_pred == nullptr) return launch_partials<TP, TT, TP, false>(p, stream);
  if (p.ref_dtype == DType::kFloat32) return launch_partials<TP, TT, float, true>(p, stream);
  if (p.ref_dtype == p.pred_dtype) return launch_partials<TP, TT, TP, true>(p, stream);
  return bad_arg("forward", "ref_pred must have pred's dtype or float32");
}

template <typename TP>
Status dispatch_target(const ForwardParams& p, cudaStream_t stream) {
  if (p.target_dtype == DType::kFloat32) return dispatch_ref<TP, float>(p, stream);
  if (p.target_dtype == p.pred_dtype) return dispatch_ref<TP, TP>(p, stream);
  return bad_arg("forward", "target must have pred's dtype or float32");
}

template <typename TP, typename TT>
Status launch_grad(const BackwardParams& p, cudaStream_t stream) {
  const int64_t blocks = 2 * p.num_pairs * p.plan.splits;
  const double scale = p.reduction == Reduction::kMean ? 1.0 / static_cast<double>(p.num_pairs)
                                                       : 1.0;
  const float scale_2_over_n = static_cast<float>(2.0 * scale / static_cast<double>(p.n));
  grad_kernel<TP, TT><<<static_cast<unsigned>(blocks), kStreamThreads, 0, stream>>>(
      p.grad_loss, p.reduction == Reduction::kNone, p.num_pairs, p.coef, scale_2_over_n,
      static_cast<const TP*>(p.pred), static_cast<const TT*>(p.target),
      static_cast<TP*>(p.grad_pred), p.n, p.plan.chunk, p.plan.splits, p.vectorized);
  return cuda_status(cudaGetLastError(), "launch of grad_kernel");
}

template <typename TP>
Status dispatch_grad_target(const BackwardParams& p, cudaStream_t stream) {
  if (p.target_dtype == DType::kFloat32) return launch_grad<TP, float>(p, stream);
  if (p.target_dtype == p.pred_dtype) return launch_grad<TP, TP>(p, stream);
  return bad_arg("backward", "target must have pred's dtype or float32");
}

constexpr int kMaxDevices = 64;
std::atomic<int> g_sm_count[kMaxDevices];  // 0 = not queried yet

}  // namespace

Status plan_for_current_device(int64_t rows, int64_t n, DType pred_dtype, Plan* plan) {
  int device = 0;
  Status st = cuda_status(cudaGetDevice(&device), "cudaGetDevice");
  if (!st.ok()) return st;
  int sms = (device >= 0 && device < kMaxDevices) ? g_sm_count[device].load() : 0;
  if (sms <= 0) {
    st = cuda_status(cudaDeviceGetAttribute(&sms, cudaDevAttrMultiProcessorCount, device),
                     "cudaDeviceGetAttribute(MultiProcessorCount)");
    if (!st.ok()) return st;
    if (device >= 0 && device < kMaxDevices) g_sm_count[device].store(sms);
  }
  *plan = make_plan(sms, rows, n, vector_width(pred_dtype));
  return check_plan(*plan, rows, n);
}

Status preference_forward(const ForwardParams& p, void* stream_handle) {
  const auto stream = static_cast<cudaStream_t>(stream_handle);
  const int64_t rows = 2 * p.num_pairs;
  if (p.num_pairs < 1 || p.n < 1) return bad_arg("forward", "empty input");
  if ((p.ref_pred == nullptr) == (p.ref_err == nullptr)) {
    return bad_arg("forward", "exactly one of ref_pred and ref_err must be given");
  }
  Status st = check_plan(p.plan, rows, p.n);
  if (!st.ok()) return st;

  switch (p.pred_dtype) {
    case DType::kFloat32:
      st = dispatch_target<float>(p, stream);
      break;
    case DType::kBFloat16:
      st = dispatch_target<__nv_bfloat16>(p, stream);
      break;
    case DType::kFloat16:
      st = dispatch_target<__half>(p, stream);
      break;
    default:
      return bad_arg("forward", "pred must be float32, bfloat16 or float16");
  }
  if (!st.ok()) return st;

  // β, λ arrive in double; whether to bound and log λ, log(1 − λ) are decided in double.
  const math::LossScalars sc = math::loss_scalars(p.beta, p.lam);
  const int64_t blocks = rows * p.plan.splits;
  finalize_kernel<<<1, kFinalizeThreads, 0, stream>>>(
      p.workspace, p.workspace + blocks, p.ref_err, p.plan.splits, p.num_pairs, p.n, p.swap,
      p.weight, sc.half_beta, sc.bounded, sc.lam, sc.log_lam, sc.log_rest,
      static_cast<int>(p.reduction), static_cast<int>(p.loss_type), p.e_theta, p.e_ref, p.coef,
      p.loss);
  return cuda_status(cudaGetLastError(), "launch of finalize_kernel");
}

Status preference_backward(const BackwardParams& p, void* stream_handle) {
  const auto stream = static_cast<cudaStream_t>(stream_handle);
  if (p.num_pairs < 1 || p.n < 1) return bad_arg("backward", "empty input");
  Status st = check_plan(p.plan, 2 * p.num_pairs, p.n);
  if (!st.ok()) return st;
  switch (p.pred_dtype) {
    case DType::kFloat32:
      return dispatch_grad_target<float>(p, stream);
    case DType::kBFloat16:
      return dispatch_grad_target<__nv_bfloat16>(p, stream);
    case DType::kFloat16:
      return dispatch_grad_target<__half>(p, stream);
    default:
      return bad_arg("backward", "pred must be float32, bfloat16 or float16");
  }
}

}  // namespace snpo
