"""An exponential moving average (EMA) of the trained weights, kept in fp32 beside the engine.

After optimizer step s (1-based) with weights θ_s, for decay d ∈ [0, 1) and ``ema_start_step`` k:

    ema_0 = θ_0
    ema_s = θ_s                              for s ≤ k   (the warm-up: the EMA copies)
    ema_s = d · ema_{s−1} + (1 − d) · θ_s    for s > k

computed in fp32 (θ is upcast; no bias correction, no decay warm-up). A step that DeepSpeed
skipped for an fp16 overflow leaves θ unchanged and is not averaged.

What is averaged: the trainable parameters only (LoRA: the adapter weights; full fine-tune: the
whole denoiser). ZeRO 0–2: every rank holds the full trainable tensors and the same EMA (rank 0
writes it). ZeRO-3: each rank averages its own partition (``param.ds_tensor``, the flat slice
[rank·P, (rank+1)·P) of the padded flattened weight, P = ⌈numel / world⌉): no gather per step,
1/world of the memory. An export swaps the EMA into the weights (into the partitions under
ZeRO-3, so DeepSpeed's own gather consolidates it) and restores the raw weights bit for bit.

Checkpoints (:mod:`snpo.trainer.checkpoint_io`) store :meth:`EMA.state` — ZeRO-3: each rank's
flat partitions, concatenated again on load, so a resume on another number of ranks reslices
them; ZeRO 0–2: the full tensors.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator, Sequence

import torch


def ema_update_(ema: Sequence[torch.Tensor], params: Sequence[torch.Tensor], decay: float) -> None:
    """In place, for each pair: ema ← d·ema + (1 − d)·θ, with θ upcast to ema's dtype (fp32).

    ema: fp32 tensors; params: tensors of the same shapes, any float dtype."""
    if len(ema) != len(params):
        raise ValueError(f"ema_update_: {len(ema)} EMA tensors for {len(params)} parameters")
    for e, p in zip(ema, params):
        e.mul_(decay).add_(p.detach().to(e.dtype), alpha=1.0 - decay)


def _local(p: torch.Tensor) -> torch.Tensor:
    """The tensor this rank holds of ``p``: its ZeRO-3 partition, or ``p`` itself."""
    return p.ds_tensor if hasattr(p, "ds_tensor") else p


class EMA:
    """fp32 shadow copies of the trainable parameters of ``module`` (module docstring).

    decay: d; start_step: k (steps during which the EMA copies the weights); rank, world: this
    process's place among the data-parallel ranks (ZeRO-3 partitions)."""

    def __init__(
        self,
        module: torch.nn.Module,
        decay: float,
        *,
        start_step: int = 0,
        rank: int = 0,
        world: int = 1,
    ) -> None:
        if not 0.0 <= decay < 1.0:
            raise ValueError(f"ema decay must lie in [0, 1), got {decay}")
        self.decay, self.start_step = float(decay), int(start_step)
        self.rank, self.world = rank, world
        self.named = [(n, p) for n, p in module.named_parameters() if p.requires_grad]
        self.partitioned = any(hasattr(p, "ds_tensor") for _, p in self.named)
        self.shadow = [
            _local(p).detach().to(torch.float32, copy=True).reshape(_local(p).shape)
            for _, p in self.named
        ]

    def _locals(self) -> list[torch.Tensor]:
        return [_local(p) for _, p in self.named]

    @torch.no_grad()
    def update(self, step: int) -> None:
        """After optimizer step ``step``: copy θ while step ≤ start_step, else average."""
        if step <= self.start_step:
            for e, p in zip(self.shadow, self._locals()):
                e.copy_(p.detach())
        else:
            ema_update_(self.shadow, self._locals(), self.decay)

    @contextlib.contextmanager
    def swapped_in(self) -> Iterator[None]:
        """Inside: the weights (this rank's partitions under ZeRO-3) hold the EMA, rounded to
        their dtype; afterwards the raw weights are restored exactly (a copy is held meanwhile)."""
        held = [p.detach().clone() for p in self._locals()]
        try:
            with torch.no_grad():
                for p, e in zip(self._locals(), self.shadow):
                    p.copy_(e)
            yield
        finally:
            with torch.no_grad():
                for p, raw in zip(self._locals(), held):
                    p.copy_(raw)

    # checkpoint state --------------------------------------------------------------------
    def state(self) -> dict[str, torch.Tensor]:
        """{parameter name: fp32 tensor}: the full EMA (ZeRO 0–2) or this rank's flat partition
        (ZeRO-3)."""
        return {n: e for (n, _), e in zip(self.named, self.shadow)}

    def shapes(self) -> dict[str, tuple[int, ...]]:
        """{name: the full parameter's shape} (``ds_shape`` under ZeRO-3)."""
        return {n: tuple(getattr(p, "ds_shape", p.shape)) for n, p in self.named}

    def load_full(self, full: dict[str, torch.Tensor]) -> None:
        """Set the EMA from the whole averaged tensors ``full`` (:func:`merge_partitions` of a
        ZeRO-3 checkpoint's rank files, or a ZeRO 0–2 file); this rank keeps its partition."""
        want = self.shapes()
        if set(full) != set(want):
            missing, extra = sorted(set(want) - set(full)), sorted(set(full) - set(want))
            raise ValueError(
                f"the saved EMA does not match the trainable parameters (missing {missing[:3]}, "
                f"unexpected {extra[:3]})"
            )
        for (n, _), e in zip(self.named, self.shadow):
            t = full[n]
            if tuple(t.shape) != want[n]:
                raise ValueError(f"the saved EMA of {n} has shape {tuple(t.shape)}, not {want[n]}")
            flat = t.reshape(-1).to(torch.float32)
            if self.partitioned:
                size = e.numel()
                part = torch.zeros(size, dtype=torch.float32)
                piece = flat[self.rank * size : (self.rank + 1) * size]
                part[: piece.numel()] = piece
                e.copy_(part.reshape(e.shape))
            else:
                e.copy_(flat.reshape(e.shape))


def merge_partitions(
    parts: Sequence[dict[str, torch.Tensor]], shapes: dict[str, tuple[int, ...]]
) -> dict[str, torch.Tensor]:
    """The whole tensors from ZeRO-3 ranks' flat partitions (rank order): concatenated, the
    padding cut, reshaped to ``shapes``."""
    out = {}
    for name, shape in shapes.items():
        if any(name not in p for p in parts):
            raise ValueError(f"the saved EMA partitions lack {name}")
        flat = torch.cat([p[name].reshape(-1) for p in parts])
        n = int(torch.Size(shape).numel())
        if flat.numel() < n:
            raise ValueError(f"the saved EMA partitions of {name} hold {flat.numel()} < {n} values")
        out[name] = flat[:n].reshape(shape)
    return out
