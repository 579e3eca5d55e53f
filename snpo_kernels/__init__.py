"""snpo_kernels: a drop-in fused preference loss for diffusion models (torch only; triton optional).

from snpo_kernels import preference_loss
loss = preference_loss(pred, target, ref_pred, swap=swap, beta=5000.0, lam=0.9)
"""

from .api import PreferenceLoss, PreferenceOutput, preference_loss, preference_loss_with_stats
from .dispatch import (
    BACKENDS,
    BackendUnavailableError,
    SelfCheckWarning,
    available_backends,
    resolve_backend,
    self_check_verdicts,
)
from .reference import bounded_margin, per_sample_error
from .stats import PreferenceStats, preference_stats

__version__ = "0.1.0"

__all__ = [
    "BACKENDS",
    "BackendUnavailableError",
    "PreferenceLoss",
    "PreferenceOutput",
    "PreferenceStats",
    "SelfCheckWarning",
    "available_backends",
    "bounded_margin",
    "per_sample_error",
    "preference_loss",
    "preference_loss_with_stats",
    "preference_stats",
    "resolve_backend",
    "self_check_verdicts",
]
