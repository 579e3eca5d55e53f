"""snpo.models.trained: what a source is, the dtype and device options, null embeddings of either
kind, the negative-model interface check."""

from __future__ import annotations

import pytest
import torch

from snpo.models import ModelLoadError, load_model, null_embedding
from snpo.models.trained import (
    IncompatibleModelError,
    check_negative_compatible,
    is_deepspeed_checkpoint,
    is_unet_folder,
    load_any,
    null_for,
    resolve_dtype,
)


def test_source_kinds(pix_model, tmp_path):
    assert is_unet_folder(pix_model / "unet") and not is_unet_folder(pix_model)
    (tmp_path / "ds" / "global_step3").mkdir(parents=True)
    assert is_deepspeed_checkpoint(tmp_path / "ds") and not is_deepspeed_checkpoint(pix_model)
    (tmp_path / "bad").mkdir()
    (tmp_path / "bad" / "config.json").write_text("{not json")
    assert not is_unet_folder(tmp_path / "bad")
    model, info = load_any(str(pix_model))
    assert info["kind"] == "model" and info["meta"] == {} and info["null_kind"] == "empty_prompt"
    with pytest.raises(ModelLoadError, match="DeepSpeed checkpoint"):
        load_any(str(tmp_path / "ds"))


def test_dtype_names_are_the_precision_table():
    assert resolve_dtype("auto", "cpu") == torch.float32
    assert resolve_dtype("auto", "cuda:0") == torch.float16
    assert resolve_dtype("bf16", "cpu") == resolve_dtype("bfloat16", "cpu") == torch.bfloat16
    with pytest.raises(ModelLoadError, match="fp32.*auto"):
        resolve_dtype("half", "cpu")


def test_null_for_either_kind(pix_model):
    model = load_model(str(pix_model))
    same = null_for(model, "empty_prompt")
    torch.testing.assert_close(same.embeds, null_embedding(model).embeds)
    zeros = null_for(model, "zeros")
    assert zeros.embeds.shape == same.embeds.shape and not zeros.embeds.any()
    assert not model.force_zeros_for_empty_prompt  # the model itself is left as it was
    with pytest.raises(ModelLoadError, match="null embedding kind"):
        null_for(model, "random")


def test_negative_must_share_the_unet_interface(pix_model, sd_model):
    pix, sd = load_model(str(pix_model)), load_model(str(sd_model))
    check_negative_compatible(pix, pix, "--negative x")
    with pytest.raises(IncompatibleModelError, match="--negative x: the negative UNet") as err:
        check_negative_compatible(pix, sd, "--negative x")
    assert "in_channels" in str(err.value)
    assert isinstance(err.value, ModelLoadError)  # the tools report it as a load error
