"""Small image helpers shared by the tools: tensors ↔ PIL, PNG saving, contact sheets.

Tensors are (3, H, W) or (B, 3, H, W) float in [0, 1] (what :func:`snpo.sampler.generate`
returns). A contact sheet is a grid of equally sized tiles with optional column and row labels,
e.g. one column per model and one row per seed.
"""

from __future__ import annotations

import io
import re
from collections.abc import Sequence
from pathlib import Path

import torch
from PIL import Image, ImageDraw, ImageFont


def to_pil(image: torch.Tensor) -> Image.Image:
    """(3, H, W) or (1, H, W) in [0, 1] → RGB PIL image (values clamped, rounded to uint8)."""
    if image.ndim != 3:
        raise ValueError(f"expected a (C, H, W) tensor, got shape {tuple(image.shape)}")
    x = image.detach().float().clamp(0.0, 1.0).mul(255.0).round().to(torch.uint8).cpu()
    if x.shape[0] == 1:
        x = x.expand(3, -1, -1)
    return Image.fromarray(x.permute(1, 2, 0).contiguous().numpy(), mode="RGB")


def from_pil(image: Image.Image) -> torch.Tensor:
    """PIL image (any mode: grayscale, CMYK, palette, alpha) → (3, H, W) float32 in [0, 1]."""
    import numpy as np

    arr = np.asarray(image.convert("RGB"), dtype=np.uint8).copy()
    return torch.from_numpy(arr).permute(2, 0, 1).float().div(255.0)


# Decoded-pixel cap (width × height) checked from the header before any pixel is decoded:
# 64 MP (8192 × 8192) leaves Pick-a-Pic's ≤ 1024² images far below it, and refuses
# decompression bombs (a few KB of PNG/JPEG that claim e.g. 20000 × 20000). PIL's own check
# (Image.MAX_IMAGE_PIXELS, ~89 MP warning / ~179 MP error) still applies above this one.
MAX_IMAGE_PIXELS = 64 * 2**20


class ImageTooLargeError(ValueError):
    """An image whose header claims more pixels than the cap (a decompression bomb?)."""


def open_image(fp, *, max_pixels: int | None = None) -> Image.Image:
    """``Image.open`` (lazy: header only) that refuses images over ``max_pixels``
    (default :data:`MAX_IMAGE_PIXELS`) with :class:`ImageTooLargeError` before decoding."""
    import warnings

    cap = MAX_IMAGE_PIXELS if max_pixels is None else max_pixels
    try:
        with warnings.catch_warnings():  # our cap decides; PIL's warning would only add noise
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)
            img = Image.open(fp)
    except Image.DecompressionBombError as err:
        raise ImageTooLargeError(f"{err} (a decompression bomb?)") from err
    check_pixels(img, cap)
    return img


def check_pixels(img: Image.Image, max_pixels: int | None = None) -> None:
    """Raise :class:`ImageTooLargeError` when ``img`` has more than ``max_pixels`` pixels."""
    cap = MAX_IMAGE_PIXELS if max_pixels is None else max_pixels
    w, h = img.size
    if w * h > cap:
        raise ImageTooLargeError(
            f"the image claims {w}×{h} = {w * h / 1e6:.1f} MP, over the cap of "
            f"{cap / 1e6:.1f} MP (snpo.images.MAX_IMAGE_PIXELS; a decompression bomb?)"
        )


def decode_image(data: bytes, *, max_pixels: int | None = None) -> Image.Image:
    """Decode image bytes fully (a truncated JPEG opens fine and fails only here); an image
    over the pixel cap raises :class:`ImageTooLargeError` before it is decoded."""
    img = open_image(io.BytesIO(data), max_pixels=max_pixels)
    img.load()
    return img.convert("RGB")


