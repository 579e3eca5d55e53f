"""PreferenceStats.sums() adds over micro-batches (and ranks); stats_from_sums gives the means
of the whole batch and leaves out empty branches instead of NaN."""

from __future__ import annotations

import math

import pytest
import torch

import snpo_kernels as sk


def _batch(p: int, seed: int, uncond_frac: float):
    g = torch.Generator().manual_seed(seed)
    e_ref = 0.5 + torch.rand(2 * p, generator=g, dtype=torch.float64)
    e_th = e_ref + 0.1 * torch.randn(2 * p, generator=g, dtype=torch.float64)
    uncond = torch.rand(p, generator=g) < uncond_frac
    w = 0.5 + torch.rand(p, generator=g, dtype=torch.float64)
    return e_th, e_ref, uncond, w


def test_sums_over_micro_batches_equal_the_whole_batch():
    parts = [_batch(5, 1, 0.4), _batch(3, 2, 0.0), _batch(4, 3, 1.0)]  # one has no null pair
    total = sum(sk.preference_stats(e, r, u, w, u).sums() for e, r, u, w in parts)
    cat = [
        torch.cat([x[i][: len(x[i]) // 2] for x in parts] + [x[i][len(x[i]) // 2 :] for x in parts])
        if i < 2
        else torch.cat([x[i] for x in parts])
        for i in range(4)
    ]
    whole = sk.preference_stats(cat[0], cat[1], cat[2], cat[3], cat[2]).as_dict()
    got = sk.stats_from_sums(total)
    for k in (
        "accuracy_cond",
        "accuracy_uncond",
        "logp_proxy_cond",
        "logp_proxy_uncond",
        "logp_proxy",
        "count_cond",
        "count_uncond",
        "nonfinite",
    ):
        assert got[k] == pytest.approx(whole[k], rel=1e-12, abs=1e-15), k


def test_empty_branch_is_left_out_not_nan():
    e, r, _, w = _batch(4, 4, 0.0)
    none_uncond = torch.zeros(4, dtype=torch.bool)
    st = sk.preference_stats(e, r, none_uncond, w, none_uncond)
    assert math.isnan(st.as_dict()["accuracy_uncond"])  # the per-micro-batch mean
    t = st.sums()
    assert torch.isfinite(t).all()
    got = sk.stats_from_sums(t)
    assert "accuracy_uncond" not in got and "logp_proxy_uncond" not in got
    assert got["count_uncond"] == 0 and "accuracy_cond" in got
    assert not any(math.isnan(v) for v in got.values())


def test_bad_sums_are_refused_naming_the_argument():
    with pytest.raises(ValueError, match="sums must be a tensor of shape"):
        sk.stats_from_sums(torch.zeros(3))
