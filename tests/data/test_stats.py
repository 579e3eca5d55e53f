"""``snpo data stats``: per-file and total counts of rows, ties, usable pairs, image sizes and
decode failures; clear errors for missing files; the ``snpo data`` dispatcher."""

from __future__ import annotations

import json

import pytest

from snpo.cli import main as snpo_main
from snpo.data import image_bytes, write_pickapic_parquet
from snpo.data.__main__ import main as data_main
from snpo.data.errors import DataError
from snpo.data.stats import data_stats


def _parquet(path, sizes=((20, 24), (30, 16))):
    a, b = sizes
    good = lambda s, c: image_bytes(c, s, fmt="JPEG")  # noqa: E731
    whole = good((256, 256), (9, 9, 9))
    corrupt = whole[: len(whole) * 3 // 4]  # a truncated JPEG: opens, fails to decode
    rows = [
        {"caption": "p0", "jpg_0": good(a, (1, 0, 0)), "jpg_1": good(b, (2, 0, 0)), "label_0": 1.0},
        {"caption": "p1", "jpg_0": good(a, (3, 0, 0)), "jpg_1": good(a, (4, 0, 0)), "label_0": 0.5},
        {"caption": "p2", "jpg_0": good(b, (5, 0, 0)), "jpg_1": corrupt, "label_0": 0.0},
        {"caption": "p3", "jpg_0": good(a, (6, 0, 0)), "jpg_1": good(a, (7, 0, 0)), "label_0": 1.0},
        {
            "caption": "p4",
            "jpg_0": good(a, (8, 0, 0)),
            "jpg_1": good(b, (9, 0, 0)),
            "label_0": 1.0,
            "has_label": False,
        },
    ]
    return write_pickapic_parquet(path, rows, row_group_size=2)


def test_counts_per_file_and_total(tmp_path):
    f1 = _parquet(tmp_path / "a.parquet")
    f2 = _parquet(tmp_path / "b.parquet", sizes=((40, 40), (20, 24)))
    per, total = data_stats([str(f1), str(f2)], progress=False)
    a = per[0]
    assert (a.rows, a.ties, a.unlabelled, a.pairs) == (5, 1, 1, 3)
    assert a.usable == 2 and a.decode_failures == 1  # row 2's loser is truncated
    assert a.sizes == {"20x24": 3, "30x16": 2}  # images of the 3 pairs, the bad one left out
    assert per[1].sizes == {"40x40": 3, "20x24": 2}
    assert (total.rows, total.ties, total.pairs, total.usable) == (10, 2, 6, 4)
    assert total.decode_failures == 2
    assert total.sizes["20x24"] == 5
    # header-only: the truncated JPEG passes (it opens), so every pair looks usable
    _, quick = data_stats([str(f1)], decode=False, progress=False)
    assert quick.usable == 3 and quick.decode_failures == 0


def test_cli_exit_code_output_and_json(tmp_path, capsys):
    f = _parquet(tmp_path / "a.parquet")
    img = tmp_path / "w.png"
    img.write_bytes(image_bytes((1, 2, 3), (12, 10)))
    own = tmp_path / "own.jsonl"
    own.write_text(
        json.dumps({"winner": "w.png", "loser": "gone.png", "prompt": "x"}) + "\n"
        + json.dumps({"winner": "w.png", "loser": "w.png", "prompt": "y"}) + "\n"
    )  # fmt: skip
    out = tmp_path / "s.json"
    rc = snpo_main(["data", "stats", str(f), str(own), "--json", str(out), "--no-progress"])
    assert rc == 0
    text = capsys.readouterr().out
    assert "total" in text and "decode failures" in text and "20x24" in text
    doc = json.loads(out.read_text())
    assert [d["path"] for d in doc["files"]] == [str(f), str(own)]
    o = doc["files"][1]
    assert (o["rows"], o["pairs"], o["usable"], o["decode_failures"]) == (2, 2, 1, 1)
    assert o["sizes"] == {"12x10": 3}
    assert doc["total"]["usable"] == 3
    # python -m snpo.data stats: the same dispatcher
    assert data_main(["stats", str(f), "--no-progress"]) == 0


def test_missing_files_are_named(tmp_path, capsys):
    with pytest.raises(DataError, match="no such file.*nope.parquet"):
        data_stats([str(tmp_path / "nope.parquet")], progress=False)
    with pytest.raises(DataError, match="matches no file"):
        data_stats([str(tmp_path / "*.parquet")], progress=False)
    (tmp_path / "x.txt").write_text("hi")
    with pytest.raises(DataError, match="cannot tell the format"):
        data_stats([str(tmp_path / "x.txt")], progress=False)
    assert snpo_main(["data", "stats", str(tmp_path / "nope.parquet"), "--no-progress"]) == 2
    assert "no such file" in capsys.readouterr().err


def test_dispatcher_keeps_synth_and_refuses_unknown_tools(capsys):
    with pytest.raises(SystemExit) as exc:  # argparse --help of synth: reached its parser
        data_main(["synth", "--help"])
    assert exc.value.code == 0
    assert "synth" in capsys.readouterr().out
    assert data_main(["nope"]) == 2
    assert "unknown tool" in capsys.readouterr().err
