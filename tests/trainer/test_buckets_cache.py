"""``resolution_buckets`` with ``snpo cache``: latents are cached per bucket (each pair at its
bucket's shape) and reference errors at the draws of the bucket's latent shape; a bucketed run
trained from that cache logs the live bucketed run's losses, and square and bucketed caches
refuse each other naming ``resolution_buckets``."""

from __future__ import annotations

import pytest
import torch

from snpo.cache import CacheMismatchError, build_cache, load_manifest, open_cache
from snpo.config import load_config
from snpo.trainer import Trainer

from .conftest import read_metrics, write_config
from .test_buckets_training import SIZES, _common, mixed_pairs  # noqa: F401 - the fixture

# The tolerances of tests/trainer/test_cache_training.py, same reasoning: the cache's VAE, text
# and reference forwards ran on other batch compositions (one bucket per forward, batch_size 3
# against the trainer's micro-batches of 2), so e_ref and the latents / embeddings the policy
# sees equal the live ones to float32 rounding (fp32 latents: lossless); β/2 = 250 turns that
# into |δz| ≲ 5e-5 on the loss, rtol 1e-4; mse_ref / mse_policy 1e-5; grad_norm 1e-3.
LOSS_RTOL = 1e-4


def _values(model, data) -> dict:
    return _common(
        model,
        data,
        gradient_accumulation_steps=2,
        max_steps=7,  # 14 micro-batches: the 12 of epoch 0 (4 buckets × 6 pairs / 2) and 2 more
        beta=500.0,
        learning_rate=1e-4,
        adam_eps=1e-4,
    )


@pytest.fixture(scope="module")
def bucket_cache(tmp_path_factory, tiny_sd, mixed_pairs):  # noqa: F811
    root = tmp_path_factory.mktemp("bucketcache")
    values = _values(tiny_sd, mixed_pairs)
    cfg = load_config(write_config(root / "build.yaml", **values))
    build_cache(
        cfg,
        root / "cache",
        latent_dtype="fp32",
        shard_size=8,
        batch_size=3,
        verbose=False,
    )
    return values, root / "cache"


