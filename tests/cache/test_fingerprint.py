"""(b) Stale or mismatched caches are refused, naming the differing field; what a section does
not depend on (objective, beta, seed for center-crop latents, a moved model folder) is not."""

from __future__ import annotations

import shutil

import pytest

from snpo.cache import CacheError, CacheMismatchError, open_cache
from snpo.data import write_pickapic_parquet
from snpo.models import build_unet
from tests.trainer.conftest import pickapic_rows

from .conftest import with_


@pytest.mark.parametrize(
    "change, message",
    [
        (dict(seed=1), "seed is 0 in the cache but 1 in the config"),
        (dict(uncond_prob=0.2), "uncond_prob is 0.5 in the cache but 0.2 in the config"),
        (dict(resolution=32), "resolution is 16 in the cache but 32 in the config"),
        (dict(random_flip=False), "random_flip is true in the cache but false in the config"),
        (dict(random_crop=True), "random_crop is false in the cache but true in the config"),
        (dict(max_train_pairs=10), "max_train_pairs is null in the cache but 10 in the config"),
    ],
)
def test_config_changes_are_refused_by_name(sd_cache, change, message):
    cfg, root = sd_cache
    with pytest.raises(CacheMismatchError, match="cache fingerprint mismatch") as err:
        open_cache(root, with_(cfg, **change))
    assert message in str(err.value)


def test_fields_a_section_does_not_depend_on(sd_cache):
    cfg, root = sd_cache
    # reference errors do not depend on the objective, beta, lam, weighting, batch or LoRA
    c = open_cache(
        root,
        with_(
            cfg,
            objective="npo",
            beta=5000.0,
            lam=1.0,
            weighting="elbo",
            train_batch_size_per_gpu=7,
            lora_rank=4,
        ),
    )
    assert c.epochs == [0, 1]
    # center-crop latents and text do not depend on the seed (the flip is chosen at read time)
    open_cache(root, with_(cfg, seed=5), need=("latents", "text"))
    with pytest.raises(CacheMismatchError, match="seed is 0 in the cache but 5"):
        open_cache(root, with_(cfg, seed=5), need=("ref",))


def test_precision_is_part_of_the_fingerprint(sd_cache):
    cfg, root = sd_cache
    with pytest.raises(CacheMismatchError, match="precision is 'fp32' in the cache but 'bf16'"):
        open_cache(root, with_(cfg, precision="bf16"), need=("text",))


def test_model_weights_are_hashed_not_paths(sd_cache, tmp_path):
    cfg, root = sd_cache
    moved = tmp_path / "copy"
    shutil.copytree(cfg.model, moved)
    open_cache(root, with_(cfg, model=str(moved)))  # same weights elsewhere: accepted
    build_unet(sample_size=8, in_channels=4, cross_attention_dim=32, seed=1).save_pretrained(
        moved / "unet"
    )
    with pytest.raises(CacheMismatchError, match=r"unet_weights is sha256:\w+… in the cache but"):
        open_cache(root, with_(cfg, model=str(moved)))
    # the VAE and text encoders did not change: latents and text stay usable
    open_cache(root, with_(cfg, model=str(moved)), need=("latents", "text"))


def test_other_data_is_refused(sd_cache, tmp_path):
    cfg, root = sd_cache
    rows = pickapic_rows()
    rows[0] = dict(rows[0], caption="a photo of a blue ball")
    other = write_pickapic_parquet(tmp_path / "train-0.parquet", rows)
    with pytest.raises(CacheMismatchError, match=r"data\[0\]\.caption is sha256:\w+… in the cach"):
        open_cache(root, with_(cfg, train_data=[str(other)]), need=("text",))
    with pytest.raises(CacheMismatchError, match="num_pairs: the cache holds 15 pairs"):
        open_cache(root, cfg, num_pairs=16)


def test_missing_epochs_and_sections(sd_cache, tmp_path):
    cfg, root = sd_cache
    with pytest.raises(CacheMismatchError, match="cover epochs 0–1 but the run needs epochs 0–2"):
        open_cache(root, cfg, epochs=3)
    assert open_cache(root, cfg, epochs=2).epochs == [0, 1]
    with pytest.raises(CacheError, match="no cache at"):
        open_cache(tmp_path / "nothing", cfg)
    with pytest.raises(ValueError, match="unknown cache section"):
        open_cache(root, cfg, need=("latent",))
