"""The one module of distributed helpers: environment and initialisation, collectives on small
tensors and Python objects, agreement on a step every rank takes together, timeouts, and the
cleanup of DeepSpeed's CPU shared-memory names.

Every helper is a no-op (or the identity) with one process or without torch.distributed.
"""

from __future__ import annotations

import contextlib
import datetime
import os
import socket
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, TypeVar

import torch

from snpo.config import TrainConfig

T = TypeVar("T")


@dataclass
class DistInfo:
    """This process's place in the run: rank, local rank, world size, its device."""

    rank: int
    local_rank: int
    world: int
    device: torch.device

    @property
    def is_main(self) -> bool:
        return self.rank == 0


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def prepare_environment(cfg: TrainConfig) -> None:
    """Environment variables DeepSpeed needs, before deepspeed is imported: the CPU accelerator
    without CUDA; without a launcher, one process (RANK 0, WORLD_SIZE 1) on a free local port."""
    if cfg.device == "cpu" or not torch.cuda.is_available():
        os.environ.setdefault("DS_ACCELERATOR", "cpu")
    if "RANK" not in os.environ or "WORLD_SIZE" not in os.environ:
        os.environ.setdefault("RANK", "0")
        os.environ.setdefault("LOCAL_RANK", "0")
        os.environ.setdefault("WORLD_SIZE", "1")
        os.environ.setdefault("MASTER_ADDR", "127.0.0.1")
        os.environ.setdefault("MASTER_PORT", str(_free_port()))
    os.environ.setdefault("LOCAL_RANK", os.environ.get("RANK", "0"))


def init_distributed(cfg: TrainConfig) -> DistInfo:
    """``deepspeed.init_distributed`` (nccl on GPUs, gloo on the CPU, ``dist_timeout_s``) once
    per process; → this process's :class:`DistInfo` (its CUDA device made current)."""
    prepare_environment(cfg)
    import deepspeed

    use_cuda = cfg.device != "cpu" and torch.cuda.is_available()
    if not torch.distributed.is_initialized():
        deepspeed.init_distributed(
            dist_backend="nccl" if use_cuda else "gloo",
            timeout=datetime.timedelta(seconds=cfg.dist_timeout_s),
        )
        release_shm_names()
    rank = torch.distributed.get_rank()
    world = torch.distributed.get_world_size()
    local = int(os.environ.get("LOCAL_RANK", "0"))
    device = torch.device("cuda", local) if use_cuda else torch.device("cpu")
    if use_cuda:
        torch.cuda.set_device(device)
    return DistInfo(rank, local, world, device)


def release_shm_names() -> None:
    """Unlink this rank's name of DeepSpeed's CPU shared-memory comm buffer
    (``/dev/shm/deepspeed_allreduce_buffer_<uid>_<addr>_<port>_<rank>``, ~69 MB) once every rank
    has mapped every buffer: the mappings stay valid, and nothing is left in /dev/shm when the
    process ends, however it ends (DeepSpeed never removes them)."""
    if not _several():
        return
    torch.distributed.barrier()  # DeepSpeed maps every peer's buffer inside init_distributed
    name = (
        f"deepspeed_allreduce_buffer_{os.getuid()}_{os.environ.get('MASTER_ADDR', '')}_"
        f"{os.environ.get('MASTER_PORT', '')}_{torch.distributed.get_rank()}"
    )
    with contextlib.suppress(OSError):
        os.unlink(os.path.join("/dev/shm", name))


class PeerFailed(RuntimeError):
    """Another process of the run failed at a step every process checks together; its own
    error names the problem."""


def rank_and_world() -> tuple[int, int] | None:
    """(rank, world) of the default torch.distributed process group; None outside one."""
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        return torch.distributed.get_rank(), torch.distributed.get_world_size()
    return None


def broadcast_text(text: str) -> str:
    """Rank 0's ``text`` on every rank of the default process group."""
    obj = [text]
    device = None
    if torch.distributed.get_backend() == "nccl":
        device = torch.device("cuda", torch.cuda.current_device())
    torch.distributed.broadcast_object_list(obj, src=0, device=device)
    return obj[0]


@contextlib.contextmanager
def torch_globals_kept():
    """Restore torch's global functions that DeepSpeed replaces for good: ZeRO-3 swaps
    ``torch.nn.functional.linear`` for its own autograd function ("This will persist unless
    manually reset"), which rounds differently, so a later run in the same process (a Python
    API user, a test) would not reproduce a fresh process's numbers."""
    linear = torch.nn.functional.linear
    try:
        yield
    finally:
        torch.nn.functional.linear = linear


def _several() -> bool:
    return torch.distributed.is_initialized() and torch.distributed.get_world_size() > 1


def is_timeout(err: BaseException) -> bool:
    """A torch.distributed collective that gave up waiting for a peer."""
    text = f"{type(err).__name__} {err}".lower()
    return "timed out" in text or "timeout" in text


def all_reduce(t: torch.Tensor, op: str = "sum") -> torch.Tensor:
    """In-place all-reduce (``op``: "sum" or "min") of a small host or device tensor (through
    the GPU under nccl, which has no CPU tensors); → ``t``."""
    if _several():
        ops = {"sum": torch.distributed.ReduceOp.SUM, "min": torch.distributed.ReduceOp.MIN}
        if torch.distributed.get_backend() == "nccl" and t.device.type != "cuda":
            buf = t.to("cuda")
            torch.distributed.all_reduce(buf, op=ops[op])
            t.copy_(buf.cpu())
        else:
            torch.distributed.all_reduce(t, op=ops[op])
    return t


def all_gather_objects(obj: Any) -> list[Any]:
    """Every rank's ``obj`` in rank order (picklable objects; ``[obj]`` with one process)."""
    if not _several():
        return [obj]
    parts: list[Any] = [None] * torch.distributed.get_world_size()
    torch.distributed.all_gather_object(parts, obj)
    return parts


def barrier() -> None:
    """Wait for every rank (nothing with one process)."""
    if _several():
        torch.distributed.barrier()


def agree(fn: Callable[[], T], what: str) -> T:
    """Run ``fn()`` on every rank and make every rank stop if any of them failed.

    The rank that failed re-raises its own error; the others raise :class:`PeerFailed`, so no
    rank waits in a later collective for a process that is gone."""
    error: BaseException | None = None
    result = None
    try:
        result = fn()
    except Exception as err:  # noqa: BLE001 - re-raised below, on every rank
        error = err
    ok = all_reduce(torch.tensor([0.0 if error is not None else 1.0]), "min")
    if error is not None:
        raise error
    if float(ok[0]) < 1.0:
        raise PeerFailed(f"another process failed while {what} (its error says why)")
    return result
