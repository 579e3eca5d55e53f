"""SD3-class and FLUX-class (flow-matching) models through `snpo train`: tiny offline folders
(``snpo.models.tiny_flow``) train dpo and snpo, LoRA and full; the first step's loss is ln 2;
exports load into stock diffusers pipelines; FLUX refuses the null-branch objectives; a 2-rank
ZeRO-3 run and a kill -9 resume (slow); the shipped SD3.5-medium configs parse."""

from __future__ import annotations

import math
import signal
import subprocess
import sys
import time

import numpy as np
import pytest
import torch

from .conftest import REPO, child_env, launch_deepspeed, read_metrics, train_here, write_config

LN2_ABS = 4e-7  # ln 2 in float32
FLOW = dict(beta=100.0, learning_rate=1e-4)  # β on the flow scale (docs/flow.md)


@pytest.fixture(scope="module")
def tiny_sd3(tmp_path_factory):
    from snpo.models.tiny_flow import save_tiny_sd3

    return save_tiny_sd3(tmp_path_factory.mktemp("sd3") / "m")


@pytest.fixture(scope="module")
def tiny_flux(tmp_path_factory):
    from snpo.models.tiny_flow import save_tiny_flux

    return save_tiny_flux(tmp_path_factory.mktemp("flux") / "m")


def _config(tmp_path, name, model, data, **kw):
    return write_config(
        tmp_path / f"{name}.yaml",
        model=model,
        train_data=data,
        output_dir=tmp_path / name,
        **{**FLOW, **kw},
    )


def _check_rows(rows, steps: int, pairs: int) -> None:
    assert [r["step"] for r in rows] == list(range(1, steps + 1))
    assert rows[0]["loss"] == pytest.approx(math.log(2), abs=LN2_ABS)  # policy == reference
    for r in rows:
        assert r["pairs"] == pairs
        assert math.isfinite(r["loss"]) and math.isfinite(r["grad_norm"]) and r["grad_norm"] > 0


def _velocity(transformer, model, seed: int = 0) -> torch.Tensor:
    """The transformer's prediction on a fixed latent, timestep and prompt."""
    from snpo.models import encode_prompts, get_family

    fam = get_family("sd3")
    x = torch.randn(2, 16, 8, 8, generator=torch.Generator().manual_seed(seed))
    cond = fam.conditioning(model, encode_prompts(model, ["a red cube", ""]))
    with torch.no_grad():
        return fam.denoise(transformer, x, torch.tensor([250.0, 750.0]), cond)


def test_sd3_snpo_full_trains_and_its_export_runs_in_the_stock_pipeline(
    tmp_path, tiny_sd3, pickapic_clean
):
    """Two steps of snpo (both branches), full fine-tune, in this process; the export's
    transformer is a stock SD3Transformer2DModel folder that StableDiffusion3Pipeline runs."""
    from diffusers import SD3Transformer2DModel, StableDiffusion3Pipeline

    from snpo.models import load_export, load_model, null_embedding, read_export_meta

    cfg = _config(
        tmp_path, "full", tiny_sd3, pickapic_clean, objective="snpo", max_steps=2, uncond_prob=0.5
    )
    assert train_here(cfg) == 0
    rows = read_metrics(tmp_path / "full")
    _check_rows(rows, 2, 2)
    assert sum(r["pairs_uncond"] for r in rows) > 0  # the null branch was trained
    export = tmp_path / "full" / "export"
    meta = read_export_meta(export)
    assert (meta["family"], meta["kind"], meta["objective"]) == ("sd3", "full", "snpo")
    assert meta["pipeline_class"] == "StableDiffusion3Pipeline"
    assert (meta["denoiser"], meta["prediction_type"]) == ("transformer", "flow")
    assert meta["null_kind"] == "empty_prompt" and meta["lam"] == 0.9

    stock = SD3Transformer2DModel.from_pretrained(str(export / "transformer"))
    base = load_model(str(tiny_sd3))
    assert not torch.equal(_velocity(stock, base), _velocity(base.unet, base))
    pipe = StableDiffusion3Pipeline.from_pretrained(str(tiny_sd3), transformer=stock)
    img = pipe(
        "a red cube",
        num_inference_steps=2,
        height=16,
        width=16,
        output_type="np",
        generator=torch.Generator().manual_seed(0),
    ).images
    assert img.shape == (1, 16, 16, 3) and np.isfinite(img).all()

    loaded, _ = load_export(export)
    assert loaded.family == "sd3"
    assert torch.equal(_velocity(loaded.unet, base), _velocity(stock, base))
    # the null the null branch was trained on: the pipeline's own CFG negative (the empty prompt)
    with torch.no_grad():
        neg = pipe.encode_prompt("", "", "", do_classifier_free_guidance=False)
    null = null_embedding(loaded)
    assert torch.equal(null.embeds, neg[0]) and torch.equal(null.pooled, neg[2])


