"""Paired statistics of a world comparison: the t-interval, per-seed differences against a run
and against the base, the tables and the CFG-curve plot, on a synthetic results.json."""

from __future__ import annotations

import math
import random

import pytest

from snpo.world.paired import (
    cfg_curve,
    paired_table,
    per_seed,
    plot_cfg_curve,
    report,
    t975,
    t_interval,
)


def _results(seeds: int, effect: float) -> dict:
    """Rewards where snpo = dpo + effect + noise at CFG 7.5 and = dpo at CFG 1 (seeded)."""
    rng = random.Random(0)

    def block(v):
        return {"all": {"reward": v, "sharpness": v / 2, "good": v / 4, "n": 32}}

    runs = {"dpo": {"seeds": {}}, "snpo": {"seeds": {}}}
    for s in range(seeds):
        shared = rng.gauss(0.7, 0.05)  # the seed's common part: cancels in the difference
        for name, d in (("dpo", 0.0), ("snpo", effect)):
            runs[name]["seeds"][str(s)] = {
                "rewards": {"scales": {"1": block(shared), "7.5": block(shared + d +
                                                                        rng.gauss(0, 0.005))}},
                "preference": {k: {"value": shared + d} for k in
                               ("accuracy_pos", "accuracy_neg", "winner_logp_proxy")},
            }  # fmt: skip
    return {
        "settings": {"seeds": list(range(seeds)), "budget": {"scales": [1.0, 7.5]}},
        "base": {"scales": {"1": block(0.6), "7.5": block(0.65)}},
        "runs": runs,
    }


def test_t_interval_by_hand():
    iv = t_interval([1.0, 2.0, 3.0, 4.0])
    half = 3.182 * math.sqrt(5 / 3) / 2  # sd² = 5/3, t_{0.975,3} = 3.182
    assert iv.mean == 2.5 and iv.n == 4
    assert iv.lo == pytest.approx(2.5 - half, rel=1e-12) and iv.hi == pytest.approx(2.5 + half)
    assert iv.excludes_zero and not t_interval([-1.0, 1.0, 0.5]).excludes_zero
    assert t975(35) == t975(30)  # between tabulated df: the smaller df, a wider interval
    with pytest.raises(ValueError, match="at least 2"):
        t_interval([1.0])


def test_pairing_removes_the_seeds_common_part():
    res = _results(8, effect=0.02)
    d = per_seed(res, "snpo", "dpo", 7.5)
    iv = t_interval(list(d.values()))
    assert len(d) == 8 and iv.excludes_zero and 0.0 < iv.lo < 0.02 < iv.hi < 0.04
    # unpaired, the seeds' spread (0.05) would swamp a 0.02 effect at 8 seeds
    assert not t_interval([res["runs"]["snpo"]["seeds"][s]["rewards"]["scales"]["7.5"]["all"]
                           ["reward"] - 0.7 - 0.02 for s in d]).excludes_zero  # fmt: skip
    assert per_seed(res, "snpo", "dpo", 1.0) == {str(s): 0.0 for s in range(8)}
    base = per_seed(res, "dpo", "base", 1.0)
    assert base["3"] == pytest.approx(res["runs"]["dpo"]["seeds"]["3"]["rewards"]["scales"]["1"]
                                      ["all"]["reward"] - 0.6)  # fmt: skip


def test_tables_and_plot(tmp_path):
    res = _results(4, effect=0.03)
    table = paired_table(res, [("snpo", "dpo"), ("snpo", "base")])
    rows = [r for r in table.splitlines() if r.startswith("| snpo")]
    assert len(rows) == 2 and rows[0].split("|")[2].strip() == "4"
    assert rows[0].rstrip(" |").endswith("*")  # CFG 7.5: the effect is found
    assert "+0.000 [+0.000, +0.000]" in rows[0]  # CFG 1: none
    curve = cfg_curve(res, "base")
    assert curve == [(1.0, 0.6, 0.6, 0.6), (7.5, 0.65, 0.65, 0.65)]
    text = report(res, ["dpo", "snpo"])
    assert "snpo − dpo" in text and "CFG curve" in text
    png = plot_cfg_curve(res, ["dpo", "snpo"], tmp_path / "c.png")
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def _split(res: dict, names: list[str]) -> dict:
    """The part of ``res`` holding only ``names`` (as a comparison of those runs writes it)."""
    return {**res, "settings": {**res["settings"], "runs": {n: {"objective": n} for n in names}},
            "runs": {n: res["runs"][n] for n in names}}  # fmt: skip