def save_png(image: torch.Tensor | Image.Image, path: str | Path) -> Path:
    """Write one image as PNG (parent folders created)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    pil = image if isinstance(image, Image.Image) else to_pil(image)
    pil.save(path, format="PNG")
    return path


def resize_center_crop(image: Image.Image, size: int) -> Image.Image:
    """Resize the shorter side to ``size`` (bicubic), then crop the centre ``size`` × ``size``."""
    w, h = image.size
    scale = size / min(w, h)
    nw, nh = max(size, round(w * scale)), max(size, round(h * scale))
    image = image.resize((nw, nh), Image.Resampling.BICUBIC)
    left, top = (nw - size) // 2, (nh - size) // 2
    return image.crop((left, top, left + size, top + size))


def slug(text: str, max_len: int = 40) -> str:
    """A file-name-safe short form of ``text`` ("A red cube!" → "a-red-cube")."""
    s = re.sub(r"[^a-z0-9]+", "-", text.lower()).strip("-")
    return s[:max_len].rstrip("-") or "x"


def _font(size: int):
    try:
        return ImageFont.load_default(size=size)
    except TypeError:  # Pillow < 10.1: fixed-size bitmap font
        return ImageFont.load_default()


def contact_sheet(
    tiles: Sequence[Sequence[torch.Tensor | Image.Image | None]],
    *,
    col_labels: Sequence[str] | None = None,
    row_labels: Sequence[str] | None = None,
    title: str | None = None,
    pad: int = 4,
    tile_size: int | None = None,
    background: tuple[int, int, int] = (255, 255, 255),
) -> Image.Image:
    """A grid image: ``tiles[r][c]`` at row r, column c (None leaves the cell empty).

    Tiles are resized to ``tile_size`` (default: the first tile's size; tiny images are scaled
    up to at least 64 px so that they stay visible). Labels are drawn above the columns and
    left of the rows; ``title`` above everything.
    """
    rows = [[t if t is None or isinstance(t, Image.Image) else to_pil(t) for t in r] for r in tiles]
    first = next((t for r in rows for t in r if t is not None), None)
    if first is None:
        raise ValueError("contact_sheet needs at least one tile")
    n_rows, n_cols = len(rows), max(len(r) for r in rows)
    side = tile_size or max(first.size[0], 64)
    font_px = max(10, min(16, side // 8))
    font = _font(font_px)
    line = font_px + 6
    top = (line if col_labels else 0) + (line if title else 0)
    left = 0
    if row_labels:
        probe = ImageDraw.Draw(Image.new("RGB", (1, 1)))
        left = max(probe.textlength(str(s), font=font) for s in row_labels) + 2 * pad
        left = int(left)
    col_w = side
    if col_labels:
        probe = ImageDraw.Draw(Image.new("RGB", (1, 1)))
        col_w = max(side, int(max(probe.textlength(str(s), font=font) for s in col_labels)) + 2)
    width = left + n_cols * (col_w + pad) + pad
    if title:
        probe = ImageDraw.Draw(Image.new("RGB", (1, 1)))
        width = max(width, int(probe.textlength(title, font=font)) + 2 * pad)
    height = top + n_rows * (side + pad) + pad
    sheet = Image.new("RGB", (width, height), background)
    draw = ImageDraw.Draw(sheet)
    y0 = pad
    if title:
        draw.text((pad, y0 - pad + 2), title, fill=(0, 0, 0), font=font)
        y0 += line
    if col_labels:
        for c, label in enumerate(col_labels[:n_cols]):
            draw.text(
                (left + pad + c * (col_w + pad), y0 - pad + 2), label, fill=(0, 0, 0), font=font
            )
    for r, row in enumerate(rows):
        y = top + pad + r * (side + pad)
        if row_labels and r < len(row_labels):
            draw.text((pad, y + side // 2 - font_px // 2), row_labels[r], fill=(0, 0, 0), font=font)
        for c, tile in enumerate(row):
            if tile is None:
                continue
            if tile.size != (side, side):
                resample = (
                    Image.Resampling.NEAREST if tile.size[0] < side else Image.Resampling.LANCZOS
                )
                tile = tile.resize((side, side), resample)
            sheet.paste(tile, (left + pad + c * (col_w + pad), y))
    return sheet
