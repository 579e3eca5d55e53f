"""The PyTorch reference against an independent float64 oracle, its properties, and validation."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

import snpo_kernels as sk
from snpo_kernels.reference import bounded_margin

from .extreme import extreme_failures
from .oracle import oracle

SHAPES = [(2, 1), (2, 3, 5, 7), (6, 4, 8, 8), (4, 1027)]


def make_inputs(shape, dtype=torch.float32, *, seed: int, spread=0.05):
    """pred close to ref_pred so that margins are small and β·margin is O(1); seeded."""
    g = torch.Generator().manual_seed(seed)
    target = torch.randn(shape, generator=g, dtype=torch.float64)
    ref = target + torch.randn(shape, generator=g, dtype=torch.float64)
    pred = ref + spread * torch.randn(shape, generator=g, dtype=torch.float64)
    p = shape[0] // 2
    swap = torch.rand(p, generator=g) < 0.5
    weight = 0.5 + torch.rand(p, generator=g, dtype=torch.float64)
    return pred.to(dtype), target.to(dtype), ref.to(dtype), swap, weight


@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("lam", [1.0, 0.9, 0.5])
@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
@pytest.mark.parametrize("variant", ["plain", "swap", "weight", "swap+weight", "ref_err"])
def test_values_and_gradients_match_oracle(shape, lam, reduction, variant):
    pred, target, ref, swap, weight = make_inputs(shape, seed=21)
    beta = 20.0
    kw = {}
    if "swap" in variant:
        kw["swap"] = swap
    if "weight" in variant:
        kw["weight"] = weight.float()
    ref_kw = (
        {"ref_err": sk.per_sample_error(ref, target)} if variant == "ref_err" else {"ref_pred": ref}
    )
    pred.requires_grad_(True)
    loss = sk.preference_loss(
        pred, target, **ref_kw, beta=beta, lam=lam, reduction=reduction, backend="torch", **kw
    )
    want, want_grad, _, _ = oracle(
        pred,
        target,
        ref_pred=ref_kw.get("ref_pred"),
        ref_err=ref_kw.get("ref_err"),
        swap=kw.get("swap"),
        weight=kw.get("weight"),
        beta=beta,
        lam=lam,
        reduction=reduction,
    )
    assert loss.dtype == torch.float32
    if reduction == "none":
        assert loss.shape == (shape[0] // 2,)
        torch.testing.assert_close(
            loss.double(), torch.tensor(want, dtype=torch.float64), rtol=1e-5, atol=1e-6
        )
        loss.sum().backward()
    else:
        assert loss.shape == ()
        assert math.isclose(loss.item(), want, rel_tol=1e-5, abs_tol=1e-6)
        loss.backward()
    torch.testing.assert_close(pred.grad.double(), want_grad, rtol=1e-4, atol=1e-7)


@pytest.mark.parametrize("lam", [1.0, 0.9, 0.5])
def test_float64_stays_float64_and_matches_oracle_tightly(lam):
    pred, target, ref, swap, weight = make_inputs((6, 3, 11), torch.float64, seed=22)
    pred.requires_grad_(True)
    loss = sk.preference_loss(pred, target, ref, swap=swap, weight=weight, beta=50.0, lam=lam)
    assert loss.dtype == torch.float64
    loss.backward()
    want, want_grad, _, _ = oracle(pred, target, ref, swap=swap, weight=weight, beta=50.0, lam=lam)
    assert math.isclose(loss.item(), want, rel_tol=1e-12)
    torch.testing.assert_close(pred.grad, want_grad, rtol=1e-10, atol=1e-14)


@pytest.mark.parametrize("lam", [1.0, 0.9, 0.5])
@pytest.mark.parametrize("use_ref_err", [False, True])
def test_gradcheck_float64(lam, use_ref_err):
    pred, target, ref, swap, weight = make_inputs((4, 2, 3), torch.float64, seed=23, spread=0.3)
    pred.requires_grad_(True)
    ref_kw = {"ref_err": sk.per_sample_error(ref, target)} if use_ref_err else {"ref_pred": ref}

    def f(p):
        return sk.preference_loss(p, target, **ref_kw, swap=swap, weight=weight, beta=3.0, lam=lam)

    assert torch.autograd.gradcheck(f, (pred,))
    assert torch.autograd.gradgradcheck(f, (pred,))


def test_lambda_one_equals_diffusion_dpo_code():
    """Diffusion-DPO's train.py: inside = -0.5·β·(model_diff − ref_diff); loss = -logsigmoid(inside).mean()."""
    pred, target, ref, _, _ = make_inputs((8, 4, 8, 8), seed=24)
    beta = 5000.0
    model_losses = (pred - target).pow(2).mean(dim=[1, 2, 3])
    model_w, model_l = model_losses.chunk(2)
    ref_losses = (ref - target).pow(2).mean(dim=[1, 2, 3])
    ref_w, ref_l = ref_losses.chunk(2)
    inside = -0.5 * beta * ((model_w - model_l) - (ref_w - ref_l))
    want = -F.logsigmoid(inside).mean()
    got = sk.preference_loss(pred, target, ref, beta=beta, lam=1.0)
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("lam", [1.0, 0.9])
def test_swapping_every_pair_equals_reversed_labels(lam):
    pred, target, ref, _, weight = make_inputs((6, 5, 7), seed=25)
    p = 3
    swap = torch.ones(p, dtype=torch.bool)

    def rev(t):
        return torch.cat([t[p:], t[:p]])

    pred.requires_grad_(True)
    got = sk.preference_loss(
        pred, target, ref, swap=swap, weight=weight, beta=30.0, lam=lam, reduction="none"
    )
    (g_got,) = torch.autograd.grad(got.sum(), pred)
    pred_r = rev(pred.detach()).requires_grad_(True)
    want = sk.preference_loss(
        pred_r, rev(target), rev(ref), weight=weight, beta=30.0, lam=lam, reduction="none"
    )
    (g_want,) = torch.autograd.grad(want.sum(), pred_r)
    torch.testing.assert_close(got, want)
    torch.testing.assert_close(g_got, rev(g_want))


