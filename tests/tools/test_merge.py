"""snpo merge: the Diffusion-NPO formula per tensor (full weights), the exact LoRA merge equal to
the full-weight merge of the same deltas, mixed inputs, loading by diffusers, refusals."""

from __future__ import annotations

import json

import pytest
import torch

from snpo import cli
from snpo.models import load_export, read_export_meta
from snpo.tools.merge import (
    LoraFactors,
    MergeError,
    lora_delta,
    merge,
    merge_full,
    merge_lora_factors,
    read_unet_state,
)

from .helpers import lora_export, perturbed_full_export

ALPHA, BETA = 0.7, 0.4


def _formula(ref, pos, neg, a=ALPHA, b=BETA):
    return {
        k: (
            ref[k].double()
            + a * (pos[k].double() - ref[k].double())
            + b * (neg[k].double() - ref[k].double())
        ).float()
        for k in ref
    }


def test_merge_full_formula_per_tensor():
    g = torch.Generator().manual_seed(0)
    shapes = {"w": (4, 3), "b": (4,), "c": (2, 3, 3, 3)}
    ref, pos, neg = ({k: torch.randn(s, generator=g) for k, s in shapes.items()} for _ in range(3))
    out = merge_full(ref, neg, pos, alpha=ALPHA, beta=BETA)
    want = _formula(ref, pos, neg)
    for k in ref:
        torch.testing.assert_close(out[k], want[k], rtol=1e-6, atol=1e-6)
    # no positive: θ_ref + β(θ⁻ − θ_ref)
    only = merge_full(ref, neg, None, beta=BETA)
    torch.testing.assert_close(only["w"], ref["w"] + BETA * (neg["w"] - ref["w"]))
    with pytest.raises(MergeError, match="shape mismatches"):
        merge_full(ref, {**neg, "w": torch.zeros(3, 4)}, pos)
    with pytest.raises(MergeError, match="reference keys missing"):
        merge_full(ref, {k: v for k, v in neg.items() if k != "b"}, pos)


