"""One process's part of a cache build: which shards are its own (contiguous runs of units,
:mod:`snpo.cache.ranks`), which are done, how each is made, and where its entries are recorded (the manifest for one
process, else the rank's journal, merged later).

Shards per section (P pairs per shard, V flip variants, C×h×w the latent shape):

- text: ``prompt_id`` (N,) int64 in the index; ``embeds`` (S, L, D) [+ ``pooled`` (S, D')] in
  the training dtype per shard of S distinct prompts; the null embedding (1, L, D);
- latents: ``mean``, ``logvar`` (P, 2, V, C, h, w) in the latent storage dtype (pixel space:
  ``pixels`` uint8), ``original_size``, ``crop_top_left`` (P, 2, V, 2) int32, ``valid`` (P, 2);
- ref: ``err`` (P, 2) float32 e_ref of winner and loser, ``valid`` (P,).

Every large tensor carries one CRC32 per row (``row_crc``).
"""

from __future__ import annotations

import math
import os
import time
from pathlib import Path

import torch

from snpo.cache.inputs import ImageItems, list_collate
from snpo.cache.ranks import rank_units, todo_share, worker_batch_order
from snpo.cache.reader import Cache
from snpo.cache.sections import TEXT_INDEX, TEXT_NULL, latent_rel, ref_rel, text_rel
from snpo.cache.store import (
    CacheError,
    atomic_write_json,
    journal_path,
    load_manifest,
    merged_view,
    new_manifest,
    read_json,
    row_crcs,
    section_digest,
    write_manifest,
    write_shard,
)
from snpo.precision import dtype_of
from snpo.step import reference_errors

__all__ = ["BuildInterrupted", "ShardBuilder"]


def item_tensors(n: int, v_n: int) -> dict[str, torch.Tensor]:
    """A latents shard's per-item tensors, zeroed: ``original_size``, ``crop_top_left``
    (n, 2, V, 2) int32 and ``valid`` (n, 2) uint8."""
    return {
        "original_size": torch.zeros(n, 2, v_n, 2, dtype=torch.int32),
        "crop_top_left": torch.zeros(n, 2, v_n, 2, dtype=torch.int32),
        "valid": torch.zeros(n, 2, dtype=torch.uint8),
    }


def record_items(out: dict, items: list, first: int, v_n: int, bad: list, rows=None):
    """Record :class:`~snpo.cache.inputs.ImageItems` ``items`` in :func:`item_tensors`'s
    ``out`` (shard row: index − ``first``) and their bad reasons in ``bad`` ([index, why]);
    (slots [(r, j, v)], images [(3, H, W)]) of the valid images, r the shard row or, given
    ``rows`` (P,), ``rows[shard row]``."""
    slots, xs = [], []
    for it in items:
        row = it["index"] - first
        r = row if rows is None else int(rows[row])
        out["original_size"][row] = it["size"]
        out["crop_top_left"][row] = it["crop"]
        if it["bad"] is not None:
            bad.append([it["index"], it["bad"]])
        for j in range(2):
            out["valid"][row, j] = int(it["valid"][j])
            if it["valid"][j]:
                for v in range(v_n):
                    slots.append((r, j, v))
                    xs.append(it["x"][j, v])
    return slots, xs


class BuildInterrupted(RuntimeError):
    """Raised by the ``debug_stop_after`` test hook of :func:`snpo.cache.build_cache`."""


