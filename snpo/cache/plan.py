"""What a build will make: its options checked, the fingerprint and layout of every section to
build (:func:`plan_sections`), and their reconciliation with the sections the folder already
holds (:func:`reconcile`)."""

from __future__ import annotations

import math
import shutil
from pathlib import Path

from snpo.cache.identity import (
    bucket_identity,
    data_identity,
    inputs_digest,
    model_identity,
    section_fingerprint,
)
from snpo.cache.ranks import barrier
from snpo.cache.sections import SECTION_LABEL
from snpo.cache.store import (
    CacheError,
    CacheMismatchError,
    diff_fields,
    load_manifest,
    write_manifest,
)
from snpo.precision import dtype_name, dtype_of

__all__ = ["LATENT_STORAGE", "check_options", "plan_sections", "reconcile"]

LATENT_STORAGE = ("fp16", "bf16", "fp32")  # the --latent_dtype choices besides auto


def check_options(
    cfg, latent_dtype: str, latent_mode: str, ref_inputs: str, shard_size: int, batch_size: int
) -> str:
    """Validate the build options (see :func:`snpo.cache.build_cache`); return the latent
    storage name with "auto" resolved (fp16 for fp32 runs, else the training precision)."""
    if latent_dtype == "auto":
        latent_dtype = "fp16" if cfg.precision == "fp32" else cfg.precision
    if latent_dtype not in LATENT_STORAGE:
        raise ValueError(
            f"latent_dtype: one of {list(LATENT_STORAGE)} or auto, got {latent_dtype!r}"
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


def plan_sections(
    cfg,
    model,
    what: list[str],
    view: dict,
    n: int,
    captions: list[str | None] | None,
    shard_size: int,
    batch_size: int,
    latent_dtype: str,
    latent_mode: str,
    ref_inputs: str,
    buckets: dict | None = None,
) -> dict:
    """{section: {"fingerprint", "layout"}} of the sections in ``what`` for ``n`` pairs, plus
    "_latent_shape" [C, h, w]; ``view``: what the folder holds (ref inputs may come from it);
    ``buckets``: the :func:`snpo.data.order.bucket_options` of a ``resolution_buckets`` run
    (the latents/ref layouts list the buckets, their fingerprints the bucket identity)."""
    from snpo.models import null_embedding

    mid, did = model_identity(cfg), data_identity(cfg)
    dtype = dtype_of(cfg.precision)
    side = cfg.resolution // model.latent_scale
    latent_shape = [model.in_channels, side, side]
    pixel = model.vae is None
    plan: dict = {"_latent_shape": latent_shape}
    common = {"num_pairs": n, "shard_size": shard_size, "batch_size": batch_size}
    bid = None
    per_pair: dict = {}  # layout fields of bucketed latents / ref (none for square caches)
    if buckets is not None:
        bid = bucket_identity(cfg, buckets["bucket_sizes"], buckets["buckets"])
        per_pair = {"buckets": bid["sizes"]}
    if "latents" in what:
        mode = latent_mode if latent_mode != "auto" else "epochs" if cfg.random_crop else "variants"
        layout = {
            **common,
            "mode": mode,
            "variants": (2 if cfg.random_flip else 1) if mode == "variants" else 1,
            "dtype": "uint8" if pixel else dtype_name(dtype_of(latent_dtype)),
            "lossless": pixel or dtype_of(latent_dtype) == dtype,
            "pixel_space": pixel,
            "family": model.family,
            "latent_shape": latent_shape,
            "num_shards": math.ceil(n / shard_size),
            **per_pair,
        }
        fp = section_fingerprint("latents", cfg, layout, mid, did, bid)
        plan["latents"] = {"fingerprint": fp, "layout": layout}
    if "text" in what:
        n_unique = len({c for c in captions if c is not None})
        e = null_embedding(model)
        layout = {
            **common,
            "num_prompts": n_unique,
            "num_shards": math.ceil(n_unique / shard_size),
            "dtype": dtype_name(dtype),
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
            **per_pair,
        }
        if inputs == "cache":  # bind the errors to the exact cached inputs
            probe = {s: plan.get(s) or view["sections"][s] for s in ("latents", "text")}
            layout["inputs_digest"] = inputs_digest({"sections": probe})
        fp = section_fingerprint("ref", cfg, layout, mid, did, bid)
        plan["ref"] = {"fingerprint": fp, "layout": layout}
    return plan


def reconcile(
    out: Path, view: dict, plan: dict, *, overwrite: bool, rank: int, independent: bool
) -> None:
    """Refuse to mix shards of differently built sections: CacheMismatchError naming the
    differing fields, or with ``overwrite`` drop the old section (rank 0; not for independent
    ranks) from the folder, the manifest and ``view``."""
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
    barrier()
