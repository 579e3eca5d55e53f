"""Validation images during training: a fixed grid of samples from the policy every
``validation_every`` optimizer steps, comparable across steps and runs.

    output_dir/samples/step_00000000.png, step_00000500.png, …   (rows: prompts, columns: CFG)

Schedule: with ``validation_every`` N > 0 and ``validation_prompts`` set, step s is validated when
s % N == 0 or s == max_steps, and step 0 on a fresh start. Step s is validated after its update
and before its checkpoint, so a run resumed from checkpoint k neither repeats k nor skips the
next multiple (a run killed between a validation and its checkpoint redoes that validation, which
writes the same bytes again).

One image per (prompt i, scale): the initial noise of prompt i is seeded with
``validation_seed + i`` (:func:`snpo.models.sampler.initial_noise`: per image, independent of the
batch), the same for every scale and every validation, so a column is one prompt at one scale as
training moves it. The policy samples with its own null branch (standard CFG, the null embedding
the run trains: Diff-SNPO's single network); ``validation_negative`` makes a negative model's
denoiser the unconditional branch instead (Diffusion-NPO). Guidance-distilled families take the
scales as their embedded guidance.

Nothing of the training changes: the policy is put in eval mode and every module's mode is
restored after; the torch RNG state (CPU and the CUDA device) is forked around sampling; the
sampler's noise comes from its own generators. Prompts are encoded once at the start; when the run
reads embeddings from a cache (text encoders not loaded), the model is loaded once on the CPU for
them and freed; a skipped VAE (cached latents) is loaded for decoding and kept (SD: 84 M params).

ZeRO-3: the denoiser's weights are partitioned and its forward hooks gather each module's weights
with a collective as it runs (and release them after), so sampling on rank 0 alone would block in
the first gather; every rank therefore runs the same sampler in lockstep (no full copy of the
weights anywhere) and rank 0 writes. With ZeRO 0–2 every rank holds the whole policy: rank 0
samples while the others wait in the agreement that follows (within ``dist_timeout_s``).
"""

from __future__ import annotations

import contextlib
import io
import json
import time
from collections.abc import Iterator
from dataclasses import replace
from pathlib import Path

import numpy as np
import torch

from snpo.atomic import atomic_write_bytes, atomic_write_json
from snpo.config import ConfigError, TrainConfig
from snpo.distributed import agree

SAMPLES_DIR = "samples"
MANIFEST = "validation.json"
TAG = "validation"
BATCH = 8  # prompts per sampler call (images do not depend on their batch neighbours)


def grid_path(output_dir: str | Path, step: int) -> Path:
    """``output_dir/samples/step_XXXXXXXX.png``."""
    return Path(output_dir) / SAMPLES_DIR / f"step_{step:08d}.png"


def read_validation_prompts(value: str | list[str]) -> list[str]:
    """The prompts of ``validation_prompts``: the list itself, or the lines of a text file (blank
    lines skipped); ConfigError naming the option when the file is missing or has none."""
    if isinstance(value, (list, tuple)):
        return [str(p) for p in value]
    path = Path(value)
    if not path.is_file():
        raise ConfigError(
            f"validation_prompts: the prompts file {value!r} does not exist (give a text file "
            "with one prompt per line, or a list of prompts)"
        )
    prompts = [ln.strip() for ln in path.read_text(encoding="utf-8").splitlines() if ln.strip()]
    if not prompts:
        raise ConfigError(f"validation_prompts: the prompts file {value!r} holds no prompt")
    return prompts


def is_enabled(cfg: TrainConfig) -> bool:
    """validation_every > 0 and some prompts given."""
    return bool(cfg.validation_every) and bool(cfg.validation_prompts)


def is_due(cfg: TrainConfig, step: int) -> bool:
    """Whether optimizer step ``step`` (0: before the first) is validated (module docstring)."""
    every = cfg.validation_every
    return bool(every) and (step % every == 0 or step == cfg.max_steps)


@contextlib.contextmanager
def eval_mode(module: torch.nn.Module) -> Iterator[None]:
    """``module`` in eval mode inside; every submodule's own mode restored after."""
    modes = [(m, m.training) for m in module.modules()]
    module.eval()
    try:
        yield
    finally:
        for m, training in modes:
            m.training = training


@contextlib.contextmanager
def rng_untouched(device: torch.device) -> Iterator[None]:
    """The torch CPU RNG (and that of a CUDA ``device``) as it was before, after."""
    devices = [device] if device.type == "cuda" else []
    with torch.random.fork_rng(devices=devices):
        yield


def tile_grid(columns: list[torch.Tensor]) -> np.ndarray:
    """(H·rows, W·cols, 3) uint8 of column j = ``columns[j]``, a (rows, 3, H, W) batch in [0, 1]."""
    stack = torch.stack(columns, dim=1)  # (rows, cols, 3, H, W)
    r, c, ch, h, w = stack.shape
    grid = stack.permute(0, 3, 1, 4, 2).reshape(r * h, c * w, ch)
    return (grid.float().clamp(0, 1) * 255).round().to(torch.uint8).numpy()


def png_bytes(array: np.ndarray) -> bytes:
    """The PNG of an (H, W, 3) uint8 array (no timestamps: equal arrays give equal bytes)."""
    from PIL import Image

    buf = io.BytesIO()
    Image.fromarray(array, mode="RGB").save(buf, format="PNG")
    return buf.getvalue()


