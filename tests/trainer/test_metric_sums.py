"""The trainer's step metrics are the kernels' statistics added up: ``metric_vector`` carries
``PreferenceStats.sums()`` unchanged, ``step_record`` takes its branch means from
``stats_from_sums``, an empty branch is None (never NaN), and every sink gets only finite
scalars."""

from __future__ import annotations

import math

import torch

from snpo.config import TrainConfig
from snpo.trainer.metrics import METRIC_SLOTS, MetricsLogger, metric_vector, step_record
from snpo_kernels import preference_loss_with_stats, stats_from_sums


def _micro_batch(seed: int, uncond: list[bool]) -> dict[str, torch.Tensor]:
    """The metrics dict of one snpo micro-batch of len(uncond) pairs on random predictions."""
    g = torch.Generator().manual_seed(seed)
    p = len(uncond)
    pred, target, ref = (torch.randn(2 * p, 4, 3, 5, generator=g) for _ in range(3))
    mask = torch.tensor(uncond)
    out = preference_loss_with_stats(
        pred, target, ref, swap=mask, beta=50.0, lam=0.9, backend="torch", uncond=mask
    )
    s = out.stats
    return {
        "loss": out.loss.detach(),
        "pairs": torch.tensor(float(p)),
        "count_cond": s.count_cond,
        "count_uncond": s.count_uncond,
        "stat_sums": s.sums(),
        "mse_policy": out.e_theta.mean(),
        "mse_ref": out.e_ref.mean(),
    }, out


def test_step_means_are_the_kernels_sums_over_micro_batches():
    # micro-batch 1 has no null-branch pair: a per-micro-batch mean would be NaN there
    masks = [[False, False, False], [True, False, True, True], [False, True]]
    batches = [_micro_batch(i, m) for i, m in enumerate(masks)]
    sums = torch.zeros(METRIC_SLOTS, dtype=torch.float64)
    for metrics, _ in batches:
        sums += metric_vector(metrics, sums)
    record = step_record(sums.tolist(), step=3, epoch=0)

    kernel = stats_from_sums(sum(out.stats.sums().double() for _, out in batches))
    for k in ("accuracy_cond", "accuracy_uncond", "logp_proxy"):
        assert record[k] == kernel[k], k
    # and by hand: a pair is right when the preferred image's error improved more than the
    # rejected one's (rows k and P + k; the null branch prefers the loser)
    correct, total = {False: 0, True: 0}, {False: 0, True: 0}
    for (_, out), m in zip(batches, masks, strict=True):
        margin = (out.e_theta.double() - out.e_ref.double()).tolist()
        p = len(m)
        for k, null in enumerate(m):
            a, b = (margin[p + k], margin[k]) if null else (margin[k], margin[p + k])
            correct[null] += 1 if a < b else 0
            total[null] += 1
    assert record["pairs_cond"] == total[False] == 5 and record["pairs_uncond"] == total[True] == 4
    assert math.isclose(record["accuracy_cond"], correct[False] / 5, rel_tol=1e-12)
    assert math.isclose(record["accuracy_uncond"], correct[True] / 4, rel_tol=1e-12)
    loss = sum(float(o.loss) * len(m) for (_, o), m in zip(batches, masks, strict=True)) / 9
    assert math.isclose(record["loss"], loss, rel_tol=1e-6)


def test_a_branch_empty_for_the_whole_step_is_none_and_sft_has_no_preference_statistics():
    metrics, _ = _micro_batch(7, [False, False])
    sums = metric_vector(metrics, torch.zeros(METRIC_SLOTS, dtype=torch.float64))
    record = step_record(sums.tolist(), step=1, epoch=0)
    assert record["accuracy_uncond"] is None and record["pairs_uncond"] == 0
    assert record["accuracy_cond"] is not None and math.isfinite(record["accuracy_cond"])

    sft = {
        "loss": torch.tensor(0.25),
        "mse_policy": torch.tensor(0.25),
        "pairs": torch.tensor(3.0),
        "count_cond": torch.tensor(2.0),
        "count_uncond": torch.tensor(1.0),
    }
    sums = metric_vector(sft, torch.zeros(METRIC_SLOTS, dtype=torch.float64))
    record = step_record(sums.tolist(), step=1, epoch=0, preference=False)
    assert (record["pairs_cond"], record["pairs_uncond"]) == (2, 1)
    assert record["accuracy_cond"] is None and record["accuracy_uncond"] is None
    assert record["logp_proxy"] is None and record["loss"] == 0.25


def test_every_sink_gets_only_finite_scalars(tmp_path):
    class FakeWandb:
        def __init__(self):
            self.logged = []

        def log(self, d, step):
            self.logged.append((step, d))

    class FakeBoard:
        def __init__(self):
            self.scalars = []

        def add_scalar(self, k, v, step):
            self.scalars.append((k, v, step))

    cfg = TrainConfig(output_dir=str(tmp_path), report_to="none", progress_bar=False, max_steps=5)
    logger = MetricsLogger(cfg, is_main=True, start_step=0)
    logger.wandb, logger.tb = FakeWandb(), FakeBoard()
    logger.log({"step": 1, "loss": 0.69, "accuracy_uncond": None, "grad_norm": float("nan")})
    [(step, sent)] = logger.wandb.logged
    assert step == 1 and sent == {"train/loss": 0.69}
    assert logger.tb.scalars == [("train/loss", 0.69, 1)]
    line = (tmp_path / "metrics.jsonl").read_text()
    assert '"accuracy_uncond": null' in line and '"grad_norm": null' in line
