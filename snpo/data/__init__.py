"""Preference pairs: the Pick-a-Pic schema, pair sources (Pick-a-Pic parquet, hub, own pairs),
the bad-image rule (:func:`decode_image`), the transform, the dataset and its order.

Modules: errors (DataError), paths (PathGuard), schema (Pick-a-Pic columns, what a row means),
sources, decode (the bad-image rule), transform, dataset, order, synthetic (test data and
``python -m snpo.data synth``), images (tensor ↔ PIL, PNG, contact sheets).
"""

from snpo.data.dataset import PairBatch, PairDataset, collate_pairs
from snpo.data.decode import (
    MAX_IMAGE_PIXELS,
    BadImageError,
    ImageTooLargeError,
    decode_image,
)
from snpo.data.errors import DataError
from snpo.data.images import contact_sheet, from_pil, save_png, to_pil
from snpo.data.order import PairOrder, make_loader
from snpo.data.paths import PathGuard, PathOutsideError
from snpo.data.schema import PICKAPIC_COLUMNS, pickapic_schema
from snpo.data.sources import (
    ConcatSource,
    HubPairs,
    OwnPairs,
    PickapicParquet,
    SourceStats,
    open_source,
)
from snpo.data.synthetic import image_bytes, synthetic_pairs, write_pickapic_parquet
from snpo.data.transform import transform_image
from snpo.draws import epoch_permutation

__all__ = [
    "MAX_IMAGE_PIXELS",
    "BadImageError",
    "ConcatSource",
    "DataError",
    "HubPairs",
    "ImageTooLargeError",
    "OwnPairs",
    "PICKAPIC_COLUMNS",
    "PairBatch",
    "PairDataset",
    "PairOrder",
    "PathGuard",
    "PathOutsideError",
    "PickapicParquet",
    "SourceStats",
    "collate_pairs",
    "contact_sheet",
    "decode_image",
    "epoch_permutation",
    "from_pil",
    "image_bytes",
    "make_loader",
    "open_source",
    "pickapic_schema",
    "save_png",
    "synthetic_pairs",
    "to_pil",
    "transform_image",
    "write_pickapic_parquet",
]
