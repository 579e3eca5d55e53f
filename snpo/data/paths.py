"""Image paths named by a data file: resolved against the file's folder and kept inside it.

A path must be relative (or, for a local dataset folder, absolute but inside it) and resolve
inside the folder after following symlinks; absolute paths, ``..`` escapes, symlinks out of the
folder and any path in a row of a hub dataset (which has no folder) raise
:class:`PathOutsideError`, naming where the path came from, unless ``allow_outside`` is set.
"""

from __future__ import annotations

import os
from pathlib import Path

from snpo.data.errors import DataError

OUTSIDE_HINT = "; set allow_outside_paths: true to allow it"


class PathOutsideError(DataError):
    """An image path that is absolute or leaves its folder (``allow_outside_paths: false``)."""


class PathGuard:
    """Resolves the image paths of one data file against ``root`` (its folder).

    ``root=None`` (rows of a hub dataset) refuses every path; ``absolute_ok`` accepts absolute
    paths that lie inside ``root``. Resolved folders are cached, so a million rows cost one
    ``lstat`` each.
    """

    def __init__(
        self, root: Path | None, *, allow_outside: bool = False, absolute_ok: bool = False
    ) -> None:
        self.root = root
        self.real_root = os.path.realpath(root) if root is not None else None
        self.allow_outside = allow_outside
        self.absolute_ok = absolute_ok
        self._dirs: dict[str, str] = {}

    def __call__(self, raw: object, where: str) -> Path:
        """The path to open for ``raw``, named at ``where`` (e.g. "record 3 (f.jsonl:4) loser")."""
        if not isinstance(raw, (str, os.PathLike)) or not str(raw).strip():
            raise DataError(
                f"train_data: {where}: an image path must be a non-empty string, got {raw!r}"
            )
        p = Path(raw)
        if self.allow_outside:
            return p if p.is_absolute() or self.root is None else self.root / p
        if self.root is None:
            raise PathOutsideError(
                f"train_data: {where} names the local file {str(raw)!r} instead of holding the "
                f"image bytes{OUTSIDE_HINT}"
            )
        if p.is_absolute() and not self.absolute_ok:
            raise PathOutsideError(
                f"train_data: {where}: the image path {str(raw)!r} is absolute; paths must be "
                f"relative to {self.root}{OUTSIDE_HINT}"
            )
        real = self._realpath(self.root / p)
        if os.path.commonpath([self.real_root, real]) != self.real_root:
            raise PathOutsideError(
                f"train_data: {where}: the image path {str(raw)!r} resolves to {real}, outside "
                f"{self.real_root}{OUTSIDE_HINT}"
            )
        return Path(real)

    def _realpath(self, full: Path) -> str:
        if full.name in ("", ".", ".."):
            return os.path.realpath(full)
        parent = str(full.parent)
        d = self._dirs.get(parent)
        if d is None:
            d = self._dirs[parent] = os.path.realpath(parent)
        real = os.path.join(d, full.name)
        return os.path.realpath(real) if os.path.islink(real) else real