class ShardBuilder:
    """One rank's part of a cache build (:func:`snpo.cache.build_cache` sets the attributes
    passed as keywords: rank, world, view, source, num_pairs, model, device, dtype, epochs,
    shard_size, batch_size, latent_dtype, latent_layout, latent_shape, captions, num_workers,
    verbose, debug_stop_after, ref_inputs)."""

    def __init__(self, cfg, out: Path, **kw):
        self.cfg, self.out = cfg, out
        for k, v in kw.items():
            setattr(self, k, v)
        self.built = 0
        self.skipped = 0
        self.times: dict[str, float] = {}
        self.cpu_times: dict[str, float] = {}
        self.sys_times: dict[str, float] = {}  # the system part of cpu_times
        self.encodes = 0  # image variants through the VAE in this run
        self.encode_s = 0.0  # seconds in those VAE forwards
        self.prompts_encoded = 0
        self.ref_epochs: set[int] = set()
        self.latent_epochs_built: set[int] = set()

    # -- bookkeeping -------------------------------------------------------------------------
    def log(self, msg: str) -> None:
        if self.rank == 0 and self.verbose:
            print(f"snpo cache: {msg}", flush=True)

    def done(self, section: str, rel: str) -> bool:
        entry = self.view["sections"].get(section, {}).get("shards", {}).get(rel)
        if entry is None:
            return False
        p = self.out / rel
        return p.is_file() and p.stat().st_size == entry["bytes"]

    def record(self, section: str, rel: str, entry: dict) -> None:
        self.view["sections"][section]["shards"][rel] = entry
        if self.world == 1:
            self.manifest["sections"][section]["shards"][rel] = entry
            write_manifest(self.out, self.manifest)
        else:
            self.journal["sections"][section]["shards"][rel] = entry
            atomic_write_json(journal_path(self.out, self.rank, self.world), self.journal)
        self.built += 1
        if self.debug_stop_after is not None and self.built >= self.debug_stop_after:
            raise BuildInterrupted(f"debug_stop_after: stopped after {self.built} shard(s)")

    def register(self, sections: dict[str, dict]) -> None:
        """Write the sections' fingerprints/layouts (manifest, or this rank's journal)."""
        if self.world == 1:
            self.manifest = load_manifest(self.out) or new_manifest()
            for name, sec in sections.items():
                cur = self.manifest["sections"].get(name)
                shards = cur["shards"] if cur is not None else {}
                self.manifest["sections"][name] = {**sec, "shards": shards}
            write_manifest(self.out, self.manifest)
        else:
            jp = journal_path(self.out, self.rank, self.world)
            self.journal = read_json(jp) if jp.is_file() else {"sections": {}}
            for name, sec in sections.items():
                cur = self.journal["sections"].get(name)
                ok = cur is not None and all(cur[k] == sec[k] for k in ("fingerprint", "layout"))
                shards = cur["shards"] if ok else {}
                self.journal["sections"][name] = {**sec, "shards": shards}
            atomic_write_json(jp, self.journal)
        for name, sec in sections.items():
            cur = self.view["sections"].get(name)
            self.view["sections"][name] = {**sec, "shards": cur["shards"] if cur else {}}

    def share(self, section: str, units: list) -> tuple[list, int, int]:
        """(this rank's units still to build, how many of its fixed run
        :func:`~snpo.cache.ranks.rank_units` are done, how many of ``units`` are done as far as
        it knows). One torch.distributed build (``grouped``): rank 0 says which units are done
        and the missing ones are cut into contiguous runs (:func:`~snpo.cache.ranks.todo_share`),
        so every rank agrees and a resumed build, on any world size, spreads what is missing
        evenly. Independent ranks: the rank's fixed run, minus what is done."""
        mine = rank_units(len(units), self.rank, self.world)
        if self.world > 1 and getattr(self, "grouped", False):
            from snpo.distributed import broadcast_text

            # rank 0's view decides (no rank builds a unit of this phase before the broadcast),
            # so ranks never disagree, e.g. over a file that one rank's filesystem sees late
            mark = "" if self.rank else "".join("01"[self.done(section, u[0])] for u in units)
            done = [c == "1" for c in broadcast_text(mark)]
            todo = [units[i] for i in todo_share(done, self.rank, self.world)]
            return todo, sum(done[i] for i in mine), sum(done)
        todo = [units[i] for i in mine if not self.done(section, units[i][0])]
        return todo, len(mine) - len(todo), len(mine) - len(todo)

    def run_units(self, section: str, units: list, build_one) -> None:
        from tqdm import tqdm

        t0, c0, s0 = time.perf_counter(), time.process_time(), os.times().system
        todo, skipped, done = self.share(section, units)
        self.skipped += skipped
        if done:
            self.log(f"{section}: {done} shard(s) already done")
        bar = tqdm(
            todo, desc=f"{section}", disable=not (self.verbose and self.rank == 0), leave=False
        )
        digest = section_digest(self.view["sections"][section])
        for unit in bar:
            rel = unit[0]
            tensors, meta = build_one(*unit[1:])
            entry = write_shard(self.out, rel, tensors, meta, section=digest)
            self.record(section, rel, entry)
        self.times[section] = self.times.get(section, 0.0) + time.perf_counter() - t0
        cpu = time.process_time() - c0  # this process (DataLoader workers not included)
        self.cpu_times[section] = self.cpu_times.get(section, 0.0) + cpu
        self.sys_times[section] = self.sys_times.get(section, 0.0) + os.times().system - s0

    # -- text --------------------------------------------------------------------------------
    def text_units(self):
        caps = self.captions
        ids, table = [], {}
        for c in caps:
            if c is None:
                ids.append(-1)
                continue
            if c not in table:
                table[c] = len(table)
            ids.append(table[c])
        self.prompt_ids = torch.tensor(ids, dtype=torch.int64)
        self.unique = list(table)
        s = self.shard_size
        units = [(TEXT_INDEX, "index"), (TEXT_NULL, "null")]
        units += [(text_rel(k), "shard", k) for k in range(math.ceil(len(self.unique) / s))]
        return units

    def build_text(self, kind: str, k: int | None = None):
        from snpo.models import encode_prompts, null_embedding

        m, dt = self.model, self.dtype
        if kind == "index":
            return {"prompt_id": self.prompt_ids}, {}
        if kind == "null":
            e = null_embedding(m)
            t = {"embeds": e.embeds.to("cpu", dt)}
            if e.pooled is not None:
                t["pooled"] = e.pooled.to("cpu", dt)
            return t, {"null_kind": m.null_kind}
        s = self.shard_size
        prompts = self.unique[k * s : (k + 1) * s]
        embeds, pooled = [], []
        step = max(1, self.batch_size * 4)
        self.prompts_encoded += len(prompts)
        for a in range(0, len(prompts), step):
            e = encode_prompts(m, prompts[a : a + step])
            embeds.append(e.embeds.to("cpu", dt))
            if e.pooled is not None:
                pooled.append(e.pooled.to("cpu", dt))
        t = {"embeds": torch.cat(embeds)}
        if pooled:
            t["pooled"] = torch.cat(pooled)
        t["row_crc"] = row_crcs(list(t.values()), 1)
        return t, {"first": k * s, "prompts": prompts}

    # -- latents -----------------------------------------------------------------------------
    def latent_units(self):
        k_n = math.ceil(self.num_pairs / self.shard_size)
        if self.latent_layout["mode"] == "variants":
            return [(latent_rel(k, None), k, None) for k in range(k_n)]
        return [(latent_rel(k, e), k, e) for e in range(self.epochs) for k in range(k_n)]

    def break_even(self) -> dict | None:
        """What this run's build cost, in epochs of the live path's work on the same pairs, at
        the build's own rates: a live step encodes both images and the prompt of every pair and
        runs the reference on both rows, every epoch; a step from the cache does none of that.
        {section: epochs of that section's live work, "total": the build's seconds over the
        seconds one epoch of live work takes for the sections built, "runs": total / epochs}
        (docs/cache.md, "Build cost and break-even"); None when nothing was built."""
        live: dict[str, tuple[float, float]] = {}  # section: (build seconds, live epochs)
        lay, lat_s = self.latent_layout, self.times.get("latents", 0.0)
        if lat_s > 0 and self.encodes and self.encode_s > 0 and not lay["pixel_space"]:
            # images a live epoch encodes = stored images (variants) or image-epochs (epochs)
            per_epoch = self.encodes / lay["variants"] if lay["mode"] == "variants" else None
            if per_epoch is None:
                per_epoch = self.encodes / max(1, len(self.latent_epochs_built))
            live["latents"] = (lat_s, lat_s / (self.encode_s / self.encodes * per_epoch))
        text_s = self.times.get("text", 0.0)
        if text_s > 0 and self.prompts_encoded:
            live["text"] = (text_s, self.prompts_encoded * self.world / max(1, self.num_pairs))
        ref_s = self.times.get("ref", 0.0)
        if ref_s > 0 and self.ref_epochs:
            live["ref"] = (ref_s, float(len(self.ref_epochs)))
        if not live:
            return None
        build_s = sum(s for s, _ in live.values())
        epoch_s = sum(s / e for s, e in live.values() if e > 0)
        total = build_s / epoch_s if epoch_s > 0 else float("nan")
        out = {k: round(e, 3) for k, (_, e) in live.items()}
        out["total"] = round(total, 3)
        out["runs"] = round(total / max(1, self.epochs), 3)
        return out

    def _loader(self, dataset, batches: list):
        """A DataLoader over ``batches`` (lists of pair indices) in the order that gives each
        worker a contiguous run of them (:func:`snpo.cache.ranks.worker_batch_order`; results
        are stored by pair)."""
        return torch.utils.data.DataLoader(
            dataset,
            batch_sampler=[batches[j] for j in worker_batch_order(len(batches), self.num_workers)],
            collate_fn=list_collate,
            num_workers=self.num_workers,
        )

    def _store(self, out: dict, keys: list[str], slots: list, xs: list, items: list) -> None:
        """Images ``xs`` [(3, H, W)] into ``out[key][r, j, v]`` at ``slots`` [(r, j, v)]: keys
        ["pixels…"] the uint8 pixels, else ["mean…", "logvar…"] the VAE posterior in the
        latent storage dtype (a CacheError when it overflows that dtype)."""
        from snpo.models import encode_images

        x = torch.stack(xs)
        if self.latent_layout["pixel_space"]:
            # exact: transform_image's x is u/127.5 − 1 for a uint8 u
            values = [((x + 1.0) * 127.5).round().clamp(0, 255).to(torch.uint8)]
        else:
            store_dt = dtype_of(self.latent_dtype)
            t0 = time.perf_counter()
            with torch.no_grad():
                mean, logvar = encode_images(self.model, x.to(self.device).to(self.dtype))
            mean, logvar = mean.to("cpu").to(store_dt), logvar.to("cpu").to(store_dt)
            self.encode_s += time.perf_counter() - t0
            self.encodes += len(xs)
            if not (torch.isfinite(mean).all() and torch.isfinite(logvar).all()):
                raise CacheError(
                    f"latents of pairs {items[0]['index']}..{items[-1]['index']} overflow "
                    f"{self.latent_dtype}; use --latent_dtype fp32 or bf16"
                )
            values = [mean, logvar]
        for (r, j, v), *vs in zip(slots, *values):
            for key, val in zip(keys, vs):
                out[key][r, j, v] = val

    def build_latents(self, k: int, epoch: int | None):
        lay = self.latent_layout
        first = k * self.shard_size
        idx = list(range(first, min(self.num_pairs, first + self.shard_size)))
        if epoch is not None:
            self.latent_epochs_built.add(epoch)
        if lay.get("buckets") is not None:
            return self._build_bucketed_latents(first, idx, epoch)
        pixel, v_n = lay["pixel_space"], lay["variants"]
        ds = ImageItems(self.source, self.cfg, lay["mode"], v_n, epoch)
        n = len(idx)
        c, h, w = lay["latent_shape"]
        store_dt = dtype_of(self.latent_dtype)
        keys = ["pixels"] if pixel else ["mean", "logvar"]
        out = {
            key: torch.zeros(n, 2, v_n, c, h, w, dtype=torch.uint8 if pixel else store_dt)
            for key in keys
        }
        out.update(item_tensors(n, v_n))
        bad: list = []
        step = self.batch_size
        for items in self._loader(ds, [idx[a : a + step] for a in range(0, n, step)]):
            slots, xs = record_items(out, items, first, v_n, bad)
            if xs:
                self._store(out, keys, slots, xs, items)
        out["row_crc"] = row_crcs([out[key] for key in keys], 3)
        return out, {"first": first, "bad": sorted(bad)}

    def _build_bucketed_latents(self, first: int, idx: list[int], epoch: int | None):
        """:meth:`build_latents` of a ``resolution_buckets`` cache: the shard's pairs grouped by
        bucket b, ``mean_b`` / ``logvar_b`` (pixel space: ``pixels_b``) (P_b, 2, V, C, h_b, w_b)
        and ``row_crc_b`` for each bucket b present; ``bucket`` (P,) each pair's bucket id and
        ``bucket_row`` (P,) its row in that bucket's tensors; the small tensors as square
        shards. Each VAE forward holds one bucket (one shape)."""
        lay = self.latent_layout
        pixel, v_n = lay["pixel_space"], lay["variants"]
        ids = [int(self.buckets["buckets"][i]) for i in idx]
        n = len(idx)
        c, side, _ = lay["latent_shape"]
        f = self.cfg.resolution // side  # pixels per latent pixel
        store_dt = dtype_of(self.latent_dtype)
        out: dict = {
            "bucket": torch.tensor(ids, dtype=torch.int64),
            "bucket_row": torch.zeros(n, dtype=torch.int64),
        }
        groups: dict[int, list[int]] = {}
        for i, b in zip(idx, ids):
            out["bucket_row"][i - first] = len(groups.setdefault(b, []))
            groups[b].append(i)
        big: dict[int, list[str]] = {}
        for b, members in sorted(groups.items()):
            w, h = lay["buckets"][b]
            shape = (len(members), 2, v_n, c, h // f, w // f)
            big[b] = [f"pixels_{b}"] if pixel else [f"mean_{b}", f"logvar_{b}"]
            for key in big[b]:
                out[key] = torch.zeros(shape, dtype=torch.uint8 if pixel else store_dt)
        out.update(item_tensors(n, v_n))
        ds = ImageItems(self.source, self.cfg, lay["mode"], v_n, epoch, buckets=self.buckets)
        bad: list = []
        batches = []  # one bucket per batch (one shape per VAE forward)
        for _, members in sorted(groups.items()):
            step = self.batch_size
            batches += [members[a : a + step] for a in range(0, len(members), step)]
        for items in self._loader(ds, batches):
            slots, xs = record_items(out, items, first, v_n, bad, rows=out["bucket_row"])
            if xs:
                b = ids[items[0]["index"] - first]
                self._store(out, big[b], slots, xs, items)
        for b, names in big.items():
            out[f"row_crc_{b}"] = row_crcs([out[nm] for nm in names], 3)
        return out, {"first": first, "bad": sorted(bad)}

    # -- reference errors --------------------------------------------------------------------
    def prepare_ref(self) -> None:
        """The reference as a StepModels (the model's own frozen denoiser, called as its family
        calls it) and, for cache inputs, a reader over the complete latents and text (built by
        every rank before the barrier)."""
        from snpo.models import null_embedding
        from snpo.step import StepModels, unet_fn

        null = null_embedding(self.model)
        if self.ref_inputs == "cache":
            self.view = merged_view(self.out)
            self.reader = Cache(self.out, self.view, seed=self.cfg.seed, verify="lazy")
            need = self.reader.missing("text") + self.reader.missing("latents")
            have = self.reader.latent_epochs
            if have is not None:
                need += [f"latents of epoch {e}" for e in range(self.epochs) if e not in have]
            if need:
                raise CacheError(
                    "reference errors from cached inputs need the complete latents and text, "
                    f"but {len(need)} shard(s) are missing (e.g. {need[0]}); with independent "
                    "processes, run all ranks with --what latents,text, then --merge, then "
                    "--what ref (or launch with torchrun / deepspeed)"
                )
            null = self.reader.null()
        self.step_models = StepModels(
            self.model,
            policy=None,
            reference=unet_fn(self.model.unet, self.model.spec),
            null=null.to(device=self.device, dtype=self.dtype),
            device=self.device,
            dtype=self.dtype,
        )

    def ref_units(self):
        k_n = math.ceil(self.num_pairs / self.shard_size)
        return [(ref_rel(k, e), k, e) for e in range(self.epochs) for k in range(k_n)]

    def build_ref(self, k: int, epoch: int):
        from snpo.data import PairDataset, collate_pairs
        from snpo.draws import pair_draws
        from snpo.step import encode_batch

        cfg, m = self.cfg, self.model
        self.ref_epochs.add(epoch)
        first = k * self.shard_size
        idx = list(range(first, min(self.num_pairs, first + self.shard_size)))
        err = torch.full((len(idx), 2), float("nan"), dtype=torch.float32)
        valid = torch.zeros(len(idx), dtype=torch.uint8)
        bad: list = []

        sizes = None if self.buckets is None else self.buckets["bucket_sizes"]

        def shape_of(i: int) -> tuple:
            """The latent shape pair i trains at (resolution_buckets: its bucket's)."""
            if sizes is None:
                return self.latent_shape
            w, h = sizes[int(self.buckets["buckets"][i])]
            f = cfg.resolution // self.latent_shape[-1]
            return (*self.latent_shape[:-2], h // f, w // f)

        def run(good: list[int], make_enc):
            if not good:
                return
            draws = pair_draws(
                cfg.seed, epoch, good, shape_of(good[0]), m.scheduler, cfg.uncond_prob
            )
            enc = make_enc(draws)
            e = reference_errors(self.step_models, enc, draws, backend=cfg.backend).to("cpu")
            p = len(good)
            for n, i in enumerate(good):
                err[i - first] = torch.stack([e[n], e[p + n]])
                valid[i - first] = 1

        groups = [idx]  # resolution_buckets: one bucket (one latent shape) per batch
        if sizes is not None:
            by: dict[int, list[int]] = {}
            for i in idx:
                by.setdefault(int(self.buckets["buckets"][i]), []).append(i)
            groups = [by[b] for b in sorted(by)]
        chunks = [
            g[a : a + self.batch_size] for g in groups for a in range(0, len(g), self.batch_size)
        ]
        if self.ref_inputs == "cache":
            reader = self.reader
            for chunk in chunks:
                ok = reader.valid(epoch, chunk).tolist()
                good = [i for i, v in zip(chunk, ok) if v]
                bad.extend(
                    [list(b) for b in reader.bad(epoch, [i for i, v in zip(chunk, ok) if not v])]
                )
                run(
                    good,
                    lambda d, g=good: reader.encoded_batch(
                        epoch, g, d, device=self.device, dtype=self.dtype
                    ),
                )
        else:
            ds = PairDataset(
                self.source,
                resolution=cfg.resolution,
                seed=cfg.seed,
                random_crop=cfg.random_crop,
                random_flip=cfg.random_flip,
                on_bad_image=cfg.on_bad_image,
            )
            batches = [
                [
                    (epoch, i)
                    if sizes is None
                    else (epoch, i, tuple(sizes[int(self.buckets["buckets"][i])]))
                    for i in c
                ]
                for c in chunks
            ]
            loader = torch.utils.data.DataLoader(
                ds,
                batch_sampler=[
                    batches[j] for j in worker_batch_order(len(batches), self.num_workers)
                ],
                collate_fn=collate_pairs,
                num_workers=self.num_workers,
            )
            for batch in loader:
                bad.extend([[int(i), why] for i, why in batch.bad])
                good = batch.indices.tolist()
                run(good, lambda d, b=batch: encode_batch(self.step_models, b, d))
        return {"err": err, "valid": valid}, {"first": first, "bad": sorted(bad)}
