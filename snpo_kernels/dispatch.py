"""The single dispatch point: "auto" picks cuda → triton → torch; a named backend is used or
refused with the reason.

A backend is a module with
    availability(device: torch.device, dtype: torch.dtype) -> str | None   (None: usable, else why not)
    run(inputs: LossInputs) -> (loss, e_theta, e_ref)
imported lazily so that ``import snpo_kernels`` needs torch alone.

Self-check of the fused backends (``backend="auto"`` only). The CUDA and Triton kernels have
not yet been shown to pass the GPU test suite on a GPU (no committed GPU result), so before
"auto" first uses a fused backend for a *shape class* it runs that backend once against the
torch reference (:func:`run_self_check`) and keeps it only if values and gradient agree:

- shape class = (backend, device, pred / target / reference dtypes, ref_pred or ref_err,
  swap given, weight given, λ < 1, reduction, 2P, N): each distinct configuration is checked
  once per process (a training run has a handful).
- inputs: synthetic, seeded, of the call's shapes, dtypes and (dense) strides, on its device,
  with β = 4 and O(1) margins, so that the logits z are O(1) and both the loss and the
  gradient coefficients are sensitive to any error; the call's own λ and reduction.
- tolerance (:func:`_compare`): bf16 level for the last rounding of the outputs, plus the
  float32 accumulation error amplified by the condition number:
  |Δℓ| ≤ 4·ε_bf16·|ℓ| + 64·ε₃₂·Σ_i |c_i|·(|e_θ,i| + |e_ref,i|) (c_i = ∂ℓ/∂e_i), and per
  gradient element |Δg| ≤ (4·ε_bf16 + 64·ε₃₂·(1 + K_k))·|g| + tiny(dtype), with
  K_k = (β/2 + 1)·w_k·Σ_{i∈k}(|e_θ,i| + |e_ref,i|) the condition number of pair k's
  gradient coefficients. Loose enough for any correct kernel, tight enough for a wrong index,
  formula or uninitialised memory (a 2 % error in a coefficient fails).
- on a mismatch, a NaN, or an exception the backend is marked failed for the rest of the
  process (one :class:`SelfCheckWarning`, one line), and "auto" moves on to the next
  candidate (triton after cuda), finally torch.
- :func:`self_check_verdicts` returns the verdicts; :func:`reset_self_check` forgets them.
- ``SNPO_SELF_CHECK=0`` skips the check (set it, or flip :data:`SELF_CHECK_DEFAULT`, once a
  committed GPU result shows the GPU suite passing); ``SNPO_BACKEND=<name>`` and an explicit
  ``backend=<name>`` are never self-checked or overridden.
- under ``torch.compile`` tracing or CUDA-graph capture no check can run (it compares on the
  host): "auto" then picks a fused backend only if it already passed a check in this
  process (else torch). Call the loss once eagerly first, or set SNPO_SELF_CHECK=0.
"""

from __future__ import annotations

import dataclasses
import os
import warnings
from types import ModuleType

import torch

from .reference import gradient_coefficients, pair_logits, reference_of
from .validation import LossInputs

BACKENDS = ("torch", "triton", "cuda")
# Set SNPO_BACKEND to force a backend for "auto" (e.g. to compare paths inside a trainer).
ENV_OVERRIDE = "SNPO_BACKEND"
# Set SNPO_SELF_CHECK=0 to skip the self-check of the fused backends under "auto".
SELF_CHECK_ENV = "SNPO_SELF_CHECK"
# Whether "auto" self-checks by default: True until a committed GPU result shows the GPU test
# suite passing (then set it to False).
SELF_CHECK_DEFAULT = True
SELF_CHECK_BETA = 4.0
SELF_CHECK_SEED = 20240917
_BF16_EPS = 2.0**-8  # bfloat16's unit roundoff: the tolerance of the outputs' last rounding
_TOL_FACTOR = 4.0
_ACC_FACTOR = 64.0  # float32 accumulation of N-term sums in another order, amplified by K


class BackendUnavailableError(RuntimeError):
    """A backend was asked for by name but cannot run these inputs here."""


class SelfCheckWarning(RuntimeWarning):
    """A fused backend disagreed with the torch reference; "auto" no longer picks it."""


@dataclasses.dataclass(frozen=True)
class SelfCheckVerdict:
    """The outcome of one self-check: ``ok``, and a one-line ``detail``."""

    backend: str
    key: tuple
    ok: bool
    detail: str


_VERDICTS: dict[tuple, SelfCheckVerdict] = {}
_PASSED: set[str] = set()  # backends with at least one passing check
_FAILED: set[str] = set()  # backends that failed a check: "auto" skips them from then on


