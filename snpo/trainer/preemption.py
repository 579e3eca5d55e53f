"""Stopping a run on request: signals, a vanished launcher, and which rank stopped answering.

- **Signals** (``stop_signals``, default SIGTERM, SIGINT, SIGUSR1 — what SLURM preemption, spot
  reclaim and Ctrl-C send): the first one only sets a flag. The training loop reads the flags of
  every rank in the collective it already runs once per optimizer step, so all ranks agree to
  stop after the same step; they write one checkpoint there and exit with
  :data:`PREEMPTED_EXIT` ("preempted, resumable"). The same signal arriving again within
  :data:`ECHO_SECONDS` is the launcher forwarding what the process group already got (the
  ``deepspeed`` launcher does) and is ignored; any later second signal exits at once.
- **The launcher**: a rank whose launcher process (``deepspeed``, ``torchrun``, DeepSpeed's
  ``launch`` helper) dies — e.g. SIGTERM sent to the launcher's pid alone — stops the same way
  instead of training on as an orphan.
- **Heartbeats**: every rank records the last step it finished in
  ``output_dir/.ranks/rank<R>``; when a collective times out, the error names the ranks that
  fell behind (:func:`stale_ranks`).
"""

from __future__ import annotations

import os
import signal
import threading
import time
from pathlib import Path

PREEMPTED_EXIT = 8
ECHO_SECONDS = 3.0
LAUNCHER_MARKS = ("deepspeed", "torchrun", "torch.distributed.run", "torch.distributed.launch")


class Preempted(RuntimeError):
    """The run stopped on request after writing a checkpoint; resuming continues exactly."""


class StopRequest:
    """Why the run should stop after the current optimizer step (None: it should not)."""

    def __init__(self) -> None:
        self.reason: str | None = None
        self._first: tuple[int, float] | None = None
        self._saved: dict[int, object] = {}
        self._watcher: threading.Thread | None = None
        self._done = threading.Event()

    # signals ---------------------------------------------------------------------------
    def _handler(self, signum, frame) -> None:  # noqa: ARG002 - the signal module's signature
        now = time.monotonic()
        name = signal.Signals(signum).name
        if self._first is None:
            self._first = (signum, now)
            self.reason = f"{name} received"
            print(
                f"snpo train: {name} received: finishing this optimizer step, writing a "
                "checkpoint, then exiting (send it again to stop at once)",
                flush=True,
            )
            return
        sig, at = self._first
        if signum == sig and now - at < ECHO_SECONDS:
            return  # the launcher forwarding the group's signal
        print(f"snpo train: second {name}: stopping at once, nothing saved", flush=True)
        os._exit(128 + signum)

    def install(self, names: list[str]) -> None:
        """Handle the named signals (main thread only; elsewhere nothing is installed)."""
        if threading.current_thread() is not threading.main_thread():
            return
        for n in names:
            sig = getattr(signal, n)
            self._saved[sig] = signal.signal(sig, self._handler)

    # the launcher ----------------------------------------------------------------------
    def watch_launchers(self, interval: float = 1.0) -> list[int]:
        """Start a daemon thread that requests a stop when a launcher ancestor exits; → the
        pids it watches (empty without a launcher)."""
        pids = launcher_ancestors()
        if not pids:
            return pids

        def watch() -> None:
            while not self._done.wait(interval):
                gone = [p for p in pids if not _alive(p)]
                if gone and self.reason is None:
                    self.reason = f"the launcher (pid {gone[0]}) exited"
                    print(f"snpo train: {self.reason}: stopping after this step", flush=True)

        self._watcher = threading.Thread(target=watch, name="snpo-launcher-watch", daemon=True)
        self._watcher.start()
        return pids

    def close(self) -> None:
        """Restore the previous signal handlers and stop watching."""
        self._done.set()
        for sig, old in self._saved.items():
            try:
                signal.signal(sig, old)
            except (ValueError, TypeError):  # pragma: no cover - not the main thread
                pass
        self._saved.clear()


def _alive(pid: int) -> bool:
    """pid exists and is not a zombie."""
    try:
        with open(f"/proc/{pid}/stat") as fh:
            return fh.read().rsplit(")", 1)[1].split()[0] != "Z"
    except OSError:
        try:
            os.kill(pid, 0)
            return True
        except OSError:
            return False


def _parent_and_cmdline(pid: int) -> tuple[int, str]:
    with open(f"/proc/{pid}/stat") as fh:
        ppid = int(fh.read().rsplit(")", 1)[1].split()[1])
    with open(f"/proc/{pid}/cmdline", "rb") as fh:
        cmd = fh.read().replace(b"\0", b" ").decode(errors="replace")
    return ppid, cmd


def launcher_ancestors(start: int | None = None) -> list[int]:
    """Pids of this process's ancestors that are distributed launchers (nearest first)."""
    out, pid = [], os.getppid() if start is None else start
    for _ in range(16):
        if pid <= 1:
            break
        try:
            ppid, cmd = _parent_and_cmdline(pid)
        except OSError:
            break
        if any(mark in cmd for mark in LAUNCHER_MARKS):
            out.append(pid)
        pid = ppid
    return out


# heartbeats --------------------------------------------------------------------------------
def heartbeat_dir(output_dir: str | Path) -> Path:
    return Path(output_dir) / ".ranks"


def beat(output_dir: str | Path, rank: int, step: int) -> None:
    """Record that ``rank`` finished ``step`` (a tiny file, rewritten in place)."""
    d = heartbeat_dir(output_dir)
    d.mkdir(parents=True, exist_ok=True)
    (d / f"rank{rank}").write_text(f"{step} {time.time():.3f}\n")


def stale_ranks(output_dir: str | Path, world: int, my_step: int) -> list[str]:
    """'rank R (last step S, N s ago)' for every rank whose last finished step is behind
    ``my_step`` or unknown."""
    out = []
    now = time.time()
    for r in range(world):
        f = heartbeat_dir(output_dir) / f"rank{r}"
        try:
            step_s, at_s = f.read_text().split()
            step, at = int(step_s), float(at_s)
        except (OSError, ValueError):
            out.append(f"rank {r} (no heartbeat)")
            continue
        if step < my_step:
            out.append(f"rank {r} (last step {step}, {now - at:.0f} s ago)")
    return out
