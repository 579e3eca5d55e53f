"""One training run: setup (distributed, output folder, inputs, models, engine), resume, the
loop of optimizer steps with the non-finite guard, checkpoints, preemption and exports.

Length (~630 lines): the run's orchestration in the order it happens; every concept it calls
lives in its own module (inputs, checkpoint_io, guard, ema, validation, metrics, preemption).

Setup order matters: the output folder is claimed and the resume target found before anything
loads; which inputs come from a cache (:mod:`snpo.trainer.inputs`) decides what is loaded at
all; a checkpoint of another world size is converted before the engine is built.
"""

from __future__ import annotations

import contextlib
import math
import os
import sys
import time
import warnings
from pathlib import Path

import torch

from snpo.config import ConfigError, TrainConfig
from snpo.distributed import agree, all_reduce, barrier, init_distributed, is_timeout
from snpo.precision import dtype_of
from snpo.trainer import guard
from snpo.trainer.checkpoint_io import (
    RunCheckpoints,
    load_ema,
    rebase_position,
    resume_target,
    trajectory_change,
)
from snpo.trainer.checkpoints import tag_name
from snpo.trainer.errors import DistributedError, NonFiniteError, ResumeError
from snpo.trainer.inputs import (
    RunInputs,
    agreed_cache,
    latents_provider,
    reference_provider,
    text_provider,
)
from snpo.trainer.metrics import (
    BAD_SLOT,
    METRIC_SLOTS,
    STOP_SLOT,
    MetricsLogger,
    metric_vector,
    step_record,
)
from snpo.trainer.preemption import PREEMPTED_EXIT, Preempted, beat, stale_ranks
from snpo.trainer.setup import (
    build_models,
    fresh_denoiser,
    init_engine,
    latent_grid_problem,
    reference_fingerprint,
    resolve_model,
)


