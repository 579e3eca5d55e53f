"""snpo eval (preference pairs): draws independent of batching, identical models → identical
metrics, a model nudged toward the winners gains positive-branch accuracy, intervals, the
reversed labels of the null branch, the CLI's JSON and markdown."""

from __future__ import annotations

import json

import pytest
import torch

from snpo import cli
from snpo.models import encode_prompts, load_model
from snpo.tools.preference import (
    EvalModel,
    bootstrap_ci,
    eval_draws,
    evaluate_pairs,
    load_pair_pixels,
    open_pairs,
    preference_metrics,
)


def test_draws_are_per_pair_and_stratified():
    a = eval_draws(3, [0, 1, 2, 3, 4], 4, (3, 8, 8), 1000)
    b1 = eval_draws(3, [0, 1], 4, (3, 8, 8), 1000)
    b2 = eval_draws(3, [4, 2, 3], 4, (3, 8, 8), 1000)
    for field in ("timesteps", "noise", "latent_noise"):
        x = getattr(a, field)
        assert torch.equal(x[:2], getattr(b1, field))
        assert torch.equal(x[[4, 2, 3]], getattr(b2, field))
    t = a.timesteps
    lo = torch.arange(4) * 250
    assert ((t >= lo) & (t < lo + 250)).all()  # one timestep per stratum of [0, 1000)
    assert not torch.equal(eval_draws(4, [0], 4, (3, 8, 8), 1000).noise, a.noise[:1])
    assert a.latent_noise.shape == (5, 4, 2, 3, 8, 8)


def test_metrics_from_known_margins():
    # 4 pairs, 1 draw. cond: pairs 0, 1 correct (m_w < m_l), 2 tie, 3 wrong → 2.5 / 4
    m = torch.zeros(2, 2, 4, 1)
    m[0, 0, :, 0] = torch.tensor([-1.0, 0.0, 2.0, 3.0])
    m[0, 1, :, 0] = torch.tensor([0.0, 1.0, 2.0, 1.0])
    # null branch, reversed labels: correct when m_l < m_w → pairs 0 and 3 → 2 / 4
    m[1, 0, :, 0] = torch.tensor([1.0, 0.0, 0.0, 5.0])
    m[1, 1, :, 0] = torch.tensor([0.0, 1.0, 0.0, 4.0])
    r = preference_metrics(m)
    assert r["accuracy_pos"]["value"] == pytest.approx(2.5 / 4)
    assert r["accuracy_neg"]["value"] == pytest.approx(2.5 / 4)  # pair 2 ties
    assert r["winner_logp_proxy"]["value"] == pytest.approx(-(-1 + 0 + 2 + 3) / 4)
    assert r["per_draw"]["accuracy_pos"] == pytest.approx(2.5 / 4)
    assert r["per_draw"]["accuracy_neg"] == pytest.approx(2.5 / 4)
    for key in ("accuracy_pos", "accuracy_neg", "winner_logp_proxy"):
        lo, hi = r[key]["ci"]
        assert lo <= r[key]["value"] <= hi
    assert bootstrap_ci(torch.full((7,), 0.25)) == (0.25, 0.25)


@pytest.fixture(scope="module")
def source(pairs_parquet):
    return open_pairs([str(pairs_parquet)])


def test_pairs_ties_dropped_winner_first(source, pairs_parquet):
    import pyarrow.parquet as pq

    t = pq.read_table(pairs_parquet, columns=["label_0"]).column("label_0").to_pylist()
    assert len(source) == sum(v != 0.5 for v in t) == 10
    keep, pix, prompts, *_rest, bad = load_pair_pixels(source, list(range(len(source))), 8)
    assert not bad and pix.shape == (10, 2, 3, 8, 8)
    # synthetic pairs: the winner's red/green/blue channel matches the colour word
    colour = {"red": 0, "green": 1, "blue": 2}
    for x, p in zip(pix, prompts):
        c = colour[next(w for w in p.split() if w in colour)]
        if c < 2:  # the blue channel carries a gradient in both images
            assert x[0, c].mean() > x[1, c].mean()


def _em(name, model):
    return EvalModel(name, model, {"source": name}, model.null_kind)


