"""snpo sample: PNGs, grids, manifest; null embedding from the export; Diffusion-NPO negative
model (SD1.5- and SDXL-class); batching; argument errors."""

from __future__ import annotations

import json

import pytest
import torch
from PIL import Image

from snpo import cli
from snpo.data import contact_sheet, from_pil, to_pil
from snpo.models.trained import load_any
from snpo.tools.sample import (
    SampleError,
    build_entries,
    parse_named,
    parse_seeds,
    read_prompts,
    run_sampling,
)

from .helpers import perturbed_full_export


def _png(path) -> torch.Tensor:
    return from_pil(Image.open(path))


def test_sample_cli_writes_pngs_grid_manifest(sd_model, tmp_path, capsys):
    prompts = tmp_path / "p.jsonl"
    prompts.write_text('{"prompt": "a red cube"}\n\n{"prompt": "a blue ball", "id": 3}\n')
    export = perturbed_full_export(sd_model, tmp_path / "aligned", seed=1)
    out = tmp_path / "out"
    rc = cli.main(
        [
            "sample",
            "--model",
            f"base={sd_model}",
            "--model",
            f"snpo={export}",
            "--prompts",
            str(prompts),
            "--seeds",
            "0-2",
            "--steps",
            "3",
            "--batch-size",
            "4",
            "--out",
            str(out),
            "--no-progress",
        ]
    )
    assert rc == 0, capsys.readouterr().err
    man = json.loads((out / "manifest.json").read_text())
    assert len(man["images"]) == 2 * 2 * 3
    assert man["settings"]["guidance_scale"] == 7.5 and man["settings"]["scheduler"] == "ddim"
    assert man["models"]["snpo"]["kind"] == "export-full"
    assert man["models"]["snpo"]["null_kind"] == "empty_prompt"
    for rec in man["images"]:
        img = Image.open(out / rec["file"])
        assert img.size == (16, 16) and img.format == "PNG"
        assert {"model", "prompt", "seed", "guidance_scale", "file"} <= set(rec)
    assert [g["file"] for g in man["grids"]] == ["grids/p0000.png", "grids/p0001.png"]
    grid = Image.open(out / "grids" / "p0000.png")
    assert grid.width > 2 * 64 and grid.height > 3 * 64  # 2 model columns × 3 seed rows
    # same seed, same prompt: the same initial noise for both models, yet different weights
    a = _png(out / "images/base/p0000_s0.png")
    b = _png(out / "images/snpo/p0000_s0.png")
    assert not torch.equal(a, b)


def test_images_do_not_depend_on_batch_size(pix_model, tmp_path):
    entries = build_entries({"m": str(pix_model)}, {}, dtype=torch.float32, device="cpu")
    kw = dict(steps=3, progress=False, grids=False)
    run_sampling(entries, ["a red cube", "a cat"], [0, 5], tmp_path / "b1", batch_size=1, **kw)
    run_sampling(entries, ["a red cube", "a cat"], [0, 5], tmp_path / "b3", batch_size=3, **kw)
    for name in ("p0000_s0.png", "p0000_s5.png", "p0001_s0.png", "p0001_s5.png"):
        x = _png(tmp_path / "b1/images/m" / name)
        y = _png(tmp_path / "b3/images/m" / name)
        assert (x - y).abs().max() <= 1.5 / 255  # uint8 rounding of float noise only


def test_cfg_uses_the_exports_null_kind(pix_model, tmp_path):
    exp = perturbed_full_export(pix_model, tmp_path / "e", seed=2)
    meta = json.loads((exp / "snpo_export.json").read_text())
    meta["null_kind"] = "zeros"
    (exp / "snpo_export.json").write_text(json.dumps(meta))
    [e] = build_entries({"e": str(exp)}, {}, dtype=torch.float32, device="cpu")
    assert e.info["null_kind"] == "zeros"
    assert torch.count_nonzero(e.null.embeds) == 0
    [b] = build_entries({"b": str(pix_model)}, {}, dtype=torch.float32, device="cpu")
    assert torch.count_nonzero(b.null.embeds) > 0  # the encoded empty prompt


