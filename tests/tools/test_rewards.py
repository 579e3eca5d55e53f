"""Rewards: the real PickScore and aesthetic loading/scoring code on a tiny random CLIP, the HPSv2
glue on a stand-in open_clip, clear messages for missing packages/weights, `snpo eval --rewards`
on sampled images (mean over seeds, the papers' column order)."""

from __future__ import annotations

import json
import sys
import types

import pytest
import torch
from PIL import Image

from snpo import cli
from snpo.tools.rewards import (
    HPSv2,
    ImageRewardScorer,
    PickScore,
    RewardError,
    aesthetic_head,
    build_scorers,
)


def _images():
    return [Image.new("RGB", (40, 30), c) for c in ((200, 10, 10), (10, 10, 200), (0, 120, 0))]


PROMPTS = ["a red cube", "a blue ball", "a photo of a green cat"]


def test_pickscore_is_logit_scale_times_cosine(tiny_clip):
    from transformers import CLIPModel, CLIPProcessor

    ps = PickScore(str(tiny_clip), str(tiny_clip))
    got = torch.tensor(ps.score(_images(), PROMPTS))
    clip, proc = CLIPModel.from_pretrained(tiny_clip), CLIPProcessor.from_pretrained(tiny_clip)
    inp = proc(text=PROMPTS, images=_images(), return_tensors="pt", padding=True)
    with torch.no_grad():
        want = clip(**inp).logits_per_image.diagonal()  # logit_scale · cos
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)


def _v2_head_state(dim: int, g) -> dict:
    sizes = [(dim, 8), (8, 8), (8, 4), (4, 4), (4, 1)]
    state = {}
    for i, (a, b) in zip((0, 2, 4, 6, 7), sizes):
        state[f"layers.{i}.weight"] = torch.randn(b, a, generator=g)
        state[f"layers.{i}.bias"] = torch.randn(b, generator=g)
    return state


def test_aesthetic_head_on_normalised_clip_embedding(tiny_clip, tmp_path):
    from transformers import CLIPModel, CLIPProcessor

    g = torch.Generator().manual_seed(0)
    state = _v2_head_state(16, g)
    torch.save(state, tmp_path / "head.pth")
    [aes] = build_scorers(
        ["aesthetic"],
        {"aesthetic_head": str(tmp_path / "head.pth"), "aesthetic_clip": str(tiny_clip)},
    ).values()
    got = torch.tensor(aes.score(_images(), PROMPTS))
    clip, proc = CLIPModel.from_pretrained(tiny_clip), CLIPProcessor.from_pretrained(tiny_clip)
    with torch.no_grad():
        out = clip(**proc(text=PROMPTS, images=_images(), return_tensors="pt", padding=True))
        e = out.image_embeds / out.image_embeds.norm(dim=-1, keepdim=True)
        x = e
        for i in (0, 2, 4, 6, 7):  # linear layers, no activation (as in the LAION predictor)
            x = x @ state[f"layers.{i}.weight"].T + state[f"layers.{i}.bias"]
    torch.testing.assert_close(got, x.squeeze(-1), rtol=1e-5, atol=1e-5)
    # the v1 predictor: one linear layer
    lin = aesthetic_head({"weight": torch.ones(1, 16), "bias": torch.zeros(1)})
    assert lin(torch.ones(2, 16)).flatten().tolist() == [16.0, 16.0]
    # a head for another embedding size is refused
    torch.save(_v2_head_state(768, g), tmp_path / "big.pth")
    with pytest.raises(RewardError, match="768-d"):
        build_scorers(
            ["aesthetic"],
            {"aesthetic_head": str(tmp_path / "big.pth"), "aesthetic_clip": str(tiny_clip)},
        )
    with pytest.raises(RewardError, match="--aesthetic-head"):
        build_scorers(["aesthetic"], {"aesthetic_clip": str(tiny_clip)})


def test_missing_packages_and_weights_say_what_to_do(monkeypatch, tmp_path):
    for mod in ("open_clip", "hpsv2", "hpsv2.src", "ImageReward"):
        monkeypatch.setitem(sys.modules, mod, None)  # import fails
    with pytest.raises(RewardError, match=r"HPSv2 needs `pip install hpsv2`.*--hps-checkpoint"):
        HPSv2(str(tmp_path / "HPS_v2.1_compressed.pt"))
    with pytest.raises(RewardError, match=r"pip install image-reward.*--imagereward-checkpoint"):
        ImageRewardScorer("ImageReward.pt")
    with pytest.raises(RewardError, match="unknown reward"):
        build_scorers(["fid"], {})
    with pytest.raises(RewardError, match="cannot load the CLIP model"):
        PickScore(str(tmp_path / "nope"), str(tmp_path / "nope"))


