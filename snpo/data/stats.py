"""``snpo data stats PATHS``: what preference files hold, per file and in total, in one pass.

For each Pick-a-Pic parquet file (read one row group at a time: label and image columns only)
or own-pairs JSONL/CSV file: rows, ties (``label_0`` 0.5), unlabelled rows (``has_label``
false), pairs (the rows training keeps, :func:`snpo.data.schema.preference_rows`), usable pairs
(pairs whose two images decode), decode failures (images of pairs that are bad images,
:mod:`snpo.data.decode`) and a histogram of the decoded images' sizes (width × height).
``--no-decode`` reads only the image headers (fast; a truncated JPEG then passes).
``--buckets auto|WxH,...`` (with ``--resolution`` and ``--bucket-step``) adds the histogram of
the usable pairs over those aspect-ratio buckets, as ``resolution_buckets`` would assign them
(:mod:`snpo.data.buckets`: the nearest log-aspect of both images).
"""

from __future__ import annotations

import json
import os
import sys
from collections import Counter
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np

from snpo.data.decode import BadImageError, decode_image
from snpo.data.errors import DataError
from snpo.data.paths import PathGuard, PathOutsideError
from snpo.data.schema import (
    HAS_LABEL_COLUMN,
    IMAGE_COLUMNS,
    LABEL_COLUMN,
    cell_image,
)
from snpo.data.sources import open_pickapic_file


@dataclass
class FileStats:
    """Counts of one file (or of all: ``path`` "total"); sizes: "WxH" → decoded images."""

    path: str
    rows: int = 0
    ties: int = 0
    unlabelled: int = 0
    pairs: int = 0
    usable: int = 0
    decode_failures: int = 0
    sizes: Counter = field(default_factory=Counter)
    buckets: Counter = field(default_factory=Counter)  # "WxH" bucket → usable pairs

    def add(self, other: FileStats) -> None:
        for k in ("rows", "ties", "unlabelled", "pairs", "usable", "decode_failures"):
            setattr(self, k, getattr(self, k) + getattr(other, k))
        self.sizes.update(other.sizes)
        self.buckets.update(other.buckets)

    def to_dict(self) -> dict:
        d = asdict(self)
        d["sizes"] = dict(self.sizes.most_common())
        d["buckets"] = dict(self.buckets.most_common())
        return d


def _image_size(data: object, decode: bool) -> tuple[int, int]:
    """(w, h) of an undecoded image; BadImageError when it is bad (header only: unreadable)."""
    if decode:
        return decode_image(data).size
    from snpo.data.decode import _open  # the decoder's rules (missing, type, pixel cap), no load

    try:
        return _open(data, None).size
    except BadImageError:
        raise
    except Exception as err:  # noqa: BLE001 - as decode_image: anything PIL raises is "bad"
        raise BadImageError(f"unidentifiable image ({type(err).__name__}: {err})") from err


def _count_pair(st: FileStats, images: list[object], decode: bool, buckets=None) -> None:
    good, sizes = True, []
    for data in images:
        try:
            w, h = _image_size(data, decode)
            st.sizes[f"{w}x{h}"] += 1
            sizes.append((w, h))
        except (BadImageError, PathOutsideError):
            st.decode_failures += 1
            good = False
    st.usable += good
    if good and buckets:
        from snpo.data.buckets import nearest_bucket, pair_log_aspect

        st.buckets[str(buckets[nearest_bucket(pair_log_aspect(sizes), buckets)])] += 1


def parquet_rows(path: str) -> int:
    """Rows of a parquet file, from its footer."""
    import pyarrow.parquet as pq

    return pq.ParquetFile(path).metadata.num_rows


def _parquet_stats(path: str, decode: bool, bar, buckets=None) -> FileStats:
    pf, has_col = open_pickapic_file(path, "snpo data stats", pre_buffer=False)
    guard = PathGuard(Path(path).parent)
    st = FileStats(path)
    first = 0  # file row of the row group's first row
    for g in range(pf.metadata.num_row_groups):
        cols = [LABEL_COLUMN, *([HAS_LABEL_COLUMN] if has_col else []), *IMAGE_COLUMNS]
        t = pf.read_row_group(g, columns=cols)
        label = np.asarray(t.column(LABEL_COLUMN).to_numpy(zero_copy_only=False), dtype=float)
        has = (
            np.asarray(t.column(HAS_LABEL_COLUMN).to_numpy(zero_copy_only=False), dtype=bool)
            if has_col
            else np.ones(len(label), dtype=bool)
        )
        decided = np.isin(label, (0.0, 1.0))
        st.rows += len(label)
        st.ties += int((~decided).sum())
        st.unlabelled += int((decided & ~has).sum())
        keep = np.nonzero(decided & has)[0]
        st.pairs += len(keep)
        cells = {c: t.column(c) for c in IMAGE_COLUMNS}
        for k in keep.tolist():
            images = []
            for c in IMAGE_COLUMNS:
                where = f"row {first + k} of {path}, column {c}"
                try:
                    images.append(cell_image(cells[c][k].as_py(), guard, where))
                except PathOutsideError:
                    images.append(None)
            _count_pair(st, images, decode, buckets)
        first += len(label)
        bar.update(len(label))
    return st


def _pairs_stats(path: str, decode: bool, bar, buckets=None) -> FileStats:
    from snpo.data.sources import OwnPairs

    src = OwnPairs(path)
    st = FileStats(path, rows=len(src), pairs=len(src))
    for _, w, lo in src.records:
        _count_pair(st, [w, lo], decode, buckets)
        bar.update(1)
    return st


