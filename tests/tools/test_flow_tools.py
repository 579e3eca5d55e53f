"""snpo sample, merge and eval on flow-matching models: SD3-class (CFG with the export's null
embedding, Diffusion-NPO negative, the NPO merge of full and LoRA transformer weights that stock
diffusers loads, implicit accuracy noised through the family) and FLUX-class (embedded guidance,
one-line refusals of what has no null branch)."""

from __future__ import annotations

import json

import pytest
import torch

from snpo import cli
from snpo.models import load_export, load_model, lora_config, write_export

RES = 16  # pixels: the tiny flow models' 2× VAE and 2×2 patches → 4 × 4 tokens


def _full_export(base, out, seed: int, scale: float = 0.05, meta: dict | None = None):
    """A full export of ``base`` with every transformer weight nudged by seeded noise."""
    m = load_model(str(base))
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in m.denoiser.parameters():
            p.add_(scale * torch.randn(p.shape, generator=g))
    return write_export(out, m, m.denoiser, lora=False, meta=meta or {"objective": "dpo"})


def _lora_export(base, out, seed: int, rank: int = 2, alpha: float = 4.0):
    """A LoRA export of ``base`` on the family's ``lora_targets`` with random factors."""
    m = load_model(str(base))
    m.denoiser.add_adapter(lora_config(m.spec.lora_targets, rank, alpha, gaussian_init=True))
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for n, p in m.denoiser.named_parameters():
            if "lora_B" in n:
                p.copy_(0.2 * torch.randn(p.shape, generator=g))
    return write_export(out, m, m.denoiser, lora=True, meta={"objective": "npo"})


def _weights(folder):
    from safetensors.torch import load_file

    return load_file(str(folder / "diffusion_pytorch_model.safetensors"))


@pytest.fixture(scope="module")
def sd3(tmp_path_factory):
    """(base, full export, LoRA export) of a tiny SD3-class model."""
    from snpo.models.tiny_flow import save_tiny_sd3

    root = tmp_path_factory.mktemp("sd3")
    base = save_tiny_sd3(root / "base", resolution=RES)
    return base, _full_export(base, root / "full", seed=1), _lora_export(base, root / "lora", 2)


@pytest.fixture(scope="module")
def flux(tmp_path_factory):
    from snpo.models.tiny_flow import save_tiny_flux

    return save_tiny_flux(tmp_path_factory.mktemp("flux") / "base", resolution=RES)


def _sample(*argv) -> list[str]:
    return ["sample", "--prompt", "a red cube", "--seeds", "0", "--steps", "2", "--no-progress"] + [
        *argv
    ]


def test_sd3_sample_base_exports_and_negative(sd3, tmp_path, capsys):
    from snpo.models import encode_prompts, generate
    from snpo.tools.sample import build_entries

    base, full, lora = sd3
    out = tmp_path / "s"
    argv = _sample("--model", f"base={base}", "--model", f"full={full}", "--model", f"lora={lora}")
    argv += ["--negative", f"base={full}", "--out", str(out)]
    assert cli.main(argv) == 0, capsys.readouterr().err
    man = json.loads((out / "manifest.json").read_text())
    assert man["settings"]["scheduler"] == "flow_euler" and man["settings"]["guidance_scale"] == 7.5
    kinds = {k: v["kind"] for k, v in man["models"].items()}
    assert kinds == {"base": "model", "full": "export-full", "lora": "export-lora"}
    assert man["models"]["base"]["negative"]["source"] == str(full)
    assert all(v["family"] == "sd3" and v["guidance"] == "cfg" for v in man["models"].values())
    imgs = {r["model"]: r for r in man["images"]}
    assert set(imgs) == {"base", "full", "lora"}
    assert all((r["height"], r["width"]) == (RES, RES) for r in imgs.values())
    assert (out / "grids" / "p0000.png").is_file()
    # CFG with the export's null embedding; a negative equal to the model is plain CFG
    plain, same, other = (
        build_entries({"m": str(lora)}, neg, dtype=torch.float32, device="cpu")[0]
        for neg in ({}, {"m": str(lora)}, {"m": str(full)})
    )
    assert plain.info["null_kind"] == "empty_prompt" and plain.null.embeds.abs().sum() > 0
    cond = encode_prompts(plain.model, ["a red cube", "a cat"])
    kw = dict(guidance_scale=4.0, steps=2, resolution=RES)
    x0 = generate(plain.model, cond, plain.null, [0, 1], **kw)
    x1 = generate(same.model, cond, same.null, [0, 1], negative_unet=same.negative_unet, **kw)
    x2 = generate(other.model, cond, other.null, [0, 1], negative_unet=other.negative_unet, **kw)
    torch.testing.assert_close(x1, x0, rtol=0, atol=1e-4)
    assert (x2 - x0).abs().max() > 1e-4
    rc = cli.main(
        _sample("--model", str(base), "--scheduler", "ddim", "--out", str(tmp_path / "x"))
    )
    assert rc == 2 and "sd3-class" in capsys.readouterr().err


