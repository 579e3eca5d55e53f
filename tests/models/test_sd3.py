"""The SD3-class family on a tiny StableDiffusion3Pipeline folder built offline."""

from __future__ import annotations

import copy
import json

import pytest
import torch

from snpo.models import detect_family, encode_images, get_family, load_model
from snpo.models.flow import FlowSettings
from snpo.models.sd3 import SD3, configure_flow, dynamic_shift_mu, flow_settings
from snpo.models.tiny_flow import VAE_SCALE, VAE_SHIFT, save_tiny_sd3

PROMPTS = ["a red cube", "a photo of a blue dog", ""]


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
    return save_tiny_sd3(tmp_path_factory.mktemp("sd3") / "model")


@pytest.fixture(scope="module")
def model(folder):
    return load_model(str(folder))


@pytest.fixture(scope="module")
def pipe(folder):
    from diffusers import StableDiffusion3Pipeline

    return StableDiffusion3Pipeline.from_pretrained(str(folder))


class FakeDraws:
    """Per-row draws with only what a flow family reads."""

    def __init__(self, u: torch.Tensor):
        self.u = u


def test_detection_and_loading(folder, model):
    index = json.loads((folder / "model_index.json").read_text())
    assert index["_class_name"] == "StableDiffusion3Pipeline"
    assert detect_family(str(folder)) == "sd3"
    assert model.family == "sd3" and model.spec is SD3 and get_family("sd3") is SD3
    assert SD3.flow and SD3.has_null_branch and SD3.denoiser == "transformer"
    assert SD3.pipeline_class == "StableDiffusion3Pipeline"
    assert type(model.unet).__name__ == "SD3Transformer2DModel"
    assert len(model.text_encoders) == 3 and model.prediction_type == "flow"
    assert model.in_channels == 16 and model.latent_scale == 2
    assert not any(p.requires_grad for p in model.unet.parameters())
    # the SD families do not claim an SD3 folder, and SD3 does not claim an SD one
    assert not get_family("sd").matches(index, {"transformer", "vae", "text_encoder"})
    assert not SD3.matches({"_class_name": "StableDiffusionPipeline"}, {"unet"})


def test_skip_components(folder):
    m = load_model(str(folder), skip=("vae", "text_encoders"))
    assert m.vae is None and m.text_encoders == [] and m.latent_scale == 2
    with pytest.raises(Exception, match="not loaded"):
        SD3.encode_prompts(m, ["a cat"])


def test_denoiser_path_replaces_transformer(folder, tmp_path, model):
    other = copy.deepcopy(model.unet)
    with torch.no_grad():
        next(other.parameters()).add_(1.0)
    other.save_pretrained(tmp_path / "transformer")
    m = load_model(str(folder), unet_path=str(tmp_path / "transformer"))
    assert torch.equal(next(m.unet.parameters()), next(other.parameters()))


def pipeline_encode(pipe, **kw):
    """``pipe.encode_prompt`` as ``pipe.__call__`` runs it: under no_grad. (With autograd on,
    T5's SDPA takes another CPU kernel for its position-bias mask and differs by ~4e-6.)"""
    with torch.no_grad():
        return pipe.encode_prompt(prompt_2=None, prompt_3=None, **kw)


def test_prompt_encoding_equals_pipeline(model, pipe):
    emb = SD3.encode_prompts(model, PROMPTS)
    pe, ne, pp, npp = pipeline_encode(pipe, prompt=PROMPTS, do_classifier_free_guidance=True)
    assert emb.embeds.shape == (3, 16 + 256, 48) and emb.pooled.shape == (3, 32)
    assert torch.equal(emb.embeds, pe) and torch.equal(emb.pooled, pp)
    # CLIP features (2·16 wide) are zero-padded to the T5 width 48
    assert torch.equal(emb.embeds[:, :16, 32:], torch.zeros(3, 16, 16))


