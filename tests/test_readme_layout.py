"""The README's layout table matches the tree: every path it names exists, and every package
and top-level module of snpo/ is named (directly or through its folder)."""

from __future__ import annotations

import re
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def layout_rows() -> list[list[str]]:
    """The backticked paths of each row of the README's "Layout" table, as written."""
    readme = (REPO / "README.md").read_text()
    section = readme[readme.index("## Layout") :]
    section = section[: section.find("\n## ", 3) if "\n## " in section[3:] else None]
    rows = [ln for ln in section.splitlines() if ln.startswith("| `")]
    return [re.findall(r"`([^`]+)`", ln.split("|")[1]) for ln in rows]


def resolved_paths() -> set[Path]:
    """Each name resolved: a path with a slash (a folder ends with one) stands for itself; a
    bare file name continues the folder of the previous path in its row (``snpo/config.py``,
    ``draws.py``)."""
    out: set[Path] = set()
    for names in layout_rows():
        folder = Path()
        for name in names:
            if "/" in name:
                path = Path(name.rstrip("/"))
                folder = path if name.endswith("/") else path.parent
            else:
                path = folder / name.rstrip("/")
            out.add(path)
    return out


def test_every_path_in_the_layout_table_exists():
    missing = [str(p) for p in sorted(resolved_paths()) if not (REPO / p).exists()]
    assert not missing, f"README layout names paths that do not exist: {missing}"


def test_every_package_and_module_of_snpo_is_in_the_layout_table():
    named = resolved_paths()
    snpo = REPO / "snpo"
    items = [p for p in snpo.iterdir() if p.name not in ("__init__.py", "__pycache__")]
    items = [p for p in items if p.suffix == ".py" or (p / "__init__.py").exists() or p.is_dir()]
    unnamed = [p.name for p in sorted(items) if p.relative_to(REPO) not in named]
    assert not unnamed, f"README layout does not name: {unnamed}"
