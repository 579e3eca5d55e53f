"""The Triton backend of :mod:`snpo_kernels.dispatch`: ``availability`` and ``run``.

Usable when triton imports and the device is CUDA, or the CPU with ``TRITON_INTERPRET=1``
(the interpreter, for tests), for float32, bfloat16 and float16 predictions. triton and the
kernel modules are imported only when needed.
"""

from __future__ import annotations

import os

import torch

from ..reference import has_float64_operand, reference_of
from ..validation import LossInputs

_DTYPES = (torch.float32, torch.bfloat16, torch.float16)


def availability(device: torch.device, dtype: torch.dtype) -> str | None:
    """None when the Triton kernels can run on (device, dtype), else a sentence saying why."""
    try:
        import triton  # noqa: F401
    except ImportError as err:
        return f"triton is not installed ({err}); pip install 'snpo[triton]'"
    if dtype == torch.float64:
        return "the Triton kernels support float32, bfloat16 and float16; use backend='torch' for float64"
    if dtype not in _DTYPES:
        return f"the Triton kernels do not support {dtype}"
    if device.type == "cuda":
        return None
    if device.type == "cpu":
        if os.environ.get("TRITON_INTERPRET") == "1":
            return None
        return "on the CPU Triton runs only under the interpreter: set TRITON_INTERPRET=1 before importing snpo_kernels (slow; for tests)"
    return f"Triton needs a CUDA device (or the CPU with TRITON_INTERPRET=1), got {device.type}"


def run(x: LossInputs) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """→ (loss float32, e_theta, e_ref (2P,) float32, detached); loss differentiable w.r.t. pred.

    float64 anywhere among target / ref_pred / ref_err: the contract then accumulates in
    float64 and returns a float64 loss (docs/objectives.md), which the kernels do not do, so
    the PyTorch reference runs instead, as in the CUDA backend (float64 pred is refused by
    availability())."""
    if has_float64_operand(x):
        return reference_of(x)
    from .op import triton_preference_loss

    loss, e_theta, e_ref, _ = triton_preference_loss(
        x.pred,
        x.target.detach(),
        None if x.ref_pred is None else x.ref_pred.detach(),
        None if x.ref_err is None else x.ref_err.detach(),
        x.swap,
        None if x.weight is None else x.weight.detach(),
        x.beta,
        x.lam,
        x.reduction,
        x.loss_type,
    )
    return loss, e_theta.detach(), e_ref.detach()