def test_null_embedding_equals_pipeline_negative(model, pipe):
    null = SD3.null_embedding(model)
    _, ne, _, npp = pipeline_encode(
        pipe, prompt="x", negative_prompt="", do_classifier_free_guidance=True
    )
    assert null.embeds.shape == ne.shape == (1, 272, 48)
    assert torch.equal(null.embeds, ne) and torch.equal(null.pooled, npp)
    # the default negative prompt (None) is the same empty prompt
    _, ne2, _, npp2 = pipeline_encode(pipe, prompt="x", do_classifier_free_guidance=True)
    assert torch.equal(null.embeds, ne2) and torch.equal(null.pooled, npp2)


def test_latents_use_shift_and_scale(model):
    pix = torch.rand(2, 3, 16, 16, generator=torch.Generator().manual_seed(0)) * 2 - 1
    mean, logvar = encode_images(model, pix)
    with torch.no_grad():
        dist = model.vae.encode(pix).latent_dist
    assert (
        model.vae.config.shift_factor == VAE_SHIFT and model.vae.config.scaling_factor == VAE_SCALE
    )
    torch.testing.assert_close(mean, (dist.mean - VAE_SHIFT) * VAE_SCALE, rtol=0, atol=0)
    assert mean.shape == (2, 16, 8, 8)


def test_conditioning_denoise_and_lora_targets(model):
    emb = SD3.encode_prompts(model, PROMPTS[:2])
    cond = SD3.conditioning(model, emb)
    assert set(cond) == {"encoder_hidden_states", "pooled_projections"}
    x = torch.randn(2, 16, 8, 8, generator=torch.Generator().manual_seed(1))
    t = torch.tensor([300.0, 700.0])
    out = SD3.denoise(model.unet, x, t, cond)
    with torch.no_grad():
        want = model.unet(hidden_states=x, timestep=t, **cond).sample
    assert torch.equal(out, want) and out.shape == x.shape
    # a 0-d sampling timestep is expanded to the rows
    torch.testing.assert_close(
        SD3.denoise(model.unet, x, torch.tensor(300.0), cond)[0], out[0], rtol=0, atol=0
    )
    names = {n for n, _ in model.unet.named_modules()}
    for target in SD3.lora_targets:
        assert any(n.endswith("attn." + target) for n in names), target


def test_noised_uses_u_and_scheduler_shift(model):
    assert flow_settings(model) == FlowSettings(shift=3.0)  # the tiny scheduler's shift
    g = torch.Generator().manual_seed(2)
    x0, eps = torch.randn(4, 16, 8, 8, generator=g), torch.randn(4, 16, 8, 8, generator=g)
    u = torch.tensor([0.1, 0.6, 0.1, 0.6], dtype=torch.float64)
    out = SD3.noised(model, x0, eps, FakeDraws(u), weighting="elbo")
    sigma = FlowSettings(shift=3.0).sigma(u)
    s = sigma.float()[:, None, None, None]
    torch.testing.assert_close(out.x_t, (1 - s) * x0 + s * eps)
    torch.testing.assert_close(out.target, eps - x0, rtol=0, atol=0)
    torch.testing.assert_close(out.timestep, (1000 * sigma).float(), rtol=0, atol=0)
    torch.testing.assert_close(out.weight, ((1 - sigma) / sigma).float())
    assert SD3.noised(model, x0, eps, FakeDraws(u)).weight is None
    with pytest.raises(ValueError, match="draws.u"):
        SD3.noised(model, x0, eps, object())


def test_configure_flow_overrides(folder):
    m = load_model(str(folder), skip=("vae",))
    assert configure_flow(m, sampler="mode", shift=1.0).sampler == "mode"
    assert flow_settings(m) == FlowSettings(sampler="mode", shift=1.0)
    with pytest.raises(ValueError):
        configure_flow(m, sampler="cosine")


def _cfg_sample(model, cond, null, latents, steps, scale):
    """CFG with the family's pieces, rows [null; cond] in one forward (snpo's sampler layout);
    ``null`` has 1 row (broadcast) or one per prompt."""
    sched = SD3.sampling_scheduler(model, None, steps, "cpu", tuple(latents.shape[1:]))
    x = SD3.initial_latents(sched, latents)
    null = null if len(null) == len(cond) else null.expand(len(cond))
    both = SD3.conditioning(model, type(cond).cat([null, cond]))
    for t in sched.timesteps:
        xin = SD3.model_input(sched, x, t)
        with torch.no_grad():
            v_u, v_c = SD3.denoise(model.unet, torch.cat([xin, xin]), t, both).chunk(2)
        x = sched.step(v_u + scale * (v_c - v_u), t, x).prev_sample
    return x


