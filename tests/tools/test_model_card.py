"""The export's model card (README.md): hub YAML header, content of LoRA and full exports, merge
exports, byte-identical repeated exports (sorted LoRA metadata), diffusers still loads them."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest
import torch
import yaml

from snpo.models import load_model, write_export
from snpo.models.model_card import card_header, data_fingerprint, model_card, read_metrics

DATA = [
    {"file": "train-0.parquet", "bytes": 1234, "rows": 16, "label_0": "sha256:ab"},
    {"file": "train-1.parquet", "bytes": 99, "rows": 2, "label_0": "sha256:cd"},
]


def _header(text: str) -> dict:
    assert text.startswith("---\n")
    head, sep, _ = text[4:].partition("\n---\n")
    assert sep, "no closing --- of the YAML header"
    return yaml.safe_load(head)


def _run(tmp_path, objective="snpo", records=None):
    """A run folder with a metrics.jsonl (one record past the exported step) and its meta."""
    run = tmp_path / "run"
    run.mkdir()
    records = records or [
        {"step": 1, "loss": 0.7, "pairs": 4, "accuracy_cond": 0.5, "accuracy_uncond": None,
         "logp_proxy": -0.01, "grad_norm": 1.5, "seconds": 0.3},
        {"step": 2, "loss": 0.6, "pairs": 4, "accuracy_cond": 0.75, "accuracy_uncond": 0.25,
         "logp_proxy": -0.02, "grad_norm": 1.25, "seconds": 0.4},
        {"step": 3, "loss": 9.0, "pairs": 4, "grad_norm": 7.0},
    ]  # fmt: skip
    (run / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in records))
    meta = {
        "objective": objective,
        "beta": 2500.0,
        "lam": 0.9,
        "uncond_prob": 0.2,
        "weighting": "none",
        "inputs": {"latents": "live", "text": "live", "ref": "live"},
        "data": DATA,
        "step": 2,
        "config": {"output_dir": str(run), "train_data": ["train-0.parquet"], "revision": "v1"},
    }
    return run, meta


def _add_lora(model):
    from peft import LoraConfig

    model.unet.add_adapter(
        LoraConfig(
            r=4,
            lora_alpha=8,
            target_modules=["to_v", "to_q", "to_out.0", "to_k"],
            init_lora_weights="gaussian",
        )
    )


def test_lora_export_card(sd_model, tmp_path):
    m = load_model(str(sd_model))
    _add_lora(m)
    run, meta = _run(tmp_path)
    out = write_export(run / "export", m, m.unet, lora=True, meta=meta)
    text = (out / "README.md").read_text()
    head = _header(text)
    assert head["library_name"] == "diffusers"
    assert {"diffusers", "text-to-image", "stable-diffusion", "snpo", "lora"} <= set(head["tags"])
    assert "base_model" not in head  # a local folder is no hub id
    assert "license" not in head  # not known
    assert str(sd_model.resolve()) in text and "revision `v1`" in text
    assert "β**: 2500" in text and "Diffusion-DPO code convention" in text
    assert "λ**: 0.9" in text and "`empty_prompt`" in text
    assert data_fingerprint(DATA) in text and "train-1.parquet" in text
    # metrics up to the exported step (2): pairs seen 8, last loss 0.6, not step 3's
    assert "pairs seen**: 8" in text and "| loss | 0.6 |" in text and "| 9" not in text
    assert "| accuracy_uncond | 0.25 |" in text and "seconds" not in text
    assert "StableDiffusionPipeline.from_pretrained" in text and "load_lora_weights" in text
    assert 'image = pipe("a photo of a cat", guidance_scale=7.5' in text
    assert "snpo merge" not in text  # not an NPO run
    from diffusers import StableDiffusionPipeline

    pipe = StableDiffusionPipeline.from_pretrained(str(sd_model), safety_checker=None)
    pipe.load_lora_weights(str(out))  # the card beside the weights changes nothing for diffusers
    assert any("lora_A" in k for k in pipe.unet.state_dict())


def test_full_export_card_npo_and_diffusers_loads(sd_model, tmp_path):
    from diffusers import StableDiffusionPipeline, UNet2DConditionModel

    m = load_model(str(sd_model))
    run, meta = _run(tmp_path, objective="npo")
    out = write_export(run / "export", m, m.unet, lora=False, meta=meta)
    text = (out / "README.md").read_text()
    head = _header(text)
    assert "lora" not in head["tags"] and "npo" in head["tags"]
    assert 'subfolder="unet"' in text and "load_lora_weights" not in text
    assert "image = pipe(" in text and "unet=unet" in text
    assert "snpo merge --reference" in text and "--negative" in text
    # stock diffusers loads the export folder with its README.md
    unet = UNet2DConditionModel.from_pretrained(out, subfolder="unet")
    pipe = StableDiffusionPipeline.from_pretrained(str(sd_model), unet=unet, safety_checker=None)
    torch.testing.assert_close(pipe.unet.state_dict(), m.unet.state_dict())


def test_hub_base_license_and_merge_meta():
    info = {
        "base_model": "stabilityai/stable-diffusion-xl-base-1.0",
        "family": "sdxl",
        "kind": "lora",
        "pipeline_class": "StableDiffusionXLPipeline",
        "denoiser": "unet",
        "denoiser_class": "UNet2DConditionModel",
        "null_kind": "zeros",
        "objective": "npo_merged",
        "merge": {"alpha": 1.0, "beta": 0.5, "reference": "stabilityai/x"},
        "license": "openrail++",
    }
    head = card_header(info)
    assert head["base_model"] == info["base_model"] and head["license"] == "openrail++"
    assert "stable-diffusion-xl" in head["tags"]
    text = model_card(info)
    assert _header(text) == head
    assert "beta: `0.5`" in text and "force_zeros_for_empty_prompt" in text
    assert "StableDiffusionXLPipeline" in text and "Training" not in text


def test_read_metrics_skips_torn_lines(tmp_path):
    f = tmp_path / "metrics.jsonl"
    f.write_text('{"step": 1, "loss": 1.0}\n{"step": 2, "lo\n{"step": 3, "loss": 0.5}\n')
    assert [r["step"] for r in read_metrics(f)] == [1, 3]
    assert [r["step"] for r in read_metrics(f, until_step=2)] == [1]
    assert read_metrics(tmp_path / "absent.jsonl") == []


_EXPORT = """
import sys, torch
from peft import LoraConfig
from snpo.models import load_model, write_export
m = load_model(sys.argv[1])
torch.manual_seed(0)
m.unet.add_adapter(LoraConfig(r=4, lora_alpha=8, init_lora_weights="gaussian",
    target_modules=["to_v", "to_q", "to_out.0", "to_k", "proj_in", "proj_out", "ff.net.2"]))
