"""The preference step: every objective learns a fixed batch; the one 2P forward equals the two
branches run separately; null-branch pairs get the null embedding; ref_err == live reference."""

from __future__ import annotations

import copy

import pytest
import torch

from snpo.data import PairDataset, PickapicParquet, collate_pairs
from snpo.draws import pair_draws
from snpo.models import (
    elbo_weight,
    encode_prompts,
    load_model,
    null_embedding,
    training_target,
)
from snpo.step import (
    StepModels,
    encode_batch,
    lora_reference,
    noised_inputs,
    preference_step,
    reference_errors,
    swap_flags,
    unet_fn,
)
from snpo_kernels import per_sample_error, preference_loss_with_stats

P = 4
UNCOND = torch.tensor([True, False, True, False])


def _setup(model_dir, data, *, lora=False, seed=0, dtype=torch.float32):
    m = load_model(str(model_dir), dtype=dtype)
    unet = m.unet
    if lora:
        from peft import LoraConfig

        torch.manual_seed(seed)
        unet.add_adapter(
            LoraConfig(
                r=4, lora_alpha=4, init_lora_weights="gaussian", target_modules=["to_q", "to_v"]
            )
        )
        policy = unet_fn(unet)
        reference = lora_reference(unet, policy)
    else:
        unet.requires_grad_(True)
        policy = unet_fn(unet)
        reference = unet_fn(copy.deepcopy(unet).requires_grad_(False))
    sm = StepModels(m, policy, reference, null_embedding(m), torch.device("cpu"), dtype)
    src = PickapicParquet([str(data)])
    ds = PairDataset(src, resolution=16, seed=0, random_flip=True)
    batch = collate_pairs([ds[(0, i)] for i in range(P)])
    side = 16 // m.latent_scale
    draws = pair_draws(0, 0, batch.indices, (m.in_channels, side, side), m.scheduler, 0.1)
    draws.uncond = UNCOND.clone()
    return sm, batch, draws


@pytest.mark.parametrize("objective", ["sft", "dpo", "bdpo", "npo", "snpo_naive", "snpo"])
def test_each_objective_fits_a_fixed_batch(tiny_sd, pickapic_clean, objective):
    sm, batch, draws = _setup(tiny_sd, pickapic_clean)
    enc = encode_batch(sm, batch, draws, winners_only=objective == "sft")
    params = [p for p in sm.model.unet.parameters() if p.requires_grad]
    opt = torch.optim.Adam(params, lr=2e-4)
    losses = []
    for _ in range(6):
        res = preference_step(
            sm,
            enc,
            draws,
            objective=objective,
            beta=2000.0,
            lam=0.9 if objective in ("bdpo", "snpo") else 1.0,
        )
        assert torch.isfinite(res.loss)
        opt.zero_grad()
        res.loss.backward()
        opt.step()
        losses.append(res.loss.item())
    if objective != "sft":
        assert abs(losses[0] - 0.6931) < 1e-3  # policy == reference at the start
        # statistics split by the drawn branch for every preset (2 of 4 pairs are null-branch)
        assert res.metrics["count_uncond"].item() == int(draws.uncond.sum()) == 2
    assert losses[-1] < losses[0] * 0.9, losses


BRANCH_KW = dict(objective="snpo", beta=500.0, lam=0.9, weighting="elbo")


def _one_forward_and_two_branches(model_dir, data, dtype, seed=0):
    """The snpo loss (ELBO weighting) and its parameter gradients from one 2P forward and from
    the two branches run separately, recombined: (full, combined, g_full, g_split, sm, draws)."""
    sm, batch, draws = _setup(model_dir, data, dtype=dtype)
    enc = encode_batch(sm, batch, draws)
    params = [p for p in sm.model.unet.parameters() if p.requires_grad]
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():  # move the policy away from the reference
        for p in params:
            p.add_(1e-3 * torch.randn(p.shape, generator=g, dtype=torch.float64).to(p.dtype))
    full = preference_step(sm, enc, draws, **BRANCH_KW)
    g_full = torch.autograd.grad(full.loss, params)
    rows_u, rows_c = UNCOND.nonzero().flatten(), (~UNCOND).nonzero().flatten()
    parts = [
        preference_step(sm, enc.select(r), draws.select(r), **BRANCH_KW) for r in (rows_u, rows_c)
    ]
    combined = (len(rows_u) * parts[0].loss + len(rows_c) * parts[1].loss) / P
    g_split = torch.autograd.grad(combined, params)
    assert full.output.stats.count_uncond.item() == 2
    return full, combined, g_full, g_split, sm, draws


