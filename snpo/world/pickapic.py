"""Pick-a-Pic v2-schema parquet files for the world: writer, reader and image codec.

The schema is the published one (19 columns, this order, these Arrow types):

    are_different bool, best_image_uid string, caption string, created_at timestamp[ns],
    has_label bool, image_0_uid string, image_0_url string, image_1_uid string,
    image_1_url string, jpg_0 binary, jpg_1 binary, label_0 double, label_1 double,
    model_0 string, model_1 string, ranking_id int64, user_id int64,
    num_example_per_prompt int64, __index_level_0__ int64

Conventions of the world's files:
- ``jpg_0``/``jpg_1`` hold **PNG** bytes (lossless, 8-bit RGB; the column names are the
  dataset's). Any reader that decodes with PIL reads them as it reads the dataset's JPEGs.
- A preference row has label (1, 0) or (0, 1), ``has_label`` True and ``best_image_uid`` the
  winner's uid; the winner's side is random. A tie has labels (0.5, 0.5), ``has_label``
  False and ``best_image_uid`` "none" (as in the dataset).
- An SFT row (ground truth for pretraining) has ``jpg_0 == jpg_1`` = the image, labels (1, 0),
  ``has_label`` True, ``are_different`` False: the "winner" is the image, so a loader that puts
  the winner first hands the SFT objective the ground truth.
- ``num_example_per_prompt`` = the number of rows with that caption in the file;
  ``__index_level_0__`` = the row number; ``created_at`` = 2024-01-01 00:00:00 + ranking_id
  seconds; ``user_id`` 0 (the known reward); urls are ``snpo-world://<uid>.png`` (there is
  nothing to download: the bytes are in the file).
"""

from __future__ import annotations

import io
import uuid
from collections import Counter
from collections.abc import Iterator
from dataclasses import dataclass
from datetime import datetime, timedelta
from pathlib import Path

import torch

from snpo.data import PICKAPIC_COLUMNS, pickapic_schema

EPOCH = datetime(2024, 1, 1)
UID_NAMESPACE = uuid.UUID("6f1c2a3e-0b7d-4c55-9a51-5e2f3b7d9c01")


def image_uid(*key: object) -> str:
    """A deterministic uuid5 for an image identified by ``key``."""
    return str(uuid.uuid5(UID_NAMESPACE, "/".join(str(k) for k in key)))


def image_url(uid: str) -> str:
    return f"snpo-world://{uid}.png"


def encode_png(image: torch.Tensor) -> bytes:
    """PNG bytes (8-bit RGB) of one image (3, H, W) in [0, 1]: pixel = round(255·x)."""
    from snpo.data import to_pil

    if image.ndim != 3 or image.shape[0] != 3:
        raise ValueError(f"expected one (3, H, W) image, got {tuple(image.shape)}")
    buf = io.BytesIO()
    to_pil(image).save(buf, format="PNG")
    return buf.getvalue()


def decode_image(data: bytes) -> torch.Tensor:
    """(3, H, W) float in [0, 1] from PNG/JPEG bytes (:func:`snpo.data.decode_image`: any mode
    is converted to RGB)."""
    from snpo.data import decode_image as decode_rgb
    from snpo.data import from_pil

    return from_pil(decode_rgb(data))


@dataclass
class Row:
    """One Pick-a-Pic row before the file-level columns (ranking id, counts, index) are set."""

    caption: str
    jpg_0: bytes
    jpg_1: bytes
    label_0: float
    label_1: float
    image_0_uid: str
    image_1_uid: str
    model_0: str
    model_1: str

    @property
    def is_tie(self) -> bool:
        return self.label_0 == self.label_1

    @property
    def best_image_uid(self) -> str:
        if self.is_tie:
            return "none"
        return self.image_0_uid if self.label_0 > self.label_1 else self.image_1_uid


def rows_to_table(rows: list[Row]):
    """A pyarrow Table with exactly the 19 columns, in order, of the published types."""
    import pyarrow as pa

    for r in rows:
        ok = {(r.label_0, r.label_1)} <= {(1.0, 0.0), (0.0, 1.0), (0.5, 0.5)}
        if not ok:
            raise ValueError(
                f"labels must be (1, 0), (0, 1) or (0.5, 0.5), got {r.label_0, r.label_1}"
            )
    counts = Counter(r.caption for r in rows)
    cols = {
        "are_different": [r.model_0 != r.model_1 for r in rows],
        "best_image_uid": [r.best_image_uid for r in rows],
        "caption": [r.caption for r in rows],
        "created_at": [EPOCH + timedelta(seconds=i) for i in range(len(rows))],
        "has_label": [not r.is_tie for r in rows],
        "image_0_uid": [r.image_0_uid for r in rows],
        "image_0_url": [image_url(r.image_0_uid) for r in rows],
        "image_1_uid": [r.image_1_uid for r in rows],
        "image_1_url": [image_url(r.image_1_uid) for r in rows],
        "jpg_0": [r.jpg_0 for r in rows],
        "jpg_1": [r.jpg_1 for r in rows],
        "label_0": [float(r.label_0) for r in rows],
        "label_1": [float(r.label_1) for r in rows],
        "model_0": [r.model_0 for r in rows],
        "model_1": [r.model_1 for r in rows],
        "ranking_id": list(range(len(rows))),
        "user_id": [0] * len(rows),
        "num_example_per_prompt": [counts[r.caption] for r in rows],
        "__index_level_0__": list(range(len(rows))),
    }
    return pa.Table.from_pydict(cols, schema=pickapic_schema())