write_export(sys.argv[2], m, m.unet, lora=True, meta={"objective": "snpo", "step": 1})
"""


@pytest.mark.parametrize("lora", [True, False])
def test_identical_exports_are_byte_identical(sd_model, tmp_path, lora):
    if lora:  # separate processes: string hashing (set order) differs between them
        for name, seed in (("a", "1"), ("b", "2")):
            proc = subprocess.run(
                [sys.executable, "-c", _EXPORT, str(sd_model), str(tmp_path / name)],
                env={"PYTHONHASHSEED": seed, "PATH": "/usr/bin:/bin"},
                capture_output=True,
                text=True,
                timeout=300,
            )
            assert proc.returncode == 0, proc.stderr[-2000:]
    else:
        m = load_model(str(sd_model))
        run, meta = _run(tmp_path)
        for name in ("a", "b"):
            write_export(tmp_path / name, m, m.unet, lora=False, meta=meta)
    files_a = sorted(p.relative_to(tmp_path / "a") for p in (tmp_path / "a").rglob("*"))
    files_b = sorted(p.relative_to(tmp_path / "b") for p in (tmp_path / "b").rglob("*"))
    assert files_a == files_b and any(p.name == "README.md" for p in files_a)
    for rel in files_a:
        if (tmp_path / "a" / rel).is_file():
            a, b = (tmp_path / "a" / rel).read_bytes(), (tmp_path / "b" / rel).read_bytes()
            assert a == b, f"{rel} differs between two identical exports"
    if lora:
        from safetensors import safe_open

        with safe_open(tmp_path / "a" / "pytorch_lora_weights.safetensors", "pt") as fh:
            cfg = json.loads(fh.metadata()["lora_adapter_metadata"])
        mods = cfg["unet.target_modules"]
        assert len(mods) == 7 and mods == sorted(mods)


def test_trainer_export_card(tmp_path, sd_model):
    """A real (tiny, 2-step LoRA) run: the card names the data file, its fingerprint from the
    trainer's data identity, the steps and the pairs the metrics counted."""
    from snpo.data import write_pickapic_parquet
    from tests.trainer.conftest import pickapic_rows, train_here, write_config

    rows = [r for i, r in enumerate(pickapic_rows()) if i not in (2, 3)][:8]
    data = write_pickapic_parquet(tmp_path / "clean.parquet", rows)
    out = tmp_path / "run"
    cfg = write_config(
        tmp_path / "c.yaml",
        model=sd_model,
        train_data=data,
        objective="dpo",
        max_steps=2,
        lora_rank=2,
        output_dir=out,
    )
    assert train_here(cfg) == 0
    meta = json.loads((out / "export" / "snpo_export.json").read_text())
    assert [d["file"] for d in meta["data"]] == ["clean.parquet"]
    text = (out / "export" / "README.md").read_text()
    assert "clean.parquet" in text and data_fingerprint(meta["data"]) in text
    pairs = sum(r["pairs"] for r in read_metrics(out / "metrics.jsonl"))
    assert pairs > 0 and f"pairs seen**: {pairs}" in text
    assert "optimizer steps**: 2" in text and "lora" in _header(text)["tags"]
