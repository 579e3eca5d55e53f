"""The windowed pair order (snpo.data.locality): a permutation of the same pairs per rank as the
global order, ranks on (nearly) disjoint row groups, windows of K row groups read once per
worker with a K-entry cache, a pure function of the micro-step; and sources that expose their
row groups without reading image bytes at start-up."""

from __future__ import annotations

from types import SimpleNamespace

import numpy as np
import pytest
import torch

from benchmarks.data_order import CountingFile
from snpo.config import ConfigError, TrainConfig, validate
from snpo.data import PairDataset, PairOrder, image_bytes, make_loader, write_pickapic_parquet
from snpo.data import sources as S
from snpo.data.locality import RowGroupCache, windowed_epoch
from snpo.data.order import order_options


def _groups(sizes: list[int]) -> np.ndarray:
    return np.repeat(np.arange(len(sizes)), sizes)


def _uneven(seed: int = 0, count: int = 23) -> np.ndarray:
    rng = np.random.default_rng(seed)
    return _groups(rng.integers(1, 9, size=count).tolist())


@pytest.mark.parametrize("world", [1, 2, 3])
@pytest.mark.parametrize("window", [1, 3, 100])
def test_each_epoch_is_a_partition_with_the_global_counts(world, window):
    groups = _uneven()
    n = len(groups)
    for epoch in range(3):
        mine = [
            windowed_epoch(groups, seed=5, epoch=epoch, rank=r, world=world, window=window)
            for r in range(world)
        ]
        assert all(len(m) == n // world for m in mine)  # as the global order
        flat = np.concatenate(mine)
        assert len(set(flat.tolist())) == len(flat)  # no pair twice in an epoch
        assert flat.min() >= 0 and flat.max() < n
        # ranks share at most the world - 1 row groups straddling their slice boundaries
        sets = [set(groups[m].tolist()) for m in mine]
        shared = {g for i in range(world) for j in range(i + 1, world) for g in sets[i] & sets[j]}
        assert len(shared) <= world - 1


def test_equal_groups_that_divide_the_ranks_are_not_shared():
    groups = _groups([5] * 12)  # 60 pairs, 2 ranks of 30 = 6 whole groups each
    for epoch in range(4):
        a, b = (
            windowed_epoch(groups, seed=1, epoch=epoch, rank=r, world=2, window=2) for r in (0, 1)
        )
        assert not set(groups[a].tolist()) & set(groups[b].tolist())


def test_windows_hold_at_most_k_row_groups_and_shuffle_inside():
    groups = _groups([10] * 20)
    k = 4
    order = windowed_epoch(groups, seed=3, epoch=0, rank=0, world=1, window=k)
    g = groups[order]
    # window w = the pairs of k consecutive groups: 40 pairs drawn from exactly k groups
    for w in range(5):
        assert len(set(g[w * 40 : (w + 1) * 40].tolist())) == k
    # shuffled inside: not the file order, not group by group
    assert not np.array_equal(order, np.sort(order))
    assert (np.diff(g) != 0).sum() > 20 - 1
    # the row groups themselves are permuted across the epoch
    first = [int(g[w * 40]) for w in range(5)]
    assert (
        sorted(first) != first
        or windowed_epoch(groups, seed=3, epoch=1, rank=0, world=1, window=k).tolist()
        != order.tolist()
    )


def test_deterministic_by_seed_and_epoch():
    groups = _uneven(1)
    a = windowed_epoch(groups, seed=7, epoch=2, rank=1, world=2, window=3)
    assert np.array_equal(a, windowed_epoch(groups, seed=7, epoch=2, rank=1, world=2, window=3))
    assert not np.array_equal(a, windowed_epoch(groups, seed=7, epoch=3, rank=1, world=2, window=3))
    assert not np.array_equal(a, windowed_epoch(groups, seed=8, epoch=2, rank=1, world=2, window=3))


def test_pair_order_resumes_at_any_micro_step():
    groups = _uneven(2, 30)
    kw = dict(seed=4, rank=1, world=2, micro=3, groups=groups, window=2)
    full = PairOrder(len(groups), **kw)
    assert full.kind == "windowed"
    seq = [full.batch(g) for g in range(3 * full.batches_per_epoch + 2)]
    for g in (0, 1, full.batches_per_epoch, 2 * full.batches_per_epoch + 1):
        fresh = PairOrder(len(groups), **kw)
        assert fresh.batch(g) == seq[g]
    glob = PairOrder(len(groups), seed=4, rank=1, world=2, micro=3)
    assert glob.batches_per_epoch == full.batches_per_epoch  # same epoch arithmetic


def test_singleton_groups_give_the_global_order():
    n = 17
    a = PairOrder(n, seed=2, rank=0, world=2, micro=2, groups=np.arange(n), window=8)
    b = PairOrder(n, seed=2, rank=0, world=2, micro=2)
    assert a.kind == "global"
    assert [a.batch(g) for g in range(10)] == [b.batch(g) for g in range(10)]


def test_a_k_entry_cache_reads_each_row_group_once_per_worker():
    groups = _uneven(3, 40)
    k, workers, micro = 3, 2, 2
    order = PairOrder(len(groups), seed=0, rank=0, world=1, micro=micro, groups=groups, window=k)
    for epoch in range(2):
        caches = [RowGroupCache(k) for _ in range(workers)]
        touched = [set() for _ in range(workers)]
        for b in range(order.batches_per_epoch):  # DataLoader: batch b → worker b mod workers
            w = b % workers
            for _, i in order.batch(epoch * order.batches_per_epoch + b):
                caches[w].get(int(groups[i]), lambda: object())
                touched[w].add(int(groups[i]))
                assert len(caches[w]) <= k
        assert [c.reads for c in caches] == [len(t) for t in touched]


def test_row_group_cache_is_bounded_and_least_recent_first():
    c = RowGroupCache(2)
    for key in (1, 2, 1, 3, 1, 2):
        c.get(key, lambda key=key: key)
        assert len(c) <= 2
    assert c.reads == 4  # 1, 2, 3 (evicts 2), 2 (evicts 3)
    with pytest.raises(ValueError):
        RowGroupCache(0)


# ------------------------------------------------------------------------------------------
# sources: row-group layout, the bounded cache, bytes read at start-up
def _rows(n: int, *, tie_every: int = 0, image_size: int = 0, seed: int = 0) -> list[dict]:
    rng = np.random.default_rng(seed)
    out = []
    for i in range(n):
        img = image_bytes((i % 256, 9, 9), (8, 8))
        if image_size:  # incompressible and distinct (no dictionary encoding)
            img = rng.integers(0, 256, size=image_size, dtype=np.uint8).tobytes()
        tie = tie_every and i % tie_every == tie_every - 1
        out.append(
            {
                "caption": f"p{i}",
                "jpg_0": img,
                "jpg_1": img,
                "label_0": 0.5 if tie else float(rng.integers(0, 2)),
            }
        )
    return out


def _files(tmp_path, counts, **kw) -> list[str]:
    return [
        str(write_pickapic_parquet(tmp_path / f"f{j}.parquet", _rows(c, seed=j, **kw), 5))
        for j, c in enumerate(counts)
    ]


def test_parquet_source_exposes_its_row_groups(tmp_path):
    files = _files(tmp_path, [12, 7], tie_every=4)  # row groups of 5: 3 + 2 groups
    src = S.PickapicParquet(files)
    g = src.row_groups()
    assert len(g) == len(src) == src.stats.kept
    for i in range(len(src)):  # file f's row r is in global group base(f) + r // 5
        fid, row = int(src.file_ids[i]), int(src.rows[i])
        assert g[i] == (0 if fid == 0 else 3) + row // 5
    assert len(np.unique(g)) == 5
    capped = S.PickapicParquet(files, max_pairs=4)
    assert np.array_equal(capped.row_groups(), g[:4])


def test_source_cache_is_bounded_by_k_through_open_source(tmp_path):
    files = _files(tmp_path, [20, 20])
    cfg = SimpleNamespace(
        train_data=files,
        data_format="auto",
        data_split="train",
        max_train_pairs=None,
        data_order="windowed",
        data_window_row_groups=3,
    )
    src = S.open_source(cfg)
    pq_src = src.sources[0]
    assert pq_src.cache.capacity == 3
    order = PairOrder(len(src), seed=0, rank=0, world=1, micro=2, **order_options(cfg, src))
    assert order.kind == "windowed"
    for g in range(order.batches_per_epoch):
        for _, i in order.batch(g):
            src.get(i)
            assert len(pq_src.cache) <= 3
    assert pq_src.cache.reads == 8  # 8 row groups of 5, each read once
    cfg.data_order = "global"
    assert S.open_source(cfg).sources[0].cache.capacity == 1
    assert order_options(cfg, src) == {}


def test_mixed_sources_and_max_train_pairs(tmp_path):
    import json

    files = _files(tmp_path, [10], tie_every=3)
    img = tmp_path / "a.png"
    img.write_bytes(image_bytes((1, 2, 3), (8, 8)))
    own = tmp_path / "own.jsonl"
    own.write_text(
        "".join(
            json.dumps({"winner": "a.png", "loser": "a.png", "prompt": f"o{i}"}) + "\n"
            for i in range(4)
        )
    )
    src = S.ConcatSource([S.PickapicParquet(files), S.OwnPairs(str(own))])
    g = src.row_groups()
    assert len(g) == len(src) == 7 + 4
    assert len(np.unique(g[7:])) == 4 and not set(g[7:]) & set(g[:7])  # own pairs: one each
    src.cap(9)
    assert len(src.row_groups()) == 9
    order = PairOrder(9, seed=1, rank=0, world=1, micro=3, groups=src.row_groups(), window=2)
    seen = [i for b in range(order.batches_per_epoch) for _, i in order.batch(b)]
    assert sorted(seen) == list(range(9))


def test_bad_pairs_are_skipped_in_the_windowed_loader(tmp_path):
    rows = _rows(10)
    rows[3]["jpg_1"] = image_bytes((5, 5, 5), (8, 8), fmt="JPEG")[:40]  # truncated
    files = [str(write_pickapic_parquet(tmp_path / "b.parquet", rows, 4))]
    src = S.ConcatSource([S.PickapicParquet(files, row_group_cache=2)])
    order = PairOrder(len(src), seed=0, rank=0, world=1, micro=5, groups=src.row_groups(), window=2)
    ds = PairDataset(src, resolution=8, seed=0)
    batches = list(make_loader(ds, order, start=0, stop=2, num_workers=0))
    bad = [i for b in batches for i, _ in b.bad]
    assert bad == [3]
    assert sum(len(b) for b in batches) == 9


def test_opening_a_source_reads_no_image_bytes(tmp_path, monkeypatch):
    import pyarrow.parquet as pq

    size = 150_000
    files = [
        str(write_pickapic_parquet(tmp_path / f"h{j}.parquet", _rows(20, image_size=size), 10))
        for j in range(3)
    ]
    total = sum((tmp_path / f"h{j}.parquet").stat().st_size for j in range(3))
    assert total > 3 * 20 * 2 * size  # the image columns are the files
    # allowed: per file, pyarrow's 64 KiB tail read (the footer with whatever precedes it),
    # the footer itself, and the label columns' chunks
    allowed = 0
    for f in files:
        md = pq.ParquetFile(f).metadata
        allowed += 64 * 1024 + md.serialized_size
        for g in range(md.num_row_groups):
            for c in range(md.num_columns):
                col = md.row_group(g).column(c)
                if col.path_in_schema in ("label_0", "has_label"):
                    allowed += col.total_compressed_size
    read = [0]
    monkeypatch.setattr(
        S, "open_parquet", lambda p, **kw: pq.ParquetFile(CountingFile(p, read), **kw)
    )
    src = S.PickapicParquet(files)
    assert len(src) > 0
    assert read[0] <= allowed < 3 * 2 * size  # not even one image a file
    src.get(0)  # reading a pair reads its row group: 10 rows × 2 images
    assert read[0] > 10 * 2 * size


def test_config_window_validation():
    cfg = TrainConfig(model="m", train_data=["x.parquet"], data_window_row_groups=0)
    with pytest.raises(ConfigError, match="data_window_row_groups"):
        validate(cfg, check_files=False)
    assert TrainConfig().data_order == "global"
    assert torch.is_tensor(PairOrder(4, seed=0, rank=0, world=1, micro=1).epoch_pairs(0))