def _conditions(full, sm, draws) -> tuple[float, float]:
    """(S, K) of the step's loss, from its float64 per-sample errors:

    S = Σ_i |∂loss/∂e_i|·(|e_θ,i| + |e_ref,i|) amplifies relative perturbations of the errors
    (the UNet's float32 rounding, which depends on the batch size) into the loss;
    K = max_k (β/2 + 1)·w_k·Σ_{i∈k}(|e_θ,i| + |e_ref,i|) bounds the relative change of the
    gradient coefficients. Both carry β·T·ω(t) (T·ω(t) up to ~10³), so S ≫ |loss|."""
    from snpo.config import PRESETS
    from snpo_kernels.reference import gradient_coefficients

    e_th, e_rf = full.output.e_theta.double(), full.output.e_ref.double()
    weight = elbo_weight(sm.model.scheduler, draws.timesteps).double()
    swap = swap_flags(PRESETS[BRANCH_KW["objective"]].swap, draws.uncond)
    beta, lam = BRANCH_KW["beta"], BRANCH_KW["lam"]
    c = gradient_coefficients(e_th, e_rf, swap, weight, beta, lam, 1.0 / P)
    mag = e_th.abs() + e_rf.abs()
    s_cond = float((c.abs() * mag).sum())
    k_cond = float(((0.5 * beta + 1.0) * weight * (mag[:P] + mag[P:])).max())
    return s_cond, k_cond


def test_one_forward_equals_two_branches(tiny_sdxl, pickapic_clean):
    """The structure (one 2P forward = the two branches' forwards): float64, where both
    sides agree to rounding (bit-identical on the machines tried)."""
    full, combined, g_full, g_split, _, _ = _one_forward_and_two_branches(
        tiny_sdxl, pickapic_clean, torch.float64
    )
    assert full.loss.dtype == torch.float64
    torch.testing.assert_close(full.loss, combined, rtol=1e-12, atol=0)
    for a, b in zip(g_full, g_split):
        torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-12 * float(a.abs().max()) + 1e-300)


def test_one_forward_equals_two_branches_float32(tiny_sdxl, pickapic_clean):
    """Smoke check in float32: the two sides differ by the UNet's batch-size-dependent
    rounding (a few ulps per per-sample error) amplified by the condition numbers (S, K of
    _conditions); 4 ulps per error is the bound used."""
    full, combined, g_full, g_split, sm, draws = _one_forward_and_two_branches(
        tiny_sdxl, pickapic_clean, torch.float32
    )
    eps = torch.finfo(torch.float32).eps
    s_cond, k_cond = _conditions(full, sm, draws)
    loss_tol = 4 * eps * (s_cond + abs(float(full.loss)))
    assert abs(float(full.loss) - float(combined)) <= loss_tol, (float(full.loss), loss_tol)
    for a, b in zip(g_full, g_split):
        torch.testing.assert_close(a, b, rtol=0, atol=4 * eps * (1 + k_cond) * float(a.abs().max()))


class _Spy:
    def __init__(self, fn):
        self.fn, self.calls = fn, []

    def __call__(self, x, t, **kw):
        self.calls.append((x, t, kw))
        return self.fn(x, t, **kw)


