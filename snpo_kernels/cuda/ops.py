"""The torch.library face of the CUDA extension: loading it (the installed build, else a JIT
build on first use), the fake (meta) implementations and the autograd formula of its ops.

The ops are defined in C++ (csrc/binding.cpp, which names this module with
``m.set_python_module``, so that torch.compile finds the fake implementations here):

    torch.ops.snpo_cuda.forward(pred, target, ref_pred?, ref_err?, swap?, weight?,
                                beta, lam, reduction, loss_type=0) -> (loss, e_theta, e_ref, coef)
    torch.ops.snpo_cuda.backward(grad_loss, pred, target, coef, reduction) -> grad_pred

reduction: 0 mean, 1 sum, 2 none; loss_type: 0 sigmoid, 1 hinge, 2 ipo. ``coef`` (2P,) holds
the per-sample gradient coefficients c_i at scale 1; backward multiplies by 1/P (mean) and grad_output on the device.

Importing this module needs torch only: nothing touches torch.cuda or the extension until
:func:`extension_error` (or :func:`require`) is called.
"""

from __future__ import annotations

import importlib
import os
import sys
import threading

import torch

from . import build

REDUCTIONS = {"mean": 0, "sum": 1, "none": 2}
LOSS_TYPES = {"sigmoid": 0, "hinge": 1, "ipo": 2}  # csrc/pair_math.h LossType
NOT_BUILT = (
    "the snpo CUDA extension is not built (set SNPO_BUILD_CUDA=1 and reinstall, or install "
    "nvcc for the JIT build)"
)
JIT_VERBOSE_ENV = "SNPO_CUDA_JIT_VERBOSE"

_lock = threading.Lock()
# module: the loaded extension module; error: why it cannot be loaded (tried once per process).
_state: dict = {"module": None, "error": None, "registered": False}
_arch_verdicts: dict[tuple[int, int], str | None] = {}  # (id(module), device index) → why not


def _assume_constant_result(fn):
    """``torch.compiler.assume_constant_result`` without importing torch._dynamo when this
    module is imported (seconds): the same marker, which Dynamo reads when it meets a call of
    ``fn`` while tracing and then calls ``fn`` eagerly, baking the result into the graph.
    tests/kernels/test_cuda_build.py checks that the marker is the one torch sets."""
    fn._dynamo_marked_constant = True
    return fn


class ExtensionUnavailableError(ImportError):
    """The compiled ops are not there and cannot be built here."""


def loaded() -> bool:
    """True once the ops are loaded and registered (no locking: safe to trace)."""
    return _state["module"] is not None


def extension_error() -> str | None:
    """None when the ops are usable, else why not. The first call loads the installed
    extension, or JIT-compiles it (minutes, once; cached in TORCH_EXTENSIONS_DIR); a failure
    is remembered for the rest of the process.

    Safe under ``torch.compile(fullgraph=True)``: the answer, once known, is read without the
    lock, and the first resolution (which takes the lock) is an assumed-constant call that
    Dynamo runs eagerly, outside the traced region, instead of tracing into the lock."""
    if _state["module"] is not None:
        return None
    if _state["error"] is not None:
        return _state["error"]
    return _resolve_extension()


@_assume_constant_result
def _resolve_extension() -> str | None:
    """Load (or JIT-build) the extension once per process, under the lock; → extension_error's
    answer. Marked assume_constant_result: under tracing Dynamo calls it eagerly and bakes the
    answer into the graph (it never changes afterwards within a process)."""
    with _lock:
        if _state["module"] is None and _state["error"] is None:
            try:
                module = _load_module()
                register_python_side()
                _state["module"] = module
            except ExtensionUnavailableError as err:
                _state["error"] = str(err)
        return _state["error"]


def compiled_archs() -> list[build.Arch] | None:
    """The architectures the loaded extension was compiled for (None when unknown)."""
    token = getattr(_state["module"], "archs", "")
    return build.parse_arch_token(token) or None


def arch_error(device: torch.device) -> str | None:
    """None if the loaded kernels can run on ``device``'s GPU (or the build did not say),
    else why not. Decided once per (extension, device); later calls are a dict lookup.
    Queries the device (torch.cuda) only eagerly: under tracing it is an assumed-constant
    call, like :func:`extension_error`."""
    return _arch_verdict(device.index)


