"""Storage of ``snpo cache``: sharded safetensors files, the JSON manifest, atomic writes,
checksums, fingerprint comparison and a lazily verifying shard reader. Nothing here knows about
models or data (:mod:`snpo.cache.shard_builder` decides what goes into the shards).

Layout of a cache folder::

    manifest.json                  fingerprints, layouts and every complete shard
    parts/rank00001-of-00004.json  journals of ranks of a multi-process build (merged later)
    text/index.safetensors ...     shards (:mod:`snpo.cache.sections`)

Crash safety: every file is written to ``<name>.tmp-<pid>``, fsynced, renamed over ``<name>``
and the folder fsynced (:func:`atomic_write_bytes`); a shard counts only once its entry
(SHA-256 and byte size) is in the manifest or a rank's journal, written after the rename. Every
tensor's CRC32 and, for the large tensors, one CRC32 per row (pair image or distinct prompt)
are in the shard's header, so readers check exactly the bytes they read (``verify="lazy"``);
``--verify`` and ``verify="full"`` hash whole shards.

Shard bytes are deterministic (sorted header, metadata as sorted JSON with the shard's own
relative path and its section's digest, no timestamps): an interrupted-then-resumed or
multi-rank build ends byte-identical to one uninterrupted build, manifest timestamps aside.

Trust boundaries: every shard name a manifest or journal lists must be a relative path under
its section's folder, ending in ``.safetensors``, resolving inside the cache folder
(:func:`check_manifest`); every shard names its path and its section's digest
(:func:`section_digest`) in its metadata, checked when it is opened, so a shard swapped for
another valid one, or left from another build of its section, is refused by name. Caches of
format version 1 have no such header and are refused with "rebuild the cache". Writers hold the
folder's lock (:mod:`snpo.cache.locks`); readers take none.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import re
import time
import zlib
from collections import OrderedDict
from pathlib import Path, PurePosixPath

import torch

from snpo.atomic import atomic_write_bytes, atomic_write_json, fsync_dir  # noqa: F401 (re-exported)
from snpo.cache.locks import exclusive_lock
from snpo.config import CACHE_SECTIONS

FORMAT = "snpo-cache"
FORMAT_VERSION = 2  # 2: shards name themselves (shard_path, section_digest); data fingerprints
MANIFEST = "manifest.json"
PARTS_DIR = "parts"
TIMESTAMP_KEYS = ("created_at", "updated_at")
SHARD_SUFFIX = ".safetensors"
META_PATH = "shard_path"  # in a shard's metadata: its relative path in its cache
META_SECTION = "section_digest"  # ... and its section's digest (section_digest)


class CacheError(RuntimeError):
    """A cache that cannot be used as asked (missing, incomplete, or built differently)."""


class CacheMismatchError(CacheError):
    """The cache was built for a different configuration; the message names the fields."""


class CacheCorruptError(CacheError):
    """A shard's bytes do not match the manifest (truncated, bit-flipped, replaced)."""


# --------------------------------------------------------------------------------------------
# atomic files
def remove_stale_tmp(root: Path) -> int:
    """Delete ``*.tmp-<pid>`` leftovers of crashed writers (call only when no writer runs)."""
    n = 0
    for p in root.rglob("*.tmp-*"):
        with contextlib.suppress(OSError):
            p.unlink()
            n += 1
    return n


