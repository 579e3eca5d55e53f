// Thin torch binding of the fused preference loss: input checks with clear messages, output
// allocation on the caching allocator, the current CUDA stream, and the torch.library ops
//
//   snpo_cuda::forward(pred, target, ref_pred?, ref_err?, swap?, weight?, beta, lam, reduction,
//                      loss_type=0)
//       -> (loss, e_theta, e_ref, coef)
//   snpo_cuda::backward(grad_loss, pred, target, coef, reduction) -> grad_pred
//
// (reduction: 0 mean, 1 sum, 2 none). Their fake (meta) implementations and the autograd
// formula are registered from Python in snpo_kernels/cuda/ops.py (set_python_module below).
//
// Compiled by the host compiler against the torch headers only: no CUDA header is included
// (the stream comes through c10's device-generic guard interface as an opaque handle), so the
// file also compiles against a CPU build of torch, which is what CI checks.

#include <Python.h>

#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/empty_like.h>
#include <c10/core/DeviceGuard.h>
#include <c10/core/impl/VirtualGuardImpl.h>
#include <torch/library.h>
#include <torch/version.h>

// current_stream() below uses c10::Stream::native_handle(), which torch has since 2.11.
#if defined(TORCH_VERSION_MAJOR) && defined(TORCH_VERSION_MINOR) && \
    (TORCH_VERSION_MAJOR * 100 + TORCH_VERSION_MINOR) < 211
#error "the snpo CUDA backend needs torch >= 2.11 (c10::Stream::native_handle); use backend='triton' or 'torch' with older torch"
#endif

#include <cmath>
#include <cstdint>
#include <optional>
#include <tuple>

#include "preference_loss.h"

// The architectures the kernels were compiled for, as one identifier set by the build
// (snpo_kernels/cuda/build.py: -DSNPO_CUDA_ARCHS=sm80_sm90_ptx90); exposed as `archs`.
#define SNPO_XSTR_(a) #a
#define SNPO_XSTR(a) SNPO_XSTR_(a)
#ifdef SNPO_CUDA_ARCHS
#define SNPO_CUDA_ARCHS_STR SNPO_XSTR(SNPO_CUDA_ARCHS)
#else
#define SNPO_CUDA_ARCHS_STR ""
#endif

