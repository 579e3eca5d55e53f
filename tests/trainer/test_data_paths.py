"""Image paths stay inside their data file's folder (own pairs, dataset rows) unless
allow_outside_paths; images over the decoded-pixel cap (decompression bombs) are bad images."""

from __future__ import annotations

import json
import struct
import types
import zlib
from pathlib import Path

import pytest

import snpo.images
from snpo.config import ConfigError, TrainConfig, load_config, validate
from snpo.data import (
    BadImageError,
    DataError,
    HubPairs,
    OwnPairs,
    PairDataset,
    PathOutsideError,
    collate_pairs,
    decode_image,
    image_bytes,
    open_source,
)

from .conftest import BLUE, GREEN, RED, write_config


def _ds(src, **kw):
    return PairDataset(src, resolution=16, seed=0, random_flip=False, **kw)


@pytest.fixture()
def tree(tmp_path) -> Path:
    """tmp/outside.png, tmp/set/img/{w,l}.png, tmp/set/img/link.png → ../../outside.png."""
    (tmp_path / "set" / "img").mkdir(parents=True)
    (tmp_path / "outside.png").write_bytes(image_bytes(GREEN, (20, 24)))
    (tmp_path / "set" / "img" / "w.png").write_bytes(image_bytes(RED, (20, 24)))
    (tmp_path / "set" / "img" / "l.png").write_bytes(image_bytes(BLUE, (20, 24)))
    (tmp_path / "set" / "img" / "link.png").symlink_to("../../outside.png")
    return tmp_path


def _jsonl(path: Path, rows: list[tuple[str, str]]) -> Path:
    recs = [{"winner": w, "loser": lo, "prompt": f"p{i}"} for i, (w, lo) in enumerate(rows)]
    path.write_text("\n".join(json.dumps(r) for r in recs) + "\n")
    return path


@pytest.mark.parametrize(
    "bad, why",
    [
        ("../outside.png", "outside"),
        ("img/../../outside.png", "outside"),
        ("img/link.png", "outside"),  # a symlink out of the folder
        ("ABS", "absolute"),
    ],
)
def test_own_pairs_refuse_paths_leaving_their_folder(tree, bad, why):
    bad = str(tree / "outside.png") if bad == "ABS" else bad
    f = _jsonl(tree / "set" / "pairs.jsonl", [("img/w.png", "img/l.png"), ("img/w.png", bad)])
    with pytest.raises(PathOutsideError, match="allow_outside_paths") as info:
        OwnPairs(str(f))
    msg = str(info.value)
    assert "record 1" in msg and "pairs.jsonl:2" in msg and "loser" in msg
    assert repr(bad) in msg and why in msg
    # allowed: the outside (green) image is read
    src = OwnPairs(str(f), allow_outside_paths=True)
    item = _ds(src)[(0, 1)]
    assert item["bad"] is None
    g = ((item["pixels"][1][1].mean() + 1) * 127.5).item()
    assert abs(g - GREEN[1]) < 8
    # through open_source: the config option decides
    cfg = types.SimpleNamespace(
        train_data=[str(f)], data_format="auto", data_split="train", max_train_pairs=None
    )
    with pytest.raises(PathOutsideError):
        open_source(cfg)
    cfg.allow_outside_paths = True
    assert len(open_source(cfg)) == 2


def test_own_pairs_resolve_against_the_file_not_the_cwd(tree, monkeypatch):
    c = tree / "set" / "pairs.csv"
    c.write_text("winner,loser,prompt\nimg/w.png,img/l.png,a\nimg/w.png,../outside.png,b\n")
    with pytest.raises(PathOutsideError, match=r"record 1 \(.*pairs\.csv:3\) loser"):
        OwnPairs(str(c))
    c.write_text("winner,loser,prompt\nimg/w.png,img/l.png,a\n")
    monkeypatch.chdir(tree)  # a relative JSONL path, a cwd elsewhere
    src = OwnPairs("set/pairs.csv")
    assert src.records[0][1] == (tree / "set" / "img" / "w.png").resolve()
    assert _ds(src)[(0, 0)]["bad"] is None
    j = tree / "set" / "x.jsonl"
    j.write_text(json.dumps({"winner": None, "loser": "img/l.png", "prompt": "a"}) + "\n")
    with pytest.raises(DataError, match="non-empty string"):
        OwnPairs(str(j))


def test_config_option_allow_outside_paths(tmp_path, tiny_sd, pickapic):
    assert TrainConfig().allow_outside_paths is False
    f = write_config(tmp_path / "c.yaml", model=tiny_sd, train_data=pickapic)
    assert load_config(f, ["--allow_outside_paths", "true"]).allow_outside_paths is True
    with pytest.raises(ConfigError, match="allow_outside_paths"):
        load_config(f, {"allow_outside_paths": "sure"})
    cfg = load_config(f)
    cfg.allow_outside_paths = "yes"
    with pytest.raises(ConfigError, match="allow_outside_paths"):
        validate(cfg, check_files=False)


def _fake_hub(monkeypatch, rows: dict, image_feature: bool = True) -> None:
    import datasets

    feats = datasets.Features(
        {
            "caption": datasets.Value("string"),
            "jpg_0": datasets.Image() if image_feature else datasets.Value("string"),
            "jpg_1": datasets.Image() if image_feature else datasets.Value("string"),
            "label_0": datasets.Value("float64"),
        }
    )
    ds = datasets.Dataset.from_dict(rows, features=feats)
    monkeypatch.setattr(datasets, "load_dataset", lambda name, split: ds)


