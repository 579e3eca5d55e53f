"""Pair sources: pair index → (prompt, winner image, loser image), and a description of the pair.

Every source keeps only non-tie pairs, winner first (:mod:`snpo.data.schema`); a pair's index
is its position among the kept pairs in file order, stable across runs. Images come back
undecoded (bytes, a PIL image, None or a checked path) for :func:`snpo.data.decode.decode_image`.

- :class:`PickapicParquet`: Pick-a-Pic-style parquet files. Only the footers and the label
  columns are read up front; image bytes are read one row group at a time (the last
  ``row_group_cache`` of them cached per worker: 1, or K for the windowed order), so ~1M rows
  in 645 files never sit in memory at once.

Every source has ``row_groups()``: (n,) the id of the row group each pair is read with — what
the windowed order (:mod:`snpo.data.locality`) keeps together; a source read pair by pair
(own pairs, hub datasets) gives every pair its own id.
- :class:`HubPairs`: a Pick-a-Pic-schema dataset through ``datasets`` (hub id or local folder).
- :class:`OwnPairs`: JSONL or CSV with ``winner``, ``loser``, ``prompt`` (image paths).
- :class:`ConcatSource`: several sources one after another; :func:`open_source` builds it from
  a config.
"""

from __future__ import annotations

import bisect
import csv
import json
import os
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from snpo.data.errors import DataError
from snpo.data.locality import RowGroupCache
from snpo.data.paths import PathGuard
from snpo.data.schema import (
    HAS_LABEL_COLUMN,
    IMAGE_COLUMNS,
    LABEL_COLUMN,
    PROMPT_COLUMN,
    REQUIRED_COLUMNS,
    cell_image,
    preference_rows,
)

Pair = tuple[str, object, object]  # (prompt, winner image, loser image), images undecoded


@dataclass
class SourceStats:
    """Row counts of a source: read, dropped as ties, put winner first, kept."""

    rows: int = 0
    ties_dropped: int = 0
    swapped: int = 0  # loser-first rows put winner first
    kept: int = 0


def _column_where(pair: str, column: str) -> str:
    """How errors name one image cell: "pair 4 (row 5 of f.parquet), column jpg_1"."""
    return f"{pair}, column {column}"


def open_parquet(path: str, *, pre_buffer: bool = True):
    """A ``pyarrow.parquet.ParquetFile`` of ``path`` (reads its footer: the last 64 KiB). Every
    parquet read of the sources goes through here, so a test or benchmark can count the bytes
    read. ``pre_buffer`` coalesces the column chunks of a read into few large reads (gaps under
    8 KiB are read too): right for a row group's images; the label read at start-up turns it
    off so that it reads the label chunks alone, not the small columns around them."""
    import pyarrow.parquet as pq

    return pq.ParquetFile(path, pre_buffer=pre_buffer)


def open_pickapic_file(path: str, who: str, *, pre_buffer: bool = True):
    """(:func:`open_parquet` of ``path``, whether it has the ``has_label`` column), after
    checking the Pick-a-Pic columns; DataError prefixed with ``who`` (the option or tool that
    named the file) when it cannot be read or lacks one."""
    try:
        pf = open_parquet(path, pre_buffer=pre_buffer)
    except Exception as err:  # noqa: BLE001 - pyarrow raises several kinds
        raise DataError(f"{who}: cannot read parquet file {path!r}: {err}") from err
    names = set(pf.schema_arrow.names)
    missing = set(REQUIRED_COLUMNS) - names
    if missing:
        raise DataError(f"{who}: {path!r} lacks the Pick-a-Pic column(s) {sorted(missing)}")
    return pf, HAS_LABEL_COLUMN in names


