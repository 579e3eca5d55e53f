"""Preference pairs: Pick-a-Pic v2 parquet (local files or a hub mirror), users' own pairs
(JSONL/CSV), transforms, the per-epoch order sharded over ranks, and bad-image handling.

Every pair has a stable *pair index* (its position among the kept, non-tie pairs, in file order);
all random choices of a pair (crop, flip, noise, timestep, branch) come from
:mod:`snpo.draws` keyed by (seed, epoch, pair index), so the data a step sees depends on
neither the number of workers nor the world size nor on resuming.

Pick-a-Pic v2 as published (19 columns; we read ``caption``, ``jpg_0``, ``jpg_1``, ``label_0``,
``label_1`` and ``has_label`` when present): ties (label 0.5, has_label False) are dropped, the
winner is put first (label_0 == 0 → the two images swap), as DiffusionDPO does. Only the label
columns are read up front; image bytes are read lazily one parquet row group at a time (one
cached per worker), so ~1M rows in 645 files never sit in memory at once.

Transforms (DiffusionDPO's ``train_transforms``, applied to each image separately): resize the
shorter side to ``resolution`` (bilinear), crop (random, or center), horizontal flip with
probability 1/2 — flips and random crops are drawn independently for winner and loser, as in
DiffusionDPO where each image goes through the random transform on its own. Grayscale, CMYK and
palette images are converted to RGB. A corrupt or missing image (a truncated JPEG opens fine
and fails only when decoded) makes the pair *bad*: counted and skipped with a warning
(``on_bad_image: skip``) or an error naming the pair, row and file (``fail``). So does an image
whose header claims more than :data:`snpo.images.MAX_IMAGE_PIXELS` (64 MP) pixels: it is refused
before decoding (decompression bombs).

Image paths (own pairs' ``winner``/``loser``, and path-only images in parquet or dataset rows)
resolve against the folder of the file that names them (a local dataset's folder) and must stay
inside it after resolving symlinks; absolute paths, ``..`` escapes and paths in rows of a hub
dataset are refused (:class:`PathOutsideError` naming the row and the path) unless
``allow_outside_paths`` is set.
"""

from __future__ import annotations

import bisect
import csv
import io
import json
import os
import warnings
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from .draws import augment_draws, crop_offset, epoch_permutation

PICKAPIC_COLUMNS = (
    "are_different",
    "best_image_uid",
    "caption",
    "created_at",
    "has_label",
    "image_0_uid",
    "image_0_url",
    "image_1_uid",
    "image_1_url",
    "jpg_0",
    "jpg_1",
    "label_0",
    "label_1",
    "model_0",
    "model_1",
    "ranking_id",
    "user_id",
    "num_example_per_prompt",
    "__index_level_0__",
)


class DataError(RuntimeError):
    """Unreadable training data (bad files, or a bad image with on_bad_image: fail)."""


class BadImageError(DataError):
    pass


class PathOutsideError(DataError):
    """An image path that is absolute or leaves its folder (``allow_outside_paths: false``)."""


