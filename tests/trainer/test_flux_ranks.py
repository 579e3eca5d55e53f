"""FLUX.1-dev-class LoRA on 2 DeepSpeed CPU ranks (issue 15): dpo under ZeRO-2, a few steps; the
two ranks train on disjoint pairs (recorded by the wrapper of ``test_flow_world_size.py``); the
exported adapter is one ``FluxPipeline.load_lora_weights`` applies, equal to snpo's own fused
load of the export, and the pipeline samples with it."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from .conftest import read_metrics, write_config
from .test_flow_world_size import launch_recorded, read_pairs, recorder

LN2_ABS = 4e-7  # ln 2 in float32
SEED = 5


@pytest.fixture(scope="module")
def tiny_flux(tmp_path_factory):
    from snpo.models.tiny_flow import save_tiny_flux

    return save_tiny_flux(tmp_path_factory.mktemp("fluxr") / "m")


def _velocity(transformer, model) -> torch.Tensor:
    """(2, 16, 8, 8) the FLUX transformer's prediction on a fixed latent, timestep 1000·σ and
    prompt."""
    from snpo.models import encode_prompts, get_family

    fam = get_family("flux")
    x = torch.randn(2, 16, 8, 8, generator=torch.Generator().manual_seed(0))
    cond = fam.conditioning(model, encode_prompts(model, ["a red cube", "a blue dog"]))
    with torch.no_grad():
        return fam.denoise(transformer, x, torch.tensor([250.0, 750.0]), cond)


@pytest.mark.slow
def test_flux_lora_zero2_two_ranks(tmp_path, tiny_flux, pickapic_clean):
    from diffusers import FluxPipeline

    from snpo.draws import epoch_permutation
    from snpo.models import load_export, load_model

    out = tmp_path / "flux"
    steps, micro, accum = 3, 1, 2
    cfg = write_config(
        tmp_path / "c.yaml", model=tiny_flux, train_data=pickapic_clean, output_dir=out,
        objective="dpo", beta=100.0, uncond_prob=0.0, seed=SEED, zero_stage=2,
        lora_rank=4, lora_alpha=8, learning_rate=1e-3, max_steps=steps,
        train_batch_size_per_gpu=micro, gradient_accumulation_steps=accum,
    )  # fmt: skip
    script, log = recorder(tmp_path)
    launch_recorded(script, cfg)

    rows = read_metrics(out)
    assert [r["step"] for r in rows] == [1, 2, 3]
    assert all(r["pairs"] == micro * accum * 2 for r in rows)  # micro × accum × world
    assert all(r["pairs_uncond"] == 0 for r in rows)  # no null branch (guidance-distilled)
    assert rows[0]["loss"] == pytest.approx(math.log(2), abs=LN2_ABS)  # adapters start at zero
    for r in rows:
        assert math.isfinite(r["loss"]) and math.isfinite(r["grad_norm"]) and r["grad_norm"] > 0
    assert abs(rows[-1]["loss"] - math.log(2)) > 1e-6  # the adapter trained

    seen = read_pairs(log)
    assert sorted(seen) == [1, 2, 3] and all(sorted(seen[s]) == [0, 1] for s in seen)
    per_rank = {r: [i for s in seen for i in seen[s][r]] for r in (0, 1)}
    assert len(per_rank[0]) == len(per_rank[1]) == steps * accum * micro
    assert not set(per_rank[0]) & set(per_rank[1])  # disjoint shards
    every = per_rank[0] + per_rank[1]
    assert len(set(every)) == len(every)  # and no pair twice within the epoch
    assert set(every) == set(epoch_permutation(SEED, 0, 16).tolist()[: len(every)])

    export = out / "export"
    loaded, meta = load_export(export)  # snpo's load: the adapter fused into the base
    assert (meta["family"], meta["kind"], meta["objective"]) == ("flux", "lora", "dpo")
    assert meta["pipeline_class"] == "FluxPipeline"
    base = load_model(str(tiny_flux))
    want = _velocity(loaded.unet, base)
    pipe = FluxPipeline.from_pretrained(str(tiny_flux))
    before = _velocity(pipe.transformer, base)
    kw = dict(prompt="a red cube", num_inference_steps=2, height=16, width=16, output_type="np")
    plain = pipe(generator=torch.Generator().manual_seed(0), **kw).images
    pipe.load_lora_weights(str(export))
    after = _velocity(pipe.transformer, base)
    assert (after - before).abs().max() > 1e-5  # the trained adapter is applied
    torch.testing.assert_close(after, want, rtol=1e-5, atol=1e-5)
    tuned = pipe(generator=torch.Generator().manual_seed(0), **kw).images
    assert tuned.shape == (1, 16, 16, 3) and np.isfinite(tuned).all()
    assert not np.allclose(plain, tuned)  # and it changes the samples
