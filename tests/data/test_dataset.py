"""Pick-a-Pic parquet and own pairs through the dataset: ties dropped, winner first,
transforms, bad images, the loader."""

from __future__ import annotations

import json
import types
import warnings

import pyarrow.parquet as pq
import pytest
import torch

from snpo.data import (
    PICKAPIC_COLUMNS,
    BadImageError,
    OwnPairs,
    PairDataset,
    PairOrder,
    PickapicParquet,
    collate_pairs,
    image_bytes,
    make_loader,
    open_source,
)
from snpo.draws import augment_draws
from tests.trainer.conftest import BLUE, GREEN, RED


def _ds(src, **kw):
    kw.setdefault("resolution", 16)
    kw.setdefault("seed", 0)
    kw.setdefault("random_flip", False)
    return PairDataset(src, **kw)


def _colour(x: torch.Tensor) -> tuple[int, int]:
    """Mean (R, G) of a (3, H, W) image in [-1, 1], as 0..255 integers."""
    v = ((x[:2].mean(dim=(1, 2)) + 1) * 127.5).round().int().tolist()
    return v[0], v[1]


def test_fixture_has_the_published_schema(pickapic):
    assert pq.ParquetFile(pickapic).schema_arrow.names == list(PICKAPIC_COLUMNS)
    assert pq.ParquetFile(pickapic).metadata.num_row_groups > 1  # row-group reads exercised


def test_ties_dropped_and_loser_first_swapped(pickapic):
    src = PickapicParquet([str(pickapic)])
    assert src.stats.rows == 16 and src.stats.ties_dropped == 1 and len(src) == 15
    assert src.rows.tolist()[:3] == [0, 1, 3]  # row 2 (the tie) is gone
    assert src.stats.swapped == 1 + 5  # row 1 plus the odd extra rows
    ds = _ds(src)
    first, second = ds[(0, 0)], ds[(0, 1)]
    assert first["prompt"] == "a photo of a red cube" and first["pixels"].shape == (2, 3, 16, 16)
    assert abs(_colour(first["pixels"][0])[0] - RED[0]) < 8  # winner (red) first
    # row 1 was stored loser first (label_0 = 0): the green winner must come first now
    assert abs(_colour(second["pixels"][0])[1] - GREEN[1]) < 8
    assert abs(_colour(second["pixels"][1])[0] - RED[0]) < 8


def test_grayscale_cmyk_nonsquare_and_sizes(pickapic):
    ds = _ds(PickapicParquet([str(pickapic)]))
    item = ds[(0, 3)]  # file row 4: grayscale 30x18 winner, CMYK 18x30 loser
    assert item["bad"] is None and item["pixels"].shape == (2, 3, 16, 16)
    assert item["original_size"].tolist() == [[18, 30], [30, 18]]  # (h, w)
    g = item["pixels"][0]
    assert torch.allclose(g[0], g[1]) and torch.allclose(g[1], g[2])  # gray → equal channels
    top, left = item["crop_top_left"].tolist()[0]
    assert top == 0 and left == round((int(16 * 30 / 18) - 16) / 2)  # center crop of 26x16


def test_truncated_jpeg_skip_counts_and_fail_names_the_row(pickapic, tmp_path):
    src = PickapicParquet([str(pickapic)])
    bad = _ds(src)[(0, 2)]  # file row 3: truncated JPEG loser
    assert bad["bad"] is not None and "row 3" in bad["bad"] and "loser image" in bad["bad"]
    batch = collate_pairs([_ds(src)[(0, 0)], bad, _ds(src)[(0, 1)]])
    assert len(batch) == 2 and batch.indices.tolist() == [0, 1] and len(batch.bad) == 1
    empty = collate_pairs([bad])
    assert len(empty) == 0 and len(empty.bad) == 1
    with pytest.raises(BadImageError, match=r"row 3 of .*train-0\.parquet.*on_bad_image: fail"):
        _ds(src, on_bad_image="fail")[(0, 2)]


