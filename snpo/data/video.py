"""Video clips for training: an animated image (GIF, animated WebP, APNG) → F frames → one
transformed clip (3, F, R, R) in [-1, 1].

Decoding (:func:`decode_clip`) reads the file's frames with ``PIL.ImageSequence`` (no other
dependency) and keeps F of its n frames:

- n ≥ F: the F evenly spaced frames at indices ⌊i·(n − 1)/(F − 1) + ½⌋, i = 0 … F − 1 (the first
  and the last frame always; n = F keeps every frame; F = 1 keeps frame 0) —
  :func:`frame_indices`;
- n < F (a still image is n = 1): a :class:`ClipTooShortError`, a bad image, so the pair is bad
  (``on_bad_image``: skipped and counted, or the run fails naming it), exactly as an
  undecodable image.

Every kept frame is converted to RGB as :func:`snpo.data.decode.decode_image` converts images
(palette frames with a transparency key go through RGBA; alpha is dropped). GIF frames are
composited by PIL (disposal, partial frames), so frame k is the picture shown at step k.

The pixel cap is **per frame**, the image rule unchanged: the header's width × height must not
exceed :data:`snpo.data.decode.MAX_IMAGE_PIXELS` (checked before any pixel is decoded; all
frames of an animated file share the canvas size). A file may hold at most
:data:`MAX_CLIP_FRAMES` frames, so that a tiny file claiming millions of frames cannot make the
decoder run for ever. The F kept frames stay in memory at the file's size until they are
transformed (F × w × h × 3 bytes).

Transform (:func:`transform_clip`): the image transform of :mod:`snpo.data.transform` — resize the
shorter side, center or random crop, optional horizontal flip (or a ``resolution_buckets``
bucket) — with **one** set of parameters (crop fraction, flip) for all frames of a clip, so
the clip moves as one: frames that are equal before stay equal after, and a flip flips all.
The (original size, crop) returned are those of the clip (every frame has the same).
"""

from __future__ import annotations

import io
from collections.abc import Sequence

import torch
from PIL import Image, ImageSequence

from snpo.data.decode import BadImageError, ImageTooLargeError, _open, _to_rgb
from snpo.data.transform import transform_image, transform_to_bucket

MAX_CLIP_FRAMES = 4096  # frames an animated file may hold (a 2.7-minute clip at 25 fps)


class ClipTooShortError(BadImageError):
    """An animated image with fewer frames than ``num_frames`` (a still image has one)."""


def frame_indices(n: int, num_frames: int) -> list[int]:
    """The F = ``num_frames`` frame indices kept of a clip of ``n`` ≥ F frames: evenly spaced,
    ⌊i·(n − 1)/(F − 1) + ½⌋ (the first and last frame included; F = 1: [0])."""
    if num_frames < 1:
        raise ValueError(f"num_frames must be ≥ 1, got {num_frames}")
    if n < num_frames:
        raise ValueError(f"{n} frame(s) cannot give {num_frames}")
    if num_frames == 1:
        return [0]
    # exact integer arithmetic: ⌊(2·i·(n − 1) + (F − 1)) / (2·(F − 1))⌋
    d = num_frames - 1
    return [(2 * i * (n - 1) + d) // (2 * d) for i in range(num_frames)]


def decode_clip(
    data: object, num_frames: int, *, max_pixels: int | None = None
) -> list[Image.Image]:
    """bytes | path | PIL image | ``{"bytes": ...}`` of an animated image → ``num_frames`` RGB
    frames (the module docstring's rule). Raises :class:`BadImageError` for every bad clip
    (:class:`ClipTooShortError` for too few frames, :class:`ImageTooLargeError` over a cap),
    whatever PIL raises re-raised as one."""
    try:
        img = _open(data, max_pixels)
        n = int(getattr(img, "n_frames", 1))
        if n > MAX_CLIP_FRAMES:
            raise ImageTooLargeError(
                f"the animated image claims {n} frames, over the cap of {MAX_CLIP_FRAMES} "
                "(snpo.data.video.MAX_CLIP_FRAMES)"
            )
        if n < num_frames:
            what = "a still image (1 frame)" if n == 1 else f"an animation of {n} frames"
            raise ClipTooShortError(
                f"{what}, but num_frames {num_frames} needs an animated image (GIF, WebP, APNG) "
                f"of at least {num_frames} frames"
            )
        wanted = frame_indices(n, num_frames)
        keep = set(wanted)
        frames: dict[int, Image.Image] = {}
        for k, frame in enumerate(ImageSequence.Iterator(img)):
            if k in keep:
                frame.load()
                rgb = _to_rgb(frame)
                frames[k] = rgb.copy() if rgb is frame else rgb  # the iterator reuses `frame`
            if k >= wanted[-1]:
                break
        if len(frames) != len(keep):
            raise BadImageError(
                f"the animated image announced {n} frames but only {len(frames)} of the "
                f"{len(keep)} needed could be read"
            )
        return [frames[k] for k in wanted]
    except BadImageError:
        raise
    except Exception as err:  # noqa: BLE001 - PIL's decoders raise many kinds; all mean "bad"
        raise BadImageError(f"undecodable animated image ({type(err).__name__}: {err})") from err


def transform_clip(
    frames: Sequence[Image.Image],
    resolution: int,
    *,
    random_crop: bool,
    flip: bool,
    crop_fraction: Sequence[float] | torch.Tensor | None,
    bucket: tuple[int, int] | None = None,
) -> tuple[torch.Tensor, tuple[int, int], tuple[int, int]]:
    """RGB frames → ((3, F, R, R) float32 in [-1, 1] (a bucket (w, h): (3, F, h, w)), original
    (h, w), crop (top, left)): :func:`snpo.data.transform.transform_image` (or
    :func:`~snpo.data.transform.transform_to_bucket`) on every frame with the same parameters."""
    if not frames:
        raise ValueError("a clip needs at least one frame")
    size0 = frames[0].size
    if any(f.size != size0 for f in frames):
        raise ValueError(
            f"the frames of a clip differ in size ({sorted({f.size for f in frames})})"
        )
    xs, size, crop = [], None, None
    for f in frames:
        if bucket is not None:
            x, size, crop = transform_to_bucket(f, bucket, flip=flip, crop_fraction=crop_fraction)
        else:
            x, size, crop = transform_image(
                f, resolution, random_crop=random_crop, flip=flip, crop_fraction=crop_fraction
            )
        xs.append(x)
    return torch.stack(xs, dim=1), size, crop


def clip_bytes(frames: Sequence[Image.Image], format: str = "GIF", **save) -> bytes:  # noqa: A002
    """Encode frames as one animated file (GIF by default; WebP, PNG) — for tests and tools."""
    buf = io.BytesIO()
    first, *rest = frames
    first.save(buf, format=format, save_all=True, append_images=rest, **save)
    return buf.getvalue()


__all__ = [
    "MAX_CLIP_FRAMES",
    "ClipTooShortError",
    "clip_bytes",
    "decode_clip",
    "frame_indices",
    "transform_clip",
]
