"""The real trainer reading a `snpo cache` (ref_mode cache) logs the losses of the live trainer
step for step and exports the same weights, for every preference preset; mismatched or
incomplete caches are refused naming the reason (ref_mode cache) or fall back to live with a
notice (ref_mode auto); under cache the reference, VAE and text encoders are not loaded."""

from __future__ import annotations

import json

import pytest
import torch
from safetensors.torch import load_file

from snpo.cache import CacheError, build_cache
from snpo.config import load_config
from snpo.data import PairBatch
from snpo.models import ModelLoadError, encode_images, encode_prompts
from snpo.trainer import Trainer

from .conftest import launch_deepspeed, read_metrics, train_here, write_config

# 15 kept pairs (pair 2 has a truncated-JPEG loser), 3 pairs per micro-batch, 2 micro-batches per
# step: 5 micro-batches per epoch, so 3 steps see every pair of epoch 0 (the bad one included)
# and cross into epoch 1 — the cache must hold reference errors for 2 epochs.
RUN = dict(
    resolution=16,
    train_batch_size_per_gpu=3,
    gradient_accumulation_steps=2,
    max_steps=3,
    uncond_prob=0.5,  # both branches in every step
    beta=500.0,
    learning_rate=1e-4,
    random_flip=True,
)

# Tolerances. The cache's forwards (VAE, text encoder, reference UNet) ran on other batch
# compositions than the trainer's, so its e_ref (and the cached latents / embeddings the policy
# sees) equal the live ones to float32 rounding, ~2e-7 relative (tests/cache; ~2e-8 measured
# here). The loss is softplus(-z) with z = -(β/2)·(m_a - m̃_b): β/2 = 250 times e ≈ 1 turns
# that into |δz| ≲ 5e-5, and |∂loss/∂z| ≤ 1, so the loss (≈ ln 2) agrees to rtol 1e-4 (measured:
# ≤ 1.5e-5). mse_ref and mse_policy are e_ref and e_θ themselves (measured ≤ 6e-8): rtol 1e-5;
# the gradient norm and the statistics (differences of errors) 1e-3.
# The weights: AdamW's update is lr·m̂/(√v̂ + ε). With the default ε = 1e-8 the first update is
# ≈ lr·sign(g), and a gradient component that sums to ~0 over the batch can change sign between
# two runs that differ only in rounding: a jump of up to 2·lr per weight that says nothing about
# the cache (measured: 2.8e-5 after 3 steps, lr 1e-4). The runs here use ε = 1e-4, above the
# gradients' rounding noise, so the update is a smooth function of g and the exported weights
# agree to 1e-6 absolute (1% of one update of size lr; measured ≤ 1.4e-7) + 1e-4 relative.
LOSS_RTOL = 1e-4
WEIGHT_ATOL = 1e-6
ADAM_EPS = 1e-4


@pytest.fixture(scope="module")
def cache_run(tmp_path_factory, tiny_sd, pickapic):
    """(config values, cache folder): a cache of the test config (lossless fp32 latents)."""
    root = tmp_path_factory.mktemp("cachetrain")
    values = dict(model=tiny_sd, train_data=pickapic, adam_eps=ADAM_EPS, **RUN)
    cfg = load_config(write_config(root / "build.yaml", **values))
    build_cache(cfg, root / "cache", latent_dtype="fp32", shard_size=8, batch_size=4, verbose=False)
    return values, root / "cache"


def _trainer(tmp_path, name, values, **over) -> Trainer:
    cfg = load_config(
        write_config(tmp_path / f"{name}.yaml", output_dir=tmp_path / name, **{**values, **over})
    )
    return Trainer(cfg)


def _weights(export) -> dict[str, torch.Tensor]:
    lora = export / "pytorch_lora_weights.safetensors"
    return load_file(
        lora if lora.is_file() else export / "unet" / "diffusion_pytorch_model.safetensors"
    )


def _empty_batch_loss(t: Trainer) -> torch.Tensor:
    """The all-bad micro-batch placeholder (no pixels, no VAE) gives a zero loss."""
    empty = PairBatch(torch.zeros(0, dtype=torch.long), 0, torch.zeros(0), [], None, None, [])
    loss, metrics = t.micro_step(empty, 1)
    assert float(metrics["pairs"]) == 0.0
    return loss.detach()


