"""Read access to a built cache for a training run: :func:`open_cache` checks the cache against
the run's config and returns a :class:`Cache` whose readers (``ref_err``, ``latents``, ``text``,
``null``, ``valid``, ``encoded_batch``) give what the live path would compute.

Readers take no lock: files are replaced atomically and counted only once listed, and a shard
replaced under a reader by another build names another section digest in its header and is
refused by name (:class:`snpo.cache.store.ShardStore`).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch

from snpo.cache.identity import (
    data_identity,
    inputs_digest,
    model_identity,
    section_fingerprint,
)
from snpo.cache.sections import (
    SECTION_LABEL,
    SECTIONS,
    TEXT_INDEX,
    TEXT_NULL,
    latent_rel,
    ref_rel,
    shard_epoch,
    span,
    text_rel,
)
from snpo.cache.store import (
    CacheError,
    CacheMismatchError,
    ShardStore,
    diff_fields,
    journal_paths,
    load_manifest,
    section_digest,
)

__all__ = ["Cache", "CachedLatents", "open_cache"]


@dataclass
class CachedLatents:
    """Cached inputs of P pairs: mean/logvar (n·P, C, h, w), winners then losers (n = 2, or 1
    with winners_only), in the stored dtype (pixel space: float32 images, logvar None);
    original_size, crop_top_left: (P, n, 2) int64 (SDXL micro-conditioning)."""

    mean: torch.Tensor
    logvar: torch.Tensor | None
    original_size: torch.Tensor
    crop_top_left: torch.Tensor


class Cache:
    """Read access to a built cache (see :func:`open_cache`). Indices are the trainer's pair
    indices (positions among the kept, non-tie pairs of the config's data)."""

    def __init__(self, root: str | Path, view: dict, *, seed: int, verify: str = "lazy"):
        self.root = Path(root)
        self.view = view
        self.seed = int(seed)
        self.sections = {n: s for n, s in view["sections"].items() if n in SECTIONS}
        self.stores = {
            n: ShardStore(self.root, s["shards"], verify=verify, digest=section_digest(s))
            for n, s in self.sections.items()
        }
        self._memo: dict = {}

    # -- what is there ---------------------------------------------------------------------
    def layout(self, section: str) -> dict:
        if section not in self.sections:
            raise CacheError(
                f"the cache at {self.root} has no {SECTION_LABEL[section]} (snpo cache --what "
                f"{section})"
            )
        return self.sections[section]["layout"]

    @property
    def num_pairs(self) -> int:
        return next(iter(self.sections.values()))["layout"]["num_pairs"]

    def _complete_epochs(self, section: str) -> list[int]:
        lay = self.sections[section]["layout"]
        have: dict[int, int] = {}
        for rel in self.sections[section]["shards"]:
            e = shard_epoch(rel)
            if e is not None:
                have[e] = have.get(e, 0) + 1
        return sorted(e for e, n in have.items() if n == lay["num_shards"])

    @property
    def epochs(self) -> list[int]:
        """Epochs whose reference errors are complete ([] without a ref section)."""
        return self._complete_epochs("ref") if "ref" in self.sections else []

    @property
    def latent_epochs(self) -> list[int] | None:
        """Epochs of per-epoch latents (random crop); None when latents are epoch-independent."""
        if "latents" not in self.sections or self.layout("latents")["mode"] != "epochs":
            return None
        return self._complete_epochs("latents")

    def missing(self, section: str) -> list[str]:
        """Shards an epoch-independent section still lacks."""
        lay, shards = self.layout(section), self.sections[section]["shards"]
        if section == "text":
            want = [TEXT_INDEX, TEXT_NULL] + [text_rel(k) for k in range(lay["num_shards"])]
        elif section == "latents" and lay["mode"] == "variants":
            want = [latent_rel(k, None) for k in range(lay["num_shards"])]
        else:
            return []
        return [r for r in want if r not in shards]

    def describe(self) -> str:
        bits = []
        if "latents" in self.sections:
            lay = self.layout("latents")
            where = (
                f"×{lay['variants']} flip variant(s)"
                if lay["mode"] == "variants"
                else f"per epoch ({span(self.latent_epochs or [])})"
            )
            shape = tuple(lay["latent_shape"])
            if lay.get("buckets") is not None:
                shape = f"at {len(lay['buckets'])} resolution buckets"
            bits.append(f"latents {lay['dtype']} {shape} {where}")
        if "text" in self.sections:
            bits.append(f"text ({self.layout('text')['num_prompts']} distinct prompts)")
        if "ref" in self.sections:
            bits.append(
                f"reference errors for {span(self.epochs)} (inputs: {self.layout('ref')['inputs']})"
            )
        return f"cache {self.root}: {self.num_pairs} pairs; " + "; ".join(bits)

    # -- helpers ---------------------------------------------------------------------------
    def _idx(self, indices) -> list[int]:
        if isinstance(indices, torch.Tensor):
            indices = indices.tolist()
        idx = [int(i) for i in indices]
        n = self.num_pairs
        for i in idx:
            if not 0 <= i < n:
                raise IndexError(f"pair index {i} is outside the cache's {n} pairs")
        return idx

    def _loc(self, section: str, i: int) -> tuple[int, int]:
        return divmod(i, self.layout(section)["shard_size"])

    def _whole(self, section: str, rel: str, name: str) -> torch.Tensor:
        key = (rel, name)
        if key not in self._memo:
            if rel not in self.sections[section]["shards"]:
                raise CacheError(self._absent(section, rel))
            self._memo[key] = self.stores[section].tensor(rel, name)
        return self._memo[key]

    def _absent(self, section: str, rel: str) -> str:
        e = shard_epoch(rel)
        if e is not None:
            have = self._complete_epochs(section)
            return (
                f"epoch {e} is not in the cache's {SECTION_LABEL[section]} (it covers "
                f"{span(have)}); rerun snpo cache with --epochs {e + 1} to add it"
            )
        return f"cache shard {rel} is missing; rerun snpo cache to complete the cache"

    def _latent_shard(self, i: int, epoch: int) -> tuple[str, int]:
        lay = self.layout("latents")
        k, r = self._loc("latents", i)
        rel = latent_rel(k, epoch if lay["mode"] == "epochs" else None)
        if rel not in self.sections["latents"]["shards"]:
            raise CacheError(self._absent("latents", rel))
        return rel, r

    # -- validity --------------------------------------------------------------------------
    def valid(self, epoch: int, indices, *, winners_only: bool = False) -> torch.Tensor:
        """(P,) bool: False for pairs the live path skips as bad (a corrupt or missing image,
        found when the cache was built). Without latents or ref sections: all True."""
        idx = self._idx(indices)
        out = torch.ones(len(idx), dtype=torch.bool)
        if "latents" in self.sections:
            for n, i in enumerate(idx):
                rel, r = self._latent_shard(i, epoch)
                v = self._whole("latents", rel, "valid")[r]
                out[n] = bool(v[0]) if winners_only else bool(v.all())
        elif "ref" in self.sections and not winners_only:
            for n, i in enumerate(idx):
                k, r = self._loc("ref", i)
                out[n] = bool(self._whole("ref", ref_rel(k, epoch), "valid")[r])
        return out

    def bad(self, epoch: int, indices) -> list[tuple[int, str]]:
        """(index, reason) of the bad pairs among ``indices`` (as the live path would warn)."""
        idx = set(self._idx(indices))
        sec = "latents" if "latents" in self.sections else "ref" if "ref" in self.sections else None
        if sec is None:
            return []
        out = []
        rels = set()
        for i in idx:
            if sec == "latents":
                rels.add(self._latent_shard(i, epoch)[0])
            else:
                rels.add(ref_rel(self._loc("ref", i)[0], epoch))
        for rel in sorted(rels):
            for i, why in self.stores[sec].metadata(rel).get("bad", []):
                if i in idx:
                    out.append((i, why))
        return sorted(out)

    def _check_valid(self, epoch: int, idx: list[int], winners_only: bool = False) -> None:
        ok = self.valid(epoch, idx, winners_only=winners_only)
        if not bool(ok.all()):
            bad = [i for i, v in zip(idx, ok.tolist()) if not v]
            raise CacheError(
                f"pairs {bad} had a bad image when the cache was built; drop them as the live "
                "path does (Cache.valid / Cache.bad)"
            )

    # -- readers ---------------------------------------------------------------------------
    def ref_err(self, epoch: int, indices) -> torch.Tensor:
        """(2P,) float32 reference errors e_ref of ``indices`` in ``epoch``: winners in rows
        0..P-1, losers in P..2P-1 (the trainer's row order)."""
        idx = self._idx(indices)
        self.layout("ref")
        rows = []
        for i in idx:
            k, r = self._loc("ref", i)
            rel = ref_rel(k, epoch)
            if rel not in self.sections["ref"]["shards"]:
                raise CacheError(self._absent("ref", rel))
            if not bool(self._whole("ref", rel, "valid")[r]):
                raise CacheError(
                    f"pair {i} had a bad image when the cache was built; drop it as the live "
                    "path does (Cache.valid / Cache.bad)"
                )
            rows.append(self._whole("ref", rel, "err")[r])
        if not rows:
            return torch.zeros(0, dtype=torch.float32)
        e = torch.stack(rows)  # (P, 2)
        return torch.cat([e[:, 0], e[:, 1]]).to(torch.float32)

    def latents(self, epoch: int, indices, *, winners_only: bool = False) -> CachedLatents:
        """The cached latent distributions of the images the trainer would see in ``epoch``
        (the flip variant the draws choose, or the epoch's drawn crop+flip)."""
        from snpo.draws import augment_draws

        idx = self._idx(indices)
        self._check_valid(epoch, idx, winners_only)
        lay = self.layout("latents")
        store = self.stores["latents"]
        n_img = 1 if winners_only else 2
        means, logvars, sizes, crops = (
            [[] for _ in range(n_img)],
            [[] for _ in range(n_img)],
            [],
            [],
        )
        for i in idx:
            rel, r = self._latent_shard(i, epoch)
            if lay["mode"] == "variants" and lay["variants"] == 2:
                flips = augment_draws(self.seed, epoch, i).flip
                vs = [int(bool(flips[j])) for j in range(n_img)]
            else:
                vs = [0] * n_img
            size_all = self._whole("latents", rel, "original_size")[r]
            crop_all = self._whole("latents", rel, "crop_top_left")[r]
            sizes.append(torch.stack([size_all[j, vs[j]] for j in range(n_img)]))
            crops.append(torch.stack([crop_all[j, vs[j]] for j in range(n_img)]))
            sfx, br = "", r
            if lay.get("buckets") is not None:  # resolution_buckets: the pair's bucket tensors
                b = int(self._whole("latents", rel, "bucket")[r])
                sfx, br = f"_{b}", int(self._whole("latents", rel, "bucket_row")[r])
            crcs = self._whole("latents", rel, "row_crc" + sfx)[br]
            for j in range(n_img):
                sl = (slice(br, br + 1), slice(j, j + 1), slice(vs[j], vs[j] + 1))
                what = f"pair {i} image {j} variant {vs[j]}"
                if lay["pixel_space"]:
                    (u,) = store.rows(rel, ["pixels" + sfx], sl, crcs[j, vs[j]], what)
                    means[j].append(u[0, 0, 0].to(torch.float32).div_(127.5).sub_(1.0))
                else:
                    names = ["mean" + sfx, "logvar" + sfx]
                    mu, lv = store.rows(rel, names, sl, crcs[j, vs[j]], what)
                    means[j].append(mu[0, 0, 0])
                    logvars[j].append(lv[0, 0, 0])
        if not idx:
            raise ValueError("no pair indices given")
        if len({tuple(x.shape) for m in means for x in m}) > 1:
            raise ValueError(f"pairs {idx} are of different resolution buckets")
        mean = torch.cat([torch.stack(m) for m in means])
        logvar = None if lay["pixel_space"] else torch.cat([torch.stack(v) for v in logvars])
        return CachedLatents(
            mean, logvar, torch.stack(sizes).to(torch.long), torch.stack(crops).to(torch.long)
        )

    def _prompt_ids(self) -> torch.Tensor:
        self.layout("text")
        if TEXT_INDEX not in self.sections["text"]["shards"]:
            raise CacheError(self._absent("text", TEXT_INDEX))
        return self._whole("text", TEXT_INDEX, "prompt_id")

    def prompt_ids(self, indices) -> torch.Tensor:
        """(P,) int64 ids of the pairs' prompts among the distinct prompts (-1: unreadable)."""
        ids = self._prompt_ids()
        return ids[torch.tensor(self._idx(indices), dtype=torch.long)]

    def text(self, indices):
        """PromptEmbeddings of the pairs' prompts (P rows; pooled for families with one: SDXL,
        SD3, FLUX), in the training dtype the cache was built with."""
        from snpo.models import PromptEmbeddings

        lay = self.layout("text")
        store = self.stores["text"]
        embeds, pooled = [], []
        for i, pid in zip(self._idx(indices), self.prompt_ids(indices).tolist()):
            if pid < 0:
                raise CacheError(f"pair {i}'s record was unreadable when the cache was built")
            k, r = divmod(pid, lay["shard_size"])
            rel = text_rel(k)
            if rel not in self.sections["text"]["shards"]:
                raise CacheError(self._absent("text", rel))
            names = ["embeds", "pooled"] if lay["pooled"] else ["embeds"]
            crc = self._whole("text", rel, "row_crc")[r]
            got = store.rows(rel, names, (slice(r, r + 1),), crc, f"prompt {pid} (pair {i})")
            embeds.append(got[0][0])
            if lay["pooled"]:
                pooled.append(got[1][0])
        if not embeds:
            raise ValueError("no pair indices given")
        return PromptEmbeddings(torch.stack(embeds), torch.stack(pooled) if pooled else None)

    def null(self):
        """The (1, L, D) null embedding of the model (:func:`snpo.models.null_embedding`)."""
        from snpo.models import PromptEmbeddings

        lay = self.layout("text")
        if TEXT_NULL not in self.sections["text"]["shards"]:
            raise CacheError(self._absent("text", TEXT_NULL))
        e = self._whole("text", TEXT_NULL, "embeds")
        p = self._whole("text", TEXT_NULL, "pooled") if lay["pooled"] else None
        return PromptEmbeddings(e, p)

    def encoded_batch(
        self,
        epoch: int,
        indices,
        draws,
        *,
        device: torch.device | str = "cpu",
        dtype: torch.dtype = torch.float32,
        winners_only: bool = False,
    ):
        """What :func:`snpo.step.encode_batch` returns for these pairs, from the cache:
        :meth:`encoded_latents` and the cached prompt embeddings (:meth:`text`)."""
        from snpo.step import EncodedBatch

        latents, tid = self.encoded_latents(
            epoch, indices, draws, device=device, dtype=dtype, winners_only=winners_only
        )
        prompts = self.text(self._idx(indices)).to(device=torch.device(device), dtype=dtype)
        return EncodedBatch(latents, prompts, tid)

    def encoded_latents(
        self,
        epoch: int,
        indices,
        draws,
        *,
        device: torch.device | str = "cpu",
        dtype: torch.dtype = torch.float32,
        winners_only: bool = False,
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        """What :func:`snpo.step.encode_latents` returns for these pairs, from the cache:
        latents sampled from the cached posterior with ``draws.latent_noise`` (via
        :func:`snpo.step.latents_from_posterior`) and the time ids from the stored original
        sizes and crops (:func:`snpo.step.time_id_rows`) where the family
        needs them (``ModelFamily.needs_time_ids``), else None."""
        from snpo.models import get_family
        from snpo.step import latents_from_posterior, time_id_rows

        idx = self._idx(indices)
        if draws.indices.tolist() != idx:
            raise ValueError("draws are for other pairs (or another order) than indices")
        device = torch.device(device)
        lat = self.latents(epoch, idx, winners_only=winners_only)
        mean = lat.mean.to(device).to(dtype)
        logvar = None if lat.logvar is None else lat.logvar.to(device).to(dtype)
        latents = latents_from_posterior(mean, logvar, draws.to(device), winners_only)
        tid = None
        if get_family(self.layout("latents")["family"]).needs_time_ids:
            n_img = 1 if winners_only else 2
            size = torch.cat([lat.original_size[:, j] for j in range(n_img)])
            crop = torch.cat([lat.crop_top_left[:, j] for j in range(n_img)])
            res = self.sections["latents"]["fingerprint"]["resolution"]
            if self.layout("latents").get("buckets") is not None:  # the bucket's (h, w)
                f = res // self.layout("latents")["latent_shape"][-1]
                res = (int(mean.shape[-2]) * f, int(mean.shape[-1]) * f)
            tid = time_id_rows(size, crop, res).to(device=device, dtype=dtype)
        return latents.to(dtype), tid

    def bucket_sizes(self, section: str) -> list[tuple[int, int]] | None:
        """The (w, h) buckets of a ``resolution_buckets`` section (None: square)."""
        b = self.layout(section).get("buckets")
        return None if b is None else [tuple(x) for x in b]

    def check_buckets(self, cfg, buckets: dict, *, epochs: int | None = None) -> None:
        """Refuse (CacheMismatchError) latents / reference errors whose buckets or per-pair
        bucket assignment are not those of the run's order (``buckets``:
        :func:`snpo.data.order.bucket_options`), or, with ``epochs``, that do not cover epochs
        0..epochs-1 of the run's bucketed order. What :func:`open_cache` could not check
        before the run had resolved its buckets (that needs the model)."""
        from snpo.cache.identity import bucket_identity

        want = bucket_identity(cfg, buckets["bucket_sizes"], buckets["buckets"])
        for n in [s for s in ("latents", "ref") if s in self.sections]:
            have = self.sections[n]["fingerprint"].get("resolution_buckets")
            diffs = diff_fields({"resolution_buckets": have}, {"resolution_buckets": want})
            if diffs:
                raise CacheMismatchError(
                    f"cache fingerprint mismatch ({SECTION_LABEL[n]} in {self.root}): "
                    + "; ".join(diffs)
                    + ". Rebuild the cache for this config's resolution_buckets (snpo cache)."
                )
        if epochs is not None:
            _check_epochs(self, tuple(self.sections), epochs, "")

    def verify(self) -> None:
        """Hash every shard of the opened sections (CacheCorruptError naming the first bad)."""
        for store in self.stores.values():
            store.verify_all()


def _lossless(view: dict) -> bool:
    lat = view["sections"].get("latents")
    return bool(lat and lat["layout"]["lossless"])


def _check_fingerprints(root: Path, view: dict, cfg, need: tuple) -> None:
    """CacheMismatchError naming every field where a needed section differs from ``cfg``."""
    mid, did = model_identity(cfg), data_identity(cfg)
    for n in need:
        sec = view["sections"][n]
        want = section_fingerprint(n, cfg, sec["layout"], mid, did)
        have_b = sec["fingerprint"].get("resolution_buckets")
        want_b = want.get("resolution_buckets")
        if isinstance(have_b, dict) and isinstance(want_b, dict):
            # the resolved buckets and assignment need the model: Cache.check_buckets, later
            want_b.update(sizes=have_b.get("sizes"), assignment=have_b.get("assignment"))
        diffs = diff_fields(sec["fingerprint"], want)
        if diffs:
            raise CacheMismatchError(
                f"cache fingerprint mismatch ({SECTION_LABEL[n]} in {root}): "
                + "; ".join(diffs)
                + ". Rebuild the cache for this config (snpo cache) or use the matching one."
                + (
                    " (resolution_buckets: latents and reference errors are built per bucket)"
                    if any(d.startswith("resolution_buckets") for d in diffs)
                    else ""
                )
            )


def _check_ref_inputs(root: Path, view: dict, need: tuple) -> None:
    """Refuse reference errors computed from other inputs than those the run will read:
    cache-input errors need the very latents/text they saw, read from the cache unless those
    are lossless; live-input errors cannot go with lossy cached latents."""
    ref_layout = view["sections"]["ref"]["layout"]
    if ref_layout["inputs"] == "cache":
        have_inputs = all(s in view["sections"] for s in ("latents", "text"))
        if not have_inputs or ref_layout["inputs_digest"] != inputs_digest(view):
            raise CacheMismatchError(
                "the reference errors were computed from cached latents/text that are no "
                f"longer those in {root}; rebuild them (snpo cache --what ref --overwrite)"
            )
        if "latents" not in need and not _lossless(view):
            raise CacheMismatchError(
                "the reference errors were computed from the cached latents (stored as "
                f"{view['sections']['latents']['layout']['dtype']}, not the training "
                "precision): read the latents from the cache too (need latents, text), or "
                "build reference errors from live inputs (snpo cache --what ref "
                "--ref_inputs live)"
            )
    elif "latents" in need and not _lossless(view):
        raise CacheMismatchError(
            "the reference errors were computed from live-encoded latents but the run "
            "would read the cached (lossy) latents; rebuild them from the cache "
            "(snpo cache --what ref --ref_inputs cache --overwrite) or encode live"
        )


def _check_epochs(cache: Cache, need: tuple, epochs: int, merge_hint: str) -> None:
    """CacheMismatchError unless the needed per-epoch sections cover epochs 0..epochs-1."""
    want_e = list(range(int(epochs)))
    checks = []
    if "ref" in need:
        checks.append(("ref", cache.epochs))
    if "latents" in need and cache.latent_epochs is not None:
        checks.append(("latents", cache.latent_epochs))
    for n, have in checks:
        lacking = [e for e in want_e if e not in have]
        if lacking:
            raise CacheMismatchError(
                f"epochs: the cache's {SECTION_LABEL[n]} cover {span(have)} but the run "
                f"needs {span(want_e)}; rerun snpo cache with --epochs {epochs} to add "
                f"{span(lacking)}{merge_hint}"
            )


def open_cache(
    path: str | Path,
    cfg,
    need=SECTIONS,
    *,
    epochs: int | None = None,
    num_pairs: int | None = None,
    verify: str = "lazy",
) -> Cache:
    """Open the cache at ``path`` for a run of ``cfg``, reading the sections in ``need``.

    Refuses (CacheMismatchError, naming every differing field: "seed is 1 in the cache but 2 in
    the config") a cache built for another model (weight hashes), data, resolution, crop/flip,
    precision, seed, uncond_prob, scheduler or draw schedule; refuses reference errors computed
    from other inputs than those the run will use; with ``epochs``, refuses a cache that does
    not cover epochs 0..epochs-1 (see :func:`snpo.cache.builder.epochs_needed`); with
    ``num_pairs``, one built for another number of pairs. Checks every needed shard's size now
    and the CRC32 of every row and tensor it reads (``verify="lazy"``); ``verify="full"`` also
    hashes every needed shard now (SHA-256 against the manifest); ``"none"``: sizes only.
    Whatever ``verify``, a shard whose header does not name itself and this section's build is
    refused when first read. Takes no lock. ``Cache.epochs`` reports the covered epochs.
    """
    root = Path(path)
    need = tuple(dict.fromkeys([need] if isinstance(need, str) else need))
    for n in need:
        if n not in SECTIONS:
            raise ValueError(f"unknown cache section {n!r}; choose from {SECTIONS}")
    view = load_manifest(root)
    if view is None:
        hint = " (rank journals found: run snpo cache --merge)" if journal_paths(root) else ""
        raise CacheError(f"no cache at {root}: {root / 'manifest.json'} is missing{hint}")
    merge_hint = (
        " (unmerged rank journals found: run snpo cache --merge)" if journal_paths(root) else ""
    )
    cache = Cache(root, view, seed=cfg.seed, verify=verify)
    for n in need:
        if n not in view["sections"]:
            have = ",".join(view["sections"]) or "nothing"
            raise CacheError(
                f"the cache at {root} has no {SECTION_LABEL[n]} (it holds: {have}); build them "
                f"with snpo cache --what {n}{merge_hint}"
            )
    _check_fingerprints(root, view, cfg, need)
    if "ref" in need:
        _check_ref_inputs(root, view, need)
    for n in need:
        miss = cache.missing(n)
        if miss:
            raise CacheError(
                f"the {SECTION_LABEL[n]} in {root} are incomplete: {len(miss)} shard(s) missing "
                f"(e.g. {miss[0]}); rerun snpo cache to finish them{merge_hint}"
            )
    if epochs is not None:
        _check_epochs(cache, need, epochs, merge_hint)
    if num_pairs is not None and cache.num_pairs != int(num_pairs):
        raise CacheMismatchError(
            f"num_pairs: the cache holds {cache.num_pairs} pairs but the data has {num_pairs}"
        )
    for n in need:
        store = cache.stores[n]
        store.check_sizes(sorted(store.entries))
        if verify == "full":
            store.verify_all()
    cache.stores = {n: cache.stores[n] for n in need}
    cache.sections = {n: cache.sections[n] for n in need}
    return cache
