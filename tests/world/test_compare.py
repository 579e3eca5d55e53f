"""``python -m snpo.world compare``: every objective through the real trainer, merge and
evaluations (the quick budget, one seed), the report, resuming, and refusing other settings."""

from __future__ import annotations

import dataclasses
import json

import pytest

from snpo.world.compare import BUDGETS, NPO_MERGED, RUNS, check_settings, compare


def test_other_settings_are_refused_naming_the_field(tmp_path):
    settings = {"seeds": [0], "budget": {"steps": 4, "scales": [3.0]}}
    (tmp_path / "settings.json").write_text(json.dumps(settings))
    (tmp_path / "keep.txt").write_text("results")
    check_settings(tmp_path, settings, overwrite=False)  # same settings: resume
    other = {"seeds": [0], "budget": {"steps": 300, "scales": (3.0,)}}  # a tuple, as Budget has
    with pytest.raises(SystemExit, match=r"budget.steps: 4 → 300\)") as err:
        check_settings(tmp_path, other, overwrite=False)
    assert "scales" not in str(err.value)  # equal once stored, so not named
    assert (tmp_path / "keep.txt").exists()  # nothing lost by a refusal
    check_settings(tmp_path, other, overwrite=True)
    assert not tmp_path.exists()


def test_more_seeds_and_other_runs_resume_the_same_comparison(tmp_path):
    settings = {"seeds": [0, 1], "runs": ["dpo"], "budget": {"steps": 4}, "align": {"a": 1}}
    (tmp_path / "settings.json").write_text(json.dumps(settings))
    more = {**settings, "seeds": [0, 1, 2, 3], "runs": ["dpo", "snpo"]}
    check_settings(tmp_path, more, overwrite=False)  # additive: no refusal
    with pytest.raises(SystemExit, match="align"):
        check_settings(tmp_path, {**more, "align": {"a": 2}}, overwrite=False)


@pytest.mark.slow
def test_quick_comparison_end_to_end_and_resume(tmp_path):
    out = tmp_path / "cmp"
    budget = dataclasses.replace(BUDGETS["quick"], steps=2)
    res = compare(out, seeds=[0], budget=budget, jobs=2)
    names = [*RUNS, NPO_MERGED]
    assert list(res["runs"]) == names
    for name in names:
        s = res["runs"][name]["seeds"]["0"]
        assert 0.0 <= s["rewards"]["scales"]["3"]["train"]["reward"] <= 1.0
        assert 0.0 <= s["preference"]["accuracy_neg"]["value"] <= 1.0
        if name in RUNS:
            assert [r["step"] for r in s["curves"]] == [1, 2]
    meta = json.loads((out / "runs" / "snpo_lam0.5-s0" / "export" / "snpo_export.json").read_text())
    assert meta["lam"] == 0.5 and meta["objective"] == "snpo"
    table = (out / "results.md").read_text()
    for name in ["base", *names]:
        assert f"| {name} |" in table
    for png in ("curves.png", "grid.png"):
        assert (out / png).stat().st_size > 1000
    # a rerun with the same settings skips every finished job
    done = (out / "runs" / "dpo-s0" / "done.json").stat().st_mtime_ns
    again = compare(out, seeds=[0], budget=budget, jobs=1)
    assert (out / "runs" / "dpo-s0" / "done.json").stat().st_mtime_ns == done
    first, second = again["invocations"]
    assert first["jobs_run"] > 0 and res["invocations"] == [first]
    assert second["jobs_run"] == 0 and second["jobs_skipped"] == first["jobs_run"]
    assert f"{first['jobs_run']} jobs in" in (out / "results.md").read_text()
