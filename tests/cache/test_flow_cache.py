"""Caches of flow-matching families (SD3-class, FLUX-class): every cached value equals the live
computation (16-channel shifted+scaled latents, the SD3 three-encoder / FLUX T5+CLIP prompt
embeddings, the null embedding, reference errors at σ(u)); a model loaded without its text
encoders (no T5) plus the cache gives the same encoded batch and e_ref; the σ-sampling options
stale the reference errors by name; ε-family fingerprints keep their historical values."""

from __future__ import annotations

import dataclasses

import pytest
import torch

from snpo.cache import CacheMismatchError, build_cache, open_cache, section_fingerprint
from snpo.cache.identity import data_identity, draws_version, model_identity
from snpo.data import PairDataset, collate_pairs, open_source
from snpo.draws import pair_draws
from snpo.models import (
    ModelLoadError,
    encode_images,
    encode_prompts,
    load_model,
    null_embedding,
)
from snpo.step import (
    EncodedBatch,
    StepModels,
    branch_embeddings,
    encode_batch,
    encode_latents,
    unet_fn,
)

from .conftest import BAD_PAIR, BUILD, cache_main, make_cfg, with_

CPU = torch.device("cpu")
IDX = [0, BAD_PAIR, 5, 9, 14, 3]  # across shards of 4, with the bad pair
# Tolerances. Stored in float32 (fp32 latents; text and ref in the fp32 training dtype), a
# cached value differs from the live one only by the rounding of forwards that ran on other
# batch compositions (other BLAS/oneDNN blockings). Measured: prompt embeddings and the null
# bit-equal; latents ≤ 1.5e-6 absolute at |z| ≤ 7, i.e. 3 ulps of float32 there (ulp 4.8e-7):
# atol 4e-6 (8 ulps); e_ref, a mean of 16·8·8 squares, ≤ 1.3e-7 relative: rtol 1e-5, atol
# 1e-7 as for the SD caches (tests/cache/test_equivalence.py).
TOL = dict(rtol=1e-5, atol=4e-6)
REF_TOL = dict(rtol=1e-5, atol=1e-7)
# draws_version of every cache built before the flow draws u were added (snpo.draws); the ε-
# families' ref and per-epoch latent fingerprints name it, so it must not change
DRAWS_VERSION = "sha256:046181a3f904047958778d44ed4312493c914287e30845e195cf2c42bf2bd70d"


@pytest.fixture(scope="module")
def tiny_sd3(tmp_path_factory):
    from snpo.models.tiny_flow import save_tiny_sd3

    return save_tiny_sd3(tmp_path_factory.mktemp("sd3") / "m")


@pytest.fixture(scope="module")
def sd3_cache(tmp_path_factory, tiny_sd3, pickapic):
    """(cfg, cache dir) of the tiny SD3 (scheduler shift 3), random flips, fp32 latents, built
    by ``snpo cache`` with the session caches' options."""
    root = tmp_path_factory.mktemp("sd3cache")
    cfg = make_cfg(root, tiny_sd3, pickapic, beta=100.0)
    opts = ["--epochs", "2", "--shard_size", "4", "--batch_size", "4", "--num_workers", "0"]
    argv = ["--config", str(root / "train.yaml"), "--out", str(root / "cache"), *opts]
    assert cache_main([*argv, "--latent_dtype", "fp32", "--quiet"]) == 0
    return cfg, root / "cache"


def _live(cfg, model):
    """StepModels of the live path (the model's transformer as the reference)."""
    model.spec.configure(model, cfg)
    ref = unet_fn(model.unet, model.spec)
    return StepModels(model, None, ref, null_embedding(model), CPU, torch.float32)


