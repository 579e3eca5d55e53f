"""Validation images during training (snpo.trainer.validation): grids at the right steps and of
the right size, sent to TensorBoard, the same bytes from two runs, a training that validation
leaves bit for bit unchanged, resume without repeats or gaps, the options' errors, a cached run
(VAE and text encoders loaded for validation only) and a 2-rank ZeRO-3 run."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image
from safetensors.torch import load_file

from snpo.config import ConfigError, load_config
from snpo.trainer.validation import grid_path, manifest

from .conftest import launch_deepspeed, read_metrics, train_here, write_config

RES = 16
PROMPTS = ["a photo of a red cube", "a blue cat"]
VAL = dict(
    validation_prompts=PROMPTS,
    validation_every=2,
    validation_cfg=[1.0, 3.0],
    validation_steps=2,
    validation_seed=7,
)
LORA_FILE = "pytorch_lora_weights.safetensors"


class FakeWriter:
    """Stands in for TensorBoard's SummaryWriter: records add_image calls."""

    images: list[tuple[str, np.ndarray, int, str]] = []

    def __init__(self, logdir, purge_step=None) -> None:
        self.purge_step = purge_step

    def add_scalar(self, *args, **kwargs) -> None:
        pass

    def add_image(self, tag, img, step, dataformats="CHW") -> None:
        FakeWriter.images.append((tag, np.array(img), step, dataformats))

    def close(self) -> None:
        pass


@pytest.fixture
def fake_tb(monkeypatch):
    FakeWriter.images = []
    monkeypatch.setattr("torch.utils.tensorboard.SummaryWriter", FakeWriter)
    return FakeWriter


def _config(tmp_path, name, tiny_sd, data, **over):
    values = dict(
        model=tiny_sd,
        train_data=data,
        output_dir=tmp_path / name,
        objective="snpo",
        lora_rank=2,
        max_steps=3,
        resolution=RES,
    )
    values.update(over)
    return write_config(tmp_path / f"{name}.yaml", **values)


def _grids(out) -> list[str]:
    return sorted(p.name for p in (out / "samples").glob("step_*.png"))


def _pixels(path) -> np.ndarray:
    with Image.open(path) as im:
        return np.asarray(im.convert("RGB"))


def test_grids_tensorboard_and_unchanged_training(tmp_path, tiny_sd, pickapic_clean, fake_tb):
    """Steps 0, 2 and 3 (the end) of a 3-step run with validation_every 2: PNGs of 2 prompts ×
    2 scales at 16 px, the same arrays in TensorBoard; the seconds in the step's record; the
    losses and the LoRA weights equal to a run without validation; a second run writes the same
    bytes."""
    plain = _config(tmp_path, "plain", tiny_sd, pickapic_clean)
    assert train_here(plain) == 0
    runs = []
    for name in ("val_a", "val_b"):
        cfg = _config(tmp_path, name, tiny_sd, pickapic_clean, report_to="tensorboard", **VAL)
        FakeWriter.images = []
        assert train_here(cfg) == 0
        runs.append((tmp_path / name, list(FakeWriter.images)))
    out, images = runs[0]

    assert _grids(out) == ["step_00000000.png", "step_00000002.png", "step_00000003.png"]
    for step in (0, 2, 3):
        px = _pixels(grid_path(out, step))
        assert px.shape == (len(PROMPTS) * RES, 2 * RES, 3)  # rows: prompts, columns: scales
    assert [(tag, step, fmt) for tag, _, step, fmt in images] == [
        ("validation", s, "HWC") for s in (0, 2, 3)
    ]
    for _, arr, step, _ in images:
        assert arr.dtype == np.uint8 and np.array_equal(arr, _pixels(grid_path(out, step)))
    px = _pixels(grid_path(out, 0))
    cfg1, cfg3 = px[:, :RES], px[:, RES:]
    assert not np.array_equal(cfg1, cfg3)  # the scales differ
    assert not np.array_equal(px[:RES], px[RES:])  # so do the prompts (and their seeds)
    assert not np.array_equal(px, _pixels(grid_path(out, 3)))  # training moved the policy
    assert manifest(out)["rows"] == PROMPTS and manifest(out)["seeds"] == [7, 8]

    recs = {r["step"]: r for r in read_metrics(out)}
    assert "validation_seconds" not in recs[1]
    assert recs[2]["validation_seconds"] > 0 and recs[3]["validation_seconds"] > 0

    # determinism: the same bytes from the second run
    other = runs[1][0]
    for step in (0, 2, 3):
        assert grid_path(out, step).read_bytes() == grid_path(other, step).read_bytes()

    # training unchanged: losses and exported weights bit for bit
    base = read_metrics(tmp_path / "plain")
    keys = ("loss", "mse_policy", "mse_ref", "grad_norm", "pairs_cond")
    assert [[r[k] for k in keys] for r in base] == [
        [recs[r["step"]][k] for k in keys] for r in base
    ]
    a = load_file(tmp_path / "plain" / "export" / LORA_FILE)
    b = load_file(out / "export" / LORA_FILE)
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_resume_validates_each_step_once(tmp_path, tiny_sd, pickapic_clean, fake_tb):
    """max_steps 4 then a resume to 6 (validation_every 2, checkpoints every 2, the sampler
    steps changed on resume: a non-trajectory option): grids of steps 0, 2, 4, 6, each written
    and logged once."""
    over = dict(VAL, checkpoint_every=2, max_steps=4, report_to="tensorboard")
    cfg = _config(tmp_path, "run", tiny_sd, pickapic_clean, **over)
    out = tmp_path / "run"
    assert train_here(cfg) == 0
    first = {s: grid_path(out, s).stat().st_mtime_ns for s in (0, 2, 4)}
    assert train_here(cfg, "--max_steps", "6", "--validation_steps", "3") == 0
    assert _grids(out) == [f"step_{s:08d}.png" for s in (0, 2, 4, 6)]
    assert {s: grid_path(out, s).stat().st_mtime_ns for s in (0, 2, 4)} == first
    assert [step for _, _, step, _ in FakeWriter.images] == [0, 2, 4, 6]
    assert [r["step"] for r in read_metrics(out)] == [1, 2, 3, 4, 5, 6]
    assert manifest(out)["steps"] == 3


