"""Argument checks and non-finite handling of the public API (torch backend; the non-finite
rules are applied after any backend, so they hold for the fused ones too)."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

import snpo_kernels as sk
from snpo_kernels.validation import BETA_MAX

from .oracle import oracle


def _inputs(seed, shape=(6, 5)):
    g = torch.Generator().manual_seed(seed)
    target = torch.randn(shape, generator=g)
    ref = target + torch.randn(shape, generator=g)
    pred = ref + 0.1 * torch.randn(shape, generator=g)
    return pred, target, ref


# ------------------------------------------------------------------ beta
@pytest.mark.parametrize("beta", [1e39, 1e11, float("inf"), float("nan")])
def test_beta_beyond_the_float32_safe_bound_is_refused(beta):
    pred, target, ref = _inputs(0)
    with pytest.raises(ValueError, match="beta must be a finite number > 0 and <= 1e"):
        sk.preference_loss(pred, target, ref, beta=beta)


def test_beta_at_the_bound_gives_a_finite_loss():
    pred, target, ref = _inputs(1)
    for backend in sk.available_backends("cpu"):
        loss = sk.preference_loss(pred, target, ref, beta=BETA_MAX, lam=0.9, backend=backend)
        assert torch.isfinite(loss), backend


# ------------------------------------------------------------------ numpy scalars
@pytest.mark.parametrize("np_type", [np.float16, np.float32, np.float64, np.longdouble, np.int64])
def test_numpy_scalars_are_accepted_for_beta_lam_and_weight(np_type):
    pred, target, ref = _inputs(2)
    want = sk.preference_loss(pred, target, ref, beta=4.0, lam=0.5, weight=2.0)
    lam = np_type(0.5) if np_type is not np.int64 else 1
    got = sk.preference_loss(pred, target, ref, beta=np_type(4), lam=lam, weight=np_type(2))
    if np_type is np.int64:
        want = sk.preference_loss(pred, target, ref, beta=4.0, lam=1.0, weight=2.0)
    torch.testing.assert_close(got, want, rtol=0, atol=0)
    mod = sk.PreferenceLoss(beta=np.float32(4.0), lam=np.float32(0.5))
    assert mod.beta == 4.0 and mod.lam == 0.5


@pytest.mark.parametrize("bad", [np.bool_(True), True, torch.tensor(2.0), "2", None])
def test_non_real_beta_is_a_type_error(bad):
    pred, target, ref = _inputs(3)
    with pytest.raises(TypeError, match="beta must be a Python number or a NumPy real scalar"):
        sk.preference_loss(pred, target, ref, beta=bad)


# ------------------------------------------------------------------ weights
@pytest.mark.parametrize(
    "weight", [-1.0, float("inf"), float("-inf"), float("nan"), np.float32(-2)]
)
def test_negative_or_non_finite_scalar_weight_is_refused(weight):
    pred, target, ref = _inputs(4)
    with pytest.raises(ValueError, match="weight must be finite and >= 0"):
        sk.preference_loss(pred, target, ref, beta=5.0, weight=weight)


@pytest.mark.parametrize("bad", [-0.5, float("inf"), float("nan")])
def test_negative_or_non_finite_cpu_weight_tensor_is_refused(bad):
    pred, target, ref = _inputs(5)
    weight = torch.tensor([1.0, bad, 2.0])
    with pytest.raises(ValueError, match=r"weight must be finite and >= 0 everywhere, got 1 bad"):
        sk.preference_loss(pred, target, ref, beta=5.0, weight=weight)
    with pytest.raises(ValueError, match="weight must be finite and >= 0 everywhere"):
        sk.preference_loss(pred, target, ref, beta=5.0, weight=torch.tensor(bad))


def test_zero_weight_is_allowed():
    pred, target, ref = _inputs(6)
    loss = sk.preference_loss(pred, target, ref, beta=5.0, weight=0.0, reduction="none")
    torch.testing.assert_close(loss, torch.full((3,), math.log(2.0)))


# ------------------------------------------------------------------ uncond, backend names
def test_uncond_on_another_device_is_named():
    pred, target, ref = _inputs(7)
    uncond = torch.zeros(3, dtype=torch.bool, device="meta")
    with pytest.raises(ValueError, match="uncond is on meta but pred is on cpu"):
        sk.preference_loss_with_stats(pred, target, ref, beta=5.0, uncond=uncond)
    with pytest.raises(TypeError, match=r"uncond must be a bool tensor of shape \(3,\), got list"):
        sk.preference_loss_with_stats(pred, target, ref, beta=5.0, uncond=[True, False, True])
    with pytest.raises(ValueError, match="uncond is on meta"):
        e = torch.ones(6)
        sk.preference_stats(e, e, uncond=uncond)


@pytest.mark.parametrize(
    "backend, exc, match",
    [("tpu", ValueError, "unknown backend 'tpu'"), (3, TypeError, "backend must be a string")],
)
def test_module_backend_is_checked_at_construction(backend, exc, match):
    with pytest.raises(exc, match=match):
        sk.PreferenceLoss(beta=5.0, backend=backend)


# ------------------------------------------------------------------ non-finite errors
@pytest.mark.parametrize("lam", [1.0, 0.9, 0.5])
@pytest.mark.parametrize("where", ["loser_pred", "winner_ref_err", "loser_ref_err_nan"])
def test_non_finite_error_makes_that_pair_nan_and_is_counted(lam, where):
    """An infinite loser error used to give ℓ = 0 (λ < 1 bounds m̃_b, λ = 1 saturates σ):
    now that pair's loss is NaN, the reduced loss is NaN, and stats.nonfinite counts it."""
    pred, target, ref = _inputs(8)
    ref_err = sk.per_sample_error(ref, target)
    kw = {}
    if where == "loser_pred":
        pred[4] = 1e30  # squares overflow float32: e_θ = inf
        kw["ref_pred"] = ref
    elif where == "winner_ref_err":
        ref_err[0] = float("inf")
        kw["ref_err"] = ref_err
    else:
        ref_err[5] = float("nan")
        kw["ref_err"] = ref_err
    # rows k and 3 + k are pair k's
    bad_pair = {"loser_pred": 1, "winner_ref_err": 0, "loser_ref_err_nan": 2}[where]
    per_pair = sk.preference_loss(pred, target, beta=50.0, lam=lam, reduction="none", **kw)
    assert math.isnan(per_pair[bad_pair].item())
    others = [k for k in range(3) if k != bad_pair]
    assert torch.isfinite(per_pair[others]).all()
    out = sk.preference_loss_with_stats(pred, target, beta=50.0, lam=lam, **kw)
    assert math.isnan(out.loss.item())
    assert out.stats.as_dict()["nonfinite"] == 1
    clean = sk.preference_loss_with_stats(*_inputs(8), beta=50.0, lam=lam)
    assert clean.stats.as_dict()["nonfinite"] == 0 and torch.isfinite(clean.loss)