class _StubClip(torch.nn.Module):
    """Stands in for open_clip's ViT-H-14: linear image and text encoders."""

    def __init__(self):
        super().__init__()
        self.img = torch.nn.Linear(12, 4)
        self.txt = torch.nn.Embedding(50, 4)

    def encode_image(self, x):
        return self.img(x.flatten(1))

    def encode_text(self, ids):
        return self.txt(ids).mean(1)


def _stub_preprocess(im):
    return torch.tensor(list(im.resize((2, 2)).getdata())).float().flatten() / 255


def _stub_tokenize(texts):
    """Word lengths of the first 3 words, zero-padded: ids < 50."""
    rows = [[len(w) for w in t.split()[:3]] for t in texts]
    return torch.tensor([r + [0] * (3 - len(r)) for r in rows])


def test_hpsv2_glue_with_a_stand_in_open_clip(monkeypatch, tmp_path):
    stub = types.ModuleType("open_clip")

    def create_model_and_transforms(arch, pretrained=None, device="cpu"):
        assert arch == "ViT-H-14" and pretrained is None
        return _StubClip(), None, _stub_preprocess

    stub.create_model_and_transforms = create_model_and_transforms
    stub.get_tokenizer = lambda arch: _stub_tokenize
    monkeypatch.setitem(sys.modules, "open_clip", stub)
    torch.manual_seed(0)
    ref = _StubClip()
    torch.save({"state_dict": ref.state_dict()}, tmp_path / "hps.pt")
    with pytest.raises(RewardError, match="--hps-checkpoint"):
        HPSv2(None)
    hps = HPSv2(str(tmp_path / "hps.pt"))
    got = torch.tensor(hps.score(_images(), PROMPTS))
    with torch.no_grad():
        pix = torch.stack([_stub_preprocess(im) for im in _images()])
        a = torch.nn.functional.normalize(ref.encode_image(pix), dim=-1)
        b = torch.nn.functional.normalize(ref.encode_text(_stub_tokenize(PROMPTS)), dim=-1)
    torch.testing.assert_close(got, 100 * (a * b).sum(-1))


def test_eval_rewards_cli_mean_over_seeds(pix_model, tiny_clip, tmp_path, capsys):
    g = torch.Generator().manual_seed(1)
    torch.save(_v2_head_state(16, g), tmp_path / "head.pth")
    prompts = tmp_path / "p.txt"
    prompts.write_text("a red cube\na blue ball\n")
    out = tmp_path / "ev"
    rc = cli.main(
        [
            "eval",
            "--rewards",
            "aesthetic,pickscore",
            "--model",
            f"base={pix_model}",
            "--prompts",
            str(prompts),
            "--sample-seeds",
            "0,1",
            "--steps",
            "2",
            "--pickscore-model",
            str(tiny_clip),
            "--aesthetic-head",
            str(tmp_path / "head.pth"),
            "--aesthetic-clip",
            str(tiny_clip),
            "--out",
            str(out),
            "--no-progress",
        ]
    )
    assert rc == 0, capsys.readouterr().err
    assert (out / "samples" / "manifest.json").is_file()
    rep = json.loads((out / "rewards.json").read_text())
    recs = rep["images"]
    assert len(recs) == 4 and all(set(r["scores"]) == {"pickscore", "aesthetic"} for r in recs)
    e = rep["models"]["base"]["pickscore"]
    per_seed = [sum(r["scores"]["pickscore"] for r in recs if r["seed"] == s) / 2 for s in (0, 1)]
    assert e["mean"] == pytest.approx(sum(per_seed) / 2)
    assert e["std_over_seeds"] == pytest.approx(torch.tensor(per_seed).std().item(), rel=1e-5)
    md = (out / "rewards.md").read_text()
    header = next(line for line in md.splitlines() if line.startswith("| model"))
    assert header.index("PickScore") < header.index("Aesthetic")  # the papers' column order
    # scoring an existing sample folder gives the same numbers
    rc = cli.main(
        [
            "eval",
            "--rewards",
            "pickscore",
            "--images",
            str(out / "samples"),
            "--pickscore-model",
            str(tiny_clip),
            "--out",
            str(tmp_path / "ev2"),
            "--no-progress",
        ]
    )
    assert rc == 0
    rep2 = json.loads((tmp_path / "ev2" / "rewards.json").read_text())
    assert rep2["models"]["base"]["pickscore"]["mean"] == pytest.approx(e["mean"])
    rc = cli.main(
        ["eval", "--rewards", "hpsv2", "--images", str(out / "samples"), "--out", str(out)]
    )
    assert rc == 2 and "--hps-checkpoint" in capsys.readouterr().err


