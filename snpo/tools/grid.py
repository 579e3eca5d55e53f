"""Image grids people can read: one row per prompt, one column per (model, CFG scale).

    sheets = grid_sheets(cells, row_captions=prompts, col_headers=["base · CFG 7.5", ...])
    save_sheets(sheets, out / "grids")            # grids/sheet_000.png, sheet_001.png, ...

``cells[r][c]`` is the image of row r (a prompt, perhaps with a seed) and column c (a model at a
CFG scale): a (3, H, W) tensor in [0, 1], a PIL image, or None for an empty cell. Tiles are
resized to one square side. Row captions (the prompts) are wrapped to the caption column on the
left, column headers to the tile width above; a caption too long for its lines ends in "…".

Text is drawn with DejaVu Sans, the TrueType font matplotlib ships (it has Latin, Greek and
Cyrillic glyphs, so "café" or "кот" read as written); without it PIL's default font is used and a
warning says so (its glyph coverage is narrower).

A sheet is at most ``max_width`` × ``max_height`` pixels: rows that do not fit go to the next
sheet, and so do columns (each sheet repeats the row captions and its column headers). Sheets are
ordered row block by row block, column blocks within each.
"""

from __future__ import annotations

import functools
import warnings
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import torch
from PIL import Image, ImageDraw, ImageFont

FONT_NAME = "DejaVu Sans"
FONT_FILE = "DejaVuSans.ttf"
SHEET_STEM = "sheet"
ELLIPSIS = "…"


# ----------------------------------------------------------------------------- fonts


@functools.lru_cache(maxsize=1)
def font_path() -> Path | None:
    """The DejaVu Sans TrueType file matplotlib ships, or None when it cannot be found."""
    try:
        import matplotlib
        from matplotlib import font_manager
    except ImportError:
        return None
    shipped = Path(matplotlib.get_data_path()) / "fonts" / "ttf" / FONT_FILE
    if shipped.is_file():
        return shipped
    try:
        found = font_manager.findfont(FONT_NAME, fallback_to_default=False)
    except (ValueError, RuntimeError):
        return None
    return Path(found) if Path(found).name == FONT_FILE else None


@functools.lru_cache(maxsize=16)
def caption_font(size: int) -> ImageFont.FreeTypeFont | ImageFont.ImageFont:
    """DejaVu Sans at ``size`` px, or PIL's default font with a warning when DejaVu is absent."""
    path = font_path()
    if path is not None:
        return ImageFont.truetype(str(path), size)
    warnings.warn(
        f"{FONT_NAME} ({FONT_FILE}, shipped with matplotlib) not found: captions use PIL's "
        "default font, which may lack glyphs for non-ASCII text",
        stacklevel=2,
    )
    try:
        return ImageFont.load_default(size=size)
    except TypeError:  # Pillow < 10.1: fixed-size bitmap font
        return ImageFont.load_default()


def wrap_text(text: str, font, width: int, max_lines: int | None = None) -> list[str]:
    """``text`` broken into lines of at most ``width`` px in ``font`` (at spaces; a word longer
    than a line is cut); with ``max_lines``, the last kept line ends in "…" when text is left."""
    if width <= 0:
        raise ValueError(f"wrap_text: width must be > 0 px, got {width}")

    def fits(s: str) -> bool:
        return font.getlength(s) <= width

    lines: list[str] = []
    for para in str(text).splitlines() or [""]:
        line = ""
        for word in para.split() or [""]:
            trial = f"{line} {word}" if line else word
            if fits(trial):
                line = trial
                continue
            if line:
                lines.append(line)
            line = ""
            while word and not fits(word):  # a word wider than the line: cut it
                cut = max([k for k in range(1, len(word)) if fits(word[:k])] or [1])
                lines.append(word[:cut])
                word = word[cut:]
            line = word
        lines.append(line)
    if max_lines is not None and len(lines) > max_lines:
        last = lines[max_lines - 1]
        while last and not fits(last + ELLIPSIS):
            last = last[:-1]
        lines = lines[: max_lines - 1] + [last.rstrip() + ELLIPSIS]
    return lines


# ----------------------------------------------------------------------------- layout


@dataclass(frozen=True)
class Sheet:
    """One sheet of a grid: which rows and columns it holds and its size in pixels."""

    rows: tuple[int, ...]
    cols: tuple[int, ...]
    width: int
    height: int


