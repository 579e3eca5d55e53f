"""Pick-a-Pic v2-schema files: exactly the 19 published columns in order and type, readable by
pyarrow and by datasets, PNG images decodable with PIL; the SFT format."""

from __future__ import annotations

import io
from collections import Counter

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch
from PIL import Image

from snpo.data import PICKAPIC_COLUMNS as COLUMNS
from snpo.world.pickapic import (
    Row,
    check_schema,
    decode_image,
    encode_png,
    iter_pairs,
    read_table,
    rows_to_table,
    write_parquet,
    write_sft_parquet,
)
from snpo.world.render import render
from snpo.world.vocab import all_prompts, ordered_prompts

PUBLISHED = [
    ("are_different", pa.bool_()),
    ("best_image_uid", pa.string()),
    ("caption", pa.string()),
    ("created_at", pa.timestamp("ns")),
    ("has_label", pa.bool_()),
    ("image_0_uid", pa.string()),
    ("image_0_url", pa.string()),
    ("image_1_uid", pa.string()),
    ("image_1_url", pa.string()),
    ("jpg_0", pa.binary()),
    ("jpg_1", pa.binary()),
    ("label_0", pa.float64()),
    ("label_1", pa.float64()),
    ("model_0", pa.string()),
    ("model_1", pa.string()),
    ("ranking_id", pa.int64()),
    ("user_id", pa.int64()),
    ("num_example_per_prompt", pa.int64()),
    ("__index_level_0__", pa.int64()),
]


def assert_published_schema(path):
    schema = pq.read_schema(path)
    assert [(f.name, f.type) for f in schema] == PUBLISHED
    assert list(COLUMNS) == [n for n, _ in PUBLISHED]


@pytest.fixture(scope="module")
def sft_file(tmp_path_factory):
    return write_sft_parquet(tmp_path_factory.mktemp("sft") / "sft.parquet", 100, progress=False)


def test_sft_file_schema_and_content(sft_file):
    assert_published_schema(sft_file)
    t = read_table(sft_file).to_pylist()
    assert len(t) == 100
    prompts = ordered_prompts("all")
    for i, r in enumerate(t):
        assert r["caption"] == prompts[i % 80].text
        assert r["jpg_0"] == r["jpg_1"] and r["image_0_uid"] == r["image_1_uid"]
        assert (r["label_0"], r["label_1"], r["has_label"]) == (1.0, 0.0, True)
        assert r["best_image_uid"] == r["image_0_uid"] and r["are_different"] is False
        assert r["ranking_id"] == r["__index_level_0__"] == i
    counts = Counter(r["caption"] for r in t)
    assert all(r["num_example_per_prompt"] == counts[r["caption"]] for r in t)
    # the stored image is the 8-bit render of the prompt
    img = Image.open(io.BytesIO(t[3]["jpg_0"]))
    assert img.format == "PNG" and img.mode == "RGB" and img.size == (16, 16)
    x = decode_image(t[3]["jpg_0"])
    assert x.shape == (3, 16, 16) and x.dtype == torch.float32
    # the same file twice is byte-identical content (deterministic)
    again = write_sft_parquet(sft_file.with_name("again.parquet"), 100, progress=False)
    assert read_table(again).equals(read_table(sft_file))


def test_sft_file_reads_with_datasets(sft_file):
    import datasets

    ds = datasets.Dataset.from_parquet(str(sft_file))
    assert list(ds.column_names) == list(COLUMNS) and len(ds) == 100
    assert str(ds.features["created_at"].dtype) == "timestamp[ns]"
    assert ds.features["label_0"].dtype == "float64"
    row = ds[5]
    assert isinstance(row["jpg_0"], bytes)
    Image.open(io.BytesIO(row["jpg_0"])).convert("RGB").load()


def test_rows_ties_winner_first_and_schema_errors(tmp_path):
    p = all_prompts()[0]
    a, b = encode_png(render(p, 1)), encode_png(render(p, 2))
    rows = [
        Row(p.text, a, b, 1.0, 0.0, "u-a", "u-b", "m@cfg1", "m@cfg3"),
        Row(p.text, b, a, 0.0, 1.0, "u-b", "u-a", "m@cfg3", "m@cfg1"),
        Row(p.text, a, b, 0.5, 0.5, "u-a", "u-b", "m@cfg1", "m@cfg1"),
    ]
    f = write_parquet(rows, tmp_path / "x.parquet")
    assert_published_schema(f)
    t = read_table(f).to_pylist()
    assert [r["best_image_uid"] for r in t] == ["u-a", "u-a", "none"]
    assert [r["has_label"] for r in t] == [True, True, False]
    assert [r["are_different"] for r in t] == [True, True, False]
    pairs = list(iter_pairs(f))  # ties dropped, winner first
    assert len(pairs) == 2 and all(q.winner_uid == "u-a" for q in pairs)
    assert torch.equal(pairs[1].winner, decode_image(a))
    assert len(list(iter_pairs(f, drop_ties=False))) == 3
    with pytest.raises(ValueError, match="labels"):
        rows_to_table([Row(p.text, a, b, 1.0, 1.0, "x", "y", "m", "m")])
    bad = read_table(f).drop(["user_id"])
    with pytest.raises(ValueError, match="columns"):
        check_schema(bad)
    recast = read_table(f).set_column(11, "label_0", pa.array([1, 0, 0], pa.int64()))
    with pytest.raises(ValueError, match="label_0"):
        check_schema(recast)
