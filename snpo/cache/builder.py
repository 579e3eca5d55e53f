"""Build a cache: :func:`build_cache` (or finish one: only missing shards are made).

Every random choice comes from :mod:`snpo.draws` keyed by (seed, epoch, pair index), so the
trainer regenerates exactly the draws the cache used. The reference errors do not depend on
objective, beta, lam, weighting, LoRA settings, batch size or world size: one cache serves dpo,
bdpo, npo and snpo runs alike.

Processes: each rank of N builds contiguous runs of the units (shards, or (epoch, shard)) of
every phase (text, latents, ref), with a barrier between phases; a torch.distributed build cuts
what is still missing into N even runs, so a build resumed on any number of ranks spreads
exactly the missing units (:mod:`snpo.cache.ranks`). The folder lock each holds:
:func:`snpo.cache.ranks.writer_lock`.
"""

from __future__ import annotations

import os
import time
from pathlib import Path

import torch

from snpo.cache.allocator import build_allocator
from snpo.cache.inputs import captions
from snpo.cache.plan import check_options, plan_sections, reconcile
from snpo.cache.ranks import barrier, rank_and_world, writer_lock
from snpo.cache.sections import SECTIONS
from snpo.cache.shard_builder import BuildInterrupted, ShardBuilder
from snpo.cache.store import (
    CacheError,
    journal_paths,
    load_manifest,
    merge_parts,
    merged_view,
    remove_stale_tmp,
)
from snpo.precision import dtype_of

__all__ = [
    "DEFAULT_BATCH_SIZE",
    "DEFAULT_SHARD_SIZE",
    "BuildInterrupted",
    "build_cache",
    "epochs_needed",
]

DEFAULT_SHARD_SIZE = 4096
DEFAULT_BATCH_SIZE = 8


def epochs_needed(cfg, num_pairs: int, world: int = 1, buckets: dict | None = None) -> int:
    """How many epochs a run of ``cfg`` on ``world`` processes touches: ⌈max_steps ·
    gradient_accumulation_steps / batches per epoch⌉ (:class:`snpo.data.PairOrder`; with
    ``buckets``, the :func:`snpo.data.order.bucket_options` of the run, its bucketed order)."""
    from snpo.data import PairOrder

    order = PairOrder(
        num_pairs,
        seed=cfg.seed,
        rank=0,
        world=world,
        micro=cfg.train_batch_size_per_gpu,
        **(buckets or {}),
    )
    total = cfg.max_steps * cfg.gradient_accumulation_steps
    return (total - 1) // order.batches_per_epoch + 1