def plan_sheets(
    row_heights: Sequence[int],
    n_cols: int,
    *,
    col_width: int,
    caption_width: int,
    header_height: int,
    pad: int,
    max_width: int | None,
    max_height: int | None,
) -> list[Sheet]:
    """Split rows (of ``row_heights`` px) and ``n_cols`` columns (``col_width`` px) over sheets of
    at most ``max_width`` × ``max_height`` px (None: unbounded). A sheet is
    ``caption_width + cols·(col_width + pad) + pad`` wide and
    ``header_height + Σ(row height + pad) + pad`` high. ValueError when one row or one column
    cannot fit."""
    if n_cols < 1 or not row_heights:
        raise ValueError("a grid needs at least one row and one column")
    fixed_w = caption_width + pad
    per_col = col_width + pad
    if max_width is not None and fixed_w + per_col > max_width:
        raise ValueError(
            f"max_width {max_width} px cannot hold one {col_width} px column next to the "
            f"{caption_width} px captions"
        )
    cols_per = n_cols if max_width is None else min(n_cols, (max_width - fixed_w) // per_col)
    col_blocks = [tuple(range(c, min(c + cols_per, n_cols))) for c in range(0, n_cols, cols_per)]
    row_blocks: list[tuple[int, ...]] = []
    block: list[int] = []
    used = header_height + pad
    for r, h in enumerate(row_heights):
        need = h + pad
        if max_height is not None and header_height + pad + need > max_height:
            raise ValueError(
                f"max_height {max_height} px cannot hold row {r} ({h} px) under the "
                f"{header_height} px column headers"
            )
        if block and max_height is not None and used + need > max_height:
            row_blocks.append(tuple(block))
            block, used = [], header_height + pad
        block.append(r)
        used += need
    row_blocks.append(tuple(block))
    return [
        Sheet(
            rows=rb,
            cols=cb,
            width=fixed_w + len(cb) * per_col,
            height=header_height + pad + sum(row_heights[r] + pad for r in rb),
        )
        for rb in row_blocks
        for cb in col_blocks
    ]


def _pil(tile) -> Image.Image | None:
    if tile is None or isinstance(tile, Image.Image):
        return tile
    if isinstance(tile, torch.Tensor):
        from snpo.data import to_pil

        return to_pil(tile)
    raise TypeError(f"a grid cell must be a tensor, a PIL image or None, got {type(tile).__name__}")


def grid_sheets(
    cells: Sequence[Sequence[torch.Tensor | Image.Image | None]],
    *,
    row_captions: Sequence[str],
    col_headers: Sequence[str],
    tile_size: int | None = None,
    caption_width: int | None = None,
    font_size: int | None = None,
    max_caption_lines: int = 6,
    max_width: int | None = 4096,
    max_height: int | None = 4096,
    pad: int = 4,
    background: tuple[int, int, int] = (255, 255, 255),
) -> list[Image.Image]:
    """The sheets (PIL RGB images) of the grid ``cells[r][c]``: one row per ``row_captions``
    entry, one column per ``col_headers`` entry (see the module docstring).

    tile_size: the square side of every tile (default: the first tile's width, at least 64 px so
    that tiny images stay visible); caption_width: the caption column (default 2 tiles, at least
    160 px); font_size: default from the tile size (12–18 px)."""
    n_rows, n_cols = len(cells), len(col_headers)
    if len(row_captions) != n_rows:
        raise ValueError(f"{n_rows} rows of cells but {len(row_captions)} row captions")
    for r, row in enumerate(cells):
        if len(row) != n_cols:
            raise ValueError(f"row {r} has {len(row)} cells but there are {n_cols} column headers")
    tiles = [[_pil(t) for t in row] for row in cells]
    first = next((t for row in tiles for t in row if t is not None), None)
    if first is None:
        raise ValueError("a grid needs at least one image")
    side = tile_size or max(first.size[0], 64)
    size = font_size or max(12, min(18, side // 8))
    font = caption_font(size)
    line_h = int(size * 1.25) + 1
    cap_w = caption_width or max(2 * side, 160)
    captions = [wrap_text(c, font, cap_w - 2 * pad, max_caption_lines) for c in row_captions]
    headers = [wrap_text(h, font, side, 3) for h in col_headers]
    header_h = max(len(h) for h in headers) * line_h + pad
    row_heights = [max(side, len(c) * line_h) for c in captions]
    plan = plan_sheets(
        row_heights,
        n_cols,
        col_width=side,
        caption_width=cap_w,
        header_height=header_h,
        pad=pad,
        max_width=max_width,
        max_height=max_height,
    )
    sheets = []
    for s in plan:
        sheet = Image.new("RGB", (s.width, s.height), background)
        draw = ImageDraw.Draw(sheet)
        x0 = cap_w + pad
        for j, c in enumerate(s.cols):
            for k, text in enumerate(headers[c]):
                draw.text(
                    (x0 + j * (side + pad), pad + k * line_h), text, fill=(0, 0, 0), font=font
                )
        y = header_h + pad
        for r in s.rows:
            for k, text in enumerate(captions[r]):
                draw.text((pad, y + k * line_h), text, fill=(0, 0, 0), font=font)
            for j, c in enumerate(s.cols):
                tile = tiles[r][c]
                if tile is None:
                    continue
                tile = tile.convert("RGB")
                if tile.size != (side, side):
                    resample = (
                        Image.Resampling.NEAREST
                        if tile.size[0] < side
                        else Image.Resampling.LANCZOS
                    )
                    tile = tile.resize((side, side), resample)
                sheet.paste(tile, (x0 + j * (side + pad), y))
            y += row_heights[r] + pad
        sheets.append(sheet)
    return sheets


def sheet_name(index: int, stem: str = SHEET_STEM) -> str:
    """``sheet_000.png``, ``sheet_001.png``, … (``stem`` replaces "sheet")."""
    return f"{stem}_{index:03d}.png"


def save_sheets(
    sheets: Sequence[Image.Image], folder: str | Path, stem: str = SHEET_STEM
) -> list[Path]:
    """Write ``sheets`` as ``folder/<stem>_000.png``, … (folder created) → the paths."""
    from snpo.data import save_png

    return [save_png(s, Path(folder) / sheet_name(i, stem)) for i, s in enumerate(sheets)]
