"""A cache is refused once its data changed in a way the old fingerprint (name, size, row count;
the JSONL's text) missed: a flipped label_0 in a parquet of the same size and rows, an own-pairs
image replaced by another of the same size. The refusal names the field."""

from __future__ import annotations

import json
import os

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from PIL import Image

from snpo.cache import CacheMismatchError, build_cache, data_identity, open_cache
from snpo.data import write_pickapic_parquet
from tests.trainer.conftest import pickapic_rows

from .conftest import BUILD, make_cfg, with_

# plain encoding, no compression, no statistics: flipping one float64 changes 8 bytes only
PLAIN = dict(use_dictionary=False, compression="none", write_statistics=False, row_group_size=4)


def _plain_parquet(path, flip_row: int | None = None):
    src = write_pickapic_parquet(path.with_name("src-" + path.name), pickapic_rows())
    t = pq.read_table(src)
    if flip_row is not None:
        labels = t.column("label_0").to_pylist()
        assert labels[flip_row] == 1.0
        labels[flip_row] = 0.0  # the loser becomes the winner: other pairs, same sizes
        i = t.schema.get_field_index("label_0")
        t = t.set_column(i, "label_0", pa.array(labels, pa.float64()))
    pq.write_table(t, path, **PLAIN)
    return path


def _old_identity(p) -> str:
    """What the fingerprint was before: name, size and row count."""
    return f"{p.name} {p.stat().st_size} bytes {pq.ParquetFile(p).metadata.num_rows} rows"


def test_flipped_label_is_refused(tmp_path, tiny_sd):
    data = _plain_parquet(tmp_path / "train-0.parquet")
    cfg = make_cfg(tmp_path, tiny_sd, data)
    build_cache(cfg, tmp_path / "cache", what=("text",), **BUILD)
    open_cache(tmp_path / "cache", cfg, need=("text",))  # unchanged data: accepted
    old = _old_identity(data)
    tmp = _plain_parquet(tmp_path / "new" / "train-0.parquet", flip_row=0)
    os.replace(tmp, data)
    assert _old_identity(data) == old  # what the old fingerprint saw did not change
    with pytest.raises(CacheMismatchError, match=r"data\[0\]\.label_0 is sha256:\w+… in the ca"):
        open_cache(tmp_path / "cache", cfg, need=("text",))


def _image(path, seed: int) -> None:
    """A seeded 12×10 noise BMP (uncompressed: every such image has the same byte size)."""
    rng = np.random.default_rng(seed)
    Image.fromarray(rng.integers(0, 256, (10, 12, 3), dtype=np.uint8)).save(path, "BMP")


def _own_pairs(folder, n: int = 3):
    folder.mkdir(parents=True)
    (folder / "img").mkdir()
    lines = []
    for i in range(n):
        _image(folder / "img" / f"w{i}.bmp", seed=2 * i)
        _image(folder / "img" / f"l{i}.bmp", seed=2 * i + 1)
        rec = {"prompt": f"a photo of a red cube {i}", "winner": f"img/w{i}.bmp"}
        lines.append(json.dumps({**rec, "loser": f"img/l{i}.bmp"}))
    (folder / "pairs.jsonl").write_text("\n".join(lines) + "\n")
    return folder / "pairs.jsonl"


def test_replaced_own_pairs_image_is_refused(tmp_path, tiny_sd):
    data = _own_pairs(tmp_path / "data")
    cfg = make_cfg(tmp_path, tiny_sd, data)
    build_cache(cfg, tmp_path / "cache", what=("text",), **BUILD)
    open_cache(tmp_path / "cache", cfg, need=("text",))
    text = data.read_bytes()
    img = tmp_path / "data" / "img" / "w1.bmp"
    size, before = img.stat().st_size, img.read_bytes()
    _image(tmp_path / "other.bmp", seed=99)  # another image, written later, moved over it
    os.replace(tmp_path / "other.bmp", img)
    assert img.stat().st_size == size and img.read_bytes() != before
    assert data.read_bytes() == text  # the JSONL did not change
    with pytest.raises(
        CacheMismatchError, match=r"data\[0\]\.image_size_mtime is sha256:\w+… in the cache"
    ):
        open_cache(tmp_path / "cache", cfg, need=("text",))


def test_data_identity_fields(tmp_path, tiny_sd, pickapic):
    """One dict per file, with the fields a refusal names; absent images count too."""
    data = _own_pairs(tmp_path / "d", n=2)
    (tmp_path / "d" / "img" / "l1.bmp").unlink()
    cfg = make_cfg(tmp_path, tiny_sd, data)
    (own,) = data_identity(cfg)
    assert own["file"] == "pairs.jsonl" and own["images"] == 4
    assert own["sha256"].startswith("sha256:") and own["image_size_mtime"].startswith("sha256:")
    (par,) = data_identity(with_(cfg, train_data=[str(pickapic)]))
    assert sorted(par) == ["bytes", "caption", "file", "footer", "has_label", "label_0", "rows"]
    assert par["rows"] == 16
