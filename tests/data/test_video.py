"""Video clips (snpo.data.video): the frame sampling rule, one transform for all frames of a
clip, too short or still images as bad pairs, the (2, 3, F, R, R) pixels of PairDataset."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from PIL import Image

from snpo.data import BadImageError, PairDataset, open_source
from snpo.data.decode import ImageTooLargeError
from snpo.data.video import (
    ClipTooShortError,
    clip_bytes,
    decode_clip,
    frame_indices,
    transform_clip,
)


def numbered_frames(n: int, size=(40, 24)) -> list[Image.Image]:
    """n frames whose red channel is the frame number × 20 (readable after GIF quantisation);
    a white square in the top-left corner marks left from right."""
    out = []
    for k in range(n):
        a = np.zeros((size[1], size[0], 3), dtype=np.uint8)
        a[..., 0] = 20 * k
        a[:6, :6] = 255
        out.append(Image.fromarray(a, "RGB"))
    return out


def frame_number(im: Image.Image) -> int:
    return int(round(float(np.asarray(im)[-1, -1, 0]) / 20.0))


def test_frame_indices_evenly_spaced_first_and_last():
    assert frame_indices(5, 5) == [0, 1, 2, 3, 4]
    assert frame_indices(9, 5) == [0, 2, 4, 6, 8]
    assert frame_indices(10, 5) == [0, 2, 5, 7, 9]  # ⌊i·9/4 + ½⌋: 0, 2.25, 4.5, 6.75, 9
    assert frame_indices(7, 1) == [0]
    for n in range(5, 40):
        idx = frame_indices(n, 5)
        assert idx[0] == 0 and idx[-1] == n - 1 and idx == sorted(set(idx))
        want = [int(np.floor(i * (n - 1) / 4 + 0.5)) for i in range(5)]
        assert idx == want
    with pytest.raises(ValueError):
        frame_indices(3, 5)


@pytest.mark.parametrize("fmt", ["GIF", "WEBP", "PNG"])
def test_decode_clip_keeps_the_sampled_frames(fmt):
    data = clip_bytes(numbered_frames(9), fmt, **({"lossless": True} if fmt == "WEBP" else {}))
    frames = decode_clip(data, 5)
    assert [frame_number(f) for f in frames] == [0, 2, 4, 6, 8]
    assert all(f.mode == "RGB" and f.size == (40, 24) for f in frames)


def test_decode_clip_from_a_path(tmp_path):
    p = tmp_path / "c.gif"
    p.write_bytes(clip_bytes(numbered_frames(5)))
    assert [frame_number(f) for f in decode_clip(str(p), 5)] == [0, 1, 2, 3, 4]


def test_too_few_frames_and_still_images_are_bad():
    with pytest.raises(ClipTooShortError, match="an animation of 3 frames.*at least 5"):
        decode_clip(clip_bytes(numbered_frames(3)), 5)
    from snpo.data import image_bytes

    with pytest.raises(ClipTooShortError, match=r"a still image \(1 frame\)"):
        decode_clip(image_bytes((10, 20, 30), (32, 32), "PNG"), 5)
    assert issubclass(ClipTooShortError, BadImageError)
    data = clip_bytes(numbered_frames(5))
    with pytest.raises(BadImageError, match="undecodable animated image.*truncated"):
        decode_clip(data[:-10], 5)  # the last frame is cut
    with pytest.raises(ClipTooShortError):
        decode_clip(data[: len(data) // 2], 5)  # PIL finds only the frames before the cut
    with pytest.raises(ImageTooLargeError):
        decode_clip(clip_bytes(numbered_frames(5)), 5, max_pixels=100)


def test_one_transform_for_all_frames():
    same = [numbered_frames(1, (48, 32))[0]] * 5
    torch_fraction = torch.tensor([0.7, 0.3], dtype=torch.float64)
    x, size, crop = transform_clip(
        same, 16, random_crop=True, flip=False, crop_fraction=torch_fraction
    )
    assert x.shape == (3, 5, 16, 16) and size == (32, 48)
    assert x.min() >= -1 and x.max() <= 1 and x.dtype == torch.float32
    for k in range(1, 5):
        assert torch.equal(x[:, k], x[:, 0])  # equal frames stay equal: one crop
    flipped, _, _ = transform_clip(
        same, 16, random_crop=True, flip=True, crop_fraction=torch_fraction
    )
    for k in range(5):
        assert torch.equal(flipped[:, k], x[:, k].flip(-1))  # a flip flips every frame
    # every frame equals the image transform of that frame with the same parameters
    from snpo.data.transform import transform_image

    frames = numbered_frames(5, (48, 32))
    x, _, _ = transform_clip(frames, 16, random_crop=False, flip=True, crop_fraction=(0.0, 0.0))
    for k, f in enumerate(frames):
        want, _, _ = transform_image(f, 16, random_crop=False, flip=True, crop_fraction=(0, 0))
        assert torch.equal(x[:, k], want)


def _pairs(tmp_path, clips: dict[str, list[Image.Image] | bytes]) -> str:
    for name, c in clips.items():
        (tmp_path / name).write_bytes(c if isinstance(c, bytes) else clip_bytes(c))
    names = list(clips)
    rows = [
        {"winner": names[i], "loser": names[i + 1], "prompt": f"clip {i}"}
        for i in range(0, len(names), 2)
    ]
    p = tmp_path / "pairs.jsonl"
    p.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return str(p)


def _source(path):
    from snpo.config import TrainConfig

    return open_source(TrainConfig(model="m", train_data=[path]))


def test_pair_dataset_returns_clips_and_bad_pairs(tmp_path):
    from snpo.data import image_bytes

    path = _pairs(
        tmp_path,
        {
            "w0.gif": numbered_frames(5, (40, 24)),
            "l0.gif": numbered_frames(9, (24, 40)),
            "w1.gif": numbered_frames(5),
            "l1.png": image_bytes((1, 2, 3), (32, 32), "PNG"),  # still: bad with F = 5
        },
    )
    src = _source(path)
    ds = PairDataset(src, resolution=16, seed=3, random_crop=True, num_frames=5)
    it = ds[(0, 0)]
    assert it["bad"] is None and it["pixels"].shape == (2, 3, 5, 16, 16)
    assert it["pixels"].min() >= -1 and it["pixels"].max() <= 1
    assert it["original_size"].tolist() == [[24, 40], [40, 24]]
    bad = ds[(0, 1)]
    assert "loser image: ClipTooShortError" in bad["bad"] and "still image" in bad["bad"]
    strict = PairDataset(src, resolution=16, seed=3, num_frames=5, on_bad_image="fail")
    with pytest.raises(BadImageError, match="still image"):
        strict[(0, 1)]
    # a resolution_buckets key (w, h): the clip is transformed to the bucket
    assert ds[(0, 0, (24, 16))]["pixels"].shape == (2, 3, 5, 16, 24)
    # F = 1 reads the first frame as an image, exactly as before
    one = PairDataset(src, resolution=16, seed=3, random_crop=True)[(0, 0)]
    assert one["pixels"].shape == (2, 3, 16, 16)
    from snpo.data import collate_pairs

    batch = collate_pairs([it, bad])
    assert batch.pixels.shape == (1, 2, 3, 5, 16, 16) and len(batch.bad) == 1


def test_pair_dataset_clip_transform_is_the_pairs_draws(tmp_path):
    """Frame k of a clip pair = the image pair (frame k, frame k) at the same pair index: the
    clip takes the pair's crop and flip draws, the same for every frame."""
    frames = numbered_frames(5, (48, 32))
    path = _pairs(
        tmp_path, {"w.png": clip_bytes(frames, "PNG"), "l.png": clip_bytes(frames, "PNG")}
    )
    kw = dict(resolution=16, seed=11, random_crop=True, random_flip=True)
    clip = PairDataset(_source(path), num_frames=5, **kw)
    images = []
    for k, f in enumerate(frames):
        f.save(tmp_path / f"f{k}.png")
        (tmp_path / f"p{k}.jsonl").write_text(
            json.dumps({"winner": f"f{k}.png", "loser": f"f{k}.png", "prompt": "p"}) + "\n"
        )
        images.append(PairDataset(_source(str(tmp_path / f"p{k}.jsonl")), **kw))
    flips = set()
    for epoch in range(6):
        c = clip[(epoch, 0)]["pixels"]
        for k in range(5):
            i = images[k][(epoch, 0)]["pixels"]
            assert torch.equal(c[:, :, k], i)
        flips.add(bool(torch.equal(c[0, :, 0], c[1, :, 0])))
    assert flips == {True, False}  # winner and loser drew their own flips in some epoch
