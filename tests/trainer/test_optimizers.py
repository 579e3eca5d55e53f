"""Memory options of full fine-tuning: the optimizer choice (AdamW, Adafactor, 8-bit AdamW) and
DeepSpeed ZeRO-Offload in the generated DeepSpeed config, with the stages each is refused at."""

from __future__ import annotations

import importlib.util
import sys

import pytest
import torch

from snpo.config import ConfigError, TrainConfig, validate
from snpo.trainer.setup import build_optimizer, deepspeed_config

from .conftest import read_metrics, train_here, write_config


def _cfg(**kw) -> TrainConfig:
    cfg = TrainConfig(model="owner/model", **kw)
    validate(cfg, check_files=False)
    return cfg


def test_offload_entries_of_the_deepspeed_config(tmp_path):
    plain = deepspeed_config(_cfg(zero_stage=2), 2)
    assert plain["zero_optimization"] == {"stage": 2}
    assert "zero_force_ds_cpu_optimizer" not in plain
    conf = deepspeed_config(_cfg(zero_stage=2, offload_optimizer="cpu"), 2)
    zero = conf["zero_optimization"]
    assert zero["stage"] == 2 and zero["offload_optimizer"]["device"] == "cpu"
    assert "offload_param" not in zero and conf["zero_force_ds_cpu_optimizer"] is False
    nvme = str(tmp_path / "nvme")
    conf = deepspeed_config(
        _cfg(zero_stage=3, offload_optimizer="nvme", offload_param="nvme", offload_nvme_path=nvme),
        8,
    )
    zero = conf["zero_optimization"]
    for key in ("offload_optimizer", "offload_param"):
        assert zero[key]["device"] == "nvme" and zero[key]["nvme_path"] == nvme
    conf = deepspeed_config(_cfg(zero_stage=3, offload_param="cpu"), 8)
    assert conf["zero_optimization"]["offload_param"]["device"] == "cpu"
    assert "offload_optimizer" not in conf["zero_optimization"]


@pytest.mark.parametrize(
    ("kw", "field"),
    [
        (dict(zero_stage=0, offload_optimizer="cpu"), "offload_optimizer"),
        (dict(zero_stage=2, offload_optimizer="nvme", offload_nvme_path="/n"), "offload_optimizer"),
        (dict(zero_stage=2, offload_param="cpu"), "offload_param"),
        (dict(zero_stage=1, offload_param="nvme", offload_nvme_path="/n"), "offload_param"),
        (dict(zero_stage=3, offload_param="nvme"), "offload_nvme_path"),
        (dict(zero_stage=3, offload_nvme_path="/n"), "offload_nvme_path"),
        (dict(ema_decay=1.0), "ema_decay"),
        (dict(ema_decay=-0.1), "ema_decay"),
        (dict(ema_start_step=-1), "ema_start_step"),
        (
            dict(zero_stage=3, offload_param="nvme", offload_nvme_path="/n", ema_decay=0.9),
            "ema_decay",
        ),
    ],
)
def test_refused_combinations_name_the_field(kw, field):
    with pytest.raises(ConfigError, match=f"^{field}:"):
        _cfg(**kw)


def test_adamw8bit_needs_bitsandbytes(monkeypatch):
    if importlib.util.find_spec("bitsandbytes") is None:
        with pytest.raises(ConfigError, match="optimizer: adamw8bit needs bitsandbytes"):
            _cfg(optimizer="adamw8bit")
    # an installed but broken bitsandbytes is reported by build_optimizer just as clearly
    monkeypatch.setitem(sys.modules, "bitsandbytes", None)
    cfg = TrainConfig(model="owner/model", optimizer="adamw8bit")
    with pytest.raises(ConfigError, match="adamw8bit needs bitsandbytes"):
        build_optimizer(cfg, [torch.nn.Parameter(torch.zeros(2))], 1e-3)