class Trainer:
    """One training run: ``Trainer(cfg).run()`` → summary dict."""

    def __init__(self, cfg: TrainConfig) -> None:
        self.cfg = cfg
        self._held = contextlib.ExitStack()  # the output folder's lock, for the whole run
        self.bad_total = 0  # pairs skipped for bad images on this rank since this start
        self.bad_resumed = 0  # all ranks' count from the checkpoint resumed from
        self.data_offset = 0
        self.stop = None  # snpo.trainer.preemption.StopRequest while running
        self.validation = None  # snpo.trainer.validation.Validation when validation_every > 0

    # setup ---------------------------------------------------------------------------------
    def setup(self) -> None:
        """Everything before the first step (collective: every rank calls it)."""
        from snpo.data import PairDataset, PairOrder, open_source
        from snpo.data.order import order_options
        from snpo.step import StepModels, lora_reference, unet_fn

        cfg = self.cfg
        try:
            self.dist = dist = init_distributed(cfg)
        except Exception as err:  # noqa: BLE001 - gloo/nccl/launcher errors
            raise DistributedError(f"cannot start torch.distributed: {err}") from err
        torch.manual_seed(cfg.seed)
        self.target = agree(self._claim_output_dir, "checking output_dir")
        self.dtype = dtype_of(cfg.precision)
        self.model_path = agree(lambda: resolve_model(cfg), "resolving the model")
        self.source = open_source(cfg)
        self.cache, self.inputs_note = agreed_cache(
            cfg, self.model_path, len(self.source), dist.world
        )
        cached = set(self.cache.sections) if self.cache is not None else set()
        skip = tuple(c for c, n in (("vae", "latents"), ("text_encoders", "text")) if n in cached)
        self.models = agree(
            lambda: build_models(
                cfg,
                dist.device,
                skip=skip,
                reference="ref" not in cached,
                model_path=self.model_path,
            ),
            "loading the model",
        )
        m = self.models.model
        if cfg.resolution % m.latent_scale:
            raise ConfigError(
                f"resolution: {cfg.resolution} is not divisible by the VAE factor {m.latent_scale}"
            )
        grid = latent_grid_problem(m, cfg.resolution)
        if grid:
            raise ConfigError(grid)
        from snpo.config import check_frames

        frames = check_frames(cfg.num_frames, m.spec)  # also when validate skipped the folder
        if frames:
            raise ConfigError(frames)
        dataset = PairDataset(
            self.source,
            resolution=cfg.resolution,
            seed=cfg.seed,
            random_crop=cfg.random_crop,
            random_flip=cfg.random_flip,
            on_bad_image=cfg.on_bad_image,
            winners_only=cfg.objective == "sft",
            num_frames=cfg.num_frames,
        )
        order_kw = order_options(cfg, self.source, m, progress=dist.is_main)
        self.order = PairOrder(
            len(self.source),
            seed=cfg.seed,
            rank=dist.rank,
            world=dist.world,
            micro=cfg.train_batch_size_per_gpu,
            # data_order: windowed → row groups, K; resolution_buckets → each pair's bucket
            **order_kw,
        )
        if self.cache is not None and self.order.kind == "bucketed":
            # the cached buckets, assignment and epochs against this run's bucketed order
            total = cfg.max_steps * cfg.gradient_accumulation_steps
            self.cache.check_buckets(
                cfg, order_kw, epochs=(total - 1) // self.order.batches_per_epoch + 1
            )
        side = cfg.resolution // m.latent_scale
        self.latent_shape = (m.in_channels, side, side)
        if cfg.num_frames > 1:  # clips: (C, F', h, w), F' = (F − 1)/factor + 1 latent frames
            latent_frames = (cfg.num_frames - 1) // m.spec.temporal_factor + 1
            self.latent_shape = (m.in_channels, latent_frames, side, side)
        self.base_fingerprint = reference_fingerprint(self.models)  # before any checkpoint load
        self.checkpoints = RunCheckpoints(cfg, dist, lora=self.models.lora)
        self.universal = False
        if self.target is not None:
            self.target = agree(self._prepare_world_change, "preparing the checkpoint")
        self.engine, self.lr = init_engine(cfg, m.unet, dist.world, universal=self.universal)
        self.ema = None  # snpo.trainer.ema.EMA of the trainable weights when ema_decay > 0
        if cfg.ema_decay > 0:
            from snpo.trainer.ema import EMA

            self.ema = EMA(
                self.engine.module,
                cfg.ema_decay,
                start_step=cfg.ema_start_step,
                rank=dist.rank,
                world=dist.world,
            )
        reference_source = reference_provider(cfg, self.cache)
        text = text_provider(self.cache)
        policy = unet_fn(self.engine, self.models.model.spec)
        if reference_source is None or reference_source.source == "cache":
            reference = None
        elif self.models.lora:
            reference = lora_reference(self.engine.module, policy)
        else:
            reference = unet_fn(self.models.reference, self.models.model.spec)
        null = text.null(m).to(device=dist.device, dtype=self.dtype)
        self.step_models = StepModels(m, policy, reference, null, dist.device, self.dtype)
        self.inputs = RunInputs(
            latents=latents_provider(cfg, self.cache, dataset, self.order, self.source),
            text=text,
            reference=reference_source,
            models=self.step_models,
            latent_shape=self.latent_shape,
            resolution=cfg.resolution,
            winners_only=cfg.objective == "sft",
        )
        self.sources = self.inputs.sources

    def _claim_output_dir(self):
        """Lock output_dir (rank 0), refuse what would mix or lose runs, pick the checkpoint to
        resume (see :mod:`snpo.trainer.run_dir`); → (folder, tag) or None. Every rank computes
        the resume target; only rank 0 locks, moves aside and writes run.json."""
        from snpo.cache import exclusive_lock
        from snpo.trainer.run_dir import (
            check_fresh_start,
            check_inputs_outside,
            move_aside,
            write_run_file,
        )

        cfg, out = self.cfg, Path(self.cfg.output_dir)
        check_inputs_outside(cfg, whole_folder=False)
        if self.dist.is_main:
            out.mkdir(parents=True, exist_ok=True)
            self._held.enter_context(exclusive_lock(out, "training run"))
        found = resume_target(cfg)
        if found is not None and found[2]:
            warnings.warn(found[2], stacklevel=2)
        check_fresh_start(cfg, resumable=found is not None)
        if self.dist.is_main and found is None:
            if cfg.overwrite:
                check_inputs_outside(cfg, whole_folder=True)
                moved = move_aside(out)
                if moved is not None:
                    print(f"snpo train: moved the previous run in {out} aside to {moved}")
            write_run_file(out, cfg.fingerprint(), cfg.trajectory_dict())
        return None if found is None else found[:2]

    def _prepare_world_change(self) -> tuple[Path, str]:
        """A ZeRO-1/2/3 checkpoint saved by another number of processes becomes a universal
        checkpoint (:mod:`snpo.trainer.universal`): its files are verified, rank 0 converts and
        seals ``<tag>_universal``, and the engine is built to load it. → the tag to load."""
        from snpo.trainer.checkpoints import digests, seal, tag_files
        from snpo.trainer.universal import (
            convert_to_universal,
            is_universal,
            needs_conversion,
            saved_world_size,
            universal_tag,
            unsupported_reason,
        )

        cfg, world = self.cfg, self.dist.world
        folder, tag = self.target
        if is_universal(folder, tag):
            self.universal = True
            return folder, tag
        old = saved_world_size(folder, tag)
        if not needs_conversion(cfg.zero_stage, old, world):
            return folder, tag
        why = unsupported_reason(cfg.zero_stage, self.models.lora, cfg.precision, old, world)
        if why:
            raise ResumeError(why)
        self.checkpoints.verify(folder, tag)  # the converter unpickles: verify first
        new = universal_tag(tag)
        if self.dist.is_main:
            convert_to_universal(folder, tag, zero_stage=cfg.zero_stage, log=print)
            seal(folder, new, digests(folder / new, tag_files(folder / new)), latest=False)
        barrier()
        self.universal = True
        return folder, new

    # checkpoint ----------------------------------------------------------------------------
    def data_step(self, step: int) -> int:
        """The data order's global micro-step at the start of optimizer step ``step`` + 1:
        step × accumulation, shifted when a resume on another number of processes re-based
        the order (:meth:`_rebase_data_position`)."""
        return step * self.cfg.gradient_accumulation_steps + self.data_offset

    def client_state(self, step: int) -> dict:
        """What a checkpoint of ``step`` carries besides DeepSpeed's state (collective)."""
        epoch, batch = self.order.position(self.data_step(step))
        return {
            "snpo_step": step,
            "snpo_epoch": epoch,
            "snpo_batch_in_epoch": batch,
            "snpo_micro_step": self.data_step(step),
            "snpo_data_offset": self.data_offset,
            "snpo_micro": self.cfg.train_batch_size_per_gpu,
            "snpo_fingerprint": self.cfg.fingerprint(),
            "snpo_trajectory": self.cfg.trajectory_dict(),
            "snpo_world": self.dist.world,
            "snpo_zero_stage": self.cfg.zero_stage,
            "snpo_sources": self.sources,
            "snpo_bad_images": self.bad_images_so_far(),
            "snpo_base_fingerprint": self.base_fingerprint,
        }

    def bad_images_so_far(self) -> int:
        """Pairs skipped for bad images since the run began (all ranks; collective)."""
        return int(all_reduce(torch.tensor([self.bad_total]), "sum").item()) + self.bad_resumed

    def save(self, step: int) -> None:
        """Checkpoint ``step`` (:meth:`snpo.trainer.checkpoint_io.RunCheckpoints.save`)."""
        self.checkpoints.save(self.engine, step, self.client_state(step), ema=self.ema)

    def resume(self) -> int:
        """Load the resume target, if any, after checking that it belongs to this run → the
        step it was saved at (0 for a fresh start)."""
        if self.target is None:
            return 0
        folder, tag = self.target
        self.checkpoints.verify(folder, tag)
        before = reference_fingerprint(self.models)
        state = self.checkpoints.load(self.engine, folder, tag)
        if state.get("snpo_world") is None and self.universal:
            raise ResumeError(f"checkpoint {folder / tag} carries no snpo client state")
        diff = trajectory_change(state, self.cfg)
        if diff:
            raise ResumeError(
                f"checkpoint {folder / tag} was written with different training options: "
                f"{', '.join(diff)}; use resume: never and a new output_dir, or restore those "
                "options"
            )
        self._check_base_model(state, folder / tag)
        if self.ema is not None:  # a universal tag's EMA stays in the tag it was converted from
            from snpo.trainer.universal import UNIVERSAL_SUFFIX

            own = tag.removesuffix(UNIVERSAL_SUFFIX) if self.universal else tag
            load_ema(folder / own, self.ema)
        old_sources = state.get("snpo_sources")
        if old_sources is not None and old_sources != self.sources:
            warnings.warn(
                f"resuming a run whose inputs came from {old_sources} with {self.sources}: the "
                "same objective, but equal to the uninterrupted run only up to float rounding",
                stacklevel=2,
            )
        if before != reference_fingerprint(self.models):
            raise ResumeError(
                "the frozen reference changed while loading the checkpoint (it must stay the "
                "base model); refusing to continue"
            )
        self.bad_resumed = int(state.get("snpo_bad_images", 0))
        step = int(state["snpo_step"])
        self.data_offset = int(state.get("snpo_data_offset", 0))
        if state.get("snpo_world") not in (None, self.dist.world):
            self._rebase_data_position(state, step)
        return step

    def _rebase_data_position(self, state: dict, step: int) -> None:
        """Continue the data where a run on another number of processes stopped: the pairs
        of the saved epoch consumed so far (batch × micro × old world, all ranks together) are
        skipped, so no pair is seen twice or left out — exact when that count divides by
        micro × new world; otherwise up to one global batch of pairs is skipped, with a
        warning. The draws of each pair are keyed by (seed, epoch, pair), unchanged."""
        old_world = int(state["snpo_world"])
        target, epoch, skipped = rebase_position(
            int(state["snpo_epoch"]),
            int(state["snpo_batch_in_epoch"]),
            micro=self.cfg.train_batch_size_per_gpu,
            old_world=old_world,
            new_world=self.dist.world,
            batches_per_epoch=self.order.batches_per_epoch,
        )
        self.data_offset = target - step * self.cfg.gradient_accumulation_steps
        note = (
            "the data continues exactly where it stopped"
            if skipped == 0
            else f"{skipped} pair(s) of epoch {epoch} are skipped to realign the batches"
        )
        warnings.warn(
            f"resuming a run saved with {old_world} process(es) on {self.dist.world}: {note}; "
            f"the learning rate and schedule continue as saved (lr {self.engine.get_lr()[0]:.3g})",
            stacklevel=2,
        )

    def _check_base_model(self, state: dict, where: Path) -> None:
        """The base model (the reference) must be the one the checkpoint was trained from."""
        saved = state.get("snpo_base_fingerprint")  # of the full weights, before ZeRO partitions
        if saved is None or saved == self.base_fingerprint:
            return
        raise ResumeError(
            f"model: {self.cfg.model!r} is not the base model checkpoint {where} was trained "
            "from (its weights differ); point model at the original weights, or start a new run"
        )

    # export --------------------------------------------------------------------------------
    def export(self, step: int, final: bool) -> Path | None:
        """Write the policy (LoRA or the full denoiser: UNet or transformer) as a
        diffusers-loadable export (rank 0, :meth:`_write_export`). With an EMA (``ema_decay``)
        the export is the EMA weights and ``<export>-raw`` beside it the raw ones
        (:mod:`snpo.trainer.ema`)."""
        cfg = self.cfg
        out = Path(cfg.output_dir) / ("export" if final else f"export-step{step:08d}")
        if self.ema is None:
            return self._write_export(out, step, {})
        with self.ema.swapped_in():
            path = self._write_export(out, step, {"weights": "ema", "ema_decay": cfg.ema_decay})
        self._write_export(out.with_name(out.name + "-raw"), step, {"weights": "raw"})
        return path

    def _write_export(self, out: Path, step: int, extra: dict) -> Path | None:
        """Export the weights the engine holds now into ``out`` (collective), ``extra`` added to
        the metadata; under ZeRO-3 the consolidated weights are loaded into a fresh copy of the
        base denoiser first."""
        from snpo.cache.identity import data_identity
        from snpo.models import write_export

        cfg, m = self.cfg, self.models.model
        meta = {
            "objective": cfg.objective,
            "beta": cfg.beta,
            "lam": cfg.effective_lam,
            "uncond_prob": cfg.uncond_prob,
            "weighting": cfg.weighting,
            "inputs": self.sources,
            "data": data_identity(cfg),  # per data file (the model card's fingerprint)
            "step": step,
            "config": cfg.to_dict(),
            **extra,
        }
        if cfg.zero_stage == 3:
            sd = self.engine._zero3_consolidated_16bit_state_dict()
            if not self.dist.is_main:
                barrier()
                return None
            denoiser = fresh_denoiser(cfg, self.models.lora, m.spec, self.model_path)
            missing, unexpected = denoiser.load_state_dict(sd, strict=False)
            if unexpected or (missing and not self.models.lora):
                raise RuntimeError(f"export: state dict mismatch {missing[:3]} {unexpected[:3]}")
        else:
            denoiser = self.engine.module
        if self.dist.is_main:
            write_export(out, m, denoiser, lora=self.models.lora, meta=meta)
        barrier()
        return out

    # the loop ------------------------------------------------------------------------------
    def micro_step(self, batch, step: int) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        """(loss to backpropagate, detached metrics) of one micro-batch. A micro-batch whose
        pairs were all bad runs :meth:`snpo.trainer.inputs.RunInputs.idle` with its loss and
        metrics weighted by 0, keeping every rank in step."""
        from snpo.draws import pair_draws
        from snpo.step import preference_step

        cfg = self.cfg
        empty = len(batch) == 0
        draws = pair_draws(
            cfg.seed,
            batch.epoch,
            [0] if empty else batch.indices,
            self.inputs.latent_shape_of(batch),  # a resolution bucket's (C, h, w)
            self.models.model.scheduler,
            cfg.uncond_prob,
        )
        if empty:
            enc, ref_err = self.inputs.idle()
        else:
            enc, ref_err = self.inputs.encode(batch, draws), self.inputs.reference_errors(batch)
        res = preference_step(
            self.step_models,
            enc,
            draws,
            objective=cfg.objective,
            beta=cfg.beta,
            lam=cfg.effective_lam,
            weighting=cfg.weighting,
            backend=cfg.backend,
            ref_err=ref_err,
        )
        loss, metrics = res.loss, res.metrics
        if empty:
            loss = loss * 0.0
            metrics = {k: torch.zeros_like(v) for k, v in metrics.items()}
        if cfg.debug_nan_at_step is not None and step == cfg.debug_nan_at_step:
            loss = loss * float("nan")
        if cfg.debug_overflow_at_step is not None and step == cfg.debug_overflow_at_step:
            loss = loss * 1e4  # finite, but fp16 loss scaling makes the gradients overflow
        return loss, metrics

    def run(self) -> dict:
        """Set up, resume, train to max_steps, save and export → {step, export, last}."""
        from snpo.trainer.preemption import StopRequest

        self.stop = StopRequest()
        self.stop.install(list(self.cfg.stop_signals))
        try:
            with self._held:
                return self._run()
        finally:
            self.stop.close()

    def _run(self) -> dict:
        self.setup()
        cfg, dist = self.cfg, self.dist
        if dist.world > 1:
            self.stop.watch_launchers()
        start = self.resume()
        self.reference_fingerprint = reference_fingerprint(self.models)
        logger = MetricsLogger(cfg, dist.is_main, start)
        if start:
            logger.message(f"resumed from step {start}")
        s = self.source.stats
        logger.message(
            f"data: {s.kept} pairs ({s.ties_dropped} ties dropped, {s.swapped} loser-first rows "
            f"swapped); world {dist.world}, {cfg.train_batch_size_per_gpu} pair(s)/micro-batch, "
            f"accumulation {cfg.gradient_accumulation_steps}, lr {self.lr:.3g}"
        )
        logger.message(self.inputs_note)
        if self.order.kind == "bucketed":
            logger.message(self.order.describe())
        from snpo.trainer.validation import start_validation

        self.validation = start_validation(self, logger, start)  # step 0 of a fresh start
        it = self.inputs.batches(self.data_step(start), self.data_step(cfg.max_steps))
        self.bad_total = 0
        skipped_in_a_row = 0
        step = start
        last_record: dict = {}
        try:
            while step < cfg.max_steps:
                step += 1
                last_record, stop_requested, skipped_in_a_row = self._optimizer_step(
                    it, step, logger, skipped_in_a_row
                )
                self._after_step(step, logger, stop_requested=stop_requested)
            if not (cfg.checkpoint_every and step % cfg.checkpoint_every == 0) and step > start:
                self.save(step)
            out = self.export(step, final=True)
        except (Preempted, NonFiniteError):
            raise
        except Exception as err:  # noqa: BLE001 - only timeouts are re-worded
            if dist.world > 1 and is_timeout(err):
                raise self._timeout_error(step) from err
            raise
        finally:
            logger.close()
            with contextlib.suppress(Exception):
                del it
        if self.reference_fingerprint != reference_fingerprint(self.models):
            raise RuntimeError("the reference changed during training (it must stay frozen)")
        return {"step": step, "export": str(out) if out else None, "last": last_record}

    def _optimizer_step(
        self, it, step: int, logger, skipped_in_a_row: int
    ) -> tuple[dict, bool, int]:
        """The micro-batches of optimizer step ``step``, the guard and the update → (the step's
        record, whether some rank was asked to stop, fp16 skips in a row)."""
        cfg, dist, engine = self.cfg, self.dist, self.engine
        accum = cfg.gradient_accumulation_steps
        t0 = time.perf_counter()
        sums = torch.zeros(METRIC_SLOTS, dtype=torch.float64, device=dist.device)
        bad_loss = torch.zeros((), dtype=torch.bool, device=dist.device)
        own_norm = None
        for m in range(accum):
            batch = next(it)
            if batch.bad:
                self.bad_total += len(batch.bad)
                for _, why in batch.bad:
                    logger.message(f"warning: skipping a bad pair: {why}")
                    warnings.warn(f"skipping a bad pair: {why}", stacklevel=1)
            loss, metrics = self.micro_step(batch, step)
            bad_loss |= ~torch.isfinite(loss.detach())  # on the device: no sync here
            engine.backward(loss)
            sums += metric_vector(metrics, sums)
            if m == accum - 1:  # the boundary: one host sync and one collective
                own_norm = guard.norm_and_clip(cfg, engine)
                self._debug_freeze(step)
                if dist.world > 1:
                    beat(cfg.output_dir, dist.rank, step)
                guard.check_before_step(bad_loss, own_norm, sums, step, self.checkpoints.last_tag)
            skipped_before = guard.skipped_steps(engine)
            engine.step()
        grad_norm = guard.engine_grad_norm(engine)
        if grad_norm is None and own_norm is not None:
            grad_norm = float(own_norm)
        action, skipped_in_a_row = guard.guard_decision(
            finite_norm=grad_norm is None or math.isfinite(grad_norm),
            overflow=guard.skipped_steps(engine) > skipped_before,
            skipped_in_a_row=skipped_in_a_row,
            limit=cfg.max_skipped_steps,
        )
        if self.ema is not None and action == "ok":  # a skipped update leaves θ: no average
            self.ema.update(step)
        if action == "stop":
            what = (
                f"{skipped_in_a_row} optimizer steps in a row skipped for fp16 overflow"
                if skipped_in_a_row > cfg.max_skipped_steps
                else "non-finite gradient norm"
            )
            raise NonFiniteError(
                f"{what} at step {step}; stopped, nothing saved "
                f"(the last good checkpoint is {self.checkpoints.last_tag()})"
            )
        if action == "skipped":
            logger.message(
                f"step {step}: fp16 loss-scale overflow, DeepSpeed skipped the update "
                f"({skipped_in_a_row} in a row; the limit is {cfg.max_skipped_steps})"
            )
        sums = sums.cpu()
        sums[BAD_SLOT] = self.bad_total
        sums[STOP_SLOT] = float(self.stop.reason is not None)
        all_reduce(sums)  # also how every rank learns that one was asked to stop
        sums = sums.tolist()  # the one read of this step's metrics
        dt = time.perf_counter() - t0
        epoch = self.order.position(self.data_step(step) - 1)[0]
        record = step_record(sums, step, epoch, preference=cfg.objective != "sft")
        record.update(
            grad_norm=grad_norm if grad_norm is not None else float("nan"),
            lr=float(engine.get_lr()[0]),
            pairs_per_s=float(sums[1]) / dt if dt > 0 else float("nan"),
            # pairs skipped for bad images since the run began (resumes included)
            bad_images=int(sums[BAD_SLOT]) + self.bad_resumed,
            skipped_step=action == "skipped",
            seconds=dt,
        )
        if torch.cuda.is_available() and dist.device.type == "cuda":
            record["gpu_mem_gb"] = torch.cuda.max_memory_allocated() / 2**30
        if self.validation is not None:  # after the update, before the step's checkpoint
            record.update(self.validation.after_step(step, logger))
        logger.log(record)
        return record, sums[STOP_SLOT] > 0, skipped_in_a_row

    def _after_step(self, step: int, logger, *, stop_requested: bool) -> None:
        """Checkpoint, preemption stop, debug hang and intermediate export after ``step``."""
        cfg = self.cfg
        saved = bool(cfg.checkpoint_every and step % cfg.checkpoint_every == 0)
        if saved:
            self.save(step)
        if stop_requested:  # some rank was asked to stop: all stop here
            if not saved:
                self.save(step)
            why = self.stop.reason or "another process was asked to stop"
            raise Preempted(
                f"{why}: stopped after step {step} with checkpoint {tag_name(step)} "
                f"written; run the same command again to resume (exit {PREEMPTED_EXIT})"
            )
        if cfg.debug_hang_at_step is not None and step == cfg.debug_hang_at_step:
            logger.message(f"debug: hanging after step {step} (debug_hang_at_step)")
            time.sleep(3600)
        if cfg.export_every and step % cfg.export_every == 0 and step < cfg.max_steps:
            self.export(step, final=False)

    def _timeout_error(self, step: int) -> DistributedError:
        """The one-line error of a collective that timed out, naming the ranks behind."""
        cfg, dist = self.cfg, self.dist
        behind = stale_ranks(cfg.output_dir, dist.world, step)
        return DistributedError(
            f"rank {dist.rank}: a collective at step {step} timed out after "
            f"{cfg.dist_timeout_s:g} s (dist_timeout_s): "
            + (
                f"{', '.join(behind)} stopped answering"
                if behind
                else "no rank is behind this one (a peer failed inside the step)"
            )
        )

    def _debug_freeze(self, step: int) -> None:
        """Test hook: the last rank stops itself (SIGSTOP) at ``debug_freeze_at_step``."""
        if self.cfg.debug_freeze_at_step == step and self.dist.rank == self.dist.world - 1:
            import signal as _signal

            os.kill(os.getpid(), _signal.SIGSTOP)


def run(cfg: TrainConfig) -> dict:
    """Train per ``cfg``; NonFiniteError / ResumeError / ConfigError on failure. torch's global
    functions are left as they were found (:func:`snpo.distributed.torch_globals_kept`)."""
    from snpo.distributed import torch_globals_kept

    try:
        with torch_globals_kept():
            return Trainer(cfg).run()
    finally:
        sys.stdout.flush()
