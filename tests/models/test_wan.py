"""The Wan2.x-class family on a tiny WanPipeline folder built offline (snpo.models.tiny_wan)."""

from __future__ import annotations

import copy
import json
import shutil

import numpy as np
import pytest
import torch

from snpo.models import detect_family, encode_images, get_family, load_model
from snpo.models.diffusion import ModelLoadError
from snpo.models.flow import FlowSettings
from snpo.models.sd3 import flow_settings
from snpo.models.tiny_wan import FLOW_SHIFT, TINY_RESOLUTION, save_tiny_wan
from snpo.models.wan import MAX_SEQUENCE_LENGTH, WAN

RES = TINY_RESOLUTION  # 32 px → 4×4 latents → 2×2 tokens per frame
SIDE = RES // 8
PROMPTS = ["a red cube", "  a photo of a  &amp; blue dog ", ""]  # the 2nd needs prompt_clean
EPS32 = torch.finfo(torch.float32).eps


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
    return save_tiny_wan(tmp_path_factory.mktemp("wan") / "model")


@pytest.fixture(scope="module")
def model(folder):
    return load_model(str(folder))


@pytest.fixture(scope="module")
def pipe(folder):
    from diffusers import WanPipeline

    return WanPipeline.from_pretrained(str(folder))


class FakeDraws:
    def __init__(self, u: torch.Tensor):
        self.u = u


def _randn(*shape, seed: int) -> torch.Tensor:
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed))


def test_detection_and_loading(folder, model):
    index = json.loads((folder / "model_index.json").read_text())
    assert index["_class_name"] == "WanPipeline"
    assert index["vae"][1] == "AutoencoderKLWan" and index["text_encoder"][1] == "UMT5EncoderModel"
    assert detect_family(str(folder)) == "wan" and model.spec is WAN and get_family("wan") is WAN
    assert WAN.flow and WAN.has_null_branch and WAN.denoiser == "transformer"
    assert (WAN.pipeline_class, WAN.denoiser_class) == ("WanPipeline", "WanTransformer3DModel")
    assert type(model.unet).__name__ == "WanTransformer3DModel"
    assert type(model.vae).__name__ == "AutoencoderKLWan"
    assert type(model.text_encoders[0]).__name__ == "UMT5EncoderModel"
    assert model.prediction_type == "flow" and model.in_channels == 16 and model.latent_scale == 8
    assert not any(p.requires_grad for p in model.unet.parameters())
    parts = {"transformer", "vae", "text_encoder", "tokenizer", "scheduler"}
    for other in ("sd", "sdxl", "sd3", "flux"):
        assert not get_family(other).matches(index, parts), other
    assert not WAN.matches({"_class_name": "StableDiffusion3Pipeline"}, {"transformer"})
    assert not WAN.matches({"_class_name": "WanImageToVideoPipeline"}, parts)


def test_two_expert_wan22_folder_is_refused(folder, tmp_path):
    two = tmp_path / "two"
    shutil.copytree(folder, two)
    index = json.loads((two / "model_index.json").read_text())
    index.update(transformer_2=["diffusers", "WanTransformer3DModel"], boundary_ratio=0.875)
    (two / "model_index.json").write_text(json.dumps(index))
    with pytest.raises(ModelLoadError, match="two-expert Wan2.2"):
        load_model(str(two))


def test_skip_components(folder):
    m = load_model(str(folder), skip=("vae", "text_encoders"))
    assert m.vae is None and m.text_encoders == [] and m.latent_scale == 8
    with pytest.raises(Exception, match="not loaded"):
        WAN.encode_prompts(m, ["a cat"])


def test_denoiser_path_replaces_transformer(folder, tmp_path, model):
    other = copy.deepcopy(model.unet)
    with torch.no_grad():
        next(other.parameters()).add_(1.0)
    other.save_pretrained(tmp_path / "transformer")
    m = load_model(str(folder), unet_path=str(tmp_path / "transformer"))
    assert torch.equal(next(m.unet.parameters()), next(other.parameters()))


def test_prompt_encoding_equals_pipeline(model, pipe):
    emb = WAN.encode_prompts(model, PROMPTS)
    with torch.no_grad():
        want, _ = pipe.encode_prompt(
            PROMPTS, do_classifier_free_guidance=False, max_sequence_length=MAX_SEQUENCE_LENGTH
        )
    assert emb.pooled is None and emb.embeds.shape == (3, MAX_SEQUENCE_LENGTH, 32)
    assert torch.equal(emb.embeds, want)
    # every position past the prompt's tokens (its eos included) is exactly zero
    tok = model.tokenizers[0]
    for row, text in zip(emb.embeds, ["a red cube", "a photo of a & blue dog", ""]):
        n = len(tok(text).input_ids)  # the words and </s>
        assert (row[:n].abs().sum(-1) > 0).all() and torch.equal(row[n:], torch.zeros_like(row[n:]))