class PickapicParquet:
    """Pick-a-Pic-style parquet files read lazily by row group; the last ``row_group_cache``
    row groups read are kept (per process or DataLoader worker)."""

    def __init__(
        self,
        files: list[str],
        max_pairs: int | None = None,
        *,
        allow_outside_paths: bool = False,
        row_group_cache: int = 1,
    ) -> None:
        if not files:
            raise DataError("train_data: no parquet files given")
        self.files = [str(f) for f in files]
        self._guards = [  # only path-valued cells (not Pick-a-Pic's bytes) need these
            PathGuard(Path(f).parent, allow_outside=allow_outside_paths) for f in self.files
        ]
        self.stats = SourceStats()
        file_ids, rows, swaps, groups = [], [], [], []
        self._rg_starts: list[list[int]] = []
        group_base = 0
        for fid, path in enumerate(self.files):
            pf, has_label = open_pickapic_file(path, "train_data", pre_buffer=False)
            t = pf.read(columns=[LABEL_COLUMN] + ([HAS_LABEL_COLUMN] if has_label else []))
            label_0 = t.column(LABEL_COLUMN).to_numpy(zero_copy_only=False)
            has = t.column(HAS_LABEL_COLUMN).to_numpy(zero_copy_only=False) if has_label else None
            r, swap = preference_rows(label_0, has)
            self.stats.rows += len(label_0)
            self.stats.ties_dropped += len(label_0) - len(r)
            file_ids.append(np.full(len(r), fid, dtype=np.int32))
            rows.append(r)
            swaps.append(swap)
            starts = _row_group_starts(pf.metadata)
            self._rg_starts.append(starts)
            local = np.searchsorted(np.asarray(starts, dtype=np.int64), r, side="right") - 1
            groups.append((group_base + local).astype(np.int64))
            group_base += len(starts)
        self.file_ids = np.concatenate(file_ids)
        self.rows = np.concatenate(rows)
        self.swap = np.concatenate(swaps)
        self._groups = np.concatenate(groups)
        self._group_base = np.cumsum([0] + [len(s) for s in self._rg_starts]).tolist()
        if max_pairs is not None:
            self.file_ids, self.rows = self.file_ids[:max_pairs], self.rows[:max_pairs]
            self.swap, self._groups = self.swap[:max_pairs], self._groups[:max_pairs]
        self.stats.kept = len(self.rows)
        self.stats.swapped = int(self.swap.sum())
        self._pf: dict[int, object] = {}
        self.cache = RowGroupCache(row_group_cache)

    def __len__(self) -> int:
        return len(self.rows)

    def __getstate__(self) -> dict:  # DataLoader workers reopen files themselves
        d = dict(self.__dict__)
        d["_pf"], d["cache"] = {}, RowGroupCache(self.cache.capacity)
        return d

    def row_groups(self) -> np.ndarray:
        """(n,) int64: the row group of each pair, numbered over all files in order."""
        return self._groups

    def _row_group(self, fid: int, rg: int):
        def read():
            if fid not in self._pf:
                self._pf[fid] = open_parquet(self.files[fid])
            return self._pf[fid].read_row_group(rg, columns=[PROMPT_COLUMN, *IMAGE_COLUMNS])

        return self.cache.get((fid, rg), read)

    def describe(self, i: int) -> str:
        return f"pair {i} (row {int(self.rows[i])} of {self.files[int(self.file_ids[i])]})"

    def get(self, i: int) -> Pair:
        fid, row = int(self.file_ids[i]), int(self.rows[i])
        rg = int(self._groups[i]) - self._group_base[fid]
        table = self._row_group(fid, rg)
        k = row - self._rg_starts[fid][rg]
        caption = table.column(PROMPT_COLUMN)[k].as_py() or ""
        a, b = (
            cell_image(
                table.column(c)[k].as_py(), self._guards[fid], _column_where(self.describe(i), c)
            )
            for c in IMAGE_COLUMNS
        )
        if self.swap[i]:
            a, b = b, a
        return caption, a, b


def _row_group_starts(metadata) -> list[int]:
    """First row of each row group of a parquet file."""
    starts, acc = [], 0
    for g in range(metadata.num_row_groups):
        starts.append(acc)
        acc += metadata.row_group(g).num_rows
    return starts


