"""Data test fixtures: the synthetic Pick-a-Pic parquet file of the trainer tests (same rows,
see tests/trainer/conftest.py for their layout) a tiny SD model for config checks, and a folder of images for path checks."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from snpo.data import image_bytes, write_pickapic_parquet
from snpo.models import save_tiny_model
from tests.trainer.conftest import BLUE, GREEN, RED, WORDS, pickapic_rows


@pytest.fixture(scope="session")
def tiny_sd(tmp_path_factory) -> Path:
    return save_tiny_model(tmp_path_factory.mktemp("sd") / "m", family="sd", words=WORDS)


@pytest.fixture(scope="session")
def pickapic(tmp_path_factory) -> Path:
    """The trainer tests' fixture parquet: a tie, a loser-first row, a truncated JPEG, ..."""
    return write_pickapic_parquet(
        tmp_path_factory.mktemp("pap") / "train-0.parquet", pickapic_rows()
    )


@pytest.fixture()
def tree(tmp_path) -> Path:
    """tmp/outside.png, tmp/set/img/{w,l}.png, tmp/set/img/link.png → ../../outside.png."""
    (tmp_path / "set" / "img").mkdir(parents=True)
    (tmp_path / "outside.png").write_bytes(image_bytes(GREEN, (20, 24)))
    (tmp_path / "set" / "img" / "w.png").write_bytes(image_bytes(RED, (20, 24)))
    (tmp_path / "set" / "img" / "l.png").write_bytes(image_bytes(BLUE, (20, 24)))
    (tmp_path / "set" / "img" / "link.png").symlink_to("../../outside.png")
    return tmp_path


def write_jsonl_pairs(path: Path, rows: list[tuple[str, str]]) -> Path:
    """Own pairs (winner, loser) as JSONL with prompts p0, p1, ..."""
    recs = [{"winner": w, "loser": lo, "prompt": f"p{i}"} for i, (w, lo) in enumerate(rows)]
    path.write_text("\n".join(json.dumps(r) for r in recs) + "\n")
    return path
