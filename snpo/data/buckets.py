"""Aspect-ratio buckets (``resolution_buckets``): which size a pair trains at, and its crop.

A bucket is a training size (w, h) in pixels, both sides multiples of the bucket step s.

- ``auto`` (:func:`auto_buckets`, kohya's ``make_bucket_resolutions``): for every width w in
  [R/2, 2R] on the step grid, h = ⌊R²/w / s⌋·s (the tallest multiple of s with w·h ≤ R²), kept
  when h ∈ [R/2, 2R]; with the transposes and the square ⌊R/s⌋·s. R is the training
  ``resolution`` (the model's native size: 512 for SD1.5, 1024 for SDXL), so every bucket has
  about R² pixels and aspect ratios up to 4:1.
- the step s (:func:`bucket_step`): the smallest multiple m the denoiser takes (VAE factor ×
  the UNet's downsampling 2^(blocks−1), or × patch × packing for transformers), rounded up to a
  multiple of 64 (kohya/SimpleTuner's ``bucket_reso_steps``) when R ≥ 256. Tiny test models
  (R < 256) use m itself.
- a pair's bucket (:func:`nearest_bucket`): the bucket whose log-aspect log(w/h) is nearest
  the pair's, the mean of its winner's and loser's log-aspects (so a pair with two images of
  one size takes that size's bucket; ties: the first bucket in :func:`auto_buckets`'s order,
  which is sorted by (w, h)).
- the crop (:func:`cover_size`, :func:`crop_box`): resize to cover the bucket keeping the
  aspect (the side that binds becomes the bucket's, the other ⌊bucket·ratio⌋ ≥ the bucket's),
  then crop the bucket — centred, or at a drawn fraction (``random_crop``). Winner and loser of
  a pair share the bucket and the crop fractions, so equal-size images get the same box.

Image sizes come from headers only (:func:`pair_bucket_ids`: ``PIL.Image.open`` is lazy).
"""

from __future__ import annotations

import math
import re
from collections.abc import Sequence
from typing import NamedTuple

import numpy as np

AUTO = "auto"


class Bucket(NamedTuple):
    """A training size in pixels: width, height."""

    width: int
    height: int

    def __str__(self) -> str:
        return f"{self.width}x{self.height}"

    @property
    def hw(self) -> tuple[int, int]:
        """(height, width): the order of tensors and SDXL's target_size."""
        return self.height, self.width


_SIZE = re.compile(r"^\s*(\d+)\s*[x×]\s*(\d+)\s*$")


def parse_buckets(value: str | Sequence[str]) -> str | list[Bucket]:
    """``"auto"``, ``"WxH,WxH"`` or a list of ``"WxH"`` → AUTO or the buckets (order kept,
    duplicates dropped). ValueError saying what is wrong."""
    if isinstance(value, str):
        if value.strip().lower() == AUTO:
            return AUTO
        items = [v for v in value.split(",") if v.strip()]
    else:
        items = [str(v) for v in value]
    if not items:
        raise ValueError("give 'auto' or at least one size WxH, e.g. [512x768, 768x512]")
    out: list[Bucket] = []
    for item in items:
        m = _SIZE.match(item)
        if not m:
            raise ValueError(f"{item!r} is not a size WxH (e.g. 768x512) nor 'auto'")
        b = Bucket(int(m.group(1)), int(m.group(2)))
        if b.width < 1 or b.height < 1:
            raise ValueError(f"{item!r}: both sides must be ≥ 1")
        if b not in out:
            out.append(b)
    return out


def bucket_step(resolution: int, multiple: int) -> int:
    """The side step of auto buckets: lcm(multiple, 64) when resolution ≥ 256, else multiple."""
    return math.lcm(int(multiple), 64) if resolution >= 256 else int(multiple)


