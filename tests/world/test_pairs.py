"""The base model folder and preference pairs from a model's own samples."""

from __future__ import annotations

import json
import random

import pyarrow.parquet as pq
import pytest
import torch

from snpo.data import PICKAPIC_COLUMNS as COLUMNS
from snpo.models import encode_prompts, generate, load_model, null_embedding
from snpo.world.base_model import build_base_model_folder, read_world_info
from snpo.world.pairs import Candidate, candidate_seed, form_pairs, generate_pairs, write_pairs
from snpo.world.pickapic import decode_image, read_table
from snpo.world.render import render
from snpo.world.reward import reward
from snpo.world.vocab import WORDS, all_prompts, ordered_prompts, parse_prompt


def test_base_folder_loads_and_samples(base_dir, base_model):
    m = base_model
    assert m.family == "sd" and m.vae is None and m.in_channels == 3 and m.latent_scale == 1
    assert m.prediction_type == "epsilon" and m.null_kind == "empty_prompt"
    n_params = sum(p.numel() for p in m.unet.parameters())
    assert 0.6e6 < n_params < 1.0e6
    assert m.unet.config.sample_size == 16 and m.unet.config.cross_attention_dim == 32
    for w in WORDS:
        assert len(m.tokenizers[0].tokenize(w)) == 1, w
    info = read_world_info(base_dir)
    assert info["resolution"] == 16 and info["seed"] == 0
    emb = encode_prompts(m, [p.text for p in all_prompts()[:2]])
    imgs = generate(m, emb, null_embedding(m), seeds=[0, 1], steps=2, guidance_scale=3.0)
    assert imgs.shape == (2, 3, 16, 16) and imgs.min() >= 0 and imgs.max() <= 1
    with pytest.raises(FileExistsError):
        build_base_model_folder(base_dir)


def test_text_encoder_tells_the_words_apart(base_model):
    # prompts differing in one word: the hidden states at that word are far apart
    from snpo.world.vocab import COLOURS, POSITIONS, SHAPES, Prompt

    groups = {
        2: [Prompt(c, "square", "left").text for c in COLOURS],
        3: [Prompt("red", s, "left").text for s in SHAPES],
        6: [Prompt("red", "square", p).text for p in POSITIONS],
    }
    for pos, texts in groups.items():
        e = encode_prompts(base_model, texts).embeds[:, pos]
        e = e / e.norm(dim=-1, keepdim=True)
        cos = e @ e.T - 2 * torch.eye(len(texts))
        assert cos.max() < 0.5, (texts, cos.max())


def test_base_folder_is_a_function_of_the_seed(tmp_path, base_model):
    other = load_model(str(build_base_model_folder(tmp_path / "b", seed=0)))
    for (k, a), b in zip(base_model.unet.state_dict().items(), other.unet.state_dict().values()):
        assert torch.equal(a, b), k
    third = load_model(str(build_base_model_folder(tmp_path / "c", seed=1)))
    assert not torch.equal(next(third.unet.parameters()), next(base_model.unet.parameters()))


def _check_file(path, prompts, tie_threshold):
    t = read_table(path)
    assert list(t.schema.names) == list(COLUMNS)
    rows = t.to_pylist()
    for r in rows:
        p = parse_prompt(r["caption"])
        assert p in prompts
        x0, x1 = decode_image(r["jpg_0"]), decode_image(r["jpg_1"])
        r0, r1 = reward(torch.stack([x0, x1]), [p, p]).tolist()
        if r["has_label"]:
            assert {r["label_0"], r["label_1"]} == {0.0, 1.0}
            win0 = r["label_0"] == 1.0
            assert (r0 - r1 if win0 else r1 - r0) >= tie_threshold - 1e-6
            assert r["best_image_uid"] == (r["image_0_uid"] if win0 else r["image_1_uid"])
        else:
            assert r["label_0"] == r["label_1"] == 0.5 and r["best_image_uid"] == "none"
            assert abs(r0 - r1) < tie_threshold + 1e-6
        assert r["image_0_uid"] != r["image_1_uid"]
    return rows