def _live_batch(cfg, models, epoch, idx):
    """(decoded batch, its draws, encode_batch) as the trainer's live path makes them."""
    ds = PairDataset(
        open_source(cfg),
        resolution=cfg.resolution,
        seed=cfg.seed,
        random_crop=cfg.random_crop,
        random_flip=cfg.random_flip,
    )
    batch = collate_pairs([ds[(epoch, i)] for i in idx])  # the bad pair is dropped here
    m = models.model
    side = cfg.resolution // m.latent_scale
    d = pair_draws(
        cfg.seed, epoch, batch.indices, (m.in_channels, side, side), m.scheduler, cfg.uncond_prob
    )
    return batch, d, encode_batch(models, batch, d)


def _ref_err(models, enc, d):
    from snpo.cache import reference_errors

    return reference_errors(models, enc, d)


def test_sd3_cache_equals_the_live_computation(sd3_cache):
    cfg, root = sd3_cache
    cache = open_cache(root, cfg, epochs=2)
    m = load_model(cfg.model)
    live = _live(cfg, m)
    lat, txt = cache.layout("latents"), cache.layout("text")
    assert lat["family"] == "sd3" and lat["latent_shape"] == [16, 8, 8]
    t5_len = int(m.extra["max_sequence_length"])
    clip_len = m.tokenizers[0].model_max_length
    assert txt["pooled"] and txt["embed_shape"] == [clip_len + t5_len, 48]
    assert cache.null().pooled.shape == (1, 32)  # CLIP-L ⊕ CLIP-G text_embeds
    torch.testing.assert_close(cache.null().embeds, null_embedding(m).embeds, rtol=0, atol=0)
    torch.testing.assert_close(cache.null().pooled, null_embedding(m).pooled, rtol=0, atol=0)
    for epoch in (0, 1):
        batch, d, enc = _live_batch(cfg, live, epoch, IDX)
        assert BAD_PAIR not in batch.indices.tolist()
        assert d.uncond.any() and (~d.uncond).any()  # both branches
        got = cache.encoded_batch(epoch, batch.indices, d)
        assert got.time_ids is None and enc.time_ids is None
        torch.testing.assert_close(got.latents, enc.latents, **TOL)
        seen_c = branch_embeddings(cache.null(), got.prompts, d.uncond)
        seen = branch_embeddings(live.null, enc.prompts, d.uncond)  # null-branch rows: the null
        torch.testing.assert_close(seen_c.embeds, seen.embeds, **TOL)
        torch.testing.assert_close(seen_c.pooled, seen.pooled, **TOL)
        want = _ref_err(live, enc, d)
        torch.testing.assert_close(cache.ref_err(epoch, batch.indices), want, **REF_TOL)
        torch.testing.assert_close(_ref_err(live, got, d), want, **REF_TOL)
        other_u = dataclasses.replace(d, u=1.0 - d.u)  # σ comes from the draws' u
        assert not torch.allclose(_ref_err(live, enc, other_u), want, rtol=1e-3)
    # the stored posterior is (μ − shift)·scale of the VAE's (the winners of the last batch)
    x = batch.pixels[:, 0]
    vae = m.vae.config
    with torch.no_grad():
        want = (m.vae.encode(x).latent_dist.mean - vae.shift_factor) * vae.scaling_factor
    assert (vae.shift_factor, vae.scaling_factor) == (0.0609, 1.5305)
    torch.testing.assert_close(encode_images(m, x)[0], want, rtol=0, atol=0)
    torch.testing.assert_close(cache.latents(1, batch.indices).mean[: len(batch)], want, **TOL)