namespace {

constexpr int64_t kMean = static_cast<int64_t>(snpo::Reduction::kMean);
constexpr int64_t kNone = static_cast<int64_t>(snpo::Reduction::kNone);

std::optional<snpo::DType> to_dtype(at::ScalarType t) {
  switch (t) {
    case at::kFloat:
      return snpo::DType::kFloat32;
    case at::kBFloat16:
      return snpo::DType::kBFloat16;
    case at::kHalf:
      return snpo::DType::kFloat16;
    default:
      return std::nullopt;
  }
}

void check_cuda_tensor(const at::Tensor& t, const char* name, const at::Device& device) {
  TORCH_CHECK(t.defined(), "snpo_cuda: ", name, " is an undefined tensor");
  TORCH_CHECK(t.is_cuda(), "snpo_cuda: ", name, " must be a CUDA tensor, got one on ", t.device());
  TORCH_CHECK(t.device() == device, "snpo_cuda: ", name, " is on ", t.device(),
              " but pred is on ", device, "; move all inputs to one device");
  TORCH_CHECK(t.is_contiguous(), "snpo_cuda: ", name,
              " must be contiguous (the Python wrapper calls .contiguous() first); got sizes ",
              t.sizes(), " and strides ", t.strides());
}

// target / ref_pred: pred's dtype or float32 (exact float32 targets with bf16 predictions).
snpo::DType companion_dtype(const at::Tensor& t, const char* name, const at::Tensor& pred) {
  TORCH_CHECK(t.scalar_type() == pred.scalar_type() || t.scalar_type() == at::kFloat,
              "snpo_cuda: ", name, " has dtype ", t.scalar_type(), " but pred has dtype ",
              pred.scalar_type(), "; the CUDA kernels take ", name,
              " in pred's dtype or in float32 (cast it first)");
  return *to_dtype(t.scalar_type());
}

bool aligned16(const void* p) { return reinterpret_cast<std::uintptr_t>(p) % 16 == 0; }

// The current CUDA stream of `device` as an opaque cudaStream_t, without CUDA headers
// (c10::Stream::native_handle(): torch >= 2.11, checked above).
void* current_stream(const at::Device& device) {
  const c10::impl::VirtualGuardImpl impl(c10::DeviceType::CUDA);
  return impl.getStream(device).native_handle();
}

void raise_if_failed(const snpo::Status& st) {
  TORCH_CHECK(st.ok(), "snpo_cuda: ", st.where, " failed: ", st.detail, " (error code ",
              st.code, ")");
}

snpo::DType pred_dtype_of(const at::Tensor& pred) {
  const auto dt = to_dtype(pred.scalar_type());
  TORCH_CHECK(dt.has_value(), "snpo_cuda: pred has dtype ", pred.scalar_type(),
              "; the CUDA kernels take float32, bfloat16 or float16 (use backend='torch' for ",
              "float64)");
  return *dt;
}

void check_pred(const at::Tensor& pred) {
  TORCH_CHECK(pred.defined() && pred.is_cuda(), "snpo_cuda: pred must be a CUDA tensor");
  TORCH_CHECK(pred.dim() >= 1 && pred.size(0) >= 2 && pred.size(0) % 2 == 0,
              "snpo_cuda: pred must have shape (2P, ...) with P >= 1 (winners then losers), "
              "got ",
              pred.sizes());
  TORCH_CHECK(pred.numel() > 0, "snpo_cuda: pred has no elements per sample (shape ",
              pred.sizes(), ")");
}

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> forward(
    const at::Tensor& pred, const at::Tensor& target, const std::optional<at::Tensor>& ref_pred,
    const std::optional<at::Tensor>& ref_err, const std::optional<at::Tensor>& swap,
    const std::optional<at::Tensor>& weight, double beta, double lam, int64_t reduction,
    int64_t loss_type) {
  check_pred(pred);
  const at::Device device = pred.device();
  check_cuda_tensor(pred, "pred", device);
  const snpo::DType pd = pred_dtype_of(pred);
  const int64_t rows = pred.size(0);
  const int64_t num_pairs = rows / 2;
  const int64_t n = pred.numel() / rows;

  check_cuda_tensor(target, "target", device);
  TORCH_CHECK(target.sizes() == pred.sizes(), "snpo_cuda: target has shape ", target.sizes(),
              " but pred has shape ", pred.sizes());
  const snpo::DType td = companion_dtype(target, "target", pred);

  const bool has_ref_pred = ref_pred.has_value() && ref_pred->defined();
  const bool has_ref_err = ref_err.has_value() && ref_err->defined();
  TORCH_CHECK(has_ref_pred != has_ref_err,
              "snpo_cuda: give exactly one of ref_pred (reference predictions) and ref_err "
              "(cached reference errors)");
  snpo::DType rd = pd;
  if (has_ref_pred) {
    check_cuda_tensor(*ref_pred, "ref_pred", device);
    TORCH_CHECK(ref_pred->sizes() == pred.sizes(), "snpo_cuda: ref_pred has shape ",
                ref_pred->sizes(), " but pred has shape ", pred.sizes());
    rd = companion_dtype(*ref_pred, "ref_pred", pred);
  } else {
    check_cuda_tensor(*ref_err, "ref_err", device);
    TORCH_CHECK(ref_err->scalar_type() == at::kFloat, "snpo_cuda: ref_err must be float32, got ",
                ref_err->scalar_type());
    TORCH_CHECK(ref_err->dim() == 1 && ref_err->size(0) == rows, "snpo_cuda: ref_err has shape ",
                ref_err->sizes(), "; expected (", rows, ",)");
  }
  const bool has_swap = swap.has_value() && swap->defined();
  if (has_swap) {
    check_cuda_tensor(*swap, "swap", device);
    TORCH_CHECK(swap->scalar_type() == at::kBool, "snpo_cuda: swap must be bool, got ",
                swap->scalar_type());
    TORCH_CHECK(swap->dim() == 1 && swap->size(0) == num_pairs, "snpo_cuda: swap has shape ",
                swap->sizes(), "; expected (", num_pairs, ",)");
  }
  const bool has_weight = weight.has_value() && weight->defined();
  if (has_weight) {
    check_cuda_tensor(*weight, "weight", device);
    TORCH_CHECK(weight->scalar_type() == at::kFloat, "snpo_cuda: weight must be float32, got ",
                weight->scalar_type());
    TORCH_CHECK(weight->dim() == 1 && weight->size(0) == num_pairs,
                "snpo_cuda: weight has shape ", weight->sizes(), "; expected (", num_pairs, ",)");
  }
  TORCH_CHECK(std::isfinite(beta) && beta > 0.0, "snpo_cuda: beta must be finite and > 0, got ",
              beta);
  TORCH_CHECK(lam > 0.0 && lam <= 1.0, "snpo_cuda: lam must lie in (0, 1], got ", lam);
  TORCH_CHECK(reduction >= kMean && reduction <= kNone,
              "snpo_cuda: reduction must be 0 (mean), 1 (sum) or 2 (none), got ", reduction);

  TORCH_CHECK(loss_type >= 0 && loss_type <= 2,
              "snpo_cuda: loss_type must be 0 (sigmoid), 1 (hinge) or 2 (ipo), got ", loss_type);

  const c10::DeviceGuard guard(device);
  const auto fopts = pred.options().dtype(at::kFloat);
  at::Tensor e_theta = at::empty({rows}, fopts);
  at::Tensor e_ref = at::empty({rows}, fopts);
  at::Tensor coef = at::empty({rows}, fopts);
  at::Tensor loss = reduction == kNone ? at::empty({num_pairs}, fopts) : at::empty({}, fopts);

  snpo::Plan plan{};
  raise_if_failed(snpo::plan_for_current_device(rows, n, pd, &plan));
  at::Tensor workspace = at::empty({2 * rows * plan.splits}, fopts);

  snpo::ForwardParams p{};
  p.pred = pred.data_ptr();
  p.target = target.data_ptr();
  p.ref_pred = has_ref_pred ? ref_pred->data_ptr() : nullptr;
  p.ref_err = has_ref_err ? ref_err->data_ptr<float>() : nullptr;
  p.swap = has_swap ? static_cast<const uint8_t*>(swap->data_ptr()) : nullptr;
  p.weight = has_weight ? weight->data_ptr<float>() : nullptr;
  p.pred_dtype = pd;
  p.target_dtype = td;
  p.ref_dtype = rd;
  p.num_pairs = num_pairs;
  p.n = n;
  p.beta = beta;  // double: the launcher decides λ < 1 and the logs in double
  p.lam = lam;
  p.reduction = static_cast<snpo::Reduction>(reduction);
  p.loss_type = static_cast<int>(loss_type);
  p.vectorized = n % snpo::vector_width(pd) == 0 && aligned16(p.pred) && aligned16(p.target) &&
                 (p.ref_pred == nullptr || aligned16(p.ref_pred));
  p.plan = plan;
  p.workspace = workspace.data_ptr<float>();
  p.e_theta = e_theta.data_ptr<float>();
  p.e_ref = e_ref.data_ptr<float>();
  p.coef = coef.data_ptr<float>();
  p.loss = loss.data_ptr<float>();
  raise_if_failed(snpo::preference_forward(p, current_stream(device)));
  return {loss, e_theta, e_ref, coef};
}

at::Tensor backward(const at::Tensor& grad_loss, const at::Tensor& pred, const at::Tensor& target,
                    const at::Tensor& coef, int64_t reduction) {
  check_pred(pred);
  const at::Device device = pred.device();
  check_cuda_tensor(pred, "pred", device);
  const snpo::DType pd = pred_dtype_of(pred);
  const int64_t rows = pred.size(0);
  const int64_t num_pairs = rows / 2;
  const int64_t n = pred.numel() / rows;
  check_cuda_tensor(target, "target", device);
  TORCH_CHECK(target.sizes() == pred.sizes(), "snpo_cuda: target has shape ", target.sizes(),
              " but pred has shape ", pred.sizes());
  const snpo::DType td = companion_dtype(target, "target", pred);
  check_cuda_tensor(coef, "coef", device);
  TORCH_CHECK(coef.scalar_type() == at::kFloat && coef.dim() == 1 && coef.size(0) == rows,
              "snpo_cuda: coef must be float32 of shape (", rows, ",), got ", coef.scalar_type(),
              " ", coef.sizes());
  TORCH_CHECK(reduction >= kMean && reduction <= kNone,
              "snpo_cuda: reduction must be 0 (mean), 1 (sum) or 2 (none), got ", reduction);
  check_cuda_tensor(grad_loss, "grad_loss", device);
  TORCH_CHECK(grad_loss.scalar_type() == at::kFloat, "snpo_cuda: grad_loss must be float32, got ",
              grad_loss.scalar_type());
  const int64_t want = reduction == kNone ? num_pairs : 1;
  TORCH_CHECK(grad_loss.numel() == want, "snpo_cuda: grad_loss has ", grad_loss.numel(),
              " elements; expected ", want, reduction == kNone ? " (one per pair)" : " (a scalar)");

  const c10::DeviceGuard guard(device);
  at::Tensor grad = at::empty_like(pred, at::MemoryFormat::Contiguous);
  snpo::Plan plan{};
  raise_if_failed(snpo::plan_for_current_device(rows, n, pd, &plan));

  snpo::BackwardParams p{};
  p.grad_loss = grad_loss.data_ptr<float>();
  p.pred = pred.data_ptr();
  p.target = target.data_ptr();
  p.coef = coef.data_ptr<float>();
  p.grad_pred = grad.data_ptr();
  p.pred_dtype = pd;
  p.target_dtype = td;
  p.num_pairs = num_pairs;
  p.n = n;
  p.reduction = static_cast<snpo::Reduction>(reduction);
  p.vectorized = n % snpo::vector_width(pd) == 0 && aligned16(p.pred) && aligned16(p.target) &&
                 aligned16(p.grad_pred);
  p.plan = plan;
  raise_if_failed(snpo::preference_backward(p, current_stream(device)));
  return grad;
}

}  // namespace

