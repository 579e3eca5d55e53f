"""``python -m snpo.world compare``: every objective through the real trainer, merge and
evaluations (the quick budget, one seed), the report, resuming, and refusing other settings."""

from __future__ import annotations

import dataclasses
import json

import pytest

from snpo.world.compare import (
    BUDGETS,
    DEFAULT_RUNS,
    NPO_MERGED,
    RUNS,
    Budget,
    cache_tag,
    check_settings,
    compare,
    plan,
    run_names,
    trainer_module,
    trainer_options,
)


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


def test_a_run_of_the_same_name_must_be_the_same_run(tmp_path):
    runs = {"dpo": RUNS["dpo"], "snpo_p0.05": RUNS["snpo_p0.05"]}
    settings = {"seeds": [0], "runs": runs, "budget": {"steps": 4}}
    (tmp_path / "settings.json").write_text(json.dumps(settings))
    check_settings(tmp_path, {**settings, "runs": {"dpo": RUNS["dpo"]}}, overwrite=False)
    other = {**runs, "snpo_p0.05": {**RUNS["snpo_p0.05"], "uncond_prob": 0.1}}
    with pytest.raises(SystemExit, match="runs"):
        check_settings(tmp_path, {**settings, "runs": other}, overwrite=False)


def test_the_cfg1_study_runs_are_named_only_and_get_their_own_caches(tmp_path):
    assert run_names(None) == list(DEFAULT_RUNS)  # the default comparison is unchanged
    assert not {"dpo_nonull", "dpo_p0.05", "snpo_p0.05"} & set(DEFAULT_RUNS)
    assert cache_tag(RUNS["snpo"]) == "" and cache_tag(RUNS["dpo_nonull"]) == ""
    assert cache_tag(RUNS["snpo_p0.05"]) == "-p0.05"
    assert trainer_module(RUNS["dpo"]) == "snpo.train"
    assert trainer_module(RUNS["dpo_nonull"]) == "snpo.world.nonull"
    assert "null_pairs" not in trainer_options(RUNS["dpo_nonull"])
    budget = Budget(2, 1, 1, 1, 2, (1.0,), 4, 1)
    jobs = {j.key: j for j in plan(tmp_path, [0, 1], budget, 1,
                                   ["dpo", "dpo_nonull", "snpo_p0.05"])}  # fmt: skip
    assert {"cache s0", "cache s0-p0.05", "cache s1", "cache s1-p0.05"} <= set(jobs)
    assert jobs["train snpo_p0.05 s1"].deps == ("cache s1-p0.05",)
    assert jobs["train dpo_nonull s0"].deps == ("cache s0",)
    assert jobs["train dpo_nonull s0"].kwargs["module"] == "snpo.world.nonull"
    import yaml

    cfg = yaml.safe_load((tmp_path / "runs" / "snpo_p0.05-s1.yaml").read_text())
    assert cfg["uncond_prob"] == 0.05 and cfg["cache_dir"].endswith("cache-s1-p0.05")
    cache = yaml.safe_load((tmp_path / "runs" / "cache-s1-p0.05.yaml").read_text())
    assert cache["uncond_prob"] == 0.05
    nonull = yaml.safe_load((tmp_path / "runs" / "dpo_nonull-s0.yaml").read_text())
    assert "null_pairs" not in nonull and nonull["uncond_prob"] == 0.2


def test_null_pairs_dropped_weigh_zero(monkeypatch):
    """snpo.world.nonull: a null-branch pair gets no gradient, a conditional pair dpo's."""
    import torch

    import snpo.step as step
    from snpo.world.nonull import drop_null_pairs

    monkeypatch.setattr(step, "preference_loss_with_stats", step.preference_loss_with_stats)
    g = torch.Generator().manual_seed(0)
    target = torch.randn(8, 12, generator=g)
    ref = target + 0.1 * torch.randn(8, 12, generator=g)
    pred0 = target + 0.1 * torch.randn(8, 12, generator=g)
    uncond = torch.tensor([False, True, False, True])

    def grad():
        pred = pred0.clone().requires_grad_(True)
        out = step.preference_loss_with_stats(pred, target, ref, swap=torch.zeros(4, dtype=bool),
                                              beta=2000.0, lam=1.0, uncond=uncond)  # fmt: skip
        out.loss.backward()
        return pred.grad

    dpo = grad()
    drop_null_pairs()
    drop_null_pairs()  # idempotent
    nonull = grad()
    rows = torch.tensor([1, 3, 5, 7])  # winners and losers of the null-branch pairs
    assert torch.count_nonzero(nonull[rows]) == 0
    keep = torch.tensor([0, 2, 4, 6])
    assert torch.allclose(nonull[keep], dpo[keep], rtol=1e-5, atol=1e-9)
    assert torch.count_nonzero(dpo[rows]) > 0


@pytest.mark.slow
def test_quick_comparison_end_to_end_and_resume(tmp_path):
    out = tmp_path / "cmp"
    budget = dataclasses.replace(BUDGETS["quick"], steps=2)
    res = compare(out, seeds=[0], budget=budget, jobs=2)
    names = [*DEFAULT_RUNS, NPO_MERGED]
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
