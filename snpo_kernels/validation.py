"""Input checks for :func:`snpo_kernels.preference_loss`, run once before any backend.

The checks look at metadata (shapes, dtypes, devices) and at scalars: no host
synchronisation, so the call stays CUDA-graph capturable. The one exception reads values only
where that costs no synchronisation: a *CPU* weight tensor is checked to be finite and ≥ 0
(skipped under ``torch.compile`` tracing). A weight tensor on a GPU is not read; a non-finite
one still shows, as a NaN loss and in ``PreferenceStats.nonfinite`` (see :mod:`.api`).

Scalars: beta, lam and a scalar weight may be Python or NumPy real numbers (any float or int
dtype; bools are refused). beta must lie in (0, BETA_MAX]; lam in (0, 1]; a scalar weight
must be finite and ≥ 0 (a negative weight would flip the objective, an infinite one make it
NaN).
"""

from __future__ import annotations

import math
import numbers
from dataclasses import dataclass

import torch

FLOAT_DTYPES = (torch.float32, torch.bfloat16, torch.float16, torch.float64)
REDUCTIONS = ("mean", "sum", "none")
LOSS_TYPES = ("sigmoid", "hinge", "ipo")  # the pair loss as a function of z (reference.pair_loss)
# The largest accepted β. Published values are ≤ 5e3 (Diffusion-DPO SD1.5/SDXL). The kernels
# compute z = −(β/2)·(m_a − m̃_b) in float32: with β ≤ 1e10, z stays finite for margins
# |m| ≤ 1e28 (float32's max is 3.4e38), far beyond any real error·weight; β = 1e39 itself
# is already inf in float32.
BETA_MAX = 1e10


def _real(name: str, value: object) -> float:
    """A Python or NumPy real scalar (not a bool) as a float, else TypeError naming ``name``."""
    if isinstance(value, float) or (isinstance(value, int) and not isinstance(value, bool)):
        return float(value)
    if isinstance(value, numbers.Real) and not isinstance(value, bool):
        return float(value)
    raise TypeError(
        f"{name} must be a Python number or a NumPy real scalar (not a bool or a tensor), "
        f"got {type(value).__name__}"
    )


@dataclass(frozen=True)
class LossInputs:
    """Validated, normalised arguments handed to a backend.

    swap: (P,) bool or None; weight: (P,) float32/float64 or None (a scalar weight is expanded).
    """

    pred: torch.Tensor
    target: torch.Tensor
    ref_pred: torch.Tensor | None
    ref_err: torch.Tensor | None
    swap: torch.Tensor | None
    weight: torch.Tensor | None
    beta: float
    lam: float
    reduction: str
    loss_type: str = "sigmoid"

    @property
    def num_pairs(self) -> int:
        return self.pred.shape[0] // 2


def _check_float(name: str, t: torch.Tensor) -> None:
    if not isinstance(t, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(t).__name__}")
    if t.dtype not in FLOAT_DTYPES:
        raise TypeError(
            f"{name} has dtype {t.dtype}; expected a floating dtype "
            "(float32, bfloat16, float16 or float64)"
        )


def _check_device(name: str, t: torch.Tensor, device: torch.device) -> None:
    if t.device != device:
        raise ValueError(
            f"{name} is on {t.device} but pred is on {device}; move all inputs to one device"
        )


def check_pair_mask(name: str, mask: object, num_pairs: int, device: torch.device) -> None:
    """A (P,) bool tensor on ``device`` (swap, uncond), else TypeError / ValueError naming it."""
    if not isinstance(mask, torch.Tensor):
        raise TypeError(
            f"{name} must be a bool tensor of shape ({num_pairs},), got {type(mask).__name__}"
        )
    if mask.dtype != torch.bool:
        raise TypeError(f"{name} has dtype {mask.dtype}; expected torch.bool")
    if mask.shape != (num_pairs,):
        raise ValueError(
            f"{name} has shape {tuple(mask.shape)}; expected ({num_pairs},), one flag per pair"
        )
    _check_device(name, mask, device)


def _check_weight_values(weight: torch.Tensor) -> None:
    """A CPU weight tensor must be finite and ≥ 0. Reading a GPU tensor would synchronise,
    and under torch.compile tracing the check would be data-dependent: both are skipped."""
    if weight.device.type != "cpu" or torch.compiler.is_compiling():
        return
    bad = ~torch.isfinite(weight) | (weight < 0)
    if bool(bad.any()):
        first = weight.reshape(-1)[bad.reshape(-1)][0].item()
        raise ValueError(
            f"weight must be finite and >= 0 everywhere, got {int(bad.sum())} bad value(s) "
            f"(e.g. {first})"
        )