def sha256_bytes(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def sha256_file(path: str | Path, chunk: int = 1 << 24) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as fh:
        while True:
            b = fh.read(chunk)
            if not b:
                break
            h.update(b)
    return h.hexdigest()


# --------------------------------------------------------------------------------------------
# shards
def crc32(*tensors: torch.Tensor) -> int:
    """CRC32 of the raw bytes of the tensors, chained (any dtype, CPU)."""
    crc = 0
    for t in tensors:
        crc = zlib.crc32(t.detach().contiguous().reshape(-1).view(torch.uint8).numpy(), crc)
    return crc


def row_crcs(tensors: list[torch.Tensor], dims: int) -> torch.Tensor:
    """int64 CRC32 per index of the first ``dims`` dimensions, over every tensor's slice."""
    shape = tensors[0].shape[:dims]
    out = torch.zeros(shape, dtype=torch.int64)
    for pos in torch.cartesian_prod(*[torch.arange(n) for n in shape]).reshape(-1, dims).tolist():
        out[tuple(pos)] = crc32(*[t[tuple(pos)] for t in tensors])
    return out


def section_digest(section: dict) -> str:
    """Digest of a manifest section's fingerprint and layout: the build a shard belongs to."""
    ident = {"fingerprint": section["fingerprint"], "layout": section["layout"]}
    return "sha256:" + hashlib.sha256(json.dumps(ident, sort_keys=True).encode()).hexdigest()


def shard_bytes(
    tensors: dict[str, torch.Tensor],
    meta: dict | None = None,
    *,
    path: str = "",
    section: str = "",
) -> bytes:
    """Deterministic safetensors bytes: contiguous CPU tensors and one metadata entry ``snpo``
    (one entry: safetensors does not keep the order of several), the sorted JSON of ``meta``
    plus the CRC32 of every tensor ("crc32": {name: crc}), the shard's relative path
    ("shard_path") and its section's digest ("section_digest")."""
    from safetensors.torch import save

    clean = {k: v.detach().to("cpu").contiguous() for k, v in tensors.items()}
    meta = dict(meta or {})
    meta["crc32"] = {k: crc32(v) for k, v in clean.items()}
    meta[META_PATH], meta[META_SECTION] = path, section
    return save(clean, metadata={"snpo": json.dumps(meta, sort_keys=True)})


def write_shard(
    root: str | Path,
    relpath: str,
    tensors: dict[str, torch.Tensor],
    meta: dict | None = None,
    *,
    section: str,
) -> dict:
    """Write one shard atomically, naming itself (``relpath``) and its section (``section``:
    :func:`section_digest`) in its header; return its manifest entry {"sha256", "bytes"}."""
    data = shard_bytes(tensors, meta, path=relpath, section=section)
    entry = {"sha256": sha256_bytes(data), "bytes": len(data)}
    atomic_write_bytes(Path(root) / relpath, data)
    return entry


# --------------------------------------------------------------------------------------------
# manifest and journals
def new_manifest() -> dict:
    now = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())
    return {
        "format": FORMAT,
        "format_version": FORMAT_VERSION,
        "created_at": now,
        "updated_at": now,
        "sections": {},
    }


def read_json(path: Path) -> dict:
    try:
        return json.loads(path.read_text())
    except json.JSONDecodeError as err:
        raise CacheCorruptError(f"{path} is not valid JSON: {err}") from err
    except UnicodeDecodeError as err:
        raise CacheCorruptError(f"{path} is not valid JSON (not UTF-8 text): {err}") from err


_SHA256_RE = re.compile(r"[0-9a-f]{64}")


def shard_name_problem(root: Path, section: str, rel, _real: dict | None = None) -> str | None:
    """Why ``rel`` is not an acceptable shard name of ``section`` in the cache ``root`` (None:
    it is): it must be a relative POSIX path ``<section>/.../<name>.safetensors`` without
    empty, ``.`` or ``..`` parts that resolves (symlinks followed) inside ``root``.
    ``_real``: memo of resolved folders (many shards share a few)."""
    if not isinstance(rel, str) or not rel:
        return "not a non-empty string"
    if "\\" in rel or "\0" in rel or rel.startswith("/") or PurePosixPath(rel).is_absolute():
        return "an absolute path (or one with a backslash or NUL)"
    parts = rel.split("/")
    if any(p in ("", ".", "..") for p in parts):
        return "a path with an empty, '.' or '..' part"
    if len(parts) < 2 or parts[0] != section:
        return f"not under the section's folder {section}/"
    if not rel.endswith(SHARD_SUFFIX) or parts[-1] == SHARD_SUFFIX:
        return f"not a {SHARD_SUFFIX} file"
    memo = {} if _real is None else _real
    top = memo.get("") or memo.setdefault("", os.path.realpath(root))
    parent = "/".join(parts[:-1])
    if parent not in memo:
        memo[parent] = os.path.realpath(os.path.join(top, *parts[:-1]))
    leaf = os.path.join(memo[parent], parts[-1])
    if os.path.islink(leaf):
        leaf = os.path.realpath(leaf)
    if not (memo[parent] + os.sep).startswith(top + os.sep) or not leaf.startswith(top + os.sep):
        return f"resolves to {leaf}, outside the cache folder (a symlink leading out?)"
    return None


