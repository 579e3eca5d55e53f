"""What a build reads from the training data: the prompt of every pair (:func:`captions`) and
every pair's images transformed as the trainer would see them (:class:`ImageItems`)."""

from __future__ import annotations

import torch

__all__ = ["ImageItems", "captions", "list_collate"]


def captions(source) -> list[str | None]:
    """The prompt of every pair of a pair source (:func:`snpo.data.open_source`), as
    ``source.get(i)[0]`` returns it (None for an unreadable record), read without touching
    image bytes where the source allows (Pick-a-Pic parquet: the caption column only)."""
    subs = getattr(source, "sources", None)
    if subs is None:
        return _captions_one(source, len(source))
    out: list[str] = []
    offs = source.offsets
    for j, s in enumerate(subs):
        out.extend(_captions_one(s, offs[j + 1] - offs[j]))
    return out


def _captions_one(s, n: int) -> list[str | None]:
    from snpo.data import PickapicParquet

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


class ImageItems(torch.utils.data.Dataset):
    """Pair index i → the images the trainer would see, in every stored variant: a dict with
    "index"; "x" (2, V, 3, r, r) float32 in [-1, 1] (winner, loser × variant); "size", "crop"
    (2, V, 2) int32 (original size, crop top-left); "valid" [bool, bool]; "bad" (None or why).

    Mirrors :class:`snpo.data.PairDataset` (same decode_image / transform_image calls, same
    bad-image rules and messages) but decodes winner and loser independently (per-image
    validity, so sft runs can use pairs whose loser is bad) and transforms each image once per
    variant: variants mode → flip False/True with the center crop; epochs mode → the (crop,
    flip) that :func:`snpo.draws.augment_draws` gives for (seed, epoch, index).

    ``buckets`` ({"buckets": (n,) ids, "bucket_sizes": [(w, h)]}, ``resolution_buckets``):
    each pair is transformed to its bucket as :class:`snpo.data.PairDataset` does for a
    bucket key (:func:`snpo.data.transform.transform_to_bucket`, the winner's crop fraction for
    both images): "x" is (2, V, 3, h, w) of the pair's bucket."""

    def __init__(self, source, cfg, mode: str, variants: int, epoch: int | None, buckets=None):
        self.source, self.mode, self.variants = source, mode, variants
        self.buckets = buckets
        self.epoch = epoch
        self.resolution, self.seed = cfg.resolution, cfg.seed
        self.random_crop, self.random_flip = cfg.random_crop, cfg.random_flip
        self.on_bad_image = cfg.on_bad_image

    def __len__(self) -> int:
        return len(self.source)

    def _bad(self, i: int, why: str) -> str:
        from snpo.data import BadImageError

        where = self.source.describe(i)
        if self.on_bad_image == "fail":
            raise BadImageError(f"bad image in {where}: {why} (on_bad_image: fail)")
        return f"{where}: {why}"

    def __getitem__(self, i: int) -> dict:
        from snpo.data import decode_image, transform_image
        from snpo.data.transform import transform_to_bucket
        from snpo.draws import augment_draws

        v_n, r = self.variants, self.resolution
        bucket = None
        if self.buckets is not None:
            bucket = tuple(self.buckets["bucket_sizes"][int(self.buckets["buckets"][i])])
        hw = (r, r) if bucket is None else (bucket[1], bucket[0])
        item = {
            "index": i,
            "x": torch.zeros(2, v_n, 3, *hw),
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
                if bucket is not None:  # as PairDataset: the winner's fraction for both
                    fb = aug.crop[0] if aug is not None and rc else None
                    x, size, crop = transform_to_bucket(im, bucket, flip=flip, crop_fraction=fb)
                else:
                    x, size, crop = transform_image(
                        im, r, random_crop=rc, flip=flip, crop_fraction=frac
                    )
                item["x"][j, v] = x
                item["size"][j, v] = torch.tensor(size, dtype=torch.int32)
                item["crop"][j, v] = torch.tensor(crop, dtype=torch.int32)
            item["valid"][j] = True
        return item


def list_collate(items: list) -> list:
    """A DataLoader collate_fn that keeps the items as a list."""
    return items
