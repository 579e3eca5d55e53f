"""The LoRA adapter configuration of a denoiser (peft ``LoraConfig``).

A LoRA layer adds (α / r)·B·A to a target weight W, with A (r, in) and B (out, r).
"""

from __future__ import annotations

from collections.abc import Sequence


def lora_config(
    targets: Sequence[str],
    rank: int,
    alpha: float | None = None,
    *,
    gaussian_init: bool = False,
):
    """A peft ``LoraConfig`` of rank ``rank`` on the modules named ``targets`` (a family's
    default: ``model.spec.lora_targets``), scale α / r with α = ``alpha`` or ``rank``.
    ``gaussian_init``: A ~ N(0, 1/r) instead of peft's Kaiming default (B = 0 either way)."""
    from peft import LoraConfig

    if rank <= 0:
        raise ValueError(f"LoRA rank must be positive, got {rank}")
    if not targets:
        raise ValueError("LoRA needs at least one target module name")
    kw = {"init_lora_weights": "gaussian"} if gaussian_init else {}
    return LoraConfig(r=int(rank), lora_alpha=alpha or rank, target_modules=list(targets), **kw)