def validate_inputs(
    pred: torch.Tensor,
    target: torch.Tensor,
    ref_pred: torch.Tensor | None,
    ref_err: torch.Tensor | None,
    swap: torch.Tensor | None,
    weight: torch.Tensor | float | None,
    beta: float,
    lam: float,
    reduction: str,
    loss_type: str = "sigmoid",
) -> LossInputs:
    """Check every argument of the contract and return them normalised (see LossInputs)."""
    _check_float("pred", pred)
    _check_float("target", target)
    if pred.dim() < 1 or pred.shape[0] == 0:
        raise ValueError(
            f"pred must have a non-empty batch dimension, got shape {tuple(pred.shape)}"
        )
    if pred.shape[0] % 2 != 0:
        raise ValueError(
            f"pred's first dimension is {pred.shape[0]}, which is odd: it must be 2P "
            "(P winners followed by their P losers, torch.cat([x_w, x_l]))"
        )
    if pred.numel() == 0:
        raise ValueError(f"pred has no elements per sample (shape {tuple(pred.shape)})")
    if target.shape != pred.shape:
        raise ValueError(
            f"target has shape {tuple(target.shape)} but pred has shape {tuple(pred.shape)}"
        )
    device = pred.device
    _check_device("target", target, device)
    two_p = pred.shape[0]
    p = two_p // 2

    if (ref_pred is None) == (ref_err is None):
        raise ValueError(
            "give exactly one reference: ref_pred (reference predictions, same shape as pred) "
            "or ref_err (cached per-sample reference errors, shape (2P,))"
            + (" — both were given" if ref_pred is not None else " — neither was given")
        )
    if ref_pred is not None:
        _check_float("ref_pred", ref_pred)
        if ref_pred.shape != pred.shape:
            raise ValueError(
                f"ref_pred has shape {tuple(ref_pred.shape)} but pred has shape {tuple(pred.shape)}"
            )
        _check_device("ref_pred", ref_pred, device)
    if ref_err is not None:
        _check_float("ref_err", ref_err)
        if ref_err.shape != (two_p,):
            raise ValueError(
                f"ref_err has shape {tuple(ref_err.shape)}; expected ({two_p},), one reference "
                "error per sample of pred"
            )
        _check_device("ref_err", ref_err, device)

    if swap is not None:
        check_pair_mask("swap", swap, p, device)

    weight_t: torch.Tensor | None = None
    wdt = torch.float64 if pred.dtype == torch.float64 else torch.float32
    if weight is not None:
        if isinstance(weight, bool):
            raise TypeError("weight must be a number or a tensor, not a bool")
        if isinstance(weight, torch.Tensor):
            _check_float("weight", weight)
            _check_device("weight", weight, device)
            if weight.dim() == 0:
                weight_t = weight.to(wdt).expand(p).contiguous()
            elif weight.shape == (p,):
                weight_t = weight.to(wdt).contiguous()
            else:
                raise ValueError(
                    f"weight has shape {tuple(weight.shape)}; expected a scalar or ({p},), "
                    "one weight per pair"
                )
            _check_weight_values(weight)
        elif isinstance(weight, numbers.Real):
            w = _real("weight", weight)
            if not (math.isfinite(w) and w >= 0.0):
                raise ValueError(f"weight must be finite and >= 0, got {w}")
            weight_t = torch.full((p,), w, dtype=wdt, device=device)
        else:
            raise TypeError(f"weight must be a number or a tensor, got {type(weight).__name__}")

    beta = _real("beta", beta)
    if not 0.0 < beta <= BETA_MAX:
        raise ValueError(
            f"beta must be a finite number > 0 and <= {BETA_MAX:g} (larger values overflow "
            f"the float32 logits), got {beta}"
        )
    lam = _real("lam", lam)
    if not 0.0 < lam <= 1.0:
        raise ValueError(
            f"lam must lie in (0, 1] (the Bounded-DPO mixture weight; 1 = plain DPO), got {lam}"
        )
    if reduction not in REDUCTIONS:
        raise ValueError(f"reduction must be one of {REDUCTIONS}, got {reduction!r}")
    if loss_type not in LOSS_TYPES:
        raise ValueError(
            f"loss_type must be one of {LOSS_TYPES} (diffusers' --loss_type), got {loss_type!r}"
        )
    return LossInputs(
        pred,
        target,
        ref_pred,
        ref_err,
        swap,
        weight_t,
        float(beta),
        float(lam),
        reduction,
        loss_type,
    )
