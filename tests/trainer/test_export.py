"""Exports: full and LoRA, atomic replacement, loading back (diffusers loaders), bad folders."""

from __future__ import annotations

import json

import pytest
import torch

from snpo.models import (
    ExportError,
    load_export,
    load_model,
    read_export_meta,
    save_tiny_model,
    write_export,
)


@pytest.fixture(scope="module")
def base(tmp_path_factory):
    return save_tiny_model(tmp_path_factory.mktemp("base"), with_vae=False, resolution=8)


def _perturb(unet):
    with torch.no_grad():
        for p in unet.parameters():
            if p.requires_grad:
                p.add_(0.1 * torch.randn_like(p))


def _out(unet, model):
    from snpo.models import encode_prompts, unet_conditioning

    torch.manual_seed(0)
    x = torch.randn(1, 3, 8, 8)
    return unet(
        x, torch.tensor([50]), **unet_conditioning(model, encode_prompts(model, ["a cat"]))
    ).sample


def test_full_export_roundtrip_and_diffusers_loads_it(base, tmp_path):
    from diffusers import UNet2DConditionModel

    m = load_model(str(base))
    _perturb(m.unet)
    want = _out(m.unet, m)
    out = write_export(tmp_path / "exp", m, m.unet, lora=False, meta={"objective": "snpo"})
    assert read_export_meta(out)["objective"] == "snpo"
    m2, meta = load_export(out)
    assert meta["kind"] == "full" and meta["null_kind"] == "empty_prompt"
    torch.testing.assert_close(_out(m2.unet, m2), want)
    direct = UNet2DConditionModel.from_pretrained(out / "unet")
    torch.testing.assert_close(_out(direct, m2), want)


def test_lora_export_roundtrip(base, tmp_path):
    from peft import LoraConfig

    m = load_model(str(base))
    m.unet.add_adapter(
        LoraConfig(
            r=4,
            lora_alpha=4,
            target_modules=["to_q", "to_k", "to_v", "to_out.0"],
            init_lora_weights="gaussian",
        )
    )
    _perturb(m.unet)  # only LoRA params require grad after add_adapter? perturb all trainable
    want = _out(m.unet, m)
    out = write_export(tmp_path / "lora", m, m.unet, lora=True, meta={})
    assert (out / "pytorch_lora_weights.safetensors").is_file()
    m2, meta = load_export(out)
    assert meta["kind"] == "lora"
    torch.testing.assert_close(_out(m2.unet, m2), want, rtol=1e-4, atol=1e-5)


def test_atomic_replace_and_bad_exports(base, tmp_path):
    m = load_model(str(base))
    out = write_export(tmp_path / "e", m, m.unet, lora=False, meta={"step": 1})
    write_export(tmp_path / "e", m, m.unet, lora=False, meta={"step": 2})
    assert json.loads((out / "snpo_export.json").read_text())["step"] == 2
    assert not (tmp_path / "e.partial").exists() and not (tmp_path / "e.old").exists()
    with pytest.raises(ExportError, match="snpo_export.json is missing"):
        read_export_meta(tmp_path)
    (tmp_path / "bad").mkdir()
    (tmp_path / "bad" / "snpo_export.json").write_text(json.dumps({"kind": "lora"}))
    with pytest.raises(ExportError, match="no pytorch_lora_weights.safetensors"):
        read_export_meta(tmp_path / "bad")