def test_bucketed_run_from_cache_matches_live(tmp_path, bucket_cache, capsys):
    values, cache = bucket_cache
    runs = {}
    for mode in ("live", "cache"):
        cfg = load_config(
            write_config(
                tmp_path / f"{mode}.yaml",
                output_dir=tmp_path / mode,
                ref_mode=mode,
                cache_dir=cache,
                **values,
            )
        )
        t = Trainer(cfg)
        t.run()
        runs[mode] = (t, read_metrics(tmp_path / mode))
    cached, b = runs["cache"]
    _, a = runs["live"]
    assert cached.sources == {"latents": "cache", "text": "cache", "ref": "cache"}
    assert cached.models.model.vae is None and cached.models.model.text_encoders == []
    assert cached.step_models.reference is None and cached.models.reference is None
    epochs = load_manifest(cache)["sections"]["ref"]["shards"]
    assert a_epochs(epochs) == {0, 1}  # the bucketed order's epochs (leftovers dropped)
    assert [r["step"] for r in a] == [r["step"] for r in b] == [1, 2, 3, 4, 5, 6, 7]
    assert a[-1]["epoch"] == 1  # crossed into the cache's second epoch
    for ra, rb in zip(a, b):
        for k in ("pairs", "pairs_cond", "pairs_uncond", "epoch"):
            assert ra[k] == rb[k], (ra["step"], k)
        assert rb["loss"] == pytest.approx(ra["loss"], rel=LOSS_RTOL), ra["step"]
        assert rb["mse_ref"] == pytest.approx(ra["mse_ref"], rel=1e-5), ra["step"]
        assert rb["mse_policy"] == pytest.approx(ra["mse_policy"], rel=1e-5), ra["step"]
        assert rb["grad_norm"] == pytest.approx(ra["grad_norm"], rel=1e-3), ra["step"]
    # the cached batches have the buckets' shapes (several of them)
    shapes = set()
    t = cached
    for g, batch in enumerate(t.inputs.batches(0, 6)):
        bw, bh = t.order.size(g)
        assert t.inputs.latent_shape_of(batch)[-2:] == (bh // 2, bw // 2)
        shapes.add((bh, bw))
    assert len(shapes) > 1


def a_epochs(shards: dict) -> set[int]:
    from snpo.cache.sections import shard_epoch

    return {shard_epoch(rel) for rel in shards}


def test_square_and_bucketed_caches_refuse_each_other(tmp_path, bucket_cache, tiny_sd):
    values, cache = bucket_cache
    square = {k: v for k, v in values.items() if k != "resolution_buckets"}
    cfg_sq = load_config(write_config(tmp_path / "sq.yaml", **square))
    with pytest.raises(CacheMismatchError, match="resolution_buckets.setting is 'auto' in the"):
        open_cache(cache, cfg_sq, ("latents", "text"))
    build_cache(
        cfg_sq, tmp_path / "sqcache", what=["latents", "text"], latent_dtype="fp32",
        shard_size=8, verbose=False,
    )  # fmt: skip
    cfg_b = load_config(write_config(tmp_path / "b.yaml", **values))
    with pytest.raises(CacheMismatchError, match="resolution_buckets.setting is missing") as e:
        open_cache(tmp_path / "sqcache", cfg_b, ("latents", "text"))
    assert "Rebuild" in str(e.value)
    # text alone does not depend on the buckets
    open_cache(tmp_path / "sqcache", cfg_b, ("text",))
    # the resolved buckets and assignment, checked once the run knows them
    from snpo.data import open_source
    from snpo.data.order import bucket_options
    from snpo.models import load_model

    c = open_cache(cache, cfg_b, ("latents", "text", "ref"))
    opts = bucket_options(cfg_b, open_source(cfg_b), load_model(str(tiny_sd)))
    c.check_buckets(cfg_b, opts, epochs=2)
    with pytest.raises(CacheMismatchError, match="--epochs 3"):
        c.check_buckets(cfg_b, opts, epochs=3)
    moved = {**opts, "buckets": opts["buckets"][::-1].copy()}
    with pytest.raises(CacheMismatchError, match="resolution_buckets.assignment"):
        c.check_buckets(cfg_b, moved)


def test_sdxl_cached_bucketed_batches_give_the_live_time_ids(tmp_path, tiny_sdxl, mixed_pairs):  # noqa: F811
    """Cached latents of an SDXL bucketed run: the bucket's latent shape and the SDXL time ids
    (real original size, crop, the bucket's (h, w) as target) of the live batches."""
    from snpo.draws import pair_draws

    values = {**_values(tiny_sdxl, mixed_pairs), "max_steps": 1}
    cfg = load_config(write_config(tmp_path / "b.yaml", **values))
    build_cache(cfg, tmp_path / "cache", what=["latents", "text"], latent_dtype="fp32",
                shard_size=8, verbose=False)  # fmt: skip
    runs = {}
    for mode in ("live", "cache"):
        c = load_config(
            write_config(
                tmp_path / f"{mode}.yaml", output_dir=tmp_path / mode,
                ref_mode="live" if mode == "live" else "auto",
                cache_dir=tmp_path / "cache", cache_use=["latents", "text"], **values,
            )
        )  # fmt: skip
        t = Trainer(c)
        t.setup()
        runs[mode] = t
    live, cached = runs["live"], runs["cache"]
    assert cached.sources["latents"] == "cache"
    for bl, bc in zip(live.inputs.batches(0, 6), cached.inputs.batches(0, 6)):
        assert bl.indices.tolist() == bc.indices.tolist()
        shape = live.inputs.latent_shape_of(bl)
        assert cached.inputs.latent_shape_of(bc) == shape
        d = pair_draws(cfg.seed, bl.epoch, bl.indices, shape, live.models.model.scheduler, 0.4)
        el, ec = live.inputs.encode(bl, d), cached.inputs.encode(bc, d)
        assert torch.equal(el.time_ids, ec.time_ids)
        torch.testing.assert_close(ec.latents, el.latents, rtol=1e-4, atol=1e-5)
