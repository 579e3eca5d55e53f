"""Wan2.x-class (video transformer) models through `snpo train` on image pairs (one-frame
videos): a tiny offline WanPipeline folder (``snpo.models.tiny_wan``) trains snpo (full) and
dpo (LoRA); the first step's loss is ln 2; the exports load into a stock WanPipeline; a 2-rank
ZeRO-2 LoRA run (slow); the shipped config parses."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from snpo.models.tiny_wan import TINY_RESOLUTION

from .conftest import REPO, launch_deepspeed, read_metrics, train_here, write_config

LN2_ABS = 4e-7  # ln 2 in float32 (the loss at policy = reference: every margin exactly 0)
FLOW = dict(beta=100.0, learning_rate=1e-4, resolution=TINY_RESOLUTION)
SIDE = TINY_RESOLUTION // 8


@pytest.fixture(scope="module")
def tiny_wan(tmp_path_factory):
    from snpo.models.tiny_wan import save_tiny_wan

    return save_tiny_wan(tmp_path_factory.mktemp("wan") / "m")


def _config(tmp_path, name, model, data, **kw):
    return write_config(
        tmp_path / f"{name}.yaml", model=model, train_data=data, output_dir=tmp_path / name,
        **{**FLOW, **kw},
    )  # fmt: skip


def _check_rows(rows, steps: int, pairs: int) -> None:
    assert [r["step"] for r in rows] == list(range(1, steps + 1))
    assert rows[0]["loss"] == pytest.approx(math.log(2), abs=LN2_ABS)  # policy == reference
    for r in rows:
        assert r["pairs"] == pairs
        assert math.isfinite(r["loss"]) and math.isfinite(r["grad_norm"]) and r["grad_norm"] > 0


def _velocity(transformer, model, seed: int = 0) -> torch.Tensor:
    """The transformer's prediction on a fixed one-frame latent, timestep and prompt."""
    from snpo.models import encode_prompts, get_family

    fam = get_family("wan")
    x = torch.randn(2, 16, SIDE, SIDE, generator=torch.Generator().manual_seed(seed))
    cond = fam.conditioning(model, encode_prompts(model, ["a red cube", ""]))
    with torch.no_grad():
        return fam.denoise(transformer, x, torch.tensor([250.0, 750.0]), cond)


def _sample(pipe) -> np.ndarray:
    return pipe(
        "a red cube", num_inference_steps=2, height=TINY_RESOLUTION, width=TINY_RESOLUTION,
        num_frames=1, output_type="np", generator=torch.Generator().manual_seed(0),
    ).frames  # fmt: skip


def test_wan_snpo_full_trains_and_its_export_runs_in_the_stock_pipeline(
    tmp_path, tiny_wan, pickapic_clean
):
    """Two steps of snpo (both branches), full fine-tune, in this process; the export's
    transformer is a stock WanTransformer3DModel folder that WanPipeline samples with."""
    from diffusers import WanPipeline, WanTransformer3DModel

    from snpo.models import load_export, load_model, null_embedding, read_export_meta

    cfg = _config(
        tmp_path, "full", tiny_wan, pickapic_clean, objective="snpo", max_steps=2, uncond_prob=0.5
    )
    assert train_here(cfg) == 0
    rows = read_metrics(tmp_path / "full")
    _check_rows(rows, 2, 2)
    assert sum(r["pairs_uncond"] for r in rows) > 0  # the null branch was trained
    export = tmp_path / "full" / "export"
    meta = read_export_meta(export)
    assert (meta["family"], meta["kind"], meta["objective"]) == ("wan", "full", "snpo")
    assert (meta["pipeline_class"], meta["denoiser_class"]) == (
        "WanPipeline",
        "WanTransformer3DModel",
    )
    assert (meta["denoiser"], meta["prediction_type"], meta["null_kind"]) == (
        "transformer", "flow", "empty_prompt",
    )  # fmt: skip

    assert ".frames[0][0]" in (export / "README.md").read_text()  # the card samples a frame
    stock = WanTransformer3DModel.from_pretrained(str(export / "transformer"))
    base = load_model(str(tiny_wan))
    assert not torch.equal(_velocity(stock, base), _velocity(base.unet, base))  # it trained
    pipe = WanPipeline.from_pretrained(str(tiny_wan), transformer=stock)
    video = _sample(pipe)
    assert video.shape == (1, 1, TINY_RESOLUTION, TINY_RESOLUTION, 3) and np.isfinite(video).all()

    loaded, _ = load_export(export)
    assert loaded.family == "wan" and torch.equal(
        _velocity(loaded.unet, base), _velocity(stock, base)
    )
    # the null the null branch was trained on is the pipeline's own CFG negative ("")
    with torch.no_grad():
        _, neg = pipe.encode_prompt("a red cube", negative_prompt="", max_sequence_length=512)
    assert torch.equal(null_embedding(loaded).embeds, neg)


