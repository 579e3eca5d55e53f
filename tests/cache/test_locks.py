"""Folder locks (snpo.cache.locks) and their use by ``snpo cache``: a second writer of a cache
folder is refused naming the holder's pid; the lock goes with its holder (also when it is killed);
independent ranks of one build share the folder; readers take no lock."""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
from pathlib import Path

import pytest

from snpo.cache import (
    FolderLocked,
    build_cache,
    exclusive_lock,
    merge_parts,
    open_cache,
    shared_lock,
    verify_cache,
)

from .conftest import BUILD
from .conftest import cache_main as main

REPO = Path(__file__).resolve().parents[2]
FP32 = dict(BUILD, latent_dtype="fp32")

HOLDER = """
import contextlib, sys
from pathlib import Path
from snpo.cache import exclusive_lock, shared_lock
folder = Path(sys.argv[1])
with contextlib.ExitStack() as stack:
    for spec in sys.argv[2:]:  # "exclusive" | "shared", optionally ":" and a lock file name
        kind, _, name = spec.partition(":")
        lock = exclusive_lock if kind == "exclusive" else shared_lock
        stack.enter_context(lock(folder, "test holder", **({"name": name} if name else {})))
    print("locked", flush=True)
    sys.stdin.read()  # hold until the test closes stdin (or kills this process)
"""


class Holder:
    """A python process holding locks on ``folder`` until :meth:`release` or :meth:`kill`."""

    def __init__(self, folder: Path, *specs: str):
        env = dict(os.environ, PYTHONPATH=str(REPO))
        self.p = subprocess.Popen(
            [sys.executable, "-c", HOLDER, str(folder), *specs],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
            cwd=REPO,
            env=env,
        )
        line = self.p.stdout.readline()
        assert line.strip() == "locked", self.p.stderr.read()
        self.pid = self.p.pid

    def release(self) -> None:
        self.p.stdin.close()
        assert self.p.wait(timeout=30) == 0, self.p.stderr.read()

    def kill(self) -> None:
        os.kill(self.pid, signal.SIGKILL)
        self.p.wait(timeout=30)

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        if self.p.poll() is None:
            self.kill()
        for f in (self.p.stdin, self.p.stdout, self.p.stderr):
            f.close()


def test_exclusive_lock_names_the_holder_and_goes_with_it(tmp_path):
    with Holder(tmp_path, "exclusive") as h:
        with pytest.raises(FolderLocked, match=rf"{tmp_path} is locked by pid {h.pid} on ") as e:
            with exclusive_lock(tmp_path, "a second writer"):
                pass
        assert "(test holder)" in str(e.value) and "a second writer" in str(e.value)
        assert e.value.folder == tmp_path and str(h.pid) in e.value.holders[0]
        with pytest.raises(FolderLocked, match=f"pid {h.pid}"):
            with shared_lock(tmp_path, "a cooperating writer"):
                pass
        h.kill()  # process death releases the flock
    with exclusive_lock(tmp_path, "after the holder died") as path:
        assert path == tmp_path / ".lock"
        assert f"pid {os.getpid()} " in path.read_text()
        with exclusive_lock(tmp_path, "re-entered"), shared_lock(tmp_path, "re-entered"):
            pass  # re-entrant within a process
    assert (tmp_path / ".lock").read_text() == ""  # released: names no holder
    with Holder(tmp_path, "exclusive") as h:
        h.release()
    with exclusive_lock(tmp_path, "after a clean release"):
        pass


def test_shared_holders_coexist_and_are_named(tmp_path):
    with Holder(tmp_path, "shared") as a, Holder(tmp_path, "shared") as b:
        with shared_lock(tmp_path, "a third cooperating writer"):
            pass
        with pytest.raises(FolderLocked) as e:
            with exclusive_lock(tmp_path, "a lone writer"):
                pass
        msg = str(e.value)
        assert f"pid {a.pid} " in msg and f"pid {b.pid} " in msg
        b.kill()  # a dead shared holder's registration is stale: not named any more
        with pytest.raises(FolderLocked) as e:
            with exclusive_lock(tmp_path, "a lone writer"):
                pass
        assert f"pid {a.pid} " in str(e.value) and f"pid {b.pid} " not in str(e.value)
        a.release()
    with exclusive_lock(tmp_path, "a lone writer"):
        pass
    assert not list(tmp_path.glob(".lock.shared-*"))
    with shared_lock(tmp_path, "x"):
        with pytest.raises(FolderLocked, match="holds it shared"):
            with exclusive_lock(tmp_path, "x"):
                pass
    with pytest.raises(FileNotFoundError, match="no such folder to lock"):
        with exclusive_lock(tmp_path / "absent", "x"):
            pass