class _TorchBackend:
    """The PyTorch reference (autograd through the formulas); runs everywhere, any float dtype."""

    @staticmethod
    def availability(device: torch.device, dtype: torch.dtype) -> str | None:
        return None

    @staticmethod
    def run(x: LossInputs):
        return reference_of(x)


def _load(name: str) -> ModuleType | type[_TorchBackend] | str:
    """The backend's module, or the reason it cannot be imported."""
    # plain imports (not importlib) so that torch.compile(fullgraph=True) traces through here
    if name == "torch":
        return _TorchBackend
    try:
        if name == "triton":
            from .triton import backend
        else:
            from .cuda import backend
    except ImportError as err:  # triton not installed, extension not built, ...
        return f"cannot import snpo_kernels.{name}.backend: {err}"
    return backend


def check_backend_name(backend: object) -> str:
    """``backend`` if it is "auto" or one of BACKENDS, else TypeError / ValueError."""
    if not isinstance(backend, str):
        raise TypeError(f"backend must be a string, got {type(backend).__name__}")
    if backend != "auto" and backend not in BACKENDS:
        raise ValueError(f"unknown backend {backend!r}; choose one of {('auto',) + BACKENDS}")
    return backend


def backend_availability(name: str, device: torch.device, dtype: torch.dtype) -> str | None:
    """None if backend ``name`` can run on (device, dtype), else a sentence saying why not."""
    if name not in BACKENDS:
        raise ValueError(f"unknown backend {name!r}; choose one of {('auto',) + BACKENDS}")
    mod = _load(name)
    if isinstance(mod, str):
        return mod
    return mod.availability(device, dtype)


def available_backends(device: torch.device | str = "cpu", dtype: torch.dtype = torch.float32):
    """Names of the backends usable on this device and dtype, in "auto" preference order."""
    device = torch.device(device)
    return [
        n for n in ("cuda", "triton", "torch") if backend_availability(n, device, dtype) is None
    ]


def _fused_candidates(device: torch.device) -> tuple[str, ...]:
    """The fused backends "auto" considers on ``device``, in order (CUDA devices only)."""
    return ("cuda", "triton") if device.type == "cuda" else ()


def _forced() -> str | None:
    """The SNPO_BACKEND override, checked, or None."""
    forced = os.environ.get(ENV_OVERRIDE, "")
    if not forced or forced == "auto":
        return None
    if forced not in BACKENDS:
        raise ValueError(
            f"{ENV_OVERRIDE}={forced!r} is not a backend; choose one of {BACKENDS} (or unset it)"
        )
    return forced


def _named(requested: str, device: torch.device, dtype: torch.dtype) -> str:
    why = backend_availability(requested, device, dtype)
    if why is not None:
        raise BackendUnavailableError(
            f'backend "{requested}" cannot run here: {why}. Use backend="auto" or "torch".'
        )
    return requested


def resolve_backend(requested: str, device: torch.device, dtype: torch.dtype) -> str:
    """The backend that will run: "auto" → first usable of cuda, triton (CUDA devices only) and
    torch, skipping a backend that failed its self-check in this process; a named one →
    itself, or BackendUnavailableError with the reason. (The self-check itself needs the
    inputs: :func:`select_backend`.)"""
    check_backend_name(requested)
    if requested == "auto":
        requested = _forced() or "auto"
    if requested != "auto":
        return _named(requested, device, dtype)
    for name in _fused_candidates(device):
        if name not in _FAILED and backend_availability(name, device, dtype) is None:
            return name
    return "torch"


def select_backend(requested: str, x: LossInputs) -> str:
    """The backend that runs the validated inputs ``x``: :func:`resolve_backend`, plus, for
    "auto" without SNPO_BACKEND, the self-check of a fused backend (module docstring)."""
    check_backend_name(requested)
    device, dtype = x.pred.device, x.pred.dtype
    if requested != "auto" or _forced() is not None:
        return resolve_backend(requested, device, dtype)
    for name in _fused_candidates(device):
        if name in _FAILED or backend_availability(name, device, dtype) is not None:
            continue
        if _trusted(name, x):
            return name
    return "torch"


def self_check_enabled() -> bool:
    """Whether "auto" self-checks fused backends (SNPO_SELF_CHECK, default SELF_CHECK_DEFAULT)."""
    value = os.environ.get(SELF_CHECK_ENV, "").strip().lower()
    if value == "":
        return SELF_CHECK_DEFAULT
    if value in ("0", "false", "no", "off"):
        return False
    if value in ("1", "true", "yes", "on"):
        return True
    raise ValueError(f"{SELF_CHECK_ENV}={value!r}: expected 0 or 1")


