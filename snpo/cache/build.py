"""``snpo cache``: precompute what a training run reads besides the policy, so that training can
run without the VAE, the text encoders or the reference model.

    snpo cache --config TRAIN.yaml --out CACHE [--key value ...] [--epochs E|auto]
               [--what latents,text,ref] [--shard_size 4096] [--batch_size 8]
               [--latent_dtype auto|fp16|bf16|fp32] [--latent_mode auto|variants|epochs]
               [--ref_inputs auto|cache|live] [--train_world W] [--overwrite]
    snpo cache --verify CACHE [--repair]      hash every shard; name the bad ones
    snpo cache --merge CACHE                  fold rank journals into manifest.json
    snpo cache --info CACHE                   what the cache holds
    torchrun --nproc_per_node N -m snpo.cli cache --config ...
    deepspeed --num_gpus N --module snpo.cache --config ...
        rank r builds the shards k ≡ r (mod N) of every phase; CPU: gloo, CUDA: nccl

It uses the trainer's own :class:`~snpo.config.TrainConfig` (same YAML, same overrides), so it
caches exactly what that run needs. Three sections, each optional (``--what``):

``text``     the prompt embeddings of every *distinct* prompt (pooled ones too for SDXL-class
             models) in the training dtype — lossless, encoded once per distinct prompt; the
             pair → prompt map; the null embedding (encoded empty prompt, or zeros for SDXL with
             force_zeros_for_empty_prompt).
``latents``  the VAE posterior (mean and log-variance, already scaled, stored in
             ``--latent_dtype``: by default fp16 for fp32 runs, the training dtype — lossless —
             for bf16/fp16 runs) of every image for the config's resolution and
             crop. Training still samples latents with the draws' ``latent_noise`` exactly as
             the live path does. Crop and flip are drawn per (epoch, pair, image), so:
             - center crop (``random_crop: false``, the Diffusion-DPO default): both flip
               variants of every image are stored (×2, or ×1 with ``random_flip: false``);
               the reader picks the variant the draws choose — exact for any number of epochs;
             - ``random_crop: true``: the latents of the drawn crop+flip are stored per epoch
               (×E storage, ``--latent_mode epochs``; also usable for center crop when E = 1).
             Pixel-space models (no VAE): the transformed image itself, as exact uint8.
``ref``      the reference errors e_ref (docs/objectives.md) of winner and loser for every
             (epoch, pair): 2 float32 per pair per epoch. They are computed by the trainer's own
             code (:func:`snpo.step.reference_errors`, re-exported here: the reference UNet on
             :func:`snpo.step.noised_inputs`, the x_t, t, branch conditioning and target that
             :func:`snpo.step.preference_step` feeds the policy, reduced per sample by the loss
             backend) on the inputs the run will use: the cached latents/text
             (``ref_inputs: cache``, the default when they are cached) or live-encoded ones.

Every random choice comes from :mod:`snpo.draws` keyed by (seed, epoch, pair index), so the
trainer regenerates exactly the draws the cache used. What the reference errors do *not* depend
on: objective, beta, lam, weighting, LoRA settings, batch size, world size — one cache serves
dpo, bdpo, npo and snpo runs alike.

Concurrency (:mod:`snpo.locks`, ``CACHE/.lock``): a build holds the folder for its whole run —
exclusively for one process, by rank 0 for all ranks of a torch.distributed launch, shared plus
``CACHE/.lock-rankR-of-N`` for independent ``--rank R --world N`` jobs (see
:func:`_writer_lock`); ``--merge`` and ``--verify --repair`` hold it exclusively. A second
writer is refused at once (FolderLocked, naming the holder's pid), never queued. Readers
(:func:`open_cache`, ``--verify``, ``--info``) take no lock, so a read-only cache works and
training never waits for a build: files are replaced atomically and counted only once listed,
and a shard replaced under a reader by another build (``--overwrite``) names another section
digest in its header and is refused by name, not read.

Caches of format version 1 (before shards named themselves and data fingerprints covered the
labels, captions and own-pairs images) are refused with "rebuild the cache".

The trainer side: :func:`open_cache` (checks the fingerprint against the run's config, names
differing fields, reports the covered epochs) → :class:`Cache` with ``ref_err``, ``latents``,
``text``, ``null``, ``valid`` and ``encoded_batch`` (a drop-in for
:func:`snpo.step.encode_batch`). Storage details: :mod:`snpo.cache_store`; docs/cache.md.
"""

from __future__ import annotations

import contextlib
import dataclasses
import functools
import hashlib
import json
import math
import os
import re
import shutil
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from types import SimpleNamespace

import torch

from .cache_store import (
    CacheCorruptError,
    CacheError,
    CacheMismatchError,
    ShardStore,
    atomic_write_json,
    diff_fields,
    journal_path,
    journal_paths,
    load_manifest,
    merge_parts,
    merged_view,
    new_manifest,
    read_json,
    remove_stale_tmp,
    row_crcs,
    section_digest,
    sha256_file,
    verify_cache,
    write_manifest,
    write_shard,
)
from .config import CACHE_SECTIONS
from .locks import FolderLocked, exclusive_lock, shared_lock
from .step import reference_errors

__all__ = [
    "Cache",
    "CacheCorruptError",
    "CacheError",
    "CacheMismatchError",
    "CachedLatents",
    "build_cache",
    "epochs_needed",
    "open_cache",
    "reference_errors",
]

SECTIONS = CACHE_SECTIONS  # ("latents", "text", "ref"), named in TrainConfig.cache_use
SECTION_LABEL = {
    "latents": "VAE latent distributions",
    "text": "text embeddings",
    "ref": "reference errors",
}
DEFAULT_SHARD_SIZE = 4096
DEFAULT_BATCH_SIZE = 8
PRECISION_DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}
LATENT_DTYPES = {"fp16": torch.float16, "bf16": torch.bfloat16, "fp32": torch.float32}
DTYPE_NAMES = {torch.float16: "float16", torch.bfloat16: "bfloat16", torch.float32: "float32"}


class BuildInterrupted(RuntimeError):
    """Raised by the ``debug_stop_after`` test hook of :func:`build_cache`."""


# --------------------------------------------------------------------------------------------
# behavioural versions: hashes of probes of the code whose output the cache depends on
@functools.lru_cache(maxsize=1)
def draws_version() -> str:
    """SHA-256 of a probe of :func:`snpo.draws.pair_draws` and ``epoch_permutation``: changes
    whenever the draw schedule (or torch's CPU generator) would give other draws."""
    from .draws import epoch_permutation, pair_draws

    sched = SimpleNamespace(config=SimpleNamespace(num_train_timesteps=1000))
    d = pair_draws(1234567, 3, [0, 5, 4099], (2, 3, 3), sched, 0.5)
    h = hashlib.sha256()
    for f in dataclasses.fields(d):
        h.update(getattr(d, f.name).contiguous().numpy().tobytes())
    h.update(epoch_permutation(1234567, 3, 37).numpy().tobytes())
    return "sha256:" + h.hexdigest()


@functools.lru_cache(maxsize=1)
def transform_version() -> str:
    """SHA-256 of a probe of :func:`snpo.data.transform_image` (resize, crops, flips)."""
    from .data import decode_image, image_bytes, transform_image

    im = decode_image(image_bytes((200, 40, 90), (37, 23)))
    h = hashlib.sha256()
    for res in (16, 23):
        for rc in (False, True):
            for flip in (False, True):
                x, size, crop = transform_image(
                    im, res, random_crop=rc, flip=flip, crop_fraction=(0.37, 0.81)
                )
                h.update(x.numpy().tobytes())
                h.update(repr((size, crop)).encode())
    return "sha256:" + h.hexdigest()


