"""Image grids: rows × (model, CFG) columns, sheet splitting by maximum size, wrapped captions
drawn with DejaVu Sans (non-ASCII glyphs), the PIL fallback with a warning."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image, ImageDraw

from snpo.tools import grid
from snpo.tools.grid import (
    caption_font,
    font_path,
    grid_sheets,
    plan_sheets,
    save_sheets,
    wrap_text,
)


def _tiles(rows, cols, side=32):
    g = torch.Generator().manual_seed(0)
    return [[torch.rand(3, side, side, generator=g) for _ in range(cols)] for _ in range(rows)]


def _text_pixels(text: str) -> np.ndarray:
    img = Image.new("L", (60, 30), 255)
    ImageDraw.Draw(img).text((4, 4), text, fill=0, font=caption_font(18))
    return np.asarray(img)


def test_font_is_dejavu_and_draws_non_ascii():
    assert font_path() is not None and font_path().name == "DejaVuSans.ttf"
    assert "DejaVu" in caption_font(18).getname()[0]
    e, e_acute, box = _text_pixels("e"), _text_pixels("é"), _text_pixels("\uffff")
    assert not np.array_equal(e, e_acute)  # the accent is drawn
    assert not np.array_equal(e_acute, box)  # not the missing-glyph box
    assert not np.array_equal(_text_pixels("ж"), box)


def test_pil_fallback_warns(monkeypatch):
    monkeypatch.setattr(grid, "font_path", lambda: None)
    caption_font.cache_clear()
    try:
        with pytest.warns(UserWarning, match="DejaVu Sans"):
            font = caption_font(13)
        assert font is not None
    finally:
        caption_font.cache_clear()


def test_plan_splits_rows_and_columns():
    kw = dict(col_width=64, caption_width=100, header_height=20, pad=4)
    one = plan_sheets([64] * 5, 3, max_width=None, max_height=None, **kw)
    assert len(one) == 1 and one[0].rows == (0, 1, 2, 3, 4) and one[0].cols == (0, 1, 2)
    assert one[0].width == 100 + 4 + 3 * 68 and one[0].height == 20 + 4 + 5 * 68
    # 2 columns per sheet (104 + 2·68 = 240 ≤ 250), 3 rows per sheet (24 + 3·68 = 228 ≤ 230)
    many = plan_sheets([64] * 5, 3, max_width=250, max_height=230, **kw)
    assert [(s.rows, s.cols) for s in many] == [
        ((0, 1, 2), (0, 1)),
        ((0, 1, 2), (2,)),
        ((3, 4), (0, 1)),
        ((3, 4), (2,)),
    ]
    assert all(s.width <= 250 and s.height <= 230 for s in many)
    with pytest.raises(ValueError, match="max_width 150 px cannot hold one 64 px column"):
        plan_sheets([64], 1, max_width=150, max_height=None, **kw)
    with pytest.raises(ValueError, match="max_height 80 px cannot hold row 0"):
        plan_sheets([64], 1, max_width=None, max_height=80, **kw)


def test_grid_sheets_sizes_and_files(tmp_path):
    cols = [f"{m} · CFG {g}" for m in ("base", "snpo") for g in (3, 7.5)]
    prompts = ["a red cube", "un café très noir sur une table en bois", "кот", "a dog"]
    sheets = grid_sheets(_tiles(4, 4), row_captions=prompts, col_headers=cols, tile_size=64)
    assert len(sheets) == 1
    w, h = sheets[0].size
    assert w == 160 + 4 + 4 * 68  # caption column (≥ 160 px) + 4 tiles
    assert h > 4 * 68  # headers above 4 rows
    small = grid_sheets(
        _tiles(4, 4),
        row_captions=prompts,
        col_headers=cols,
        tile_size=64,
        max_width=164 + 2 * 68,
        max_height=h // 2,
    )
    assert len(small) > 2 and all(s.width <= 300 and s.height <= h // 2 for s in small)
    files = save_sheets(small, tmp_path / "grids")
    assert [f.name for f in files] == [f"sheet_{i:03d}.png" for i in range(len(small))]
    assert Image.open(files[0]).size == small[0].size
    # the tile lands where the layout says (first column of the first row)
    tile = Image.new("RGB", (64, 64), (255, 0, 0))
    sheet = grid_sheets([[tile, None]], row_captions=["x"], col_headers=["a", "b"])[0]
    px = np.asarray(sheet)
    red = (px[..., 0] == 255) & (px[..., 1] == 0)
    assert red.sum() == 64 * 64


def test_wrap_and_errors():
    font = caption_font(14)
    lines = wrap_text("a photo of a very red cube on a blue table", font, 80)
    assert len(lines) > 1 and all(font.getlength(s) <= 80 for s in lines)
    cut = wrap_text("word " * 50, font, 80, max_lines=2)
    assert len(cut) == 2 and cut[-1].endswith("…")
    with pytest.raises(ValueError, match="2 rows of cells but 1 row captions"):
        grid_sheets(_tiles(2, 1), row_captions=["a"], col_headers=["m"])
    with pytest.raises(ValueError, match="row 0 has 2 cells but there are 1 column headers"):
        grid_sheets(_tiles(1, 2), row_captions=["a"], col_headers=["m"])


def test_sample_writes_sheets_with_model_and_cfg_columns(pix_model, tmp_path):
    import json

    from snpo import cli

    out = tmp_path / "s"
    argv = ["sample", "--model", f"a={pix_model}", "--model", f"b={pix_model}"]
    argv += ["--prompt", "a red cube", "--prompt", "une boîte bleue", "--seeds", "0,1"]
    argv += ["--guidance", "1,3", "--steps", "2", "--out", str(out), "--no-progress"]
    assert cli.main(argv) == 0
    man = json.loads((out / "manifest.json").read_text())
    assert man["settings"]["guidance_scale"] == [1.0, 3.0]
    assert len(man["images"]) == 2 * 2 * 2 * 2  # models × scales × prompts × seeds
    assert (out / "images/a/p0001_s1_g3.png").is_file()
    assert man["sheets"] == ["grids/sheet_000.png"]
    sheet = Image.open(out / "grids/sheet_000.png")
    # 4 rows (prompt × seed) of 64 px tiles, 4 columns (model × scale) next to the captions
    assert sheet.width == 160 + 4 + 4 * 68 and sheet.height > 4 * 68
    assert [g["file"] for g in man["grids"]] == ["grids/p0000.png", "grids/p0001.png"]
    assert Image.open(out / "grids/p0000.png").width == sheet.width