def test_pairs_from_the_untrained_base(tmp_path, base_model):
    prompts = ordered_prompts("train")[:2]
    ps = generate_pairs(base_model, prompts, candidates=3, steps=2, tie_keep=1.0, progress=False)
    assert len(ps.candidates) == 6 and ps.stats["pairs"] + ps.stats["ties_kept"] == 6
    out = write_pairs(ps, tmp_path / "pairs.parquet")
    rows = _check_file(out, prompts, 0.03)
    assert len(rows) == 6
    meta = json.loads(out.with_suffix(".json").read_text())
    assert len(meta["candidates_detail"]) == 6
    # the seeds are the documented ones, and a candidate does not depend on the others asked
    assert ps.candidates[4].seed == candidate_seed(2, prompts[1], 1)
    alone = generate_pairs(base_model, prompts[1:], candidates=2, steps=2, progress=False)
    torch.testing.assert_close(
        alone.candidates[1].image, ps.candidates[4].image, atol=1.01 / 255, rtol=0
    )


class _NoisyOracle(torch.nn.Module):
    """A stand-in denoiser whose samples are the prompt's ground truth plus seed-dependent
    noise, so that candidates have clearly different rewards (an untrained model's do not)."""

    def __init__(self, model, prompts, strength=0.35):
        super().__init__()
        self.config = model.unet.config
        self.dummy = torch.nn.Parameter(torch.zeros(1))
        self.ac = model.scheduler.alphas_cumprod
        texts = [p.text for p in prompts]
        self.keys = torch.cat([encode_prompts(model, texts).embeds, null_embedding(model).embeds])
        targets = torch.stack([render(p) for p in prompts]) * 2 - 1
        self.targets = torch.cat([targets, -torch.ones(1, 3, 16, 16)])
        self.strength = strength

    def forward(self, x, t, encoder_hidden_states):
        d = (encoder_hidden_states[:, None] - self.keys[None]).flatten(2).norm(dim=-1)
        x0 = self.targets[d.argmin(1)] + self.strength * x.clamp(-3, 3)
        a = self.ac[int(t)]
        eps = (x - a.sqrt() * x0) / (1 - a).sqrt()
        return type("Out", (), {"sample": eps})()


def test_pairs_labels_agree_with_the_reward(tmp_path, base_dir):
    m = load_model(str(base_dir))
    prompts = ordered_prompts("train")[:3]
    m.unet = _NoisyOracle(m, prompts)
    ps = generate_pairs(
        m, prompts, candidates=6, steps=3, tie_threshold=0.03, tie_keep=1.0, progress=False
    )
    rewards = torch.tensor([c.reward for c in ps.candidates])
    assert rewards.std() > 0.05  # the candidates really differ
    assert ps.stats["pairs"] >= 10
    rows = _check_file(write_pairs(ps, tmp_path / "p.parquet"), prompts, 0.03)
    assert {r["label_0"] for r in rows if r["has_label"]} == {0.0, 1.0}  # both sides win
    assert pq.read_metadata(tmp_path / "p.parquet").num_columns == 19


def _cand(p, j, r):
    img = render(p, j)
    return Candidate(p, j, j, 1.0, img, r, {}, f"uid-{j}", "m@cfg1")


def test_form_pairs_thresholds_sides_and_caps():
    p = all_prompts()[7]
    cands = [_cand(p, j, r) for j, r in enumerate([0.9, 0.5, 0.51, 0.2])]
    rows, counts = form_pairs(cands, random.Random(0), tie_threshold=0.05, tie_keep=1.0)
    assert counts == {"pairs": 5, "ties_kept": 1, "ties_dropped": 0}
    by_uids = {frozenset((r.image_0_uid, r.image_1_uid)): r for r in rows}
    tie = by_uids[frozenset(("uid-1", "uid-2"))]
    assert tie.is_tie and tie.best_image_uid == "none"
    assert by_uids[frozenset(("uid-0", "uid-3"))].best_image_uid == "uid-0"
    assert by_uids[frozenset(("uid-2", "uid-3"))].best_image_uid == "uid-2"
    rows, counts = form_pairs(cands, random.Random(0), tie_threshold=0.05, tie_keep=0.0)
    assert counts == {"pairs": 5, "ties_kept": 0, "ties_dropped": 1}
    rows, counts = form_pairs(
        cands, random.Random(0), tie_threshold=0.05, tie_keep=0.0, max_pairs_per_prompt=2
    )
    assert counts["pairs"] == 2 and len(rows) == 2
    sides = [
        r.label_0
        for s in range(20)
        for r in form_pairs(cands, random.Random(s), tie_threshold=0.05, tie_keep=0.0)[0]
    ]
    assert 0.3 < sum(sides) / len(sides) < 0.7  # the winner's side is random
