"""The bad-image rule (snpo.data.decode): one decoder, one exception family. Undecodable,
truncated, missing and over-the-cap images are bad; no image mode is."""

from __future__ import annotations

import io
import struct
import zlib

import pytest
from PIL import Image

import snpo.data.decode
from snpo.data import (
    BadImageError,
    DataError,
    ImageTooLargeError,
    OwnPairs,
    PairDataset,
    collate_pairs,
    decode_image,
    image_bytes,
)
from tests.data.conftest import write_jsonl_pairs
from tests.trainer.conftest import BLUE, RED


def _ds(src, **kw):
    return PairDataset(src, resolution=16, seed=0, random_flip=False, **kw)


def _encoded(im: Image.Image, fmt: str = "PNG") -> bytes:
    buf = io.BytesIO()
    im.save(buf, format=fmt)
    return buf.getvalue()


@pytest.mark.parametrize(
    "data, why",
    [
        (None, "no image data"),
        ({"bytes": None, "path": "x.png"}, "without bytes"),
        ("/nonexistent/x.png", "missing file"),
        (12, "unsupported image value of type int"),
        (b"", "undecodable image .UnidentifiedImageError"),
        (b"not an image at all", "undecodable image .UnidentifiedImageError"),
        (image_bytes(BLUE, (32, 32), "JPEG")[:300], "undecodable image .OSError"),
    ],
)
def test_bad_images_raise_bad_image_error_only(data, why):
    with pytest.raises(BadImageError, match=why) as info:
        decode_image(data)
    assert isinstance(info.value, DataError)


def test_every_mode_is_converted_to_rgb():
    rgb = Image.new("RGB", (6, 4), RED)
    palette = rgb.convert("P")
    palette.info["transparency"] = 0
    images = [rgb.convert(m) for m in ("L", "LA", "RGBA", "CMYK", "I", "1")] + [palette]
    for im in images:
        fmt = "JPEG" if im.mode == "CMYK" else ("TIFF" if im.mode == "I" else "PNG")
        out = decode_image(_encoded(im, fmt))
        assert out.mode == "RGB" and out.size == (6, 4), im.mode
    assert decode_image(rgb.convert("LA")).mode == "RGB"  # a PIL image as well
    assert decode_image({"bytes": _encoded(rgb), "path": None}).size == (6, 4)


def test_a_pil_image_over_the_cap_is_refused():
    with pytest.raises(ImageTooLargeError, match="6×4"):
        decode_image(Image.new("RGB", (6, 4)), max_pixels=23)


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
    f = write_jsonl_pairs(
        tree / "set" / "p.jsonl", [("img/w.png", "img/l.png"), ("img/big.png", "img/l.png")]
    )
    ds = _ds(OwnPairs(str(f)))
    batch = collate_pairs([ds[(0, 0)], ds[(0, 1)]])
    assert len(batch) == 1 and len(batch.bad) == 1  # counted and skipped, no crash
    assert "winner image" in batch.bad[0][1] and "9000×9000" in batch.bad[0][1]
    assert "MAX_IMAGE_PIXELS" in batch.bad[0][1]
    with pytest.raises(BadImageError, match="over the cap"):
        _ds(OwnPairs(str(f)), on_bad_image="fail")[(0, 1)]


def test_decompression_bomb_in_eval_is_a_bad_pair(tree):
    from snpo.tools.preference import load_pair_pixels

    (tree / "set" / "img" / "bomb.png").write_bytes(_bomb_png(20000, 20000))  # 400 MP
    f = write_jsonl_pairs(
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
    monkeypatch.setattr(snpo.data.decode, "MAX_IMAGE_PIXELS", 479)
    with pytest.raises(BadImageError, match="over the cap"):
        decode_image(small)
    with pytest.raises(ImageTooLargeError):
        decode_image(small)
    monkeypatch.setattr(snpo.data.decode, "MAX_IMAGE_PIXELS", 480)
    assert decode_image(small).size == (20, 24)