def test_cache_writers_are_refused_naming_the_holder(sd_cache, tmp_path, capsys):
    cfg, ref_root = sd_cache
    out = tmp_path / "c"
    shutil.copytree(ref_root, out)
    (out / "ref" / "e0000" / "s00000.safetensors").write_bytes(b"broken")  # for --repair
    manifest = (out / "manifest.json").read_bytes()
    with Holder(out, "exclusive") as h:
        with pytest.raises(FolderLocked, match=f"{out} is locked by pid {h.pid} on "):
            build_cache(cfg, out, **FP32)
        with pytest.raises(FolderLocked, match=f"pid {h.pid}"):
            build_cache(cfg, out, rank=1, world=2, **FP32)  # an independent rank too
        assert main(["--verify", str(out), "--repair"]) == 2
        assert f"pid {h.pid}" in capsys.readouterr().err
        assert main(["--merge", str(out)]) == 2
        assert f"pid {h.pid}" in capsys.readouterr().err
        assert (out / "manifest.json").read_bytes() == manifest  # nothing was written
        # readers take no lock: training from the cache and a plain --verify still work
        assert open_cache(out, cfg, need=("latents", "text")).num_pairs == 15
        assert len(verify_cache(out)[0]) == 1
        h.kill()
    assert main(["--verify", str(out), "--repair"]) == 1  # the lock is free again
    assert build_cache(cfg, out, **FP32)["built"] == 1


def test_independent_ranks_share_the_folder(sd_cache, tmp_path):
    cfg, ref_root = sd_cache
    out = tmp_path / "c"
    out.mkdir()
    # rank 0 of 2 is running (it holds the folder shared and its own rank's lock)
    with Holder(out, "shared", "exclusive:.lock-rank00000-of-00002") as h:
        build_cache(cfg, out, what=("latents", "text"), rank=1, world=2, **FP32)  # side by side
        with pytest.raises(FolderLocked, match=f"pid {h.pid}"):  # the same rank twice
            build_cache(cfg, out, what=("latents", "text"), rank=0, world=2, **FP32)
        with pytest.raises(FolderLocked, match=f"pid {h.pid}"):  # a lone writer
            build_cache(cfg, out, what=("latents", "text"), **FP32)
        with pytest.raises(FolderLocked, match=f"pid {h.pid}"):
            merge_parts(out)
        h.release()
    build_cache(cfg, out, what=("latents", "text"), rank=0, world=2, **FP32)
    merge_parts(out)
    assert open_cache(out, cfg, need=("latents", "text")).num_pairs == 15


@pytest.mark.slow
def test_torchrun_build_refused_on_every_rank(sd_cache, tmp_path):
    """A 2-process launch into a locked folder: rank 0 cannot take the lock, and both ranks
    stop at once with the holder's pid (no rank waits at a barrier)."""
    import socket

    cfg, ref_root = sd_cache
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    env = {k: v for k, v in os.environ.items() if k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK")}
    env.update(OMP_NUM_THREADS="1", PYTHONUNBUFFERED="1")
    out = tmp_path / "c"
    out.mkdir()
    cmd = [
        sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2",
        "--master_port", str(port), "-m", "snpo.cli", "cache",
        "--config", str(ref_root.parent / "train.yaml"), "--out", str(out),
        "--epochs", "1", "--shard_size", "8", "--num_workers", "0", "--quiet",
    ]  # fmt: skip
    with Holder(out, "exclusive") as h:
        r = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=300)
        h.release()
    assert r.returncode != 0
    assert r.stderr.count(f"is locked by pid {h.pid}") == 2, r.stderr[-3000:]
    assert not (out / "manifest.json").exists()