class PathGuard:
    """Resolves image paths named by one data file against ``root`` (its folder).

    Unless ``allow_outside`` is set, a path must be relative (or, with ``absolute_ok``, absolute
    but inside ``root``) and resolve inside ``root`` after following symlinks; anything else
    raises :class:`PathOutsideError`. ``root=None`` (rows of a hub dataset) refuses every path.
    Resolved folders are cached, so a million rows cost one ``lstat`` each.
    """

    def __init__(
        self, root: Path | None, *, allow_outside: bool = False, absolute_ok: bool = False
    ) -> None:
        self.root = root
        self.real_root = os.path.realpath(root) if root is not None else None
        self.allow_outside = allow_outside
        self.absolute_ok = absolute_ok
        self._dirs: dict[str, str] = {}

    def __call__(self, raw, where: str) -> Path:
        """The path to open for ``raw`` (named at ``where``, e.g. "record 3 (f.jsonl:4)")."""
        if not isinstance(raw, (str, os.PathLike)) or not str(raw).strip():
            raise DataError(
                f"train_data: {where}: an image path must be a non-empty string, got {raw!r}"
            )
        p = Path(raw)
        if self.allow_outside:
            return p if p.is_absolute() or self.root is None else self.root / p
        hint = "; set allow_outside_paths: true to allow it"
        if self.root is None:
            raise PathOutsideError(
                f"train_data: {where} names the local file {str(raw)!r} instead of holding the "
                f"image bytes{hint}"
            )
        if p.is_absolute() and not self.absolute_ok:
            raise PathOutsideError(
                f"train_data: {where}: the image path {str(raw)!r} is absolute; paths must be "
                f"relative to {self.root}{hint}"
            )
        real = self._realpath(self.root / p)
        if os.path.commonpath([self.real_root, real]) != self.real_root:
            raise PathOutsideError(
                f"train_data: {where}: the image path {str(raw)!r} resolves to {real}, outside "
                f"{self.real_root}{hint}"
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


def row_image(value, guard: PathGuard, where: str):
    """A parquet/dataset cell → what :func:`decode_image` takes: bytes, a PIL image, None, or a
    path checked by ``guard`` (a plain string, or a ``{"bytes": None, "path": ...}`` struct)."""
    if isinstance(value, dict):
        if value.get("bytes"):
            return value["bytes"]
        value = value.get("path")
        if value is None:
            return None
    if isinstance(value, (str, os.PathLike)):
        return guard(value, where)
    return value


@dataclass
class SourceStats:
    rows: int = 0
    ties_dropped: int = 0
    swapped: int = 0  # loser-first rows put winner first
    kept: int = 0


# --------------------------------------------------------------------------------------------
# sources: index → (prompt, winner image, loser image, description)
class PickapicParquet:
    """Pick-a-Pic-style parquet files read lazily by row group."""

    def __init__(
        self, files: list[str], max_pairs: int | None = None, *, allow_outside_paths: bool = False
    ) -> None:
        import pyarrow.parquet as pq

        if not files:
            raise DataError("train_data: no parquet files given")
        self.files = [str(f) for f in files]
        self._guards = [  # only path-valued cells (not Pick-a-Pic's bytes) need these
            PathGuard(Path(f).parent, allow_outside=allow_outside_paths) for f in self.files
        ]
        self.stats = SourceStats()
        file_ids, rows, swaps = [], [], []
        self._rg_starts: list[list[int]] = []
        for fid, path in enumerate(self.files):
            try:
                pf = pq.ParquetFile(path)
            except Exception as err:  # noqa: BLE001 - pyarrow raises several kinds
                raise DataError(f"train_data: cannot read parquet file {path!r}: {err}") from err
            names = set(pf.schema_arrow.names)
            missing = {"caption", "jpg_0", "jpg_1", "label_0"} - names
            if missing:
                raise DataError(
                    f"train_data: {path!r} lacks the Pick-a-Pic column(s) {sorted(missing)}"
                )
            cols = ["label_0"] + (["has_label"] if "has_label" in names else [])
            t = pf.read(columns=cols)
            label_0 = t.column("label_0").to_numpy(zero_copy_only=False).astype(np.float64)
            keep = np.isin(label_0, (0.0, 1.0))
            if "has_label" in names:
                has = t.column("has_label").to_numpy(zero_copy_only=False).astype(bool)
                keep &= has
            n = len(label_0)
            self.stats.rows += n
            self.stats.ties_dropped += int((~keep).sum())
            r = np.nonzero(keep)[0]
            file_ids.append(np.full(len(r), fid, dtype=np.int32))
            rows.append(r.astype(np.int64))
            swaps.append(label_0[r] == 0.0)
            md = pf.metadata
            starts, acc = [], 0
            for g in range(md.num_row_groups):
                starts.append(acc)
                acc += md.row_group(g).num_rows
            self._rg_starts.append(starts)
        self.file_ids = np.concatenate(file_ids)
        self.rows = np.concatenate(rows)
        self.swap = np.concatenate(swaps)
        if max_pairs is not None:
            self.file_ids, self.rows = self.file_ids[:max_pairs], self.rows[:max_pairs]
            self.swap = self.swap[:max_pairs]
        self.stats.kept = len(self.rows)
        self.stats.swapped = int(self.swap.sum())
        self._pf: dict[int, object] = {}
        self._cache_key: tuple[int, int] | None = None
        self._cache = None

    def __len__(self) -> int:
        return len(self.rows)

    def __getstate__(self):  # DataLoader workers reopen files themselves
        d = dict(self.__dict__)
        d["_pf"], d["_cache_key"], d["_cache"] = {}, None, None
        return d

    def _row_group(self, fid: int, rg: int):
        if self._cache_key != (fid, rg):
            import pyarrow.parquet as pq

            if fid not in self._pf:
                self._pf[fid] = pq.ParquetFile(self.files[fid])
            self._cache = self._pf[fid].read_row_group(rg, columns=["caption", "jpg_0", "jpg_1"])
            self._cache_key = (fid, rg)
        return self._cache

    def describe(self, i: int) -> str:
        return f"pair {i} (row {int(self.rows[i])} of {self.files[int(self.file_ids[i])]})"

    def get(self, i: int) -> tuple[str, bytes | None, bytes | None]:
        fid, row = int(self.file_ids[i]), int(self.rows[i])
        starts = self._rg_starts[fid]
        rg = bisect.bisect_right(starts, row) - 1
        table = self._row_group(fid, rg)
        k = row - starts[rg]
        caption = table.column("caption")[k].as_py() or ""
        a, b = (
            row_image(table.column(c)[k].as_py(), self._guards[fid], f"{self.describe(i)} {c}")
            for c in ("jpg_0", "jpg_1")
        )
        if self.swap[i]:
            a, b = b, a
        return caption, a, b


class HubPairs:
    """A Pick-a-Pic-schema dataset from the hub (or a local mirror) through ``datasets``."""

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
        for col in ("jpg_0", "jpg_1"):  # undecoded: paths go through our check, not PIL
            feat = self.ds.features.get(col)
            if isinstance(feat, datasets.Image) and feat.decode:
                self.ds = self.ds.cast_column(col, datasets.Image(decode=False))
        # a local mirror's folder holds its images; rows of a hub dataset must carry bytes
        root = Path(name) if os.path.isdir(name) else None
        self._guard = PathGuard(root, allow_outside=allow_outside_paths, absolute_ok=True)
        label_0 = np.asarray(self.ds["label_0"], dtype=np.float64)
        keep = np.isin(label_0, (0.0, 1.0))
        self.stats = SourceStats(rows=len(label_0), ties_dropped=int((~keep).sum()))
        self.rows = np.nonzero(keep)[0][:max_pairs]
        self.swap = label_0[self.rows] == 0.0
        self.stats.kept, self.stats.swapped = len(self.rows), int(self.swap.sum())
        self.name = name

    def __len__(self) -> int:
        return len(self.rows)

    def describe(self, i: int) -> str:
        return f"pair {i} (row {int(self.rows[i])} of {self.name})"

    def get(self, i: int):
        row = self.ds[int(self.rows[i])]
        a, b = (
            row_image(row[c], self._guard, f"{self.describe(i)} {c}") for c in ("jpg_0", "jpg_1")
        )
        if self.swap[i]:
            a, b = b, a
        return row["caption"] or "", a, b


class OwnPairs:
    """JSONL (one object a line) or CSV with columns winner, loser, prompt; image paths are
    relative to the file's folder and must stay inside it (:class:`PathGuard`) unless
    ``allow_outside_paths``."""

    def __init__(
        self, path: str, max_pairs: int | None = None, *, allow_outside_paths: bool = False
    ) -> None:
        self.path = Path(path)
        guard = PathGuard(self.path.parent, allow_outside=allow_outside_paths)
        recs: list[tuple[int, dict]] = []  # (line number, record)
        if self.path.suffix.lower() == ".csv":
            with open(self.path, newline="") as fh:
                reader = csv.DictReader(fh)
                recs = [(reader.line_num, r) for r in reader]
        else:
            for n, line in enumerate(self.path.read_text().splitlines(), 1):
                if line.strip():
                    try:
                        recs.append((n, json.loads(line)))
                    except json.JSONDecodeError as err:
                        raise DataError(f"train_data: {path}:{n} is not valid JSON: {err}") from err
        for n, (_, r) in enumerate(recs):
            if not isinstance(r, dict):
                raise DataError(f"train_data: record {n} of {path} is not an object")
            missing = {"winner", "loser", "prompt"} - set(r)
            if missing:
                raise DataError(f"train_data: record {n} of {path} lacks {sorted(missing)}")
        recs = recs[:max_pairs]
        self.records = []
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
        p, w, lo = self.records[i]
        return f"pair {i} ({w} vs {lo} in {self.path})"

    def get(self, i: int):
        return self.records[i]


class ConcatSource:
    def __init__(self, sources: list) -> None:
        self.sources = sources
        self.offsets = np.cumsum([0] + [len(s) for s in sources]).tolist()
        self.stats = SourceStats()
        for s in sources:
            for k in vars(self.stats):
                setattr(self.stats, k, getattr(self.stats, k) + getattr(s.stats, k))

    def __len__(self) -> int:
        return self.offsets[-1]

    def _locate(self, i: int):
        j = bisect.bisect_right(self.offsets, i) - 1
        return self.sources[j], i - self.offsets[j]

    def describe(self, i: int) -> str:
        s, k = self._locate(i)
        return s.describe(k)

    def get(self, i: int):
        s, k = self._locate(i)
        return s.get(k)


def open_source(cfg) -> ConcatSource:
    """The pair source of ``cfg.train_data`` (see TrainConfig.data_format)."""
    from .config import _looks_like_hub_id, expand_data_files

    sources = []
    parquet: list[str] = []
    allow = bool(getattr(cfg, "allow_outside_paths", False))
    for item in expand_data_files(cfg.train_data):
        fmt = cfg.data_format
        if fmt == "auto":
            ext = Path(item).suffix.lower()
            if ext == ".parquet":
                fmt = "pickapic"
            elif ext in (".jsonl", ".json", ".csv"):
                fmt = "pairs"
            elif _looks_like_hub_id(item):
                fmt = "hub"
            else:
                raise DataError(f"train_data: cannot tell the format of {item!r}; set data_format")
        if fmt == "pickapic":
            parquet.append(item)
        elif fmt == "pairs":
            sources.append(OwnPairs(item, allow_outside_paths=allow))
        else:
            sources.append(HubPairs(item, cfg.data_split, allow_outside_paths=allow))
    if parquet:
        sources.insert(0, PickapicParquet(parquet, allow_outside_paths=allow))
    src = ConcatSource(sources)
    if cfg.max_train_pairs is not None and len(src) > cfg.max_train_pairs:
        src.offsets = [min(o, cfg.max_train_pairs) for o in src.offsets]
        src.stats.kept = cfg.max_train_pairs
    if len(src) == 0:
        raise DataError("train_data: no usable (non-tie) pairs found")
    return src


# --------------------------------------------------------------------------------------------
# decoding and transforms
def decode_image(data, *, max_pixels: int | None = None) -> object:
    """bytes | path | PIL image → an RGB PIL image, fully decoded (truncation raises here).

    Paths are opened as given: the pair sources check them first (:class:`PathGuard`). An
    image over ``max_pixels`` (default :data:`snpo.images.MAX_IMAGE_PIXELS`) raises
    :class:`BadImageError` from its header, before any pixel is decoded."""
    from PIL import Image

    from .images import ImageTooLargeError, check_pixels, open_image

    if data is None:
        raise BadImageError("no image data")
    if isinstance(data, dict) and "bytes" in data:  # datasets' Image feature, undecoded
        if not data["bytes"]:
            raise BadImageError("an image record without bytes (paths go through a source)")
        data = data["bytes"]
    try:
        if isinstance(data, (str, Path)):
            if not os.path.isfile(data):
                raise BadImageError(f"missing file {data}")
            im = open_image(data, max_pixels=max_pixels)
        elif isinstance(data, (bytes, bytearray, memoryview)):
            im = open_image(io.BytesIO(bytes(data)), max_pixels=max_pixels)
        elif isinstance(data, Image.Image):
            im = data
            check_pixels(im, max_pixels)
        else:
            raise BadImageError(f"unsupported image value of type {type(data).__name__}")
    except ImageTooLargeError as err:
        raise BadImageError(str(err)) from err
    im.load()  # decode now: a truncated JPEG fails here, not later
    if im.mode != "RGB":
        im = im.convert("RGBA").convert("RGB") if "transparency" in im.info else im.convert("RGB")
    return im


def transform_image(
    im, resolution: int, *, random_crop: bool, flip: bool, crop_fraction
) -> tuple[torch.Tensor, tuple[int, int], tuple[int, int]]:
    """Resize shorter side → crop → optional flip → (3, R, R) in [-1, 1].

    Returns the tensor, the original (h, w) and the crop's (top, left) in the resized image
    (SDXL micro-conditioning; for a flipped image, in the flipped image's coordinates)."""
    from PIL import Image

    w, h = im.size
    short = min(w, h)
    if short != resolution:
        if w <= h:
            nw, nh = resolution, int(resolution * h / w)
        else:
            nw, nh = int(resolution * w / h), resolution
        im = im.resize((max(nw, resolution), max(nh, resolution)), Image.BILINEAR)
    rw, rh = im.size
    if random_crop:
        top = crop_offset(float(crop_fraction[0]), rh, resolution)
        left = crop_offset(float(crop_fraction[1]), rw, resolution)
    else:
        top = int(round((rh - resolution) / 2.0))
        left = int(round((rw - resolution) / 2.0))
    im = im.crop((left, top, left + resolution, top + resolution))
    if flip:  # = flip the resized image, then crop at rw - left - R (diffusers' SDXL convention)
        im = im.transpose(Image.FLIP_LEFT_RIGHT)
        left = rw - left - resolution
    x = torch.from_numpy(np.asarray(im, dtype=np.uint8).copy()).permute(2, 0, 1)
    x = x.to(torch.float32).div_(127.5).sub_(1.0)
    return x, (h, w), (top, left)


class PairDataset(torch.utils.data.Dataset):
    """Map-style dataset keyed by (epoch, pair index) → a decoded, transformed pair.

    Item: {"index", "epoch", "pixels" (2|1, 3, R, R), "prompt", "original_size" (2|1, 2),
    "crop_top_left" (2|1, 2), "bad": None} or {"index", "epoch", "bad": reason} for a bad pair.
    ``winners_only`` (the sft objective) decodes the winner alone.
    """

    def __init__(
        self,
        source,
        *,
        resolution: int,
        seed: int,
        random_crop: bool = False,
        random_flip: bool = True,
        on_bad_image: str = "skip",
        winners_only: bool = False,
    ) -> None:
        self.source = source
        self.resolution = resolution
        self.seed = seed
        self.random_crop = random_crop
        self.random_flip = random_flip
        self.on_bad_image = on_bad_image
        self.winners_only = winners_only

    def __len__(self) -> int:
        return len(self.source)

    def __getitem__(self, key: tuple[int, int]) -> dict:
        epoch, index = key
        try:
            prompt, win, lose = self.source.get(index)
        except (OSError, ValueError, KeyError) as err:
            return self._bad(epoch, index, f"unreadable record: {err}")
        aug = augment_draws(self.seed, epoch, index)
        images = [win] if self.winners_only else [win, lose]
        xs, sizes, crops = [], [], []
        for j, data in enumerate(images):
            try:
                im = decode_image(data)
            except Exception as err:  # noqa: BLE001 - any decoding failure makes the pair bad
                which = "winner" if j == 0 else "loser"
                return self._bad(epoch, index, f"{which} image: {type(err).__name__}: {err}")
            x, size, crop = transform_image(
                im,
                self.resolution,
                random_crop=self.random_crop,
                flip=self.random_flip and bool(aug.flip[j]),
                crop_fraction=aug.crop[j],
            )
            xs.append(x)
            sizes.append(size)
            crops.append(crop)
        return {
            "index": index,
            "epoch": epoch,
            "pixels": torch.stack(xs),
            "prompt": prompt,
            "original_size": torch.tensor(sizes, dtype=torch.long),
            "crop_top_left": torch.tensor(crops, dtype=torch.long),
            "bad": None,
        }

    def _bad(self, epoch: int, index: int, reason: str) -> dict:
        where = self.source.describe(index)
        if self.on_bad_image == "fail":
            raise BadImageError(f"bad image in {where}: {reason} (on_bad_image: fail)")
        return {"index": index, "epoch": epoch, "bad": f"{where}: {reason}"}


@dataclass
class PairBatch:
    """A collated micro-batch of P good pairs (P may be 0 when every pair was bad).

    pixels: (P, 2|1, 3, R, R); original_size, crop_top_left: (P, 2|1, 2); bad: [(index, why)]."""

    indices: torch.Tensor
    epoch: int
    pixels: torch.Tensor
    prompts: list[str]
    original_size: torch.Tensor
    crop_top_left: torch.Tensor
    bad: list[tuple[int, str]]

    def __len__(self) -> int:
        return self.indices.shape[0]


def collate_pairs(items: list[dict]) -> PairBatch:
    good = [it for it in items if it["bad"] is None]
    bad = [(it["index"], it["bad"]) for it in items if it["bad"] is not None]
    epoch = items[0]["epoch"] if items else 0
    if not good:
        return PairBatch(
            torch.zeros(0, dtype=torch.long),
            epoch,
            torch.zeros(0),
            [],
            torch.zeros(0, 2, 2, dtype=torch.long),
            torch.zeros(0, 2, 2, dtype=torch.long),
            bad,
        )
    return PairBatch(
        indices=torch.tensor([it["index"] for it in good], dtype=torch.long),
        epoch=epoch,
        pixels=torch.stack([it["pixels"] for it in good]),
        prompts=[it["prompt"] for it in good],
        original_size=torch.stack([it["original_size"] for it in good]),
        crop_top_left=torch.stack([it["crop_top_left"] for it in good]),
        bad=bad,
    )


# --------------------------------------------------------------------------------------------
# order: per-epoch permutation, sharded over ranks, resumable by micro-step
class PairOrder:
    """Which pairs rank ``rank`` sees at global micro-step g (0-based, counted over the run).

    Epoch e's order is ``epoch_permutation(seed, e, n)`` with the tail that does not divide by
    the world size dropped; rank r takes every world-th pair from r; its pairs are cut into
    micro-batches of ``micro`` (an incomplete last one is dropped). Micro-step g is batch
    g mod B of epoch g div B, with B micro-batches per epoch and rank — so resuming after
    ``steps`` optimizer steps starts at g = steps × gradient_accumulation_steps.
    """

    def __init__(self, n: int, *, seed: int, rank: int, world: int, micro: int) -> None:
        self.n, self.seed, self.rank, self.world, self.micro = n, seed, rank, world, micro
        self.per_rank = n // world
        self.batches_per_epoch = self.per_rank // micro
        if self.batches_per_epoch < 1:
            raise DataError(
                f"train_data: {n} pairs are too few for {world} process(es) × "
                f"train_batch_size_per_gpu {micro}"
            )
        self._epoch: int | None = None
        self._mine: torch.Tensor | None = None

    def position(self, micro_step: int) -> tuple[int, int]:
        """(epoch, batch within the epoch) of global micro-step ``micro_step``."""
        return divmod(micro_step, self.batches_per_epoch)

    def batch(self, micro_step: int) -> list[tuple[int, int]]:
        epoch, b = self.position(micro_step)
        if self._epoch != epoch:
            perm = epoch_permutation(self.seed, epoch, self.n)[: self.per_rank * self.world]
            self._mine, self._epoch = perm[self.rank :: self.world], epoch
        rows = self._mine[b * self.micro : (b + 1) * self.micro].tolist()
        return [(epoch, int(i)) for i in rows]


class _OrderSampler(torch.utils.data.Sampler):
    def __init__(self, order: PairOrder, start: int, stop: int) -> None:
        self.order, self.start, self.stop = order, start, stop

    def __iter__(self):
        for g in range(self.start, self.stop):
            yield self.order.batch(g)

    def __len__(self) -> int:
        return self.stop - self.start


def make_loader(
    dataset: PairDataset, order: PairOrder, *, start: int, stop: int, num_workers: int
) -> torch.utils.data.DataLoader:
    """Micro-batches for global micro-steps start..stop-1, decoded in ``num_workers`` workers."""
    return torch.utils.data.DataLoader(
        dataset,
        batch_sampler=_OrderSampler(order, start, stop),
        collate_fn=collate_pairs,
        num_workers=num_workers,
        persistent_workers=False,
        prefetch_factor=2 if num_workers > 0 else None,
    )


def warn_bad(bad: list[tuple[int, str]]) -> None:
    for _, why in bad:
        warnings.warn(f"skipping a bad pair: {why}", stacklevel=2)


# --------------------------------------------------------------------------------------------
# synthetic Pick-a-Pic files (tests, docs, the tiny CPU config)
def image_bytes(rgb: tuple[int, int, int], size: tuple[int, int], fmt: str = "PNG", mode="RGB"):
    """Encoded bytes of a small image with a gradient (so flips and crops are visible)."""
    from PIL import Image

    w, h = size
    x = np.zeros((h, w, 3), dtype=np.uint8)
    x[..., 0] = rgb[0]
    x[..., 1] = rgb[1]
    x[..., 2] = np.linspace(0, 255, w, dtype=np.uint8)[None, :]
    im = Image.fromarray(x, "RGB").convert(mode)
    buf = io.BytesIO()
    im.save(buf, format=fmt)
    return buf.getvalue()


def write_pickapic_parquet(path: str | Path, rows: list[dict], row_group_size: int = 4) -> Path:
    """Write rows in Pick-a-Pic v2's 19-column schema. Each row gives caption, jpg_0, jpg_1,
    label_0 (label_1 = 1 − label_0; 0.5 = tie) and optionally any other column."""
    import datetime

    import pyarrow as pa
    import pyarrow.parquet as pq

    cols: dict[str, list] = {c: [] for c in PICKAPIC_COLUMNS}
    for i, r in enumerate(rows):
        l0 = float(r["label_0"])
        tie = l0 == 0.5
        base = {
            "are_different": True,
            "best_image_uid": "none" if tie else (f"u{i}_0" if l0 == 1.0 else f"u{i}_1"),
            "caption": r["caption"],
            "created_at": datetime.datetime(2023, 5, 1, 12, 0, i % 60),
            "has_label": not tie,
            "image_0_uid": f"u{i}_0",
            "image_0_url": f"https://example.invalid/{i}_0.jpg",
            "image_1_uid": f"u{i}_1",
            "image_1_url": f"https://example.invalid/{i}_1.jpg",
            "jpg_0": r["jpg_0"],
            "jpg_1": r["jpg_1"],
            "label_0": l0,
            "label_1": 1.0 - l0,
            "model_0": "sdxl",
            "model_1": "sd-2.1",
            "ranking_id": i,
            "user_id": 1000 + i,
            "num_example_per_prompt": 1,
            "__index_level_0__": i,
        }
        base.update({k: v for k, v in r.items() if k in cols})
        for k in PICKAPIC_COLUMNS:
            cols[k].append(base[k])
    types = {
        "are_different": pa.bool_(),
        "created_at": pa.timestamp("ns"),
        "has_label": pa.bool_(),
        "jpg_0": pa.binary(),
        "jpg_1": pa.binary(),
        "label_0": pa.float64(),
        "label_1": pa.float64(),
        "ranking_id": pa.int64(),
        "user_id": pa.int64(),
        "num_example_per_prompt": pa.int64(),
        "__index_level_0__": pa.int64(),
    }
    table = pa.table({c: pa.array(cols[c], type=types.get(c, pa.string())) for c in cols})
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    pq.write_table(table, path, row_group_size=row_group_size)
    return path


def synthetic_pairs(n: int, words: list[str], seed: int = 0) -> list[dict]:
    """n preference rows: the winner is the image whose colour matches the prompt's colour."""
    colours = {"red": (220, 30, 30), "green": (30, 200, 40), "blue": (40, 60, 230)}
    names = [c for c in colours if c in words] or list(colours)
    shapes = [w for w in ("cube", "ball", "cat", "dog") if w in words] or ["cube"]
    rng = np.random.default_rng(seed)
    rows = []
    for i in range(n):
        c = names[i % len(names)]
        other = names[(i + 1) % len(names)]
        s = shapes[i % len(shapes)]
        size = (int(rng.integers(20, 40)), int(rng.integers(20, 40)))
        good, bad = image_bytes(colours[c], size), image_bytes(colours[other], size)
        loser_first = i % 3 == 1
        rows.append(
            {
                "caption": f"a photo of a {c} {s}",
                "jpg_0": bad if loser_first else good,
                "jpg_1": good if loser_first else bad,
                "label_0": 0.0 if loser_first else 1.0,
            }
        )
    return rows


def main(argv: list[str] | None = None) -> int:
    """``python -m snpo.data synth OUT [--pairs N] [--family sd|sdxl]``: a tiny model (OUT/model)
    and N synthetic Pick-a-Pic pairs (OUT/pairs.parquet) for the tiny CPU config."""
    import argparse

    from .tiny import save_tiny_model

    ap = argparse.ArgumentParser(prog="python -m snpo.data", description=main.__doc__)
    sub = ap.add_subparsers(dest="cmd", required=True)
    sp = sub.add_parser("synth")
    sp.add_argument("out")
    sp.add_argument("--pairs", type=int, default=32)
    sp.add_argument("--family", choices=("sd", "sdxl"), default="sd")
    sp.add_argument("--resolution", type=int, default=16)
    args = ap.parse_args(argv)
    out = Path(args.out)
    words = ["a", "photo", "of", "red", "blue", "green", "cube", "ball", "cat", "dog"]
    save_tiny_model(out / "model", family=args.family, words=words, resolution=args.resolution)
    write_pickapic_parquet(out / "pairs.parquet", synthetic_pairs(args.pairs, words))
    print(f"wrote {out / 'model'} and {out / 'pairs.parquet'} ({args.pairs} pairs)")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