def test_finite_pairs_keep_their_gradient_when_another_pair_is_non_finite():
    pred, target, ref = _inputs(9)
    pred[3] = 1e30
    x = pred.clone().requires_grad_(True)
    per_pair = sk.preference_loss(x, target, ref, beta=20.0, lam=0.9, reduction="none")
    keep = torch.tensor([False, True, True])
    per_pair[keep].sum().backward()
    _, want, _, _ = oracle(
        pred[[1, 2, 4, 5]],
        target[[1, 2, 4, 5]],
        ref[[1, 2, 4, 5]],
        beta=20.0,
        lam=0.9,
        reduction="sum",
    )
    torch.testing.assert_close(x.grad[[1, 2, 4, 5]].double(), want, rtol=1e-4, atol=1e-7)


def test_non_finite_margin_in_one_branch_leaves_the_other_branch_finite():
    """Per-branch statistics are over that branch's pairs only (masked selection)."""
    pred, target, ref = _inputs(10, (8, 5))
    uncond = torch.tensor([True, False, True, False])
    ref_err = sk.per_sample_error(ref, target)
    ref_err[0] = float("inf")  # pair 0: null-prompt branch
    s = sk.preference_loss_with_stats(
        pred, target, ref_err=ref_err, beta=5.0, uncond=uncond
    ).stats.as_dict()
    assert not math.isfinite(s["logp_proxy_uncond"]) and not math.isfinite(s["logp_proxy"])
    assert math.isfinite(s["logp_proxy_cond"]) and math.isfinite(s["accuracy_cond"])
    assert s["count_cond"] == 2 and s["count_uncond"] == 2 and s["nonfinite"] == 1
    ref_err[0] = float("nan")
    s = sk.preference_stats(sk.per_sample_error(pred, target), ref_err, uncond=uncond).as_dict()
    assert math.isfinite(s["logp_proxy_cond"]) and math.isnan(s["logp_proxy_uncond"])