@pytest.mark.parametrize("lam", [0.99, 0.9, 0.5, 0.1])
def test_bounded_margin_is_bounded_and_monotone(lam):
    m = torch.cat([torch.linspace(-1e6, 1e6, 2001), torch.linspace(-50, 50, 2001)]).sort().values
    mt = bounded_margin(m, lam)
    assert torch.isfinite(mt).all()
    bound = -math.log1p(-lam)
    assert (mt <= bound + 1e-5).all()
    assert (mt[1:] >= mt[:-1] - 1e-6).all()  # non-decreasing in m
    tol = 1e-6 * m.abs() + 1e-5
    # the mixture pulls the margin towards 0: m̃ ≤ m for m ≥ 0 and m ≤ m̃ ≤ 0 for m ≤ 0
    assert (mt[m >= 0] <= m[m >= 0] + tol[m >= 0]).all()
    assert (mt[m <= 0] >= m[m <= 0] - tol[m <= 0]).all()
    assert (mt[m <= 0] <= tol[m <= 0]).all()
    torch.testing.assert_close(bounded_margin(m, 1.0), m)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("lam", [1.0, 0.9])
@pytest.mark.parametrize("sign", [1.0, -1.0])
def test_extreme_margins_are_finite(dtype, lam, sign):
    """Margins up to ±1e6 (pred or ref far from target): loss and gradient finite and equal
    to the oracle pair by pair, within the per-dtype bounds of tests/kernels/tolerances.py.

    (float16 is left out on purpose: the true gradient here, ~1e7, exceeds its range.)"""
    assert extreme_failures("torch", dtype, lam, sign) == []


@pytest.mark.parametrize(
    "mutation",
    [
        dict(beta_factor=1.009),
        dict(beta_factor=0.991),
        dict(weight_factor=(0, 1.5)),
        dict(weight_factor=(1, 1.5)),
        dict(weight_factor=(2, 1.5)),
        dict(drop=0),
        dict(drop=1),
        dict(drop=2),
    ],
    ids=lambda m: "-".join(f"{k}={v}" for k, v in m.items()),
)
def test_extreme_margin_comparison_catches_mutations(mutation):
    """The per-pair comparison must see a β off by 0.9 %, one weight ×1.5 and a dropped pair.
    A weight change on a saturated pair (ℓ_k = 0, c = 0 exactly, in float64 too) is
    invisible in one sign; every mutation is caught in at least one sign."""
    for dtype in (torch.float32, torch.bfloat16):
        for lam in (1.0, 0.9):
            caught = [bool(extreme_failures("torch", dtype, lam, s, **mutation)) for s in (1, -1)]
            assert any(caught), (dtype, lam, mutation)
            if "weight_factor" not in mutation:
                assert all(caught), (dtype, lam, mutation)


