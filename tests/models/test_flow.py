"""Flow-matching math (snpo/models/flow.py) against independent float64 computations."""

from __future__ import annotations

import math
from statistics import NormalDist

import pytest
import torch

from snpo.models import flow


def uniforms(n: int, seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.rand(n, generator=g, dtype=torch.float64).clamp(1e-9, 1 - 1e-9)


def test_logit_normal_matches_scalar_formula():
    u = uniforms(200)
    for m, s in [(0.0, 1.0), (0.5, 0.8), (-1.0, 2.0)]:
        got = flow.sigma_logit_normal(u, m, s)
        want = [1.0 / (1.0 + math.exp(-(m + s * NormalDist().inv_cdf(x)))) for x in u.tolist()]
        want = torch.tensor(want, dtype=torch.float64).clamp(1e-6, 1 - 1e-6)
        torch.testing.assert_close(got, want, rtol=0, atol=1e-12)


def test_uniform_and_mode_match_scalar_formula():
    u = uniforms(200, seed=1)
    torch.testing.assert_close(flow.sigma_uniform(u), u.clamp(1e-6, 1 - 1e-6), rtol=0, atol=0)
    s = 1.29
    want = [1 - x - s * (math.cos(math.pi * x / 2) ** 2 - 1 + x) for x in u.tolist()]
    want = torch.tensor(want, dtype=torch.float64).clamp(1e-6, 1 - 1e-6)
    torch.testing.assert_close(flow.sigma_mode(u, s), want, rtol=0, atol=1e-14)


def test_mode_is_symmetric_so_index_convention_does_not_matter():
    """1 − f_mode(u) = f_mode(1 − u): diffusers' descending-index lookup gives the same law."""
    u = uniforms(100, seed=2)
    torch.testing.assert_close(1 - flow.sigma_mode(u), flow.sigma_mode(1 - u), rtol=0, atol=1e-12)


def test_shift_matches_formula_and_the_scheduler():
    from diffusers import FlowMatchEulerDiscreteScheduler

    u = uniforms(100, seed=3)
    shift = 3.0
    want = torch.tensor(
        [shift * x / (1 + (shift - 1) * x) for x in u.tolist()], dtype=torch.float64
    )
    torch.testing.assert_close(
        flow.shift_sigma(u, shift), want.clamp(1e-6, 1 - 1e-6), atol=1e-14, rtol=0
    )
    # the scheduler's training sigmas are the same map applied to the grid t/1000
    sched = FlowMatchEulerDiscreteScheduler(num_train_timesteps=1000, shift=shift)
    grid = torch.arange(1000, 0, -1, dtype=torch.float64) / 1000
    ours = flow.shift_sigma(grid, shift).clamp(max=1.0)
    ours[0] = 1.0  # the scheduler's grid reaches σ = 1 exactly; ours stays inside (0, 1)
    torch.testing.assert_close(ours.float(), sched.sigmas[:1000].float(), atol=1e-6, rtol=0)


@pytest.mark.parametrize("sampler", flow.SIGMA_SAMPLERS)
@pytest.mark.parametrize("shift", [1.0, 3.0])
def test_sigma_strictly_inside_unit_interval(sampler, shift):
    u = torch.tensor([1e-300, 1e-12, 0.5, 1 - 1e-12, 1 - 2**-53], dtype=torch.float64)
    sigma = flow.sample_sigma(torch.cat([u, uniforms(1000)]), sampler, shift=shift)
    assert sigma.dtype == torch.float64
    assert bool(((sigma > 0) & (sigma < 1)).all())
    assert bool(((1 - sigma) > 0).all())


def test_logit_normal_moments():
    """logit(σ) ~ N(m, s²): sample mean within 5 standard errors, variance within 5 of its own."""
    n, m, s = 200_000, 0.3, 1.2
    sigma = flow.sigma_logit_normal(uniforms(n, seed=4), m, s)
    z = torch.logit(sigma)
    se_mean = s / math.sqrt(n)
    se_var = s**2 * math.sqrt(2.0 / (n - 1))
    assert abs(z.mean().item() - m) < 5 * se_mean
    assert abs(z.var().item() - s**2) < 5 * se_var + 1e-3  # the clamp trims ~1e-6 tails


def test_bad_inputs_raise():
    with pytest.raises(TypeError):
        flow.sigma_uniform(torch.rand(3))
    with pytest.raises(ValueError):
        flow.sigma_uniform(torch.tensor([0.0, 0.5], dtype=torch.float64))
    with pytest.raises(ValueError):
        flow.sample_sigma(uniforms(3), "cosine")
    with pytest.raises(ValueError):
        flow.sigma_mode(uniforms(3), scale=2.0)
    with pytest.raises(ValueError):
        flow.flow_weight(uniforms(3), "min_snr")


def test_noising_target_timestep_elementwise():
    g = torch.Generator().manual_seed(5)
    x0 = torch.randn(4, 3, 2, 2, generator=g, dtype=torch.float64)
    eps = torch.randn(4, 3, 2, 2, generator=g, dtype=torch.float64)
    sigma = uniforms(4, seed=6)
    x_t = flow.flow_noise(x0, eps, sigma)
    for i in range(4):
        s = sigma[i].item()
        for j, (a, e) in enumerate(zip(x0[i].flatten().tolist(), eps[i].flatten().tolist())):
            assert abs(x_t[i].flatten()[j].item() - ((1 - s) * a + s * e)) < 1e-14
    torch.testing.assert_close(flow.flow_target(x0, eps), eps - x0, rtol=0, atol=0)
    # v is the σ-derivative of x_t
    h = 1e-6
    dx = (flow.flow_noise(x0, eps, sigma + h) - flow.flow_noise(x0, eps, sigma - h)) / (2 * h)
    torch.testing.assert_close(dx, eps - x0, rtol=0, atol=1e-8)
    t = flow.flow_timestep(sigma)
    assert t.dtype == torch.float32
    torch.testing.assert_close(t, (1000 * sigma).float(), rtol=0, atol=0)


def test_weights_match_formulas():
    sigma = uniforms(50, seed=7).clamp(0.01, 0.99)
    assert flow.flow_weight(sigma, "constant") is None
    pairs = {
        "elbo": lambda s: (1 - s) / s,
        "sigma_sqrt": lambda s: s**-2,
        "cosmap": lambda s: 2 / (math.pi * (1 - 2 * s + 2 * s * s)),
    }
    for name, f in pairs.items():
        want = torch.tensor([f(s) for s in sigma.tolist()], dtype=torch.float32)
        torch.testing.assert_close(flow.flow_weight(sigma, name), want, rtol=1e-6, atol=0)


def test_elbo_weight_is_the_epsilon_elbo_integrand():
    """(1 − σ)/σ·‖v − v̂‖² = ½·(−dλ/dσ)·‖ε − ε̂‖², λ = log SNR = 2·log((1 − σ)/σ)."""
    g = torch.Generator().manual_seed(8)
    x0, eps, v_hat = (torch.randn(3, 5, generator=g, dtype=torch.float64) for _ in range(3))
    sigma = torch.tensor([0.2, 0.5, 0.9], dtype=torch.float64)
    x_t = flow.flow_noise(x0, eps, sigma)
    eps_hat = x_t + (1 - sigma)[:, None] * v_hat  # ε̂ = x_t + (1 − σ)·v̂
    dlam = -2.0 / (sigma * (1 - sigma))
    lhs = flow.flow_weight(sigma, "elbo").double() * ((eps - x0 - v_hat) ** 2).sum(1)
    rhs = 0.5 * (-dlam) * ((eps - eps_hat) ** 2).sum(1)
    torch.testing.assert_close(lhs, rhs, rtol=1e-6, atol=0)


def test_flow_inputs_pairs_share_sigma_and_noise():
    """Winner and loser rows carry the same u and ε: same σ, timestep, weight and noise part."""
    p = 3
    g = torch.Generator().manual_seed(9)
    xw, xl = torch.randn(p, 4, 2, 2, generator=g), torch.randn(p, 4, 2, 2, generator=g)
    eps = torch.randn(p, 4, 2, 2, generator=g)
    u = uniforms(p, seed=10)
    settings = flow.FlowSettings(shift=3.0)
    out = flow.flow_inputs(
        torch.cat([xw, xl]), torch.cat([eps, eps]), torch.cat([u, u]), settings, "elbo"
    )
    torch.testing.assert_close(out.sigma[:p], out.sigma[p:], rtol=0, atol=0)
    torch.testing.assert_close(out.timestep[:p], out.timestep[p:], rtol=0, atol=0)
    torch.testing.assert_close(out.weight[:p], out.weight[p:], rtol=0, atol=0)
    s = out.sigma[:p].float()[:, None, None, None]
    # x_t − (1 − σ)·x0 is the shared σ·ε in both rows
    torch.testing.assert_close(out.x_t[:p] - (1 - s) * xw, out.x_t[p:] - (1 - s) * xl)
    torch.testing.assert_close(out.target, torch.cat([eps - xw, eps - xl]))
    torch.testing.assert_close(out.sigma[:p], settings.sigma(u), rtol=0, atol=0)
    with pytest.raises(ValueError):
        flow.flow_inputs(xw, eps, u[:2], settings)
