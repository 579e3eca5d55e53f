"""The bad-image rule: one decoder (:func:`decode_image`) and one exception family
(:class:`BadImageError`) for every reader of training images (trainer, cache, evaluation).

A *bad image* is one of:

- missing: ``None``, an image record without bytes, or a path that is not a file;
- of a type the decoder does not take (not bytes, a path, a PIL image or a bytes record);
- too large: its header claims more than :data:`MAX_IMAGE_PIXELS` pixels (width × height),
  refused before any pixel is decoded (:class:`ImageTooLargeError`; decompression bombs);
- undecodable: PIL cannot identify it, or decoding it fully fails (a truncated JPEG opens
  fine and fails only here), or it cannot be converted to RGB.

The mode is never a reason: grayscale, CMYK, palette, alpha and 16-bit images are converted to
RGB (palette or grayscale images with a transparency key go through RGBA; alpha is dropped).
"""

from __future__ import annotations

import io
import os
import warnings
from pathlib import Path
from typing import BinaryIO

from PIL import Image

from snpo.data.errors import DataError

# Decoded-pixel cap (width × height) checked from the header before any pixel is decoded:
# 64 MP (8192 × 8192) leaves Pick-a-Pic's ≤ 1024² images far below it, and refuses
# decompression bombs (a few KB of PNG/JPEG that claim e.g. 20000 × 20000). PIL's own check
# (Image.MAX_IMAGE_PIXELS, ~89 MP warning / ~179 MP error) still applies above this one.
MAX_IMAGE_PIXELS = 64 * 2**20


class BadImageError(DataError):
    """An image that cannot be used for training (see :mod:`snpo.data.decode` for the rule)."""


class ImageTooLargeError(BadImageError):
    """An image whose header claims more pixels than the cap (a decompression bomb?)."""


def check_pixels(img: Image.Image, max_pixels: int | None = None) -> None:
    """Raise :class:`ImageTooLargeError` when ``img`` has more than ``max_pixels`` pixels
    (default :data:`MAX_IMAGE_PIXELS`)."""
    cap = MAX_IMAGE_PIXELS if max_pixels is None else max_pixels
    w, h = img.size
    if w * h > cap:
        raise ImageTooLargeError(
            f"the image claims {w}×{h} = {w * h / 1e6:.1f} MP, over the cap of "
            f"{cap / 1e6:.1f} MP (snpo.data.decode.MAX_IMAGE_PIXELS; a decompression bomb?)"
        )


def _open_capped(fp: str | Path | BinaryIO, max_pixels: int | None) -> Image.Image:
    """``Image.open`` (lazy: header only), refusing images over the cap before decoding."""
    try:
        with warnings.catch_warnings():  # our cap decides; PIL's warning would only add noise
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)
            img = Image.open(fp)
    except Image.DecompressionBombError as err:
        raise ImageTooLargeError(f"{err} (a decompression bomb?)") from err
    check_pixels(img, max_pixels)
    return img


def _to_rgb(img: Image.Image) -> Image.Image:
    if img.mode == "RGB":
        return img
    if "transparency" in img.info:
        return img.convert("RGBA").convert("RGB")
    return img.convert("RGB")


def _open(data: object, max_pixels: int | None) -> Image.Image:
    if data is None:
        raise BadImageError("no image data")
    if isinstance(data, dict) and "bytes" in data:  # datasets' Image feature, undecoded
        if not data["bytes"]:
            raise BadImageError("an image record without bytes (paths go through a source)")
        data = data["bytes"]
    if isinstance(data, (str, os.PathLike)):
        if not os.path.isfile(data):
            raise BadImageError(f"missing file {data}")
        return _open_capped(data, max_pixels)
    if isinstance(data, (bytes, bytearray, memoryview)):
        return _open_capped(io.BytesIO(bytes(data)), max_pixels)
    if isinstance(data, Image.Image):
        check_pixels(data, max_pixels)
        return data
    raise BadImageError(f"unsupported image value of type {type(data).__name__}")


def decode_image(data: object, *, max_pixels: int | None = None) -> Image.Image:
    """bytes | path | PIL image | ``{"bytes": ...}`` → a fully decoded RGB PIL image.

    Raises :class:`BadImageError` (:class:`ImageTooLargeError` over the cap) for every bad
    image as the module docstring defines it, and nothing else for bad data: whatever PIL
    raises while opening, decoding or converting is re-raised as a :class:`BadImageError`
    naming PIL's exception. Paths are opened as given: the pair sources check them first
    (:class:`snpo.data.paths.PathGuard`). ``max_pixels`` defaults to :data:`MAX_IMAGE_PIXELS`.
    """
    try:
        img = _open(data, max_pixels)
        img.load()  # decode now: a truncated JPEG fails here, not later
        return _to_rgb(img)
    except BadImageError:
        raise
    except Exception as err:  # noqa: BLE001 - PIL's decoders raise many kinds; all mean "bad"
        raise BadImageError(f"undecodable image ({type(err).__name__}: {err})") from err