def check_manifest(root: str | Path, m, where: str | Path) -> dict:
    """Refuse (CacheCorruptError naming the entry) a manifest or journal ``m`` read from
    ``where`` whose structure is not a cache's or that lists a shard name outside its section's
    folder in ``root`` (:func:`shard_name_problem`); return ``m``. Every reader of manifests and
    journals goes through here, so nothing is read or deleted by an unchecked name."""
    root = Path(root)

    def bad(what: str) -> CacheCorruptError:
        return CacheCorruptError(
            f"{where}: {what}; refusing the cache at {root} (the file was edited or damaged: "
            "fix or remove that entry, or rebuild the cache in a new folder)"
        )

    if not isinstance(m, dict) or not isinstance(m.get("sections"), dict):
        raise bad("it has no 'sections' object")
    memo: dict = {}
    for name, sec in m["sections"].items():
        if name not in CACHE_SECTIONS:
            raise bad(f"section {name!r} is not a cache section (one of {list(CACHE_SECTIONS)})")
        if not isinstance(sec, dict):
            raise bad(f"section {name!r} is not an object")
        for key in ("fingerprint", "layout", "shards"):
            if not isinstance(sec.get(key), dict):
                raise bad(f"section {name!r} has no {key!r} object")
        for rel, entry in sec["shards"].items():
            why = shard_name_problem(root, name, rel, memo)
            if why is not None:
                raise bad(f"section {name!r} lists the shard name {rel!r}, which is {why}")
            ok = (
                isinstance(entry, dict)
                and isinstance(entry.get("sha256"), str)
                and _SHA256_RE.fullmatch(entry["sha256"]) is not None
                and type(entry.get("bytes")) is int
                and entry["bytes"] >= 0
            )
            if not ok:
                raise bad(
                    f"section {name!r}: the entry of shard {rel!r} is not "
                    '{"sha256": <64 hex digits>, "bytes": <size>}'
                )
    return m


def load_manifest(root: str | Path) -> dict | None:
    """The manifest of ``root`` (checked: :func:`check_manifest`), or None when there is none."""
    path = Path(root) / MANIFEST
    if not path.is_file():
        return None
    m = read_json(path)
    if not isinstance(m, dict) or m.get("format") != FORMAT:
        fmt = m.get("format") if isinstance(m, dict) else None
        raise CacheError(f"{path} is not an snpo cache manifest (format {fmt!r})")
    if m.get("format_version") != FORMAT_VERSION:
        raise CacheError(
            f"{path} has cache format version {m.get('format_version')}; this snpo reads "
            f"version {FORMAT_VERSION} (shards that name themselves, checked data "
            "fingerprints): rebuild the cache (snpo cache into a new --out, or delete the folder)"
        )
    return check_manifest(root, m, path)


def write_manifest(root: str | Path, manifest: dict) -> None:
    manifest["updated_at"] = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())
    atomic_write_json(Path(root) / MANIFEST, manifest)


def journal_path(root: str | Path, rank: int, world: int) -> Path:
    return Path(root) / PARTS_DIR / f"rank{rank:05d}-of-{world:05d}.json"


def journal_paths(root: str | Path) -> list[Path]:
    d = Path(root) / PARTS_DIR
    return sorted(d.glob("rank*-of-*.json")) if d.is_dir() else []


