"""The README's run command, shortened: the demo aligns the shipped base with the real trainer and
produces the table, the grid and an export that loads (the full run is not a test)."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from snpo.world.demo import ASSETS, assets_ready


def test_shipped_assets_are_present():
    assert assets_ready() is None, assets_ready()


@pytest.mark.slow
def test_demo_quick_end_to_end(tmp_path):
    out = tmp_path / "demo"
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    proc = subprocess.run(
        [sys.executable, "-m", "snpo.world.demo", "--quick", "--out", str(out)],
        capture_output=True,
        text=True,
        env=env,
        timeout=600,
    )
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    # the table, printed and written
    assert "| model | reward CFG 3" in proc.stdout and "| Diff-SNPO |" in proc.stdout
    table = (out / "summary.md").read_text()
    assert "| base |" in table and "| Diff-SNPO |" in table
    assert "Outputs in" in proc.stdout
    # the grid
    from PIL import Image

    grid = Image.open(out / "grid.png")
    assert grid.size[0] > 64 and grid.size[1] > 64
    # a checkpoint/export that loads and samples
    import torch

    from snpo.models import encode_prompts, generate, load_export, null_embedding

    model, meta = load_export(out / "train" / "export")
    assert meta["objective"] == "snpo" and meta["base_model"] == str(
        Path(ASSETS / "base").resolve()
    )
    img = generate(
        model,
        encode_prompts(model, ["a red square on the left"]),
        null_embedding(model),
        seeds=[0],
        steps=2,
        guidance_scale=3.0,
    )
    assert img.shape == (1, 3, 16, 16) and torch.isfinite(img).all()
