"""Small image helpers shared by the tools: tensors ↔ PIL, PNG saving, contact sheets.

Tensors are (3, H, W) or (B, 3, H, W) float in [0, 1] (what :func:`snpo.models.generate`
returns). A contact sheet is a grid of equally sized tiles with optional column and row labels,
e.g. one column per model and one row per seed.
"""

from __future__ import annotations

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


def save_png(image: torch.Tensor | Image.Image, path: str | Path) -> Path:
    """Write one image as PNG (parent folders created)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    pil = image if isinstance(image, Image.Image) else to_pil(image)
    pil.save(path, format="PNG")
    return path


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