def _kind(path: str) -> str:
    ext = Path(path).suffix.lower()
    if ext == ".parquet":
        return "parquet"
    if ext in (".jsonl", ".json", ".csv"):
        return "pairs"
    raise DataError(
        f"snpo data stats: cannot tell the format of {path!r} (.parquet, .jsonl, .json or .csv)"
    )


def expand_paths(paths: list[str]) -> list[str]:
    """Files of ``paths`` (globs expanded, folders → their *.parquet); DataError naming a path
    that does not exist, a glob that matches nothing or a folder without parquet files."""
    from snpo.config import expand_data_files

    out: list[str] = []
    for p in paths:
        if os.path.isdir(p):
            found = sorted(str(f) for f in Path(p).glob("*.parquet"))
            if not found:
                raise DataError(f"snpo data stats: no .parquet files in folder {p!r}")
            out.extend(found)
            continue
        got = expand_data_files([p])
        if not got:
            raise DataError(f"snpo data stats: {p!r} matches no file")
        for f in got:
            if not os.path.isfile(f):
                raise DataError(f"snpo data stats: no such file: {f!r}")
            _kind(f)
        out.extend(got)
    if not out:
        raise DataError("snpo data stats: no files given")
    return out


def data_stats(
    paths: list[str], *, decode: bool = True, progress: bool = True, buckets=None
) -> tuple[list[FileStats], FileStats]:
    """(per-file stats, total) of ``paths`` in one pass (a tqdm bar over all rows); buckets:
    a list of :class:`snpo.data.buckets.Bucket` to count the usable pairs in (None: none)."""
    from tqdm import tqdm

    files = expand_paths(paths)
    total_rows = 0
    for f in files:
        if _kind(f) == "parquet":
            try:
                total_rows += parquet_rows(f)
            except Exception as err:  # noqa: BLE001 - pyarrow raises several kinds
                raise DataError(f"snpo data stats: cannot read parquet file {f!r}: {err}") from err
    per: list[FileStats] = []
    total = FileStats("total")
    with tqdm(total=total_rows or None, unit="rows", disable=not progress, file=sys.stderr) as bar:
        for f in files:
            st = (
                _parquet_stats(f, decode, bar, buckets)
                if _kind(f) == "parquet"
                else _pairs_stats(f, decode, bar, buckets)
            )
            per.append(st)
            total.add(st)
    return per, total


def _size_line(sizes: Counter, top: int = 8) -> str:
    if not sizes:
        return "-"
    common = sizes.most_common(top)
    rest = sum(sizes.values()) - sum(n for _, n in common)
    parts = [f"{s}: {n}" for s, n in common]
    if rest:
        parts.append(f"other {len(sizes) - len(common)} sizes: {rest}")
    return ", ".join(parts)


def render(per: list[FileStats], total: FileStats) -> str:
    """A plain-text table: one line per file and the total, then the size histograms."""
    head = ("file", "rows", "ties", "unlabelled", "pairs", "usable", "decode failures")
    rows = [
        (s.path, s.rows, s.ties, s.unlabelled, s.pairs, s.usable, s.decode_failures)
        for s in [*per, total]
    ]
    widths = [max(len(str(r[i])) for r in [head, *rows]) for i in range(len(head))]
    fmt = lambda r: "  ".join(  # noqa: E731
        str(v).ljust(w) if i == 0 else str(v).rjust(w) for i, (v, w) in enumerate(zip(r, widths))
    )
    lines = [fmt(head), *(fmt(r) for r in rows), "", "image sizes (w×h: images):"]
    lines += [f"  {s.path}: {_size_line(s.sizes)}" for s in [*per, total]]
    if total.buckets:
        lines += ["", "resolution buckets (w×h: usable pairs):"]
        lines += [f"  {s.path}: {_size_line(s.buckets, top=32)}" for s in [*per, total]]
    return "\n".join(lines)


def _buckets_arg(value: str, resolution: int, step: int | None) -> list:
    """The buckets of ``--buckets`` (DataError naming the option when malformed)."""
    from snpo.data.buckets import AUTO, auto_buckets, parse_buckets

    try:
        parsed = parse_buckets(value)
        if parsed != AUTO:
            return parsed
        step = step or (64 if resolution >= 256 else max(1, resolution // 4))
        return auto_buckets(resolution, step)
    except ValueError as err:
        raise DataError(f"snpo data stats: --buckets: {err}") from None


def main(argv: list[str] | None = None) -> int:
    """``snpo data stats PATHS [--no-decode] [--json OUT] [--no-progress]``."""
    import argparse

    ap = argparse.ArgumentParser(prog="snpo data stats", description=__doc__.split("\n\n")[0])
    ap.add_argument("paths", nargs="+", help="parquet / JSONL / CSV files, globs or folders")
    ap.add_argument("--no-decode", action="store_true", help="read image headers only")
    ap.add_argument("--json", default=None, help="also write the stats as JSON to this file")
    ap.add_argument("--no-progress", action="store_true", help="no progress bar")
    ap.add_argument(
        "--buckets", default=None, help="histogram over resolution buckets: auto or WxH,WxH,..."
    )
    ap.add_argument("--resolution", type=int, default=512, help="--buckets auto: about R² pixels")
    ap.add_argument(
        "--bucket-step",
        type=int,
        default=None,
        help="--buckets auto: side step (default 64, or resolution/4 below resolution 256)",
    )
    a = ap.parse_args(argv)
    try:
        buckets = _buckets_arg(a.buckets, a.resolution, a.bucket_step) if a.buckets else None
        per, total = data_stats(
            a.paths, decode=not a.no_decode, progress=not a.no_progress, buckets=buckets
        )
    except DataError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    print(render(per, total))
    if a.json:
        doc = {"files": [s.to_dict() for s in per], "total": total.to_dict()}
        Path(a.json).write_text(json.dumps(doc, indent=1) + "\n")
    return 0