def test_null_embedding_equals_pipeline_negative(model, pipe):
    null = WAN.null_embedding(model)
    with torch.no_grad():
        _, neg = pipe.encode_prompt("x", negative_prompt="", max_sequence_length=512)
        _, default = pipe.encode_prompt("x", max_sequence_length=512)  # negative_prompt None
    assert null.embeds.shape == neg.shape == (1, 512, 32) and null.pooled is None
    assert torch.equal(null.embeds, neg) and torch.equal(null.embeds, default)
    assert null.embeds[0, 0].abs().sum() > 0 and not null.embeds[0, 1:].any()  # "" is one </s>


def _wan_stats(vae):
    c = vae.config.z_dim
    mu = torch.tensor(vae.config.latents_mean).view(1, c, 1, 1, 1)
    return mu, 1.0 / torch.tensor(vae.config.latents_std).view(1, c, 1, 1, 1)


def test_latents_are_normalised_per_channel(model):
    """z = (m − μ_c)·(1/σ_c) (as Wan's I2V pipeline normalises), logvar − 2·log σ_c; an image
    is a one-frame video; decoding is WanPipeline's z / (1/σ_c) + μ_c then vae.decode."""
    vae = model.vae
    pix = torch.rand(2, 3, RES, RES, generator=torch.Generator().manual_seed(0)) * 2 - 1
    mean, logvar = encode_images(model, pix)
    assert mean.shape == logvar.shape == (2, 16, SIDE, SIDE)
    with torch.no_grad():
        dist = vae.encode(pix.unsqueeze(2)).latent_dist
    mu, inv_std = _wan_stats(vae)
    assert torch.equal(mean, ((dist.mean - mu) * inv_std)[:, :, 0])
    # against float64: |z32 − z64| ≤ a few ulp of the operands' scale ((|m| + |μ|)/σ)
    m64, mu64, s64 = dist.mean.double(), mu.double(), 1.0 / inv_std.double()
    z64 = ((m64 - mu64) / s64)[:, :, 0]
    bound = 4 * EPS32 * ((m64.abs() + mu64.abs()) / s64)[:, :, 0]
    assert ((mean.double() - z64).abs() <= bound).all()
    lv64 = (dist.logvar.double() - 2 * torch.log(s64))[:, :, 0]
    assert ((logvar.double() - lv64).abs() <= 4 * EPS32 * (lv64.abs() + 1)).all()
    assert not torch.equal(mean, dist.mean[:, :, 0])  # the statistics did change something
    # videos: F = 5 frames → F' = (5 − 1)/4 + 1 = 2 latent frames; frame 0 is encoded alone
    vid = torch.rand(1, 3, 5, RES, RES, generator=torch.Generator().manual_seed(1)) * 2 - 1
    vmean, _ = WAN.vae_posterior(model, vid)
    assert vmean.shape == (1, 16, 2, SIDE, SIDE)
    first, _ = encode_images(model, vid[:, :, 0])
    assert torch.equal(vmean[:, :, 0], first)  # causal: frame 0 alone is an image
    # decoding: exactly the pipeline's denormalisation
    z = _randn(2, 16, SIDE, SIDE, seed=2)
    from snpo.models import decode_latents

    with torch.no_grad():
        want = vae.decode(z.unsqueeze(2) / inv_std + mu).sample[:, :, 0]
    assert torch.equal(decode_latents(model, z), ((want + 1) / 2).clamp(0, 1))


def test_conditioning_denoise_and_lora_targets(model):
    emb = WAN.encode_prompts(model, PROMPTS[:2])
    cond = WAN.conditioning(model, emb)
    assert set(cond) == {"encoder_hidden_states"}
    x = _randn(2, 16, SIDE, SIDE, seed=3)
    t = torch.tensor([300.0, 700.0])
    out = WAN.denoise(model.unet, x, t, cond)
    with torch.no_grad():
        want = model.unet(hidden_states=x.unsqueeze(2), timestep=t, **cond).sample
    assert out.shape == x.shape and torch.equal(out, want[:, :, 0])
    torch.testing.assert_close(
        WAN.denoise(model.unet, x, torch.tensor(300.0), cond)[0], out[0], rtol=0, atol=0
    )
    video = _randn(2, 16, 2, SIDE, SIDE, seed=4)  # (B, C, F', h, w) passes through
    with torch.no_grad():
        v = model.unet(hidden_states=video, timestep=t, **cond).sample
    assert torch.equal(WAN.denoise(model.unet, video, t, cond), v)
    names = {n for n, _ in model.unet.named_modules()}
    for attn in ("attn1", "attn2"):  # self- and cross-attention of every block
        for target in WAN.lora_targets:
            assert "blocks.1." + attn + "." + target in names, (attn, target)