def test_sd3_dpo_lora_export_loads_with_load_lora_weights(tmp_path, tiny_sd3, pickapic_clean):
    from diffusers import StableDiffusion3Pipeline

    from snpo.models import load_export, load_model

    cfg = _config(
        tmp_path, "lora", tiny_sd3, pickapic_clean, objective="dpo", max_steps=2,
        lora_rank=4, lora_alpha=8, learning_rate=1e-3,
    )  # fmt: skip
    assert train_here(cfg) == 0
    _check_rows(read_metrics(tmp_path / "lora"), 2, 2)
    export = tmp_path / "lora" / "export"
    loaded, meta = load_export(export)  # fused into the base transformer
    assert (meta["family"], meta["kind"]) == ("sd3", "lora")
    base = load_model(str(tiny_sd3))
    want = _velocity(loaded.unet, base)
    pipe = StableDiffusion3Pipeline.from_pretrained(str(tiny_sd3))
    before = _velocity(pipe.transformer, base)
    pipe.load_lora_weights(str(export))
    after = _velocity(pipe.transformer, base)
    assert (after - before).abs().max() > 1e-5  # the trained adapter is applied
    torch.testing.assert_close(after, want, rtol=1e-5, atol=1e-5)


def test_flux_trains_dpo_and_refuses_the_null_branch_objectives(
    tmp_path, tiny_flux, pickapic_clean, capsys
):
    from snpo.models.flux import NO_NULL_BRANCH

    cfg = _config(tmp_path, "dpo", tiny_flux, pickapic_clean, objective="dpo", max_steps=2,
                  uncond_prob=0.0)  # fmt: skip
    assert train_here(cfg) == 0
    rows = read_metrics(tmp_path / "dpo")
    _check_rows(rows, 2, 2)
    assert all(r["pairs_uncond"] == 0 for r in rows)
    assert (tmp_path / "dpo" / "export" / "transformer").is_dir()
    for objective, uncond, said in (("snpo", 0.0, NO_NULL_BRANCH), ("dpo", 0.3, "uncond_prob")):
        capsys.readouterr()
        bad = _config(tmp_path, f"bad_{objective}", tiny_flux, pickapic_clean,
                      objective=objective, uncond_prob=uncond)  # fmt: skip
        assert train_here(bad) == 2
        err = capsys.readouterr().err.strip().splitlines()
        assert len(err) == 1 and "configuration error" in err[0] and said in err[0]
        assert not (tmp_path / f"bad_{objective}").exists()  # refused before anything ran


def test_sd3_all_bad_micro_batch_under_zero3(tmp_path, tiny_sd3, pickapic):
    """One pair per micro-batch: the truncated-JPEG pair's micro-batch is all bad and runs the
    idle inputs (zero latents of the flow latent shape on the null embedding) through the
    transformer under ZeRO-3's hooks; the consolidated LoRA export follows."""
    cfg = _config(tmp_path, "idle", tiny_sd3, pickapic, objective="snpo", max_steps=1,
                  train_batch_size_per_gpu=1, gradient_accumulation_steps=5, zero_stage=3,
                  lora_rank=4)  # fmt: skip
    with pytest.warns(UserWarning, match="skipping a bad pair"):
        assert train_here(cfg) == 0
    (row,) = read_metrics(tmp_path / "idle")
    assert row["bad_images"] == 1 and row["pairs"] == 4  # 5 micro-batches, one idle
    assert math.isfinite(row["loss"]) and row["grad_norm"] > 0
    assert (tmp_path / "idle" / "export" / "pytorch_lora_weights.safetensors").is_file()


def test_resolution_must_fit_the_transformer_grid(
    tmp_path, tiny_sd3, tiny_flux, pickapic_clean, capsys
):
    from snpo.models import load_model
    from snpo.trainer.setup import latent_grid_problem

    cfg = _config(tmp_path, "odd", tiny_sd3, pickapic_clean, objective="dpo", resolution=18)
    capsys.readouterr()
    assert train_here(cfg) == 2  # refused before the first step, a configuration error
    assert "cannot split into patches of 2" in capsys.readouterr().err

    sd3 = load_model(str(tiny_sd3), skip=("text_encoders",))
    assert latent_grid_problem(sd3, 16) is None and latent_grid_problem(sd3, 64) is None
    assert "patches of 2" in latent_grid_problem(sd3, 18)  # 9 latent pixels: odd
    assert "pos_embed_max_size 16" in latent_grid_problem(sd3, 68)  # 17 patches > 16
    flux = load_model(str(tiny_flux), skip=("text_encoders",))
    assert latent_grid_problem(flux, 16) is None
    assert "patches of 2" in latent_grid_problem(flux, 18)  # 2×2 packing