def write_parquet(rows: list[Row], path: str | Path) -> Path:
    """Write rows as a Pick-a-Pic v2-schema parquet file (parent folders created)."""
    import pyarrow.parquet as pq

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    pq.write_table(rows_to_table(rows), path)
    return path


def check_schema(table) -> None:
    """Raise ValueError unless ``table`` has exactly the 19 columns, in order, of the
    published types."""
    expected = pickapic_schema()
    names = list(table.schema.names)
    if names != list(PICKAPIC_COLUMNS):
        raise ValueError(f"columns {names} differ from Pick-a-Pic v2's {list(PICKAPIC_COLUMNS)}")
    for field in expected:
        got = table.schema.field(field.name).type
        if got != field.type:
            raise ValueError(f"column {field.name!r} has type {got}, expected {field.type}")


def read_table(path: str | Path):
    """The parquet file as a pyarrow Table, schema-checked."""
    import pyarrow.parquet as pq

    table = pq.read_table(path)
    check_schema(table)
    return table


@dataclass
class Pair:
    """A decoded preference pair, winner first."""

    caption: str
    winner: torch.Tensor  # (3, H, W) in [0, 1]
    loser: torch.Tensor
    winner_uid: str
    loser_uid: str


def iter_pairs(path: str | Path, *, drop_ties: bool = True) -> Iterator[Pair]:
    """Decoded pairs of a Pick-a-Pic-schema file with the winner first (DiffusionDPO's
    convention: ``label_0 == 0`` → swap); ties (``label_0 == 0.5``) are skipped unless
    ``drop_ties`` is False, in which case they come in file order (image 0 first)."""
    table = read_table(path)
    data = table.select(
        ["caption", "jpg_0", "jpg_1", "label_0", "image_0_uid", "image_1_uid"]
    ).to_pylist()
    for r in data:
        if r["label_0"] == 0.5 and drop_ties:
            continue
        a, b = (0, 1) if r["label_0"] >= 0.5 else (1, 0)
        imgs = (decode_image(r["jpg_0"]), decode_image(r["jpg_1"]))
        uids = (r["image_0_uid"], r["image_1_uid"])
        yield Pair(r["caption"], imgs[a], imgs[b], uids[a], uids[b])


def sft_row(caption: str, image: torch.Tensor, uid: str, model: str = "world-render") -> Row:
    """An SFT row: the ground-truth image on both sides, labels (1, 0) (module docstring)."""
    png = encode_png(image)
    return Row(caption, png, png, 1.0, 0.0, uid, uid, model, model)


def sft_jitter_seed(seed: int, i: int) -> int:
    """The render (jitter) seed of SFT row i: seed·1_000_000 + i."""
    return int(seed) * 1_000_000 + int(i)


def sft_rows(
    n: int,
    *,
    seed: int | None = None,
    split: str = "all",
    size: int = 16,
    progress: bool = False,
) -> list[Row]:
    """n SFT rows: row i shows ``ordered_prompts(split)[i mod P]`` (every prompt equally often)
    rendered with jitter seed ``sft_jitter_seed(seed, i)``; seed None → SEEDS["sft_data"]."""
    from .render import render
    from .vocab import SEEDS, ordered_prompts

    seed = int(SEEDS["sft_data"]) if seed is None else int(seed)
    prompts = ordered_prompts(split)
    it = range(n)
    if progress:
        from tqdm.auto import tqdm

        it = tqdm(it, desc="sft data", unit="img")
    rows = []
    for i in it:
        p = prompts[i % len(prompts)]
        js = sft_jitter_seed(seed, i)
        rows.append(sft_row(p.text, render(p, js, size), image_uid("sft", seed, i, p.text)))
    return rows


def write_sft_parquet(
    path: str | Path,
    n: int,
    *,
    seed: int | None = None,
    split: str = "all",
    size: int = 16,
    progress: bool = True,
) -> Path:
    """Write :func:`sft_rows` as a Pick-a-Pic v2-schema parquet file (module docstring)."""
    return write_parquet(sft_rows(n, seed=seed, split=split, size=size, progress=progress), path)