class Validation:
    """The run's validation: prompts encoded, VAE / negative loaded; :meth:`after_step`."""

    def __init__(self, cfg: TrainConfig, trainer) -> None:
        self.cfg = cfg
        self.dist = trainer.dist
        self.model = trainer.models.model
        self.dtype = trainer.dtype
        self.prompts = read_validation_prompts(cfg.validation_prompts)
        self.scales = [float(s) for s in cfg.validation_cfg]
        self.seeds = [cfg.validation_seed + i for i in range(len(self.prompts))]
        # ZeRO-3: every rank samples (module docstring); else rank 0 alone
        self.samples_here = cfg.zero_stage == 3 or self.dist.is_main
        self.cond = self.null = self.vae = self.negative = None
        if self.samples_here:
            self._prepare(trainer)

    def _prepare(self, trainer) -> None:
        """Encode the prompts, load what the run skipped (VAE) and the negative model."""
        from snpo.models import check_negative_compatible, encode_prompts, load_any, null_for

        cfg, m, device = self.cfg, self.model, self.dist.device
        source = str(trainer.model_path or cfg.model)
        self.null = trainer.step_models.null
        encoder = m
        if not m.text_encoders:  # embeddings from a cache: load the encoders once, on the CPU
            from snpo.models import load_model

            encoder = load_model(source, dtype=self.dtype, device="cpu", skip=("vae",))
            encoder.unet = None  # the denoiser copy is not needed
            for enc in encoder.text_encoders:
                enc.to(device)
        self.cond = encode_prompts(encoder, self.prompts).to(device=device, dtype=self.dtype)
        if "vae" in m.skipped:  # cached latents: decoding needs the VAE
            from snpo.models.diffusion import LoadRequest, freeze, load_vae, model_index

            request = LoadRequest(
                source=source,
                index=model_index(source),
                dtype=self.dtype,
                device=device,
                variant=cfg.variant,
            )
            self.vae, _ = load_vae(request)
            freeze([self.vae], device)
        if cfg.validation_negative:
            neg, info = load_any(cfg.validation_negative, dtype=self.dtype, device=str(device))
            check_negative_compatible(m, neg, "validation_negative")
            self.negative = neg.unet
            if info["null_kind"] != m.null_kind and encoder.text_encoders:
                # the negative's null-prompt branch was trained with its own null embedding
                self.null = null_for(encoder, info["null_kind"]).to(device, self.dtype)
            del neg
        if encoder is not m:
            del encoder
            if device.type == "cuda":
                torch.cuda.empty_cache()
        if self.dist.is_main:
            atomic_write_json(
                Path(cfg.output_dir) / SAMPLES_DIR / MANIFEST,
                {
                    "rows": self.prompts,
                    "columns": {"guidance_scale": self.scales},
                    "seeds": self.seeds,
                    "steps": cfg.validation_steps,
                    "resolution": cfg.resolution,
                    "negative": cfg.validation_negative,
                    "every": cfg.validation_every,
                },
            )

    # ---------------------------------------------------------------------------------------
    def sample(self) -> np.ndarray:
        """The grid of the policy as it is now: (P·H, S·W, 3) uint8 (rows: prompts, columns:
        scales). Touches neither the modules' modes nor the torch RNG."""
        from snpo.models import generate

        m = self.model if self.vae is None else replace(self.model, vae=self.vae)
        policy = m.denoiser
        columns = []
        with eval_mode(policy), rng_untouched(self.dist.device), torch.no_grad():
            for scale in self.scales:
                parts = []
                for lo in range(0, len(self.prompts), BATCH):
                    rows = slice(lo, lo + BATCH)
                    parts.append(
                        generate(
                            m,
                            self.cond.index(rows),
                            self.null,
                            self.seeds[rows],
                            guidance_scale=scale,
                            steps=self.cfg.validation_steps,
                            resolution=self.cfg.resolution,
                            negative_unet=self.negative,
                        ).cpu()
                    )
                columns.append(torch.cat(parts))
        return tile_grid(columns)

    def run(self, step: int, logger) -> float:
        """Validate ``step`` (collective): sample, write the grid (rank 0, atomically), log it
        → seconds it took (rank 0's view, the wait of the others included)."""
        t0 = time.perf_counter()

        def here() -> None:
            if not self.samples_here:
                return
            grid = self.sample()
            if self.dist.is_main:
                atomic_write_bytes(grid_path(self.cfg.output_dir, step), png_bytes(grid))
                logger.image(TAG, grid, step)

        agree(here, f"sampling the validation images of step {step}")
        dt = time.perf_counter() - t0
        logger.message(
            f"validation: step {step}, {len(self.prompts)} prompt(s) × {len(self.scales)} "
            f"scale(s) in {dt:.1f} s → {grid_path(self.cfg.output_dir, step)}"
        )
        return dt

    def after_step(self, step: int, logger) -> dict:
        """{"validation_seconds": …} for the record of a validated step, else {}."""
        if not is_due(self.cfg, step):
            return {}
        return {"validation_seconds": self.run(step, logger)}


def start_validation(trainer, logger, start: int) -> Validation | None:
    """The run's :class:`Validation` (collective; None when off); validates step 0 of a fresh
    start (``start`` 0)."""
    cfg = trainer.cfg
    if not is_enabled(cfg):
        return None
    v = agree(lambda: Validation(cfg, trainer), "preparing the validation images")
    if start == 0:
        v.run(0, logger)
    return v


def manifest(output_dir: str | Path) -> dict:
    """The layout of the grids (``samples/validation.json``) of a run."""
    return json.loads((Path(output_dir) / SAMPLES_DIR / MANIFEST).read_text())
