// Host interface of the fused preference-loss kernels (csrc/preference_loss_kernels.cu).
//
// Plain C++17: no CUDA and no torch headers, so that the thin torch binding (binding.cpp,
// compiled by the host compiler) and the kernels (compiled by nvcc) only meet here. Tensors
// travel as raw pointers, the stream as an opaque cudaStream_t (void*); errors come back as a
// Status naming the failed step, never as an exception across the boundary.
//
// Layout (the contract of docs/objectives.md): pred/target/ref_pred are contiguous (2P, N)
// row-major (any trailing shape flattened), rows 0..P-1 the winners, P..2P-1 the losers.
#pragma once

#include <cstdint>

namespace snpo {

// Element types the kernels read. pred is one of the three; target and ref_pred are either
// pred's type or kFloat32 (a float32 target with bf16 predictions is common); ref_err is
// float32. Anything else is rejected by the binding (the Python wrapper casts first).
enum class DType : int32_t { kFloat32 = 0, kBFloat16 = 1, kFloat16 = 2 };

// How the P pair losses are reduced: mean → scalar (backward scale 1/P), sum → scalar,
// none → (P,) (backward reads one grad_output per pair).
enum class Reduction : int32_t { kMean = 0, kSum = 1, kNone = 2 };

// Launch threads of the streaming kernels (per-sample partial errors and the backward).
constexpr int kStreamThreads = 128;
// Threads of the single-block finalize kernel.
constexpr int kFinalizeThreads = 256;
// Upper bound on blocks per sample row (partials per row).
constexpr int64_t kMaxSplits = 1024;
// Target resident blocks per SM when splitting rows.
constexpr int64_t kBlocksPerSm = 4;

// Elements per 16-byte vector of pred: 4 for float32, 8 for bf16/fp16.
constexpr int vector_width(DType pred_dtype) { return pred_dtype == DType::kFloat32 ? 4 : 8; }

// How the (rows × n) elements are cut into blocks: row r, split s covers elements
// [s·chunk, min(n, (s+1)·chunk)) of row r; the grid is rows·splits blocks (1-D, so rows is
// not limited by gridDim.y). chunk is a multiple of the vector width.
struct Plan {
  int64_t splits;
  int64_t chunk;
};

// The split heuristic, pure so that it can be reasoned about (and tested) without a GPU:
// enough blocks for kBlocksPerSm per SM, but at least one full vector per thread per block.
// E.g. 132 SMs, 16 rows × 16384 bf16 → 16 splits of 1024 (256 blocks); fp32 → 32 splits of 512.
inline Plan make_plan(int64_t sm_count, int64_t rows, int64_t n, int vec) {
  const int64_t min_chunk = static_cast<int64_t>(kStreamThreads) * vec;
  const int64_t target_blocks = (sm_count > 0 ? sm_count : 1) * kBlocksPerSm;
  int64_t want = (target_blocks + rows - 1) / rows;
  const int64_t by_work = (n + min_chunk - 1) / min_chunk;
  int64_t splits = want < by_work ? want : by_work;
  if (splits < 1) splits = 1;
  if (splits > kMaxSplits) splits = kMaxSplits;
  int64_t chunk = (n + splits - 1) / splits;
  chunk = (chunk + vec - 1) / vec * vec;
  splits = (n + chunk - 1) / chunk;
  return Plan{splits, chunk};
}

// Result of a host-side call: ok() or the failed step and the CUDA error text.
struct Status {
  int code;            // 0 = success, else the cudaError_t value (or -1 for a bad argument)
  const char* where;   // which step failed (static string)
  const char* detail;  // cudaGetErrorString(...) or a static description
  bool ok() const { return code == 0; }
};

// The current device's SM count (cached per device; no synchronisation) and the plan for it.
Status plan_for_current_device(int64_t rows, int64_t n, DType pred_dtype, Plan* plan);

struct ForwardParams {
  const void* pred;      // (2P, n) pred_dtype
  const void* target;    // (2P, n) target_dtype
  const void* ref_pred;  // (2P, n) ref_dtype, or nullptr when ref_err is given
  const float* ref_err;  // (2P,) float32, or nullptr when ref_pred is given
  const uint8_t* swap;   // (P,) bool (one byte each), or nullptr = no pair swapped
  const float* weight;   // (P,) float32, or nullptr = weight 1
  DType pred_dtype;
  DType target_dtype;
  DType ref_dtype;       // ignored without ref_pred
  int64_t num_pairs;     // P
  int64_t n;             // elements per sample
  double beta;           // > 0 (the kernels use β/2 in float32)
  double lam;            // (0, 1]; kept in double: λ < 1 and log λ, log(1 − λ) are decided in
                         // double (a λ within 2⁻²⁵ of 1 is 1.0f but still bounds m̃_b)
  Reduction reduction;
  int loss_type;         // math::LossType: 0 sigmoid, 1 hinge, 2 ipo
  bool vectorized;       // every base pointer 16-byte aligned and n % vector_width == 0
  Plan plan;
  float* workspace;      // 2 · 2P · plan.splits floats (partial sums; fully overwritten)
  float* e_theta;        // out (2P,)
  float* e_ref;          // out (2P,)
  float* coef;           // out (2P,): c_i at scale 1 (without 1/P and grad_output)
  float* loss;           // out: scalar, or (P,) for Reduction::kNone
};

// Two launches on `stream` (partial errors over a rows × splits grid, then one finalize
// block); no host synchronisation, deterministic (fixed-order reductions, no atomics).
Status preference_forward(const ForwardParams& p, void* stream);

struct BackwardParams {
  const float* grad_loss;  // scalar (mean/sum) or (P,) (none), float32, on the device
  const void* pred;        // (2P, n)
  const void* target;      // (2P, n)
  const float* coef;       // (2P,) from the forward
  void* grad_pred;         // out (2P, n), pred_dtype
  DType pred_dtype;
  DType target_dtype;
  int64_t num_pairs;
  int64_t n;
  Reduction reduction;
  bool vectorized;  // as in ForwardParams, for pred, target and grad_pred
  Plan plan;
};

// One elementwise launch: grad[i, j] = coef_i · scale · grad_loss[k(i)] · 2/n · (pred − target).
Status preference_backward(const BackwardParams& p, void* stream);

}  // namespace snpo