# --------------------------------------------------------------------------------------------
# model and data identity
_FILE_HASHES: dict[tuple, str] = {}
_WEIGHT_EXT = (".safetensors", ".bin")
_OTHER_EXT = (".json", ".txt", ".model")


def _file_hash(path: Path) -> str:
    real = Path(os.path.realpath(path))
    # Hugging Face cache: an LFS blob's file name is its SHA-256
    if real.parent.name == "blobs" and re.fullmatch(r"[0-9a-f]{64}", real.name):
        return real.name
    st = real.stat()
    key = (str(real), st.st_size, st.st_mtime_ns)
    if key not in _FILE_HASHES:
        _FILE_HASHES[key] = sha256_file(real)
    return _FILE_HASHES[key]


def _component_files(folder: Path, variant: str | None) -> list[Path]:
    """The files from_pretrained reads in a component folder: configs/tokenizer files and the
    weights of ``variant`` (safetensors preferred over .bin, as diffusers/transformers do)."""
    files = [p for p in sorted(folder.rglob("*")) if p.is_file() and not p.name.startswith(".")]
    other = [p for p in files if p.suffix in _OTHER_EXT]
    weights = [p for p in files if p.suffix in _WEIGHT_EXT]
    weights = [p for p in weights if p.suffix == ".safetensors"] or weights

    def base(p: Path) -> str:
        return p.name[: -len(p.suffix)]

    chosen = []
    if variant:
        chosen = [
            p for p in weights if base(p).endswith(f".{variant}") or f".{variant}-" in base(p)
        ]
    if not chosen:
        chosen = [p for p in weights if "." not in base(p)] or weights
    return sorted(other + chosen)


def component_hash(folders: list[Path], variant: str | None) -> str:
    """SHA-256 over (relative path, size, SHA-256) of the files of the given component folders."""
    h = hashlib.sha256()
    for folder in folders:
        for p in _component_files(folder, variant):
            rel = f"{folder.name}/{p.relative_to(folder).as_posix()}"
            h.update(f"{rel}\t{p.stat().st_size}\t{_file_hash(p)}\n".encode())
    return "sha256:" + h.hexdigest()


def model_folder(cfg) -> Path:
    """The local folder of ``cfg.model`` (a directory, or the hub snapshot in the HF cache)."""
    if os.path.isdir(cfg.model):
        return Path(cfg.model)
    try:
        from huggingface_hub import snapshot_download

        return Path(snapshot_download(cfg.model, revision=cfg.revision, local_files_only=True))
    except Exception as err:  # noqa: BLE001 - several hub errors
        raise CacheError(
            f"model: cannot find a local copy of {cfg.model!r} to fingerprint ({err}); load it "
            "once (snpo cache / snpo train download it) or give a local folder"
        ) from err


def _model_identity(model: str, revision: str | None, variant: str | None) -> dict:
    cfg = SimpleNamespace(model=model, revision=revision, variant=variant)
    root = model_folder(cfg)
    index_file = root / "model_index.json"
    index = json.loads(index_file.read_text()) if index_file.is_file() else {}
    if os.path.isdir(model):
        parts = {p.name for p in root.iterdir() if p.is_dir()}
    else:
        parts = {k for k, v in index.items() if isinstance(v, list) and v[0] is not None}
    family = "sdxl" if "text_encoder_2" in parts else "sd"
    force_zeros = family == "sdxl" and bool(index.get("force_zeros_for_empty_prompt", True))
    texts = [root / n for n in ("text_encoder", "tokenizer", "text_encoder_2", "tokenizer_2")]
    sched_file = root / "scheduler" / "scheduler_config.json"
    sched = json.loads(sched_file.read_text()) if sched_file.is_file() else {}
    return {
        "family": family,
        "unet_weights": component_hash([root / "unet"], variant),
        "vae_weights": (
            component_hash([root / "vae"], variant) if "vae" in parts else "none (pixel space)"
        ),
        "text_encoder_weights": component_hash([p for p in texts if p.is_dir()], variant),
        "scheduler": {k: v for k, v in sorted(sched.items()) if not k.startswith("_")},
        "null_kind": "zeros" if force_zeros else "empty_prompt",
    }


def model_identity(cfg) -> dict:
    """Hashes of the UNet (the reference), VAE and text encoders + tokenizers of ``cfg.model``,
    its scheduler config and null-embedding kind. File hashes are memoised per process by
    (path, size, mtime)."""
    return _model_identity(cfg.model, cfg.revision, cfg.variant)


_PARQUET_IDS: dict[tuple, dict] = {}


def _data_format(cfg, item: str) -> str:
    """The reader :func:`snpo.data.open_source` picks for a local file ``item``: pickapic,
    pairs, or another (explicit data_format hub, or an extension it refuses)."""
    if cfg.data_format != "auto":
        return cfg.data_format
    ext = Path(item).suffix.lower()
    if ext == ".parquet":
        return "pickapic"
    return "pairs" if ext in (".jsonl", ".json", ".csv") else "other"


def _values_digest(values) -> str:
    """SHA-256 of a sequence of values (None, str, bytes or anything str() shows), each length
    prefixed so that no two sequences collide."""
    h = hashlib.sha256()
    for v in values:
        if v is None:
            h.update(b"\xff" * 8)
            continue
        b = bytes(v) if isinstance(v, (bytes, bytearray)) else str(v).encode("utf-8", "replace")
        h.update(len(b).to_bytes(8, "little") + b)
    return "sha256:" + h.hexdigest()


def _parquet_footer(p: Path) -> bytes:
    """The raw footer (file metadata) of a parquet file: schema, row groups, column offsets,
    sizes and statistics."""
    size = p.stat().st_size
    with open(p, "rb") as fh:
        if size < 12:
            raise ValueError("too short for a parquet file")
        fh.seek(size - 8)
        tail = fh.read(8)
        n = int.from_bytes(tail[:4], "little")
        if tail[4:] != b"PAR1" or n > size - 12:
            raise ValueError("no parquet footer (PAR1) at its end")
        fh.seek(size - 8 - n)
        return fh.read(n)


def _parquet_identity(p: Path) -> dict:
    """Name, size, row count, footer hash and hashes of the columns snpo.data.PickapicParquet
    decides pairs by (label_0, has_label: kept pairs, order and winner; caption: the prompts),
    read as it reads them. Memoised per process by (path, inode, size, mtime, ctime)."""
    import numpy as np
    import pyarrow.parquet as pq

    from .data import DataError

    st = p.stat()
    key = (os.path.realpath(p), st.st_dev, st.st_ino, st.st_size, st.st_mtime_ns, st.st_ctime_ns)
    if key in _PARQUET_IDS:
        return dict(_PARQUET_IDS[key])
    column = "footer"
    try:
        ident = {
            "file": p.name,
            "bytes": st.st_size,
            "footer": "sha256:" + hashlib.sha256(_parquet_footer(p)).hexdigest(),
        }
        column = "schema"
        pf = pq.ParquetFile(p)
        ident["rows"] = pf.metadata.num_rows
        names = set(pf.schema_arrow.names)
        for column in ("label_0", "has_label", "caption"):
            if column not in names:
                ident[column] = "absent"
                continue
            col = pf.read(columns=[column]).column(column)
            if column == "label_0":
                a = col.to_numpy(zero_copy_only=False).astype(np.float64)
                ident[column] = "sha256:" + hashlib.sha256(a.tobytes()).hexdigest()
            elif column == "has_label":
                a = col.to_numpy(zero_copy_only=False).astype(bool)
                ident[column] = "sha256:" + hashlib.sha256(a.tobytes()).hexdigest()
            else:
                ident[column] = _values_digest(col.to_pylist())
    except Exception as err:  # noqa: BLE001 - pyarrow/numpy raise several kinds
        raise DataError(
            f"train_data: cannot fingerprint parquet file {p} ({column}): "
            f"{type(err).__name__}: {err}"
        ) from err
    _PARQUET_IDS[key] = ident
    return dict(ident)


