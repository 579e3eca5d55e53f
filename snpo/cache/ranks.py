"""How the processes of one build share the work and the cache folder: the rank/world of a
torch.distributed launch, barriers, each rank's share of a phase's units (:func:`rank_units`,
:func:`todo_share`) and each DataLoader worker's share of a shard's batches
(:func:`worker_batch_order`), and the folder lock each process holds for its run
(:mod:`snpo.cache.locks`).

Sequential reads. A phase's units (shards, or (epoch, shard)) are listed in pair order, and a
shard holds consecutive pairs, i.e. consecutive rows of the parquet files in file order. Every
share is a *contiguous run* of units, so a rank reads its files front to back, one row group at
a time; only a row group that straddles the boundary between two ranks' runs is read by both.
Shares depend on the global rank and the world size only (nodes are just more ranks):

- a torch.distributed build (every rank sees rank 0's view of what is done): the units not yet
  done, cut into ``world`` contiguous runs of (almost) equal length (:func:`todo_share`), so a
  resumed build, on any number of ranks, spreads exactly the missing units evenly;
- independent ranks (``--rank R --world N`` jobs that start at different times): the fixed run
  :func:`rank_units` of all units, whatever is done, so that ranks started at different times
  never disagree about whose a unit is (each skips what is done).
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from pathlib import Path

from snpo.cache.locks import FolderLocked, exclusive_lock, shared_lock
from snpo.distributed import barrier, broadcast_text, rank_and_world

__all__ = [
    "barrier",
    "rank_and_world",
    "rank_units",
    "todo_share",
    "worker_batch_order",
    "writer_lock",
]


def split_points(n: int, parts: int) -> list[int]:
    """Bounds of ``parts`` contiguous runs of ``n`` items whose lengths differ by at most one,
    the longer ones first: run p is ``[b[p], b[p + 1])``."""
    if parts < 1:
        raise ValueError(f"parts must be ≥ 1, got {parts}")
    q, r = divmod(n, parts)
    return [p * q + min(p, r) for p in range(parts + 1)]


def rank_units(n: int, rank: int, world: int) -> range:
    """The units of rank ``rank`` of ``world`` among ``n`` (independent ranks): a contiguous
    run; the runs of ranks 0..world-1 are in order and cover 0..n-1 exactly once."""
    if not 0 <= rank < world:
        raise ValueError(f"rank {rank} is outside world {world}")
    b = split_points(n, world)
    return range(b[rank], b[rank + 1])


def todo_share(done: list[bool], rank: int, world: int) -> list[int]:
    """Rank ``rank``'s units (indices into ``done``) of a torch.distributed build: the units not
    done, in order, cut into ``world`` contiguous runs of (almost) equal length; every rank must
    pass the same ``done`` (rank 0's, broadcast)."""
    todo = [i for i, d in enumerate(done) if not d]
    run = rank_units(len(todo), rank, world)
    return todo[run.start : run.stop]


def worker_batch_order(num_batches: int, workers: int) -> list[int]:
    """The order to give a DataLoader a shard's ``num_batches`` batches in (indices into them)
    so that each of its ``workers`` worker processes reads a contiguous run of the shard.

    A DataLoader hands batch j of its sampler to worker j mod W. Listing the runs of
    :func:`split_points` round by round (the first batch of every run, then the second, …)
    gives worker w exactly run w, in order (the longer runs come first, so the last, partial
    round still maps run w to worker w). Each worker then reads its part of the shard front to
    back: a row group is read by one worker (two only where it straddles their runs), not by
    every worker as with consecutive batches dealt out in turn."""
    if workers <= 1 or num_batches <= 1:
        return list(range(num_batches))
    b = split_points(num_batches, workers)
    runs = [range(b[w], b[w + 1]) for w in range(workers)]
    return [run[t] for t in range(len(runs[0])) for run in runs if t < len(run)]


@contextlib.contextmanager
def writer_lock(out: Path, rank: int, world: int, *, grouped: bool) -> Iterator[None]:
    """Hold the lock of cache folder ``out`` for the run of build process ``rank`` of ``world``
    (``grouped``: the ranks are one torch.distributed process group):

    - one process (world 1): ``out/.lock`` exclusively — it merges journals, removes stale
      temporary files and rewrites the manifest, so nobody else may write;
    - a torch.distributed build: rank 0 takes ``out/.lock`` exclusively for the whole build
      (merge included) and tells the other ranks whether it got it, so that all ranks stop
      with the same FolderLocked (the ranks of one build never refuse each other);
    - independent ranks (``--rank R --world N`` without a process group): ``out/.lock`` shared
      (ranks of one build run side by side, but never beside an exclusive writer: a
      one-process build, --merge or --verify --repair), and ``out/.lock-rankR-of-N``
      exclusively (the same rank twice is refused).
    """
    if world == 1:
        with exclusive_lock(out, "snpo cache (build)"):
            yield
        return
    who = f"snpo cache (build, rank {rank} of {world})"
    if not grouped:
        rank_lock = f".lock-rank{rank:05d}-of-{world:05d}"
        with shared_lock(out, who), exclusive_lock(out, who, name=rank_lock):
            yield
        return
    with contextlib.ExitStack() as stack:
        err = None
        if rank == 0:
            try:
                stack.enter_context(exclusive_lock(out, f"snpo cache (build, {world} ranks)"))
            except FolderLocked as e:
                err = e
        msg = broadcast_text(str(err) if err is not None else "")
        if err is not None:
            raise err
        if msg:
            raise FolderLocked(msg, out, [])
        yield