@_assume_constant_result
def _arch_verdict(index: int | None) -> str | None:
    if index is None:
        index = torch.cuda.current_device()
    key = (id(_state["module"]), index)
    if key in _arch_verdicts:
        return _arch_verdicts[key]
    why = None
    archs = compiled_archs()
    if archs is not None:
        cap = tuple(torch.cuda.get_device_capability(index))
        if not build.covers(archs, cap):
            built = ", ".join(str(a) for a in archs)
            why = (
                f"the snpo CUDA extension was compiled for {built} but cuda:{index} has "
                f"compute capability {cap[0]}.{cap[1]}; rebuild it with "
                f"SNPO_CUDA_ARCHS={cap[0]}.{cap[1]}"
            )
    _arch_verdicts[key] = why
    return why


def require() -> None:
    """Raise ExtensionUnavailableError with the reason unless the ops are usable."""
    why = extension_error()
    if why is not None:
        raise ExtensionUnavailableError(why)


def _load_module():
    try:
        return importlib.import_module(build.EXTENSION_NAME)
    except ImportError as err:
        installed = f"{build.EXTENSION_NAME} cannot be imported ({err})"
    env = os.environ
    why = build.jit_unavailable_reason(
        env, torch.version.cuda, build.find_nvcc(env), torch.__version__
    )
    if why is not None:
        raise ExtensionUnavailableError(f"{NOT_BUILT}: {installed}; {why}")
    verbose = env.get(JIT_VERBOSE_ENV, "0").strip().lower() not in ("", "0", "false", "no")
    print(
        "[snpo] compiling the CUDA extension on first use (once; cached in "
        "TORCH_EXTENSIONS_DIR, default ~/.cache/torch_extensions) ...",
        file=sys.stderr,
    )
    try:
        return build.jit_build(verbose=verbose, env=env)
    except Exception as err:
        raise ExtensionUnavailableError(
            f"{NOT_BUILT}: {installed}; the JIT build failed with {type(err).__name__}: {err} "
            f"(set {JIT_VERBOSE_ENV}=1 to see the compiler output, {build.JIT_ENV}=0 to skip "
            "the attempt)"
        ) from err


# ------------------------------------------------------------------ torch.library registrations
def _forward_fake(pred, target, ref_pred, ref_err, swap, weight, beta, lam, reduction, loss_type=0):
    rows = pred.shape[0]
    pairs = rows // 2
    loss_shape = (pairs,) if reduction == REDUCTIONS["none"] else ()
    f32 = {"dtype": torch.float32, "device": pred.device}
    return (
        torch.empty(loss_shape, **f32),
        torch.empty((rows,), **f32),
        torch.empty((rows,), **f32),
        torch.empty((rows,), **f32),
    )


def _backward_fake(grad_loss, pred, target, coef, reduction):
    return torch.empty_like(pred, memory_format=torch.contiguous_format)


def _setup_context(ctx, inputs, output):
    pred, target = inputs[0], inputs[1]
    ctx.save_for_backward(pred, target, output[3])
    ctx.reduction = inputs[8]
    ctx.num_inputs = len(inputs)


def _backward(ctx, grad_loss, *unused_grads):
    """d loss / d pred = c_i · scale · grad_output · 2(pred − target)/N, one fused pass.
    Gradients flow to pred only (target, the reference, swap and weight get None)."""
    pred, target, coef = ctx.saved_tensors
    grad_pred = None
    if ctx.needs_input_grad[0]:
        grad_pred = torch.ops.snpo_cuda.backward(
            grad_loss.to(torch.float32).contiguous(), pred, target, coef, ctx.reduction
        )
    # one gradient per input of forward: pred, then None for the other 8 or 9 (loss_type)
    return (grad_pred,) + (None,) * (ctx.num_inputs - 1)


def register_python_side() -> None:
    """Register the fake implementations and the autograd formula of the snpo_cuda ops (once;
    the ops must already be loaded). Must be called from this module: binding.cpp's
    set_python_module names it."""
    if _state["registered"]:
        return
    torch.library.register_fake("snpo_cuda::forward", _forward_fake)
    torch.library.register_fake("snpo_cuda::backward", _backward_fake)
    torch.library.register_autograd("snpo_cuda::forward", _backward, setup_context=_setup_context)
    _state["registered"] = True


def load_library_for_tests(path: str, name: str = "_C") -> None:
    """Import an extension module built elsewhere (the CPU compile test links one; ``name``
    is its TORCH_EXTENSION_NAME) and register the Python side, as if it were installed."""
    import importlib.util

    with _lock:
        spec = importlib.util.spec_from_file_location(name, path)
        module = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(module)
        register_python_side()
        _state["module"] = module
        _state["error"] = None
