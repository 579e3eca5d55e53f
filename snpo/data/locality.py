"""The windowed (locality-preserving) pair order, and the bounded row-group cache it reads with.

A parquet source reads image bytes one row group at a time (Pick-a-Pic v2: ~100 rows, ~33 MB
of JPEG per row group), so a globally shuffled order pays one row-group read per pair. The
windowed order of epoch e keeps pairs of a row group together:

1. the G row groups are permuted (``torch.randperm`` keyed by (seed, e, index -2)); the pairs,
   in that group order and file order inside a group, form one sequence of n pairs;
2. rank r takes the contiguous slice [r·P, (r+1)·P) of that sequence, P = n // world (the tail
   is dropped, as in the global order), so ranks take whole row groups except the ≤ world − 1
   groups that straddle a slice boundary, which two neighbouring ranks share;
3. the rank's slice is cut into windows of K consecutive row groups, and the pairs of each
   window are shuffled (keyed by (seed, e, index -3 - r)).

So the pairs of micro-steps in one window come from at most K row groups: a reader holding the
last K row groups (:class:`RowGroupCache`) reads each row group once per epoch and worker.
Larger K shuffles better (pairs of K·~100 rows mixed) and holds more memory: K × ~33 MB per
DataLoader worker for Pick-a-Pic. P is that of the global order, so the number of micro-batches
per epoch — hence resume positions and the cache's epoch count — does not depend on the order.

A source without row groups (own pairs, hub datasets) gives every pair its own group; when every
group is a single pair the windowed order *is* the global order (:class:`snpo.data.PairOrder`).
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Callable, Hashable

import numpy as np
import torch

from snpo.draws import STREAM_ORDER, generator

GROUP_PERMUTATION_INDEX = -2  # draw index of the row-group permutation (pairs: -1)
WINDOW_SHUFFLE_INDEX = -3  # rank r's window shuffle: index -3 - r


def singleton_groups(groups: np.ndarray | None) -> bool:
    """True when there are no row groups to keep together (None, or one pair per group)."""
    if groups is None:
        return True
    groups = np.asarray(groups)
    return len(np.unique(groups)) == len(groups)


def windowed_epoch(
    groups: np.ndarray, *, seed: int, epoch: int, rank: int, world: int, window: int
) -> np.ndarray:
    """Rank ``rank``'s pair indices (P,) int64 in epoch ``epoch``, P = n // world.

    groups: (n,) the row-group id of each pair (any integers; equal id = same row group).
    window: K ≥ 1 row groups whose pairs are shuffled together."""
    if window < 1:
        raise ValueError(f"window: must be ≥ 1 row group, got {window}")
    groups = np.asarray(groups)
    n = len(groups)
    per_rank = n // world
    _, gidx = np.unique(groups, return_inverse=True)  # dense group index of each pair
    num_groups = int(gidx.max()) + 1 if n else 0
    g = generator(seed, epoch, GROUP_PERMUTATION_INDEX, STREAM_ORDER)
    place = np.empty(num_groups, dtype=np.int64)  # group → its place in the epoch's order
    place[torch.randperm(num_groups, generator=g).numpy()] = np.arange(num_groups)
    seq = np.argsort(place[gidx], kind="stable")  # pairs by group place, file order inside
    mine = seq[rank * per_rank : (rank + 1) * per_rank]
    if len(mine) == 0:
        return mine.astype(np.int64)
    mg = gidx[mine]
    # the k-th distinct group of this slice (groups are contiguous in `seq`) → window k // K
    k = np.concatenate([[0], np.cumsum(mg[1:] != mg[:-1])])
    win = k // window
    g = generator(seed, epoch, WINDOW_SHUFFLE_INDEX - rank, STREAM_ORDER)
    key = torch.rand(len(mine), generator=g, dtype=torch.float64).numpy()
    return mine[np.lexsort((key, win))].astype(np.int64)


class RowGroupCache:
    """The last ``capacity`` row groups read (least recently used evicted first).

    ``get(key, read)`` returns the cached value of ``key`` or ``read()``'s, counting reads
    (``reads``) so that tests and benchmarks can check that a window is read once."""

    def __init__(self, capacity: int) -> None:
        if capacity < 1:
            raise ValueError(f"row-group cache: capacity must be ≥ 1, got {capacity}")
        self.capacity = int(capacity)
        self._items: OrderedDict[Hashable, object] = OrderedDict()
        self.reads = 0

    def __len__(self) -> int:
        return len(self._items)

    def get(self, key: Hashable, read: Callable[[], object]) -> object:
        if key in self._items:
            self._items.move_to_end(key)
            return self._items[key]
        value = read()
        self.reads += 1
        self._items[key] = value
        while len(self._items) > self.capacity:
            self._items.popitem(last=False)
        return value

    def clear(self) -> None:
        self._items.clear()