def _pair_image_names(p: Path) -> list:
    """The winner/loser values of every record of a JSONL/CSV of own pairs, read as
    :class:`snpo.data.OwnPairs` reads them but never raising (an unreadable record gives None:
    the trainer's reader names it when it opens the data)."""
    import csv

    recs: list = []
    if p.suffix.lower() == ".csv":
        with contextlib.suppress(csv.Error, UnicodeDecodeError), open(p, newline="") as fh:
            recs = list(csv.DictReader(fh))
    else:
        with contextlib.suppress(UnicodeDecodeError):
            for line in p.read_text().splitlines():
                if line.strip():
                    try:
                        recs.append(json.loads(line))
                    except json.JSONDecodeError:
                        recs.append(None)
    out = []
    for r in recs:
        for key in ("winner", "loser"):
            v = r.get(key) if isinstance(r, dict) else None
            out.append(v if isinstance(v, str) and v else None)
    return out


def _pairs_identity(p: Path) -> dict:
    """Name, size and SHA-256 of a JSONL/CSV of own pairs, and a hash over the size and mtime
    (ns) of every image it names (relative to its folder; "missing" for absent ones): replacing
    or editing an image changes it. Copies of the data must keep mtimes (cp -a, rsync -a), or
    the cache is refused (naming ``data[i].image_size_mtime``)."""
    stats = []
    for name in _pair_image_names(p):
        if name is None:
            stats.append("unreadable record")
            continue
        try:
            st = os.stat(p.parent / name)
        except (OSError, ValueError):
            stats.append("missing")
            continue
        stats.append(f"{st.st_size} {st.st_mtime_ns}" if os.path.isfile(p.parent / name) else "?")
    return {
        "file": p.name,
        "bytes": p.stat().st_size,
        "sha256": "sha256:" + sha256_file(p),
        "images": len(stats),
        "image_size_mtime": _values_digest(stats),
    }


def data_identity(cfg) -> list[dict]:
    """One dict per data file, compared field by field (a refusal names e.g.
    ``data[0].label_0``). Pick-a-Pic parquet: name, size, row count, footer and the label_0 /
    has_label / caption columns (:func:`_parquet_identity`); own pairs (JSONL/CSV): name, size,
    SHA-256 and every image's size + mtime (:func:`_pairs_identity`); hub datasets: id and
    split. File names only (no folders), so a moved dataset keeps its cache. Not covered: the
    image bytes inside a parquet file beyond what its footer records (offsets, sizes,
    statistics)."""
    from .config import expand_data_files

    out: list[dict] = []
    for item in expand_data_files(cfg.train_data):
        p = Path(item)
        fmt = _data_format(cfg, item)
        if not p.is_file():
            out.append({"hub": item, "split": cfg.data_split})
        elif fmt == "pickapic":
            out.append(_parquet_identity(p))
        elif fmt == "pairs":
            out.append(_pairs_identity(p))
        else:
            out.append({"file": p.name, "bytes": p.stat().st_size, "sha256": sha256_file(p)})
    return out


# --------------------------------------------------------------------------------------------
# fingerprints (compared with a config) and layouts (how a section is stored)
def section_fingerprint(name: str, cfg, layout: dict, mid: dict, did: list[dict]) -> dict:
    """The config-derived fields a section depends on (compared field by field)."""
    common = {
        "data": did,
        "max_train_pairs": cfg.max_train_pairs,
        "precision": cfg.precision,
    }
    if name == "text":
        return {
            **common,
            "text_encoder_weights": mid["text_encoder_weights"],
            "null_kind": mid["null_kind"],
        }
    image = {
        "resolution": cfg.resolution,
        "random_crop": cfg.random_crop,
        "random_flip": cfg.random_flip,
        "vae_weights": mid["vae_weights"],
        "transform_version": transform_version(),
    }
    if name == "latents":
        fp = {**common, **image}
        if layout["mode"] == "epochs":  # the stored crops/flips are the seed's draws
            fp.update(seed=cfg.seed, draws_version=draws_version())
        return fp
    if name == "ref":
        return {
            **common,
            **image,
            "unet_weights": mid["unet_weights"],
            "text_encoder_weights": mid["text_encoder_weights"],
            "null_kind": mid["null_kind"],
            "scheduler": mid["scheduler"],
            "seed": cfg.seed,
            "uncond_prob": cfg.uncond_prob,
            "draws_version": draws_version(),
        }
    raise ValueError(f"unknown cache section {name!r}")


def _digest(obj) -> str:
    return "sha256:" + hashlib.sha256(json.dumps(obj, sort_keys=True).encode()).hexdigest()


def _inputs_digest(view: dict) -> str:
    """Identity of the cached latents + text sections (what cache-input reference errors saw)."""
    secs = view["sections"]
    return _digest([[secs[n]["fingerprint"], secs[n]["layout"]] for n in ("latents", "text")])


def epochs_needed(cfg, num_pairs: int, world: int = 1) -> int:
    """How many epochs a run of ``cfg`` on ``world`` processes touches (snpo.data.PairOrder)."""
    from .data import PairOrder

    order = PairOrder(
        num_pairs, seed=cfg.seed, rank=0, world=world, micro=cfg.train_batch_size_per_gpu
    )
    total = cfg.max_steps * cfg.gradient_accumulation_steps
    return (total - 1) // order.batches_per_epoch + 1


def _span(epochs: list[int]) -> str:
    if not epochs:
        return "no epoch"
    if epochs == list(range(epochs[0], epochs[-1] + 1)):
        return f"epoch {epochs[0]}" if len(epochs) == 1 else f"epochs {epochs[0]}–{epochs[-1]}"
    return "epochs " + ", ".join(map(str, epochs))


# --------------------------------------------------------------------------------------------
# shard names
def _text_rel(k: int) -> str:
    return f"text/t{k:05d}.safetensors"


TEXT_INDEX = "text/index.safetensors"
TEXT_NULL = "text/null.safetensors"


def _latent_rel(k: int, epoch: int | None) -> str:
    return (
        f"latents/s{k:05d}.safetensors"
        if epoch is None
        else f"latents/e{epoch:04d}/s{k:05d}.safetensors"
    )


def _ref_rel(k: int, epoch: int) -> str:
    return f"ref/e{epoch:04d}/s{k:05d}.safetensors"


_EPOCH_RE = re.compile(r"/e(\d{4})/s\d{5}\.safetensors$")


