"""(c) an interrupted build resumes to the same bytes; (d) corruption is detected by name;
(e) a 2-rank build equals a 1-rank build; plus the atomic-write and manifest helpers."""

from __future__ import annotations

import json
import shutil
import struct

import pytest
import torch

from snpo.cache import (
    BuildInterrupted,
    CacheCorruptError,
    CacheError,
    build_cache,
    diff_fields,
    journal_paths,
    load_manifest,
    merge_parts,
    open_cache,
    verify_cache,
)

from .conftest import BUILD, assert_same_cache
from .conftest import cache_main as main

FP32 = dict(BUILD, latent_dtype="fp32")


def test_interrupted_build_resumes_byte_identical(sd_cache, tmp_path):
    cfg, ref_root = sd_cache
    out = tmp_path / "c"
    with pytest.raises(BuildInterrupted):
        build_cache(cfg, out, debug_stop_after=7, **FP32)  # text (5) + 2 latent shards
    m = load_manifest(out)
    assert sum(len(s["shards"]) for s in m["sections"].values()) == 7
    # what a crash can leave: a shard renamed into place before its manifest entry was written
    # (here: garbage, never listed) and a half-written temporary file
    (out / "latents" / "s00002.safetensors").write_bytes(b"torn")
    (out / "latents" / "s00003.safetensors.tmp-12345").write_bytes(b"half")
    with pytest.raises(CacheError, match="incomplete"):
        open_cache(out, cfg)
    summary = build_cache(cfg, out, **FP32)
    assert summary["built"] == 17 - 7 and summary["skipped"] == 7
    assert_same_cache(out, ref_root)
    assert build_cache(cfg, out, **FP32)["built"] == 0  # a third run has nothing to do


def test_resume_with_other_build_options_is_refused(sd_cache, tmp_path):
    cfg, ref_root = sd_cache
    out = tmp_path / "c"
    shutil.copytree(ref_root, out)
    with pytest.raises(CacheError, match="batch_size is 4 in the cache but 8 in this build"):
        build_cache(cfg, out, **dict(FP32, batch_size=8))
    with pytest.raises(CacheError, match="seed is 0 in the cache but 3 in this build"):
        build_cache(cfg.__class__(**{**cfg.to_dict(), "seed": 3}), out, what=("ref",), **FP32)
    # more epochs: only the new epoch's reference errors are computed
    s = build_cache(cfg, out, **dict(FP32, epochs=3))
    assert s["built"] == 4 and open_cache(out, cfg, epochs=3).epochs == [0, 1, 2]


