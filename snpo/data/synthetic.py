"""Synthetic Pick-a-Pic files (tests, docs, the tiny CPU config) and the ``synth`` command.

``python -m snpo.data synth OUT`` writes a tiny model (OUT/model) and N synthetic pairs
(OUT/pairs.parquet) whose winner is the image of the prompt's colour.
"""

from __future__ import annotations

import datetime
import io
from pathlib import Path

import numpy as np

from snpo.data.schema import pickapic_schema

COLOURS = {"red": (220, 30, 30), "green": (30, 200, 40), "blue": (40, 60, 230)}
SHAPES = ("cube", "ball", "cat", "dog")
SYNTH_WORDS = ["a", "photo", "of", "red", "blue", "green", "cube", "ball", "cat", "dog"]


def image_bytes(
    rgb: tuple[int, int, int], size: tuple[int, int], fmt: str = "PNG", mode: str = "RGB"
) -> bytes:
    """Encoded bytes of a (w, h) = ``size`` image: red and green from ``rgb``, blue a left-to-right
    gradient (so flips and crops are visible); converted to ``mode`` and saved as ``fmt``."""
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


def _full_row(i: int, r: dict) -> dict:
    """All 19 columns of row ``i`` from its caption, images and label_0 (others made up)."""
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
    base.update({k: v for k, v in r.items() if k in base})
    return base


def write_pickapic_parquet(path: str | Path, rows: list[dict], row_group_size: int = 4) -> Path:
    """Write rows in Pick-a-Pic v2's 19-column schema. Each row gives caption, jpg_0, jpg_1,
    label_0 (label_1 = 1 − label_0; 0.5 = tie) and optionally any other column."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    full = [_full_row(i, r) for i, r in enumerate(rows)]
    schema = pickapic_schema()
    arrays = [pa.array([r[f.name] for r in full], type=f.type) for f in schema]
    table = pa.Table.from_arrays(arrays, schema=schema)
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    pq.write_table(table, path, row_group_size=row_group_size)
    return path


def synthetic_pairs(n: int, words: list[str], seed: int = 0) -> list[dict]:
    """n preference rows: the winner is the image whose colour matches the prompt's colour;
    every third row is stored loser first (label_0 = 0)."""
    names = [c for c in COLOURS if c in words] or list(COLOURS)
    shapes = [w for w in SHAPES if w in words] or ["cube"]
    rng = np.random.default_rng(seed)
    rows = []
    for i in range(n):
        c = names[i % len(names)]
        other = names[(i + 1) % len(names)]
        s = shapes[i % len(shapes)]
        size = (int(rng.integers(20, 40)), int(rng.integers(20, 40)))
        good, bad = image_bytes(COLOURS[c], size), image_bytes(COLOURS[other], size)
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

    from snpo.models import save_tiny_model

    ap = argparse.ArgumentParser(prog="python -m snpo.data", description=main.__doc__)
    sub = ap.add_subparsers(dest="cmd", required=True)
    sp = sub.add_parser("synth")
    sp.add_argument("out")
    sp.add_argument("--pairs", type=int, default=32)
    sp.add_argument("--family", choices=("sd", "sdxl"), default="sd")
    sp.add_argument("--resolution", type=int, default=16)
    args = ap.parse_args(argv)
    out = Path(args.out)
    save_tiny_model(
        out / "model", family=args.family, words=SYNTH_WORDS, resolution=args.resolution
    )
    write_pickapic_parquet(out / "pairs.parquet", synthetic_pairs(args.pairs, SYNTH_WORDS))
    print(f"wrote {out / 'model'} and {out / 'pairs.parquet'} ({args.pairs} pairs)")
    return 0