def test_option_errors(tmp_path, tiny_sd, pickapic_clean):
    def load(**over):
        return load_config(_config(tmp_path, "c", tiny_sd, pickapic_clean, **over))

    with pytest.raises(ConfigError, match="validation_prompts: the prompts file .* does not"):
        load(validation_prompts=str(tmp_path / "missing.txt"), validation_every=2)
    with pytest.raises(ConfigError, match="validation_cfg: give at least one"):
        load(**{**VAL, "validation_cfg": []})
    with pytest.raises(ConfigError, match=r"validation_cfg: .* > 0.*\[0.0\]"):
        load(**{**VAL, "validation_cfg": [7.5, 0.0]})
    with pytest.raises(ConfigError, match="validation_every: must be ≥ 0"):
        load(**{**VAL, "validation_every": -1})
    with pytest.raises(ConfigError, match="validation_prompts: validation_every is 2 but no"):
        load(validation_every=2)
    with pytest.raises(ConfigError, match="validation_steps: must be ≥ 1"):
        load(**{**VAL, "validation_steps": 0})
    with pytest.raises(ConfigError, match="validation_negative: .* is not a folder"):
        load(**VAL, validation_negative=str(tmp_path / "nope"))
    f = tmp_path / "prompts.txt"
    f.write_text("a red cube\n\n  a blue cat  \n")
    cfg = load(validation_prompts=str(f), validation_every=2)
    from snpo.trainer.validation import read_validation_prompts

    assert read_validation_prompts(cfg.validation_prompts) == ["a red cube", "a blue cat"]
    # non-trajectory: a resume may change them
    assert cfg.fingerprint() == load().fingerprint()


def test_modes_and_rng_are_restored():
    """eval_mode restores each submodule's own mode; rng_untouched leaves the CPU RNG as it
    was even when the code inside draws from it."""
    from snpo.trainer.validation import eval_mode, rng_untouched

    net = torch.nn.Sequential(torch.nn.Linear(2, 2), torch.nn.Dropout(0.5))
    net.train()
    net[0].eval()
    with eval_mode(net):
        assert not any(m.training for m in net.modules())
    assert [m.training for m in net.modules()] == [True, False, True]
    torch.manual_seed(3)
    expected = torch.rand(4)
    torch.manual_seed(3)
    with rng_untouched(torch.device("cpu")):
        torch.rand(100)
    assert torch.equal(torch.rand(4), expected)