def _flip_row(path, name, row):
    """Flip one byte in every (image, variant) slot of row ``row`` of tensor ``name``."""
    data = bytearray(path.read_bytes())
    n = struct.unpack("<Q", data[:8])[0]
    info = json.loads(data[8 : 8 + n])[name]
    start, end = (8 + n + o for o in info["data_offsets"])
    per_row = (end - start) // info["shape"][0]
    slots = info["shape"][1] * info["shape"][2]
    for k in range(slots):
        data[start + row * per_row + k * (per_row // slots) + 3] ^= 0x01
    path.write_bytes(bytes(data))


def test_corrupt_shard_is_named(sd_cache, tmp_path, capsys):
    cfg, ref_root = sd_cache
    out = tmp_path / "c"
    shutil.copytree(ref_root, out)
    _flip_row(out / "latents" / "s00001.safetensors", "mean", row=1)  # pair 5
    with pytest.raises(CacheCorruptError, match=r"latents/s00001.safetensors is corrupt: its SHA"):
        open_cache(out, cfg, verify="full")
    cache = open_cache(out, cfg)  # lazy: each row read is checked against its CRC32
    cache.latents(0, [0, 1, 4, 6])  # intact rows, also of the damaged shard, read fine
    with pytest.raises(CacheCorruptError, match=r"latents/s00001.safetensors is corrupt: pair 5"):
        cache.latents(0, [5])
    assert main(["--verify", str(out)]) == 1
    assert "latents/s00001.safetensors" in capsys.readouterr().err
    # repair drops the entry; the next build rebuilds just that shard, identically
    assert main(["--verify", str(out), "--repair"]) == 1
    assert build_cache(cfg, out, **FP32)["built"] == 1
    assert main(["--verify", str(out)]) == 0
    assert_same_cache(out, ref_root)


def test_damaged_small_tensor_and_header(sd_cache, tmp_path):
    cfg, ref_root = sd_cache
    out = tmp_path / "c"
    shutil.copytree(ref_root, out)
    p = out / "ref" / "e0000" / "s00000.safetensors"
    data = bytearray(p.read_bytes())
    n = struct.unpack("<Q", data[:8])[0]
    start = 8 + n + json.loads(data[8 : 8 + n])["err"]["data_offsets"][0]
    data[start + 5] ^= 0x10
    p.write_bytes(bytes(data))
    cache = open_cache(out, cfg)
    with pytest.raises(
        CacheCorruptError, match=r"ref/e0000/s00000.safetensors is corrupt: tensor 'err'"
    ):
        cache.ref_err(0, [1])
    q = out / "text" / "t00000.safetensors"
    data = bytearray(q.read_bytes())
    data[9] = ord("!")  # the JSON header
    q.write_bytes(bytes(data))
    with pytest.raises(CacheCorruptError, match="text/t00000.safetensors is corrupt: its header"):
        open_cache(out, cfg).text([0])


def test_truncated_shard_is_named_on_open(sd_cache, tmp_path):
    cfg, ref_root = sd_cache
    out = tmp_path / "c"
    shutil.copytree(ref_root, out)
    p = out / "ref" / "e0001" / "s00002.safetensors"
    p.write_bytes(p.read_bytes()[:-8])
    with pytest.raises(CacheCorruptError, match=r"ref/e0001/s00002.safetensors is corrupt: \d+ b"):
        open_cache(out, cfg)
    open_cache(out, cfg, need=("latents", "text"))  # other sections stay usable
    problems, _ = verify_cache(out)
    assert len(problems) == 1 and "ref/e0001/s00002" in problems[0]


def test_two_ranks_equal_one_rank(sd_cache, tmp_path):
    cfg, ref_root = sd_cache
    out = tmp_path / "c"
    for rank in (0, 1):  # e.g. two independent jobs (no process group): phases run separately
        build_cache(cfg, out, what=("latents", "text"), rank=rank, world=2, **FP32)
    assert len(journal_paths(out)) == 2
    with pytest.raises(CacheError, match="rank journals found: run snpo cache --merge"):
        open_cache(out, cfg)
    merge_parts(out)
    build_cache(cfg, out, what=("ref",), rank=1, world=2, **FP32)
    with pytest.raises(CacheError, match="unmerged rank journals found: run snpo cache --merge"):
        open_cache(out, cfg, epochs=2)
    build_cache(cfg, out, what=("ref",), rank=0, world=2, **FP32)
    assert main(["--merge", str(out)]) == 0
    assert not journal_paths(out) and not (out / "parts").exists()
    assert_same_cache(out, ref_root)


def test_ref_waits_for_all_inputs_of_other_ranks(sd_cache, tmp_path):
    cfg, _ = sd_cache
    with pytest.raises(CacheError, match="need the complete latents and text"):
        build_cache(cfg, tmp_path / "c", rank=0, world=2, **FP32)


def test_manifest_helpers():
    d = diff_fields(
        {"seed": 1, "s": {"a": [1, 2]}, "x": 1}, {"seed": 2, "s": {"a": [1, 3]}, "y": 2}
    )
    assert d == [
        "s.a[1] is 2 in the cache but 3 in the config",
        "seed is 1 in the cache but 2 in the config",
        "x is 1 in the cache but missing in the config",
        "y is missing in the cache but 2 in the config",
    ]


def test_shard_bytes_are_deterministic(tmp_path):
    from snpo.cache import shard_bytes, write_shard

    t = {"b": torch.arange(6, dtype=torch.float16).reshape(2, 3), "a": torch.ones(2)}
    assert shard_bytes(t, {"z": 1, "a": [2]}) == shard_bytes(
        dict(reversed(t.items())), {"a": [2], "z": 1}
    )
    e = write_shard(tmp_path, "x/y.safetensors", t, section="sha256:0")
    assert e["bytes"] == (tmp_path / "x" / "y.safetensors").stat().st_size
    assert not list(tmp_path.rglob("*.tmp-*"))
    assert json.loads(json.dumps(e)) == e


@pytest.mark.slow
def test_torchrun_two_ranks_equal_one_rank(sd_cache, tmp_path):
    """A real 2-process launch (torchrun, gloo on the CPU): phases separated by barriers, rank 0
    merges the journals; the result is byte-identical to the 1-process build."""
    import os
    import socket
    import subprocess
    import sys
    from pathlib import Path

    cfg, ref_root = sd_cache
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    env = {k: v for k, v in os.environ.items() if k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK")}
    env.update(OMP_NUM_THREADS="1", PYTHONUNBUFFERED="1")
    out = tmp_path / "c"
    cmd = [
        sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2",
        "--master_port", str(port), "-m", "snpo.cli", "cache",
        "--config", str(ref_root.parent / "train.yaml"), "--out", str(out),
        "--epochs", "2", "--shard_size", "4", "--batch_size", "4", "--num_workers", "0",
        "--latent_dtype", "fp32", "--quiet",
    ]  # fmt: skip
    repo = Path(__file__).resolve().parents[2]
    r = subprocess.run(cmd, cwd=repo, env=env, capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr[-3000:]
    assert_same_cache(out, ref_root)


def test_overwrite_and_stale_reference_errors(sd_cache, tmp_path):
    """Re-encoding the latents (here: fp16 instead of fp32) makes the reference errors computed
    from the old ones stale: refused on open and on a plain rebuild, replaced by --overwrite."""
    cfg, ref_root = sd_cache
    out = tmp_path / "c"
    shutil.copytree(ref_root, out)
    fp16 = dict(FP32, latent_dtype="fp16")
    with pytest.raises(CacheError, match="dtype is 'float32' in the cache but 'float16'"):
        build_cache(cfg, out, what=("latents",), **fp16)
    build_cache(cfg, out, what=("latents",), overwrite=True, **fp16)
    with pytest.raises(CacheError, match="no\\s+longer those"):
        open_cache(out, cfg)
    with pytest.raises(CacheError, match="inputs_digest is sha256"):
        build_cache(cfg, out, what=("ref",), **fp16)
    assert build_cache(cfg, out, what=("ref",), overwrite=True, **fp16)["built"] == 8
    cache = open_cache(out, cfg, epochs=2)
    assert cache.layout("latents")["dtype"] == "float16"
    assert len(load_manifest(out)["sections"]["ref"]["shards"]) == 8
    assert verify_cache(out) == ([], [])