@pytest.mark.parametrize("family", ["sd", "sdxl"])
def test_npo_negative_model(family, tmp_path):
    """A negative model equal to the model reproduces plain CFG; a different one changes it."""
    from snpo.models import encode_prompts, generate, save_tiny_model

    from .conftest import WORDS

    base = save_tiny_model(tmp_path / "b", family=family, words=WORDS, resolution=8, with_vae=False)
    other = perturbed_full_export(base, tmp_path / "o", seed=3, scale=0.2)
    plain, same, diff = (
        build_entries({"m": str(base)}, neg, dtype=torch.float32, device="cpu")[0]
        for neg in ({}, {"m": str(base)}, {"m": str(other)})
    )
    assert same.negative_unet is not None and same.negative_unet is not plain.model.unet
    cond = encode_prompts(plain.model, ["a red cube", "a blue ball"])
    kw = dict(guidance_scale=5.0, steps=4)
    x0 = generate(plain.model, cond, plain.null, [0, 1], **kw)
    x1 = generate(same.model, cond, same.null, [0, 1], negative_unet=same.negative_unet, **kw)
    x2 = generate(diff.model, cond, diff.null, [0, 1], negative_unet=diff.negative_unet, **kw)
    torch.testing.assert_close(x1, x0, rtol=0, atol=1e-4)
    assert (x2 - x0).abs().mean() > 1e-3
    # at guidance 1 the null branch cancels: the negative model is not run and changes nothing
    kw1 = dict(guidance_scale=1.0, steps=4)
    y0 = generate(plain.model, cond, plain.null, [0, 1], **kw1)
    y2 = generate(diff.model, cond, diff.null, [0, 1], negative_unet=diff.negative_unet, **kw1)
    torch.testing.assert_close(y2, y0, rtol=0, atol=0)


def test_negative_cli_and_argument_errors(pix_model, pix_model_other, tmp_path, capsys):
    out = tmp_path / "o"
    rc = cli.main(
        [
            "sample",
            "--model",
            str(pix_model),
            "--negative",
            str(pix_model_other),
            "--prompt",
            "a cat",
            "--seeds",
            "1",
            "--steps",
            "2",
            "--out",
            str(out),
            "--no-progress",
        ]
    )
    assert rc == 0, capsys.readouterr().err
    man = json.loads((out / "manifest.json").read_text())
    assert man["images"][0]["negative"] == str(pix_model_other)
    assert man["models"]["m"]["negative"]["source"] == str(pix_model_other)

    def err(*argv):
        rc = cli.main(["sample", "--out", str(tmp_path / "x"), "--prompt", "a", *argv])
        assert rc == 2
        return capsys.readouterr().err

    two = ["--model", f"a={pix_model}", "--model", f"b={pix_model}"]
    assert "say which one" in err(*two, "--negative", str(pix_model))
    assert "no --model is named 'c'" in err(*two, "--negative", f"c={pix_model}")
    ds = tmp_path / "ds"
    (ds / "global_step10").mkdir(parents=True)
    (ds / "latest").write_text("global_step10")
    assert "DeepSpeed checkpoint" in err("--model", str(ds))
    assert "bare UNet folder" in err("--model", str(pix_model / "unet"))
    assert "neither an snpo export" in err("--model", str(tmp_path))


def test_bare_unet_folder_with_base_model(pix_model):
    m, info = load_any(str(pix_model / "unet"), base_model=str(pix_model))
    assert info["kind"] == "unet" and m.family == "sd"


def test_prompt_and_seed_parsing(tmp_path):
    f = tmp_path / "p.txt"
    f.write_text("a red cube\n\n  a blue ball  \n")
    assert read_prompts(f) == ["a red cube", "a blue ball"]
    j = tmp_path / "p.jsonl"
    j.write_text('{"caption": "x"}\n{"nope": 1}\n')
    with pytest.raises(SampleError, match=r"p.jsonl:2"):
        read_prompts(j)
    assert parse_seeds("0-3") == [0, 1, 2, 3] and parse_seeds("5,7") == [5, 7]
    with pytest.raises(SampleError, match="repeated"):
        parse_seeds("1,1")
    assert parse_named(["base=/x/y", "/a/b/snpo"], "--model") == {
        "base": "/x/y",
        "snpo": "/a/b/snpo",
    }
    with pytest.raises(SampleError, match="given twice"):
        parse_named(["/a/m", "/b/m"], "--model")


def test_contact_sheet_and_pil_roundtrip():
    x = torch.rand(3, 8, 8)
    y = from_pil(to_pil(x))
    assert (x - y).abs().max() <= 0.5 / 255 + 1e-6
    sheet = contact_sheet([[x, None], [x, x]], col_labels=["a", "b"], row_labels=["s0", "s1"])
    assert sheet.mode == "RGB" and sheet.width > 2 * 64 and sheet.height > 2 * 64