def test_wan_dpo_lora_export_loads_with_load_lora_weights(tmp_path, tiny_wan, pickapic_clean):
    from diffusers import WanPipeline

    from snpo.models import load_export, load_model

    cfg = _config(
        tmp_path, "lora", tiny_wan, pickapic_clean, objective="dpo", max_steps=2,
        lora_rank=4, lora_alpha=8, learning_rate=1e-3,
    )  # fmt: skip
    assert train_here(cfg) == 0
    rows = read_metrics(tmp_path / "lora")
    _check_rows(rows, 2, 2)
    export = tmp_path / "lora" / "export"
    loaded, meta = load_export(export)  # fused into the base transformer
    assert (meta["family"], meta["kind"]) == ("wan", "lora")
    base = load_model(str(tiny_wan))
    want = _velocity(loaded.unet, base)
    pipe = WanPipeline.from_pretrained(str(tiny_wan))
    before = _velocity(pipe.transformer, base)
    pipe.load_lora_weights(str(export))
    after = _velocity(pipe.transformer, base)
    assert (after - before).abs().max() > 1e-5  # the trained adapter is applied
    # fused against unfused adapter: the same sums in another order (see tests/models/test_wan.py)
    torch.testing.assert_close(after, want, rtol=1e-5, atol=1e-5)
    assert np.isfinite(_sample(pipe)).all()


def test_wan_trains_from_snpo_cache_as_live(tmp_path, tiny_wan, pickapic_clean):
    """`snpo cache` of a Wan folder (normalised 16-channel one-frame latents, UMT5 embeddings,
    reference errors) feeds the trainer (VAE, text encoder and reference not run) with the
    losses of the live run. Tolerances as tests/trainer/test_cache_training.py derives them: the
    cache's forwards ran on other batch compositions, float32 rounding moves e_ref by ~1e-7
    relative, which β/2 = 50 times e ≈ 2 turns into |δloss| ≲ 1e-5 (measured 6e-6 at step 2);
    mse_ref is e_ref itself."""
    from snpo.cache import build_cache
    from snpo.config import load_config

    values = dict(model=tiny_wan, train_data=pickapic_clean, objective="snpo", max_steps=2,
                  uncond_prob=0.5, adam_eps=1e-4, **FLOW)  # fmt: skip
    cfg = load_config(write_config(tmp_path / "build.yaml", **values))
    build_cache(cfg, tmp_path / "cache", latent_dtype="fp32", shard_size=8, batch_size=4,
                verbose=False)  # fmt: skip
    live = write_config(tmp_path / "live.yaml", output_dir=tmp_path / "live", **values)
    cached = write_config(tmp_path / "cached.yaml", output_dir=tmp_path / "cached",
                          cache_dir=tmp_path / "cache", ref_mode="cache", **values)  # fmt: skip
    assert train_here(live) == 0 and train_here(cached) == 0
    a, b = read_metrics(tmp_path / "live"), read_metrics(tmp_path / "cached")
    _check_rows(b, 2, 2)
    for x, y in zip(a, b):
        assert y["loss"] == pytest.approx(x["loss"], rel=1e-4)
        assert y["mse_ref"] == pytest.approx(x["mse_ref"], rel=1e-5)
        assert y["pairs_uncond"] == x["pairs_uncond"]


def test_resolution_must_fit_the_wan_grid(tmp_path, tiny_wan, pickapic_clean, capsys):
    from snpo.models import load_model
    from snpo.trainer.setup import latent_grid_problem

    wan = load_model(str(tiny_wan), skip=("text_encoders",))
    assert latent_grid_problem(wan, 32) is None and latent_grid_problem(wan, 48) is None
    assert "patches of 2" in latent_grid_problem(wan, 40)  # 5 latent pixels: odd
    cfg = _config(tmp_path, "odd", tiny_wan, pickapic_clean, objective="dpo", resolution=40)
    capsys.readouterr()
    assert train_here(cfg) == 2  # a configuration error before the first step
    assert "cannot split into patches of 2" in capsys.readouterr().err


def test_shipped_wan_config_parses():
    from snpo.config import load_config
    from snpo.models import get_family

    c = load_config(REPO / "snpo" / "configs" / "wan_snpo_lora.yaml", check_files=False)
    assert c.model == "Wan-AI/Wan2.1-T2V-1.3B-Diffusers" and c.objective == "snpo"
    assert (c.beta, c.precision, c.effective_lam) == (100.0, "bf16", 0.9)
    assert c.resolution % 16 == 0  # VAE 8 × patch 2
    assert c.lora_rank > 0 and list(c.lora_targets) == list(get_family("wan").lora_targets)
    assert c.uncond_prob > 0  # the null branch is trained


@pytest.mark.slow
def test_wan_snpo_lora_two_processes_zero2(tmp_path, tiny_wan, pickapic_clean):
    """`deepspeed --num_gpus 2 snpo/train.py` on the CPU, ZeRO-2 LoRA: both ranks train (4
    pairs per step), and the consolidated adapter loads into the stock pipeline."""
    from diffusers import WanPipeline

    from snpo.models import load_model

    cfg = _config(tmp_path, "z2", tiny_wan, pickapic_clean, objective="snpo", max_steps=2,
                  zero_stage=2, uncond_prob=0.5, lora_rank=4, learning_rate=1e-3)  # fmt: skip
    launch_deepspeed(cfg, timeout=400)
    _check_rows(read_metrics(tmp_path / "z2"), 2, 4)  # 2 pairs × 2 processes per step
    base = load_model(str(tiny_wan))
    pipe = WanPipeline.from_pretrained(str(tiny_wan))
    before = _velocity(pipe.transformer, base)
    pipe.load_lora_weights(str(tmp_path / "z2" / "export"))
    assert (_velocity(pipe.transformer, base) - before).abs().max() > 1e-5
