"""The Pick-a-Pic v2 schema: its 19 columns, and what a row means as a preference pair.

A row holds a prompt (``caption``), two images (``jpg_0``, ``jpg_1``: encoded bytes, or in a
local dataset a path or a ``{"bytes", "path"}`` struct) and ``label_0`` (1: image 0 preferred,
0: image 1 preferred, 0.5: a tie; ``label_1 = 1 − label_0``). Ties, and rows whose
``has_label`` is false, are dropped; a kept row with ``label_0 == 0`` is stored loser first and
is swapped so the winner comes first, as DiffusionDPO does.
"""

from __future__ import annotations

import os

import numpy as np

from snpo.data.paths import PathGuard

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
PROMPT_COLUMN = "caption"
IMAGE_COLUMNS = ("jpg_0", "jpg_1")
LABEL_COLUMN = "label_0"
HAS_LABEL_COLUMN = "has_label"
REQUIRED_COLUMNS = (PROMPT_COLUMN, *IMAGE_COLUMNS, LABEL_COLUMN)


def pickapic_schema():
    """The pyarrow schema of Pick-a-Pic v2 as published (column order of PICKAPIC_COLUMNS)."""
    import pyarrow as pa

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
    return pa.schema([(c, types.get(c, pa.string())) for c in PICKAPIC_COLUMNS])


def preference_rows(
    label_0: np.ndarray, has_label: np.ndarray | None = None
) -> tuple[np.ndarray, np.ndarray]:
    """(kept row indices (K,) int64, loser-first mask (K,) bool) of rows with labels ``label_0``.

    A row is kept when ``label_0`` is 0 or 1 (not a tie) and, if given, ``has_label`` is true;
    it is loser first when ``label_0 == 0``."""
    label_0 = np.asarray(label_0, dtype=np.float64)
    keep = np.isin(label_0, (0.0, 1.0))
    if has_label is not None:
        keep &= np.asarray(has_label, dtype=bool)
    rows = np.nonzero(keep)[0].astype(np.int64)
    return rows, label_0[rows] == 0.0


def cell_image(value: object, guard: PathGuard, where: str) -> object:
    """An image cell → what :func:`snpo.data.decode.decode_image` takes: bytes, a PIL image, None,
    or a path checked by ``guard`` (a plain string, or a ``{"bytes": None, "path": ...}``
    struct); ``where`` names the row and column in errors."""
    if isinstance(value, dict):
        if value.get("bytes"):
            return value["bytes"]
        value = value.get("path")
        if value is None:
            return None
    if isinstance(value, (str, os.PathLike)):
        return guard(value, where)
    return value
