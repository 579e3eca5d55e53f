"""The trainer's exception types; ``snpo.train.classify`` maps each to its exit code by name.

ModelLoadError is :class:`snpo.models.ModelLoadError` (one class for every loader of models).
"""

from __future__ import annotations

from snpo.distributed import PeerFailed
from snpo.models import ModelLoadError


class NonFiniteError(RuntimeError):
    """The loss or the gradient norm became NaN/inf; the run stopped without saving."""


class ResumeError(RuntimeError):
    """A checkpoint cannot be resumed with this configuration (or the reference moved)."""


class CheckpointWriteError(OSError):
    """A checkpoint could not be written (disk full, permissions); the previous one is intact."""


class DistributedError(RuntimeError):
    """DeepSpeed or torch.distributed failed (initialisation, a collective, a peer process)."""


__all__ = [
    "CheckpointWriteError",
    "DistributedError",
    "ModelLoadError",
    "NonFiniteError",
    "PeerFailed",
    "ResumeError",
]
