"""The family registry: detection from the folder, loading through the family, errors."""

from __future__ import annotations

import json

import pytest

from snpo.models import (
    FAMILIES,
    ModelLoadError,
    detect_family,
    family_of,
    get_family,
    load_families,
    load_model,
    lora_config,
    save_tiny_model,
)


@pytest.fixture(scope="module")
def folders(tmp_path_factory):
    root = tmp_path_factory.mktemp("families")
    return {
        "sd": save_tiny_model(root / "sd", family="sd"),
        "sdxl": save_tiny_model(root / "sdxl", family="sdxl"),
        "pixel": save_tiny_model(root / "px", with_vae=False, resolution=8),
    }


def test_sd_and_sdxl_are_registered():
    families = load_families()
    assert {"sd", "sdxl"} <= set(families) and families is FAMILIES
    sd, sdxl = get_family("sd"), get_family("sdxl")
    assert sd.denoiser == sdxl.denoiser == "unet" and not sd.flow and not sdxl.flow
    assert sdxl.needs_time_ids and not sd.needs_time_ids
    assert sd.pipeline_class == "StableDiffusionPipeline"
    assert sdxl.pipeline_class == "StableDiffusionXLPipeline"
    with pytest.raises(ValueError, match="unknown model family 'nope'; known: .*sd"):
        get_family("nope")


def test_detection_and_loading_through_the_family(folders):
    for name, expect in (("sd", "sd"), ("sdxl", "sdxl"), ("pixel", "sd")):
        assert detect_family(str(folders[name])) == expect
        m = load_model(str(folders[name]))
        assert m.family == expect and family_of(m) is m.spec is get_family(expect)
        assert m.denoiser is m.unet and not m.unet.training
        assert all(not p.requires_grad for p in m.unet.parameters())
    assert load_model(str(folders["sdxl"])).null_kind == "zeros"
    assert load_model(str(folders["sd"])).null_kind == "empty_prompt"


def test_unknown_folders_name_the_known_families(tmp_path):
    (tmp_path / "transformerless").mkdir()
    (tmp_path / "model_index.json").write_text(json.dumps({"_class_name": "SomethingElse"}))
    with pytest.raises(
        ModelLoadError, match=r"known family.*no unet/ subfolder \([a-z0-9_, ]*sd, sdxl"
    ):
        load_model(str(tmp_path))


def test_lora_config_and_family_targets():
    cfg = lora_config(get_family("sd").lora_targets, 4)
    assert cfg.r == 4 and cfg.lora_alpha == 4
    assert set(cfg.target_modules) == {"to_q", "to_k", "to_v", "to_out.0"}
    g = lora_config(["to_q"], 8, 16.0, gaussian_init=True)
    assert g.lora_alpha == 16.0 and g.init_lora_weights == "gaussian"
    with pytest.raises(ValueError, match="rank"):
        lora_config(["to_q"], 0)


def test_every_family_names_its_denoiser_class():
    """The export/ZeRO-3 loader builds the denoiser from ``denoiser_class``: it must be a
    diffusers model class whose name matches the family's denoiser kind."""
    import diffusers

    from snpo.models import load_families

    for fam in load_families().values():
        cls = getattr(diffusers, fam.denoiser_class)
        assert issubclass(cls, diffusers.ModelMixin)
        assert ("UNet" in fam.denoiser_class) == (fam.denoiser == "unet"), fam.name
