"""The trainer: DeepSpeed setup, the training loop, checkpoint/resume, logging, the guard.

Modules (imports point downward in this list):

trainer.py        Trainer and run: setup, resume, the loop, exports
checkpoint_io.py  the run's checkpoints: resume target, save, verify, load, data rebase
inputs.py         where the inputs come from: the cache decision and the input providers
guard.py          the non-finite guard and gradient-norm helpers
metrics.py        metric vectors, step records, metrics.jsonl / TensorBoard / wandb / tqdm
setup.py          models and reference, LR schedule, DeepSpeed config and engine
distributed.py    torch.distributed init, collectives, agreement, timeouts, shm cleanup
errors.py         the trainer's exception types
checkpoints.py    checkpoint files: tags, checksums, latest, pruning
universal.py      universal checkpoints (resume on another world size)
run_dir.py        the output folder: run.json, fresh start rules, moving a run aside
preemption.py     stop signals, launcher watch, heartbeats
"""

from snpo.distributed import DistInfo, agree, all_reduce, barrier, init_distributed
from snpo.trainer.checkpoint_io import rebase_position, resume_target
from snpo.trainer.errors import (
    CheckpointWriteError,
    DistributedError,
    ModelLoadError,
    NonFiniteError,
    PeerFailed,
    ResumeError,
)
from snpo.trainer.guard import guard_decision
from snpo.trainer.inputs import RunInputs, open_run_cache, sections_used
from snpo.trainer.metrics import MetricsLogger, keep_metrics_until
from snpo.trainer.setup import (
    Models,
    build_models,
    deepspeed_config,
    effective_lr,
    lr_lambda,
    reference_fingerprint,
    resolve_model,
)
from snpo.trainer.trainer import Trainer, run

__all__ = [
    "CheckpointWriteError",
    "DistInfo",
    "DistributedError",
    "MetricsLogger",
    "ModelLoadError",
    "Models",
    "NonFiniteError",
    "PeerFailed",
    "ResumeError",
    "RunInputs",
    "Trainer",
    "agree",
    "all_reduce",
    "barrier",
    "build_models",
    "deepspeed_config",
    "effective_lr",
    "guard_decision",
    "init_distributed",
    "keep_metrics_until",
    "lr_lambda",
    "open_run_cache",
    "rebase_position",
    "reference_fingerprint",
    "resolve_model",
    "resume_target",
    "run",
    "sections_used",
]