def test_without_text_encoders_the_cache_gives_the_same_batch(sd3_cache):
    """The trainer reading cached text loads no T5 (nor CLIP): the same encoded batch (live VAE
    latents + cached text) and, through the same transformer, the same e_ref."""
    cfg, root = sd3_cache
    cache = open_cache(root, cfg, epochs=2, need=("text", "ref"))
    full = _live(cfg, load_model(cfg.model))
    bare = load_model(cfg.model, skip=("text_encoders",))
    assert bare.text_encoders == [] and bare.tokenizers == [] and bare.vae is not None
    with pytest.raises(ModelLoadError, match="text encoders .* were not loaded"):
        encode_prompts(bare, ["a photo of a red cube"])
    bare.spec.configure(bare, cfg)
    ref = unet_fn(bare.unet, bare.spec)
    models = StepModels(bare, None, ref, cache.null(), CPU, torch.float32)
    for epoch in (0, 1):
        batch, d, enc = _live_batch(cfg, full, epoch, IDX)
        latents, tid = encode_latents(models, batch, d)
        prompts = cache.text(batch.indices)
        torch.testing.assert_close(latents, enc.latents, rtol=0, atol=0)  # same VAE, same batch
        seen_c = branch_embeddings(cache.null(), prompts, d.uncond)
        seen = branch_embeddings(full.null, enc.prompts, d.uncond)
        torch.testing.assert_close(seen_c.embeds, seen.embeds, **TOL)
        torch.testing.assert_close(seen_c.pooled, seen.pooled, **TOL)
        e = _ref_err(models, EncodedBatch(latents, prompts, tid), d)
        torch.testing.assert_close(e, _ref_err(full, enc, d), **REF_TOL)
        torch.testing.assert_close(e, cache.ref_err(epoch, batch.indices), **REF_TOL)


@pytest.mark.parametrize(
    "change, message",
    [
        (
            dict(flow_sigma_sampler="uniform"),
            "flow.flow_sigma_sampler is 'logit_normal' in the cache but 'uniform' in the config",
        ),
        (dict(flow_shift=2.0), "flow.flow_shift is null in the cache but 2.0 in the config"),
        (dict(flow_logit_mean=0.5), "flow.flow_logit_mean is 0.0 in the cache but 0.5"),
        (dict(flow_logit_std=2.0), "flow.flow_logit_std is 1.0 in the cache but 2.0"),
    ],
)
def test_sigma_options_stale_the_reference_errors_by_name(sd3_cache, change, message):
    cfg, root = sd3_cache
    other = with_(cfg, **change)
    with pytest.raises(CacheMismatchError, match="reference errors") as err:
        open_cache(root, other)
    assert message in str(err.value)
    open_cache(root, other, need=("latents", "text"))  # σ does not touch the inputs


def test_options_the_sigma_sampler_does_not_read_keep_the_cache(sd3_cache):
    cfg, root = sd3_cache
    # logit-normal σ does not read the mode scale; objective, β and weighting never matter
    open_cache(root, with_(cfg, flow_mode_scale=0.5, objective="dpo", weighting="elbo"))


def test_eps_family_fingerprints_keep_their_fields(tiny_sd, tiny_sdxl, pickapic, tmp_path):
    """draws_version is the historical value and ε-family fingerprints gain no flow field, so
    SD1.5/SDXL caches built before the flow families stay valid."""
    assert draws_version() == DRAWS_VERSION
    ref_keys = {
        "data", "max_train_pairs", "precision", "resolution", "random_crop", "random_flip",
        "vae_weights", "transform_version", "unet_weights", "text_encoder_weights", "null_kind",
        "scheduler", "seed", "uncond_prob", "draws_version",
    }  # fmt: skip
    for model, null_kind in ((tiny_sd, "empty_prompt"), (tiny_sdxl, "zeros")):
        cfg = make_cfg(tmp_path / model.parent.name, model, pickapic)
        mid = model_identity(cfg)
        assert "unet_weights" in mid and mid["null_kind"] == null_kind
        fp = section_fingerprint("ref", cfg, {}, mid, data_identity(cfg))
        assert set(fp) == ref_keys