def test_cfg_sample_matches_pipeline(model, pipe):
    """Bitwise equal to StableDiffusion3Pipeline(..., output_type="latent") when the null is
    encoded at the batch size, as the pipeline does; the cached 1-row null differs from it by
    float rounding only (CLIP's pooled projection: a matmul of another batch size, ~2e-7)."""
    latents = torch.randn(2, 16, 8, 8, generator=torch.Generator().manual_seed(3))
    prompts = ["a red cube", "a green ball"]
    cond = SD3.encode_prompts(model, prompts)
    theirs = pipe(
        prompts,
        num_inference_steps=2,
        guidance_scale=4.0,
        latents=latents,
        output_type="latent",
        height=16,
        width=16,
    ).images
    null_rows = SD3.encode_prompts(model, ["", ""])
    assert torch.equal(_cfg_sample(model, cond, null_rows, latents, 2, 4.0), theirs)
    ours = _cfg_sample(model, cond, SD3.null_embedding(model), latents, 2, 4.0)
    torch.testing.assert_close(ours, theirs, rtol=0, atol=1e-5)


def test_dynamic_shift_mu_matches_diffusers():
    from diffusers.pipelines.flux.pipeline_flux import calculate_shift

    for n in (16, 256, 1024, 4096):
        assert dynamic_shift_mu(n, 256, 4096, 0.5, 1.15) == pytest.approx(
            calculate_shift(n, 256, 4096, 0.5, 1.15), abs=1e-12
        )


def test_preference_step_end_to_end(model):
    """One snpo step through snpo.step.preference_step: finite loss, gradients in the transformer."""
    from snpo.draws import pair_draws
    from snpo.step import EncodedBatch, StepModels, preference_step, unet_fn

    policy = copy.deepcopy(model.unet).requires_grad_(True).train()
    p = 3
    draws = pair_draws(0, 0, list(range(p)), (16, 8, 8), model.scheduler, uncond_prob=0.5)
    draws.uncond[:] = torch.tensor([True, False, True])  # both branches in one micro-batch
    assert draws.u.dtype == torch.float64
    pix = torch.rand(2 * p, 3, 16, 16, generator=torch.Generator().manual_seed(4)) * 2 - 1
    mean, _ = encode_images(model, pix)
    batch = EncodedBatch(latents=mean, prompts=SD3.encode_prompts(model, PROMPTS))
    models = StepModels(
        model=model,
        policy=unet_fn(policy, SD3),
        reference=unet_fn(model.unet, SD3),
        null=SD3.null_embedding(model),
        device=torch.device("cpu"),
        dtype=torch.float32,
    )
    # winner and loser rows of a pair share σ (timestep, weight) and ε
    from snpo.step import noised_rows

    rows, _ = noised_rows(models, batch, draws, weighting="elbo")
    assert torch.equal(rows.timestep[:p], rows.timestep[p:])
    assert torch.equal(rows.weight[:p], rows.weight[p:])
    s = (rows.timestep[:p] / 1000).repeat(2)[:, None, None, None]
    eps = (rows.x_t - (1 - s) * mean) / s
    torch.testing.assert_close(eps[:p], eps[p:], rtol=1e-4, atol=1e-4)
    res = preference_step(
        models, batch, draws, objective="snpo", beta=100.0, lam=0.9, backend="torch"
    )
    assert torch.isfinite(res.loss)
    # policy = reference at the start: every margin 0, loss ln 2
    assert res.loss.item() == pytest.approx(torch.log(torch.tensor(2.0)).item(), abs=1e-6)
    res.loss.backward()
    grads = [q.grad for q in policy.parameters() if q.grad is not None]
    assert grads and all(torch.isfinite(g).all() for g in grads)
    assert res.metrics["count_uncond"].item() == 2
    res_elbo = preference_step(
        models,
        batch,
        draws,
        objective="snpo",
        beta=100.0,
        lam=0.9,
        weighting="elbo",
        backend="torch",
    )
    assert torch.isfinite(res_elbo.loss)