@pytest.mark.parametrize("image_feature", [True, False])
def test_hub_rows_naming_local_files_are_refused(tree, monkeypatch, image_feature):
    out = str(tree / "outside.png")
    w = image_bytes(RED, (20, 24))
    rows = {
        "caption": ["embedded", "a path"],
        "jpg_0": [{"bytes": w, "path": None}, out] if image_feature else [out, out],
        "jpg_1": [{"bytes": w, "path": None}, out] if image_feature else [out, out],
        "label_0": [1.0, 1.0],
    }
    if not image_feature:
        rows["caption"] = ["a path", "a path"]
    _fake_hub(monkeypatch, rows, image_feature)
    src = HubPairs("owner/pairs", "train")
    if image_feature:
        assert _ds(src)[(0, 0)]["bad"] is None  # bytes in the row: fine
    with pytest.raises(PathOutsideError, match=r"row 1 of owner/pairs.*outside\.png"):
        _ds(src)[(0, 1)]
    assert _ds(HubPairs("owner/pairs", "train", allow_outside_paths=True))[(0, 1)]["bad"] is None


def test_local_dataset_folder_keeps_its_paths_inside(tree, monkeypatch):
    d = tree / "set"
    _fake_hub(
        monkeypatch,
        {
            "caption": ["in", "out"],
            "jpg_0": [str(d / "img" / "w.png"), "img/w.png"],
            "jpg_1": ["img/l.png", "../outside.png"],
            "label_0": [1.0, 0.0],
        },
    )
    src = HubPairs(str(d), "train")
    assert _ds(src)[(0, 0)]["bad"] is None  # absolute inside and relative inside
    with pytest.raises(PathOutsideError, match="row 1 of"):
        _ds(src)[(0, 1)]


# ------------------------------------------------------------------------------- pixel cap
def _bomb_png(w: int, h: int) -> bytes:
    """A valid 1-bit grayscale PNG of w × h black pixels: a few KB claiming w·h pixels."""

    def chunk(kind: bytes, data: bytes) -> bytes:
        body = kind + data
        return struct.pack(">I", len(data)) + body + struct.pack(">I", zlib.crc32(body))

    row = b"\0" * (1 + (w + 7) // 8)  # filter byte + packed bits
    z = zlib.compressobj(9)
    parts, step = [], 1000
    for y in range(0, h, step):
        parts.append(z.compress(row * min(step, h - y)))
    parts.append(z.flush())
    ihdr = struct.pack(">IIBBBBB", w, h, 1, 0, 0, 0, 0)
    return (
        b"\x89PNG\r\n\x1a\n"
        + chunk(b"IHDR", ihdr)
        + chunk(b"IDAT", b"".join(parts))
        + chunk(b"IEND", b"")
    )


def test_an_image_over_the_pixel_cap_is_a_bad_image(tree):
    # 9000² = 81 MP: under PIL's own bomb warning (~89 MP), over our 64 MP cap
    big = _bomb_png(9000, 9000)
    assert len(big) < 200_000
    (tree / "set" / "img" / "big.png").write_bytes(big)
    f = _jsonl(tree / "set" / "p.jsonl", [("img/w.png", "img/l.png"), ("img/big.png", "img/l.png")])
    ds = _ds(OwnPairs(str(f)))
    batch = collate_pairs([ds[(0, 0)], ds[(0, 1)]])
    assert len(batch) == 1 and len(batch.bad) == 1  # counted and skipped, no crash
    assert "winner image" in batch.bad[0][1] and "9000×9000" in batch.bad[0][1]
    assert "MAX_IMAGE_PIXELS" in batch.bad[0][1]
    with pytest.raises(BadImageError, match="over the cap"):
        _ds(OwnPairs(str(f)), on_bad_image="fail")[(0, 1)]


def test_decompression_bomb_in_eval_is_a_bad_pair(tree):
    from snpo.evaluate import load_pair_pixels

    (tree / "set" / "img" / "bomb.png").write_bytes(_bomb_png(20000, 20000))  # 400 MP
    f = _jsonl(
        tree / "set" / "p.jsonl", [("img/w.png", "img/l.png"), ("img/w.png", "img/bomb.png")]
    )
    keep, pix, _, _, _, bad = load_pair_pixels(OwnPairs(str(f)), [0, 1], 16)
    assert keep == [0] and pix.shape[0] == 1
    assert [i for i, _ in bad] == [1] and "bomb" in bad[0][1]


def test_pixel_cap_is_configurable_and_spares_pickapic_sizes(monkeypatch):
    assert decode_image(image_bytes(RED, (1024, 1024))).size == (1024, 1024)
    small = image_bytes(RED, (20, 24))
    with pytest.raises(BadImageError, match="20×24"):
        decode_image(small, max_pixels=100)
    monkeypatch.setattr(snpo.images, "MAX_IMAGE_PIXELS", 479)
    with pytest.raises(BadImageError, match="over the cap"):
        decode_image(small)
    with pytest.raises(snpo.images.ImageTooLargeError):
        snpo.images.decode_image(small)
    monkeypatch.setattr(snpo.images, "MAX_IMAGE_PIXELS", 480)
    assert decode_image(small).size == (20, 24)
