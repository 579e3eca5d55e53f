"""The order of pairs: a per-epoch permutation sharded over ranks, resumable by micro-step,
and the DataLoader that decodes it.

Epoch e's order is ``epoch_permutation(seed, e, n)`` with the tail that does not divide by the
world size dropped; rank r takes every world-th pair from r; its pairs are cut into
micro-batches of ``micro`` (an incomplete last one is dropped).

With ``data_order: windowed`` (:func:`order_options`) the epoch's pairs come instead from
:func:`snpo.data.locality.windowed_epoch`: row groups permuted, each rank a contiguous slice,
pairs shuffled within windows of K row groups — the same number of pairs per rank, so the
micro-step arithmetic below is shared by both orders.

With ``resolution_buckets`` (:mod:`snpo.data.buckets`) the order is ``bucketed``
(:func:`bucket_chunks`): each bucket's pairs are permuted and cut into micro-batches of
``micro`` pairs (a bucket's leftover < micro pairs are dropped for that epoch; the permutation
changes every epoch, so different pairs are left out), the micro-batches of all buckets are
permuted together, and global micro-step b of the epoch gives rank r micro-batch b·world + r
(the ≤ world − 1 micro-batches left at the end of the epoch are dropped). Every micro-batch
holds pairs of one bucket; the micro-batch sequence depends on (seed, epoch) only, not on the
world size, so micro × world pairs are consumed per global micro-step as in the global order
and a resume on another world size re-bases the same way
(:func:`snpo.trainer.checkpoint_io.rebase_position`).
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence

import numpy as np
import torch

from snpo.data.dataset import PairDataset, collate_pairs
from snpo.data.errors import DataError
from snpo.data.locality import singleton_groups, windowed_epoch
from snpo.draws import STREAM_ORDER, epoch_permutation, generator

BUCKET_ORDER_INDEX = -1_000_000  # draw index of the micro-batch permutation; bucket b: -1e6-1-b


def bucket_chunks(bucket_ids: np.ndarray, *, seed: int, epoch: int, micro: int) -> np.ndarray:
    """The bucketed order's micro-batches of ``epoch``: (M, micro) int64 pair indices, one
    bucket per row, M = Σ_b ⌊n_b / micro⌋ (see the module docstring); bucket_ids: (n,)."""
    ids = np.asarray(bucket_ids, dtype=np.int64)
    rows = []
    for b in np.unique(ids).tolist():
        members = np.nonzero(ids == b)[0]
        g = generator(seed, epoch, BUCKET_ORDER_INDEX - 1 - int(b), STREAM_ORDER)
        members = members[torch.randperm(len(members), generator=g).numpy()]
        k = len(members) // micro
        if k:
            rows.append(members[: k * micro].reshape(k, micro))
    if not rows:
        return np.zeros((0, micro), dtype=np.int64)
    chunks = np.concatenate(rows)
    g = generator(seed, epoch, BUCKET_ORDER_INDEX, STREAM_ORDER)
    return chunks[torch.randperm(len(chunks), generator=g).numpy()].astype(np.int64)


class PairOrder:
    """Which pairs rank ``rank`` sees at global micro-step g (0-based, counted over the run).

    Micro-step g is batch g mod B of epoch g div B, with B micro-batches per epoch and rank —
    so resuming after ``steps`` optimizer steps starts at g = steps × gradient_accumulation_steps.

    groups: (n,) row-group id of each pair (``source.row_groups()``) and window: K ≥ 1 select
    the windowed order (:mod:`snpo.data.locality`); window 0, no groups, or one pair per group
    (own pairs, hub datasets): the global order. buckets: (n,) bucket id of each pair and
    bucket_sizes: the (w, h) of each id select the bucketed order (:func:`bucket_chunks`);
    :meth:`keys` then carries each micro-batch's bucket size to the dataset.
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
        buckets: np.ndarray | None = None,
        bucket_sizes: Sequence[tuple[int, int]] | None = None,
    ) -> None:
        self.n, self.seed, self.rank, self.world, self.micro = n, seed, rank, world, micro
        self.buckets = None if buckets is None else np.asarray(buckets, dtype=np.int64)
        self.bucket_sizes = None if bucket_sizes is None else [tuple(b) for b in bucket_sizes]
        if self.buckets is not None:
            return self._init_bucketed()
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

    def _init_bucketed(self) -> None:
        if len(self.buckets) != self.n:
            raise DataError(f"data order: {len(self.buckets)} bucket ids for {self.n} pairs")
        self.groups, self.window, self.kind = None, 0, "bucketed"
        counts = np.bincount(self.buckets, minlength=len(self.bucket_sizes))
        self.batches_per_epoch = int((counts // self.micro).sum()) // self.world
        self.per_rank = self.batches_per_epoch * self.micro
        if self.batches_per_epoch < 1:
            raise DataError(
                f"train_data: {self.n} pairs in resolution_buckets {self.histogram()} give no "
                f"micro-batch of train_batch_size_per_gpu {self.micro} pairs of one bucket for "
                f"each of {self.world} process(es); add pairs, use fewer buckets or a smaller "
                "train_batch_size_per_gpu"
            )
        self._epoch, self._chunks = None, None

    def histogram(self) -> dict[str, int]:
        """Bucket "WxH" → pairs, for the bucketed order ({} for the others)."""
        if self.buckets is None:
            return {}
        from snpo.data.buckets import Bucket, histogram

        return histogram(self.buckets, [Bucket(*b) for b in self.bucket_sizes])

    def describe(self) -> str:
        """One line: the order and, when bucketed, the bucket histogram and what is dropped."""
        if self.kind != "bucketed":
            return f"data order: {self.kind}"
        used = self.batches_per_epoch * self.micro * self.world
        hist = ", ".join(f"{k}: {v}" for k, v in self.histogram().items())
        return (
            f"data order: bucketed, resolution buckets (w×h: pairs) {hist}; {used} of "
            f"{self.n} pairs per epoch (leftovers of each bucket and the last micro-batches "
            "that do not fill every process are dropped, different ones each epoch)"
        )

    def _epoch_chunks(self, epoch: int) -> np.ndarray:
        if self._epoch != epoch:
            chunks = bucket_chunks(self.buckets, seed=self.seed, epoch=epoch, micro=self.micro)
            self._chunks, self._epoch = chunks, epoch
        return self._chunks

    def size(self, micro_step: int) -> tuple[int, int] | None:
        """The (w, h) bucket of this rank's micro-batch at ``micro_step`` (None: not bucketed)."""
        if self.buckets is None:
            return None
        epoch, b = self.position(micro_step)
        row = self._epoch_chunks(epoch)[b * self.world + self.rank]
        return self.bucket_sizes[int(self.buckets[row[0]])]

    def keys(self, micro_step: int) -> list[tuple]:
        """:meth:`batch`'s keys, with the bucket's (w, h) appended when bucketed (the
        :class:`PairDataset` keys)."""
        pairs = self.batch(micro_step)
        size = self.size(micro_step)
        return pairs if size is None else [(e, i, size) for e, i in pairs]

    def position(self, micro_step: int) -> tuple[int, int]:
        """(epoch, batch within the epoch) of global micro-step ``micro_step``."""
        return divmod(micro_step, self.batches_per_epoch)

    def batch(self, micro_step: int) -> list[tuple[int, int]]:
        """The (epoch, pair index) keys of this rank's micro-batch at ``micro_step``."""
        epoch, b = self.position(micro_step)
        if self.kind == "bucketed":
            rows = self._epoch_chunks(epoch)[b * self.world + self.rank].tolist()
            return [(epoch, int(i)) for i in rows]
        if self._epoch != epoch:
            self._mine, self._epoch = self.epoch_pairs(epoch), epoch
        rows = self._mine[b * self.micro : (b + 1) * self.micro].tolist()
        return [(epoch, int(i)) for i in rows]

    def epoch_pairs(self, epoch: int) -> torch.Tensor:
        """This rank's pair indices (per_rank,) in ``epoch``, in the order they are consumed."""
        if self.kind == "bucketed":
            chunks = self._epoch_chunks(epoch)[: self.batches_per_epoch * self.world]
            return torch.from_numpy(chunks[self.rank :: self.world].reshape(-1).copy())
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


def order_options(cfg, source, model=None, *, progress: bool = False) -> dict:
    """The :class:`PairOrder` keywords of ``cfg.data_order`` for ``source``: {} (global) or the
    source's row groups and ``cfg.data_window_row_groups`` (windowed); with
    ``cfg.resolution_buckets`` the pairs' buckets (read from the image headers once) and their
    sizes (bucketed). model: the loaded model (its VAE factor and denoiser set the bucket step;
    required with buckets)."""
    if getattr(cfg, "resolution_buckets", None) is not None:
        return bucket_options(cfg, source, model, progress=progress)
    if getattr(cfg, "data_order", "global") != "windowed":
        return {}
    return {"groups": source.row_groups(), "window": int(cfg.data_window_row_groups)}


def bucket_options(cfg, source, model, *, progress: bool = False) -> dict:
    """{"buckets": (n,) ids, "bucket_sizes": [(w, h)]} of ``cfg.resolution_buckets`` for
    ``source`` and ``model`` (ConfigError when a bucket does not fit the denoiser)."""
    from snpo.config import ConfigError
    from snpo.data.buckets import denoiser_multiple, pair_bucket_ids, resolve_buckets

    if model is None:
        raise ConfigError("resolution_buckets: the bucket step needs the model (its VAE factor)")
    multiple = denoiser_multiple(model.latent_scale, dict(model.unet.config))
    try:
        sizes = resolve_buckets(cfg.resolution_buckets, cfg.resolution, multiple)
    except ValueError as err:
        msg = str(err)
        raise ConfigError(
            msg if msg.startswith("resolution_buckets") else f"resolution_buckets: {msg}"
        ) from None
    from snpo.trainer.setup import latent_grid_problem  # e.g. SD3's position table

    for b in sizes:
        problem = next(filter(None, (latent_grid_problem(model, side) for side in b)), None)
        if problem:
            raise ConfigError(f"resolution_buckets: bucket {b}: {problem}")
    ids = pair_bucket_ids(source, sizes, progress=progress)
    return {"buckets": ids, "bucket_sizes": [tuple(b) for b in sizes]}


class OrderSampler(torch.utils.data.Sampler):
    """Batch sampler yielding :meth:`PairOrder.batch` for micro-steps start..stop-1."""

    def __init__(self, order: PairOrder, start: int, stop: int) -> None:
        self.order, self.start, self.stop = order, start, stop

    def __iter__(self) -> Iterator[list[tuple[int, int]]]:
        for g in range(self.start, self.stop):
            yield self.order.keys(g)

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
