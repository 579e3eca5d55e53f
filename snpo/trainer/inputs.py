"""Where a run's model inputs come from: latents, prompt embeddings and reference errors are each
read from a ``snpo cache`` section or computed live, decided once before any model loads.

The decision (``ref_mode``, ``cache_dir``, ``cache_use``): :func:`open_run_cache` opens the cache
for this config, :func:`agreed_cache` makes every rank take the same one. Cached latents → the
VAE is not loaded and no image is decoded (pairs come straight from the order, bad ones dropped
by ``Cache.valid``); cached text → no text encoder; cached reference errors → no reference at
all (no frozen copy, no adapter toggling) and ``ref_err`` goes into the loss.

The providers: one per section and origin (:class:`ImageLatents` / :class:`CacheLatents`,
:class:`EncoderText` / :class:`CacheText`, :class:`LiveReference` / :class:`CacheReference`),
composed into :class:`RunInputs`, which is all the loop sees:

- ``batches(start, stop)``: the micro-batches of global micro-steps start..stop-1;
- ``encode(batch, draws)`` → :class:`snpo.step.EncodedBatch` on the device, training dtype;
- ``reference_errors(batch)`` → (2P,) float32 e_ref, or None (the step runs the reference);
- ``idle()``: the inputs of a micro-batch whose pairs were all bad (see :meth:`RunInputs.idle`).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import torch

from snpo.config import TrainConfig
from snpo.distributed import all_reduce

if TYPE_CHECKING:
    from snpo.step import EncodedBatch

LIVE = "VAE, text encoders and reference run every step"


def sections_used(cfg: TrainConfig) -> tuple[str, ...]:
    """The cache sections an objective reads: sft needs no reference errors."""
    return ("latents", "text", "ref") if cfg.preset.uses_reference else ("latents", "text")


def open_run_cache(cfg: TrainConfig, num_pairs: int, world: int):
    """(Cache or None, a line saying where the inputs come from and why), per ``ref_mode``.

    live: None. cache: the cache in ``cache_dir`` opened for this config (sections: ``cache_use``,
    or every needed one it holds; reference errors always, for preference objectives), covering
    the epochs the run touches — else the CacheError of :func:`snpo.cache.open_cache` (the
    mismatch message names the differing field). auto: the same, or None with the reason when
    it cannot be used (no cache_dir, no cache, a mismatch, an epoch not covered)."""
    from snpo.cache import SECTION_LABEL, CacheError, epochs_needed, load_manifest, open_cache

    if cfg.ref_mode == "live":
        return None, f"inputs: live (ref_mode live): {LIVE}"
    if not cfg.cache_dir:
        return None, f"inputs: live (ref_mode auto, no cache_dir): {LIVE}"
    root = Path(cfg.cache_dir)
    wanted = [n for n in sections_used(cfg) if cfg.cache_use is None or n in cfg.cache_use]
    try:
        need = wanted
        view = load_manifest(root) if cfg.cache_use is None else None
        if view is not None:  # default: the needed sections the cache holds
            need = [n for n in wanted if n in view["sections"]]
            if cfg.ref_mode == "cache" and "ref" in wanted and "ref" not in need:
                need.append("ref")  # required: open_cache names what is missing
        if not need:
            raise CacheError(
                f"the cache at {root} holds none of the sections this run reads "
                f"({', '.join(sections_used(cfg))}; cache_use: {cfg.cache_use})"
            )
        # resolution_buckets: the epochs of the bucketed order are checked once the run has
        # its buckets (Cache.check_buckets, in the trainer's setup)
        bucketed = cfg.resolution_buckets is not None
        epochs = None if bucketed else epochs_needed(cfg, num_pairs, world)
        cache = open_cache(root, cfg, need, epochs=epochs, num_pairs=num_pairs)
    except CacheError as err:
        if cfg.ref_mode == "cache":
            raise
        return None, f"inputs: live (ref_mode auto: not using the cache: {err}): {LIVE}"
    parts = [
        f"{SECTION_LABEL[n]} from the cache" if n in cache.sections else f"{n} live"
        for n in sections_used(cfg)
    ]
    return cache, f"inputs: {'; '.join(parts)} ({cache.describe()})"


def agreed_cache(cfg: TrainConfig, model_path: Path | None, num_pairs: int, world: int):
    """:func:`open_run_cache` on every rank (collective), and the same decision on all of them:
    a rank that cannot open the cache (ref_mode cache) makes every rank stop; ranks that would
    read different sections (ref_mode auto, e.g. a cache one node cannot see) all train live.
    model_path: the resolved ``cfg.model`` (a hub id's snapshot is what gets fingerprinted)."""
    from snpo.cache import CacheError

    if model_path is not None and str(model_path) != cfg.model:
        # a hub id: fingerprint the very snapshot that is loaded (content hashes only)
        cfg = dataclasses.replace(cfg, model=str(model_path), revision=None)
    error = None
    try:
        cache, note = open_run_cache(cfg, num_pairs, world)
    except CacheError as err:
        cache, note, error = None, "", err
    have = set(cache.sections) if cache is not None else set()
    flags = torch.tensor([float(n in have) for n in sections_used(cfg)] + [float(error is None)])
    total = all_reduce(flags.clone(), "sum")
    if error is not None:
        raise error
    if float(total[-1]) < world:
        raise CacheError(
            f"ref_mode cache: another process could not open the cache in {cfg.cache_dir} "
            "(see its error)"
        )
    if any(0.0 < float(x) < world for x in total[:-1]):
        if cfg.ref_mode == "cache":
            raise CacheError(
                f"ref_mode cache: the processes found different sections in {cfg.cache_dir}"
            )
        note = (
            f"inputs: live (ref_mode auto: not every process can use the cache in "
            f"{cfg.cache_dir}): {LIVE}"
        )
        cache = None
    return cache, note


# --------------------------------------------------------------------------------------------
# latents: (2P | P, C, h, w) winners then losers, and SDXL time ids
class ImageLatents:
    """Decoded images (the data loader) through the VAE every step."""

    source = "live"

    def __init__(self, dataset, order, num_workers: int) -> None:
        self.dataset, self.order, self.num_workers = dataset, order, num_workers

    def batches(self, start: int, stop: int) -> Iterator:
        from snpo.data import make_loader

        loader = make_loader(
            self.dataset, self.order, start=start, stop=stop, num_workers=self.num_workers
        )
        return iter(loader)

    def encode(self, models, batch, draws, winners_only: bool):
        from snpo.step import encode_latents

        return encode_latents(models, batch, draws, winners_only=winners_only)


class CacheLatents:
    """The cached VAE posteriors, sampled with the pairs' draws; no image is decoded. Prompts
    come from ``captions`` when the text is encoded live (else the batch has none)."""

    source = "cache"

    def __init__(self, cache, order, captions: list[str] | None, winners_only: bool) -> None:
        self.cache, self.order, self.captions = cache, order, captions
        self.winners_only = winners_only

    def batches(self, start: int, stop: int) -> Iterator:
        """The order's micro-batches; pairs the cache marked bad are dropped (and reported) as
        the live path drops undecodable ones."""
        from snpo.data import PairBatch

        winners_only = self.winners_only
        n_img = 1 if winners_only else 2
        for g in range(start, stop):
            pairs = self.order.batch(g)
            epoch, idx = pairs[0][0], [i for _, i in pairs]
            ok = self.cache.valid(epoch, idx, winners_only=winners_only).tolist()
            good = [i for i, v in zip(idx, ok) if v]
            dropped = [i for i, v in zip(idx, ok) if not v]
            why = dict(self.cache.bad(epoch, dropped)) if dropped else {}
            bad = [
                (i, why.get(i, f"pair {i}: marked bad when the cache was built")) for i in dropped
            ]
            size = torch.zeros(len(good), n_img, 2, dtype=torch.long)
            prompts = [self.captions[i] for i in good] if self.captions is not None else []
            yield PairBatch(
                torch.tensor(good, dtype=torch.long),
                epoch,
                torch.zeros(0),
                prompts,
                size,
                size,
                bad,
                bucket=self.order.size(g),  # resolution_buckets: the micro-batch's (w, h)
            )

    def encode(self, models, batch, draws, winners_only: bool):
        return self.cache.encoded_latents(
            batch.epoch,
            batch.indices,
            draws,
            device=models.device,
            dtype=models.dtype,
            winners_only=winners_only,
        )


# --------------------------------------------------------------------------------------------
# text: P prompt embeddings, and the null embedding
class EncoderText:
    """The text encoders on the batch's conditional prompts every step (a null-branch pair's
    prompt is not encoded: :func:`snpo.step.encode_branch_prompts`)."""

    source = "live"

    def encode(self, models, batch, keep):
        from snpo.step import encode_branch_prompts

        return encode_branch_prompts(models, batch.prompts, keep)

    def null(self, model):
        from snpo.models import null_embedding

        return null_embedding(model)


class CacheText:
    """The cached prompt embeddings and null embedding."""

    source = "cache"

    def __init__(self, cache) -> None:
        self.cache = cache

    def encode(self, models, batch, keep):
        return self.cache.text(batch.indices)

    def null(self, model):
        return self.cache.null()


# --------------------------------------------------------------------------------------------
# reference errors: (2P,) float32 e_ref, winners then losers
class LiveReference:
    """None: the step runs the reference (frozen copy or adapters off) itself."""

    source = "live"

    def errors(self, batch, device: torch.device) -> torch.Tensor | None:
        return None

    def idle_errors(self, device: torch.device) -> torch.Tensor | None:
        return None


class CacheReference:
    """The cached e_ref of the batch's pairs in its epoch."""

    source = "cache"

    def __init__(self, cache) -> None:
        self.cache = cache

    def errors(self, batch, device: torch.device) -> torch.Tensor:
        return self.cache.ref_err(batch.epoch, batch.indices).to(device)

    def idle_errors(self, device: torch.device) -> torch.Tensor:
        return torch.zeros(2, dtype=torch.float32, device=device)


# --------------------------------------------------------------------------------------------
@dataclass
class RunInputs:
    """A run's inputs, one provider per section (see the module docstring).

    models: the :class:`snpo.step.StepModels` (model, device, dtype); reference: None for sft;
    latent_shape: (C, h, w) (clips, ``num_frames`` > 1: (C, F', h, w)); resolution: the
    training resolution (SDXL time ids)."""

    latents: ImageLatents | CacheLatents
    text: EncoderText | CacheText
    reference: LiveReference | CacheReference | None
    models: object
    latent_shape: tuple[int, ...]
    resolution: int
    winners_only: bool = False

    @property
    def sources(self) -> dict[str, str]:
        """Section → "cache" | "live" (what checkpoints and exports record)."""
        out = {"latents": self.latents.source, "text": self.text.source}
        if self.reference is not None:
            out["ref"] = self.reference.source
        return out

    def batches(self, start: int, stop: int) -> Iterator:
        """The micro-batches (:class:`snpo.data.PairBatch`) of global micro-steps start..stop-1."""
        return self.latents.batches(start, stop)

    def latent_shape_of(self, batch) -> tuple[int, ...]:
        """(C, h, w) (clips: (C, F', h, w)) of ``batch``'s latents: its pixels' (H, W) over the
        VAE factor (a ``resolution_buckets`` bucket; cached latents: the batch's ``bucket``),
        else :attr:`latent_shape` (square). Pixels are (P, 2|1, 3, H, W), clips (P, 2|1, 3, F, H, W)."""
        pix = batch.pixels
        f = self.resolution // self.latent_shape[-1]
        bucket = getattr(batch, "bucket", None)
        if bucket is not None and len(batch) and pix.numel() == 0:  # cached latents: no pixels
            return (*self.latent_shape[:-2], int(bucket[1]) // f, int(bucket[0]) // f)
        if pix.ndim != len(self.latent_shape) + 2 or len(batch) == 0:
            return self.latent_shape
        hw = (int(pix.shape[-2]) // f, int(pix.shape[-1]) // f)
        return (*self.latent_shape[:-2], *hw)

    def encode(self, batch, draws) -> EncodedBatch:
        """The :class:`snpo.step.EncodedBatch` of ``batch`` (device, training dtype)."""
        from snpo.step import EncodedBatch

        sm = self.models
        latents, tid = self.latents.encode(sm, batch, draws, self.winners_only)
        keep = draws.conditional_pairs()  # the text encoders skip the null-branch prompts
        prompts = self.text.encode(sm, batch, keep).to(device=sm.device, dtype=sm.dtype)
        return EncodedBatch(latents, prompts, tid)

    def reference_errors(self, batch) -> torch.Tensor | None:
        """(2P,) float32 e_ref of ``batch`` when the reference errors are cached, else None."""
        if self.reference is None:
            return None
        return self.reference.errors(batch, self.models.device)

    def idle(self) -> tuple[EncodedBatch, torch.Tensor | None]:
        """(EncodedBatch, ref_err) of one all-zero pair on the null embedding: what a
        micro-batch whose pairs were all bad runs, with its loss weighted by 0.

        Every rank must run the same forward and backward each micro-step: ZeRO-3 gathers the
        parameters in the forward's module hooks, and ZeRO-2 reduces gradient buckets in the
        order the backward produces them, so a loss that touches the parameters without the
        UNet's graph would desynchronise the ranks. Its gradients are exactly zero."""
        from snpo.step import EncodedBatch, time_id_rows

        sm = self.models
        n_img = 1 if self.winners_only else 2
        latents = torch.zeros(n_img, *self.latent_shape, device=sm.device, dtype=sm.dtype)
        tid = None
        if sm.model.spec.needs_time_ids:
            r = self.resolution
            size = torch.full((n_img, 2), r, dtype=torch.long)
            tid = time_id_rows(size, torch.zeros_like(size), r).to(sm.device, sm.dtype)
        ref_err = None if self.reference is None else self.reference.idle_errors(sm.device)
        return EncodedBatch(latents, sm.null, tid), ref_err


def latents_provider(cfg: TrainConfig, cache, dataset, order, source):
    """ImageLatents, or CacheLatents when the cache holds the latents (with captions for a
    live text encoder)."""
    if cache is None or "latents" not in cache.sections:
        return ImageLatents(dataset, order, cfg.dataloader_num_workers)
    caps = None
    if "text" not in cache.sections:  # prompts without decoding images
        from snpo.cache import captions

        caps = captions(source)
    return CacheLatents(cache, order, caps, winners_only=cfg.objective == "sft")


def text_provider(cache) -> EncoderText | CacheText:
    """CacheText when the cache holds the text embeddings, else EncoderText."""
    return CacheText(cache) if cache is not None and "text" in cache.sections else EncoderText()


def reference_provider(cfg: TrainConfig, cache) -> LiveReference | CacheReference | None:
    """None for sft; CacheReference when the cache holds the reference errors; else live."""
    if not cfg.preset.uses_reference:
        return None
    return (
        CacheReference(cache) if cache is not None and "ref" in cache.sections else LiveReference()
    )
