"""diffusers' ``--loss_type`` family (sigmoid, hinge, ipo) on the same margin and Bounded-DPO
mixture: the torch reference against the float64 oracle (and gradcheck), the gradient
coefficients every fused backend uses, the Triton kernels, and the dispatch self-check.

Pair loss as a function of z = −(β/2)(m_a − m̃_b), β′ = β/2 (docs/objectives.md):
sigmoid −log σ(z); hinge relu(1 − z); ipo (z/β′ − 1/(2β′))².
"""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

import snpo_kernels as sk
from snpo_kernels import dispatch
from snpo_kernels.reference import gradient_coefficients, pair_logits, per_sample_error
from snpo_kernels.validation import validate_inputs

from . import tolerances as tol
from .oracle import oracle

LOSS_TYPES = ["sigmoid", "hinge", "ipo"]


def make_inputs(shape, dtype=torch.float32, *, seed: int, spread=0.05):
    """pred close to ref so that β·margin is O(1); seeded."""
    g = torch.Generator().manual_seed(seed)
    target = torch.randn(shape, generator=g, dtype=torch.float64)
    ref = target + torch.randn(shape, generator=g, dtype=torch.float64)
    pred = ref + spread * torch.randn(shape, generator=g, dtype=torch.float64)
    p = shape[0] // 2
    swap = torch.rand(p, generator=g) < 0.5
    weight = 0.5 + torch.rand(p, generator=g, dtype=torch.float64)
    return pred.to(dtype), target.to(dtype), ref.to(dtype), swap, weight


def _run(pred, target, backend, **kw):
    x = pred.detach().clone().requires_grad_(True)
    loss = sk.preference_loss(x, target, backend=backend, **kw)
    (grad,) = torch.autograd.grad(loss.sum(), x)
    return loss.detach(), grad


def _check_against_oracle(pred, target, loss, grad, kw, grad_dtype):
    """|Δ| within the condition-number bounds of tests/kernels/tolerances.py."""
    want, want_grad, e_th, e_rf = oracle(pred, target, reduction="none", **kw)
    n = pred[0].numel()
    s_c, k_c = tol.pair_conditions(
        e_th,
        e_rf,
        kw.get("swap"),
        kw.get("weight"),
        kw["beta"],
        kw["lam"],
        kw.get("loss_type", "sigmoid"),
    )
    tol.assert_within(loss, want, tol.loss_bounds(want, s_c, n), "loss")
    tol.assert_within(grad, want_grad, tol.grad_bounds(want_grad, k_c, n, grad_dtype), "grad")


# ------------------------------------------------------------------ the formulas themselves
def test_each_loss_type_is_diffusers_formula():
    """diffusers' train_diffusion_dpo.py: logits = ref_diff − model_diff; sigmoid
    −logsigmoid(β′·logits), hinge relu(1 − β′·logits), ipo (logits − 1/(2β′))² (the script
    writes args.beta, which it never defines; β′ = --beta_dpo is meant)."""
    pred, target, ref, _, _ = make_inputs((8, 4, 4, 4), torch.float64, seed=101, spread=0.02)
    beta_prime = 2500.0
    e_m = (pred - target).pow(2).mean(dim=[1, 2, 3])
    e_r = (ref - target).pow(2).mean(dim=[1, 2, 3])
    model_diff = e_m.chunk(2)[0] - e_m.chunk(2)[1]
    ref_diff = e_r.chunk(2)[0] - e_r.chunk(2)[1]
    logits = ref_diff - model_diff
    want = {
        "sigmoid": -F.logsigmoid(beta_prime * logits).mean(),
        "hinge": torch.relu(1 - beta_prime * logits).mean(),
        "ipo": ((logits - 1 / (2 * beta_prime)) ** 2).mean(),
    }
    for lt, w in want.items():
        got = sk.preference_loss(
            pred, target, ref, beta_logit=beta_prime, loss_type=lt, backend="torch"
        )
        torch.testing.assert_close(got, w, rtol=1e-12, atol=1e-300, msg=lt)


def test_values_at_identical_policy_and_reference():
    """z = 0: sigmoid ln 2, hinge 1, ipo 1/(4β′²) (= (0 − 1/(2β′))²)."""
    pred, target, _, _, _ = make_inputs((4, 3), seed=102)
    want = {"sigmoid": math.log(2.0), "hinge": 1.0, "ipo": 1.0 / (4 * 2500.0**2)}
    for lt, w in want.items():
        got = sk.preference_loss(pred, target, pred, beta=5000.0, loss_type=lt)
        assert got.item() == pytest.approx(w, rel=1e-6), lt


@pytest.mark.parametrize("loss_type", LOSS_TYPES)
@pytest.mark.parametrize("lam", [1.0, 0.9])
@pytest.mark.parametrize("variant", ["plain", "swap+weight", "ref_err"])
def test_reference_matches_oracle(loss_type, lam, variant):
    pred, target, ref, swap, weight = make_inputs((6, 4, 8, 8), seed=103)
    kw = dict(beta=20.0, lam=lam, loss_type=loss_type)
    if variant != "plain":
        kw.update(swap=swap, weight=weight.float())
    kw.update(ref_err=per_sample_error(ref, target)) if variant == "ref_err" else kw.update(
        ref_pred=ref
    )
    loss, grad = _run(pred, target, "torch", reduction="none", **kw)
    _check_against_oracle(pred, target, loss, grad, kw, torch.float32)