def test_null_branch_pairs_get_the_null_embedding_sd(tiny_sd, pickapic_clean):
    sm, batch, draws = _setup(tiny_sd, pickapic_clean)
    sm.policy = spy = _Spy(sm.policy)
    enc = encode_batch(sm, batch, draws)
    res = preference_step(sm, enc, draws, objective="snpo", beta=500.0, lam=0.9)
    x, t, kw = spy.calls[0]
    assert x.shape[0] == 2 * P and torch.equal(t[:P], t[P:])  # one 2P forward, shared t
    ehs = kw["encoder_hidden_states"]
    empty = encode_prompts(sm.model, [""]).embeds[0]
    cond = encode_prompts(sm.model, batch.prompts).embeds
    for k in range(P):
        want = empty if UNCOND[k] else cond[k]
        torch.testing.assert_close(ehs[k], want)
        torch.testing.assert_close(ehs[P + k], want)
    assert torch.equal(swap_flags("null", UNCOND), UNCOND)
    assert not swap_flags("none", UNCOND).any() and swap_flags("all", UNCOND).all()
    assert res.output.stats.count_uncond.item() == 2
    # target is the noise shared by winner and loser (epsilon prediction)
    noise = torch.cat([draws.noise, draws.noise])
    torch.testing.assert_close(training_target(sm.model, enc.latents, noise, t), noise)


def test_null_branch_is_zeros_for_sdxl_and_time_ids_are_real(tiny_sdxl, pickapic_clean):
    sm, batch, draws = _setup(tiny_sdxl, pickapic_clean)
    sm.policy = spy = _Spy(sm.policy)
    enc = encode_batch(sm, batch, draws)
    preference_step(sm, enc, draws, objective="snpo", beta=500.0, lam=0.9)
    _, _, kw = spy.calls[0]
    ehs, added = kw["encoder_hidden_states"], kw["added_cond_kwargs"]
    for k in range(P):
        rows = [k, P + k]
        if UNCOND[k]:
            assert ehs[rows].abs().sum() == 0 and added["text_embeds"][rows].abs().sum() == 0
        else:
            assert ehs[rows].abs().sum() > 0 and added["text_embeds"][rows].abs().sum() > 0
    tid = added["time_ids"]
    assert tid.shape == (2 * P, 6)
    sizes = torch.cat([batch.original_size[:, 0], batch.original_size[:, 1]]).float()
    torch.testing.assert_close(tid[:, :2], sizes)
    assert (tid[:, 4:] == 16).all()


def test_ref_err_path_and_lora_reference(tiny_sd, pickapic_clean):
    sm, batch, draws = _setup(tiny_sd, pickapic_clean, lora=True)
    enc = encode_batch(sm, batch, draws)
    ref = _Spy(sm.reference)
    sm.reference = ref
    live = preference_step(sm, enc, draws, objective="snpo", beta=500.0, lam=0.9)
    x, t, kw = ref.calls[0]
    with torch.no_grad():
        ref_pred = sm.reference(x, t, **kw)
        base = load_model(str(tiny_sd)).unet(x, t, **kw).sample  # adapters off == base weights
    torch.testing.assert_close(ref_pred, base, rtol=1e-5, atol=1e-6)
    noise = torch.cat([draws.noise, draws.noise])
    ref_err = per_sample_error(ref_pred, training_target(sm.model, enc.latents, noise, t))
    sm.reference = None
    cached = preference_step(sm, enc, draws, objective="snpo", beta=500.0, lam=0.9, ref_err=ref_err)
    torch.testing.assert_close(cached.loss, live.loss)
    assert any(p.requires_grad for p in sm.model.unet.parameters())


def test_elbo_weight_formula():
    from snpo.models import build_scheduler

    s = build_scheduler()
    t = torch.tensor([0, 10, 500, 999])
    w = elbo_weight(s, t)
    b, a, abar = s.betas[t].double(), s.alphas[t].double(), s.alphas_cumprod[t].double()
    torch.testing.assert_close(w.double(), 1000 * b / (2 * a * (1 - abar)), rtol=1e-6, atol=0)
    assert w[0] > w[-1] > 0


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_reference_errors_equal_the_loss_backends_e_theta(tiny_sdxl, pickapic_clean, dtype):
    """per_sample_error gives bit for bit what the torch loss reports as e_theta at β = λ = 1."""
    sm, batch, draws = _setup(tiny_sdxl, pickapic_clean, dtype=dtype)
    enc = encode_batch(sm, batch, draws)
    stored = reference_errors(sm, enc, draws)
    x_t, t, target, kw = noised_inputs(sm, enc, draws)
    with torch.no_grad():
        ref_pred = sm.reference(x_t, t, **kw)
    zeros = torch.zeros(ref_pred.shape[0], dtype=torch.float32)
    old = preference_loss_with_stats(
        ref_pred, target, None, zeros, beta=1.0, lam=1.0, backend="torch"
    ).e_theta
    assert stored.dtype == torch.float32 and stored.shape == (2 * P,)
    assert torch.equal(stored, old.detach().to(torch.float32))


