"""``snpo estimate``: parameter counts from configs on the meta device (a tiny SD folder, the
known architectures), the memory formulas per ZeRO stage and offload, and the command."""

from __future__ import annotations

import json

import pytest
import torch
import yaml

from snpo.config import TrainConfig
from snpo.tools.estimate import (
    adafactor_floats,
    count_arch,
    count_folder,
    main,
    memory_rows,
)


def _config(tmp_path, **kw):
    values = {"model": "owner/not-here", "train_data": ["x.parquet"], "precision": "bf16", **kw}
    values = {k: str(v) if hasattr(v, "is_dir") else v for k, v in values.items()}
    p = tmp_path / "c.yaml"
    p.write_text(yaml.safe_dump(values))
    return p


def test_counts_of_a_model_folder_match_the_loaded_model(sd_model):
    from diffusers import UNet2DConditionModel
    from transformers import CLIPTextModel

    from snpo.models import lora_config

    unet = UNet2DConditionModel.from_pretrained(str(sd_model / "unet"))
    n_unet = sum(p.numel() for p in unet.parameters())
    c = count_folder(TrainConfig(model=str(sd_model), objective="dpo"), sd_model)
    assert c.trainable == n_unet and c.frozen_denoiser == 0 and c.reference == n_unet
    text = CLIPTextModel.from_pretrained(str(sd_model / "text_encoder"))
    assert c.components["text_encoder"] == sum(p.numel() for p in text.parameters())
    assert "vae" in c.components and c.encoders == sum(c.components.values())
    sft = count_folder(TrainConfig(model=str(sd_model), objective="sft"), sd_model)
    assert sft.reference == 0  # sft has no reference copy

    cfg = TrainConfig(model=str(sd_model), lora_rank=4)
    unet.requires_grad_(False)
    unet.add_adapter(lora_config(cfg.lora_targets, 4, None))
    n_lora = sum(p.numel() for p in unet.parameters() if p.requires_grad)
    lc = count_folder(cfg, sd_model)
    assert lc.trainable == n_lora and lc.frozen_denoiser == n_unet and lc.reference == 0


def test_known_architectures():
    c = count_arch(TrainConfig(model="x/y"), "sd15")
    assert c.trainable == 859_520_964  # the SD1.5 UNet
    xl = count_arch(TrainConfig(model="x/y", lora_rank=8), "sdxl")
    assert xl.frozen_denoiser == 2_567_463_684 and 0 < xl.trainable < xl.frozen_denoiser / 100


def test_adafactor_floats_match_transformers_state():
    """The count is what transformers' Adafactor allocates (a conv kernel factors its last two
    dimensions only)."""
    from transformers.optimization import Adafactor

    shapes = [(4, 3), (5,), (2, 6, 7), (8, 4, 3, 3)]
    params = [torch.nn.Parameter(torch.ones(s)) for s in shapes]
    opt = Adafactor(params, lr=1e-3, relative_step=False, scale_parameter=False)
    for p in params:
        p.grad = torch.ones_like(p)
    opt.step()
    held = sum(
        t.numel() for st in opt.state.values() for k, t in st.items() if k.startswith("exp_avg")
    )
    assert adafactor_floats(shapes) == held == (4 + 3) + 5 + 2 * (6 + 7) + 8 * 4 * (3 + 3)


def test_memory_formulas():
    c = count_arch(TrainConfig(model="x/y"), "sd15")
    psi, n = c.trainable, 8
    cfg = TrainConfig(model="x/y", precision="bf16")
    rows = {(r["zero_stage"], r["offload"]): r for r in memory_rows(cfg, c, n)}
    z0, z1, z2, z3 = (rows[(s, "none")] for s in range(4))
    assert z0["weights"] == 2 * psi and z0["gradients"] == 2 * psi
    assert z0["optimizer"] == 12 * psi  # fp32 master 4 + two fp32 AdamW moments 8
    assert z1["optimizer"] == 12 * psi / n and z2["gradients"] == 2 * psi / n
    assert z3["weights"] == 2 * psi / n
    assert z0["frozen"] == 2 * (c.reference + c.encoders)
    assert z0["total"] > z1["total"] > z2["total"] > z3["total"]
    off = rows[(2, "optimizer")]
    assert off["optimizer"] == 0 and off["cpu_per_node"] == 12 * psi
    assert rows[(3, "optimizer+param")]["weights"] == 0
    fp32 = memory_rows(TrainConfig(model="x/y"), c, 1)[0]
    assert fp32["optimizer"] == 8 * psi and fp32["weights"] == 4 * psi  # no master copy
    ada = memory_rows(TrainConfig(model="x/y", optimizer="adafactor"), c, 1)[0]  # fp32 ZeRO-0
    assert ada["optimizer"] == 4 * c.adafactor_floats < 4 * psi  # factored
    ada = memory_rows(TrainConfig(model="x/y", precision="bf16", optimizer="adafactor"), c, 1)[0]
    eight = memory_rows(TrainConfig(model="x/y", precision="bf16", optimizer="adamw8bit"), c, 1)
    assert ada["optimizer"] == 4 * psi + 4 * psi  # DeepSpeed's flat partitions: not factored
    assert eight[0]["optimizer"] == (4 + 2) * psi


def test_command(tmp_path, sd_model, capsys):
    cfg = _config(tmp_path, model=sd_model, lora_rank=4)
    assert main([str(cfg), "--gpus_per_node", "2", "--measure"]) == 0
    out = capsys.readouterr().out
    assert "LoRA rank 4" in out and "| 3 | optimizer+param |" in out
    if not torch.cuda.is_available():
        assert "activations: not measured (no CUDA device" in out
    assert main([str(cfg), "--json", "--max_train_pairs", "3"]) == 0
    rows = json.loads(capsys.readouterr().out)["rows"]
    assert len(rows) == 8 and rows[0]["zero_stage"] == 0

    hub = _config(tmp_path)  # a hub id that is not here: --arch is the way out
    assert main([str(hub)]) == 2
    assert "--arch" in capsys.readouterr().err
    assert main([str(hub), "--arch", "sdxl", "--nodes", "2", "--gpus_per_node", "8"]) == 0
    assert "16 GPU(s)" in capsys.readouterr().out


@pytest.mark.parametrize("bad", [["--nodes", "0"], ["--lora_rank", "-1"]])
def test_bad_arguments(tmp_path, bad, capsys):
    assert main([str(_config(tmp_path)), "--arch", "sd15", *bad]) == 2
    assert "snpo estimate: error" in capsys.readouterr().err
