"""metrics.jsonl: one reader for plot, the model card and the trainer's resume; torn lines."""

from __future__ import annotations

import pytest

from snpo.metrics_file import parse_line, read_lines, read_records


@pytest.mark.parametrize(
    "line",
    [
        '{"step": 1, "lo',
        "[1, 2]",
        '{"loss": 1.0}',
        '{"step": true}',
        '{"step": "3"}',
        '{"step": NaN}',
    ],
)
def test_lines_that_are_not_records_are_torn(line):
    assert parse_line(line) is None


def test_read_keeps_order_and_lines_and_counts_torn(tmp_path):
    f = tmp_path / "metrics.jsonl"
    f.write_text('{"step": 1, "loss": 0.7}\n\n{"step": 2, "loss": NaN}\nxx\n{"step": 3}\n{"st')
    lines, torn = read_lines(f)
    assert torn == 2 and [r["step"] for _, r in lines] == [1, 2, 3]
    assert lines[0][0] == '{"step": 1, "loss": 0.7}'  # the line as written (resume rewrites it)
    recs, torn = read_records(f, until_step=2)
    assert [r["step"] for r in recs] == [1, 2] and torn == 2


def test_the_three_readers_agree(tmp_path):
    import warnings

    from snpo.models.model_card import read_metrics
    from snpo.tools.plot import read_run
    from snpo.trainer.metrics import keep_metrics_until

    f = tmp_path / "metrics.jsonl"
    f.write_text('{"step": 1}\n{"step": 2}\n{"x": 1}\n{"step": 3}\n{"step": 4')
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        assert [r["step"] for r in read_run(f)] == [1, 2, 3]
        assert [r["step"] for r in read_metrics(f, until_step=2)] == [1, 2]
        assert keep_metrics_until(f, 2) == 2
    assert f.read_text() == '{"step": 1}\n{"step": 2}\n'