def merge_sections(base: dict, other: dict, where: str) -> None:
    """Add ``other``'s sections and shard entries to ``base`` (in place). A section present in
    both must have the same fingerprint and layout; a shard present in both the same entry."""
    for name, sec in other.get("sections", {}).items():
        mine = base["sections"].get(name)
        if mine is None:
            base["sections"][name] = {
                "fingerprint": sec["fingerprint"],
                "layout": sec["layout"],
                "shards": dict(sec.get("shards", {})),
            }
            continue
        for key in ("fingerprint", "layout"):
            if mine[key] != sec[key]:
                diff = diff_fields(mine[key], sec[key], "the manifest", where)
                raise CacheMismatchError(
                    f"cannot merge {where}: its {name} {key} differs from the manifest's: "
                    + "; ".join(diff)
                )
        for rel, entry in sec.get("shards", {}).items():
            old = mine["shards"].get(rel)
            if old is not None and old != entry:
                raise CacheCorruptError(
                    f"cannot merge {where}: shard {rel} is listed with sha256 {entry['sha256']} "
                    f"but the manifest has {old['sha256']}; verify the cache (snpo cache --verify)"
                )
            mine["shards"][rel] = entry


def merged_view(root: str | Path) -> dict:
    """Manifest ∪ every rank journal, in memory (what a resumed build treats as done)."""
    root = Path(root)
    view = load_manifest(root) or new_manifest()
    for p in journal_paths(root):
        merge_sections(view, check_manifest(root, read_json(p), p), str(p))
    return view


def merge_parts(root: str | Path) -> dict:
    """Fold the rank journals into manifest.json and delete them (after all ranks finished).
    Holds the cache's exclusive lock (:mod:`snpo.cache.locks`): refused while a rank still runs."""
    root = Path(root)
    with exclusive_lock(root, "snpo cache --merge"):
        parts = journal_paths(root)
        view = merged_view(root)
        write_manifest(root, view)
        for p in parts:
            with contextlib.suppress(FileNotFoundError):
                p.unlink()
        with contextlib.suppress(OSError):
            (root / PARTS_DIR).rmdir()
        return view


# --------------------------------------------------------------------------------------------
# fingerprints
def _flatten(d: dict, prefix: str = "") -> dict:
    """Nested dicts → dotted keys; a list of dicts → ``key[i].field`` (one key per field)."""
    out = {}
    for k, v in d.items():
        key = f"{prefix}{k}"
        if isinstance(v, dict):
            out.update(_flatten(v, key + "."))
        elif isinstance(v, list) and v and all(isinstance(x, dict) for x in v):
            for i, x in enumerate(v):
                out.update(_flatten(x, f"{key}[{i}]."))
        else:
            out[key] = v
    return out


def _show(v) -> str:
    if isinstance(v, str) and v.startswith("sha256:") and len(v) > 20:
        return v[:19] + "…"
    s = json.dumps(v) if not isinstance(v, str) else repr(v)
    return s if len(s) <= 80 else s[:77] + "…"


def diff_fields(cached: dict, expected: dict, a: str = "the cache", b: str = "the config"):
    """One sentence per differing (flattened) field: "seed is 1 in the cache but 2 in the
    config"; for equal-length lists, the first differing element is named."""
    fc, fe = _flatten(cached), _flatten(expected)
    out = []
    for key in sorted(set(fc) | set(fe)):
        if key not in fc:
            out.append(f"{key} is missing in {a} but {_show(fe[key])} in {b}")
        elif key not in fe:
            out.append(f"{key} is {_show(fc[key])} in {a} but missing in {b}")
        elif fc[key] != fe[key]:
            x, y = fc[key], fe[key]
            if isinstance(x, list) and isinstance(y, list) and len(x) == len(y):
                i = next(i for i in range(len(x)) if x[i] != y[i])
                out.append(f"{key}[{i}] is {_show(x[i])} in {a} but {_show(y[i])} in {b}")
            else:
                out.append(f"{key} is {_show(x)} in {a} but {_show(y)} in {b}")
    return out