def test_noised_uses_u_and_the_scheduler_flow_shift(model):
    assert model.scheduler.config.flow_shift == FLOW_SHIFT
    assert flow_settings(model) == FlowSettings(shift=FLOW_SHIFT)
    g = torch.Generator().manual_seed(5)
    x0, eps = (
        torch.randn(4, 16, SIDE, SIDE, generator=g),
        torch.randn(4, 16, SIDE, SIDE, generator=g),
    )
    u = torch.tensor([0.2, 0.7, 0.2, 0.7], dtype=torch.float64)
    out = WAN.noised(model, x0, eps, FakeDraws(u))
    # independent float64: logit-normal σ = sigmoid(Φ⁻¹(u)), then shift·σ/(1 + (shift − 1)·σ)
    s0 = torch.sigmoid(torch.distributions.Normal(0.0, 1.0).icdf(u))
    sigma = FLOW_SHIFT * s0 / (1 + (FLOW_SHIFT - 1) * s0)
    s = sigma.float()[:, None, None, None]
    torch.testing.assert_close(out.x_t, (1 - s) * x0 + s * eps)
    assert torch.equal(out.target, eps - x0)
    torch.testing.assert_close(out.timestep, (1000 * sigma).float())
    assert out.weight is None


def test_cfg_sample_matches_pipeline(model, pipe):
    """The family's UniPC schedule and CFG, rows [null; cond] in one forward as snpo's sampler
    runs them, equal WanPipeline(..., num_frames=1, output_type="latent") to float32 rounding
    of the batched forward."""
    from snpo.models import PromptEmbeddings

    prompts = ["a red cube", "a green ball"]
    latents = _randn(2, 16, SIDE, SIDE, seed=6)
    theirs = pipe(
        prompts, num_inference_steps=3, guidance_scale=4.0, latents=latents.unsqueeze(2),
        output_type="latent", height=RES, width=RES, num_frames=1,
    ).frames  # fmt: skip
    cond, null = WAN.encode_prompts(model, prompts), WAN.null_embedding(model).expand(2)
    sched = WAN.sampling_scheduler(model, None, 3, "cpu", (16, SIDE, SIDE))
    assert type(sched).__name__ == "UniPCMultistepScheduler"
    x = WAN.initial_latents(sched, latents)
    both = WAN.conditioning(model, PromptEmbeddings.cat([null, cond]))
    for t in sched.timesteps:
        xin = WAN.model_input(sched, x, t)
        with torch.no_grad():
            v_u, v_c = WAN.denoise(model.unet, torch.cat([xin, xin]), t, both).chunk(2)
        x = sched.step(v_u + 4.0 * (v_c - v_u), t, x).prev_sample
    # the pipeline runs the two branches as two forwards, snpo as one of both: the same math,
    # but some CPUs' matmul kernels round a batch of 4 rows differently from 2 (bit-equal on
    # an Intel Xeon, 1.5e-6 apart on an AMD EPYC). Bound: a few ulps per forward, amplified by
    # the guidance (|v_u| + s·|v_c − v_u| ≤ (1 + 2s)·max) over the steps.
    steps, s, ulps = 3, 4.0, 4
    bound = steps * (1 + 2 * s) * ulps * torch.finfo(torch.float32).eps * float(x.abs().max())
    torch.testing.assert_close(x, theirs[:, :, 0], rtol=0, atol=bound)
    euler = WAN.sampling_scheduler(model, "flow_euler", 3, "cpu", (16, SIDE, SIDE))
    assert euler.config.shift == FLOW_SHIFT
    with pytest.raises(ValueError, match="unknown sampler"):
        WAN.sampling_scheduler(model, "ddim", 3, "cpu", (16, SIDE, SIDE))


def test_generate_runs(model):
    from snpo.models import generate

    cond = WAN.encode_prompts(model, ["a red cube", "a cat"])
    images = generate(model, cond, WAN.null_embedding(model), [0, 1], guidance_scale=3.0,
                      steps=2, resolution=RES)  # fmt: skip
    assert images.shape == (2, 3, RES, RES) and bool(((images >= 0) & (images <= 1)).all())