def test_flips_and_crops_follow_the_draws_independently_per_image(pickapic):
    src = PickapicParquet([str(pickapic)])
    idx = next(i for i in range(200) if bool(augment_draws(0, 0, i).flip[0]))
    idx = idx % len(src)
    plain = _ds(src)[(0, idx)]
    flipped = _ds(src, random_flip=True)
    for epoch in range(6):
        a = augment_draws(0, epoch, idx)
        item = flipped[(epoch, idx)]
        for j in range(2):
            want = plain["pixels"][j].flip(-1) if bool(a.flip[j]) else plain["pixels"][j]
            assert torch.equal(item["pixels"][j], want)
    flips = torch.stack([augment_draws(0, e, i).flip for e in range(4) for i in range(50)])
    assert (flips[:, 0] != flips[:, 1]).any()  # winner and loser flip independently
    rc = _ds(src, random_crop=True)
    crops = {tuple(rc[(e, 3)]["crop_top_left"][0].tolist()) for e in range(12)}
    assert len(crops) > 1


def test_own_pairs_jsonl_and_csv(tmp_path):
    (tmp_path / "img").mkdir()
    for name, col in (("w.png", RED), ("l.png", BLUE)):
        (tmp_path / "img" / name).write_bytes(image_bytes(col, (20, 24)))
    recs = [
        {"winner": "img/w.png", "loser": "img/l.png", "prompt": "a red cube"},
        {"winner": "img/missing.png", "loser": "img/l.png", "prompt": "a blue cube"},
    ]
    f = tmp_path / "pairs.jsonl"
    f.write_text("\n".join(json.dumps(r) for r in recs))
    c = tmp_path / "pairs.csv"
    c.write_text("winner,loser,prompt\nimg/w.png,img/l.png,a red cube\n")
    for path in (f, c):
        ds = _ds(OwnPairs(str(path)))
        item = ds[(0, 0)]
        assert item["prompt"] == "a red cube" and abs(_colour(item["pixels"][0])[0] - RED[0]) < 8
    missing = _ds(OwnPairs(str(f)))[(0, 1)]
    assert "missing" in missing["bad"] and "winner" in missing["bad"]
    cfg = types.SimpleNamespace(
        train_data=[str(f), str(c)], data_format="auto", data_split="train", max_train_pairs=None
    )
    assert len(open_source(cfg)) == 3


def test_loader_with_workers_matches_in_process(pickapic):
    src = PickapicParquet([str(pickapic)])
    ds = _ds(src, random_flip=True, random_crop=True)
    order = PairOrder(len(src), seed=0, rank=0, world=1, micro=4)
    a = list(make_loader(ds, order, start=1, stop=4, num_workers=0))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        b = list(make_loader(ds, order, start=1, stop=4, num_workers=1))
    for x, y in zip(a, b):
        assert x.indices.tolist() == y.indices.tolist() and torch.equal(x.pixels, y.pixels)
        assert [i for i, _ in x.bad] == [i for i, _ in y.bad]
    for x, g in zip(a, (1, 2, 3)):
        got = sorted(x.indices.tolist() + [i for i, _ in x.bad])
        assert got == sorted(i for _, i in order.batch(g))


def test_the_one_max_pairs_cap_cuts_across_sources():
    """ConcatSource.cap: the first n pairs of the whole, whichever source they are in; None
    or a larger n keeps everything (training's max_train_pairs and eval's --max-pairs)."""
    from snpo.data import ConcatSource, SourceStats

    class Src:
        def __init__(self, n, tag):
            self.n, self.tag = n, tag
            self.stats = SourceStats(rows=n, kept=n)

        def __len__(self):
            return self.n

        def get(self, i):
            return (self.tag, i)

    def whole():
        return ConcatSource([Src(3, "a"), Src(4, "b")])

    capped = whole().cap(5)
    assert len(capped) == 5 and capped.get(4) == ("b", 1) and capped.stats.kept == 5
    assert len(whole().cap(None)) == 7 and len(whole().cap(99)) == 7
    assert len(whole().cap(2)) == 2 and whole().cap(2).get(1) == ("a", 1)