def test_identical_models_identical_metrics_any_batch_size(pix_model, source):
    ref = load_model(str(pix_model))
    same1, same2 = load_model(str(pix_model)), load_model(str(pix_model))
    kw = dict(timesteps=2, seed=1, progress=False)
    m1, facts = evaluate_pairs(ref, [_em("a", same1), _em("b", same2)], source, batch_size=4, **kw)
    assert facts["pairs"] == 10 and facts["bad_pairs"] == 0
    assert torch.equal(m1["a"], torch.zeros(2, 2, 10, 2)) and torch.equal(m1["a"], m1["b"])
    ra, rb = preference_metrics(m1["a"]), preference_metrics(m1["b"])
    assert ra == rb and ra["accuracy_pos"]["value"] == 0.5 and ra["accuracy_neg"]["value"] == 0.5
    # a different model: its margins do not depend on how pairs are batched
    other = load_model(str(pix_model))
    with torch.no_grad():
        for p in other.unet.parameters():
            p.add_(0.02 * torch.randn_like(p))
    few = open_pairs([source.sources[0].files[0]], max_pairs=5)
    x = evaluate_pairs(ref, [_em("o", other)], few, batch_size=1, **kw)[0]["o"]
    y = evaluate_pairs(ref, [_em("o", other)], few, batch_size=3, **kw)[0]["o"]
    torch.testing.assert_close(x, y, rtol=1e-4, atol=1e-6)


class TowardWinners(torch.nn.Module):
    """The reference UNet nudged toward the winners: on the conditional branch its prediction
    moves a fraction ``lam`` toward the noise that would be exact if x0 were the prompt's
    winner, (x_t − √ᾱ_t·x0_w) / √(1 − ᾱ_t); the null branch is left as it is."""

    def __init__(self, unet, scheduler, winners: list, lam: float = 0.3):
        super().__init__()
        self.unet, self.winners, self.lam = unet, winners, lam
        self.abar = scheduler.alphas_cumprod
        self.config = unet.config

    def forward(self, x, t, encoder_hidden_states, **kw):
        base = self.unet(x, t, encoder_hidden_states=encoder_hidden_states, **kw).sample
        out = base.clone()
        for i in range(x.shape[0]):
            for emb, x0 in self.winners:
                if torch.equal(encoder_hidden_states[i], emb):
                    a = self.abar[t[i]]
                    eps = (x[i] - a.sqrt() * x0) / (1 - a).sqrt()
                    out[i] = base[i] + self.lam * (eps - base[i])
        return out


def test_model_nudged_toward_winners_gains_positive_accuracy(pix_model, source):
    ref = load_model(str(pix_model))
    nudged = load_model(str(pix_model))
    _, pix, prompts, *_ = load_pair_pixels(source, list(range(len(source))), 8)
    emb = encode_prompts(nudged, prompts).embeds
    nudged.unet = TowardWinners(nudged.unet, nudged.scheduler, list(zip(emb, pix[:, 0])))
    margins, _ = evaluate_pairs(ref, [_em("n", nudged)], source, timesteps=2, progress=False)
    r = preference_metrics(margins["n"])
    assert r["accuracy_pos"]["value"] >= 0.9, r
    assert r["accuracy_pos"]["ci"][0] > 0.5  # the reference itself scores 0.5 exactly
    assert r["accuracy_neg"]["value"] == 0.5  # null branch untouched: all ties
    assert r["winner_logp_proxy"]["value"] > 0  # it fits the winners better than the reference
    for key in ("accuracy_pos", "accuracy_neg", "winner_logp_proxy", "preferred_logp_proxy_null"):
        lo, hi = r[key]["ci"]
        assert lo <= r[key]["value"] <= hi


def test_eval_cli_writes_json_and_markdown(
    pix_model, pix_model_other, pairs_parquet, tmp_path, capsys
):
    out = tmp_path / "ev"
    rc = cli.main(
        [
            "eval",
            "--pairs",
            str(pairs_parquet),
            "--reference",
            str(pix_model),
            "--model",
            f"base={pix_model}",
            "--model",
            f"npo={pix_model}",
            "--negative",
            f"npo={pix_model_other}",
            "--timesteps",
            "2",
            "--max-pairs",
            "6",
            "--out",
            str(out),
            "--no-progress",
        ]
    )
    assert rc == 0, capsys.readouterr().err
    rep = json.loads((out / "preference.json").read_text())
    assert rep["settings"]["pairs"] == 6 and "bootstrap" in rep["settings"]["ci"]
    base, npo = rep["models"]["base"], rep["models"]["npo"]
    assert base["accuracy_pos"]["value"] == 0.5 and base["accuracy_neg"]["value"] == 0.5
    # the negative model only changes the null branch
    assert npo["accuracy_pos"] == base["accuracy_pos"]
    assert npo["preferred_logp_proxy_null"]["value"] != 0
    md = (out / "preference.md").read_text()
    assert "| base |" in md and "| npo |" in md and "negative acc." in md
    rc = cli.main(
        ["eval", "--pairs", str(pairs_parquet), "--model", str(pix_model), "--out", str(out)]
    )
    assert rc == 2 and "--reference" in capsys.readouterr().err


