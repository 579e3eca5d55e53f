"""The non-finite guard: a non-finite loss of any micro-batch (flagged on the device) or a
non-finite gradient norm is caught before the optimizer step — all ranks agree through one
all-reduce per optimizer step; DeepSpeed reports the norm when it computes one, after its step,
which skips or applies nothing at ZeRO 1–3 for a non-finite norm — and the run stops with an
error naming the step and saves nothing, so the last good checkpoint stays the newest. Routine
fp16 loss-scale overflows are skipped, up to ``max_skipped_steps`` in a row.
"""

from __future__ import annotations

from collections.abc import Callable

import torch

from snpo.config import TrainConfig
from snpo.distributed import all_reduce
from snpo.trainer.errors import NonFiniteError
from snpo.trainer.setup import clips_itself


def guard_decision(
    *, finite_norm: bool, overflow: bool, skipped_in_a_row: int, limit: int
) -> tuple[str, int]:
    """What the non-finite guard does after an optimizer step → (action, skipped in a row).

    fp16 loss scaling: DeepSpeed reports an overflow when the scaled gradients are not finite;
    it skips that step and lowers the scale. That is routine, not a failure — until ``limit``
    steps in a row were skipped. Without an overflow report a non-finite norm stops the run.
    action: "ok", "skipped" (a routine overflow) or "stop"."""
    if overflow:
        n = skipped_in_a_row + 1
        return ("stop" if n > limit else "skipped"), n
    if not finite_norm:
        return "stop", skipped_in_a_row
    return "ok", 0


def norm_and_clip(cfg: TrainConfig, engine) -> torch.Tensor | None:
    """ZeRO-0 fp32 (:func:`snpo.trainer.setup.clips_itself`): the global gradient norm as a
    device tensor, in one foreach pass that also clips to ``max_grad_norm`` (gradients are whole
    and, with several processes, already averaged at the boundary). None elsewhere: DeepSpeed
    reports its own norm after the step."""
    if not clips_itself(cfg):
        return None
    params = [p for p in engine.module.parameters() if p.grad is not None]
    if not params:
        return None
    if cfg.max_grad_norm > 0:
        return torch.nn.utils.clip_grad_norm_(params, cfg.max_grad_norm, foreach=True)
    return torch.nn.utils.get_total_norm([p.grad for p in params], foreach=True)


def check_before_step(
    bad_loss: torch.Tensor,
    own_norm: torch.Tensor | None,
    sums: torch.Tensor,
    step: int,
    last_tag: Callable[[], str],
) -> None:
    """Raise NonFiniteError before the update when any rank saw a non-finite loss (or, with our
    own norm, a non-finite gradient): one device-to-host copy and one all-reduce.
    sums: the step's metric vector so far (mean loss = sums[0] / sums[1]); last_tag: names the
    newest complete checkpoint (called only to word the error)."""
    bad_norm = ~torch.isfinite(own_norm) if own_norm is not None else torch.zeros_like(bad_loss)
    flags = torch.stack([bad_loss, bad_norm]).to(torch.float64).cpu()
    all_reduce(flags)
    if float(flags[0]) > 0:
        mean = float(sums[0] / sums[1]) if float(sums[1]) > 0 else float("nan")
        raise NonFiniteError(
            f"non-finite loss ({mean}) at step {step}; stopped before the update, nothing "
            f"saved (the last good checkpoint is {last_tag()})"
        )
    if float(flags[1]) > 0:
        raise NonFiniteError(
            f"non-finite gradient norm at step {step}; stopped before the update, nothing "
            f"saved (the last good checkpoint is {last_tag()})"
        )


def engine_grad_norm(engine) -> float | None:
    """DeepSpeed's global gradient norm of the last step, None when it computed none."""
    g = engine.get_global_grad_norm()
    if g is None:
        return None
    return float(g.item() if isinstance(g, torch.Tensor) else g)


def skipped_steps(engine) -> int:
    """DeepSpeed's count of optimizer steps skipped for a loss-scale overflow (fp16)."""
    return int(getattr(engine, "skipped_steps", 0) or 0)
