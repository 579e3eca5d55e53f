"""Resuming on another number of processes: ZeRO-2 checkpoints go through DeepSpeed's universal
checkpoint, and the data continues where it stopped (no pair repeated or left out)."""

from __future__ import annotations

import itertools

import pytest

from snpo.data import PairOrder
from snpo.trainer import rebase_position
from snpo.trainer.checkpoints import complete_tags

from .conftest import launch_deepspeed, read_metrics, train_here, write_config


def _pairs(order: PairOrder, start: int, stop: int) -> list[tuple[int, int]]:
    return [p for g in range(start, stop) for p in order.batch(g)]


def _all_ranks(n, world, micro, start, stop, seed=3):
    orders = [PairOrder(n, seed=seed, rank=r, world=world, micro=micro) for r in range(world)]
    return [p for o in orders for p in _pairs(o, start, stop)]


@pytest.mark.parametrize(
    ("old", "new", "micro", "done"),
    list(itertools.product([1, 2, 3], [1, 2, 4], [1, 2], [0, 1, 3])),
)
def test_rebased_order_neither_repeats_nor_drops(old, new, micro, done):
    n = 24
    first = _all_ranks(n, old, micro, 0, done)
    epoch, batch = PairOrder(n, seed=3, rank=0, world=old, micro=micro).position(done)
    bpe = PairOrder(n, seed=3, rank=0, world=new, micro=micro).batches_per_epoch
    g, ep, skipped = rebase_position(
        epoch, batch, micro=micro, old_world=old, new_world=new, batches_per_epoch=bpe
    )
    after = _all_ranks(n, new, micro, g, g + 2)
    assert not set(first) & set(after)  # nothing seen twice
    assert skipped < micro * new
    if ep == epoch:  # the epoch's prefix is covered except the `skipped` realignment pairs
        from snpo.data import epoch_permutation

        perm = epoch_permutation(3, epoch, n).tolist()
        seen = {i for e, i in first + after if e == epoch}
        k = len(first) + skipped
        assert set(perm[:k]) - {i for e, i in first} == set(perm[len(first) : k])
        same_epoch = [a for a in after if a[0] == epoch]
        assert seen >= set(perm[: len(first)]) and len(seen) == len(first) + len(same_epoch)


@pytest.mark.slow
def test_zero2_resume_two_to_one_and_one_to_two(tmp_path, tiny_sd, pickapic_clean, recwarn):
    common = dict(
        model=tiny_sd,
        train_data=pickapic_clean,
        objective="snpo",
        zero_stage=2,
        train_batch_size_per_gpu=1,
        checkpoint_every=2,
        keep_checkpoints=0,
    )
    out = tmp_path / "run"
    cfg = write_config(tmp_path / "c.yaml", output_dir=out, max_steps=2, **common)
    launch_deepspeed(cfg)  # 2 processes → step 2
    assert train_here(cfg, "--max_steps", "4") == 0  # 1 process → steps 3, 4
    said = " ".join(str(w.message) for w in recwarn.list)
    assert "saved with 2 process(es) on 1" in said and "exactly where it stopped" in said
    rows = read_metrics(out)
    assert [r["step"] for r in rows] == [1, 2, 3, 4]
    assert [r["pairs"] for r in rows] == [2, 2, 1, 1]
    tags = complete_tags(out / "checkpoints")
    assert tags == ["step_00000002", "step_00000004"]
    assert (out / "checkpoints" / "step_00000002_universal").is_dir()
    launch_deepspeed(cfg, "--max_steps", "6")  # and back: 1 → 2 processes
    rows = read_metrics(out)
    assert [r["step"] for r in rows] == [1, 2, 3, 4, 5, 6]
    assert [r["pairs"] for r in rows][-2:] == [2, 2]
    # 16 pairs: 2 + 2 (two ranks) + 1 + 1 (one) + 2 + 2 = 10 pairs of epoch 0, none repeated
    assert all(r["epoch"] == 0 for r in rows)
