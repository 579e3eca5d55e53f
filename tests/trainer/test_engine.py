"""Engine pieces in this process: DeepSpeed's loss scaling under gradient accumulation reaches
the loss's grad_output; DeepSpeed config, learning-rate rules, reference fingerprint, resume
lookup."""

from __future__ import annotations

import copy

import pytest
import torch

from snpo.config import load_config
from snpo.data import PairDataset, PickapicParquet, collate_pairs
from snpo.draws import pair_draws
from snpo.models import load_model, null_embedding
from snpo.step import StepModels, encode_batch, preference_step, unet_fn
from snpo.trainer import (
    Models,
    deepspeed_config,
    effective_lr,
    init_distributed,
    lr_lambda,
    reference_fingerprint,
    resume_target,
)
from snpo.trainer.checkpoints import CheckpointError, seal

from .conftest import write_config


@pytest.fixture()
def cfg(tmp_path, tiny_pixel, pickapic_clean):
    return load_config(
        write_config(
            tmp_path / "c.yaml",
            model=tiny_pixel,
            train_data=pickapic_clean,
            resolution=8,
            output_dir=tmp_path / "o",
        )
    )


def _micro_batches(model, data, n):
    ds = PairDataset(PickapicParquet([str(data)]), resolution=8, seed=0)
    out = []
    for i in range(n):
        batch = collate_pairs([ds[(0, 2 * i)], ds[(0, 2 * i + 1)]])
        draws = pair_draws(0, 0, batch.indices, (3, 8, 8), model.scheduler, 0.5)
        out.append((batch, draws))
    return out


def test_gradient_accumulation_scales_grad_output(cfg, tiny_pixel, pickapic_clean):
    import deepspeed

    cfg.gradient_accumulation_steps = 2
    cfg.max_grad_norm = 0.0
    dist = init_distributed(cfg)
    m = load_model(str(tiny_pixel))
    m.unet.requires_grad_(True)
    ref = copy.deepcopy(m.unet).requires_grad_(False)
    with torch.no_grad():
        for p in m.unet.parameters():
            p.add_(1e-3 * torch.randn_like(p))
    manual = copy.deepcopy(m.unet)
    params = list(m.unet.parameters())
    opt = torch.optim.AdamW(params, lr=1e-3)
    engine, *_ = deepspeed.initialize(
        model=m.unet, model_parameters=params, optimizer=opt, config=deepspeed_config(cfg, 1)
    )
    null = null_embedding(m)
    sm = StepModels(m, unet_fn(engine), unet_fn(ref), null, dist.device, torch.float32)
    sm_manual = StepModels(m, unet_fn(manual), unet_fn(ref), null, dist.device, torch.float32)
    kw = dict(objective="snpo", beta=500.0, lam=0.9)
    batches = _micro_batches(m, pickapic_clean, 2)
    total = 0.0
    for i, (batch, draws) in enumerate(batches):
        enc = encode_batch(sm, batch, draws)
        assert engine.is_gradient_accumulation_boundary() == (i == 1)
        engine.backward(preference_step(sm, enc, draws, **kw).loss)
        total = total + preference_step(sm_manual, enc, draws, **kw).loss
        if i == 0:
            engine.step()  # not a boundary: no update, gradients accumulate
    (total / 2).backward()  # what DeepSpeed must have accumulated: mean of the micro losses
    for (name, p), q in zip(m.unet.named_parameters(), manual.parameters()):
        torch.testing.assert_close(p.grad, q.grad, rtol=1e-5, atol=1e-8, msg=name)
    assert any(float(q.grad.abs().max()) > 0 for q in manual.parameters())
    engine.step()


def test_deepspeed_config_and_learning_rate_rules(cfg):
    cfg.train_batch_size_per_gpu, cfg.gradient_accumulation_steps = 2, 8
    cfg.zero_stage, cfg.precision, cfg.max_grad_norm = 2, "bf16", 1.0
    ds = deepspeed_config(cfg, world=4)
    assert ds["train_batch_size"] == 64 and ds["train_micro_batch_size_per_gpu"] == 2
    assert ds["gradient_accumulation_steps"] == 8 and ds["zero_optimization"]["stage"] == 2
    assert ds["bf16"] == {"enabled": True} and ds["gradient_clipping"] == 1.0
    assert "optimizer" not in ds and "scheduler" not in ds  # torch objects, no fused_adam JIT
    cfg.learning_rate, cfg.scale_lr = 1e-8, True
    assert effective_lr(cfg, 4) == pytest.approx(1e-8 * 64)
    cfg.scale_lr = False
    assert effective_lr(cfg, 4) == 1e-8
    cfg.lr_warmup_steps, cfg.max_steps, cfg.lr_schedule = 4, 14, "linear"
    f = lr_lambda(cfg)
    assert [f(s) for s in (0, 3, 4)] == [0.25, 1.0, 1.0] and f(14) == 0.0
    cfg.lr_schedule = "cosine"
    assert lr_lambda(cfg)(9) == pytest.approx(0.5)


def test_reference_fingerprint_and_resume_lookup(cfg, tiny_pixel, tmp_path):
    m = load_model(str(tiny_pixel))
    ref = copy.deepcopy(m.unet)
    models = Models(m, ref, lora=False)
    fp = reference_fingerprint(models)
    assert fp == reference_fingerprint(Models(m, copy.deepcopy(ref), lora=False))
    with torch.no_grad():
        next(iter(ref.parameters())).view(-1)[0] += 1e-6
    assert reference_fingerprint(models) != fp  # a moved reference is detected
    assert resume_target(cfg) is None
    ck = tmp_path / "o" / "checkpoints"
    (ck / "step_00000007").mkdir(parents=True)
    (ck / "latest").write_text("step_00000007")
    with pytest.raises(CheckpointError, match="none has its checksum file"):
        resume_target(cfg)  # a tag without checksums is not resumed from
    seal(ck, "step_00000007", {})
    assert resume_target(cfg) == (ck, "step_00000007", None)
    cfg.resume = "never"
    assert resume_target(cfg) is None
