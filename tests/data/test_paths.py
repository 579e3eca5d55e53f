"""Image paths stay inside their data file's folder (own pairs, dataset rows) unless
allow_outside_paths; refusals name the record or row and the column."""

from __future__ import annotations

import json
import types

import pytest

from snpo.config import ConfigError, TrainConfig, load_config, validate
from snpo.data import (
    DataError,
    HubPairs,
    OwnPairs,
    PairDataset,
    PathOutsideError,
    image_bytes,
    open_source,
)
from tests.data.conftest import write_jsonl_pairs
from tests.trainer.conftest import GREEN, RED, write_config


def _ds(src, **kw):
    return PairDataset(src, resolution=16, seed=0, random_flip=False, **kw)


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
    f = write_jsonl_pairs(
        tree / "set" / "pairs.jsonl", [("img/w.png", "img/l.png"), ("img/w.png", bad)]
    )
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
    with pytest.raises(PathOutsideError, match=r"row 1 of owner/pairs.*outside\.png") as info:
        _ds(src)[(0, 1)]
    assert "column jpg_0" in str(info.value)
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


def test_hub_rows_without_a_label_are_dropped_as_in_parquet(monkeypatch):
    """has_label false → the row is not a pair (the parquet reader's rule, now the hub's too)."""
    import datasets

    w = image_bytes(RED, (8, 8))
    ds = datasets.Dataset.from_dict(
        {
            "caption": ["kept", "unlabelled", "tie"],
            "jpg_0": [w, w, w],
            "jpg_1": [w, w, w],
            "label_0": [1.0, 0.0, 0.5],
            "has_label": [True, False, True],
        }
    )
    monkeypatch.setattr(datasets, "load_dataset", lambda name, split: ds)
    src = HubPairs("owner/pairs", "train")
    assert src.rows.tolist() == [0] and len(src) == 1