# --------------------------------------------------------------------------------------------
# reading
class ShardStore:
    """Opens the shards listed in a manifest section for reading.

    verify: "lazy" (CRC32 of every tensor or row read, see :meth:`tensor` / :meth:`rows`;
    sizes by :meth:`check_sizes`), "full" (also every shard's SHA-256, :meth:`verify_all`), or
    "none". Keeps up to ``max_open`` safetensors handles (memory-mapped) open; picklable
    (handles are reopened). Every shard opened must name itself and ``digest`` (its section's
    :func:`section_digest`) in its header, whatever ``verify``; ``digest=None`` (hash checks
    only, as in :func:`verify_cache`) skips the section check.
    """

    def __init__(
        self,
        root: str | Path,
        entries: dict,
        verify: str = "lazy",
        max_open: int = 32,
        *,
        digest: str | None = None,
    ):
        if verify not in ("lazy", "full", "none"):
            raise ValueError(f"verify must be 'lazy', 'full' or 'none', got {verify!r}")
        self.root = Path(root)
        self.entries = entries
        self.digest = digest
        self.verify = verify
        self.max_open = max_open
        self._verified: set[str] = set()
        self._handles: OrderedDict[str, object] = OrderedDict()

    def __getstate__(self):
        d = dict(self.__dict__)
        d["_handles"] = OrderedDict()
        return d

    def path(self, rel: str) -> Path:
        return self.root / rel

    def check_sizes(self, rels) -> None:
        """Every shard in ``rels`` exists with its recorded size (cheap: stat only)."""
        for rel in rels:
            p, want = self.path(rel), self.entries[rel]["bytes"]
            if not p.is_file():
                raise CacheCorruptError(
                    f"cache shard {rel} is listed in {self.root / MANIFEST} but missing; rerun "
                    "snpo cache to rebuild it (snpo cache --verify --repair drops the entry)"
                )
            got = p.stat().st_size
            if got != want:
                raise CacheCorruptError(
                    f"cache shard {rel} is corrupt: {got} bytes on disk, {want} in the manifest "
                    "(truncated or replaced); run snpo cache --verify --repair, then rerun the "
                    "build to rebuild it"
                )

    def check_hash(self, rel: str) -> None:
        self.check_sizes([rel])
        want = self.entries[rel]["sha256"]
        got = sha256_file(self.path(rel))
        if got != want:
            raise CacheCorruptError(
                f"cache shard {rel} is corrupt: its SHA-256 is {got[:16]}… but the manifest "
                f"says {want[:16]}…; run snpo cache --verify --repair, then rerun the build to "
                "rebuild it"
            )
        self._verified.add(rel)

    def verify_all(self, rels=None) -> None:
        for rel in sorted(self.entries if rels is None else rels):
            if rel not in self._verified:
                self.check_hash(rel)

    def handle(self, rel: str):
        from safetensors import safe_open

        h = self._handles.get(rel)
        if h is not None:
            self._handles.move_to_end(rel)
            return h
        if rel not in self.entries:
            raise CacheError(f"cache shard {rel} is not in the manifest of {self.root}")
        try:
            h = safe_open(str(self.path(rel)), framework="pt")
            meta = json.loads((h.metadata() or {}).get("snpo", "{}"))
            if not isinstance(meta, dict):
                raise ValueError("its snpo metadata is not a JSON object")
        except Exception as err:  # noqa: BLE001 - safetensors/JSON errors on a damaged header
            raise CacheCorruptError(
                f"cache shard {rel} is corrupt: its header cannot be read ({err}); run snpo "
                "cache --verify --repair, then rerun the build to rebuild it"
            ) from err
        self._check_identity(rel, meta)
        self._handles[rel] = (h, meta)
        if len(self._handles) > self.max_open:
            self._handles.popitem(last=False)
        return self._handles[rel]

    def _check_identity(self, rel: str, header: dict) -> None:
        """The shard's metadata names ``rel`` and this section's digest (else
        CacheCorruptError)."""
        repair = "run snpo cache --verify --repair, then rerun the build to rebuild it"
        if META_PATH not in header or META_SECTION not in header:
            raise CacheCorruptError(
                f"cache shard {rel} does not name itself in its header (written by an snpo "
                f"older than cache format {FORMAT_VERSION}, or not by snpo): rebuild the cache "
                "(snpo cache into a new --out)"
            )
        if header[META_PATH] != rel:
            raise CacheCorruptError(
                f"cache shard {rel} is not the shard the manifest lists: its header says it is "
                f"{header[META_PATH]!r} (swapped, copied or renamed); {repair}"
            )
        if self.digest is not None and header[META_SECTION] != self.digest:
            raise CacheCorruptError(
                f"cache shard {rel} belongs to another build of its section: its header's "
                f"section digest {header[META_SECTION][:23]}… is not the manifest's "
                f"{self.digest[:23]}… (copied from another cache?); {repair}"
            )

    def _corrupt(self, rel: str, what: str) -> CacheCorruptError:
        return CacheCorruptError(
            f"cache shard {rel} is corrupt: {what} fails its CRC32 check; run snpo cache "
            "--verify --repair, then rerun the build to rebuild it"
        )

    def tensor(self, rel: str, name: str) -> torch.Tensor:
        """The whole tensor ``name`` of shard ``rel``, checked against its CRC32."""
        h, meta = self.handle(rel)
        t = h.get_tensor(name)
        if self.verify != "none" and crc32(t) != meta.get("crc32", {}).get(name):
            raise self._corrupt(rel, f"tensor {name!r}")
        return t

    def rows(self, rel: str, names: list[str], index: tuple, expect: int | None, what: str):
        """Slices ``index`` of the tensors ``names`` (read lazily), checked against ``expect``,
        the stored CRC32 of those slices (:func:`row_crcs`); ``what`` names them in errors."""
        h, _ = self.handle(rel)
        out = [h.get_slice(n)[index] for n in names]
        if self.verify != "none" and expect is not None and crc32(*out) != int(expect):
            raise self._corrupt(rel, what)
        return out

    def metadata(self, rel: str) -> dict:
        return self.handle(rel)[1]