# --------------------------------------------------------------------------------------------
# the reader
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
            m = _EPOCH_RE.search(rel)
            if m:
                have[int(m.group(1))] = have.get(int(m.group(1)), 0) + 1
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
            want = [TEXT_INDEX, TEXT_NULL] + [_text_rel(k) for k in range(lay["num_shards"])]
        elif section == "latents" and lay["mode"] == "variants":
            want = [_latent_rel(k, None) for k in range(lay["num_shards"])]
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
                else f"per epoch ({_span(self.latent_epochs or [])})"
            )
            bits.append(f"latents {lay['dtype']} {tuple(lay['latent_shape'])} {where}")
        if "text" in self.sections:
            bits.append(f"text ({self.layout('text')['num_prompts']} distinct prompts)")
        if "ref" in self.sections:
            bits.append(
                f"reference errors for {_span(self.epochs)} (inputs: "
                f"{self.layout('ref')['inputs']})"
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
        m = _EPOCH_RE.search(rel)
        if m:
            e = int(m.group(1))
            have = self._complete_epochs(section)
            return (
                f"epoch {e} is not in the cache's {SECTION_LABEL[section]} (it covers "
                f"{_span(have)}); rerun snpo cache with --epochs {e + 1} to add it"
            )
        return f"cache shard {rel} is missing; rerun snpo cache to complete the cache"

    def _latent_shard(self, i: int, epoch: int) -> tuple[str, int]:
        lay = self.layout("latents")
        k, r = self._loc("latents", i)
        rel = _latent_rel(k, epoch if lay["mode"] == "epochs" else None)
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
                out[n] = bool(self._whole("ref", _ref_rel(k, epoch), "valid")[r])
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
                rels.add(_ref_rel(self._loc("ref", i)[0], epoch))
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
            rel = _ref_rel(k, epoch)
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
        from .draws import augment_draws

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
            crcs = self._whole("latents", rel, "row_crc")[r]
            for j in range(n_img):
                sl = (slice(r, r + 1), slice(j, j + 1), slice(vs[j], vs[j] + 1))
                what = f"pair {i} image {j} variant {vs[j]}"
                if lay["pixel_space"]:
                    (u,) = store.rows(rel, ["pixels"], sl, crcs[j, vs[j]], what)
                    means[j].append(u[0, 0, 0].to(torch.float32).div_(127.5).sub_(1.0))
                else:
                    mu, lv = store.rows(rel, ["mean", "logvar"], sl, crcs[j, vs[j]], what)
                    means[j].append(mu[0, 0, 0])
                    logvars[j].append(lv[0, 0, 0])
        if not idx:
            raise ValueError("no pair indices given")
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
        """PromptEmbeddings of the pairs' prompts (P rows; pooled for SDXL-class models), in
        the training dtype the cache was built with."""
        from .models import PromptEmbeddings

        lay = self.layout("text")
        store = self.stores["text"]
        embeds, pooled = [], []
        for i, pid in zip(self._idx(indices), self.prompt_ids(indices).tolist()):
            if pid < 0:
                raise CacheError(f"pair {i}'s record was unreadable when the cache was built")
            k, r = divmod(pid, lay["shard_size"])
            rel = _text_rel(k)
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
        """The (1, L, D) null embedding (:func:`snpo.models.null_embedding`) of the model."""
        from .models import PromptEmbeddings

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
        from .step import EncodedBatch

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
        :func:`snpo.step.latents_from_posterior`) and, for SDXL-class models, the time ids from
        the stored original sizes and crops (:func:`snpo.step.time_id_rows`), else None."""
        from .step import latents_from_posterior, time_id_rows

        idx = self._idx(indices)
        if draws.indices.tolist() != idx:
            raise ValueError("draws are for other pairs (or another order) than indices")
        device = torch.device(device)
        lat = self.latents(epoch, idx, winners_only=winners_only)
        mean = lat.mean.to(device).to(dtype)
        logvar = None if lat.logvar is None else lat.logvar.to(device).to(dtype)
        latents = latents_from_posterior(mean, logvar, draws.to(device), winners_only)
        tid = None
        if self.layout("latents")["family"] == "sdxl":
            n_img = 1 if winners_only else 2
            size = torch.cat([lat.original_size[:, j] for j in range(n_img)])
            crop = torch.cat([lat.crop_top_left[:, j] for j in range(n_img)])
            res = self.sections["latents"]["fingerprint"]["resolution"]
            tid = time_id_rows(size, crop, res).to(device=device, dtype=dtype)
        return latents.to(dtype), tid

    def verify(self) -> None:
        """Hash every shard of the opened sections (CacheCorruptError naming the first bad)."""
        for store in self.stores.values():
            store.verify_all()


def _lossless(view: dict) -> bool:
    lat = view["sections"].get("latents")
    return bool(lat and lat["layout"]["lossless"])


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
    not cover epochs 0..epochs-1 (see :func:`epochs_needed`); with ``num_pairs``, one built for
    another number of pairs. Checks every needed shard's size now and the CRC32 of every row
    and tensor it reads (``verify="lazy"``); ``verify="full"`` also hashes every needed shard
    now (SHA-256 against the manifest); ``"none"``: sizes only. Whatever ``verify``, a shard
    whose header does not name itself and this section's build is refused when first read.
    Takes no lock (see the module docstring). ``Cache.epochs`` reports the covered epochs.
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
    mid, did = model_identity(cfg), data_identity(cfg)
    for n in need:
        sec = view["sections"][n]
        want = section_fingerprint(n, cfg, sec["layout"], mid, did)
        diffs = diff_fields(sec["fingerprint"], want)
        if diffs:
            raise CacheMismatchError(
                f"cache fingerprint mismatch ({SECTION_LABEL[n]} in {root}): "
                + "; ".join(diffs)
                + ". Rebuild the cache for this config (snpo cache) or use the matching one."
            )
    if "ref" in need:
        ref_layout = view["sections"]["ref"]["layout"]
        if ref_layout["inputs"] == "cache":
            have_inputs = all(s in view["sections"] for s in ("latents", "text"))
            if not have_inputs or ref_layout["inputs_digest"] != _inputs_digest(view):
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
    for n in need:
        miss = cache.missing(n)
        if miss:
            raise CacheError(
                f"the {SECTION_LABEL[n]} in {root} are incomplete: {len(miss)} shard(s) missing "
                f"(e.g. {miss[0]}); rerun snpo cache to finish them{merge_hint}"
            )
    if epochs is not None:
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
                    f"epochs: the cache's {SECTION_LABEL[n]} cover {_span(have)} but the run "
                    f"needs {_span(want_e)}; rerun snpo cache with --epochs {epochs} to add "
                    f"{_span(lacking)}{merge_hint}"
                )
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


# --------------------------------------------------------------------------------------------
# building
def captions(source) -> list[str | None]:
    """The prompt of every pair of an snpo.data source, as ``source.get(i)[0]`` returns it, read
    without touching image bytes where the source allows (Pick-a-Pic parquet: the caption
    column only)."""
    subs = getattr(source, "sources", None)
    if subs is None:
        return _captions_one(source, len(source))
    out: list[str] = []
    offs = source.offsets
    for j, s in enumerate(subs):
        out.extend(_captions_one(s, offs[j + 1] - offs[j]))
    return out


def _captions_one(s, n: int) -> list[str | None]:
    from .data import PickapicParquet

    if isinstance(s, PickapicParquet):
        import pyarrow.parquet as pq

        cols: dict[int, list] = {}
        out = []
        for k in range(n):
            fid, row = int(s.file_ids[k]), int(s.rows[k])
            if fid not in cols:
                cols[fid] = (
                    pq.read_table(s.files[fid], columns=["caption"]).column("caption").to_pylist()
                )
            out.append(cols[fid][row] or "")
        return out
    if hasattr(s, "records"):  # OwnPairs
        return [s.records[k][0] for k in range(n)]
    out = []
    for k in range(n):
        try:
            out.append(s.get(k)[0])
        except (OSError, ValueError, KeyError):
            out.append(None)
    return out


class _ImageItems(torch.utils.data.Dataset):
    """Pair index → the images the trainer would see, in every stored variant.

    Mirrors snpo.data.PairDataset.__getitem__ (same decode_image / transform_image calls, same
    bad-image rules and messages) but decodes winner and loser independently (per-image
    validity, so sft runs can use pairs whose loser is bad) and transforms each image once per
    variant: variants mode → flip False/True with the center crop; epochs mode → the (crop, flip)
    that :func:`snpo.draws.augment_draws` gives for (seed, epoch, index)."""

    def __init__(self, source, cfg, mode: str, variants: int, epoch: int | None):
        self.source, self.mode, self.variants = source, mode, variants
        self.epoch = epoch
        self.resolution, self.seed = cfg.resolution, cfg.seed
        self.random_crop, self.random_flip = cfg.random_crop, cfg.random_flip
        self.on_bad_image = cfg.on_bad_image

    def __len__(self) -> int:
        return len(self.source)

    def _bad(self, i: int, why: str) -> str:
        from .data import BadImageError

        where = self.source.describe(i)
        if self.on_bad_image == "fail":
            raise BadImageError(f"bad image in {where}: {why} (on_bad_image: fail)")
        return f"{where}: {why}"

    def __getitem__(self, i: int) -> dict:
        from .data import decode_image, transform_image
        from .draws import augment_draws

        v_n, r = self.variants, self.resolution
        item = {
            "index": i,
            "x": torch.zeros(2, v_n, 3, r, r),
            "size": torch.zeros(2, v_n, 2, dtype=torch.int32),
            "crop": torch.zeros(2, v_n, 2, dtype=torch.int32),
            "valid": [False, False],
            "bad": None,
        }
        try:
            _, win, lose = self.source.get(i)
        except (OSError, ValueError, KeyError) as err:
            item["bad"] = self._bad(i, f"unreadable record: {err}")
            return item
        aug = augment_draws(self.seed, self.epoch, i) if self.mode == "epochs" else None
        for j, data in enumerate((win, lose)):
            try:
                im = decode_image(data)
            except Exception as err:  # noqa: BLE001 - as PairDataset: any failure is bad
                which = "winner" if j == 0 else "loser"
                if item["bad"] is None:
                    item["bad"] = self._bad(i, f"{which} image: {type(err).__name__}: {err}")
                continue
            for v in range(v_n):
                if aug is None:
                    flip, rc, frac = bool(v), False, (0.0, 0.0)
                else:
                    flip = self.random_flip and bool(aug.flip[j])
                    rc, frac = self.random_crop, aug.crop[j]
                x, size, crop = transform_image(
                    im, r, random_crop=rc, flip=flip, crop_fraction=frac
                )
                item["x"][j, v] = x
                item["size"][j, v] = torch.tensor(size, dtype=torch.int32)
                item["crop"][j, v] = torch.tensor(crop, dtype=torch.int32)
            item["valid"][j] = True
        return item


def _list_collate(items):
    return items


def _distributed() -> tuple[int, int] | None:
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return None


def _barrier() -> None:
    d = _distributed()
    if d is not None and d[1] > 1:
        torch.distributed.barrier()


class _Builder:
    """One rank's part of a cache build (see :func:`build_cache`)."""

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

    def run_units(self, section: str, units: list, build_one) -> None:
        from tqdm import tqdm

        t0, c0, s0 = time.perf_counter(), time.process_time(), os.times().system
        mine = units[self.rank :: self.world]
        todo = [u for u in mine if not self.done(section, u[0])]
        self.skipped += len(mine) - len(todo)
        if len(todo) < len(mine):
            self.log(f"{section}: {len(mine) - len(todo)} shard(s) already done")
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
        units += [(_text_rel(k), "shard", k) for k in range(math.ceil(len(self.unique) / s))]
        return units

    def build_text(self, kind: str, k: int | None = None):
        from .models import encode_prompts, null_embedding

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
            return [(_latent_rel(k, None), k, None) for k in range(k_n)]
        return [(_latent_rel(k, e), k, e) for e in range(self.epochs) for k in range(k_n)]

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

    def _loader(self, dataset, keys, batch):
        return torch.utils.data.DataLoader(
            dataset,
            batch_sampler=[keys[a : a + batch] for a in range(0, len(keys), batch)],
            collate_fn=_list_collate,
            num_workers=self.num_workers,
        )

    def build_latents(self, k: int, epoch: int | None):
        from .models import encode_images

        lay = self.latent_layout
        pixel, v_n = lay["pixel_space"], lay["variants"]
        first = k * self.shard_size
        idx = list(range(first, min(self.num_pairs, first + self.shard_size)))
        ds = _ImageItems(self.source, self.cfg, lay["mode"], v_n, epoch)
        if epoch is not None:
            self.latent_epochs_built.add(epoch)
        n = len(idx)
        c, h, w = lay["latent_shape"]
        store_dt = LATENT_DTYPES.get(self.latent_dtype, torch.float16)
        if pixel:
            out = {"pixels": torch.zeros(n, 2, v_n, c, h, w, dtype=torch.uint8)}
        else:
            out = {
                "mean": torch.zeros(n, 2, v_n, c, h, w, dtype=store_dt),
                "logvar": torch.zeros(n, 2, v_n, c, h, w, dtype=store_dt),
            }
        out["original_size"] = torch.zeros(n, 2, v_n, 2, dtype=torch.int32)
        out["crop_top_left"] = torch.zeros(n, 2, v_n, 2, dtype=torch.int32)
        out["valid"] = torch.zeros(n, 2, dtype=torch.uint8)
        bad = []
        for items in self._loader(ds, idx, self.batch_size):
            slots, xs = [], []
            for it in items:
                row = it["index"] - first
                out["original_size"][row] = it["size"]
                out["crop_top_left"][row] = it["crop"]
                if it["bad"] is not None:
                    bad.append([it["index"], it["bad"]])
                for j in range(2):
                    out["valid"][row, j] = int(it["valid"][j])
                    if it["valid"][j]:
                        for v in range(v_n):
                            slots.append((row, j, v))
                            xs.append(it["x"][j, v])
            if not xs:
                continue
            x = torch.stack(xs)
            if pixel:  # exact: transform_image's x is u/127.5 − 1 for a uint8 u
                u = ((x + 1.0) * 127.5).round().clamp(0, 255).to(torch.uint8)
                for (row, j, v), ui in zip(slots, u):
                    out["pixels"][row, j, v] = ui
                continue
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
            for (row, j, v), mi, li in zip(slots, mean, logvar):
                out["mean"][row, j, v] = mi
                out["logvar"][row, j, v] = li
        big = [out["pixels"]] if pixel else [out["mean"], out["logvar"]]
        out["row_crc"] = row_crcs(big, 3)
        return out, {"first": first, "bad": bad}

    # -- reference errors --------------------------------------------------------------------
    def prepare_ref(self) -> None:
        """The reference as a StepModels (its own UNet, frozen) and, for cache inputs, a reader
        over the complete latents and text (built by every rank before the barrier)."""
        from .models import null_embedding
        from .step import StepModels, unet_fn

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
            reference=unet_fn(self.model.unet),
            null=null.to(device=self.device, dtype=self.dtype),
            device=self.device,
            dtype=self.dtype,
        )

    def ref_units(self):
        k_n = math.ceil(self.num_pairs / self.shard_size)
        return [(_ref_rel(k, e), k, e) for e in range(self.epochs) for k in range(k_n)]

    def build_ref(self, k: int, epoch: int):
        from .data import PairDataset, collate_pairs
        from .draws import pair_draws
        from .step import encode_batch

        cfg, m = self.cfg, self.model
        self.ref_epochs.add(epoch)
        first = k * self.shard_size
        idx = list(range(first, min(self.num_pairs, first + self.shard_size)))
        err = torch.full((len(idx), 2), float("nan"), dtype=torch.float32)
        valid = torch.zeros(len(idx), dtype=torch.uint8)
        bad: list = []

        def run(good: list[int], make_enc):
            if not good:
                return
            draws = pair_draws(
                cfg.seed, epoch, good, self.latent_shape, m.scheduler, cfg.uncond_prob
            )
            enc = make_enc(draws)
            e = reference_errors(self.step_models, enc, draws, backend=cfg.backend).to("cpu")
            p = len(good)
            for n, i in enumerate(good):
                err[i - first] = torch.stack([e[n], e[p + n]])
                valid[i - first] = 1

        if self.ref_inputs == "cache":
            reader = self.reader
            for a in range(0, len(idx), self.batch_size):
                chunk = idx[a : a + self.batch_size]
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
            keys = [(epoch, i) for i in idx]
            loader = torch.utils.data.DataLoader(
                ds,
                batch_sampler=[
                    keys[a : a + self.batch_size] for a in range(0, len(keys), self.batch_size)
                ],
                collate_fn=collate_pairs,
                num_workers=self.num_workers,
            )
            for batch in loader:
                bad.extend([[int(i), why] for i, why in batch.bad])
                good = batch.indices.tolist()
                run(good, lambda d, b=batch: encode_batch(self.step_models, b, d))
        return {"err": err, "valid": valid}, {"first": first, "bad": sorted(bad)}