def test_merge_results_unions_runs_and_refuses_what_differs(tmp_path):
    import copy
    import json

    from snpo.world.paired import merge_results, write_merged

    res = _results(4, effect=0.03)
    res["settings"]["budget"] |= {"steps": 100, "eval_train": 16, "eval_heldout": 16,
                                  "eval_seeds": 1, "sample_steps": 20, "pref_pairs": 384,
                                  "pref_timesteps": 1}  # fmt: skip
    a, b = _split(res, ["dpo"]), _split(res, ["snpo"])
    merged = merge_results([a, b], ["a", "b"])
    assert list(merged["runs"]) == ["dpo", "snpo"] and merged["settings"]["seeds"] == [0, 1, 2, 3]
    assert per_seed(merged, "snpo", "dpo", 7.5) == per_seed(res, "snpo", "dpo", 7.5)
    other = copy.deepcopy(b)
    other["settings"]["budget"] = {**other["settings"]["budget"], "steps": 300}
    with pytest.raises(ValueError, match="budget"):
        merge_results([a, other])
    other = copy.deepcopy(b)
    other["base"]["scales"]["1"]["all"]["reward"] = 0.1
    with pytest.raises(ValueError, match="base"):
        merge_results([a, other])
    other = copy.deepcopy(a)
    other["runs"]["dpo"]["seeds"]["0"]["rewards"]["scales"]["1"]["all"]["reward"] += 0.01
    with pytest.raises(ValueError, match="seed 0 differs"):
        merge_results([a, other])
    other = _split(res, ["dpo"])
    other["settings"]["runs"]["dpo"] = {"objective": "dpo", "uncond_prob": 0.05}
    with pytest.raises(ValueError, match="defined otherwise"):
        merge_results([a, other])
    # the same seed measured the same in two parts is one entry
    assert merge_results([a, a])["runs"]["dpo"]["seeds"] == a["runs"]["dpo"]["seeds"]
    files = []
    for name, part in (("a", a), ("b", b)):
        for r in part["runs"].values():  # results_table needs the reward's train/held-out split
            for s in r["seeds"].values():
                for v in s["rewards"]["scales"].values():
                    v["train"] = v["heldout"] = v["all"]
        files.append(tmp_path / f"{name}.json")
        files[-1].write_text(json.dumps(part))
    for v in res["base"]["scales"].values():
        v["train"] = v["heldout"] = v["all"]
    for f in files:  # the base as both parts hold it
        p = json.loads(f.read_text())
        p["base"] = res["base"]
        f.write_text(json.dumps(p))
    write_merged(tmp_path / "out", files)
    assert "| snpo − dpo | 4 |" in (tmp_path / "out" / "paired.md").read_text()
    assert (tmp_path / "out" / "cfg_curve.png").read_bytes()[:4] == b"\x89PNG"
    assert "| snpo |" in (tmp_path / "out" / "results.md").read_text()


def test_study_pairs_and_the_difference_of_differences():
    from snpo.world.paired import contrast_table

    res = _results(6, effect=0.03)
    # four runs: the gap snpo − dpo is 0.03 at 7.5, the gap at p 0.05 is 0.01
    for name, src, shift in (("dpo_p0.05", "dpo", 0.0), ("snpo_p0.05", "dpo", 0.01)):
        res["runs"][name] = {"seeds": {}}
        for s, e in res["runs"][src]["seeds"].items():
            e2 = json_copy(e)
            e2["rewards"]["scales"]["7.5"]["all"]["reward"] += shift
            res["runs"][name]["seeds"][s] = e2
    table = contrast_table(res, [(("snpo", "dpo"), ("snpo_p0.05", "dpo_p0.05"))])
    row = next(r for r in table.splitlines() if r.startswith("| (snpo"))
    cfg1, cfg75 = (c.strip() for c in row.strip(" |").split("|")[2:4])
    assert cfg1 == "+0.000 [+0.000, +0.000]"
    assert cfg75.endswith("*") and 0.005 < float(cfg75.split()[0]) < 0.035  # 0.02 + noise
    text = report(res, ["dpo", "snpo", "dpo_p0.05", "snpo_p0.05"])
    for row in ("| snpo_p0.05 − dpo_p0.05 |", "| dpo_p0.05 − dpo |", "| snpo_p0.05 − snpo |",
                "| (snpo − dpo) − (snpo_p0.05 − dpo_p0.05) |"):  # fmt: skip
        assert row in text
    assert text.count("| snpo_p0.05 − dpo |") == 0  # covered by the study pairs


def json_copy(x):
    import json

    return json.loads(json.dumps(x))
