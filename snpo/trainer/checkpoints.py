"""Checkpoint folders: which tag to resume, checksums that prove a tag complete and intact.

Layout (``output_dir/checkpoints``)::

    step_00000500/            one tag per save (DeepSpeed's files, written by every rank)
        ...                   mp_rank_*_model_states.pt, zero_pp_rank_*_optim_states.pt, ...
        snpo-checksums.json   {"tag", "files": {relative path: {"size", "sha256"}}} — written
                              last, by rank 0, after every rank has finished its files
    latest                    the newest *sealed* tag (written by snpo after the checksums)

A tag is **complete** when its checksum file exists; it is **intact** when every file it lists
has that size and SHA-256. ``latest`` is written only after the checksums, so a save that dies
half-way leaves ``latest`` on the previous complete tag; a lost or empty ``latest`` falls back to
the newest complete tag. A corrupt file is never loaded: the error names it.

Checkpoints are **trusted input**: DeepSpeed stores them as Python pickles, and loading one runs
whatever code it names. snpo only resumes from its own ``output_dir`` unless
``trust_checkpoint: true`` is given, and verifies the checksums before DeepSpeed opens a file.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import shutil
from pathlib import Path

CHECKSUM_FILE = "snpo-checksums.json"
LATEST_FILE = "latest"
TAG_PATTERN = re.compile(r"^step_\d{8}$")
_CHUNK = 1 << 22


class CheckpointError(RuntimeError):
    """A checkpoint folder cannot be used (corrupt, incomplete, untrusted); the message says what
    to do."""


def tag_name(step: int) -> str:
    return f"step_{step:08d}"


def file_sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as fh:
        while chunk := fh.read(_CHUNK):
            h.update(chunk)
    return h.hexdigest()


def tag_files(tag_dir: Path) -> list[str]:
    """Every regular file under ``tag_dir`` (relative, sorted), the checksum file excluded."""
    out = []
    for p in sorted(tag_dir.rglob("*")):
        if p.is_file() and not p.is_symlink() and p.name != CHECKSUM_FILE:
            out.append(p.relative_to(tag_dir).as_posix())
    return out


def my_share(names: list[str], rank: int, world: int) -> list[str]:
    """The files rank ``rank`` hashes: every world-th one (hashing is spread over the ranks)."""
    return names[rank::world]


def digests(tag_dir: Path, names: list[str]) -> dict[str, dict]:
    return {
        n: {"size": (tag_dir / n).stat().st_size, "sha256": file_sha256(tag_dir / n)} for n in names
    }


def _atomic_write(path: Path, text: str) -> None:
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    with open(tmp, "w") as fh:
        fh.write(text)
        fh.flush()
        os.fsync(fh.fileno())
    os.replace(tmp, path)


def seal(folder: Path, tag: str, files: dict[str, dict], *, latest: bool = True) -> None:
    """Write the tag's checksum file, then (``latest``) point ``latest`` at it (rank 0, after
    a barrier)."""
    _atomic_write(folder / tag / CHECKSUM_FILE, json.dumps({"tag": tag, "files": files}, indent=1))
    if latest:
        _atomic_write(folder / LATEST_FILE, tag + "\n")


def read_checksums(tag_dir: Path) -> dict[str, dict] | None:
    """The listed files of a sealed tag, or None when the tag has no (readable) checksum file."""
    f = tag_dir / CHECKSUM_FILE
    if not f.is_file():
        return None
    try:
        data = json.loads(f.read_text())
        files = data["files"]
    except (OSError, ValueError, KeyError, TypeError):
        return None
    if not isinstance(files, dict):
        return None
    return files


def complete_tags(folder: Path) -> list[str]:
    """Sealed ``step_*`` tags in ``folder``, oldest first."""
    if not folder.is_dir():
        return []
    tags = [p.name for p in folder.iterdir() if p.is_dir() and TAG_PATTERN.match(p.name)]
    return sorted(t for t in tags if read_checksums(folder / t) is not None)


def any_tags(folder: Path) -> list[str]:
    if not folder.is_dir():
        return []
    return sorted(p.name for p in folder.iterdir() if p.is_dir() and TAG_PATTERN.match(p.name))


def choose_tag(folder: Path) -> tuple[str | None, str | None]:
    """(tag to resume, a warning or None) in a checkpoints folder.

    ``latest`` when it names a sealed tag; otherwise the newest sealed tag, with a warning that
    says why ``latest`` was not used. (None, None) when the folder holds no tag at all; raises
    CheckpointError when it holds tags but none is sealed."""
    sealed = complete_tags(folder)
    latest_file = folder / LATEST_FILE
    named = latest_file.read_text().strip() if latest_file.is_file() else ""
    if named and named in sealed:
        return named, None
    if not sealed:
        tags = any_tags(folder)
        if not tags:
            return None, None
        raise CheckpointError(
            f"{folder} holds checkpoint(s) {', '.join(tags[-3:])} but none has its checksum file "
            f"{CHECKSUM_FILE} (the save was interrupted, or an older snpo wrote it): nothing "
            "verified to resume from; start over with resume: never --overwrite"
        )
    newest = sealed[-1]
    if not named:
        why = f"{latest_file} is missing or empty"
    elif (folder / named).is_dir():
        why = f"{latest_file} names {named}, whose save did not finish (no checksum file)"
    else:
        why = f"{latest_file} names {named}, which does not exist"
    return newest, f"{why}; resuming from the newest complete checkpoint {newest}"


def verify_files(tag_dir: Path, listed: dict[str, dict], names: list[str]) -> list[str]:
    """Problems (one line each) among ``names`` of a sealed tag: missing, wrong size, bad hash."""
    bad = []
    for n in names:
        want = listed[n]
        p = tag_dir / n
        if not p.is_file():
            bad.append(f"{p}: missing")
        elif p.stat().st_size != want.get("size"):
            bad.append(f"{p}: size {p.stat().st_size} != {want.get('size')} when saved")
        elif file_sha256(p) != want.get("sha256"):
            bad.append(f"{p}: SHA-256 differs from when it was saved (corrupt)")
    return bad


def extra_files(tag_dir: Path, listed: dict[str, dict]) -> list[str]:
    """Files in a sealed tag that its checksum file does not list (never loaded unverified)."""
    return [n for n in tag_files(tag_dir) if n not in listed]


def prune(folder: Path, keep: int, current: str) -> None:
    """Keep the newest ``keep`` sealed tags (0 = all); unsealed leftovers older than the newest
    sealed tag go too. ``current`` is never removed."""
    if keep <= 0:
        return
    sealed = complete_tags(folder)
    doomed = set(sealed[:-keep])
    newest = sealed[-1] if sealed else ""
    doomed |= {t for t in any_tags(folder) if t not in sealed and t < newest}
    for tag in sorted(doomed - {current}):
        shutil.rmtree(folder / tag, ignore_errors=True)
    for p in folder.iterdir():  # universal conversions of tags that are gone
        src = p.name.removesuffix("_universal")
        if p.is_dir() and p.name.endswith("_universal") and not (folder / src).is_dir():
            shutil.rmtree(p, ignore_errors=True)


def inside(path: Path, root: Path) -> bool:
    """``path`` resolves to ``root`` or somewhere below it."""
    try:
        path.resolve().relative_to(root.resolve())
        return True
    except ValueError:
        return False
