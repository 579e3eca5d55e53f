"""β conventions: each published script's loss, written as that script writes it, equals
preference_loss with the keyword (or beta_from) the docs give for it (docs/objectives.md,
"β conventions"). Exactly one of beta / beta_logit may be given."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

import snpo_kernels as sk


def _errors(seed: int):
    """Seeded (pred, target, ref) with policy ≈ reference, and the scripts' per-sample MSEs."""
    g = torch.Generator().manual_seed(seed)
    target = torch.randn(8, 4, 8, 8, generator=g, dtype=torch.float64)
    ref = target + torch.randn(8, 4, 8, 8, generator=g, dtype=torch.float64)
    pred = ref + 0.01 * torch.randn(8, 4, 8, 8, generator=g, dtype=torch.float64)
    model_losses = F.mse_loss(pred, target, reduction="none").mean(dim=[1, 2, 3])
    ref_losses = F.mse_loss(ref, target, reduction="none").mean(dim=[1, 2, 3])
    mw, ml = model_losses.chunk(2)
    rw, rl = ref_losses.chunk(2)
    return pred, target, ref, mw - ml, rw - rl


def _close(got, want):
    # float64 on both sides, the same errors: a few ulps of a loss of O(1)
    torch.testing.assert_close(got, want, rtol=1e-12, atol=0.0)


def test_diffusion_dpo_train_py():
    """Diffusion-DPO train.py (SD1.5 and SDXL): inside = −0.5·β·(model_diff − ref_diff)."""
    pred, target, ref, model_diff, ref_diff = _errors(1)
    beta_dpo = 5000.0
    want = -F.logsigmoid(-0.5 * beta_dpo * (model_diff - ref_diff)).mean()
    _close(sk.preference_loss(pred, target, ref, beta=beta_dpo), want)
    _close(
        sk.preference_loss(pred, target, ref, beta=sk.beta_from(beta_dpo, "diffusion_dpo")), want
    )


def test_diffusers_sd15_script():
    """diffusers train_diffusion_dpo.py: logits = ref_diff − model_diff;
    −logsigmoid(β′·logits), default β′ = 2500: beta_logit=2500 (= beta=5000)."""
    pred, target, ref, model_diff, ref_diff = _errors(2)
    beta_dpo = 2500.0
    want = -F.logsigmoid(beta_dpo * (ref_diff - model_diff)).mean()
    _close(sk.preference_loss(pred, target, ref, beta_logit=beta_dpo), want)
    _close(
        sk.preference_loss(pred, target, ref, beta=sk.beta_from(beta_dpo, "diffusers_sd15")), want
    )
    _close(sk.preference_loss(pred, target, ref, beta=2 * beta_dpo), want)
    # the mistake this guards against: the same number as beta is half the strength
    wrong = sk.preference_loss(pred, target, ref, beta=beta_dpo)
    assert abs(wrong.item() - want.item()) > 1e-3


def test_diffusers_sdxl_script():
    """diffusers train_diffusion_dpo_sdxl.py: scale_term = −0.5·β_dpo (default 5000),
    inside = scale_term·(model_diff − ref_diff): the Diffusion-DPO form, beta=5000."""
    pred, target, ref, model_diff, ref_diff = _errors(3)
    beta_dpo = 5000.0
    scale_term = -0.5 * beta_dpo
    want = -F.logsigmoid(scale_term * (model_diff - ref_diff)).mean()
    _close(sk.preference_loss(pred, target, ref, beta=beta_dpo), want)
    _close(
        sk.preference_loss(pred, target, ref, beta=sk.beta_from(beta_dpo, "diffusers_sdxl")), want
    )


def test_diffusion_npo_sd15_script():
    """Diffusion-NPO DPO-DPO-NPO/train_sd15.py (run_sd15.sh: --beta_dpo=500): the diffusers
    SD1.5 form on reversed pairs: logits = ref_diff − model_diff with winner and loser
    exchanged; −logsigmoid(β′·logits). Here: swap all pairs, beta_logit=500."""
    pred, target, ref, model_diff, ref_diff = _errors(4)
    beta_dpo = 500.0
    want = -F.logsigmoid(beta_dpo * ((-ref_diff) - (-model_diff))).mean()
    swap = torch.ones(4, dtype=torch.bool)
    _close(sk.preference_loss(pred, target, ref, swap=swap, beta_logit=beta_dpo), want)
    got = sk.preference_loss(
        pred, target, ref, swap=swap, beta=sk.beta_from(beta_dpo, "diffusion_npo")
    )
    _close(got, want)


def test_exactly_one_beta_keyword():
    pred, target, ref, _, _ = _errors(5)
    with pytest.raises(TypeError, match="got both"):
        sk.preference_loss(pred, target, ref, beta=5000.0, beta_logit=2500.0)
    with pytest.raises(TypeError, match="give exactly one of beta="):
        sk.preference_loss(pred, target, ref)
    with pytest.raises(TypeError, match="got both"):
        sk.PreferenceLoss(beta=1.0, beta_logit=1.0)
    with pytest.raises(TypeError, match="beta_logit must be a Python number"):
        sk.preference_loss(pred, target, ref, beta_logit="2500")
    with pytest.raises(ValueError, match="beta must be a finite number > 0"):
        sk.preference_loss(pred, target, ref, beta_logit=-1.0)


def test_module_and_stats_accept_beta_logit():
    pred, target, ref, _, _ = _errors(6)
    mod = sk.PreferenceLoss(beta_logit=2500.0, lam=0.9)
    assert mod.beta == 5000.0
    want = sk.preference_loss(pred, target, ref, beta=5000.0, lam=0.9)
    _close(mod(pred, target, ref), want)
    out = sk.preference_loss_with_stats(pred, target, ref, beta_logit=2500.0, lam=0.9)
    _close(out.loss, want)


def test_beta_from_refuses_unknown_scripts_naming_them():
    with pytest.raises(ValueError, match="script must be one of"):
        sk.beta_from(2500, "diffusers")
    assert sk.beta_from(2500, "diffusers_sd15") == 5000.0
    assert set(sk.BETA_SCRIPTS) == {
        "diffusion_dpo",
        "diffusers_sd15",
        "diffusers_sdxl",
        "diffusion_npo",
    }
