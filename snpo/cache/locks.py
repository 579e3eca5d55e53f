"""Advisory folder locks (``fcntl.flock``) so that two processes never write one folder at once.

    with exclusive_lock(folder, "snpo cache (build)"):   # the folder's only writer
        ...
    with shared_lock(folder, "snpo cache --rank 1 --world 4"):   # one of several cooperating
        ...                                                       # writers (no exclusive one)

The lock is ``folder/.lock`` (``name=`` for another file), taken without waiting: on contention
:class:`FolderLocked` is raised at once, naming the folder and the holder's pid and host. The
lock file stays in the folder (removing it would race with the next taker); the lock itself
goes when the ``with`` block ends or the process dies (the kernel drops flocks of closed files),
so a crashed holder never leaves a folder locked.

Who holds it: an exclusive holder writes ``pid host what`` into the lock file (and empties it
on release). Each shared holder registers in a file of its own, ``.lock.shared-<host>-<pid>``,
flocked for as long as it holds the lock and deleted on release; a registration whose flock is
free is stale (its process died) and is removed by the next look. Locks are re-entrant within a
process (an exclusive holder may take the same lock again, exclusive or shared).
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import os
import socket
from collections.abc import Iterator
from pathlib import Path

LOCK_NAME = ".lock"
_SHARED_TAG = ".shared-"

# lock file (real path) → [mode ("exclusive" | "shared"), depth] of the locks this process holds
_HELD: dict[str, list] = {}


class FolderLocked(RuntimeError):
    """Another process holds the lock of a folder; the message names the folder and holder(s).

    ``folder``: the locked folder; ``holders``: one ``"pid N on HOST (what)"`` per holder found
    (empty when the holder could not be identified)."""

    def __init__(self, message: str, folder: Path, holders: list[str]) -> None:
        super().__init__(message)
        self.folder = folder
        self.holders = holders


def _ident(what: str) -> str:
    return f"pid {os.getpid()} on {socket.gethostname()} ({what})"


def _alive(line: str) -> bool:
    """False only for a holder line of this host whose process is certainly gone."""
    bits = line.split()
    if len(bits) < 4 or bits[0] != "pid" or bits[2] != "on" or not bits[1].isdigit():
        return True
    if bits[3] != socket.gethostname():
        return True  # another machine's process: cannot tell
    try:
        os.kill(int(bits[1]), 0)
    except ProcessLookupError:
        return False
    except OSError:  # e.g. EPERM: it exists, as another user
        return True
    return True


def _shared_holders(path: Path) -> list[str]:
    """The registered shared holders of ``path`` whose registration is still flocked."""
    out = []
    for reg in sorted(path.parent.glob(f"{path.name}{_SHARED_TAG}*")):
        if reg.name.endswith(".new"):
            continue
        try:
            fd = os.open(reg, os.O_RDWR)
        except OSError:
            continue
        try:
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except OSError:  # flocked: its owner holds the shared lock
                out.append(os.read(fd, 4096).decode(errors="replace").strip() or reg.name)
                continue
            with contextlib.suppress(OSError):  # free: left by a dead process
                reg.unlink()
        finally:
            os.close(fd)
    return out


def holders(path: Path) -> list[str]:
    """Who holds lock file ``path`` (best effort; for messages): shared holders, else the
    exclusive holder that the file names."""
    found = _shared_holders(path)
    if found:
        return found
    try:
        text = path.read_text(errors="replace").strip()
    except OSError:
        return []
    return [line for line in text.splitlines() if line.strip() and _alive(line)]


def _refuse(folder: Path, path: Path, what: str) -> FolderLocked:
    who = holders(path)
    by = "; ".join(who) if who else "another process (pid unknown)"
    return FolderLocked(
        f"{folder} is locked by {by}: {what} needs it and does not wait. Let that process "
        f"finish (or stop it) and retry; two processes writing one folder would lose each "
        f"other's work. (Lock file: {path}.)",
        folder,
        who,
    )


def _open(path: Path) -> int:
    if not path.parent.is_dir():
        raise FileNotFoundError(f"{path.parent}: no such folder to lock")
    return os.open(path, os.O_RDWR | os.O_CREAT, 0o666)


def _flock(fd: int, mode: int, folder: Path, path: Path, what: str) -> None:
    try:
        fcntl.flock(fd, mode | fcntl.LOCK_NB)
    except OSError as err:
        if err.errno in (errno.EWOULDBLOCK, errno.EAGAIN, errno.EACCES):
            raise _refuse(folder, path, what) from None
        raise OSError(
            err.errno,
            f"cannot lock {path} for {what}: {err.strerror} (does this file system support flock?)",
        ) from err


@contextlib.contextmanager
def _reenter(key: str, mode: str, folder: Path, path: Path, what: str) -> Iterator[bool]:
    held = _HELD.get(key)
    if held is None:
        yield False
        return
    if held[0] == "shared" and mode == "exclusive":
        raise FolderLocked(
            f"{folder}: {what} needs the folder alone, but this process (pid {os.getpid()}) "
            "holds it shared",
            folder,
            [_ident("shared")],
        )
    held[1] += 1
    try:
        yield True
    finally:
        held[1] -= 1


@contextlib.contextmanager
def _named_in_lock_file(fd: int, what: str) -> Iterator[None]:
    """An exclusive holder's announcement: ``pid host what`` in the lock file, emptied on
    release."""
    os.ftruncate(fd, 0)
    os.pwrite(fd, (_ident(what) + "\n").encode(), 0)
    try:
        yield
    finally:
        with contextlib.suppress(OSError):
            os.ftruncate(fd, 0)  # released: name no holder


@contextlib.contextmanager
def _registered(folder: Path, name: str, what: str) -> Iterator[None]:
    """A shared holder's announcement: ``name.shared-<host>-<pid>``, flocked before it becomes
    visible under its name and deleted on release."""
    reg = folder / f"{name}{_SHARED_TAG}{socket.gethostname()}-{os.getpid()}"
    tmp = reg.with_name(reg.name + ".new")
    reg_fd = os.open(tmp, os.O_RDWR | os.O_CREAT | os.O_TRUNC, 0o666)
    try:
        fcntl.flock(reg_fd, fcntl.LOCK_EX)
        os.write(reg_fd, (_ident(what) + "\n").encode())
        os.replace(tmp, reg)
        yield
    finally:
        with contextlib.suppress(OSError):
            reg.unlink()
        os.close(reg_fd)


@contextlib.contextmanager
def _hold(folder: Path, what: str, name: str, mode: str) -> Iterator[Path]:
    """Take ``folder/name`` in ``mode`` ("exclusive" | "shared") without waiting, announce the
    holder, and keep it for the ``with`` block (re-entrant within a process)."""
    folder = Path(folder)
    path = folder / name
    key = os.path.realpath(path)
    with _reenter(key, mode, folder, path, what) as again:
        if again:
            yield path
            return
        exclusive = mode == "exclusive"
        fd = _open(path)
        try:
            _flock(fd, fcntl.LOCK_EX if exclusive else fcntl.LOCK_SH, folder, path, what)
            announce = (
                _named_in_lock_file(fd, what) if exclusive else _registered(folder, name, what)
            )
            with announce:
                _HELD[key] = [mode, 1]
                try:
                    yield path
                finally:
                    del _HELD[key]
        finally:
            os.close(fd)  # drops the flock


def exclusive_lock(
    folder: Path, what: str, *, name: str = LOCK_NAME
) -> contextlib.AbstractContextManager[Path]:
    """Hold ``folder/name`` exclusively (``flock`` LOCK_EX | LOCK_NB) for the ``with`` block.

    ``what`` says who takes it (it is written into the lock file with the pid and host, and
    named in refusals). Raises :class:`FolderLocked` at once when any other process holds the
    lock (exclusive or shared). ``folder`` must exist. Yields the lock file's path. Re-entrant
    within a process."""
    return _hold(folder, what, name, "exclusive")


def shared_lock(
    folder: Path, what: str, *, name: str = LOCK_NAME
) -> contextlib.AbstractContextManager[Path]:
    """Hold ``folder/name`` shared (``flock`` LOCK_SH | LOCK_NB) for the ``with`` block: any
    number of shared holders coexist, but none with an exclusive one (either side is refused
    with :class:`FolderLocked` naming the other). The holder registers as
    ``name.shared-<host>-<pid>`` so that refusals can name it. Yields the lock file's path."""
    return _hold(folder, what, name, "shared")
