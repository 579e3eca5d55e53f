"""An all-ties Pick-a-Pic parquet is refused with an error naming the file(s) and the ties."""

from __future__ import annotations

from types import SimpleNamespace

import pytest

from snpo.data import DataError, image_bytes, write_pickapic_parquet
from snpo.data.sources import open_source
from tests.trainer.conftest import BLUE, RED


def _rows(labels):
    return [
        {
            "caption": f"a red cube {i}",
            "jpg_0": image_bytes(RED, (8, 8)),
            "jpg_1": image_bytes(BLUE, (8, 8)),
            "label_0": v,
        }
        for i, v in enumerate(labels)
    ]


def _cfg(*files):
    return SimpleNamespace(
        train_data=[str(f) for f in files],
        data_format="auto",
        data_split="train",
        max_train_pairs=None,
    )


def test_all_ties_error_names_files_and_count(tmp_path):
    a = write_pickapic_parquet(tmp_path / "ties-a.parquet", _rows([0.5, 0.5, 0.5]))
    b = write_pickapic_parquet(tmp_path / "ties-b.parquet", _rows([0.5, 0.5]))
    with pytest.raises(DataError) as info:
        open_source(_cfg(a, b))
    msg = str(info.value)
    assert str(a) in msg and str(b) in msg
    assert "5 row(s) read, 5 of them ties" in msg


def test_one_good_pair_is_enough(tmp_path):
    a = write_pickapic_parquet(tmp_path / "mixed.parquet", _rows([0.5, 1.0, 0.5]))
    src = open_source(_cfg(a))
    assert len(src) == 1 and src.stats.ties_dropped == 2


def test_eval_all_ties_error_names_the_file(tmp_path):
    from snpo.tools.preference import EvalError, open_pairs

    a = write_pickapic_parquet(tmp_path / "ties-eval.parquet", _rows([0.5, 0.5]))
    with pytest.raises(EvalError) as info:
        open_pairs([str(a)])
    msg = str(info.value)
    assert "ties-eval.parquet" in msg and "2 row(s) read, 2 of them ties" in msg
