"""The input providers: sources per section, the idle micro-batch (all pairs bad) gives a zero
loss with exactly zero gradients through the real UNet graph, live encoding equals
snpo.step.encode_batch."""

from __future__ import annotations

import pytest
import torch

from snpo.data import PairDataset, PickapicParquet, collate_pairs
from snpo.draws import pair_draws
from snpo.models import load_model, null_embedding
from snpo.step import StepModels, encode_batch, preference_step, unet_fn
from snpo.trainer.inputs import (
    CacheReference,
    CacheText,
    EncoderText,
    ImageLatents,
    LiveReference,
    RunInputs,
)


class _FakeCache:
    """What CacheReference / CacheText read: ref_err and text of pair indices."""

    def ref_err(self, epoch, indices):
        return torch.arange(2 * len(indices), dtype=torch.float32) + epoch

    def text(self, indices):
        raise AssertionError("not read in this test")

    def null(self):
        raise AssertionError("not read in this test")


def _inputs(model, reference, latents_shape=(3, 8, 8), text=None):
    unet = model.unet.requires_grad_(True)
    ref = unet_fn(unet) if isinstance(reference, LiveReference) else None
    sm = StepModels(
        model, unet_fn(unet), ref, null_embedding(model), torch.device("cpu"), torch.float32
    )
    return RunInputs(
        latents=ImageLatents(None, None, 0),
        text=text or EncoderText(),
        reference=reference,
        models=sm,
        latent_shape=latents_shape,
        resolution=8,
    )


def test_sources_name_each_section(tiny_pixel):
    m = load_model(str(tiny_pixel))
    assert _inputs(m, LiveReference()).sources == {"latents": "live", "text": "live", "ref": "live"}
    mixed = _inputs(m, CacheReference(_FakeCache()), text=CacheText(_FakeCache()))
    assert mixed.sources == {"latents": "live", "text": "cache", "ref": "cache"}
    assert _inputs(m, None).sources == {"latents": "live", "text": "live"}  # sft: no reference


@pytest.mark.parametrize("reference", ["live", "cache"])
def test_idle_micro_batch_has_zero_loss_and_exactly_zero_gradients(tiny_pixel, reference):
    m = load_model(str(tiny_pixel))
    inputs = _inputs(m, LiveReference() if reference == "live" else CacheReference(_FakeCache()))
    enc, ref_err = inputs.idle()
    assert enc.latents.shape == (2, 3, 8, 8) and enc.num_pairs == 1
    assert (ref_err is None) == (reference == "live")
    draws = pair_draws(0, 0, [0], (3, 8, 8), m.scheduler, 0.5)
    res = preference_step(
        inputs.models, enc, draws, objective="snpo", beta=500.0, lam=0.9, ref_err=ref_err
    )
    (res.loss * 0.0).backward()
    grads = [p.grad for p in m.unet.parameters()]
    assert all(g is not None for g in grads)  # every parameter took part (ZeRO hooks fire)
    assert all(float(g.abs().max()) == 0.0 for g in grads)


def test_cached_reference_errors_and_live_encoding(tiny_pixel, pickapic_clean):
    m = load_model(str(tiny_pixel))
    ds = PairDataset(PickapicParquet([str(pickapic_clean)]), resolution=8, seed=0)
    batch = collate_pairs([ds[(1, 0)], ds[(1, 3)]])
    draws = pair_draws(0, 1, batch.indices, (3, 8, 8), m.scheduler, 0.5)
    live = _inputs(m, LiveReference())
    assert live.reference_errors(batch) is None
    enc, want = live.encode(batch, draws), encode_batch(live.models, batch, draws)
    assert torch.equal(enc.latents, want.latents)
    assert torch.equal(enc.prompts.embeds, want.prompts.embeds)
    cached = _inputs(m, CacheReference(_FakeCache()))
    assert cached.reference_errors(batch).tolist() == [1.0, 2.0, 3.0, 4.0]


@pytest.mark.parametrize("zero_stage, lora_rank", [(3, 4), (2, 0)])
def test_a_run_through_an_all_bad_micro_batch(tmp_path, tiny_sd, pickapic, zero_stage, lora_rank):
    """One pair per micro-batch over a whole epoch: the micro-batch of the truncated-JPEG pair is
    all bad and runs the idle inputs under ZeRO hooks; the run trains and counts it."""
    from .conftest import read_metrics, train_here, write_config

    out = tmp_path / "run"
    cfg = write_config(
        tmp_path / "c.yaml", model=tiny_sd, train_data=pickapic, output_dir=out,
        objective="snpo", train_batch_size_per_gpu=1, gradient_accumulation_steps=5,
        max_steps=3, zero_stage=zero_stage, lora_rank=lora_rank,
    )  # fmt: skip
    linear = torch.nn.functional.linear
    with pytest.warns(UserWarning, match="skipping a bad pair"):
        assert train_here(cfg) == 0
    # ZeRO-3 replaces F.linear for good; the run puts it back (later runs in this process
    # would round differently: the kill -9 resume test caught it)
    assert torch.nn.functional.linear is linear
    rows = read_metrics(out)
    assert rows[-1]["bad_images"] == 1 and sum(r["pairs"] for r in rows) == 14
    assert all(r["loss"] is not None and r["grad_norm"] > 0 for r in rows)


@pytest.mark.slow
def test_two_ranks_stay_in_step_through_an_all_bad_micro_batch(tmp_path, tiny_sd, pickapic):
    """Two CPU processes, one pair per micro-batch: at step 1 one rank's micro-batch (the
    truncated-JPEG pair) is all bad while the other's is good. ZeRO-2 reduces gradients in the
    order the backward produces them, ZeRO-0 in parameter order: equal losses at every step
    show the idle micro-batch runs the same graph (a zero loss from the parameters alone gives
    other gradients from step 2 on under ZeRO-2)."""
    from .conftest import launch_deepspeed, read_metrics, write_config

    runs = {}
    for stage in (0, 2):
        out = tmp_path / f"zero{stage}"
        cfg = write_config(
            tmp_path / f"c{stage}.yaml", model=tiny_sd, train_data=pickapic, output_dir=out,
            objective="snpo", train_batch_size_per_gpu=1, max_steps=4, zero_stage=stage,
        )  # fmt: skip
        launch_deepspeed(cfg)
        runs[stage] = read_metrics(out)
    a, b = runs[0], runs[2]
    assert [r["pairs"] for r in a] == [r["pairs"] for r in b] == [1, 2, 2, 2]
    assert a[-1]["bad_images"] == b[-1]["bad_images"] == 1
    for ra, rb in zip(a, b):
        assert rb["loss"] == pytest.approx(ra["loss"], rel=1e-4), ra["step"]