class _WritesMarker:
    """Unpickling this runs ``open(marker, "w")``: it creates the marker file (code execution)."""

    def __init__(self, marker: str) -> None:
        self.marker = marker

    def __reduce__(self):
        return (open, (self.marker, "w"))


@pytest.fixture
def stub_open_clip(monkeypatch):
    stub = types.ModuleType("open_clip")
    stub.create_model_and_transforms = lambda arch, pretrained=None, device="cpu": (
        _StubClip(),
        None,
        _stub_preprocess,
    )
    stub.get_tokenizer = lambda arch: _stub_tokenize
    monkeypatch.setitem(sys.modules, "open_clip", stub)
    torch.manual_seed(0)
    return _StubClip()


def test_hpsv2_refuses_a_pickle_payload_unless_trusted(stub_open_clip, tmp_path, capsys):
    ref = stub_open_clip
    marker = tmp_path / "pwned"
    evil = tmp_path / "evil.pt"
    torch.save({"state_dict": ref.state_dict(), "x": _WritesMarker(str(marker))}, evil)
    with pytest.raises(RewardError, match=r"--trust-pickle") as info:
        HPSv2(str(evil))
    assert "evil.pt" in str(info.value) and not marker.exists()  # nothing ran
    with pytest.raises(RewardError, match=r"--trust-pickle"):
        build_scorers(["hpsv2"], {"hps_checkpoint": str(evil)})
    assert not marker.exists()
    rc = cli.main(
        ["eval", "--rewards", "hpsv2", "--hps-checkpoint", str(evil), "--images", str(tmp_path)]
        + ["--out", str(tmp_path / "ev")]
    )
    assert rc == 2 and "--trust-pickle" in capsys.readouterr().err and not marker.exists()
    # trusted: unpickled in full (the payload runs, proving the refusal above mattered)
    with pytest.warns(UserWarning, match="trust-pickle"):
        hps = build_scorers(["hpsv2"], {"hps_checkpoint": str(evil), "trust_pickle": True})
    assert marker.exists()
    torch.testing.assert_close(hps["hpsv2"].model.img.weight, ref.img.weight)


def test_hpsv2_upstream_layout_and_safetensors_load_safely(stub_open_clip, tmp_path):
    from safetensors.torch import save_file

    from snpo.tools.evaluate import build_parser

    ref = stub_open_clip
    # open_clip's training checkpoint as HPS v2/v2.1 publish it (optimizer dropped)
    torch.save({"epoch": 3, "name": "hps", "state_dict": ref.state_dict()}, tmp_path / "h.pt")
    save_file(ref.state_dict(), tmp_path / "h.safetensors")
    want = torch.tensor(HPSv2(str(tmp_path / "h.pt")).score(_images(), PROMPTS))
    got = torch.tensor(HPSv2(str(tmp_path / "h.safetensors")).score(_images(), PROMPTS))
    torch.testing.assert_close(got, want)
    (tmp_path / "bad.safetensors").write_bytes(b"not a safetensors file")
    with pytest.raises(RewardError, match="cannot read"):
        HPSv2(str(tmp_path / "bad.safetensors"))
    args = ["--out", "o", "--rewards", "hpsv2"]
    assert build_parser().parse_args(args).trust_pickle is False  # off by default
    assert build_parser().parse_args(args + ["--trust-pickle"]).trust_pickle is True


def test_aesthetic_head_pickle_payload_refused(tiny_clip, tmp_path):
    marker = tmp_path / "pwned"
    g = torch.Generator().manual_seed(2)
    torch.save(
        {"state_dict": _v2_head_state(16, g), "x": _WritesMarker(str(marker))}, tmp_path / "h.pth"
    )
    opts = {"aesthetic_head": str(tmp_path / "h.pth"), "aesthetic_clip": str(tiny_clip)}
    with pytest.raises(RewardError, match="--trust-pickle"):
        build_scorers(["aesthetic"], opts)
    assert not marker.exists()