def self_check_verdicts() -> dict[tuple, SelfCheckVerdict]:
    """The self-check verdicts of this process, by shape-class key (see the module docstring)."""
    return dict(_VERDICTS)


def reset_self_check() -> None:
    """Forget every verdict (tests; or after fixing a backend in a live process)."""
    _VERDICTS.clear()
    _PASSED.clear()
    _FAILED.clear()


def _capturing() -> bool:
    if torch.compiler.is_compiling():
        return True
    return torch.cuda.is_available() and torch.cuda.is_current_stream_capturing()


def _trusted(name: str, x: LossInputs) -> bool:
    if not self_check_enabled():
        return True
    if _capturing():
        return name in _PASSED
    key = shape_class(name, x)
    verdict = _VERDICTS.get(key)
    if verdict is None:
        verdict = run_self_check(name, x)
        _VERDICTS[key] = verdict
        if verdict.ok:
            _PASSED.add(name)
        else:
            _FAILED.add(name)
            warnings.warn(
                f'snpo_kernels: backend "{name}" failed its self-check against the torch '
                f'reference ({verdict.detail}); backend="auto" will not use it in this '
                f"process (SNPO_BACKEND={name} forces it)",
                SelfCheckWarning,
                stacklevel=4,
            )
    return verdict.ok


def _dtype(t: torch.Tensor | None) -> torch.dtype | None:
    return None if t is None else t.dtype


def shape_class(name: str, x: LossInputs) -> tuple:
    """The key under which a self-check verdict is kept (module docstring)."""
    rows = x.pred.shape[0]
    return (
        name,
        str(x.pred.device),
        x.pred.dtype,
        x.target.dtype,
        _dtype(x.ref_pred),
        _dtype(x.ref_err),
        x.swap is not None,
        _dtype(x.weight),
        x.lam < 1.0,
        x.reduction,
        rows,
        x.pred.numel() // rows,
        x.loss_type,
    )


def _like(t: torch.Tensor, values: torch.Tensor) -> torch.Tensor:
    """``values`` in t's dtype, device and (when dense) strides."""
    out = torch.empty_like(t, memory_format=torch.preserve_format, requires_grad=False)
    return out.copy_(values.reshape(t.shape))


def synthetic_inputs(x: LossInputs) -> LossInputs:
    """Seeded inputs of x's configuration with O(1) margins (β = SELF_CHECK_BETA)."""
    g = torch.Generator().manual_seed(SELF_CHECK_SEED)
    rows = x.pred.shape[0]
    p = rows // 2
    n = x.pred.numel() // rows
    f64 = torch.float64
    target = torch.randn(rows, n, generator=g, dtype=f64)
    ref = target + torch.randn(rows, n, generator=g, dtype=f64)  # e_ref ≈ 1
    scale = 0.5 + torch.rand(rows, 1, generator=g, dtype=f64)  # e_θ ≈ scale² ∈ [0.25, 2.25]
    pred = target + scale * torch.randn(rows, n, generator=g, dtype=f64)
    swap = torch.rand(p, generator=g) < 0.5
    weight = 0.5 + torch.rand(p, generator=g, dtype=f64)
    dev = x.pred.device
    s_target = _like(x.target, target)
    ref_pred = ref_err = None
    if x.ref_pred is not None:
        ref_pred = _like(x.ref_pred, ref)
    else:
        ref_err = _like(x.ref_err, (ref - target).pow(2).mean(dim=1))
    return LossInputs(
        pred=_like(x.pred, pred),
        target=s_target,
        ref_pred=ref_pred,
        ref_err=ref_err,
        swap=None if x.swap is None else swap.to(dev),
        weight=None if x.weight is None else weight.to(device=dev, dtype=x.weight.dtype),
        beta=SELF_CHECK_BETA,
        lam=x.lam,
        reduction=x.reduction,
        loss_type=x.loss_type,
    )


def _loss_and_grad(name: str, x: LossInputs, grad_output: torch.Tensor):
    leaf = x.pred.detach().clone(memory_format=torch.preserve_format).requires_grad_(True)
    loss, e_theta, e_ref = run_backend(name, dataclasses.replace(x, pred=leaf))
    (grad,) = torch.autograd.grad(loss, leaf, grad_output.to(loss))
    return loss.detach(), grad, e_theta, e_ref