class HubPairs:
    """A Pick-a-Pic-schema dataset from the hub (or a local mirror) through ``datasets``.

    Rows of a hub dataset must hold image bytes: a row naming a path is refused when the row is
    read (:class:`snpo.data.paths.PathOutsideError` naming the row and column) unless
    ``allow_outside_paths``; a local mirror's paths must stay inside its folder."""

    def __init__(
        self,
        name: str,
        split: str,
        max_pairs: int | None = None,
        *,
        allow_outside_paths: bool = False,
    ) -> None:
        import datasets

        self.ds = datasets.load_dataset(name, split=split)
        for col in IMAGE_COLUMNS:  # undecoded: paths go through our check, not PIL
            feat = self.ds.features.get(col)
            if isinstance(feat, datasets.Image) and feat.decode:
                self.ds = self.ds.cast_column(col, datasets.Image(decode=False))
        root = Path(name) if os.path.isdir(name) else None
        self._guard = PathGuard(root, allow_outside=allow_outside_paths, absolute_ok=True)
        label_0 = np.asarray(self.ds[LABEL_COLUMN], dtype=np.float64)
        has = None
        if HAS_LABEL_COLUMN in self.ds.column_names:  # as PickapicParquet: unlabelled rows out
            has = np.asarray(self.ds[HAS_LABEL_COLUMN], dtype=bool)
        rows, swap = preference_rows(label_0, has)
        self.stats = SourceStats(rows=len(label_0), ties_dropped=len(label_0) - len(rows))
        self.rows, self.swap = rows[:max_pairs], swap[:max_pairs]
        self.stats.kept, self.stats.swapped = len(self.rows), int(self.swap.sum())
        self.name = name

    def __len__(self) -> int:
        return len(self.rows)

    def describe(self, i: int) -> str:
        return f"pair {i} (row {int(self.rows[i])} of {self.name})"

    def row_groups(self) -> np.ndarray:
        """(n,): each pair its own group (an arrow-backed dataset reads rows one by one)."""
        return np.arange(len(self), dtype=np.int64)

    def get(self, i: int) -> Pair:
        row = self.ds[int(self.rows[i])]
        a, b = (
            cell_image(row[c], self._guard, _column_where(self.describe(i), c))
            for c in IMAGE_COLUMNS
        )
        if self.swap[i]:
            a, b = b, a
        return row[PROMPT_COLUMN] or "", a, b


def _read_records(path: Path) -> list[tuple[int, object]]:
    """(line number, record) of a CSV (header row) or JSONL file; blank JSONL lines skipped."""
    if path.suffix.lower() == ".csv":
        with open(path, newline="") as fh:
            reader = csv.DictReader(fh)
            return [(reader.line_num, r) for r in reader]
    recs = []
    for n, line in enumerate(path.read_text().splitlines(), 1):
        if line.strip():
            try:
                recs.append((n, json.loads(line)))
            except json.JSONDecodeError as err:
                raise DataError(f"train_data: {path}:{n} is not valid JSON: {err}") from err
    return recs


class OwnPairs:
    """JSONL (one object a line) or CSV with columns winner, loser, prompt; image paths are
    relative to the file's folder and must stay inside it (:class:`PathGuard`) unless
    ``allow_outside_paths``; a path is refused when the file is opened, naming the record,
    its line and the column."""

    def __init__(
        self, path: str, max_pairs: int | None = None, *, allow_outside_paths: bool = False
    ) -> None:
        self.path = Path(path)
        guard = PathGuard(self.path.parent, allow_outside=allow_outside_paths)
        recs = _read_records(self.path)
        for n, (_, r) in enumerate(recs):
            if not isinstance(r, dict):
                raise DataError(f"train_data: record {n} of {path} is not an object")
            missing = {"winner", "loser", "prompt"} - set(r)
            if missing:
                raise DataError(f"train_data: record {n} of {path} lacks {sorted(missing)}")
        recs = recs[:max_pairs]
        self.records: list[Pair] = []
        for n, (line, r) in enumerate(recs):
            where = f"record {n} ({path}:{line})"
            self.records.append(
                (
                    r["prompt"] or "",
                    guard(r["winner"], f"{where} winner"),
                    guard(r["loser"], f"{where} loser"),
                )
            )
        self.stats = SourceStats(rows=len(recs), kept=len(recs))

    def __len__(self) -> int:
        return len(self.records)

    def describe(self, i: int) -> str:
        _, w, lo = self.records[i]
        return f"pair {i} ({w} vs {lo} in {self.path})"

    def row_groups(self) -> np.ndarray:
        """(n,): each pair its own group (its images are separate files)."""
        return np.arange(len(self), dtype=np.int64)

    def get(self, i: int) -> Pair:
        return self.records[i]