@contextlib.contextmanager
def _writer_lock(out: Path, rank: int, world: int, *, grouped: bool):
    """The lock a builder holds on the cache folder ``out`` (:mod:`snpo.locks`) for its run:

    - one process (world 1): ``out/.lock`` exclusively — it merges journals, removes stale
      temporary files and rewrites the manifest, so nobody else may write;
    - a torch.distributed build: rank 0 takes ``out/.lock`` exclusively for the whole build
      (merge included) and tells the other ranks whether it got it, so that all ranks stop
      with the same FolderLocked (the ranks of one build never refuse each other);
    - independent ranks (``--rank R --world N`` without a process group): ``out/.lock`` shared
      (ranks of one build run side by side, but never beside an exclusive writer: a
      one-process build, --merge or --verify --repair), and ``out/.lock-rankR-of-N``
      exclusively (the same rank twice is refused).
    """
    if world == 1:
        with exclusive_lock(out, "snpo cache (build)"):
            yield
        return
    who = f"snpo cache (build, rank {rank} of {world})"
    if not grouped:
        rank_lock = f".lock-rank{rank:05d}-of-{world:05d}"
        with shared_lock(out, who), exclusive_lock(out, who, name=rank_lock):
            yield
        return
    with contextlib.ExitStack() as stack:
        err = None
        if rank == 0:
            try:
                stack.enter_context(exclusive_lock(out, f"snpo cache (build, {world} ranks)"))
            except FolderLocked as e:
                err = e
        msg = _broadcast_text(str(err) if err is not None else "")
        if err is not None:
            raise err
        if msg:
            raise FolderLocked(msg, out, [])
        yield