def _compare(x: LossInputs, got, want) -> str | None:
    """None if the fused (got) and torch (want) results agree to the tolerance of the module
    docstring, else a short description of the disagreement."""
    loss, grad, _, _ = got
    w_loss, w_grad, e_theta, e_ref = want
    f64 = torch.float64
    if loss.shape != w_loss.shape or grad.shape != w_grad.shape:
        return f"shapes differ: loss {tuple(loss.shape)}, grad {tuple(grad.shape)}"
    if not (torch.isfinite(loss).all() and torch.isfinite(grad).all()):
        return "non-finite loss or gradient"
    e_th, e_rf = e_theta.to(f64), e_ref.to(f64)
    w = None if x.weight is None else x.weight.to(f64)
    p = x.num_pairs
    # Σ_i |∂ℓ_k/∂e_i|·(|e_θ,i| + |e_ref,i|) per pair: the loss's condition number
    coef = gradient_coefficients(e_th, e_rf, x.swap, w, x.beta, x.lam, 1.0, x.loss_type).abs()
    sens = coef * (e_th.abs() + e_rf.abs())
    sens_pair = sens[:p] + sens[p:]
    # K_k = (β/2 + 1)·w_k·Σ(|e_θ| + |e_ref|): the condition number of the pair's gradient
    # coefficients (σ(−z) and s_b have relative slopes ≤ 1 in z and m_b)
    mag = e_th.abs() + e_rf.abs()
    k_pair = (0.5 * x.beta + 1.0) * (mag[:p] + mag[p:])
    if w is not None:
        k_pair = k_pair * w
    if x.loss_type == "ipo":
        # G = −2(z − ½)/β′² has relative slope 1/|z − ½| in z (σ(−z)'s is ≤ 1)
        z, _, _ = pair_logits(e_th, e_rf, x.swap, w, x.beta, x.lam)
        k_pair = k_pair * (1.0 / (z - 0.5).abs()).clamp_min(1.0)
    out_eps, acc_eps = _TOL_FACTOR * _BF16_EPS, _ACC_FACTOR * torch.finfo(torch.float32).eps
    want_l = w_loss.to(f64)
    if x.reduction != "none":
        sens_pair = sens_pair.sum() / (p if x.reduction == "mean" else 1)
    bound_l = out_eps * want_l.abs() + acc_eps * sens_pair + torch.finfo(torch.float32).tiny
    if not bool(((loss.to(f64) - want_l).abs() <= bound_l).all()):
        return f"loss {loss.flatten()[:4].tolist()} vs torch {w_loss.flatten()[:4].tolist()}"
    k_row = torch.cat([k_pair, k_pair]).reshape(-1, *([1] * (grad.dim() - 1)))
    g64, w64 = grad.to(f64), w_grad.to(f64)
    tiny = torch.finfo(grad.dtype).tiny
    bad = (g64 - w64).abs() > (out_eps + acc_eps * (1.0 + k_row)) * w64.abs() + tiny
    if bool(bad.any()):
        rel = ((g64 - w64).norm() / w64.norm().clamp_min(tiny)).item()
        return f"gradient differs at {int(bad.sum())} of {bad.numel()} elements (rel {rel:.2e})"
    return None


def run_self_check(name: str, x: LossInputs) -> SelfCheckVerdict:
    """Run backend ``name`` and the torch reference on :func:`synthetic_inputs` of ``x``'s
    configuration; compare values and gradient (module docstring)."""
    key = shape_class(name, x)
    where = f"{x.pred.device} {x.pred.dtype} {tuple(x.pred.shape)} {x.reduction} lam={x.lam}"
    with torch.inference_mode(False), torch.enable_grad():
        s = synthetic_inputs(x)
        g = torch.Generator().manual_seed(SELF_CHECK_SEED + 1)
        shape = (s.num_pairs,) if s.reduction == "none" else ()
        go = (0.5 + torch.rand(shape, generator=g)).to(s.pred.device)
        try:
            got = _loss_and_grad(name, s, go)
        except Exception as err:  # a crash is a failed check, not a crash of the caller
            msg = " ".join(str(err).split())[:200]
            return SelfCheckVerdict(
                name, key, False, f"{where}: raised {type(err).__name__}: {msg}"
            )
        want = _loss_and_grad("torch", s, go)
        why = _compare(s, got, want)
    if why is not None:
        return SelfCheckVerdict(name, key, False, f"{where}: {why}")
    return SelfCheckVerdict(name, key, True, f"{where}: agrees with torch")


def run_backend(name: str, inputs: LossInputs):
    """Run the resolved backend ``name`` on validated inputs → (loss, e_theta, e_ref)."""
    mod = _load(name)
    assert not isinstance(mod, str), mod
    return mod.run(inputs)