def test_preference_step_end_to_end(model):
    """One snpo step (both branches) through snpo.step.preference_step: loss ln 2 at policy =
    reference, finite gradients in the transformer."""
    from snpo.draws import pair_draws
    from snpo.step import EncodedBatch, StepModels, preference_step, unet_fn

    policy = copy.deepcopy(model.unet).requires_grad_(True).train()
    p = 3
    draws = pair_draws(0, 0, list(range(p)), (16, SIDE, SIDE), model.scheduler, uncond_prob=0.5)
    draws.uncond[:] = torch.tensor([True, False, True])
    pix = torch.rand(2 * p, 3, RES, RES, generator=torch.Generator().manual_seed(7)) * 2 - 1
    mean, _ = encode_images(model, pix)
    batch = EncodedBatch(latents=mean, prompts=WAN.encode_prompts(model, PROMPTS))
    models = StepModels(
        model=model, policy=unet_fn(policy, WAN), reference=unet_fn(model.unet, WAN),
        null=WAN.null_embedding(model), device=torch.device("cpu"), dtype=torch.float32,
    )  # fmt: skip
    res = preference_step(models, batch, draws, objective="snpo", beta=100.0, lam=0.9,
                          backend="torch")  # fmt: skip
    assert res.loss.item() == pytest.approx(np.log(2.0), abs=1e-6)
    res.loss.backward()
    grads = [q.grad for q in policy.parameters() if q.grad is not None]
    assert grads and all(torch.isfinite(g).all() for g in grads)
    assert any(g.abs().sum() > 0 for g in grads) and res.metrics["count_uncond"].item() == 2


def _velocity(transformer, model):
    x = _randn(2, 16, SIDE, SIDE, seed=8)
    cond = WAN.conditioning(model, WAN.encode_prompts(model, ["a red cube", "a cat"]))
    with torch.no_grad():
        return WAN.denoise(transformer, x, torch.tensor([250.0, 750.0]), cond)


def test_full_export_loads_into_the_stock_pipeline(folder, tmp_path):
    from diffusers import WanPipeline, WanTransformer3DModel

    from snpo.models import load_export, write_export

    m = load_model(str(folder))
    before = _velocity(m.unet, m)
    with torch.no_grad():
        for q in m.unet.parameters():
            q.mul_(1.01)
    want = _velocity(m.unet, m)
    assert not torch.equal(want, before)
    out = write_export(tmp_path / "full", m, m.unet, lora=False, meta={})
    meta = json.loads((out / "snpo_export.json").read_text())
    assert (meta["family"], meta["pipeline_class"], meta["denoiser"]) == (
        "wan", "WanPipeline", "transformer",
    )  # fmt: skip
    stock = WanTransformer3DModel.from_pretrained(str(out / "transformer"))
    assert torch.equal(_velocity(stock, m), want)
    pipe = WanPipeline.from_pretrained(str(folder), transformer=stock)
    video = pipe("a red cube", num_inference_steps=2, height=RES, width=RES, num_frames=1,
                 output_type="np", generator=torch.Generator().manual_seed(0)).frames  # fmt: skip
    assert video.shape == (1, 1, RES, RES, 3) and np.isfinite(video).all()
    loaded, _ = load_export(out)
    assert loaded.family == "wan" and torch.equal(_velocity(loaded.unet, m), want)


def test_lora_export_loads_with_load_lora_weights(folder, tmp_path):
    from diffusers import WanPipeline

    from snpo.models import load_export, lora_config, write_export

    m = load_model(str(folder))
    torch.manual_seed(9)
    m.unet.add_adapter(lora_config(WAN.lora_targets, rank=2, alpha=4))
    with torch.no_grad():
        for n, q in m.unet.named_parameters():
            if "lora_B" in n:
                q.normal_(0, 0.5)
    wrapped = {n for n, mod in m.unet.named_modules() if hasattr(mod, "lora_A")}
    assert len(wrapped) == 2 * 2 * len(WAN.lora_targets)  # 2 blocks × attn1, attn2 × targets
    want = _velocity(m.unet, m)
    out = write_export(tmp_path / "lora", m, m.unet, lora=True, meta={})
    base = load_model(str(folder))
    assert not torch.allclose(want, _velocity(base.unet, base))
    # fused (W + s·BA)x against the adapter's Wx + s·B(Ax): the same sums in another order,
    # a few float32 ulps per layer on O(1) velocities; 1e-5 ≈ 80 ulps of 1 covers 2 blocks
    loaded, _ = load_export(out)  # fused
    torch.testing.assert_close(_velocity(loaded.unet, base), want, rtol=1e-5, atol=1e-5)
    pipe = WanPipeline.from_pretrained(str(folder))
    pipe.load_lora_weights(str(out))
    torch.testing.assert_close(_velocity(pipe.transformer, base), want, rtol=1e-5, atol=1e-5)