def auto_buckets(resolution: int, step: int) -> list[Bucket]:
    """Buckets of at most R² pixels, sides in [R/2, 2R] on the grid of ``step`` (module
    docstring), sorted by (w, h). ValueError when the step leaves no bucket."""
    r, s = int(resolution), int(step)
    lo, hi = r / 2, 2 * r
    side = (r // s) * s
    out = {Bucket(side, side)} if side >= lo else set()
    w = math.ceil(lo / s) * s
    while w <= hi:
        h = min(int(r * r // w) // s * s, (hi // s) * s)
        if h >= lo:
            out.add(Bucket(w, h))
            out.add(Bucket(h, w))
        w += s
    if not out:
        raise ValueError(f"no bucket of about {r}² pixels has sides on a grid of {s}")
    return sorted(out)


def pair_log_aspect(sizes: Sequence[tuple[int, int] | None]) -> float:
    """Mean of log(w/h) over the known (w, h) sizes of a pair (0, square, when none is)."""
    known = [math.log(w / h) for s in sizes if s is not None for w, h in [s]]
    return sum(known) / len(known) if known else 0.0


def nearest_bucket(log_aspect: float, buckets: Sequence[Bucket]) -> int:
    """Index of the bucket whose log(w/h) is nearest ``log_aspect`` (first on ties)."""
    d = [abs(math.log(b.width / b.height) - log_aspect) for b in buckets]
    return int(min(range(len(buckets)), key=lambda i: (d[i], i)))


def cover_size(size: tuple[int, int], bucket: Bucket) -> tuple[int, int]:
    """(w, h) of an image resized to cover ``bucket`` keeping its aspect: the binding side
    becomes the bucket's, the other ⌊bucket side × ratio⌋ (never below the bucket's)."""
    w, h = size
    bw, bh = bucket
    if w * bh >= h * bw:  # wider than the bucket: the height binds
        return max(bw, int(bh * w / h)), bh
    return bw, max(bh, int(bw * h / w))


def crop_box(
    resized: tuple[int, int], bucket: Bucket, fraction: Sequence[float] | None
) -> tuple[int, int]:
    """(top, left) of the bucket's crop in the resized (w, h) image: centred (fraction None,
    round((side − bucket)/2), diffusers' center crop) or at fraction (top, left) ∈ [0, 1)²
    (:func:`snpo.draws.crop_offset`)."""
    from snpo.draws import crop_offset

    rw, rh = resized
    bw, bh = bucket
    if fraction is None:
        return int(round((rh - bh) / 2.0)), int(round((rw - bw) / 2.0))
    return crop_offset(float(fraction[0]), rh, bh), crop_offset(float(fraction[1]), rw, bw)


def check_buckets(buckets: Sequence[Bucket], multiple: int) -> str | None:
    """Why a bucket does not fit a denoiser taking sides that are multiples of ``multiple``,
    or None."""
    bad = [str(b) for b in buckets if b.width % multiple or b.height % multiple]
    if bad:
        return (
            f"resolution_buckets: {', '.join(bad)} not a multiple of {multiple} on both sides "
            f"(the VAE factor × the denoiser's downsampling/patch); round them to multiples of "
            f"{multiple}"
        )
    return None


def denoiser_multiple(latent_scale: int, config: dict) -> int:
    """The side multiple m in pixels a denoiser takes: VAE factor × (UNet: 2^(down blocks − 1);
    transformer: patch_size × the 2×2 packing of FLUX-like in_channels = 4C)."""
    if "down_block_types" in config:
        return int(latent_scale) * 2 ** (len(config["down_block_types"]) - 1)
    patch = int(config.get("patch_size", 1) or 1)
    return int(latent_scale) * patch


def resolve_buckets(value: str | Sequence[str], resolution: int, multiple: int) -> list[Bucket]:
    """The bucket list of a ``resolution_buckets`` value for a denoiser of side multiple m:
    auto → :func:`auto_buckets` (R, :func:`bucket_step`); a list: checked
    (:func:`check_buckets`). ValueError naming the problem."""
    parsed = parse_buckets(value)
    if parsed == AUTO:
        return auto_buckets(resolution, bucket_step(resolution, multiple))
    problem = check_buckets(parsed, multiple)
    if problem:
        raise ValueError(problem)
    return list(parsed)


# --------------------------------------------------------------------------------------------
# assignment from image headers
def header_size(data: object) -> tuple[int, int] | None:
    """(w, h) from an undecoded image's header (bytes, path, PIL image, ``{"bytes"}``), None
    when it cannot be read (the pair is reported bad later, when decoded)."""
    from snpo.data.decode import _open  # the decoder's rules (missing, type, pixel cap), no load

    try:
        return tuple(_open(data, None).size)  # type: ignore[return-value]
    except Exception:  # noqa: BLE001 - a bad image: decided when it is decoded
        return None


def pair_bucket_ids(source, buckets: Sequence[Bucket], *, progress: bool = False) -> np.ndarray:
    """(n,) int64: each pair's bucket (:func:`nearest_bucket` of both images' header sizes).
    Reads every pair's two headers once (own pairs: two file headers; parquet: each row group's
    bytes once, in file order), with a tqdm bar when ``progress``."""
    from tqdm import tqdm

    n = len(source)
    ids = np.zeros(n, dtype=np.int64)
    for i in tqdm(range(n), desc="resolution buckets", unit="pairs", disable=not progress):
        try:
            _, win, lose = source.get(i)
            sizes = [header_size(win), header_size(lose)]
        except (OSError, ValueError, KeyError):
            sizes = []
        ids[i] = nearest_bucket(pair_log_aspect(sizes), buckets)
    return ids


def histogram(ids: np.ndarray, buckets: Sequence[Bucket]) -> dict[str, int]:
    """ "WxH" → pairs, for the buckets that hold any (bucket order)."""
    counts = np.bincount(np.asarray(ids, dtype=np.int64), minlength=len(buckets))
    return {str(b): int(c) for b, c in zip(buckets, counts) if c}