def test_shipped_sd35m_configs_parse():
    from snpo.config import load_config
    from snpo.models import get_family

    cfgs = {
        n: load_config(REPO / "snpo" / "configs" / f"{n}.yaml", check_files=False)
        for n in ("sd35m_snpo", "sd35m_snpo_lora", "sd35m_dpo")
    }
    targets = list(get_family("sd3").lora_targets)
    for name, c in cfgs.items():
        assert c.model == "stabilityai/stable-diffusion-3.5-medium", name
        assert (c.beta, c.precision, c.resolution) == (100.0, "bf16", 1024), name
        assert c.uncond_prob > 0 and c.train_batch_size_per_gpu * c.gradient_accumulation_steps
    assert cfgs["sd35m_snpo"].effective_lam == cfgs["sd35m_snpo_lora"].effective_lam == 0.9
    assert cfgs["sd35m_dpo"].effective_lam == 1.0 and cfgs["sd35m_dpo"].objective == "dpo"
    lora = cfgs["sd35m_snpo_lora"]
    assert lora.lora_rank > 0 and list(lora.lora_targets) == targets
    assert cfgs["sd35m_snpo"].lora_rank == cfgs["sd35m_dpo"].lora_rank == 0


@pytest.mark.slow
def test_sd3_snpo_two_processes_zero3(tmp_path, tiny_sd3, pickapic_clean):
    """`deepspeed --num_gpus 2 snpo/train.py` on the CPU, ZeRO-3 full fine-tune: both branches
    train, and the consolidated export is a stock transformer folder."""
    from diffusers import SD3Transformer2DModel

    cfg = _config(tmp_path, "z3", tiny_sd3, pickapic_clean, objective="snpo", max_steps=2,
                  zero_stage=3, uncond_prob=0.5)  # fmt: skip
    launch_deepspeed(cfg, timeout=400)
    rows = read_metrics(tmp_path / "z3")
    _check_rows(rows, 2, 4)  # 2 pairs × 2 processes per step
    got = SD3Transformer2DModel.from_pretrained(str(tmp_path / "z3" / "export" / "transformer"))
    base = SD3Transformer2DModel.from_pretrained(str(tiny_sd3 / "transformer"))
    a, b = got.state_dict(), base.state_dict()
    assert a.keys() == b.keys() and any(not torch.equal(a[k], b[k]) for k in a)


@pytest.mark.slow
def test_sd3_resume_after_sigkill_is_exact(tmp_path, tiny_sd3, pickapic_clean, capsys, one_thread):
    common = dict(
        objective="snpo", max_steps=6, checkpoint_every=2, keep_checkpoints=0,
        gradient_accumulation_steps=2, lr_warmup_steps=2, lr_schedule="cosine",
        random_crop=True, uncond_prob=0.4,
    )  # fmt: skip
    ref = _config(tmp_path, "ref", tiny_sd3, pickapic_clean, **common)
    assert train_here(ref) == 0
    want = {x["step"]: x for x in read_metrics(tmp_path / "ref")}

    cfg = _config(tmp_path, "killed", tiny_sd3, pickapic_clean, **common)
    out = tmp_path / "killed"
    cmd = [sys.executable, "-m", "snpo.train", "--config", str(cfg), "--debug_hang_at_step", "4"]
    proc = subprocess.Popen(
        cmd, cwd=REPO, env=child_env(), stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True
    )
    lines, deadline = [], time.time() + 240
    for line in proc.stdout:  # until step 4's checkpoint is written and the run hangs
        lines.append(line)
        if "debug: hanging after step 4" in line or time.time() > deadline:
            break
    proc.send_signal(signal.SIGKILL)
    proc.wait(timeout=30)
    assert proc.returncode == -signal.SIGKILL, "".join(lines)[-3000:]
    assert (out / "checkpoints" / "latest").read_text().strip() == "step_00000004"

    capsys.readouterr()
    assert train_here(cfg) == 0
    assert "resumed from step 4" in "".join(capsys.readouterr())
    got = {x["step"]: x for x in read_metrics(out)}
    assert sorted(got) == [1, 2, 3, 4, 5, 6]
    for s in (5, 6):
        for k in ("loss", "mse_policy", "mse_ref", "grad_norm", "lr", "pairs_uncond"):
            assert got[s][k] == want[s][k] or abs(got[s][k] - want[s][k]) <= 1e-6, (s, k)
    from safetensors.torch import load_file

    weights = ("export", "transformer", "diffusion_pytorch_model.safetensors")
    a, b = load_file(tmp_path.joinpath("ref", *weights)), load_file(out.joinpath(*weights))
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_checkpoints_from_before_the_flow_options_still_resume():
    """A checkpoint whose trajectory lacks the flow options (written before they existed) is
    unchanged when they stay at their defaults, and changed when one is set."""
    import dataclasses

    from snpo.config import TrainConfig
    from snpo.trainer.checkpoint_io import trajectory_change

    cfg = TrainConfig(model="m", train_data=["d.parquet"])
    added = ("flow_sigma_sampler", "flow_logit_mean", "flow_logit_std", "flow_mode_scale")
    added += ("flow_shift", "guidance_scale")
    old = {k: v for k, v in cfg.trajectory_dict().items() if k not in added}
    state = {"snpo_fingerprint": "older", "snpo_trajectory": old}
    assert trajectory_change(state, cfg) == []
    assert trajectory_change(state, dataclasses.replace(cfg, flow_shift=1.0)) == ["flow_shift"]
    assert trajectory_change(state, dataclasses.replace(cfg, beta=1.0)) == ["beta"]
    assert trajectory_change({"snpo_fingerprint": "older"}, cfg)  # no trajectory: refused