def test_sd3_merge_full_and_lora_load_in_diffusers(sd3, tmp_path):
    from diffusers import SD3Transformer2DModel, StableDiffusion3Pipeline

    from snpo.tools.merge import merge

    base, full, lora = sd3
    neg_full = _full_export(base, tmp_path / "neg", seed=5)
    a, b = 0.6, 0.3
    out = merge(
        reference=str(base),
        positive=str(full),
        negative=str(neg_full),
        out=tmp_path / "m",
        alpha=a,
        beta=b,
    )
    assert json.loads((out / "snpo_export.json").read_text())["family"] == "sd3"
    ref, pos, neg = (_weights(p / "transformer") for p in (base, full, neg_full))
    got = SD3Transformer2DModel.from_pretrained(str(out / "transformer")).state_dict()
    for k, r in ref.items():
        want = r.double() + a * (pos[k].double() - r.double()) + b * (neg[k].double() - r.double())
        torch.testing.assert_close(got[k], want.float(), rtol=1e-5, atol=1e-6)
    model, meta = load_export(out)
    assert model.family == "sd3" and meta["kind"] == "full"
    # LoRA: an exact LoRA of β·ΔW⁻ that the stock pipeline loads
    out_l = merge(reference=str(base), negative=str(lora), out=tmp_path / "ml", beta=0.5)
    assert json.loads((out_l / "snpo_export.json").read_text())["kind"] == "lora"
    pipe = StableDiffusion3Pipeline.from_pretrained(str(base))
    pipe.load_lora_weights(str(out_l))
    pipe.fuse_lora()
    pipe.unload_lora_weights()
    ours = load_export(out_l)[0].denoiser.state_dict()
    fused_neg = load_export(lora)[0].denoiser.state_dict()
    theirs = pipe.transformer.state_dict()
    moved = 0
    for k, r in ref.items():
        torch.testing.assert_close(theirs[k], ours[k], rtol=1e-5, atol=1e-6)
        torch.testing.assert_close(ours[k], r + 0.5 * (fused_neg[k] - r), rtol=1e-5, atol=1e-6)
        moved += not torch.equal(ours[k], r)
    assert moved >= 8  # the attention projections of both streams moved