@pytest.mark.parametrize("loss_type", LOSS_TYPES)
@pytest.mark.parametrize("lam", [1.0, 0.9])
def test_gradcheck_float64(loss_type, lam):
    """Autograd through the reference against finite differences (hinge: inputs chosen with
    every z at least 0.05 from the kink z = 1, far beyond gradcheck's eps = 1e-6)."""
    pred, target, ref, swap, weight = make_inputs((8, 2, 3), torch.float64, seed=104, spread=0.3)
    beta = 3.0
    z, _, _ = pair_logits(
        per_sample_error(pred, target), per_sample_error(ref, target), swap, weight, beta, lam
    )
    assert bool(((z - 1.0).abs() > 0.05).all()), z
    pred.requires_grad_(True)

    def f(p):
        return sk.preference_loss(
            p, target, ref, swap=swap, weight=weight, beta=beta, lam=lam, loss_type=loss_type
        )

    assert torch.autograd.gradcheck(f, (pred,))


@pytest.mark.parametrize("loss_type", LOSS_TYPES)
@pytest.mark.parametrize("lam", [1.0, 0.5])
def test_gradient_coefficients_equal_autograd(loss_type, lam):
    """c_i (what the fused kernels write, and the self-check's tolerance uses) equals
    ∂loss/∂e_θ,i from autograd through the reference, in float64."""
    g = torch.Generator().manual_seed(105)
    e_ref = 0.5 + torch.rand(10, generator=g, dtype=torch.float64)
    e_th = (e_ref + 0.3 * torch.randn(10, generator=g, dtype=torch.float64)).requires_grad_()
    swap = torch.rand(5, generator=g) < 0.5
    w = 0.5 + torch.rand(5, generator=g, dtype=torch.float64)
    z, _, _ = pair_logits(e_th, e_ref, swap, w, 4.0, lam)
    loss = sk.reference.pair_loss(z, 4.0, loss_type).mean()
    (want,) = torch.autograd.grad(loss, e_th)
    got = gradient_coefficients(e_th.detach(), e_ref, swap, w, 4.0, lam, 1.0 / 5, loss_type)
    torch.testing.assert_close(got, want, rtol=1e-12, atol=1e-15)


def test_hinge_and_ipo_gradients_are_not_the_sigmoids():
    """Saturated hinge pairs (z > 1) get no gradient; ipo pushes z back towards ½ from above."""
    pred, target, ref, _, _ = make_inputs((4, 16), torch.float64, seed=106, spread=0.3)
    kw = dict(beta=200.0)
    e_th, e_rf = per_sample_error(pred, target), per_sample_error(ref, target)
    z, _, _ = pair_logits(e_th, e_rf, None, None, 200.0, 1.0)
    for lt in LOSS_TYPES:
        c = gradient_coefficients(e_th, e_rf, None, None, 200.0, 1.0, 1.0, lt)
        if lt == "hinge":
            assert bool((c[:2][z > 1.0] == 0).all())
        if lt == "ipo":
            assert bool(((c[:2] < 0) == (z > 0.5)).all())
    # and the losses differ from one another
    vals = {
        lt: sk.preference_loss(pred, target, ref, loss_type=lt, **kw).item() for lt in LOSS_TYPES
    }
    assert len(set(vals.values())) == 3


def test_unknown_loss_type_is_refused_naming_it():
    pred, target, ref, _, _ = make_inputs((4, 3), seed=107)
    with pytest.raises(ValueError, match="loss_type must be one of"):
        sk.preference_loss(pred, target, ref, beta=1.0, loss_type="dpo")
    with pytest.raises(ValueError, match="loss_type must be one of"):
        sk.PreferenceLoss(beta=1.0, loss_type="cpo")


def test_module_passes_loss_type():
    pred, target, ref, _, _ = make_inputs((4, 3), seed=108)
    mod = sk.PreferenceLoss(beta=50.0, lam=0.9, loss_type="ipo")
    want = sk.preference_loss(pred, target, ref, beta=50.0, lam=0.9, loss_type="ipo")
    assert mod(pred, target, ref).item() == want.item()
    assert "loss_type='ipo'" in repr(mod)


# ------------------------------------------------------------------ Triton (interpreter on CPU)
@pytest.mark.parametrize("loss_type", LOSS_TYPES)
@pytest.mark.parametrize("lam", [1.0, 0.9])
@pytest.mark.parametrize("reduction", ["mean", "none"])
def test_triton_matches_oracle(loss_type, lam, reduction):
    pytest.importorskip("triton")
    if "triton" not in sk.available_backends("cpu"):
        pytest.skip("triton backend unavailable here")
    from snpo_kernels.triton import op

    pred, target, ref, swap, weight = make_inputs((6, 4, 8, 8), seed=109)
    kw = dict(ref_pred=ref, swap=swap, weight=weight.float(), beta=20.0, lam=lam)
    kw["loss_type"] = loss_type
    with op.launch_overrides(block=128):
        loss, grad = _run(pred, target, "triton", reduction="none", **kw)
    _check_against_oracle(pred, target, loss, grad, kw, torch.float32)
    # the reduction path (one more launch parameter) against the torch backend
    got = sk.preference_loss(pred, target, backend="triton", reduction=reduction, **kw)
    want = sk.preference_loss(pred, target, backend="torch", reduction=reduction, **kw)
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-7)


@pytest.mark.parametrize("loss_type", LOSS_TYPES)
def test_self_check_passes_for_each_loss_type(loss_type):
    """dispatch.run_self_check compares triton with torch using the loss type's own
    coefficients (and ipo's condition number): a correct kernel passes."""
    if "triton" not in sk.available_backends("cpu"):
        pytest.skip("triton backend unavailable here")
    pred, target, ref, swap, weight = make_inputs((6, 3, 5), seed=110)
    x = validate_inputs(pred, target, ref, None, swap, weight.float(), 20.0, 0.9, "mean", loss_type)
    verdict = dispatch.run_self_check("triton", x)
    assert verdict.ok, verdict.detail
    assert dispatch.shape_class("triton", x)[-1] == loss_type
