"""snpo_kernels: a drop-in fused preference loss for diffusion models (torch only; triton optional).

from snpo_kernels import preference_loss
loss = preference_loss(pred, target, ref_pred, swap=swap, beta=5000.0, lam=0.9)
# diffusers' SD1.5 script's --beta_dpo 2500 (logit form): beta_logit=2500, the same loss
"""

from .api import PreferenceLoss, PreferenceOutput, preference_loss, preference_loss_with_stats
from .conventions import BETA_SCRIPTS, beta_from
from .dispatch import (
    BACKENDS,
    BackendUnavailableError,
    SelfCheckWarning,
    available_backends,
    resolve_backend,
    self_check_verdicts,
)
from .reference import bounded_margin, per_sample_error
from .stats import SUM_FIELDS, PreferenceStats, preference_stats, stats_from_sums

__version__ = "0.1.0"

__all__ = [
    "BACKENDS",
    "BETA_SCRIPTS",
    "BackendUnavailableError",
    "PreferenceLoss",
    "PreferenceOutput",
    "PreferenceStats",
    "SUM_FIELDS",
    "SelfCheckWarning",
    "available_backends",
    "beta_from",
    "bounded_margin",
    "per_sample_error",
    "preference_loss",
    "preference_loss_with_stats",
    "preference_stats",
    "resolve_backend",
    "self_check_verdicts",
    "stats_from_sums",
]
