"""Every shard names itself (relative path) and its section's build (digest of the section's
fingerprint and layout) in its safetensors metadata; a lazily opened shard that is not the one
the manifest lists is refused by name, not read as valid."""

from __future__ import annotations

import json
import os
import shutil

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import save

from snpo.cache import (
    CacheCorruptError,
    CacheError,
    crc32,
    load_manifest,
    open_cache,
    row_crcs,
    section_digest,
    sha256_bytes,
    write_shard,
)


def _copy(ref_root, tmp_path):
    out = tmp_path / "c"
    shutil.copytree(ref_root, out)
    return out


def test_swapped_same_size_shards_are_refused(sd_cache, tmp_path):
    cfg, ref_root = sd_cache
    out = _copy(ref_root, tmp_path)
    a, b = (
        out / "ref" / "e0000" / "s00000.safetensors",
        out / "ref" / "e0001" / "s00000.safetensors",
    )
    assert a.stat().st_size == b.stat().st_size and a.read_bytes() != b.read_bytes()
    want = open_cache(out, cfg).ref_err(0, [0, 1])
    tmp = a.with_name("swap")
    os.replace(a, tmp)
    os.replace(b, a)
    os.replace(tmp, b)
    cache = open_cache(out, cfg)  # lazy: sizes match, so opening succeeds
    with pytest.raises(
        CacheCorruptError,
        match=r"cache shard ref/e0000/s00000.safetensors is not the shard the manifest lists: "
        r"its header says it is 'ref/e0001/s00000.safetensors'",
    ):
        cache.ref_err(0, [0, 1])
    with pytest.raises(CacheCorruptError, match="ref/e0001/s00000.safetensors is not the shard"):
        cache.ref_err(1, [0])
    os.replace(a, tmp)  # swapped back: read as before
    os.replace(b, a)
    os.replace(tmp, b)
    assert torch.equal(open_cache(out, cfg).ref_err(0, [0, 1]), want)


def test_shard_of_another_build_is_refused(sd_cache, tmp_path):
    """A reader whose manifest snapshot predates a rebuild (e.g. --overwrite) of the section
    meets a shard of the same path and size from the other build: refused, not read."""
    cfg, ref_root = sd_cache
    out = _copy(ref_root, tmp_path)
    cache = open_cache(out, cfg)
    rel = "text/t00000.safetensors"
    h = safe_open(str(out / rel), framework="pt")
    tensors = {k: h.get_tensor(k) for k in h.keys()}
    meta = {k: v for k, v in json.loads(h.metadata()["snpo"]).items() if k == "prompts"}
    torch.manual_seed(0)
    tensors["embeds"] = torch.randn_like(tensors["embeds"])  # another build's numbers
    meta["first"] = 0
    tensors["row_crc"] = row_crcs([tensors["embeds"]], 1)  # internally consistent
    write_shard(out, rel, tensors, meta, section="sha256:" + "1" * 64)
    with pytest.raises(
        CacheCorruptError,
        match=r"cache shard text/t00000.safetensors belongs to another build of its section",
    ):
        cache.text([0])


def test_caches_of_the_old_format_are_refused(sd_cache, tmp_path):
    cfg, ref_root = sd_cache
    out = _copy(ref_root, tmp_path)
    m = json.loads((out / "manifest.json").read_text())
    # a shard written before shards named themselves (only the CRC32 metadata), listed with
    # its true SHA-256 and size: refused by name when opened
    rel = "ref/e0000/s00000.safetensors"
    t = {"err": torch.zeros(4, 2), "valid": torch.ones(4, dtype=torch.uint8)}
    old = save(t, metadata={"snpo": json.dumps({"crc32": {k: crc32(v) for k, v in t.items()}})})
    (out / rel).write_bytes(old)
    m["sections"]["ref"]["shards"][rel] = {"sha256": sha256_bytes(old), "bytes": len(old)}
    (out / "manifest.json").write_text(json.dumps(m))
    with pytest.raises(CacheCorruptError, match=f"{rel} does not name itself in its header"):
        open_cache(out, cfg).ref_err(0, [0])
    # a manifest of format version 1: refused as a whole, saying to rebuild
    m["format_version"] = 1
    (out / "manifest.json").write_text(json.dumps(m))
    with pytest.raises(CacheError, match="has cache format version 1; .*rebuild the cache"):
        open_cache(out, cfg)


def test_shards_carry_their_identity(sd_cache):
    _, root = sd_cache
    for sec in load_manifest(root)["sections"].values():
        for rel in sec["shards"]:
            meta = json.loads(safe_open(str(root / rel), framework="pt").metadata()["snpo"])
            assert meta["shard_path"] == rel and meta["section_digest"] == section_digest(sec)