TORCH_LIBRARY(snpo_cuda, m) {
  m.set_python_module("snpo_kernels.cuda.ops");
  m.def(
      "forward(Tensor pred, Tensor target, Tensor? ref_pred, Tensor? ref_err, Tensor? swap, "
      "Tensor? weight, float beta, float lam, int reduction, int loss_type=0) -> (Tensor, Tensor, "
      "Tensor, Tensor)");
  m.def("backward(Tensor grad_loss, Tensor pred, Tensor target, Tensor coef, int reduction) -> "
        "Tensor");
}

TORCH_LIBRARY_IMPL(snpo_cuda, CUDA, m) {
  m.impl("forward", &forward);
  m.impl("backward", &backward);
}

// A minimal Python module (no pybind11: the binding stays quick to compile): importing it
// loads this library, whose static initialisers above register the ops. TORCH_EXTENSION_NAME
// is set by torch's build helpers (setup.py's CUDAExtension, the JIT load()).
#ifndef TORCH_EXTENSION_NAME
#define TORCH_EXTENSION_NAME _C
#endif
#define SNPO_CONCAT_(a, b) a##b
#define SNPO_CONCAT(a, b) SNPO_CONCAT_(a, b)
#define SNPO_STR_(a) #a
#define SNPO_STR(a) SNPO_STR_(a)

PyMODINIT_FUNC SNPO_CONCAT(PyInit_, TORCH_EXTENSION_NAME)(void) {
  static PyModuleDef def = {
      PyModuleDef_HEAD_INIT,
      SNPO_STR(TORCH_EXTENSION_NAME),
      "snpo fused preference loss (CUDA); the ops live in torch.ops.snpo_cuda",
      -1,
      nullptr,  // methods
      nullptr,  // slots
      nullptr,  // traverse
      nullptr,  // clear
      nullptr,  // free
  };
  PyObject* m = PyModule_Create(&def);
  if (m != nullptr && PyModule_AddStringConstant(m, "archs", SNPO_CUDA_ARCHS_STR) != 0) {
    Py_DECREF(m);
    return nullptr;
  }
  return m;
}