def test_generate_and_lora_targets_attach(folder):
    """snpo's sampler runs the family end to end; LoRA on the default targets attaches."""
    from snpo.models import generate, lora_config

    m = load_model(str(folder))
    cond = SD3.encode_prompts(m, ["a red cube", "a cat"])
    images = generate(m, cond, SD3.null_embedding(m), [0, 1], guidance_scale=3.0, steps=2)
    assert images.shape == (2, 3, 16, 16) and bool(((images >= 0) & (images <= 1)).all())
    m.unet.add_adapter(lora_config(SD3.lora_targets, rank=2))
    wrapped = [n for n, mod in m.unet.named_modules() if hasattr(mod, "lora_A")]
    ends = {t for t in SD3.lora_targets for n in wrapped if n.endswith("attn." + t)}
    assert ends == set(SD3.lora_targets)


def _adapted(folder):
    """The tiny model with LoRA on the default targets, B made nonzero (a 'trained' adapter)."""
    from snpo.models import lora_config

    m = load_model(str(folder))
    torch.manual_seed(5)
    m.unet.add_adapter(lora_config(SD3.lora_targets, rank=2, alpha=4))
    with torch.no_grad():
        for n, q in m.unet.named_parameters():
            if "lora_B" in n:
                q.normal_(0, 0.5)
    return m


def _velocity(transformer, model):
    x = torch.randn(2, 16, 8, 8, generator=torch.Generator().manual_seed(6))
    cond = SD3.conditioning(model, SD3.encode_prompts(model, ["a red cube", "a cat"]))
    with torch.no_grad():
        return SD3.denoise(transformer, x, torch.tensor([250.0, 750.0]), cond)


def test_lora_export_loads_in_snpo_and_diffusers(folder, tmp_path):
    from diffusers import StableDiffusion3Pipeline

    from snpo.models import load_export, write_export

    m = _adapted(folder)
    want = _velocity(m.unet, m)
    assert not torch.allclose(want, _velocity(load_model(str(folder)).unet, m))
    out = write_export(tmp_path / "lora", m, m.unet, lora=True, meta={"objective": "snpo"})
    loaded, meta = load_export(out)
    assert meta["family"] == "sd3" and meta["kind"] == "lora"
    torch.testing.assert_close(_velocity(loaded.unet, m), want, rtol=1e-5, atol=1e-5)
    pipe = StableDiffusion3Pipeline.from_pretrained(str(folder))
    pipe.load_lora_weights(str(out))
    torch.testing.assert_close(_velocity(pipe.transformer, m), want, rtol=1e-5, atol=1e-5)


def test_full_export_loads_in_snpo(folder, tmp_path):
    from snpo.models import load_export, write_export

    m = load_model(str(folder))
    with torch.no_grad():
        for q in m.unet.parameters():
            q.mul_(1.01)
    want = _velocity(m.unet, m)
    out = write_export(tmp_path / "full", m, m.unet, lora=False, meta={})
    assert (out / "transformer" / "config.json").is_file()
    loaded, _ = load_export(out)
    assert torch.equal(_velocity(loaded.unet, m), want)


def test_training_options_reach_the_flow_settings(tmp_path):
    """family.configure(model, cfg): the config's σ options become the model's FlowSettings
    (what noised() and the cache fingerprint use); flow_shift null keeps the scheduler's."""
    from snpo.config import TrainConfig
    from snpo.models import load_model
    from snpo.models.sd3 import flow_settings
    from snpo.models.tiny_flow import save_tiny_sd3

    model = load_model(str(save_tiny_sd3(tmp_path / "sd3")))
    before = flow_settings(model).shift
    cfg = TrainConfig(flow_sigma_sampler="mode", flow_mode_scale=0.5, flow_logit_std=2.0)
    model.spec.configure(model, cfg)
    s = flow_settings(model)
    assert (s.sampler, s.mode_scale, s.logit_std, s.shift) == ("mode", 0.5, 2.0, before)
    model.spec.configure(model, TrainConfig(flow_shift=1.0))
    assert flow_settings(model).shift == 1.0 and flow_settings(model).sampler == "logit_normal"
