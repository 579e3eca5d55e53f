"""The guidance-distilled FLUX.1-dev-class family on a tiny FluxPipeline folder built offline."""

from __future__ import annotations

import copy

import pytest
import torch

from snpo.models import detect_family, generate, get_family, load_model
from snpo.models.flow import FlowSettings
from snpo.models.flux import (
    FLUX,
    NO_NULL_BRANCH,
    check_objective,
    image_ids,
    pack_latents,
    unpack_latents,
)
from snpo.models.sd3 import SD3, flow_settings
from snpo.models.tiny_flow import save_tiny_flux

PROMPTS = ["a red cube", "a photo of a blue dog"]


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
    return save_tiny_flux(tmp_path_factory.mktemp("flux") / "model")


@pytest.fixture(scope="module")
def model(folder):
    return load_model(str(folder))


@pytest.fixture(scope="module")
def pipe(folder):
    from diffusers import FluxPipeline

    return FluxPipeline.from_pretrained(str(folder))


def test_detection_and_flags(folder, model):
    assert detect_family(str(folder)) == "flux" and get_family("flux") is FLUX
    assert model.family == "flux" and model.extra["guidance_embeds"] is True
    assert FLUX.flow and not FLUX.has_null_branch and FLUX.pipeline_class == "FluxPipeline"
    assert not SD3.matches({"_class_name": "FluxPipeline"}, {"transformer"})
    assert not FLUX.matches({"_class_name": "StableDiffusion3Pipeline"}, {"transformer"})


@pytest.mark.parametrize("objective", ["snpo", "snpo_naive", "npo"])
def test_null_branch_objectives_refused_in_one_line(objective):
    with pytest.raises(ValueError) as err:
        check_objective(objective)
    msg = str(err.value)
    assert "\n" not in msg and NO_NULL_BRANCH in msg and "dpo or bdpo" in msg


@pytest.mark.parametrize("objective", ["dpo", "bdpo", "sft"])
def test_other_objectives_allowed(objective):
    check_objective(objective)
    check_objective("snpo", has_null_branch=True)  # a family with a null branch: fine


def test_encoding_equals_pipeline(model, pipe):
    emb = FLUX.encode_prompts(model, PROMPTS)
    with torch.no_grad():  # as FluxPipeline.__call__ runs it (see test_sd3.pipeline_encode)
        pe, pp, text_ids = pipe.encode_prompt(prompt=PROMPTS, prompt_2=None)
    assert emb.embeds.shape == (2, 512, 48) and emb.pooled.shape == (2, 16)
    assert torch.equal(emb.embeds, pe) and torch.equal(emb.pooled, pp)
    cond = FLUX.conditioning(model, emb)
    assert torch.equal(cond["txt_ids"], text_ids)
    assert torch.equal(cond["guidance"], torch.full((2,), 3.5))


def test_pack_roundtrip_and_ids_match_pipeline(pipe):
    x = torch.randn(3, 16, 8, 6, generator=torch.Generator().manual_seed(0))
    packed = pack_latents(x)
    assert torch.equal(packed, pipe._pack_latents(x, 3, 16, 8, 6))
    assert torch.equal(unpack_latents(packed, 8, 6), x)
    want = pipe._prepare_latent_image_ids(3, 4, 3, "cpu", torch.float32)
    assert torch.equal(image_ids(8, 6, "cpu", torch.float32), want)


def test_noised_is_flow_with_dynamic_scheduler_shift(model):
    # the FLUX scheduler shifts dynamically at sampling: its static shift is not used, so
    # training draws σ from the logit-normal without a shift unless configured
    assert model.scheduler.config.use_dynamic_shifting
    g = torch.Generator().manual_seed(1)
    x0, eps = torch.randn(2, 16, 8, 8, generator=g), torch.randn(2, 16, 8, 8, generator=g)

    class Draws:
        u = torch.tensor([0.25, 0.75], dtype=torch.float64)

    out = FLUX.noised(model, x0, eps, Draws())
    assert flow_settings(model) == FlowSettings(shift=1.0)
    sigma = FlowSettings().sigma(Draws.u)
    torch.testing.assert_close(out.timestep, (1000 * sigma).float(), rtol=0, atol=0)
    torch.testing.assert_close(out.target, eps - x0, rtol=0, atol=0)


def test_sample_matches_pipeline_with_embedded_guidance(model, pipe):
    """Two Euler steps with the family's pieces and guidance 3.5 as an input (no CFG) equal
    FluxPipeline(..., output_type="latent") (packed latents)."""
    latents = torch.randn(2, 16, 8, 8, generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        theirs = pipe(
            PROMPTS,
            num_inference_steps=2,
            guidance_scale=3.5,
            latents=pack_latents(latents),
            output_type="latent",
            height=16,
            width=16,
        ).images
    emb = FLUX.encode_prompts(model, PROMPTS)
    sched = FLUX.sampling_scheduler(model, None, 2, "cpu", (16, 8, 8))
    x = FLUX.initial_latents(sched, latents)
    cond = FLUX.conditioning(model, emb, guidance=torch.full((2,), 3.5))
    for t in sched.timesteps:
        with torch.no_grad():
            v = FLUX.denoise(model.unet, FLUX.model_input(sched, x, t), t, cond)
        x = sched.step(v, t, x).prev_sample
    torch.testing.assert_close(pack_latents(x), theirs, rtol=0, atol=1e-6)


def test_generate_uses_embedded_guidance(model):
    """snpo's sampler with the guidance as an input. Needs DiffusionModel.in_channels to ask
    the family (FLUX's transformer counts packed channels: 64 = 4·16)."""
    assert FLUX.latent_channels(model) == 16
    assert model.in_channels == 16
    emb = FLUX.encode_prompts(model, PROMPTS)
    images = generate(
        model, emb, FLUX.null_embedding(model), [0, 1], guidance_scale=3.5, steps=2, resolution=16
    )
    assert images.shape == (2, 3, 16, 16) and bool(torch.isfinite(images).all())


def test_dpo_step_end_to_end(model):
    """One dpo step through snpo.step.preference_step (uncond_prob 0: no null branch)."""
    from snpo.draws import pair_draws
    from snpo.models import encode_images
    from snpo.step import EncodedBatch, StepModels, preference_step, unet_fn

    policy = copy.deepcopy(model.unet).requires_grad_(True).train()
    p = 2
    draws = pair_draws(0, 0, list(range(p)), (16, 8, 8), model.scheduler, uncond_prob=0.0)
    pix = torch.rand(2 * p, 3, 16, 16, generator=torch.Generator().manual_seed(3)) * 2 - 1
    mean, _ = encode_images(model, pix)
    batch = EncodedBatch(latents=mean, prompts=FLUX.encode_prompts(model, PROMPTS))
    models = StepModels(
        model=model,
        policy=unet_fn(policy, FLUX),
        reference=unet_fn(model.unet, FLUX),
        null=FLUX.null_embedding(model),
        device=torch.device("cpu"),
        dtype=torch.float32,
    )
    res = preference_step(
        models, batch, draws, objective="dpo", beta=100.0, lam=1.0, backend="torch"
    )
    assert torch.isfinite(res.loss)
    res.loss.backward()
    assert any(q.grad is not None and q.grad.abs().sum() > 0 for q in policy.parameters())


def test_variants_with_image_inputs_are_not_matched():
    assert not FLUX.matches({"_class_name": "FluxFillPipeline"}, {"transformer"})
    assert FLUX.matches({"transformer": ["diffusers", "FluxTransformer2DModel"]}, {"transformer"})
