"""The training transform of one decoded image (DiffusionDPO's ``train_transforms``).

Resize the shorter side to ``resolution`` (bilinear), crop (random, from a drawn fraction, or
center), optionally flip horizontally, and scale to [-1, 1]. Winner and loser go through it
separately, each with its own draws (:func:`snpo.draws.augment_draws`).

With ``resolution_buckets`` (:mod:`snpo.data.buckets`) :func:`transform_to_bucket` replaces
the square crop: resize to cover the pair's bucket, crop (w, h) of the bucket; winner and
loser take the same crop fraction (the winner's draw), so equal-size images get the same box.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import torch
from PIL import Image

from snpo.draws import crop_offset


def transform_image(
    im: Image.Image,
    resolution: int,
    *,
    random_crop: bool,
    flip: bool,
    crop_fraction: Sequence[float] | torch.Tensor,
) -> tuple[torch.Tensor, tuple[int, int], tuple[int, int]]:
    """RGB image → ((3, R, R) float32 in [-1, 1], original (h, w), crop (top, left)).

    ``crop_fraction`` = (top, left) fractions in [0, 1) used when ``random_crop``. The crop's
    (top, left) is in the resized image (SDXL micro-conditioning; for a flipped image, in the
    flipped image's coordinates)."""
    w, h = im.size
    short = min(w, h)
    if short != resolution:
        if w <= h:
            nw, nh = resolution, int(resolution * h / w)
        else:
            nw, nh = int(resolution * w / h), resolution
        im = im.resize((max(nw, resolution), max(nh, resolution)), Image.BILINEAR)
    rw, rh = im.size
    if random_crop:
        top = crop_offset(float(crop_fraction[0]), rh, resolution)
        left = crop_offset(float(crop_fraction[1]), rw, resolution)
    else:
        top = int(round((rh - resolution) / 2.0))
        left = int(round((rw - resolution) / 2.0))
    im = im.crop((left, top, left + resolution, top + resolution))
    if flip:  # = flip the resized image, then crop at rw - left - R (diffusers' SDXL convention)
        im = im.transpose(Image.FLIP_LEFT_RIGHT)
        left = rw - left - resolution
    x = torch.from_numpy(np.asarray(im, dtype=np.uint8).copy()).permute(2, 0, 1)
    x = x.to(torch.float32).div_(127.5).sub_(1.0)
    return x, (h, w), (top, left)


def transform_to_bucket(
    im: Image.Image,
    bucket: tuple[int, int],
    *,
    flip: bool,
    crop_fraction: Sequence[float] | torch.Tensor | None,
) -> tuple[torch.Tensor, tuple[int, int], tuple[int, int]]:
    """RGB image → ((3, bh, bw) float32 in [-1, 1], original (h, w), crop (top, left)) for a
    ``resolution_buckets`` bucket (bw, bh) = ``bucket``: resize to cover it (bilinear,
    :func:`snpo.data.buckets.cover_size`), crop it centred (``crop_fraction`` None) or at the
    fraction (:func:`snpo.data.buckets.crop_box`), optionally flip. (top, left) is in the
    resized image, for a flipped image in the flipped image's coordinates, as
    :func:`transform_image` (diffusers' SDXL training script)."""
    from snpo.data.buckets import Bucket, cover_size, crop_box

    b = Bucket(*bucket)
    w, h = im.size
    rw, rh = cover_size((w, h), b)
    if (rw, rh) != (w, h):
        im = im.resize((rw, rh), Image.BILINEAR)
    top, left = crop_box((rw, rh), b, crop_fraction)
    im = im.crop((left, top, left + b.width, top + b.height))
    if flip:
        im = im.transpose(Image.FLIP_LEFT_RIGHT)
        left = rw - left - b.width
    x = torch.from_numpy(np.asarray(im, dtype=np.uint8).copy()).permute(2, 0, 1)
    x = x.to(torch.float32).div_(127.5).sub_(1.0)
    return x, (h, w), (top, left)