def test_flux_cache_equals_the_live_computation(tmp_path, pickapic):
    """FLUX: 16-channel unpacked latents (the transformer's 64 input channels are 2×2 patches),
    T5 states + CLIP pooled, and e_ref at the config's σ sampler and embedded guidance (the
    build applies them: family.configure); guidance_scale stales it."""
    from snpo.models.tiny_flow import save_tiny_flux

    model = save_tiny_flux(tmp_path / "flux")
    run = dict(objective="dpo", uncond_prob=0.0, beta=100.0, guidance_scale=2.5)
    cfg = make_cfg(tmp_path, model, pickapic, flow_sigma_sampler="mode", **run)
    build_cache(cfg, tmp_path / "c", latent_dtype="fp32", **BUILD)
    cache = open_cache(tmp_path / "c", cfg, epochs=2)
    m = load_model(cfg.model)
    live = _live(cfg, m)
    assert cache.layout("latents")["latent_shape"] == [16, 8, 8]
    assert cache.layout("text")["embed_shape"] == [int(m.extra["max_sequence_length"]), 48]
    torch.testing.assert_close(cache.null().embeds, null_embedding(m).embeds, rtol=0, atol=0)
    batch, d, enc = _live_batch(cfg, live, 1, IDX)
    got = cache.encoded_batch(1, batch.indices, d)
    torch.testing.assert_close(got.latents, enc.latents, **TOL)
    torch.testing.assert_close(got.prompts.embeds, enc.prompts.embeds, **TOL)
    torch.testing.assert_close(got.prompts.pooled, enc.prompts.pooled, **TOL)
    want = _ref_err(live, enc, d)
    torch.testing.assert_close(cache.ref_err(1, batch.indices), want, **REF_TOL)
    with pytest.raises(CacheMismatchError, match="guidance_scale is 2.5 in the cache but 2.0"):
        open_cache(tmp_path / "c", with_(cfg, guidance_scale=2.0))


def test_sd3_training_from_the_cache_matches_live(tmp_path, tiny_sd3, pickapic):
    """`ref_mode: cache` on the tiny SD3 logs the live run's losses step for step (3 steps of
    snpo crossing into epoch 1, both branches), loading neither the T5 nor the other encoders,
    the VAE or a reference. Tolerances as tests/trainer/test_cache_training.py explains them."""
    from snpo.config import load_config
    from snpo.trainer import Trainer
    from tests.trainer.conftest import read_metrics, write_config

    values = dict(
        model=tiny_sd3, train_data=pickapic, resolution=16, train_batch_size_per_gpu=3,
        gradient_accumulation_steps=2, max_steps=3, uncond_prob=0.5, beta=100.0,
        learning_rate=1e-4, random_flip=True, adam_eps=1e-4, objective="snpo", lora_rank=0,
    )  # fmt: skip
    cfg = load_config(write_config(tmp_path / "build.yaml", **values))
    build_cache(
        cfg, tmp_path / "cache", latent_dtype="fp32", shard_size=8, batch_size=4, verbose=False
    )
    runs = {}
    for mode in ("live", "cache"):
        path = write_config(
            tmp_path / f"{mode}.yaml",
            output_dir=tmp_path / mode,
            ref_mode=mode,
            cache_dir=tmp_path / "cache",
            **values,
        )
        runs[mode] = Trainer(load_config(path))
        runs[mode].run()
    cached = runs["cache"]
    assert cached.sources == {"latents": "cache", "text": "cache", "ref": "cache"}
    assert cached.models.model.text_encoders == [] and cached.models.model.vae is None
    assert cached.step_models.reference is None
    a, b = read_metrics(tmp_path / "live"), read_metrics(tmp_path / "cache")
    assert [r["step"] for r in a] == [r["step"] for r in b] == [1, 2, 3]
    assert a[-1]["epoch"] == 1 and a[-1]["bad_images"] == b[-1]["bad_images"] == 1
    for ra, rb in zip(a, b):
        for k in ("pairs", "pairs_cond", "pairs_uncond"):
            assert ra[k] == rb[k], (ra["step"], k)
        assert rb["loss"] == pytest.approx(ra["loss"], rel=1e-4), ra["step"]
        assert rb["mse_ref"] == pytest.approx(ra["mse_ref"], rel=1e-5), ra["step"]
        assert rb["mse_policy"] == pytest.approx(ra["mse_policy"], rel=1e-5), ra["step"]
        assert rb["grad_norm"] == pytest.approx(ra["grad_norm"], rel=1e-3), ra["step"]
    assert abs(a[-1]["loss"] - 0.6931) > 1e-4  # it trained