def verify_cache(root: str | Path, repair: bool = False) -> tuple[list[str], list[str]]:
    """Hash every shard listed in the manifest (and journals) → (problems, notes).

    problems: corrupt or missing shards (one sentence each, naming the shard); notes: shard
    files no entry lists (left by an interrupted build; harmless, rebuilt by the next run).
    ``repair``: drop the bad entries from the manifest (and delete their files) so that the
    next build rebuilds them; it holds the cache's exclusive lock throughout (refused while a
    build runs). Only shards the (checked, :func:`check_manifest`) manifest lists are deleted."""
    root = Path(root)
    if load_manifest(root) is None and not journal_paths(root):
        return [f"no cache at {root} ({MANIFEST} missing)"], []
    if not repair:
        return _verify(root, repair=False)
    with exclusive_lock(root, "snpo cache --verify --repair"):
        return _verify(root, repair=True)


def _verify(root: Path, repair: bool) -> tuple[list[str], list[str]]:
    view = merged_view(root)
    problems, notes, bad = [], [], []
    for name, sec in sorted(view["sections"].items()):
        store = ShardStore(root, sec["shards"], verify="full")
        for rel in sorted(sec["shards"]):
            try:
                store.check_hash(rel)
            except CacheCorruptError as err:
                problems.append(str(err))
                bad.append((name, rel))
    listed = {rel for sec in view["sections"].values() for rel in sec["shards"]}
    for p in sorted(root.rglob("*.safetensors")):
        rel = p.relative_to(root).as_posix()
        if rel not in listed:
            notes.append(f"{rel} is not listed in the manifest (an interrupted build?)")
    if repair and bad:
        if journal_paths(root):
            view = merge_parts(root)
        for name, rel in bad:
            view["sections"][name]["shards"].pop(rel, None)
            with contextlib.suppress(FileNotFoundError):
                (root / rel).unlink()
        write_manifest(root, view)
    return problems, notes