def test_step_goes_through_the_family(tiny_sd, pickapic_clean):
    """noised_inputs is the family's noising of the pairs' draws, winners and losers sharing."""
    sm, batch, draws = _setup(tiny_sd, pickapic_clean)
    enc = encode_batch(sm, batch, draws)
    x_t, t, target, kw = noised_inputs(sm, enc, draws)
    fam = sm.model.spec
    noise = torch.cat([draws.noise, draws.noise])
    out = fam.noised(sm.model, enc.latents.float(), noise, draws.repeat(2), weighting="elbo")
    assert torch.equal(x_t, out.x_t) and torch.equal(t, out.timestep)
    assert torch.equal(target, out.target)
    torch.testing.assert_close(out.weight, elbo_weight(sm.model.scheduler, t), rtol=0, atol=0)
    with pytest.raises(ValueError, match="weighting"):
        fam.noised(sm.model, enc.latents.float(), noise, draws.repeat(2), weighting="snr")


class _CountingEncoders:
    """Wraps every text encoder's forward, recording the batch size of each call."""

    def __init__(self, model):
        self.rows: list[int] = []
        for enc in model.text_encoders:
            orig = enc.forward

            def fwd(ids, *a, _orig=orig, **k):
                self.rows.append(int(ids.shape[0]))
                return _orig(ids, *a, **k)

            enc.forward = fwd


@pytest.mark.parametrize("family", ["sd", "sdxl"])
def test_the_text_encoder_runs_on_the_conditional_pairs_only(
    tiny_sd, tiny_sdxl, pickapic_clean, family
):
    """encode_batch encodes only the prompts of conditional pairs: a null-branch pair's row
    holds the null embedding (what the step would put there anyway), a conditional row the
    embedding of the whole list's encode; the loss equals the one from embeddings of all P
    prompts; a micro-batch with every pair on the null branch runs no text encoder."""
    from snpo.step import EncodedBatch, encode_branch_prompts

    sm, batch, draws = _setup(tiny_sd if family == "sd" else tiny_sdxl, pickapic_clean)
    full = encode_prompts(sm.model, batch.prompts)
    spy = _CountingEncoders(sm.model)
    assert draws.conditional_pairs() == [k for k in range(P) if not UNCOND[k]]
    enc = encode_batch(sm, batch, draws)
    n_enc = len(sm.model.text_encoders)
    assert spy.rows == [int((~UNCOND).sum())] * n_enc  # 2 of the 4 prompts, once per encoder
    for k in range(P):
        want = sm.null.index(slice(0, 1)) if UNCOND[k] else full.index(slice(k, k + 1))
        assert torch.equal(enc.prompts.embeds[k], want.embeds[0])
        if full.pooled is not None:  # the pooled projection may round differently per batch
            torch.testing.assert_close(enc.prompts.pooled[k], want.pooled[0], rtol=0, atol=1e-5)
    ref = EncodedBatch(enc.latents, full, enc.time_ids)
    kw = dict(objective="snpo", beta=500.0, lam=0.9)
    a = preference_step(sm, enc, draws, **kw).loss
    b = preference_step(sm, ref, draws, **kw).loss
    torch.testing.assert_close(a, b, rtol=1e-6, atol=0)
    spy.rows.clear()
    every = encode_branch_prompts(sm, batch.prompts, [])
    assert spy.rows == [] and len(every) == P
    assert torch.equal(every.embeds, sm.null.embeds.expand(P, -1, -1))
    none = encode_branch_prompts(sm, batch.prompts, list(range(P)))
    assert spy.rows == [P] * n_enc and torch.equal(none.embeds, full.embeds)
