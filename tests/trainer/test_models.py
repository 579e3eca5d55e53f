"""Loading tiny diffusers folders (SD1.5- and SDXL-class, latent and pixel space), prompt
encoding, the null embedding and CFG sampling — all offline."""

from __future__ import annotations

import pytest
import torch

from snpo.models import (
    ModelLoadError,
    encode_prompts,
    generate,
    load_model,
    null_embedding,
    save_tiny_model,
    time_ids,
    training_target,
    unet_conditioning,
)


@pytest.fixture(scope="module")
def sd_dir(tmp_path_factory):
    return save_tiny_model(tmp_path_factory.mktemp("sd"), family="sd", resolution=16)


@pytest.fixture(scope="module")
def sdxl_dir(tmp_path_factory):
    return save_tiny_model(tmp_path_factory.mktemp("sdxl"), family="sdxl", resolution=16)


def test_sd_loads_encodes_and_samples(sd_dir):
    m = load_model(str(sd_dir))
    assert m.family == "sd" and m.vae is not None and m.latent_scale == 2
    emb = encode_prompts(m, ["a red cube", "a blue ball"])
    assert emb.embeds.shape == (2, 16, 32) and emb.pooled is None
    assert not torch.equal(emb.embeds[0], emb.embeds[1])
    null = null_embedding(m)
    torch.testing.assert_close(null.embeds, encode_prompts(m, [""]).embeds)
    assert m.null_kind == "empty_prompt"
    imgs = generate(m, emb, null, seeds=[1, 2], steps=3, guidance_scale=3.0)
    assert imgs.shape == (2, 3, 16, 16) and imgs.min() >= 0 and imgs.max() <= 1
    again = generate(m, emb.index(slice(1, 2)), null, seeds=[2], steps=3, guidance_scale=3.0)
    torch.testing.assert_close(again[0], imgs[1], rtol=1e-4, atol=1e-5)  # per-image seeding


def test_sdxl_pooled_time_ids_and_zero_null(sdxl_dir):
    m = load_model(str(sdxl_dir))
    assert m.family == "sdxl" and m.force_zeros_for_empty_prompt and m.null_kind == "zeros"
    emb = encode_prompts(m, ["a red cube"])
    assert emb.embeds.shape == (1, 16, 64) and emb.pooled.shape == (1, 32)
    null = null_embedding(m)
    assert null.embeds.abs().sum() == 0 and null.pooled.abs().sum() == 0
    x = torch.randn(1, 4, 8, 8)
    kw = unet_conditioning(m, emb, time_ids(1, (16, 16)))
    out = m.unet(x, torch.tensor([10]), **kw).sample
    assert out.shape == x.shape
    with pytest.raises(ValueError, match="time_ids"):
        unet_conditioning(m, emb, None)
    imgs = generate(m, emb, null, seeds=[0], steps=2, guidance_scale=2.0)
    assert imgs.shape == (1, 3, 16, 16)


def test_pixel_space_and_negative_unet(tmp_path):
    d = save_tiny_model(tmp_path / "px", with_vae=False, resolution=8)
    m = load_model(str(d))
    assert m.vae is None and m.in_channels == 3 and m.latent_scale == 1
    emb = encode_prompts(m, ["a cat"])
    null = null_embedding(m)
    base = generate(m, emb, null, seeds=[0], steps=2, guidance_scale=4.0)
    neg = load_model(str(d)).unet
    same = generate(m, emb, null, seeds=[0], steps=2, guidance_scale=4.0, negative_unet=neg)
    torch.testing.assert_close(base, same, rtol=1e-4, atol=1e-5)  # same weights → same images
    with torch.no_grad():
        for p in neg.parameters():
            p.add_(0.05 * torch.randn_like(p))
    other = generate(m, emb, null, seeds=[0], steps=2, guidance_scale=4.0, negative_unet=neg)
    assert not torch.allclose(base, other)


def test_v_prediction_target(tmp_path):
    d = save_tiny_model(
        tmp_path / "v", prediction_type="v_prediction", with_vae=False, resolution=8
    )
    m = load_model(str(d))
    x0, noise, t = torch.randn(2, 3, 8, 8), torch.randn(2, 3, 8, 8), torch.tensor([5, 900])
    v = training_target(m, x0, noise, t)
    a = m.scheduler.alphas_cumprod[t].sqrt().view(-1, 1, 1, 1)
    s = (1 - m.scheduler.alphas_cumprod[t]).sqrt().view(-1, 1, 1, 1)
    torch.testing.assert_close(v, a * noise - s * x0)


def test_bad_sources_are_refused(tmp_path):
    with pytest.raises(ModelLoadError, match="no unet/ subfolder"):
        load_model(str(tmp_path))
    with pytest.raises(ModelLoadError, match="neither an existing folder nor a hub id"):
        load_model(str(tmp_path / "missing"))