@pytest.mark.parametrize(
    "objective, lora_rank",
    [("dpo", 0), ("bdpo", 4), ("npo", 0), ("snpo_naive", 4), ("snpo", 0)],
)
def test_cached_run_matches_live_run(tmp_path, cache_run, objective, lora_rank, capsys):
    values, cache = cache_run
    kw = dict(objective=objective, lora_rank=lora_rank, cache_dir=cache)
    live = _trainer(tmp_path, "live", values, ref_mode="live", **kw)
    live.run()
    cached = _trainer(tmp_path, "cached", values, ref_mode="cache", **kw)
    cached.run()
    out = capsys.readouterr().out
    assert "inputs: live (ref_mode live)" in out
    assert "reference errors from the cache" in out and "VAE latent distributions" in out

    # what the cached run did not hold: no reference (no frozen copy, no adapter toggling), no
    # VAE, no text encoders; the live run had them
    assert cached.sources == {"latents": "cache", "text": "cache", "ref": "cache"}
    assert cached.step_models.reference is None and cached.models.reference is None
    assert cached.models.model.vae is None and cached.models.model.text_encoders == []
    assert live.step_models.reference is not None and live.models.model.vae is not None
    assert (live.models.reference is None) == (lora_rank > 0)

    a, b = read_metrics(tmp_path / "live"), read_metrics(tmp_path / "cached")
    assert [r["step"] for r in a] == [r["step"] for r in b] == [1, 2, 3]
    assert a[-1]["epoch"] == 1  # crossed into the cache's second epoch
    for ra, rb in zip(a, b):
        for k in ("pairs", "pairs_cond", "pairs_uncond", "bad_images", "epoch"):
            assert ra[k] == rb[k], (ra["step"], k)
        assert rb["loss"] == pytest.approx(ra["loss"], rel=LOSS_RTOL), ra["step"]
        assert rb["mse_ref"] == pytest.approx(ra["mse_ref"], rel=1e-5), ra["step"]
        assert rb["mse_policy"] == pytest.approx(ra["mse_policy"], rel=1e-5), ra["step"]
        assert rb["grad_norm"] == pytest.approx(ra["grad_norm"], rel=1e-3), ra["step"]
        if ra["step"] > 1:  # at step 1 policy == reference: every margin is 0 ± rounding
            assert rb["logp_proxy"] == pytest.approx(ra["logp_proxy"], rel=1e-3, abs=1e-6)
            # a pair whose margins differ by rounding only (a LoRA policy barely off the
            # reference) may flip: allow one pair of the branch, no more
            for k, n in (("accuracy_cond", "pairs_cond"), ("accuracy_uncond", "pairs_uncond")):
                if ra[n] == 0:
                    assert ra[k] is None and rb[k] is None, k
                    continue
                assert abs(rb[k] - ra[k]) <= 1.0 / ra[n] + 1e-9, (ra["step"], k, ra[k], rb[k])
    assert a[-1]["bad_images"] == 1  # pair 2 was dropped on both paths
    assert abs(a[0]["loss"] - 0.6931) < 1e-3 and abs(a[-1]["loss"] - 0.6931) > 1e-4  # trained

    wa, wb = _weights(tmp_path / "live" / "export"), _weights(tmp_path / "cached" / "export")
    assert wa.keys() == wb.keys()
    for k in wa:  # equal to the rounding above, elementwise
        torch.testing.assert_close(wb[k], wa[k], rtol=LOSS_RTOL, atol=WEIGHT_ATOL, msg=k)
    meta = json.loads((tmp_path / "cached" / "export" / "snpo_export.json").read_text())
    assert meta["inputs"] == cached.sources
    for t in (live, cached):
        assert float(_empty_batch_loss(t)) == 0.0


def test_cache_mode_refuses_a_mismatched_or_short_cache(tmp_path, cache_run, capsys):
    values, cache = cache_run
    for change, field in (({"seed": 1}, "seed"), ({"uncond_prob": 0.25}, "uncond_prob")):
        cfg = write_config(
            tmp_path / "c.yaml", output_dir=tmp_path / "o", ref_mode="cache", cache_dir=cache,
            **{**values, **change},
        )  # fmt: skip
        assert train_here(cfg) == 2
        err = capsys.readouterr().err
        assert "CacheMismatchError" in err and f"{field} is " in err, err
        assert "in the cache but" in err
    # a run longer than the cached epochs (2): refused up front, naming the epochs to add
    cfg = write_config(
        tmp_path / "c.yaml", output_dir=tmp_path / "o", ref_mode="cache", cache_dir=cache,
        **{**values, "max_steps": 6},
    )  # fmt: skip
    assert train_here(cfg) == 2
    assert "rerun snpo cache with --epochs 3" in capsys.readouterr().err
    # a folder without a cache
    t = _trainer(tmp_path, "none", values, ref_mode="cache", cache_dir=tmp_path / "nothing")
    with pytest.raises(CacheError, match="no cache at"):
        t.setup()
    assert not hasattr(t, "models")  # refused before any model was loaded


