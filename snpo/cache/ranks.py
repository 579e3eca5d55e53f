"""How the processes of one build share the cache folder: the rank/world of a torch.distributed
launch, barriers, and the folder lock each process holds for its run (:mod:`snpo.cache.locks`)."""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from pathlib import Path

from snpo.cache.locks import FolderLocked, exclusive_lock, shared_lock
from snpo.distributed import barrier, broadcast_text, rank_and_world

__all__ = ["barrier", "rank_and_world", "writer_lock"]


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