def test_sd3_eval_pairs_noised_through_the_family(sd3, pairs_parquet, tmp_path, capsys):
    from snpo.models.flow import flow_noise
    from snpo.models.sd3 import flow_settings
    from snpo.tools.preference import (
        branch_errors,
        encode_pairs,
        eval_draws,
        load_pair_pixels,
        open_pairs,
        unet_call,
    )

    base, full, lora = sd3
    out = tmp_path / "ev"
    argv = ["eval", "--pairs", str(pairs_parquet), "--reference", str(base)]
    argv += ["--model", f"same={base}", "--model", f"full={full}", "--model", f"lora={lora}"]
    argv += ["--negative", f"lora={full}", "--max-pairs", "3", "--timesteps", "2"]
    assert cli.main([*argv, "--out", str(out), "--no-progress"]) == 0, capsys.readouterr().err
    rep = json.loads((out / "preference.json").read_text())
    r = rep["models"]
    assert r["same"]["accuracy_pos"]["value"] == 0.5 and r["same"]["accuracy_neg"]["value"] == 0.5
    assert r["full"]["winner_logp_proxy"]["value"] != 0 and r["lora"]["pairs"] == 3
    assert rep["settings"]["resolution"] == RES and rep["settings"]["null_branch"] is True
    # the errors are the flow MSE at σ(u) of the stratified draws: x_t = (1 − σ)·x0 + σ·ε
    ref = load_model(str(base))
    src = open_pairs([str(pairs_parquet)], max_pairs=2)
    keep, pix, prompts, sizes, crops, _ = load_pair_pixels(src, [0, 1], RES)
    inputs = encode_pairs(ref, pix, prompts, sizes, crops)
    draws = eval_draws(0, keep, 1, (ref.in_channels, RES // 2, RES // 2), 1000)
    null = ref.spec.null_embedding(ref)
    got = branch_errors(ref, unet_call(ref.unet, ref.spec), inputs, draws, null)
    x0 = inputs.mean + torch.exp(0.5 * inputs.logvar) * torch.cat(
        [draws.latent_noise[:, 0, 0], draws.latent_noise[:, 0, 1]]
    )
    eps = torch.cat([draws.noise[:, 0]] * 2)
    sigma = flow_settings(ref).sigma(torch.cat([draws.u[:, 0]] * 2))
    x_t = flow_noise(x0, eps, sigma)
    cond = ref.spec.conditioning(ref, type(inputs.cond).cat([inputs.cond] * 2))
    with torch.no_grad():
        v = ref.spec.denoise(ref.unet, x_t, (1000 * sigma).float(), cond)
    want = ((v - (eps - x0)) ** 2).mean(dim=(1, 2, 3))
    torch.testing.assert_close(got[0, :, :, 0].flatten(), want, rtol=1e-4, atol=1e-6)


def test_flux_embedded_guidance_and_refusals(flux, sd3, pairs_parquet, tmp_path, capsys):
    from snpo.tools.merge import MergeError, merge

    out = tmp_path / "s"
    dpo = _full_export(flux, tmp_path / "dpo", 3, meta={"config": {"guidance_scale": 5.0}})
    argv = _sample("--model", f"flux={flux}", "--model", f"dpo={dpo}", "--resolution", str(RES))
    assert cli.main([*argv, "--out", str(out)]) == 0, capsys.readouterr().err
    man = json.loads((out / "manifest.json").read_text())
    m = man["models"]["flux"]
    assert m["family"] == "flux" and m["guidance"] == "embedded" and m["guidance_scale"] == 3.5
    assert man["models"]["dpo"]["guidance_scale"] == 5.0  # the export's trained guidance
    assert man["settings"]["guidance_scale"] is None  # the models differ
    assert man["images"][0]["height"] == RES
    # --negative: one line, exit 2
    bad = _sample("--model", str(flux), "--negative", str(flux), "--out", str(tmp_path / "n"))
    assert cli.main(bad) == 2
    [err] = [ln for ln in capsys.readouterr().err.splitlines() if ln.startswith("snpo sample")]
    assert err.startswith("snpo sample: error: --negative base: flux-class") and "no unc" in err
    with pytest.raises(MergeError, match="without a CFG null branch"):
        merge(reference=str(flux), negative=str(flux), out=tmp_path / "m")
    base, full, _ = sd3
    with pytest.raises(MergeError, match="cannot merge across model families.*flux-class"):
        merge(reference=str(base), negative=str(flux), out=tmp_path / "m")
    with pytest.raises(MergeError, match="cannot merge across model families.*FluxTransformer"):
        merge(reference=str(base), negative=str(flux / "transformer"), out=tmp_path / "m")
    assert not (tmp_path / "m").exists()
    # eval: the conditional branch at the embedded guidance, the null columns n/a
    ev = tmp_path / "ev"
    argv = ["eval", "--pairs", str(pairs_parquet), "--reference", str(flux), "--model", str(flux)]
    argv += ["--max-pairs", "2", "--timesteps", "1", "--resolution", str(RES), "--out", str(ev)]
    assert cli.main([*argv, "--no-progress"]) == 0, capsys.readouterr().err
    assert "n/a (no null branch)" in (ev / "preference.md").read_text()
    rep = json.loads((ev / "preference.json").read_text())
    assert rep["settings"]["null_branch"] is False
    assert rep["models"]["base"]["accuracy_pos"]["value"] == 0.5


def test_bare_transformer_folders_and_interfaces(sd3, flux, sd_model):
    from snpo.models import ModelLoadError
    from snpo.models.trained import (
        IncompatibleModelError,
        check_negative_compatible,
        denoiser_class_of,
        is_denoiser_folder,
        is_unet_folder,
        load_any,
    )

    base, full, _ = sd3
    assert denoiser_class_of(full / "transformer") == "SD3Transformer2DModel"
    assert is_denoiser_folder(flux / "transformer") and not is_unet_folder(flux / "transformer")
    model, info = load_any(str(full / "transformer"), base_model=str(base))
    assert info["kind"] == "transformer" and info["family"] == "sd3"
    with pytest.raises(ModelLoadError, match="bare transformer"):
        load_any(str(full / "transformer"))
    with pytest.raises(IncompatibleModelError, match="do not go together"):
        load_any(str(full / "transformer"), base_model=str(sd_model))
    f = load_model(str(flux))
    with pytest.raises(IncompatibleModelError, match="no unconditional branch"):
        check_negative_compatible(f, f, "--negative x")
    with pytest.raises(IncompatibleModelError, match="flux-class but the model is sd3-class"):
        check_negative_compatible(model, f, "--negative x")