def test_logger_image_to_wandb(tmp_path, monkeypatch):
    """MetricsLogger.image sends a wandb.Image of the array at the step (a stand-in wandb)."""
    import sys
    import types

    from snpo.config import TrainConfig
    from snpo.trainer.metrics import MetricsLogger

    logged = []

    class Run:
        def log(self, data, step):
            logged.append((data, step))

        def finish(self):
            pass

    fake = types.ModuleType("wandb")
    fake.init = lambda **kw: Run()
    fake.Image = lambda array: ("image", array.shape, array.dtype)
    monkeypatch.setitem(sys.modules, "wandb", fake)
    cfg = TrainConfig(model="m", output_dir=str(tmp_path), report_to="wandb", progress_bar=False)
    logger = MetricsLogger(cfg, True, 0)
    logger.image("validation", np.zeros((32, 16, 3), np.uint8), 4)
    logger.close()
    assert logged == [({"validation": ("image", (32, 16, 3), np.uint8)}, 4)]


def test_cached_run_loads_vae_and_encoders_for_validation(tmp_path, tiny_sd, pickapic_clean):
    """Latents and embeddings from a cache (VAE and text encoders not loaded by the run): the
    step-0 grid, sampled from the same initial weights, matches the live run's."""
    from snpo.cache import build_cache

    live = _config(tmp_path, "live", tiny_sd, pickapic_clean, max_steps=1, **VAL)
    build_cache(
        load_config(live), tmp_path / "cache", latent_dtype="fp32", batch_size=4, verbose=False
    )
    assert train_here(live) == 0
    cached = _config(
        tmp_path,
        "cached",
        tiny_sd,
        pickapic_clean,
        max_steps=1,
        ref_mode="cache",
        cache_dir=tmp_path / "cache",
        **VAL,
    )
    from snpo.trainer import Trainer

    t = Trainer(load_config(cached))
    t.run()
    assert t.models.model.vae is None and t.models.model.text_encoders == []
    assert t.validation.vae is not None  # loaded for decoding only
    a, b = _pixels(grid_path(tmp_path / "live", 0)), _pixels(grid_path(tmp_path / "cached", 0))
    assert a.shape == b.shape == (2 * RES, 2 * RES, 3)
    # the cached null embedding equals the live one to float rounding: a level at most
    assert np.abs(a.astype(int) - b.astype(int)).max() <= 1


@pytest.mark.slow
def test_zero3_two_ranks_write_grids(tmp_path, tiny_sd, pickapic_clean):
    """2 ranks under ZeRO-3 (partitioned weights, every rank samples): the grids of steps 0 and
    2, their step 0 equal (to a level) to one process's, from the same initial weights."""
    out = tmp_path / "z3"
    cfg = _config(tmp_path, "z3", tiny_sd, pickapic_clean, zero_stage=3, max_steps=2, **VAL)
    launch_deepspeed(cfg)
    assert _grids(out) == ["step_00000000.png", "step_00000002.png"]
    assert _pixels(grid_path(out, 2)).shape == (2 * RES, 2 * RES, 3)
    assert "validation_seconds" in read_metrics(out)[-1]
    assert train_here(_config(tmp_path, "one", tiny_sd, pickapic_clean, max_steps=1, **VAL)) == 0
    a, b = _pixels(grid_path(out, 0)), _pixels(grid_path(tmp_path / "one", 0))
    assert np.abs(a.astype(int) - b.astype(int)).max() <= 1


def test_negative_model_as_unconditional_branch(
    tmp_path, tiny_sd, tiny_sdxl, pickapic_clean, capsys
):
    """validation_negative: the base model's denoiser as the null branch. At step 0 the LoRA
    policy is the base model, so the grid equals the one of the policy's own null branch (to a
    level: separate forwards instead of one batched forward); an incompatible negative is
    refused naming the option."""
    own = _config(tmp_path, "own", tiny_sd, pickapic_clean, objective="npo", max_steps=1, **VAL)
    neg = _config(
        tmp_path,
        "neg",
        tiny_sd,
        pickapic_clean,
        objective="npo",
        max_steps=1,
        validation_negative=tiny_sd,
        **VAL,
    )
    assert train_here(own) == 0 and train_here(neg) == 0
    a, b = _pixels(grid_path(tmp_path / "own", 0)), _pixels(grid_path(tmp_path / "neg", 0))
    assert np.abs(a.astype(int) - b.astype(int)).max() <= 1
    assert manifest(tmp_path / "neg")["negative"] == str(tiny_sd)
    bad = _config(
        tmp_path, "bad", tiny_sd, pickapic_clean, max_steps=1, validation_negative=tiny_sdxl, **VAL
    )
    assert train_here(bad) != 0
    err = capsys.readouterr()
    assert "validation_negative: the negative model is sdxl-class" in err.out + err.err