def test_gradient_with_random_grad_output_and_in_expression():
    pred, target, ref, swap, weight = make_inputs((6, 9), seed=26)
    pred.requires_grad_(True)
    per_pair = sk.preference_loss(
        pred, target, ref, swap=swap, weight=weight, beta=20.0, lam=0.9, reduction="none"
    )
    go = torch.randn(3, generator=torch.Generator().manual_seed(27))
    (g,) = torch.autograd.grad(per_pair, pred, go)
    _, want_grad, _, _ = oracle(
        pred, target, ref, swap=swap, weight=weight, beta=20.0, lam=0.9, reduction="sum"
    )
    # d(Σ go_k ℓ_k)/dpred: scale each pair's contribution by go_k
    want = torch.zeros_like(want_grad)
    for k in range(3):
        single = torch.zeros(3, dtype=torch.bool)
        single[k] = True
        w_k = weight * single
        _, gk, _, _ = oracle(
            pred, target, ref, swap=swap, weight=w_k, beta=20.0, lam=0.9, reduction="sum"
        )
        want += go[k].double() * gk
    torch.testing.assert_close(g.double(), want, rtol=1e-4, atol=1e-7)
    assert want_grad.abs().sum() > 0

    pred2 = pred.detach().clone().requires_grad_(True)
    total = (
        3 * sk.preference_loss(pred2, target, ref, swap=swap, weight=weight, beta=20.0, lam=0.9)
        + pred2.square().sum()
    )
    total.backward()
    _, g_mean, _, _ = oracle(pred, target, ref, swap=swap, weight=weight, beta=20.0, lam=0.9)
    # float32 sum of O(1) terms that may cancel: tolerance from the terms' magnitude (~4 ulp)
    terms = (3 * g_mean).abs() + (2 * pred.detach().double()).abs()
    err = (pred2.grad.double() - (3 * g_mean + 2 * pred.detach().double())).abs()
    assert (err <= 1e-4 * terms + 1e-7).all(), float(err.max())


def test_stats_match_definition():
    pred, target, ref, swap, weight = make_inputs((10, 33), seed=3)
    out = sk.preference_loss_with_stats(pred, target, ref, swap=swap, weight=weight, beta=5.0)
    _, _, e_th, e_rf = oracle(pred, target, ref, swap=swap, weight=weight, beta=5.0)
    p = 5
    acc = {False: [], True: []}
    lp = {False: [], True: []}
    for k in range(p):
        a, b = (p + k, k) if swap[k] else (k, p + k)
        m_a = float(weight[k]) * (e_th[a] - e_rf[a])
        m_b = float(weight[k]) * (e_th[b] - e_rf[b])
        acc[bool(swap[k])].append(1.0 if m_a < m_b else 0.5 if m_a == m_b else 0.0)
        lp[bool(swap[k])].append(-m_a)
    s = out.stats.as_dict()
    assert s["count_cond"] == len(acc[False]) and s["count_uncond"] == len(acc[True])
    for branch, key in ((False, "cond"), (True, "uncond")):
        if acc[branch]:
            assert math.isclose(s[f"accuracy_{key}"], sum(acc[branch]) / len(acc[branch]))
            assert math.isclose(
                s[f"logp_proxy_{key}"],
                sum(lp[branch]) / len(lp[branch]),
                rel_tol=1e-5,
                abs_tol=1e-6,
            )
    # margins are differences of O(1) float32 errors: absolute tolerance ~ float32 epsilon
    assert math.isclose(s["logp_proxy"], sum(lp[False] + lp[True]) / p, rel_tol=1e-5, abs_tol=1e-6)
    torch.testing.assert_close(out.e_theta.double(), torch.tensor(e_th, dtype=torch.float64))
    torch.testing.assert_close(out.e_ref.double(), torch.tensor(e_rf, dtype=torch.float64))
    assert out.backend == "torch"


def test_stats_empty_branch_is_nan_with_zero_count():
    pred, target, ref, _, _ = make_inputs((4, 8), seed=28)
    s = sk.preference_loss_with_stats(pred, target, ref, beta=5.0).stats.as_dict()
    assert s["count_uncond"] == 0 and math.isnan(s["accuracy_uncond"])
    assert s["count_cond"] == 2 and 0.0 <= s["accuracy_cond"] <= 1.0


def test_module_wrapper_matches_function():
    pred, target, ref, swap, weight = make_inputs((6, 4, 4), seed=29)
    mod = sk.PreferenceLoss(beta=100.0, lam=0.9)
    torch.testing.assert_close(
        mod(pred, target, ref, swap=swap, weight=weight),
        sk.preference_loss(pred, target, ref, swap=swap, weight=weight, beta=100.0, lam=0.9),
    )
    assert "lam=0.9" in repr(mod)
    with pytest.raises(ValueError, match="lam must lie in"):
        sk.PreferenceLoss(beta=1.0, lam=1.5)


# ---------------------------------------------------------------- validation errors
def _ok():
    p = torch.zeros(4, 3)
    return dict(pred=p, target=torch.zeros(4, 3), ref_pred=torch.zeros(4, 3), beta=1.0)


