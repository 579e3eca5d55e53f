"""Shard names in manifest.json and rank journals are checked when read: a crafted name
(``../x``, an absolute path, a symlink leading out, a name outside its section) refuses the
cache naming the entry, and ``snpo cache --verify --repair`` deletes nothing."""

from __future__ import annotations

import json
import shutil

import pytest

from snpo.cache import (
    CacheCorruptError,
    load_manifest,
    merged_view,
    open_cache,
    shard_name_problem,
)

from .conftest import cache_main as main

PRECIOUS = b"precious bytes, not a shard"


def _craft(tmp_path, ref_root, kind):
    """A copy of the session cache whose manifest (or a journal) lists one crafted name with a
    wrong SHA-256 (so that --repair would delete it); the victim file the name points at."""
    out = tmp_path / "c"
    shutil.copytree(ref_root, out)
    outside = tmp_path / "outside"
    outside.mkdir()
    section = "latents"
    if kind == "dotdot":
        victim, rel = tmp_path / "victim.safetensors", "../victim.safetensors"
    elif kind == "section_dotdot":
        victim, rel = tmp_path / "victim.safetensors", "latents/../../victim.safetensors"
    elif kind == "absolute":
        victim = tmp_path / "victim.safetensors"
        rel = str(victim)
    elif kind == "symlink":  # a folder inside the section that leads out of the cache
        victim = outside / "s00000.safetensors"
        (out / "latents" / "elsewhere").symlink_to(outside, target_is_directory=True)
        rel = "latents/elsewhere/s00000.safetensors"
    elif kind == "other_folder":  # inside the cache folder but under no section
        victim = out / "notes" / "keep.safetensors"
        rel = "notes/keep.safetensors"
    elif kind == "unknown_section":
        victim = out / "evil" / "keep.safetensors"
        section, rel = "evil", "evil/keep.safetensors"
    elif kind in ("journal", "not_a_shard"):
        victim = out / "manifest.json" if kind == "not_a_shard" else tmp_path / "victim.bin"
        rel = "manifest.json" if kind == "not_a_shard" else "latents/../../victim.bin"
    else:
        raise AssertionError(kind)
    if kind != "not_a_shard":
        victim.parent.mkdir(parents=True, exist_ok=True)
        victim.write_bytes(PRECIOUS)
    entry = {"sha256": "0" * 64, "bytes": len(PRECIOUS)}
    if kind == "journal":  # an unmerged rank journal
        where = out / "parts" / "rank00001-of-00002.json"
        where.parent.mkdir()
        sec = load_manifest(out)["sections"]["latents"]
        journal = {"sections": {"latents": {**sec, "shards": {rel: entry}}}}
        where.write_text(json.dumps(journal))
    else:
        where = out / "manifest.json"
        m = json.loads(where.read_text())
        sec = m["sections"].setdefault(section, {"fingerprint": {}, "layout": {}, "shards": {}})
        sec["shards"][rel] = entry
        where.write_text(json.dumps(m))
    return out, victim, rel, where


KINDS = [
    "dotdot",
    "section_dotdot",
    "absolute",
    "symlink",
    "other_folder",
    "unknown_section",
    "journal",
    "not_a_shard",
]


@pytest.mark.parametrize("kind", KINDS)
def test_verify_repair_deletes_nothing_outside(sd_cache, tmp_path, capsys, kind):
    cfg, ref_root = sd_cache
    out, victim, rel, where = _craft(tmp_path, ref_root, kind)
    before = {p: p.read_bytes() for p in sorted(out.rglob("*")) if p.is_file()}
    assert main(["--verify", str(out), "--repair"]) == 2
    err = capsys.readouterr().err
    assert str(where) in err
    if kind == "unknown_section":
        assert "section 'evil' is not a cache section" in err
    else:
        assert f"lists the shard name {rel!r}" in err
    assert victim.is_file() and victim.read_bytes() != b""
    if kind != "not_a_shard":
        assert victim.read_bytes() == PRECIOUS
    # nothing in the cache was touched either (manifest and journals included)
    assert {p: p.read_bytes() for p in sorted(out.rglob("*")) if p.is_file()} == before
    # every reader refuses the same way
    with pytest.raises(CacheCorruptError, match="refusing the cache"):
        merged_view(out)
    if kind == "journal":  # open_cache reads the manifest only; --merge folds the journals
        assert main(["--merge", str(out)]) == 2
        assert f"lists the shard name {rel!r}" in capsys.readouterr().err
    else:
        with pytest.raises(CacheCorruptError, match="refusing the cache"):
            open_cache(out, cfg)
    assert {p: p.read_bytes() for p in sorted(out.rglob("*")) if p.is_file()} == before


def test_good_and_bad_names(tmp_path):
    (tmp_path / "ref").mkdir()
    ok = [
        ("text", "text/index.safetensors"),
        ("latents", "latents/e0003/s00001.safetensors"),
        ("ref", "ref/e0000/s00000.safetensors"),
    ]
    for section, rel in ok:
        assert shard_name_problem(tmp_path, section, rel) is None
    bad = {
        ("latents", "latents//s.safetensors"): "empty",
        ("latents", "latents/./s.safetensors"): "'.'",
        ("latents", "text/s.safetensors"): "not under the section's folder latents/",
        ("latents", "latents/s.txt"): "not a .safetensors file",
        ("latents", "latents/.safetensors"): "not a .safetensors file",
        ("latents", "latents\\..\\..\\x.safetensors"): "backslash",
        ("latents", "latents/s.safetensors\0"): "NUL",
        ("latents", 7): "not a non-empty string",
        ("latents", ""): "not a non-empty string",
    }
    for (section, rel), why in bad.items():
        assert why in (shard_name_problem(tmp_path, section, rel) or ""), rel
    # a symlinked shard file that leads out is refused; one that stays inside is fine
    (tmp_path / "ref" / "out.safetensors").symlink_to(tmp_path.parent / "x.safetensors")
    (tmp_path / "ref" / "in.safetensors").symlink_to(tmp_path / "ref" / "real.safetensors")
    assert "outside the cache folder" in shard_name_problem(tmp_path, "ref", "ref/out.safetensors")
    assert shard_name_problem(tmp_path, "ref", "ref/in.safetensors") is None


def test_bad_entry_values_are_refused(sd_cache, tmp_path):
    cfg, ref_root = sd_cache
    out = tmp_path / "c"
    shutil.copytree(ref_root, out)
    m = json.loads((out / "manifest.json").read_text())
    rel = sorted(m["sections"]["text"]["shards"])[0]
    m["sections"]["text"]["shards"][rel] = {"sha256": "abc", "bytes": "12"}
    (out / "manifest.json").write_text(json.dumps(m))
    with pytest.raises(CacheCorruptError, match=f"the entry of shard '{rel}' is not"):
        open_cache(out, cfg, need=("text",))
    m["sections"]["text"] = []
    (out / "manifest.json").write_text(json.dumps(m))
    with pytest.raises(CacheCorruptError, match="section 'text' is not an object"):
        load_manifest(out)