@pytest.mark.parametrize("family,with_vae", [("sd", True), ("sdxl", False)])
def test_eval_cli_vae_and_sdxl_models(family, with_vae, pairs_parquet, tmp_path, capsys):
    """VAE posterior sampling (SD1.5-class) and SDXL micro-conditioning go through eval."""
    from snpo.models import save_tiny_model

    from .conftest import WORDS
    from .helpers import perturbed_full_export

    base = save_tiny_model(
        tmp_path / "b", family=family, words=WORDS, resolution=8, with_vae=with_vae
    )
    tuned = perturbed_full_export(base, tmp_path / "t", seed=4, scale=0.05)
    out = tmp_path / "ev"
    argv = ["eval", "--pairs", str(pairs_parquet), "--reference", str(base)]
    argv += ["--model", f"same={base}", "--model", f"tuned={tuned}", "--max-pairs", "3"]
    argv += ["--timesteps", "1", "--out", str(out), "--no-progress"]
    assert cli.main(argv) == 0, capsys.readouterr().err
    rep = json.loads((out / "preference.json").read_text())["models"]
    assert rep["same"]["accuracy_pos"]["value"] == 0.5
    assert rep["tuned"]["winner_logp_proxy"]["value"] != 0
    null_kind = json.loads((out / "preference.json").read_text())["settings"]["null_kinds"]
    assert null_kind["same"] == ("zeros" if family == "sdxl" else "empty_prompt")


def _outside_pairs(tmp_path):
    """Own pairs whose images lie outside the pairs file's folder ("../img/…")."""
    from snpo.data import image_bytes

    img = tmp_path / "img"
    img.mkdir()
    (img / "w.png").write_bytes(image_bytes((220, 30, 30), (12, 10)))
    (img / "l.png").write_bytes(image_bytes((40, 60, 230), (12, 10)))
    (img / "broken.png").write_bytes(image_bytes((40, 60, 230), (12, 10))[:40])
    pairs = tmp_path / "set" / "p.jsonl"
    pairs.parent.mkdir()
    rows = [("../img/w.png", "../img/l.png"), ("../img/w.png", "../img/broken.png")]
    pairs.write_text(
        "".join(
            json.dumps({"prompt": "a photo of a red cube", "winner": w, "loser": lo}) + "\n"
            for w, lo in rows
        )
    )
    return pairs


def test_eval_data_errors_exit_2_and_allow_outside_paths(pix_model, tmp_path, capsys):
    pairs = _outside_pairs(tmp_path)
    argv = ["eval", "--pairs", str(pairs), "--reference", str(pix_model)]
    argv += ["--model", f"base={pix_model}", "--timesteps", "1", "--no-progress"]
    rc = cli.main([*argv, "--out", str(tmp_path / "refused")])
    err = capsys.readouterr().err
    assert rc == 2 and "allow_outside_paths" in err and "Traceback" not in err
    assert err.startswith("snpo eval: error:") and len(err.strip().splitlines()) == 1
    out = tmp_path / "allowed"
    rc = cli.main([*argv, "--out", str(out), "--allow-outside-paths"])
    assert rc == 0, capsys.readouterr().err
    settings = json.loads((out / "preference.json").read_text())["settings"]
    # the undecodable loser makes its pair bad (counted and skipped), as in training
    assert settings["pairs"] == 1 and settings["bad_pairs"] == 1
    assert "broken.png" in settings["bad_examples"][0]


def test_load_pair_pixels_uses_the_trainers_bad_image_rule(tmp_path):
    from snpo.data import OwnPairs

    src = OwnPairs(str(_outside_pairs(tmp_path)), allow_outside_paths=True)
    keep, pix, prompts, sizes, crops, bad = load_pair_pixels(src, [0, 1], 8)
    assert keep == [0] and pix.shape == (1, 2, 3, 8, 8) and prompts == ["a photo of a red cube"]
    assert sizes.tolist() == [[[10, 12], [10, 12]]] and crops.shape == (1, 2, 2)
    assert [i for i, _ in bad] == [1] and "loser image" in bad[0][1]
