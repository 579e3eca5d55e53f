"""The flow-matching UNet family and the world's flow base (snpo/models/flow_unet.py,
snpo/world/flow.py, snpo/world/compare_flow.py)."""

from __future__ import annotations

import copy
import json
import math

import pytest
import torch

from snpo.models import detect_family, load_model
from snpo.world.flow import build_flow_base_folder


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
    return build_flow_base_folder(tmp_path_factory.mktemp("flow") / "base", init="eps")


@pytest.fixture(scope="module")
def model(folder):
    return load_model(str(folder))


def test_detection(folder, model):
    from snpo.models.flow_unet import FLOW_UNET
    from snpo.world.demo import ASSETS

    index = json.loads((folder / "model_index.json").read_text())
    assert index["scheduler"] == ["diffusers", "FlowMatchEulerDiscreteScheduler"]
    assert detect_family(str(folder)) == "flow_unet"
    assert detect_family(str(ASSETS / "base")) == "sd"  # the ε world is untouched
    assert model.spec is FLOW_UNET and model.prediction_type == "flow"
    assert type(model.scheduler).__name__ == "FlowMatchEulerDiscreteScheduler"
    assert not FLOW_UNET.matches({"scheduler": ["diffusers", "DDPMScheduler"]}, {"unet"})


def _step_inputs(model, p: int = 3):
    from snpo.draws import pair_draws
    from snpo.step import EncodedBatch, StepModels, unet_fn

    fam = model.spec
    policy = copy.deepcopy(model.unet).requires_grad_(True).train()
    draws = pair_draws(0, 0, list(range(p)), (3, 16, 16), model.scheduler, uncond_prob=0.5)
    draws.uncond[:] = torch.tensor([True, False, True])
    pix = torch.rand(2 * p, 3, 16, 16, generator=torch.Generator().manual_seed(0)) * 2 - 1
    prompts = fam.encode_prompts(model, ["a red square on the left", "a blue ring", "a"])
    models = StepModels(model, unet_fn(policy, fam), unet_fn(model.unet, fam),
                        fam.null_embedding(model), torch.device("cpu"), torch.float32)  # fmt: skip
    return policy, models, EncodedBatch(pix, prompts), draws


def test_sft_and_snpo_steps(model):
    from snpo.step import preference_step

    policy, models, batch, draws = _step_inputs(model)
    sft = preference_step(models, batch, draws, objective="sft", beta=1.0, lam=1.0)
    assert torch.isfinite(sft.loss) and sft.loss.item() > 0
    res = preference_step(models, batch, draws, objective="snpo", beta=500.0, lam=0.9,
                          backend="torch")  # fmt: skip
    assert res.loss.item() == pytest.approx(math.log(2.0), abs=1e-6)  # policy = reference
    res.loss.backward()
    assert any(p.grad is not None and p.grad.abs().sum() > 0 for p in policy.parameters())


def test_sampling(model):
    from snpo.models import encode_prompts, generate, null_embedding

    img = generate(model, encode_prompts(model, ["a red square on the left"]),
                   null_embedding(model), [0], guidance_scale=3.0, steps=3)  # fmt: skip
    assert img.shape == (1, 3, 16, 16) and torch.isfinite(img).all()
    assert 0.0 <= img.min() and img.max() <= 1.0


def test_t_interval():
    from snpo.world.compare_flow import t_interval

    r = t_interval([1.0, 2.0, 3.0])
    assert r["mean"] == 2.0 and r["half_width"] == pytest.approx(4.303 * 1.0 / math.sqrt(3))


def test_flow_comparison_runs_budgets_and_paired_report(tmp_path):
    """compare-flow takes a subset of its runs and the evidence budget (the whole CFG curve),
    and its results.json has the layout snpo.world.paired reads (the committed first run)."""
    from pathlib import Path

    from snpo.world.compare import BUDGETS, write_paired
    from snpo.world.compare_flow import FLOW_BUDGETS, flow_run_names

    assert flow_run_names(None) == ["dpo", "bdpo", "snpo_naive", "snpo"]
    assert flow_run_names(["snpo", "dpo", "snpo_naive"]) == ["dpo", "snpo_naive", "snpo"]
    with pytest.raises(SystemExit, match="npo"):
        flow_run_names(["npo"])
    ev = FLOW_BUDGETS["evidence"]
    assert ev.scales == (1.0, 2.0, 3.0, 5.0, 7.5, 10.0) == BUDGETS["evidence"].scales
    assert ev.steps == FLOW_BUDGETS["default"].steps  # the same training, a longer curve
    committed = Path(__file__).parents[2] / "docs" / "results" / "compare-flow" / "results.json"
    results = json.loads(committed.read_text())
    write_paired(tmp_path, results, ["dpo", "snpo_naive", "snpo"])
    text = (tmp_path / "paired.md").read_text()
    assert "| snpo − dpo | 3 |" in text and "| snpo − base | 3 |" in text
    assert (tmp_path / "cfg_curve.png").read_bytes()[:4] == b"\x89PNG"