class ConcatSource:
    """Sources one after another: pair i of the whole is pair i − offset of its source."""

    def __init__(self, sources: list) -> None:
        self.sources = sources
        self.offsets = np.cumsum([0] + [len(s) for s in sources]).tolist()
        self.stats = SourceStats()
        for s in sources:
            for k in vars(self.stats):
                setattr(self.stats, k, getattr(self.stats, k) + getattr(s.stats, k))

    def __len__(self) -> int:
        return self.offsets[-1]

    def cap(self, max_pairs: int | None) -> ConcatSource:
        """Keep only the first ``max_pairs`` pairs (in place; None or more than there are:
        all). THE max-pairs cap of training (``max_train_pairs``), the cache and eval."""
        if max_pairs is not None and len(self) > max_pairs:
            self.offsets = [min(o, max_pairs) for o in self.offsets]
            self.stats.kept = max_pairs
        return self

    def row_groups(self) -> np.ndarray:
        """(n,) int64: each part's row groups, renumbered so that no two parts share an id (a
        part without ``row_groups`` gives each pair its own); cut at :meth:`cap`."""
        out, base = [], 0
        for s, lo, hi in zip(self.sources, self.offsets[:-1], self.offsets[1:], strict=True):
            n = hi - lo
            g = s.row_groups()[:n] if hasattr(s, "row_groups") else np.arange(n)
            g = np.asarray(g, dtype=np.int64)
            out.append(base + g)
            base += int(g.max()) + 1 if n else 0
        return np.concatenate(out) if out else np.zeros(0, dtype=np.int64)

    def _locate(self, i: int):
        j = bisect.bisect_right(self.offsets, i) - 1
        return self.sources[j], i - self.offsets[j]

    def describe(self, i: int) -> str:
        s, k = self._locate(i)
        return s.describe(k)

    def get(self, i: int) -> Pair:
        s, k = self._locate(i)
        return s.get(k)


def _format_of(item: str, data_format: str) -> str:
    """pickapic | pairs | hub for one ``train_data`` item (``data_format: auto`` guesses)."""
    from snpo.config import _looks_like_hub_id

    if data_format != "auto":
        return data_format
    ext = Path(item).suffix.lower()
    if ext == ".parquet":
        return "pickapic"
    if ext in (".jsonl", ".json", ".csv"):
        return "pairs"
    if _looks_like_hub_id(item):
        return "hub"
    raise DataError(f"train_data: cannot tell the format of {item!r}; set data_format")


def open_source(cfg) -> ConcatSource:
    """The pair source of ``cfg.train_data`` (see TrainConfig.data_format): all parquet files
    first (one :class:`PickapicParquet`), then the other items in order, cut at
    ``cfg.max_train_pairs``. With ``data_order: windowed`` each reader keeps the last
    ``data_window_row_groups`` row groups (one otherwise)."""
    from snpo.config import expand_data_files

    sources = []
    parquet: list[str] = []
    allow = bool(getattr(cfg, "allow_outside_paths", False))
    for item in expand_data_files(cfg.train_data):
        fmt = _format_of(item, cfg.data_format)
        if fmt == "pickapic":
            parquet.append(item)
        elif fmt == "pairs":
            sources.append(OwnPairs(item, allow_outside_paths=allow))
        else:
            sources.append(HubPairs(item, cfg.data_split, allow_outside_paths=allow))
    if parquet:
        keep = 1
        if getattr(cfg, "data_order", "global") == "windowed":
            keep = int(cfg.data_window_row_groups)
        sources.insert(0, PickapicParquet(parquet, allow_outside_paths=allow, row_group_cache=keep))
    src = ConcatSource(sources).cap(cfg.max_train_pairs)
    if len(src) == 0:
        st, names = src.stats, ", ".join(expand_data_files(cfg.train_data))
        raise DataError(
            f"train_data: no usable (non-tie) pairs in {names}: {st.rows} row(s) read, "
            f"{st.ties_dropped} of them ties or unlabelled (label_0 neither 0 nor 1, or has_label "
            "false) and dropped"
        )
    return src
