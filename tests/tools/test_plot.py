"""snpo plot: one PNG from several runs' metrics.jsonl (null values skipped), clear errors."""

from __future__ import annotations

import json

import pytest
from PIL import Image

from snpo import cli
from snpo.tools.plot import PlotError, plot_runs, read_run, series


def _run(folder, records):
    folder.mkdir(parents=True)
    lines = [json.dumps(r) for r in records]
    (folder / "metrics.jsonl").write_text("\n".join(lines) + "\n")
    return folder


def _records(scale, n=6):
    return [
        {
            "step": s,
            "loss": scale / s,
            "accuracy_cond": 0.5 + 0.05 * s,
            "accuracy_uncond": None if s % 2 else 0.4,  # branch without pairs on odd steps
            "logp_proxy": -scale * s * 1e-3,
            "grad_norm": None if s == 3 else float(s),
        }
        for s in range(1, n + 1)
    ]


def test_plot_two_runs_with_nulls(tmp_path, capsys):
    a = _run(tmp_path / "dpo", _records(1.0))
    b = _run(tmp_path / "snpo", _records(2.0, n=4))
    out = tmp_path / "figs" / "plot.png"
    assert cli.main(["plot", str(a), str(b), "--out", str(out)]) == 0, capsys.readouterr().err
    img = Image.open(out)
    assert img.format == "PNG" and img.width > 500 and img.height > 400
    import numpy as np

    assert len(np.unique(np.asarray(img.convert("L")))) > 10  # lines and text, not a blank canvas
    xs, ys = series(read_run(a), "accuracy_uncond")
    assert xs == [2.0, 4.0, 6.0] and ys == [0.4] * 3
    assert series(read_run(a), "grad_norm")[0] == [1.0, 2.0, 4.0, 5.0, 6.0]


def test_nan_and_torn_lines_are_skipped(tmp_path):
    run = tmp_path / "r"
    run.mkdir()
    (run / "metrics.jsonl").write_text('{"step": 1, "loss": NaN}\n{"step": 2, "loss": 1.0}\n{"st\n')
    with pytest.warns(UserWarning, match="1 unreadable"):
        recs = read_run(run)
    assert series(recs, "loss") == ([2.0], [1.0])
    with pytest.warns(UserWarning):
        assert plot_runs([run / "metrics.jsonl"], tmp_path / "p.png").is_file()


def test_run_without_metrics_is_refused(tmp_path, capsys):
    (tmp_path / "empty").mkdir()
    with pytest.raises(PlotError, match=r"empty: no metrics.jsonl"):
        plot_runs([tmp_path / "empty"], tmp_path / "p.png")
    assert cli.main(["plot", str(tmp_path / "empty"), "--out", str(tmp_path / "p.png")]) == 2
    assert "no metrics.jsonl" in capsys.readouterr().err
    assert not (tmp_path / "p.png").exists()


def test_smoothing_is_tensorboards_debiased_ema(tmp_path, capsys):
    from snpo.tools.plot import smooth

    ys = [1.0, 3.0, -2.0, 5.0]
    assert smooth(ys, 0.0) == ys
    w, m, want = 0.6, 0.0, []
    for k, y in enumerate(ys, start=1):  # the formula written out
        m = w * m + (1 - w) * y
        want.append(m / (1 - w**k))
    assert smooth(ys, w) == pytest.approx(want, rel=1e-12)
    assert smooth(ys, w)[0] == ys[0]  # debiased: the first value is the first point
    assert smooth([2.0] * 5, 0.9) == pytest.approx([2.0] * 5, rel=1e-12)  # constant stays
    run = _run(tmp_path / "r", _records(1.0))
    out = tmp_path / "s.png"
    assert cli.main(["plot", str(run), "--smooth", "0.8", "--out", str(out)]) == 0
    assert out.is_file()
    assert cli.main(["plot", str(run), "--smooth", "1", "--out", str(tmp_path / "x.png")]) == 2
    assert "--smooth must be in [0, 1)" in capsys.readouterr().err
    assert not (tmp_path / "x.png").exists()
