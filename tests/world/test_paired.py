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