def test_build_optimizer_choices():
    from transformers.optimization import Adafactor

    p = [torch.nn.Parameter(torch.ones(4, 3))]
    adamw = build_optimizer(TrainConfig(), p, 1e-3)
    assert isinstance(adamw, torch.optim.AdamW) and adamw.defaults["weight_decay"] == 1e-2
    ada = build_optimizer(TrainConfig(optimizer="adafactor", weight_decay=0.0), p, 1e-3)
    assert isinstance(ada, Adafactor)
    assert ada.defaults["lr"] == 1e-3
    assert not ada.defaults["relative_step"] and not ada.defaults["scale_parameter"]
    assert not ada.defaults["warmup_init"]
    p[0].grad = torch.ones(4, 3)
    ada.step()
    state = ada.state[p[0]]  # the factored second moment: a row and a column vector
    assert state["exp_avg_sq_row"].shape == (4,) and state["exp_avg_sq_col"].shape == (3,)
    assert not torch.equal(p[0].detach(), torch.ones(4, 3))  # it moved by ~lr


def _full_run(tmp_path, tiny_sd, pickapic_clean, name, **kw):
    out = tmp_path / name
    cfg = write_config(
        tmp_path / f"{name}.yaml",
        model=tiny_sd,
        train_data=pickapic_clean,
        objective="dpo",
        max_steps=2,
        learning_rate=1e-3,
        output_dir=out,
        **kw,
    )
    assert train_here(cfg) == 0
    return out


def _changed(out, tiny_sd) -> bool:
    from diffusers import UNet2DConditionModel

    a = UNet2DConditionModel.from_pretrained(str(out / "export" / "unet")).state_dict()
    b = UNet2DConditionModel.from_pretrained(str(tiny_sd / "unet")).state_dict()
    return any(not torch.equal(a[k], b[k]) for k in a)


def test_adafactor_full_finetune_trains(tmp_path, tiny_sd, pickapic_clean):
    out = _full_run(tmp_path, tiny_sd, pickapic_clean, "ada", optimizer="adafactor")
    rows = read_metrics(out)
    assert [r["step"] for r in rows] == [1, 2] and all(r["loss"] == r["loss"] for r in rows)
    assert _changed(out, tiny_sd)


def test_zero2_cpu_offload_step_on_the_cpu_accelerator(tmp_path, tiny_sd, pickapic_clean):
    """DeepSpeed's CPU accelerator runs ZeRO-Offload (the optimizer on the CPU copies) as is."""
    out = _full_run(tmp_path, tiny_sd, pickapic_clean, "off", zero_stage=2, offload_optimizer="cpu")
    assert [r["step"] for r in read_metrics(out)] == [1, 2]
    assert _changed(out, tiny_sd)


def test_adamw_is_fused_where_torch_has_the_kernel():
    """``optimizer: adamw`` takes torch's fused AdamW for float parameters on the CPU (and
    CUDA); its update equals the default implementation's to float32 rounding, and a
    checkpoint keeps the implementation it was written with."""
    from snpo.trainer.setup import adamw_implementation

    assert adamw_implementation([torch.zeros(2)]) == {"fused": True}
    assert adamw_implementation([torch.zeros(2, dtype=torch.bfloat16)]) == {"fused": True}
    assert adamw_implementation([torch.zeros(2, dtype=torch.long)]) == {}
    assert adamw_implementation([]) == {}
    gen = torch.Generator().manual_seed(0)
    w0 = torch.randn(64, 33, generator=gen)
    grads = [torch.randn(64, 33, generator=gen) for _ in range(4)]
    out = {}
    for fused in (True, False):
        p = torch.nn.Parameter(w0.clone())
        if fused:
            opt = build_optimizer(TrainConfig(), [p], 1e-3)
            assert opt.param_groups[0]["fused"] is True
        else:
            opt = torch.optim.AdamW([p], lr=1e-3, weight_decay=1e-2)
        for g in grads:
            p.grad = g.clone()
            opt.step()
        out[fused] = (p.detach().clone(), opt.state_dict())
    # 4 steps of lr 1e-3 move each weight by ≤ 4e-3; the two implementations round the same
    # float32 update differently: |Δ| ≤ a few ulps of the weights (|w| < 6 here)
    torch.testing.assert_close(out[True][0], out[False][0], rtol=0, atol=1e-6)
    assert not torch.equal(out[True][0], w0)
    p = torch.nn.Parameter(w0.clone())
    resumed = build_optimizer(TrainConfig(), [p], 1e-3)
    resumed.load_state_dict(out[False][1])  # a checkpoint of the default implementation
    assert not resumed.param_groups[0]["fused"]
