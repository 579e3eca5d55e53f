"""The glibc allocator setting of a CPU cache build (:func:`build_allocator`)."""

from __future__ import annotations

import contextlib
import os
import sys
from collections.abc import Iterator

import torch

__all__ = ["build_allocator"]

# glibc mallopt parameters
_M_TRIM_THRESHOLD, _M_MMAP_THRESHOLD = -1, -3


@contextlib.contextmanager
def build_allocator(device: torch.device) -> Iterator[bool]:
    """Keep freed buffers in the heap while a CPU build on glibc runs; yields whether the
    thresholds were raised.

    glibc serves allocations above its mmap threshold (adaptive, up to 32 MiB) with fresh mmaps
    and unmaps them on free, so every VAE forward page-faults its activations (tens to hundreds
    of MB) in again, zero-filled (docs/cache.md, "Build cost and break-even"). Inside the block
    the mmap and trim thresholds are 2³¹ − 1; afterwards they are the ceilings glibc's adaptive
    thresholds reach (32 MiB, 64 MiB) and the heap is trimmed. DataLoader workers forked inside
    inherit the setting. ``SNPO_CACHE_MALLOC=0`` leaves the allocator alone; no-op on a GPU or
    without glibc."""
    libc, ok = None, [0]
    if (
        device.type == "cpu"
        and sys.platform.startswith("linux")
        and os.environ.get("SNPO_CACHE_MALLOC", "1") != "0"
    ):
        import ctypes

        try:
            libc = ctypes.CDLL("libc.so.6")
            big = ctypes.c_int(2**31 - 1)
            ok = [libc.mallopt(_M_MMAP_THRESHOLD, big), libc.mallopt(_M_TRIM_THRESHOLD, big)]
        except (OSError, AttributeError):
            libc, ok = None, [0]
    try:
        yield libc is not None and all(ok)
    finally:
        if libc is not None:
            import ctypes

            libc.mallopt(_M_MMAP_THRESHOLD, ctypes.c_int(32 << 20))
            libc.mallopt(_M_TRIM_THRESHOLD, ctypes.c_int(64 << 20))
            libc.malloc_trim(ctypes.c_size_t(0))
