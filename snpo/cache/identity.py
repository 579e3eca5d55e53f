"""What a cache depends on, as comparable fields: behavioural versions of the draw schedule and
the image transform, the identity of the model's components and of the training data, and the
per-section fingerprints built from them.

A fingerprint is a flat-ish dict compared field by field with the one a config gives
(:func:`snpo.cache.store.diff_fields`), so a refusal names the differing field
(``data[0].label_0``, ``seed``, ``unet_weights`` ...).
"""

from __future__ import annotations

import contextlib
import dataclasses
import functools
import hashlib
import json
import os
import re
from pathlib import Path
from types import SimpleNamespace

from snpo.cache.store import CacheError, sha256_file

__all__ = [
    "bucket_identity",
    "component_hash",
    "data_identity",
    "draws_version",
    "flow_draws_version",
    "flow_options",
    "inputs_digest",
    "model_folder",
    "model_identity",
    "section_fingerprint",
    "transform_version",
]


# PairDraws fields only flow families read: kept out of draws_version (whose value predates them,
# so the caches of ε-families stay valid) and hashed by flow_draws_version instead
FLOW_DRAW_FIELDS = ("u",)


def _probe_draws():
    """The draws the version probes hash (fixed seed, epoch, indices and a (2, 3, 3) shape)."""
    from snpo.draws import pair_draws

    sched = SimpleNamespace(config=SimpleNamespace(num_train_timesteps=1000))
    return pair_draws(1234567, 3, [0, 5, 4099], (2, 3, 3), sched, 0.5)


@functools.lru_cache(maxsize=1)
def draws_version() -> str:
    """SHA-256 of a probe of :func:`snpo.draws.pair_draws` (every field but
    :data:`FLOW_DRAW_FIELDS`) and ``epoch_permutation``: changes whenever the draw schedule (or
    torch's CPU generator) would give other draws. The flow draw ``u`` is drawn after the
    others from the same generator, so adding it left this value as it was."""
    from snpo.draws import epoch_permutation

    d = _probe_draws()
    h = hashlib.sha256()
    for f in dataclasses.fields(d):
        if f.name not in FLOW_DRAW_FIELDS:
            h.update(getattr(d, f.name).contiguous().numpy().tobytes())
    h.update(epoch_permutation(1234567, 3, 37).numpy().tobytes())
    return "sha256:" + h.hexdigest()


@functools.lru_cache(maxsize=1)
def flow_draws_version() -> str:
    """SHA-256 of the probe's :data:`FLOW_DRAW_FIELDS` (the flow level draws ``u``): part of
    the reference-error fingerprint of flow families only."""
    d = _probe_draws()
    h = hashlib.sha256()
    for name in FLOW_DRAW_FIELDS:
        h.update(getattr(d, name).contiguous().numpy().tobytes())
    return "sha256:" + h.hexdigest()


@functools.lru_cache(maxsize=1)
def transform_version() -> str:
    """SHA-256 of a probe of :func:`snpo.data.transform_image` (resize, crops, flips)."""
    from snpo.data import decode_image, image_bytes, transform_image

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
# model identity
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
    fam = _family(str(root), index)
    texts = [
        root / f"{kind}{n}" for n in ("", "_2", "_3") for kind in ("text_encoder", "tokenizer")
    ]
    sched_file = root / "scheduler" / "scheduler_config.json"
    sched = json.loads(sched_file.read_text()) if sched_file.is_file() else {}
    return {
        "family": fam.name,
        f"{fam.denoiser}_weights": component_hash([root / fam.denoiser], variant),
        "vae_weights": (
            component_hash([root / "vae"], variant) if "vae" in parts else "none (pixel space)"
        ),
        "text_encoder_weights": component_hash([p for p in texts if p.is_dir()], variant),
        "scheduler": {k: v for k, v in sorted(sched.items()) if not k.startswith("_")},
        "null_kind": fam.null_kind(index),
    }


def _family(root: str, index: dict):
    """The model family of a folder (:func:`snpo.models.detect_family`); a folder no family
    recognises is hashed as SD1.5-class (loading it will say what is wrong)."""
    from snpo.models import ModelLoadError, detect_family, get_family

    try:
        return get_family(detect_family(root, index))
    except ModelLoadError:
        return get_family("sd")