def build_cache(
    cfg,
    out: str | Path,
    *,
    what=SECTIONS,
    epochs: int | None = None,
    train_world: int = 1,
    shard_size: int = DEFAULT_SHARD_SIZE,
    batch_size: int = DEFAULT_BATCH_SIZE,
    latent_dtype: str = "auto",
    latent_mode: str = "auto",
    ref_inputs: str = "auto",
    rank: int | None = None,
    world: int | None = None,
    overwrite: bool = False,
    num_workers: int | None = None,
    verbose: bool = True,
    debug_stop_after: int | None = None,
) -> dict:
    """Build (or finish: only missing shards are made) the cache of ``cfg`` in ``out``.

    what: sections to build ("latents", "text", "ref"); epochs: epochs of reference errors (and
    of per-epoch latents), default :func:`epochs_needed` for ``train_world`` processes;
    shard_size: pairs (or distinct prompts) per shard; batch_size: pairs per VAE/denoiser forward
    (part of the layout: a resumed build must use the same, so its bytes match); latent_dtype:
    storage of mean/logvar ("fp16" | "bf16" | "fp32" | "auto": the training dtype for bf16/fp16
    runs — lossless at 2 bytes —, fp16 for fp32 runs); latent_mode: "variants" (center crop,
    both flips stored), "epochs" (the drawn crop+flip per epoch) or "auto" (epochs iff
    random_crop); ref_inputs: "cache" (the cached latents/text), "live" (encode_batch on the
    decoded images) or "auto" (cache iff latents and text are cached); rank/world: this
    process's share (default: torch.distributed's, else 0/1) — each rank builds contiguous runs
    of each phase's units (:mod:`snpo.cache.ranks`); overwrite: drop the sections being built if they were made
    for another config; debug_stop_after: test hook, raise BuildInterrupted after that many
    shards. Returns a summary dict.
    """
    from snpo.data import open_source

    out = Path(out)
    what = [w for w in SECTIONS if w in set([what] if isinstance(what, str) else what)]
    if not what:
        raise ValueError(f"what: choose one or more of {SECTIONS}")
    if cfg.num_frames > 1 and set(what) - {"text"}:
        raise ValueError(
            f"num_frames: {cfg.num_frames}: the cache stores one-frame image latents and their "
            "reference errors; for clips build only the text section (--what text)"
        )
    # an explicit share (independent jobs) wins over a process group this process may be in for
    # other reasons (e.g. a trainer's single-process group in the same interpreter)
    d = rank_and_world() if rank is None and world is None else None
    rank, world = d if d is not None else (int(rank or 0), int(world or 1))
    if not 0 <= rank < world:
        raise ValueError(f"rank {rank} is outside world {world}")
    latent_dtype = check_options(cfg, latent_dtype, latent_mode, ref_inputs, shard_size, batch_size)
    t_start = time.perf_counter()
    out.mkdir(parents=True, exist_ok=True)
    device = _build_device(cfg)
    with (
        writer_lock(out, rank, world, grouped=d is not None),
        build_allocator(device) as tuned,
    ):
        if world == 1:  # the only writer: tidy up after crashed runs
            remove_stale_tmp(out)
            if journal_paths(out):
                merge_parts(out)
        source = open_source(cfg)
        n = len(source)
        dtype = dtype_of(cfg.precision)
        t0 = time.perf_counter()
        model = _load_model(cfg, device, dtype)
        t_load = time.perf_counter() - t0
        buckets = None  # resolution_buckets: each pair's bucket, as the trainer assigns it
        if cfg.resolution_buckets is not None and set(what) - {"text"}:
            from snpo.data.order import bucket_options

            buckets = bucket_options(cfg, source, model, progress=verbose and rank == 0)
        epochs = int(epochs_needed(cfg, n, train_world, buckets) if epochs is None else epochs)
        view = merged_view(out)
        caps = captions(source) if "text" in what else None
        plan = plan_sections(
            cfg, model, what, view, n, caps, shard_size, batch_size, latent_dtype, latent_mode,
            ref_inputs, buckets,
        )  # fmt: skip
        reconcile(
            out, view, plan, overwrite=overwrite, rank=rank, independent=world > 1 and d is None
        )
        b = ShardBuilder(
            cfg,
            out,
            rank=rank,
            world=world,
            view=view,
            source=source,
            num_pairs=n,
            model=model,
            device=device,
            dtype=dtype,
            epochs=epochs,
            shard_size=shard_size,
            batch_size=batch_size,
            latent_dtype=latent_dtype,
            latent_layout=plan["latents"]["layout"] if "latents" in plan else None,
            latent_shape=tuple(plan["_latent_shape"]),
            captions=caps,
            num_workers=cfg.dataloader_num_workers if num_workers is None else num_workers,
            verbose=verbose,
            debug_stop_after=debug_stop_after,
            grouped=d is not None,
            ref_inputs=plan["ref"]["layout"]["inputs"] if "ref" in plan else None,
            buckets=buckets,
        )
        sections = {k: v for k, v in plan.items() if not k.startswith("_")}
        b.register(sections)
        b.log(
            f"{n} pairs, sections {','.join(sections)}, {epochs} epoch(s), shards of {shard_size}, "
            f"rank {rank}/{world}, device {device}, {cfg.precision}"
        )
        planned: dict[str, list] = {}
        if "text" in sections:
            planned["text"] = b.text_units()
            b.run_units("text", planned["text"], b.build_text)
            barrier()
        if "latents" in sections:
            planned["latents"] = b.latent_units()
            b.run_units("latents", planned["latents"], b.build_latents)
            barrier()
        if "ref" in sections:
            b.prepare_ref()
            planned["ref"] = b.ref_units()
            b.run_units("ref", planned["ref"], b.build_ref)
        barrier()
        if world == 1:
            _check_complete(out, load_manifest(out), planned)
        else:
            if d is not None:
                if rank == 0:
                    _check_complete(out, merge_parts(out), planned)
                barrier()
            else:
                b.log(f"independent ranks: once every rank has finished, snpo cache --merge {out}")
        total = time.perf_counter() - t_start
        summary = {
            "out": str(out),
            "pairs": n,
            "epochs": epochs,
            "sections": list(sections),
            "built": b.built,
            "skipped": b.skipped,
            "seconds": round(total, 3),
            "load_seconds": round(t_load, 3),
            "phase_seconds": {k: round(v, 3) for k, v in b.times.items()},
            "phase_cpu_seconds": {k: round(v, 3) for k, v in b.cpu_times.items()},
            "phase_sys_seconds": {k: round(v, 3) for k, v in b.sys_times.items()},
            "vae_encodes": b.encodes,
            "vae_seconds": round(b.encode_s, 3),
            "allocator_tuned": tuned,
            "break_even": b.break_even(),
        }
        _log_done(b, summary)
        return summary