def _broadcast_text(text: str) -> str:
    """Rank 0's ``text`` on every rank of the default process group."""
    import torch.distributed as dist

    obj = [text]
    device = None
    if dist.get_backend() == "nccl":
        device = torch.device("cuda", torch.cuda.current_device())
    dist.broadcast_object_list(obj, src=0, device=device)
    return obj[0]


# glibc mallopt parameters
_M_TRIM_THRESHOLD, _M_MMAP_THRESHOLD = -1, -3


@contextlib.contextmanager
def _build_allocator(device: torch.device):
    """A CPU build on glibc: keep freed buffers in the heap while the build runs.

    A VAE forward over a batch of images allocates activations of tens to hundreds of MB each.
    glibc serves allocations above its mmap threshold (which adapts up to 32 MiB) with fresh
    mmaps and unmaps them on free, so every forward page-faults its whole working set in again,
    zero-filled by the kernel: at 256 px and 32 images per forward that system time was as large
    as the VAE's compute (docs/cache.md). Raising the mmap and trim thresholds for the build
    lets those buffers be reused; afterwards they are set to the ceilings glibc's adaptive
    thresholds reach (32 MiB, 64 MiB) and the heap is trimmed. DataLoader workers forked during
    the build inherit the setting. ``SNPO_CACHE_MALLOC=0`` leaves the allocator alone; no-op on
    a GPU or without glibc. Yields whether the thresholds were raised."""
    libc, ok = None, [0]
    if (
        device.type == "cpu"
        and sys.platform.startswith("linux")
        and os.environ.get("SNPO_CACHE_MALLOC", "1") != "0"
    ):
        import ctypes

        try:
            libc = ctypes.CDLL("libc.so.6")
            big = ctypes.c_int(2**31 - 1)
            ok = [libc.mallopt(_M_MMAP_THRESHOLD, big), libc.mallopt(_M_TRIM_THRESHOLD, big)]
        except (OSError, AttributeError):
            libc, ok = None, [0]
    try:
        yield libc is not None and all(ok)
    finally:
        if libc is not None:
            import ctypes

            libc.mallopt(_M_MMAP_THRESHOLD, ctypes.c_int(32 << 20))
            libc.mallopt(_M_TRIM_THRESHOLD, ctypes.c_int(64 << 20))
            libc.malloc_trim(ctypes.c_size_t(0))


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
    shard_size: pairs (or distinct prompts) per shard; batch_size: pairs per VAE/UNet forward
    (part of the layout: a resumed build must use the same, so its bytes match); latent_dtype:
    storage of mean/logvar ("fp16" | "bf16" | "fp32" | "auto": the training dtype for bf16/fp16
    runs — lossless at 2 bytes —, fp16 for fp32 runs); latent_mode: "variants" (center crop,
    both flips stored), "epochs" (the drawn crop+flip per epoch) or "auto" (epochs iff
    random_crop); ref_inputs: "cache" (the cached latents/text), "live" (encode_batch on the
    decoded images) or "auto" (cache iff latents and text are cached); rank/world: this
    process's share (default: torch.distributed's, else 0/1) — rank r builds units
    k ≡ r (mod world) of each phase; overwrite: drop the sections being built if they were made
    for another config; debug_stop_after: test hook, raise BuildInterrupted after that many
    shards. Returns a summary dict.
    """
    from .data import open_source
    from .models import load_model

    out = Path(out)
    what = [w for w in SECTIONS if w in set([what] if isinstance(what, str) else what)]
    if not what:
        raise ValueError(f"what: choose one or more of {SECTIONS}")
    # an explicit share (independent jobs) wins over a process group this process may be in for
    # other reasons (e.g. a trainer's single-process group in the same interpreter)
    d = _distributed() if rank is None and world is None else None
    rank, world = d if d is not None else (int(rank or 0), int(world or 1))
    if not 0 <= rank < world:
        raise ValueError(f"rank {rank} is outside world {world}")
    latent_dtype = _check_options(
        cfg, latent_dtype, latent_mode, ref_inputs, shard_size, batch_size
    )
    t_start = time.perf_counter()
    out.mkdir(parents=True, exist_ok=True)
    if cfg.device == "cuda" or (cfg.device == "auto" and torch.cuda.is_available()):
        device = torch.device("cuda", int(os.environ.get("LOCAL_RANK", "0")))
        torch.cuda.set_device(device)
    else:
        device = torch.device("cpu")
    with (
        _writer_lock(out, rank, world, grouped=d is not None),
        _build_allocator(device) as tuned,
    ):
        if world == 1:  # the only writer: tidy up after crashed runs
            remove_stale_tmp(out)
            if journal_paths(out):
                merge_parts(out)
        source = open_source(cfg)
        n = len(source)
        epochs = int(epochs_needed(cfg, n, train_world) if epochs is None else epochs)
        dtype = PRECISION_DTYPES[cfg.precision]
        t0 = time.perf_counter()
        model = load_model(
            cfg.model, dtype=dtype, device=device, revision=cfg.revision, variant=cfg.variant
        )
        if cfg.attention == "xformers":
            model.unet.enable_xformers_memory_efficient_attention()
        if cfg.resolution % model.latent_scale:
            raise CacheError(
                f"resolution: {cfg.resolution} is not divisible by the VAE factor "
                f"{model.latent_scale}"
            )
        t_load = time.perf_counter() - t0
        view = merged_view(out)
        caps = captions(source) if "text" in what else None
        plan = _plan_sections(
            cfg, model, what, view, n, caps, shard_size, batch_size, latent_dtype, latent_mode,
            ref_inputs,
        )  # fmt: skip
        _reconcile(
            out, view, plan, overwrite=overwrite, rank=rank, independent=world > 1 and d is None
        )
        b = _Builder(
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
            ref_inputs=plan["ref"]["layout"]["inputs"] if "ref" in plan else None,
        )
        sections = {k: v for k, v in plan.items() if not k.startswith("_")}
        b.register(sections)
        b.log(
            f"{n} pairs, sections {','.join(sections)}, {epochs} epoch(s), shards of {shard_size}, "
            f"rank {rank}/{world}, device {device}, {cfg.precision}"
        )
        if "text" in sections:
            b.run_units("text", b.text_units(), b.build_text)
            _barrier()
        if "latents" in sections:
            b.run_units("latents", b.latent_units(), b.build_latents)
            _barrier()
        if "ref" in sections:
            b.prepare_ref()
            b.run_units("ref", b.ref_units(), b.build_ref)
        _barrier()
        if world > 1:
            if d is not None:
                if rank == 0:
                    merge_parts(out)
                _barrier()
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
        b.log(
            f"done: {b.built} shard(s) built, {b.skipped} already there, {total:.1f} s "
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
                f"{be['runs']:.2f} runs of {epochs} epoch(s), and one build serves a whole sweep "
                "over beta, lam and the learning rate (docs/cache.md)"
            )
        return summary


def _check_options(cfg, latent_dtype, latent_mode, ref_inputs, shard_size, batch_size) -> str:
    """Validate build options; return the resolved latent dtype name."""
    if latent_dtype == "auto":
        latent_dtype = "fp16" if cfg.precision == "fp32" else cfg.precision
    if latent_dtype not in LATENT_DTYPES:
        raise ValueError(
            f"latent_dtype: one of {list(LATENT_DTYPES)} or auto, got {latent_dtype!r}"
        )
    if latent_mode not in ("auto", "variants", "epochs"):
        raise ValueError(f"latent_mode: auto, variants or epochs, got {latent_mode!r}")
    if ref_inputs not in ("auto", "cache", "live"):
        raise ValueError(f"ref_inputs: auto, cache or live, got {ref_inputs!r}")
    if latent_mode == "variants" and cfg.random_crop:
        raise CacheError(
            "latent_mode variants stores center crops, but the config has random_crop: true; "
            "use --latent_mode epochs (the drawn crops per epoch) or random_crop: false"
        )
    if shard_size < 1 or batch_size < 1:
        raise ValueError("shard_size and batch_size must be ≥ 1")
    return latent_dtype


def _plan_sections(
    cfg, model, what, view, n, captions, shard_size, batch_size, latent_dtype, latent_mode,
    ref_inputs,
) -> dict:  # fmt: skip
    """{section: {"fingerprint", "layout"}} of the sections to build (+ "_latent_shape")."""
    from .models import null_embedding

    mid, did = model_identity(cfg), data_identity(cfg)
    dtype = PRECISION_DTYPES[cfg.precision]
    side = cfg.resolution // model.latent_scale
    latent_shape = [model.in_channels, side, side]
    pixel = model.vae is None
    plan: dict = {"_latent_shape": latent_shape}
    common = {"num_pairs": n, "shard_size": shard_size, "batch_size": batch_size}
    if "latents" in what:
        mode = latent_mode if latent_mode != "auto" else "epochs" if cfg.random_crop else "variants"
        layout = {
            **common,
            "mode": mode,
            "variants": (2 if cfg.random_flip else 1) if mode == "variants" else 1,
            "dtype": "uint8" if pixel else DTYPE_NAMES[LATENT_DTYPES[latent_dtype]],
            "lossless": pixel or LATENT_DTYPES[latent_dtype] == dtype,
            "pixel_space": pixel,
            "family": model.family,
            "latent_shape": latent_shape,
            "num_shards": math.ceil(n / shard_size),
        }
        fp = section_fingerprint("latents", cfg, layout, mid, did)
        plan["latents"] = {"fingerprint": fp, "layout": layout}
    if "text" in what:
        n_unique = len({c for c in captions if c is not None})
        e = null_embedding(model)
        layout = {
            **common,
            "num_prompts": n_unique,
            "num_shards": math.ceil(n_unique / shard_size),
            "dtype": DTYPE_NAMES[dtype],
            "pooled": e.pooled is not None,
            "embed_shape": list(e.embeds.shape[1:]),
            "family": model.family,
        }
        plan["text"] = {
            "fingerprint": section_fingerprint("text", cfg, {}, mid, did),
            "layout": layout,
        }
    if "ref" in what:
        cached = all(s in view["sections"] or s in what for s in ("latents", "text"))
        inputs = ref_inputs if ref_inputs != "auto" else ("cache" if cached else "live")
        if inputs == "cache" and not cached:
            raise CacheError(
                "ref_inputs cache: the cache has no latents/text to compute reference errors "
                "from; add --what latents,text,ref or use --ref_inputs live"
            )
        layout = {
            **common,
            "inputs": inputs,
            "num_shards": math.ceil(n / shard_size),
            "latent_shape": latent_shape,
        }
        if inputs == "cache":  # bind the errors to the exact cached inputs
            probe = {s: plan.get(s) or view["sections"][s] for s in ("latents", "text")}
            layout["inputs_digest"] = _inputs_digest({"sections": probe})
        fp = section_fingerprint("ref", cfg, layout, mid, did)
        plan["ref"] = {"fingerprint": fp, "layout": layout}
    return plan


def _reconcile(out: Path, view: dict, plan: dict, *, overwrite: bool, rank: int, independent: bool):
    """Refuse to mix shards of differently built sections (or drop the old ones: overwrite)."""
    for name in [k for k in plan if not k.startswith("_")]:
        cur = view["sections"].get(name)
        if cur is None:
            continue
        diffs = diff_fields(
            cur["fingerprint"], plan[name]["fingerprint"], "the cache", "this build"
        )
        diffs += diff_fields(cur["layout"], plan[name]["layout"], "the cache", "this build")
        if not diffs:
            continue
        if not overwrite:
            raise CacheMismatchError(
                f"{out} already holds {SECTION_LABEL[name]} built differently: "
                + "; ".join(diffs)
                + ". Use another --out, or --overwrite to replace them."
            )
        if independent:
            raise CacheError("--overwrite needs a single process or a torch.distributed launch")
        if rank == 0:
            shutil.rmtree(out / name, ignore_errors=True)
            m = load_manifest(out)
            if m is not None and name in m["sections"]:
                del m["sections"][name]
                write_manifest(out, m)
        del view["sections"][name]
    _barrier()


# --------------------------------------------------------------------------------------------
# CLI
_OPTS = {
    "--out": str,
    "--epochs": str,
    "--train_world": int,
    "--what": str,
    "--shard_size": int,
    "--batch_size": int,
    "--latent_dtype": str,
    "--latent_mode": str,
    "--ref_inputs": str,
    "--rank": int,
    "--world": int,
    "--num_workers": int,
    "--verify": str,
    "--merge": str,
    "--info": str,
}
_FLAGS = ("--overwrite", "--repair", "--quiet")


def _split_args(argv: list[str]) -> tuple[dict, list[str]]:
    mine: dict = {}
    rest: list[str] = []
    i = 0
    while i < len(argv):
        arg = argv[i]
        key, eq, value = arg.partition("=")
        key = key.replace("-", "_").replace("__", "--", 1) if key.startswith("--") else key
        if key in _FLAGS:
            mine[key[2:]] = True
        elif key in _OPTS:
            if not eq:
                if i + 1 >= len(argv):
                    raise SystemExit(f"snpo cache: {key} needs a value")
                value = argv[i + 1]
                i += 1
            try:
                mine[key[2:]] = _OPTS[key](value)
            except ValueError as err:
                raise SystemExit(
                    f"snpo cache: {key} expects {_OPTS[key].__name__}, got {value!r}"
                ) from err
        else:
            rest.append(arg)
        i += 1
    return mine, rest


def describe(root: str | Path) -> str:
    """A human-readable summary of the cache in ``root`` (snpo cache --info)."""
    root = Path(root)
    view = merged_view(root)
    lines = [f"cache {root}"]
    for name, sec in sorted(view["sections"].items()):
        size = sum(e["bytes"] for e in sec["shards"].values())
        lines.append(
            f"  {name}: {len(sec['shards'])} shard(s), {size / 2**20:.1f} MiB; layout "
            + json.dumps(sec["layout"], sort_keys=True)
        )
        if name in ("ref", "latents"):
            c = Cache(root, view, seed=0, verify="none")
            eps = c.epochs if name == "ref" else c.latent_epochs
            if eps is not None:
                lines.append(f"    complete: {_span(eps)}")
        lines.append("    fingerprint " + json.dumps(sec["fingerprint"], sort_keys=True))
    if journal_paths(root):
        lines.append(f"  {len(journal_paths(root))} unmerged rank journal(s): snpo cache --merge")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    """``snpo cache`` (see the module docstring). Exit codes: 0 done, 1 verification found
    problems, 2 bad configuration, data or cache."""
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or any(a in ("-h", "--help") for a in argv):
        print(__doc__)
        return 0
    from .config import ConfigError, load_config
    from .data import DataError

    try:
        opts, rest = _split_args(argv)
    except SystemExit as err:
        print(err, file=sys.stderr)
        return 2
    try:
        if "verify" in opts:
            problems, notes = verify_cache(opts["verify"], repair=opts.get("repair", False))
            for note in notes:
                print(f"note: {note}")
            for p in problems:
                print(f"corrupt: {p}", file=sys.stderr)
            if opts.get("repair") and problems:
                print("the bad shards were dropped; rerun snpo cache to rebuild them")
            if not problems:
                print(f"snpo cache: {opts['verify']}: every shard matches its SHA-256")
            return 1 if problems else 0
        if "merge" in opts:
            view = merge_parts(opts["merge"])
            n = sum(len(s["shards"]) for s in view["sections"].values())
            print(f"snpo cache: merged; the manifest lists {n} shard(s)")
            return 0
        if "info" in opts:
            print(describe(opts["info"]))
            return 0
        cfg = load_config(None, rest)
        out = opts.get("out") or getattr(cfg, "cache_dir", None)
        if not out:
            raise ConfigError("--out: the cache folder is required")
        what = [w.strip() for w in opts.get("what", ",".join(SECTIONS)).split(",") if w.strip()]
        bad = [w for w in what if w not in SECTIONS]
        if bad:
            raise ConfigError(f"--what: unknown section(s) {bad}; choose from {SECTIONS}")
        ep = opts.get("epochs", "auto")
        epochs = None if ep == "auto" else int(ep)
        started = _init_distributed(cfg, opts)
        try:
            summary = build_cache(
                cfg,
                out,
                what=what,
                epochs=epochs,
                train_world=opts.get("train_world", 1),
                shard_size=opts.get("shard_size", DEFAULT_SHARD_SIZE),
                batch_size=opts.get("batch_size", DEFAULT_BATCH_SIZE),
                latent_dtype=opts.get("latent_dtype", "auto"),
                latent_mode=opts.get("latent_mode", "auto"),
                ref_inputs=opts.get("ref_inputs", "auto"),
                rank=opts.get("rank"),
                world=opts.get("world"),
                overwrite=opts.get("overwrite", False),
                num_workers=opts.get("num_workers"),
                verbose=not opts.get("quiet", False),
            )
        finally:
            if started:
                torch.distributed.destroy_process_group()
        if summary and int(os.environ.get("RANK", "0")) == 0 and not opts.get("quiet"):
            print(json.dumps(summary))
        return 0
    except (ConfigError, DataError, CacheError, FolderLocked, ValueError) as err:
        print(f"snpo cache: {type(err).__name__}: {err}", file=sys.stderr)
        return 2


def _init_distributed(cfg, opts: dict) -> bool:
    """Join the process group of a torchrun / deepspeed launch (gloo on the CPU)."""
    import datetime

    if "rank" in opts or int(os.environ.get("WORLD_SIZE", "1")) <= 1:
        return False
    import torch.distributed as dist

    if dist.is_initialized():
        return False
    cuda = cfg.device != "cpu" and torch.cuda.is_available()
    if cuda:
        torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")))
    dist.init_process_group(backend="nccl" if cuda else "gloo", timeout=datetime.timedelta(hours=6))
    return True


if __name__ == "__main__":
    with contextlib.suppress(BrokenPipeError):
        sys.exit(main())