def test_auto_falls_back_to_live_and_says_why(tmp_path, cache_run, capsys):
    values, cache = cache_run
    one = {**values, "max_steps": 1}
    t = _trainer(tmp_path, "nocache", one, ref_mode="auto", cache_dir=tmp_path / "nothing")
    t.run()
    out = capsys.readouterr().out
    assert "inputs: live (ref_mode auto: not using the cache: no cache at" in out
    assert t.cache is None and t.step_models.reference is not None
    assert t.models.model.vae is not None and t.models.model.text_encoders
    assert len(read_metrics(tmp_path / "nocache")) == 1

    t = _trainer(tmp_path, "mismatch", one, ref_mode="auto", cache_dir=cache, uncond_prob=0.25)
    t.run()
    out = capsys.readouterr().out
    assert "ref_mode auto: not using the cache: cache fingerprint mismatch" in out
    assert "uncond_prob is 0.5 in the cache but 0.25 in the config" in out
    assert t.sources == {"latents": "live", "text": "live", "ref": "live"}

    # auto with a matching cache uses it; cache_use picks sections (here: reference errors
    # only — the VAE and text encoders run live, the reference is not held)
    t = _trainer(tmp_path, "refonly", one, ref_mode="auto", cache_dir=cache, cache_use=["ref"])
    t.run()
    assert t.sources == {"latents": "live", "text": "live", "ref": "cache"}
    assert t.step_models.reference is None and t.models.model.vae is not None
    assert "reference errors from the cache" in capsys.readouterr().out


def test_every_mix_of_cached_and_live_sections_trains_like_live(tmp_path, cache_run):
    """Each section comes from the cache or is live independently: cached latents with the text
    encoded live (prompts from the captions, no image decoded), cached text with the VAE live."""
    values, cache = cache_run
    one = {**values, "max_steps": 1, "objective": "snpo", "cache_dir": cache}
    live = _trainer(tmp_path, "mixlive", one, ref_mode="live")
    live.run()
    want = read_metrics(tmp_path / "mixlive")[0]
    for use, vae_loaded, text_loaded in (
        (["latents", "ref"], False, True),
        (["text", "ref"], True, False),
    ):
        name = "mix-" + "-".join(use)
        t = _trainer(tmp_path, name, one, ref_mode="cache", cache_use=use)
        t.run()
        assert t.sources == {n: "cache" if n in use else "live" for n in ("latents", "text", "ref")}
        assert (t.models.model.vae is not None) == vae_loaded
        assert bool(t.models.model.text_encoders) == text_loaded
        got = read_metrics(tmp_path / name)[0]
        assert got["pairs"] == want["pairs"] and got["bad_images"] == want["bad_images"]
        assert got["loss"] == pytest.approx(want["loss"], rel=LOSS_RTOL), use
        assert got["mse_ref"] == pytest.approx(want["mse_ref"], rel=1e-5), use


def test_sft_reads_latents_and_text_only(tmp_path, cache_run):
    values, cache = cache_run
    t = _trainer(
        tmp_path,
        "sft",
        {**values, "max_steps": 1},
        objective="sft",
        ref_mode="cache",
        cache_dir=cache,
    )
    t.run()
    assert t.sources == {"latents": "cache", "text": "cache"}
    assert t.models.model.vae is None and t.models.reference is None
    m = t.models.model
    assert m.latent_scale == 2  # read from the VAE's config without loading it
    with pytest.raises(ModelLoadError, match="were not loaded"):
        encode_prompts(m, ["a red cube"])
    with pytest.raises(ModelLoadError, match="was not loaded"):
        encode_images(m, torch.zeros(1, 3, 16, 16))


@pytest.mark.slow
def test_two_processes_zero2_cache_matches_live(tmp_path, cache_run):
    """Two CPU processes (deepspeed launcher, ZeRO-2): every rank reads its own pairs' entries of
    the same cache; the logged losses equal the live run's. 3 pairs per rank and micro-batch,
    15 pairs → 2 micro-batches per epoch and rank, so 4 steps need the cache's 2 epochs."""
    values, cache = cache_run
    two = {**values, "gradient_accumulation_steps": 1, "max_steps": 4, "zero_stage": 2}
    runs = {}
    for mode in ("live", "cache"):
        cfg = write_config(
            tmp_path / f"{mode}.yaml",
            output_dir=tmp_path / mode,
            objective="snpo",
            ref_mode=mode,
            cache_dir=cache,
            **two,
        )
        r = launch_deepspeed(cfg)
        runs[mode] = read_metrics(tmp_path / mode)
    assert "reference errors from the cache" in r.stdout + r.stderr
    a, b = runs["live"], runs["cache"]
    assert [x["step"] for x in a] == [x["step"] for x in b] == [1, 2, 3, 4]
    assert a[-1]["epoch"] == 1
    for ra, rb in zip(a, b):
        assert ra["pairs"] == rb["pairs"] and ra["bad_images"] == rb["bad_images"]
        assert rb["loss"] == pytest.approx(ra["loss"], rel=LOSS_RTOL), ra["step"]
        assert rb["mse_ref"] == pytest.approx(ra["mse_ref"], rel=1e-5), ra["step"]