def _check_complete(out: Path, manifest: dict | None, planned: dict[str, list]) -> None:
    """Every unit of every phase is listed in ``manifest`` (the last word of a build: no unit
    may be left out, whatever the ranks did); else CacheError naming the first missing one."""
    have = (manifest or {}).get("sections", {})
    missing = [
        u[0] for name, units in planned.items() for u in units
        if u[0] not in have.get(name, {}).get("shards", {})
    ]  # fmt: skip
    if missing:
        raise CacheError(
            f"the build of {out} ended with {len(missing)} shard(s) not listed in its manifest "
            f"(e.g. {missing[0]}); rerun the same command to build them"
        )


def _build_device(cfg) -> torch.device:
    """cuda:LOCAL_RANK (made current) for device cuda, or auto with CUDA available; else cpu."""
    if cfg.device == "cuda" or (cfg.device == "auto" and torch.cuda.is_available()):
        device = torch.device("cuda", int(os.environ.get("LOCAL_RANK", "0")))
        torch.cuda.set_device(device)
        return device
    return torch.device("cpu")


def _load_model(cfg, device: torch.device, dtype: torch.dtype):
    """The diffusion model of ``cfg`` (:func:`snpo.models.load_model`), checked against the
    resolution (a multiple of the VAE factor)."""
    from snpo.models import load_model

    model = load_model(
        cfg.model, dtype=dtype, device=device, revision=cfg.revision, variant=cfg.variant
    )
    model.spec.configure(model, cfg)  # e.g. a flow family's σ sampling (the reference's x_t)
    if cfg.attention == "xformers":
        model.unet.enable_xformers_memory_efficient_attention()
    if cfg.resolution % model.latent_scale:
        raise CacheError(
            f"resolution: {cfg.resolution} is not divisible by the VAE factor {model.latent_scale}"
        )
    return model


def _log_done(b: ShardBuilder, summary: dict) -> None:
    """Log what was built and, when something was, the break-even in epochs and runs."""
    b.log(
        f"done: {b.built} shard(s) built, {b.skipped} already there, {summary['seconds']:.1f} s "
        f"(phases: {summary['phase_seconds']})"
    )
    be = summary["break_even"]
    if be is not None:
        label = {"latents": "latents", "text": "text", "ref": "reference errors"}
        parts = ", ".join(f"{label[k]} {be[k]:.2f}" for k in label if k in be)
        b.log(
            f"break-even: this build cost {be['total']:.2f} epochs of the live path's "
            f"VAE/text/reference work at its own rates ({parts}); each epoch trained from "
            f"the cache saves one, so it pays for itself after {be['total']:.2f} epochs = "
            f"{be['runs']:.2f} runs of {summary['epochs']} epoch(s), and one build serves a "
            "whole sweep over beta, lam and the learning rate (docs/cache.md)"
        )