@pytest.mark.parametrize(
    "change, exc, match",
    [
        (
            dict(target=torch.zeros(4, 4)),
            ValueError,
            r"target has shape \(4, 4\) but pred has shape \(4, 3\)",
        ),
        (
            dict(pred=torch.zeros(3, 3), target=torch.zeros(3, 3), ref_pred=torch.zeros(3, 3)),
            ValueError,
            "odd",
        ),
        (dict(ref_pred=torch.zeros(4, 2)), ValueError, "ref_pred has shape"),
        (dict(ref_pred=None), ValueError, "neither was given"),
        (dict(ref_err=torch.zeros(4)), ValueError, "both were given"),
        (
            dict(ref_pred=None, ref_err=torch.zeros(3)),
            ValueError,
            r"ref_err has shape \(3,\); expected \(4,\)",
        ),
        (dict(lam=0.0), ValueError, r"lam must lie in \(0, 1\]"),
        (dict(lam=1.1), ValueError, r"lam must lie in \(0, 1\]"),
        (dict(lam=-0.5), ValueError, r"lam must lie in \(0, 1\]"),
        (dict(beta=0.0), ValueError, "beta must be a finite number > 0"),
        (dict(beta=-3.0), ValueError, "beta must be a finite number > 0"),
        (dict(beta=torch.tensor(1.0)), TypeError, "beta must be a Python number"),
        (
            dict(swap=torch.zeros(3, dtype=torch.bool)),
            ValueError,
            r"swap has shape \(3,\); expected \(2,\)",
        ),
        (dict(swap=torch.zeros(2)), TypeError, "swap has dtype torch.float32; expected torch.bool"),
        (
            dict(weight=torch.ones(3)),
            ValueError,
            r"weight has shape \(3,\); expected a scalar or \(2,\)",
        ),
        (dict(weight=torch.ones(2, dtype=torch.int64)), TypeError, "weight has dtype torch.int64"),
        (dict(pred=torch.zeros(4, 3, dtype=torch.int32)), TypeError, "pred has dtype torch.int32"),
        (
            dict(target=torch.zeros(4, 3, dtype=torch.int64)),
            TypeError,
            "target has dtype torch.int64",
        ),
        (
            dict(ref_pred=torch.zeros(4, 3, dtype=torch.uint8)),
            TypeError,
            "ref_pred has dtype torch.uint8",
        ),
        (
            dict(target=torch.zeros(4, 3, device="meta")),
            ValueError,
            "target is on meta but pred is on cpu",
        ),
        (dict(reduction="avg"), ValueError, "reduction must be one of"),
        (
            dict(pred=torch.zeros(0, 3), target=torch.zeros(0, 3), ref_pred=torch.zeros(0, 3)),
            ValueError,
            "non-empty batch",
        ),
        (dict(backend="tpu"), ValueError, "unknown backend 'tpu'"),
    ],
)
def test_validation_errors_name_the_problem(change, exc, match):
    kw = _ok()
    kw.update(change)
    with pytest.raises(exc, match=match):
        sk.preference_loss(**kw)


def test_cuda_backend_refused_on_cpu_with_reason():
    kw = _ok()
    with pytest.raises(sk.BackendUnavailableError, match='backend "cuda" cannot run here'):
        sk.preference_loss(**kw, backend="cuda")


def test_auto_on_cpu_is_torch():
    assert sk.resolve_backend("auto", torch.device("cpu"), torch.float32) == "torch"
    assert "torch" in sk.available_backends("cpu")


def test_stats_split_by_branch_mask_when_given():
    """DPO keeps normal labels on the null branch: the branch mask, not swap, splits the stats."""
    pred, target, ref, _, _ = make_inputs((8, 16), seed=5)
    uncond = torch.tensor([True, False, True, False])
    out = sk.preference_loss_with_stats(pred, target, ref, beta=5.0, uncond=uncond)
    by_swap = sk.preference_loss_with_stats(pred, target, ref, beta=5.0, swap=uncond)
    s = out.stats.as_dict()
    assert s["count_uncond"] == 2 and s["count_cond"] == 2
    torch.testing.assert_close(out.loss, sk.preference_loss(pred, target, ref, beta=5.0))
    assert not torch.allclose(out.loss, by_swap.loss)  # the mask does not swap labels
    with pytest.raises(TypeError, match="uncond has dtype torch.float32; expected torch.bool"):
        sk.preference_loss_with_stats(pred, target, ref, beta=5.0, uncond=torch.ones(4))
    with pytest.raises(ValueError, match=r"uncond has shape \(3,\); expected \(4,\)"):
        sk.preference_loss_with_stats(pred, target, ref, beta=5.0, uncond=uncond[:3])
