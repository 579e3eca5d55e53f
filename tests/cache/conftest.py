"""Cache test fixtures: tiny offline models (snpo.models.tiny), the trainer's synthetic Pick-a-Pic
parquet (tests/trainer/conftest.py: 15 kept pairs after the tie; pair 2 has a truncated-JPEG
loser), configs, and caches built once per session with fixed build options."""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import pytest

from snpo.cache import build_cache
from snpo.cli import main as snpo_main
from snpo.config import load_config
from snpo.data import write_pickapic_parquet
from snpo.models import save_tiny_model
from tests.trainer.conftest import WORDS, pickapic_rows, write_config

BAD_PAIR = 2  # row 3 of the fixture file: its loser is a truncated JPEG
N_PAIRS = 15
# build options of the session caches (tests that rebuild must use the same to compare bytes)
BUILD = dict(epochs=2, shard_size=4, batch_size=4, num_workers=0, verbose=False)


@pytest.fixture(scope="session")
def tiny_sd(tmp_path_factory) -> Path:
    return save_tiny_model(tmp_path_factory.mktemp("sd") / "m", family="sd", words=WORDS)


@pytest.fixture(scope="session")
def tiny_sdxl(tmp_path_factory) -> Path:
    return save_tiny_model(tmp_path_factory.mktemp("sdxl") / "m", family="sdxl", words=WORDS)


@pytest.fixture(scope="session")
def tiny_pixel(tmp_path_factory) -> Path:
    return save_tiny_model(
        tmp_path_factory.mktemp("px") / "m", family="sd", words=WORDS, with_vae=False, resolution=8
    )


@pytest.fixture(scope="session")
def pickapic(tmp_path_factory) -> Path:
    return write_pickapic_parquet(
        tmp_path_factory.mktemp("pap") / "train-0.parquet", pickapic_rows()
    )


def cache_main(argv: list[str]) -> int:
    """The exit code of ``snpo cache ARGV`` (through the ``snpo`` command)."""
    return snpo_main(["cache", *argv])


def make_cfg(folder: Path, model: Path, data: Path, **values):
    """A validated TrainConfig (the trainer's test defaults + values)."""
    folder.mkdir(parents=True, exist_ok=True)
    values.setdefault("uncond_prob", 0.5)  # both branches in a few pairs
    path = write_config(folder / "train.yaml", model=model, train_data=data, **values)
    return load_config(path)


def with_(cfg, **changes):
    return dataclasses.replace(cfg, **changes)


@pytest.fixture(scope="session")
def sd_cache(tmp_path_factory, tiny_sd, pickapic):
    """(cfg, cache dir): SD-class, center crop + random flip, fp32 latents (lossless)."""
    root = tmp_path_factory.mktemp("sdcache")
    cfg = make_cfg(root, tiny_sd, pickapic)
    build_cache(cfg, root / "cache", latent_dtype="fp32", **BUILD)
    return cfg, root / "cache"


def files_of(root: Path) -> dict[str, bytes]:
    return {
        p.relative_to(root).as_posix(): p.read_bytes()
        for p in sorted(root.rglob("*"))
        if p.is_file() and p.name != "manifest.json" and not p.name.startswith(".lock")
    }


def manifest_sans_time(root: Path) -> dict:
    m = json.loads((root / "manifest.json").read_text())
    for k in ("created_at", "updated_at"):
        m.pop(k)
    return m


def assert_same_cache(a: Path, b: Path) -> None:
    """Byte-identical files (shards; no journal or temporary leftovers on either side; the
    folder locks' files aside) and identical manifests modulo their timestamps."""
    fa, fb = files_of(a), files_of(b)
    assert sorted(fa) == sorted(fb)
    for rel in fa:
        assert fa[rel] == fb[rel], f"{rel} differs"
    assert manifest_sans_time(a) == manifest_sans_time(b)