def test_lora_factor_concatenation_is_exact():
    g = torch.Generator().manual_seed(1)
    pos = {"l": LoraFactors(torch.randn(4, 6, generator=g), torch.randn(5, 4, generator=g), 2.0)}
    neg = {
        "l": LoraFactors(torch.randn(2, 6, generator=g), torch.randn(5, 2, generator=g), 0.5),
        "conv": LoraFactors(
            torch.randn(3, 6, 3, 3, generator=g), torch.randn(5, 3, 1, 1, generator=g), 1.0
        ),
    }
    out = merge_lora_factors(neg, pos, alpha=ALPHA, beta=BETA)
    assert {f.rank for f in out.values()} == {6}  # padded to one rank
    want = ALPHA * lora_delta(pos["l"]) + BETA * lora_delta(neg["l"])
    torch.testing.assert_close(lora_delta(out["l"]), want, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(lora_delta(out["conv"]), BETA * lora_delta(neg["conv"]))


def test_full_merge_cli_checked_tensor_by_tensor(pix_model, tmp_path, capsys):
    pos = perturbed_full_export(pix_model, tmp_path / "pos", seed=1)
    neg = perturbed_full_export(pix_model, tmp_path / "neg", seed=2, meta={"objective": "npo"})
    out = tmp_path / "merged"
    rc = cli.main(
        [
            "merge",
            "--reference",
            str(pix_model),
            "--positive",
            str(pos),
            "--negative",
            str(neg),
            "--alpha",
            str(ALPHA),
            "--beta",
            str(BETA),
            "--out",
            str(out),
        ]
    )
    assert rc == 0, capsys.readouterr().err
    meta = read_export_meta(out)
    assert meta["kind"] == "full" and meta["merge"]["alpha"] == ALPHA
    assert meta["null_kind"] == "empty_prompt" and meta["objective"] == "npo_merged"
    ref, p, n = (read_unet_state(str(x)) for x in (pix_model, pos, neg))
    got = read_unet_state(str(out))
    want = _formula(ref, p, n)
    assert set(got) == set(want)
    for k in want:
        torch.testing.assert_close(got[k], want[k], rtol=1e-6, atol=1e-6)
    model, _ = load_export(out)  # and it loads as a model
    assert model.unet.config.in_channels == 3


TARGETS_POS = ["to_q", "to_v"]
TARGETS_NEG = ["to_q", "to_k", "proj_in"]  # overlapping layers, a conv layer, other ranks


@pytest.fixture(scope="module")
def loras(pix_model, tmp_path_factory):
    d = tmp_path_factory.mktemp("loras")
    pos = lora_export(pix_model, d / "pos", seed=1, r=4, alpha=8, targets=TARGETS_POS)
    neg = lora_export(pix_model, d / "neg", seed=2, r=2, alpha=2, targets=TARGETS_NEG)
    return pos, neg


def test_lora_merge_equals_full_merge_of_the_same_deltas(pix_model, loras, tmp_path):
    pos, neg = loras
    kw = dict(
        reference=str(pix_model), positive=str(pos), negative=str(neg), alpha=ALPHA, beta=BETA
    )
    as_lora = merge(out=tmp_path / "l", **kw)
    as_full = merge(out=tmp_path / "f", fmt="full", **kw)
    assert read_export_meta(as_lora)["kind"] == "lora"
    assert read_export_meta(as_full)["kind"] == "full"
    ml, _ = load_export(as_lora)  # diffusers' loader, LoRA fused
    sl, sf = ml.unet.state_dict(), read_unet_state(str(as_full))
    assert set(sl) == set(sf)
    for k in sf:
        torch.testing.assert_close(sl[k], sf[k], rtol=1e-5, atol=1e-6)
    # independently: θ_ref + α(θ⁺ − θ_ref) + β(θ⁻ − θ_ref) with each LoRA fused by diffusers
    ref = read_unet_state(str(pix_model))
    fp = load_export(pos)[0].unet.state_dict()
    fn = load_export(neg)[0].unet.state_dict()
    want = _formula(ref, fp, fn)
    changed = 0
    for k in want:
        torch.testing.assert_close(sf[k], want[k], rtol=1e-5, atol=1e-6)
        changed += not torch.equal(sf[k], ref[k])
    n_layers = sum(1 for k in ref if k.endswith(("to_q.weight", "to_k.weight", "to_v.weight")))
    assert changed >= n_layers  # every adapted layer moved, proj_in (conv) too
    assert any(not torch.equal(sf[k], ref[k]) for k in ref if "proj_in.weight" in k)


def test_merged_lora_loads_in_a_diffusers_pipeline(sd_model, tmp_path):
    from diffusers import StableDiffusionPipeline

    neg = lora_export(
        sd_model, tmp_path / "neg", seed=3, r=2, alpha=4, targets=["to_q", "proj_out"]
    )
    out = merge(reference=str(sd_model), negative=str(neg), out=tmp_path / "m", beta=0.5)
    pipe = StableDiffusionPipeline.from_pretrained(str(sd_model), safety_checker=None)
    pipe.load_lora_weights(str(out))
    pipe.fuse_lora()
    pipe.unload_lora_weights()
    ours, _ = load_export(out)
    a, b = pipe.unet.state_dict(), ours.unet.state_dict()
    for k in b:
        torch.testing.assert_close(a[k], b[k], rtol=1e-5, atol=1e-6)
    ref = read_unet_state(str(sd_model))
    fused_neg = load_export(neg)[0].unet.state_dict()
    for k in ref:
        want = ref[k] + 0.5 * (fused_neg[k] - ref[k])
        torch.testing.assert_close(b[k], want, rtol=1e-5, atol=1e-6)


def test_full_positive_with_lora_negative(pix_model, loras, tmp_path):
    pos = perturbed_full_export(pix_model, tmp_path / "pos", seed=5)
    _, neg = loras
    out = merge(
        reference=str(pix_model),
        positive=str(pos),
        negative=str(neg),
        out=tmp_path / "m",
        alpha=ALPHA,
        beta=BETA,
    )
    assert read_export_meta(out)["kind"] == "full"
    ref, p = read_unet_state(str(pix_model)), read_unet_state(str(pos))
    n = load_export(neg)[0].unet.state_dict()
    got, want = read_unet_state(str(out)), _formula(ref, p, n)
    for k in want:
        torch.testing.assert_close(got[k], want[k], rtol=1e-5, atol=1e-6)


def test_refusals_keep_existing_output(pix_model, pix_model_other, loras, tmp_path, capsys):
    from snpo.models import save_tiny_model

    from .conftest import WORDS

    pos, neg = loras
    out = tmp_path / "out"
    out.mkdir()
    (out / "keep.txt").write_text("old result")

    def fails(match, **kw):
        with pytest.raises(MergeError, match=match):
            merge(out=out, **{"reference": str(pix_model), "negative": str(neg), **kw})
        assert (out / "keep.txt").read_text() == "old result"
        assert not (tmp_path / "out.partial").exists()

    wide = save_tiny_model(
        tmp_path / "wide", words=WORDS, resolution=8, with_vae=False, unet_channels=(32, 32)
    )
    fails("does not match the reference architecture", negative=str(wide), fmt="full")
    other_base_lora = lora_export(
        pix_model_other, tmp_path / "ol", seed=1, r=2, alpha=2, targets=["to_q"]
    )
    fails("not on the reference", negative=str(other_base_lora))
    full = perturbed_full_export(pix_model, tmp_path / "full", seed=9)
    fails("--format lora needs LoRA inputs", positive=str(full), fmt="lora")
    fails("must be full weights", reference=str(pos))
    with pytest.raises(MergeError, match="overlaps"):
        merge(reference=str(pix_model), negative=str(neg), out=neg / "inside")
    rc = cli.main(
        [
            "merge",
            "--reference",
            str(pix_model),
            "--negative",
            str(tmp_path / "nope"),
            "--out",
            str(out),
        ]
    )
    assert rc == 2
    assert "does not exist" in capsys.readouterr().err
    assert (out / "keep.txt").exists()
    meta = json.loads((neg / "snpo_export.json").read_text())
    assert meta["kind"] == "lora"  # inputs untouched


def test_lora_export_keeps_alpha_and_conv_layers(pix_model, tmp_path):
    """The exports merge reads: lora_alpha ≠ r and a conv layer (proj_in) survive the round
    trip through snpo.models.export (diffusers' loader)."""
    from peft import LoraConfig

    from snpo.models import encode_prompts, load_model, unet_conditioning, write_export

    m = load_model(str(pix_model))
    m.unet.add_adapter(LoraConfig(r=2, lora_alpha=6, target_modules=["to_q", "proj_in"]))
    with torch.no_grad():
        for n, p in m.unet.named_parameters():
            if "lora_B" in n:
                p.normal_(0, 0.3)
    x, t = torch.randn(1, 3, 8, 8), torch.tensor([300])
    kw = unet_conditioning(m, encode_prompts(m, ["a red cube"]))
    with torch.no_grad():
        want = m.unet(x, t, **kw).sample
        m.unet.disable_adapters()
        base = m.unet(x, t, **kw).sample
        m.unet.enable_adapters()
    out = write_export(tmp_path / "e", m, m.unet, lora=True, meta={})
    m2, _ = load_export(out)
    with torch.no_grad():
        got = m2.unet(x, t, **kw).sample
    assert (want - base).abs().max() > 1e-2
    torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-4)
