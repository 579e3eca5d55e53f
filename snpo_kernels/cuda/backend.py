"""The "cuda" backend of :mod:`snpo_kernels.dispatch`: the fused CUDA kernels of csrc/.

    availability(device, dtype) -> None | why not
    run(x: LossInputs) -> (loss, e_theta, e_ref)

Importing this module never fails on a CPU machine and never touches torch.cuda; the compiled
extension is loaded (or JIT-built) on the first availability() call for a CUDA device.

Inputs as the kernels take them (run() prepares them, no host synchronisation):
- pred: float32, bfloat16 or float16, made contiguous (``.contiguous()``, a no-op when it
  already is; the gradient comes back contiguous).
- target, ref_pred: pred's dtype or float32; another half type is cast to float32 (exact).
- ref_err: cast to float32; weight: float32; swap: bool.
- float64 anywhere among target / ref_pred / ref_err: the contract then accumulates in
  float64 and returns a float64 loss, which the kernels do not do, so the PyTorch reference
  runs instead (float64 pred is refused by availability()).
"""

from __future__ import annotations

import torch

from ..reference import has_float64_operand, reference_of
from ..validation import LossInputs
from . import ops

SUPPORTED_DTYPES = (torch.float32, torch.bfloat16, torch.float16)


def availability(device: torch.device, dtype: torch.dtype) -> str | None:
    """None if the CUDA kernels can run on (device, dtype), else a sentence saying why not."""
    device = torch.device(device)
    if device.type != "cuda":
        return f"device is {device.type}"
    if dtype == torch.float64:
        return "float64 is not supported, use backend='torch'"
    if dtype not in SUPPORTED_DTYPES:
        return f"{dtype} is not supported (float32, bfloat16 or float16)"
    why = ops.extension_error()
    if why is not None:
        return why
    return ops.arch_error(device)


def _companion(t: torch.Tensor, pred_dtype: torch.dtype) -> torch.Tensor:
    """target / ref_pred as the kernels take them: pred's dtype or float32, contiguous."""
    t = t.detach()
    if t.dtype not in (pred_dtype, torch.float32):
        t = t.to(torch.float32)
    return t.contiguous()


def run(x: LossInputs) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(loss, e_theta, e_ref): loss float32, scalar or (P,), differentiable w.r.t. x.pred only;
    e_theta / e_ref detached float32 (2P,)."""
    if has_float64_operand(x):
        return reference_of(x)
    if not ops.loaded():
        ops.require()
    pred = x.pred.contiguous()
    target = _companion(x.target, pred.dtype)
    ref_pred = None if x.ref_pred is None else _companion(x.ref_pred, pred.dtype)
    ref_err = None if x.ref_err is None else x.ref_err.detach().to(torch.float32).contiguous()
    swap = None if x.swap is None else x.swap.contiguous()
    weight = None if x.weight is None else x.weight.detach().to(torch.float32).contiguous()
    loss, e_theta, e_ref, _coef = torch.ops.snpo_cuda.forward(
        pred,
        target,
        ref_pred,
        ref_err,
        swap,
        weight,
        x.beta,
        x.lam,
        ops.REDUCTIONS[x.reduction],
        ops.LOSS_TYPES[x.loss_type],
    )
    return loss, e_theta.detach(), e_ref.detach()