def model_identity(cfg) -> dict:
    """Hashes of the denoiser (the reference: ``unet/`` or ``transformer/``, as the family
    says), VAE and text encoders + tokenizers of ``cfg.model``, its family, scheduler config
    and null-embedding kind. File hashes are memoised per process by (path, size, mtime)."""
    return _model_identity(cfg.model, cfg.revision, cfg.variant)


# --------------------------------------------------------------------------------------------
# data identity
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

    from snpo.data import DataError

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
    from snpo.config import expand_data_files

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
# section fingerprints
def bucket_identity(cfg, sizes, ids) -> dict | None:
    """The ``resolution_buckets`` fields of the latents / ref fingerprints: the setting, the
    resolved bucket list [[w, h], ...] and a SHA-256 of every pair's bucket id (None without
    buckets, so square caches keep their fingerprints). ``sizes``/``ids`` None: not resolved
    yet (a reader fills them from the cache and checks them once the run has its order,
    :meth:`snpo.cache.Cache.check_buckets`)."""
    if getattr(cfg, "resolution_buckets", None) is None:
        return None
    import numpy as np

    out = {
        "setting": cfg.resolution_buckets,
        "sizes": None if sizes is None else [[int(w), int(h)] for w, h in sizes],
        "assignment": None,
    }
    if ids is not None:
        a = np.asarray(ids, dtype=np.int64)
        out["assignment"] = "sha256:" + hashlib.sha256(a.tobytes()).hexdigest()
    return out


def section_fingerprint(
    name: str, cfg, layout: dict, mid: dict, did: list[dict], buckets: dict | None = None
) -> dict:
    """The config-derived fields a section depends on (compared field by field); ``buckets``:
    :func:`bucket_identity` (latents and ref of a ``resolution_buckets`` run only)."""
    if buckets is None:
        buckets = bucket_identity(cfg, None, None)
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
        if buckets is not None:
            fp["resolution_buckets"] = buckets
        return fp
    if name == "ref":
        denoiser = "unet_weights" if "unet_weights" in mid else "transformer_weights"
        fp = {
            **common,
            **image,
            **_flow_fields(cfg, mid),
            denoiser: mid[denoiser],
            "text_encoder_weights": mid["text_encoder_weights"],
            "null_kind": mid["null_kind"],
            "scheduler": mid["scheduler"],
            "seed": cfg.seed,
            "uncond_prob": cfg.uncond_prob,
            "draws_version": draws_version(),
        }
        if buckets is not None:
            fp["resolution_buckets"] = buckets
        return fp
    raise ValueError(f"unknown cache section {name!r}")


# the σ-sampler parameters each sampler reads (snpo.models.flow.sample_sigma)
_SAMPLER_FIELDS = {
    "logit_normal": ("flow_logit_mean", "flow_logit_std"),
    "uniform": (),
    "mode": ("flow_mode_scale",),
}


def flow_options(cfg) -> dict:
    """The options σ = σ(u) depends on: ``flow_sigma_sampler``, the parameters of that sampler
    only (a logit-normal run does not read ``flow_mode_scale``), and ``flow_shift`` (None: the
    scheduler's static shift, which the fingerprint's ``scheduler`` covers)."""
    sampler = cfg.flow_sigma_sampler
    out = {"flow_sigma_sampler": sampler}
    out.update({k: getattr(cfg, k) for k in _SAMPLER_FIELDS.get(sampler, ())})
    out["flow_shift"] = cfg.flow_shift
    return out


def _flow_fields(cfg, mid: dict) -> dict:
    """Flow-matching families: the σ-sampling options (x_t, and so e_ref, depend on σ), the
    version of the u draws, and the embedded guidance of guidance-distilled families; nothing
    for ε-families (their fingerprints stay as they were)."""
    from snpo.models import get_family

    family = get_family(mid["family"])
    if not family.flow:
        return {}
    out = {"flow": flow_options(cfg), "flow_draws_version": flow_draws_version()}
    if not family.has_null_branch:
        out["guidance_scale"] = cfg.guidance_scale
    return out


def inputs_digest(view: dict) -> str:
    """SHA-256 of the fingerprints and layouts of the latents and text sections of ``view``:
    the identity of the inputs reference errors computed from the cache saw."""
    secs = view["sections"]
    ident = [[secs[n]["fingerprint"], secs[n]["layout"]] for n in ("latents", "text")]
    return "sha256:" + hashlib.sha256(json.dumps(ident, sort_keys=True).encode()).hexdigest()
