"""The pair dataset: (epoch, pair index) → a decoded, transformed pair, and its collation.

All random choices of a pair (crop, flip) come from :func:`snpo.draws.augment_draws` keyed by
(seed, epoch, pair index), so the data a step sees depends on neither the number of workers
nor the world size nor on resuming. A key (epoch, index, (w, h)) — the order's keys with
``resolution_buckets`` — transforms the pair to that bucket (:func:`transform_to_bucket`).
A pair with a bad image (:mod:`snpo.data.decode`) is counted and skipped
(``on_bad_image: skip``) or raises :class:`BadImageError` naming the pair, row and file
(``fail``).

With ``num_frames`` F > 1 each image is an animated clip (:mod:`snpo.data.video`): F frames,
one transform (crop, flip) per clip → pixels (2|1, 3, F, R, R); too few frames make the pair bad.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from snpo.data.decode import BadImageError, decode_image
from snpo.data.transform import transform_image, transform_to_bucket
from snpo.data.video import decode_clip, transform_clip
from snpo.draws import augment_draws


class PairDataset(torch.utils.data.Dataset):
    """Map-style dataset keyed by (epoch, pair index) → a decoded, transformed pair.

    Item: {"index", "epoch", "pixels" (2|1, 3, R, R) (a bucket (w, h): (2|1, 3, h, w); clips,
    ``num_frames`` F > 1: (2|1, 3, F, R, R)),
    "prompt", "original_size" (2|1, 2),
    "crop_top_left" (2|1, 2), "bad": None} or {"index", "epoch", "bad": reason} for a bad pair.
    ``winners_only`` (the sft objective) decodes the winner alone.
    """

    def __init__(
        self,
        source,
        *,
        resolution: int,
        seed: int,
        random_crop: bool = False,
        random_flip: bool = True,
        on_bad_image: str = "skip",
        winners_only: bool = False,
        num_frames: int = 1,
    ) -> None:
        self.source = source
        self.resolution = resolution
        self.seed = seed
        self.random_crop = random_crop
        self.random_flip = random_flip
        self.on_bad_image = on_bad_image
        self.winners_only = winners_only
        self.num_frames = num_frames

    def __len__(self) -> int:
        return len(self.source)

    def __getitem__(self, key: tuple) -> dict:
        epoch, index = key[0], key[1]
        bucket = key[2] if len(key) > 2 else None  # (w, h) of resolution_buckets
        try:
            prompt, win, lose = self.source.get(index)
        except (OSError, ValueError, KeyError) as err:
            return self._bad(epoch, index, f"unreadable record: {err}")
        aug = augment_draws(self.seed, epoch, index)
        images = [win] if self.winners_only else [win, lose]
        xs, sizes, crops = [], [], []
        for j, data in enumerate(images):
            try:
                f = self.num_frames
                im = decode_image(data) if f == 1 else decode_clip(data, f)
            except BadImageError as err:
                which = "winner" if j == 0 else "loser"
                return self._bad(epoch, index, f"{which} image: {type(err).__name__}: {err}")
            flip = self.random_flip and bool(aug.flip[j])
            if self.num_frames > 1:  # the image transforms below, one for all frames of a clip
                if bucket is not None:
                    fraction = aug.crop[0] if self.random_crop else None
                else:
                    fraction = aug.crop[j]
                x, size, crop = transform_clip(
                    im,
                    self.resolution,
                    random_crop=self.random_crop,
                    flip=flip,
                    crop_fraction=fraction,
                    bucket=bucket,
                )
            elif bucket is not None:  # one crop fraction for the pair: the winner's
                x, size, crop = transform_to_bucket(
                    im, bucket, flip=flip, crop_fraction=aug.crop[0] if self.random_crop else None
                )
            else:
                x, size, crop = transform_image(
                    im,
                    self.resolution,
                    random_crop=self.random_crop,
                    flip=flip,
                    crop_fraction=aug.crop[j],
                )
            xs.append(x)
            sizes.append(size)
            crops.append(crop)
        return {
            "index": index,
            "epoch": epoch,
            "pixels": torch.stack(xs),
            "prompt": prompt,
            "original_size": torch.tensor(sizes, dtype=torch.long),
            "crop_top_left": torch.tensor(crops, dtype=torch.long),
            "bad": None,
        }

    def _bad(self, epoch: int, index: int, reason: str) -> dict:
        where = self.source.describe(index)
        if self.on_bad_image == "fail":
            raise BadImageError(f"bad image in {where}: {reason} (on_bad_image: fail)")
        return {"index": index, "epoch": epoch, "bad": f"{where}: {reason}"}


@dataclass
class PairBatch:
    """A collated micro-batch of P good pairs (P may be 0 when every pair was bad).

    pixels: (P, 2|1, 3, R, R) (clips: (P, 2|1, 3, F, R, R)); original_size, crop_top_left: (P, 2|1, 2); bad: [(index, why)]."""

    indices: torch.Tensor
    epoch: int
    pixels: torch.Tensor
    prompts: list[str]
    original_size: torch.Tensor
    crop_top_left: torch.Tensor
    bad: list[tuple[int, str]]
    bucket: tuple[int, int] | None = None  # (w, h) of pixel-less batches (cached latents)

    def __len__(self) -> int:
        return self.indices.shape[0]


def collate_pairs(items: list[dict]) -> PairBatch:
    """:class:`PairDataset` items → one :class:`PairBatch` of the good ones (bad ones listed)."""
    good = [it for it in items if it["bad"] is None]
    bad = [(it["index"], it["bad"]) for it in items if it["bad"] is not None]
    epoch = items[0]["epoch"] if items else 0
    if not good:
        return PairBatch(
            torch.zeros(0, dtype=torch.long),
            epoch,
            torch.zeros(0),
            [],
            torch.zeros(0, 2, 2, dtype=torch.long),
            torch.zeros(0, 2, 2, dtype=torch.long),
            bad,
        )
    return PairBatch(
        indices=torch.tensor([it["index"] for it in good], dtype=torch.long),
        epoch=epoch,
        pixels=torch.stack([it["pixels"] for it in good]),
        prompts=[it["prompt"] for it in good],
        original_size=torch.stack([it["original_size"] for it in good]),
        crop_top_left=torch.stack([it["crop_top_left"] for it in good]),
        bad=bad,
    )
