"""The order of pairs: a per-epoch permutation sharded over ranks, resumable by micro-step,
and the DataLoader that decodes it.

Epoch e's order is ``epoch_permutation(seed, e, n)`` with the tail that does not divide by the
world size dropped; rank r takes every world-th pair from r; its pairs are cut into
micro-batches of ``micro`` (an incomplete last one is dropped).

With ``data_order: windowed`` (:func:`order_options`) the epoch's pairs come instead from
:func:`snpo.data.locality.windowed_epoch`: row groups permuted, each rank a contiguous slice,
pairs shuffled within windows of K row groups — the same number of pairs per rank, so the
micro-step arithmetic below is shared by both orders.
"""

from __future__ import annotations

from collections.abc import Iterator

import numpy as np
import torch

from snpo.data.dataset import PairDataset, collate_pairs
from snpo.data.errors import DataError
from snpo.data.locality import singleton_groups, windowed_epoch
from snpo.draws import epoch_permutation


class PairOrder:
    """Which pairs rank ``rank`` sees at global micro-step g (0-based, counted over the run).

    Micro-step g is batch g mod B of epoch g div B, with B micro-batches per epoch and rank —
    so resuming after ``steps`` optimizer steps starts at g = steps × gradient_accumulation_steps.

    groups: (n,) row-group id of each pair (``source.row_groups()``) and window: K ≥ 1 select
    the windowed order (:mod:`snpo.data.locality`); window 0, no groups, or one pair per group
    (own pairs, hub datasets): the global order.
    """

    def __init__(
        self,
        n: int,
        *,
        seed: int,
        rank: int,
        world: int,
        micro: int,
        groups: np.ndarray | None = None,
        window: int = 0,
    ) -> None:
        self.n, self.seed, self.rank, self.world, self.micro = n, seed, rank, world, micro
        if groups is not None and len(groups) != n:
            raise DataError(f"data order: {len(groups)} row-group ids for {n} pairs")
        if window < 0:
            raise DataError(f"data_window_row_groups: must be ≥ 1, got {window}")
        windowed = window > 0 and not singleton_groups(groups)
        self.groups = groups if windowed else None
        self.window = window if windowed else 0
        self.kind = "windowed" if windowed else "global"
        self.per_rank = n // world
        self.batches_per_epoch = self.per_rank // micro
        if self.batches_per_epoch < 1:
            raise DataError(
                f"train_data: {n} pairs are too few for {world} process(es) × "
                f"train_batch_size_per_gpu {micro}"
            )
        self._epoch: int | None = None
        self._mine: torch.Tensor | None = None

    def position(self, micro_step: int) -> tuple[int, int]:
        """(epoch, batch within the epoch) of global micro-step ``micro_step``."""
        return divmod(micro_step, self.batches_per_epoch)

    def batch(self, micro_step: int) -> list[tuple[int, int]]:
        """The (epoch, pair index) keys of this rank's micro-batch at ``micro_step``."""
        epoch, b = self.position(micro_step)
        if self._epoch != epoch:
            self._mine, self._epoch = self.epoch_pairs(epoch), epoch
        rows = self._mine[b * self.micro : (b + 1) * self.micro].tolist()
        return [(epoch, int(i)) for i in rows]

    def epoch_pairs(self, epoch: int) -> torch.Tensor:
        """This rank's pair indices (per_rank,) in ``epoch``, in the order they are consumed."""
        if self.kind == "windowed":
            return torch.from_numpy(
                windowed_epoch(
                    self.groups,
                    seed=self.seed,
                    epoch=epoch,
                    rank=self.rank,
                    world=self.world,
                    window=self.window,
                )
            )
        perm = epoch_permutation(self.seed, epoch, self.n)[: self.per_rank * self.world]
        return perm[self.rank :: self.world]


def order_options(cfg, source) -> dict:
    """The :class:`PairOrder` keywords of ``cfg.data_order`` for ``source``: {} (global) or the
    source's row groups and ``cfg.data_window_row_groups`` (windowed)."""
    if getattr(cfg, "data_order", "global") != "windowed":
        return {}
    return {"groups": source.row_groups(), "window": int(cfg.data_window_row_groups)}


class OrderSampler(torch.utils.data.Sampler):
    """Batch sampler yielding :meth:`PairOrder.batch` for micro-steps start..stop-1."""

    def __init__(self, order: PairOrder, start: int, stop: int) -> None:
        self.order, self.start, self.stop = order, start, stop

    def __iter__(self) -> Iterator[list[tuple[int, int]]]:
        for g in range(self.start, self.stop):
            yield self.order.batch(g)

    def __len__(self) -> int:
        return self.stop - self.start


def make_loader(
    dataset: PairDataset, order: PairOrder, *, start: int, stop: int, num_workers: int
) -> torch.utils.data.DataLoader:
    """Micro-batches for global micro-steps start..stop-1, decoded in ``num_workers`` workers."""
    return torch.utils.data.DataLoader(
        dataset,
        batch_sampler=OrderSampler(order, start, stop),
        collate_fn=collate_pairs,
        num_workers=num_workers,
        persistent_workers=False,
        prefetch_factor=2 if num_workers > 0 else None,
    )
