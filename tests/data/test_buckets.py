"""Aspect-ratio buckets: the bucket math, the shared crop of a pair, SDXL time ids as diffusers
computes them, the bucketed order (one bucket per micro-batch, disjoint ranks, world-size
re-basing), the option's validation and the `snpo data stats` histogram."""

from __future__ import annotations

import itertools
import json
import math
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from snpo.config import NON_TRAJECTORY_FIELDS, ConfigError, TrainConfig, load_config
from snpo.data import PairDataset, PairOrder, image_bytes
from snpo.data.buckets import (
    Bucket,
    auto_buckets,
    bucket_step,
    check_buckets,
    cover_size,
    crop_box,
    denoiser_multiple,
    nearest_bucket,
    pair_bucket_ids,
    pair_log_aspect,
    parse_buckets,
    resolve_buckets,
)
from snpo.data.errors import DataError
from snpo.data.order import bucket_chunks
from snpo.data.stats import data_stats, main, render
from snpo.data.transform import transform_to_bucket
from snpo.step import time_id_rows
from snpo.trainer import rebase_position


# ---- the math -------------------------------------------------------------------------------
def test_auto_buckets_are_kohyas_for_sd15_and_sdxl():
    sd15 = auto_buckets(512, 64)
    # kohya's make_bucket_resolutions(max_reso=(512, 512), min_size=256, max_size=1024)
    want = {(512, 512)}
    for w in range(256, 1025, 64):
        h = min(1024, (512 * 512 // w) // 64 * 64)
        if h >= 256:
            want |= {(w, h), (h, w)}
    assert set(sd15) == want and sd15 == sorted(sd15)
    assert all(b.width * b.height <= 512 * 512 for b in sd15)
    assert {(448, 576), (384, 640), (320, 768), (256, 1024)} <= set(sd15)
    sdxl = set(auto_buckets(1024, 64))
    # the usual SDXL buckets (SDXL paper, appendix I)
    assert {(1024, 1024), (1152, 896), (896, 1152), (1216, 832), (1344, 768), (1536, 640)} <= sdxl
    assert all(b.width % 64 == 0 and b.height % 64 == 0 for b in sdxl)


def test_bucket_step_and_denoiser_multiple():
    assert denoiser_multiple(8, {"down_block_types": ["a"] * 4}) == 64  # SD1.5
    assert denoiser_multiple(8, {"down_block_types": ["a"] * 3}) == 32  # SDXL
    assert denoiser_multiple(8, {"patch_size": 2}) == 16  # SD3
    assert denoiser_multiple(2, {"down_block_types": ["a"] * 2}) == 4  # the tiny test UNet
    assert bucket_step(1024, 32) == 64 and bucket_step(512, 64) == 64 and bucket_step(16, 4) == 4
    assert resolve_buckets("auto", 16, 4) == auto_buckets(16, 4)
    assert all(b.width % 4 == 0 and b.height % 4 == 0 for b in auto_buckets(16, 4))


def test_nearest_bucket_is_the_nearest_log_aspect():
    buckets = auto_buckets(1024, 64)
    i = nearest_bucket(math.log(1920 / 1080), buckets)
    assert buckets[i] == (1344, 768)
    best = min(abs(math.log(b.width / b.height) - math.log(1920 / 1080)) for b in buckets)
    assert abs(math.log(1344 / 768) - math.log(1920 / 1080)) == best
    assert buckets[nearest_bucket(math.log(1080 / 1920), buckets)] == (768, 1344)  # transposed
    assert buckets[nearest_bucket(0.0, buckets)] == (1024, 1024)
    # a pair: the mean log-aspect of its two images; unknown sizes are left out
    assert pair_log_aspect([(200, 100), (100, 100)]) == pytest.approx(math.log(2) / 2)
    assert pair_log_aspect([None, (300, 100)]) == pytest.approx(math.log(3))
    assert pair_log_aspect([None, None]) == 0.0


def test_cover_then_crop_math():
    b = Bucket(768, 512)
    assert cover_size((1000, 500), b) == (1024, 512)  # wider: the height binds
    assert cover_size((500, 1000), b) == (768, 1536)  # taller: the width binds
    assert cover_size((768, 512), b) == (768, 512)
    assert crop_box((1024, 512), b, None) == (0, 128)  # centred: round((1024 - 768) / 2)
    assert crop_box((768, 1536), b, None) == (512, 0)
    assert crop_box((1024, 512), b, [0.0, 0.999]) == (0, 256)  # the last offset
    assert crop_box((1024, 512), b, [0.5, 0.5]) == (0, 128)


def test_parse_and_check_buckets():
    assert parse_buckets("auto") == "auto"
    assert parse_buckets("512x768, 768x512") == [Bucket(512, 768), Bucket(768, 512)]
    assert parse_buckets(["64x64", "64×64"]) == [Bucket(64, 64)]
    for bad in ("square", "512", "0x64", []):
        with pytest.raises(ValueError):
            parse_buckets(bad)
    msg = check_buckets([Bucket(512, 512), Bucket(520, 512)], 64)
    assert msg and "520x512" in msg and "64" in msg and "resolution_buckets" in msg
    assert check_buckets([Bucket(512, 768)], 64) is None
    with pytest.raises(ValueError, match="520x512"):
        resolve_buckets(["520x512"], 512, 64)


# ---- the transform and the dataset ------------------------------------------------------------
def _gradient(w: int, h: int, seed: int) -> Image.Image:
    g = np.random.default_rng(seed)
    return Image.fromarray(g.integers(0, 255, (h, w, 3), dtype=np.uint8), "RGB")


def test_transform_to_bucket_is_resize_to_cover_then_crop():
    im = _gradient(50, 30, 0)
    x, orig, (top, left) = transform_to_bucket(im, (24, 20), flip=False, crop_fraction=None)
    assert x.shape == (3, 20, 24) and orig == (30, 50)
    rw, rh = cover_size((50, 30), Bucket(24, 20))
    assert (rw, rh) == (33, 20) and (top, left) == (0, round((33 - 24) / 2))
    want = im.resize((rw, rh), Image.BILINEAR).crop((left, top, left + 24, top + 20))
    ref = torch.from_numpy(np.asarray(want, dtype=np.uint8).copy()).permute(2, 0, 1)
    assert torch.equal(x, ref.float() / 127.5 - 1.0)
    # flipped: diffusers' SDXL script flips the resized image, then crops at x1 = rw - left - bw
    xf, _, (tf, lf) = transform_to_bucket(im, (24, 20), flip=True, crop_fraction=None)
    assert (tf, lf) == (0, rw - left - 24)
    flipped = im.resize((rw, rh), Image.BILINEAR).transpose(Image.FLIP_LEFT_RIGHT)
    ref = torch.from_numpy(np.asarray(flipped.crop((lf, 0, lf + 24, 20))).copy()).permute(2, 0, 1)
    assert torch.equal(xf, ref.float() / 127.5 - 1.0)


class _Pairs:
    def __init__(self, pairs):
        self.pairs = pairs

    def __len__(self):
        return len(self.pairs)

    def get(self, i):
        return self.pairs[i]

    def describe(self, i):
        return f"pair {i}"


def test_winner_and_loser_share_the_bucket_and_the_crop_box():
    pairs = [
        ("p", image_bytes((200, 0, 0), (40, 24)), image_bytes((0, 0, 200), (40, 24))),
        ("q", image_bytes((0, 200, 0), (20, 36)), image_bytes((0, 0, 200), (20, 36))),
    ]
    src = _Pairs(pairs)
    buckets = auto_buckets(16, 4)
    ids = pair_bucket_ids(src, buckets)
    assert [buckets[i] for i in ids] == [
        buckets[nearest_bucket(math.log(40 / 24), buckets)],
        buckets[nearest_bucket(math.log(20 / 36), buckets)],
    ]
    ds = PairDataset(src, resolution=16, seed=3, random_crop=True, random_flip=False)
    for epoch, i in itertools.product(range(3), range(2)):
        b = tuple(buckets[ids[i]])
        it = ds[(epoch, i, b)]
        assert it["pixels"].shape == (2, 3, b[1], b[0])
        assert torch.equal(it["crop_top_left"][0], it["crop_top_left"][1])  # same box
        assert it["original_size"].tolist() == [[[24, 40]], [[36, 20]]][i] * 2  # (h, w)
    # the square path keeps its per-image draws (bit-identical to before)
    sq = ds[(0, 0)]
    assert sq["pixels"].shape == (2, 3, 16, 16)


def test_sdxl_time_ids_are_what_diffusers_computes():
    """original_size = (image.height, image.width), crops_coords_top_left = (y1, x1) of the
    crop in the resized image, target_size = the bucket (h, w): diffusers'
    train_text_to_image_sdxl.py, and StableDiffusionXLPipeline._get_add_time_ids's layout."""
    from types import SimpleNamespace

    from diffusers import StableDiffusionXLPipeline

    im = _gradient(300, 200, 1)
    bucket = Bucket(24, 16)
    _, orig, crop = transform_to_bucket(im, bucket, flip=False, crop_fraction=[0.3, 0.7])
    rw, rh = cover_size(im.size, bucket)
    # diffusers: resize, then y1, x1 of the crop (here from the same fractions), no flip
    y1 = min(int(0.3 * (rh - 16 + 1)), rh - 16)
    x1 = min(int(0.7 * (rw - 24 + 1)), rw - 24)
    row = time_id_rows(torch.tensor([orig]), torch.tensor([crop]), bucket.hw)
    conf = SimpleNamespace(addition_time_embed_dim=1, projection_class_embeddings_input_dim=7)
    fake = SimpleNamespace(unet=SimpleNamespace(config=conf))
    fake.unet.add_embedding = SimpleNamespace(linear_1=SimpleNamespace(in_features=7))
    want = StableDiffusionXLPipeline._get_add_time_ids(
        fake, (200, 300), (y1, x1), (16, 24), torch.float32, text_encoder_projection_dim=1
    )
    assert row.tolist() == want.tolist() == [[200.0, 300.0, y1, x1, 16.0, 24.0]]
    # the square path: target (R, R), as before
    assert time_id_rows(torch.tensor([[30, 20]]), torch.tensor([[1, 2]]), 16).tolist() == [
        [30.0, 20.0, 1.0, 2.0, 16.0, 16.0]
    ]


# ---- the bucketed order -----------------------------------------------------------------------
def _ids(n=37, k=3, seed=0):
    return np.random.default_rng(seed).integers(0, k, n)


SIZES = [(8, 24), (16, 16), (24, 8)]


def _order(ids, rank, world, micro, seed=5):
    return PairOrder(
        len(ids), seed=seed, rank=rank, world=world, micro=micro, buckets=ids, bucket_sizes=SIZES
    )


@pytest.mark.parametrize(("world", "micro"), [(1, 2), (2, 2), (2, 3), (3, 1)])
def test_bucketed_batches_are_single_bucket_and_disjoint_across_ranks(world, micro):
    ids = _ids()
    orders = [_order(ids, r, world, micro) for r in range(world)]
    bpe = orders[0].batches_per_epoch
    counts = np.bincount(ids)
    assert bpe == int((counts // micro).sum()) // world
    for epoch in range(2):
        seen = []
        for g in range(epoch * bpe, (epoch + 1) * bpe):
            for o in orders:
                batch = o.batch(g)
                idx = [i for _, i in batch]
                assert len(idx) == micro and {e for e, _ in batch} == {epoch}
                assert len({int(ids[i]) for i in idx}) == 1  # one bucket
                keys = o.keys(g)
                assert {k[2] for k in keys} == {SIZES[int(ids[idx[0]])]} == {o.size(g)}
                seen += idx
        assert len(seen) == len(set(seen)) == bpe * micro * world  # disjoint, nothing twice
        # epoch_pairs is the concatenation of a rank's micro-batches
        for o in orders:
            mine = [i for g in range(epoch * bpe, (epoch + 1) * bpe) for _, i in o.batch(g)]
            assert o.epoch_pairs(epoch).tolist() == mine
    # a pure function of (seed, epoch, micro-step): a fresh order gives the same batches
    again = _order(ids, 0, world, micro)
    assert [again.batch(g) for g in range(2 * bpe)] == [orders[0].batch(g) for g in range(2 * bpe)]
    # leftovers change with the epoch (the bucket permutations do)
    a, b = (set(bucket_chunks(ids, seed=5, epoch=e, micro=micro).ravel()) for e in (0, 1))
    assert a != b or micro == 1


def test_bucketed_order_is_world_independent_and_rebases():
    ids = _ids(40)
    micro = 2
    for old, new, done in itertools.product([1, 2, 3], [1, 2, 4], [0, 1, 3]):
        first = [
            p for r in range(old) for g in range(done) for p in _order(ids, r, old, micro).batch(g)
        ]
        epoch, batch = _order(ids, 0, old, micro).position(done)
        bpe = _order(ids, 0, new, micro).batches_per_epoch
        g, ep, skipped = rebase_position(
            epoch, batch, micro=micro, old_world=old, new_world=new, batches_per_epoch=bpe
        )
        after = [
            p
            for r in range(new)
            for h in range(g, g + 2)
            for p in _order(ids, r, new, micro).batch(h)
        ]
        assert not set(first) & set(after), (old, new, done)
        if ep == epoch and skipped == 0:  # the same micro-batch sequence continues
            seq = bucket_chunks(ids, seed=5, epoch=epoch, micro=micro)
            k = len(first) // micro
            assert [i for _, i in after][:micro] == seq[k].tolist()


def test_too_few_pairs_for_the_buckets_is_a_clear_error():
    ids = np.array([0, 1, 2, 0])
    with pytest.raises(DataError, match="resolution_buckets"):
        _order(ids, 0, 2, 2)  # one micro-batch of bucket 0, for two processes


def test_default_order_unchanged_by_the_keys():
    o = PairOrder(20, seed=1, rank=1, world=2, micro=3)
    assert o.kind == "global" and all(o.keys(g) == o.batch(g) for g in range(6))
    assert o.size(0) is None


# ---- the option -------------------------------------------------------------------------------
def _cfg(tmp_path, tiny_sd, pairs_file, **kw):
    over = {"model": str(tiny_sd), "train_data": [str(pairs_file)], "resolution": 16, **kw}
    return load_config(None, over)


@pytest.fixture()
def pairs_file(tmp_path) -> Path:
    (tmp_path / "w.png").write_bytes(image_bytes((200, 0, 0), (24, 16)))
    (tmp_path / "l.png").write_bytes(image_bytes((0, 0, 200), (24, 16)))
    p = tmp_path / "pairs.jsonl"
    p.write_text(json.dumps({"winner": "w.png", "loser": "l.png", "prompt": "a"}) + "\n")
    return p


def test_resolution_buckets_option(tmp_path, tiny_sd, pairs_file):
    assert "resolution_buckets" not in NON_TRAJECTORY_FIELDS  # a trajectory option
    assert TrainConfig().resolution_buckets is None
    assert (
        _cfg(tmp_path, tiny_sd, pairs_file, resolution_buckets="auto").resolution_buckets == "auto"
    )
    c = _cfg(tmp_path, tiny_sd, pairs_file, resolution_buckets=["16x24", "24x16"])
    assert c.resolution_buckets == ["16x24", "24x16"]
    from snpo.config import parse_overrides

    _, over = parse_overrides(["--resolution_buckets", "16x24,24x16"])
    assert parse_buckets(over["resolution_buckets"]) == [Bucket(16, 24), Bucket(24, 16)]
    bad = [
        ({"resolution_buckets": "square"}, "resolution_buckets"),
        ({"resolution_buckets": ["17x16"]}, "17x16"),  # the tiny VAE's factor is 2
        ({"resolution_buckets": "auto", "data_order": "windowed"}, "windowed"),
    ]
    for kw, word in bad:
        with pytest.raises(ConfigError, match="resolution_buckets") as err:
            _cfg(tmp_path, tiny_sd, pairs_file, **kw)
        assert word in str(err.value)
    ok = _cfg(
        tmp_path,
        tiny_sd,
        pairs_file,
        resolution_buckets="auto",
        cache_dir=str(tmp_path / "c"),
        cache_use=["text"],
    )
    assert ok.cache_use == ["text"]
    for use in (None, ["latents", "text", "ref"]):  # a bucketed cache serves a bucketed run
        c = _cfg(
            tmp_path,
            tiny_sd,
            pairs_file,
            resolution_buckets="auto",
            cache_dir=str(tmp_path / "c"),
            cache_use=use,
        )
        assert c.cache_use == use
    # resuming an older checkpoint (no such option recorded) with the default is unchanged
    from snpo.trainer.checkpoint_io import trajectory_change

    cfg = _cfg(tmp_path, tiny_sd, pairs_file)
    old = {k: v for k, v in cfg.trajectory_dict().items() if k != "resolution_buckets"}
    assert trajectory_change({"snpo_trajectory": old}, cfg) == []
    on = _cfg(tmp_path, tiny_sd, pairs_file, resolution_buckets="auto")
    assert trajectory_change({"snpo_trajectory": old}, on) == ["resolution_buckets"]


def test_data_stats_bucket_histogram(tmp_path, capsys):
    recs = []
    for i, (w, h) in enumerate([(24, 16), (24, 16), (16, 24), (16, 16), (40, 12)]):
        (tmp_path / f"{i}w.png").write_bytes(image_bytes((200, 0, 0), (w, h)))
        (tmp_path / f"{i}l.png").write_bytes(image_bytes((0, 0, 200), (w, h)))
        recs.append({"winner": f"{i}w.png", "loser": f"{i}l.png", "prompt": "a"})
    p = tmp_path / "pairs.jsonl"
    p.write_text("\n".join(json.dumps(r) for r in recs) + "\n")
    buckets = auto_buckets(16, 4)
    _, total = data_stats([str(p)], progress=False, buckets=buckets)
    want: dict[str, int] = {}
    for w, h in [(24, 16), (24, 16), (16, 24), (16, 16), (40, 12)]:
        k = str(buckets[nearest_bucket(math.log(w / h), buckets)])
        want[k] = want.get(k, 0) + 1
    assert dict(total.buckets) == want and sum(want.values()) == 5
    assert "resolution buckets" in render([], total)
    assert main([str(p), "--buckets", "auto", "--resolution", "16", "--no-progress"]) == 0
    out = capsys.readouterr().out
    assert "resolution buckets (w×h: usable pairs)" in out and "16x16: 1" in out
    assert main([str(p), "--buckets", "15x9", "--no-progress"]) == 0  # listed: taken as given
    assert main([str(p), "--buckets", "wide", "--no-progress"]) == 2


def test_cache_build_keys_on_the_buckets(tmp_path, tiny_sd, pairs_file, capsys):
    from snpo.cache import load_manifest
    from snpo.cache.cli import main as cache_main

    args = ["--model", str(tiny_sd), "--train_data", str(pairs_file), "--resolution", "16"]
    args += ["--resolution_buckets", "auto", "--out", str(tmp_path / "cache"), "--quiet"]
    assert cache_main([*args, "--what", "latents,text,ref", "--epochs", "1"]) == 0
    secs = load_manifest(tmp_path / "cache")["sections"]
    for name in ("latents", "ref"):
        fp = secs[name]["fingerprint"]["resolution_buckets"]
        assert fp["setting"] == "auto" and fp["assignment"].startswith("sha256:")
        assert secs[name]["layout"]["buckets"] == fp["sizes"]
    assert "resolution_buckets" not in secs["text"]["fingerprint"]
