"""Fixtures of the tools' tests (sample, merge, eval, rewards): tiny models, LoRA exports, a tiny
CLIP with an offline processor, and a synthetic Pick-a-Pic parquet file. Nothing downloads."""

from __future__ import annotations

import pytest
import torch

WORDS = ["a", "photo", "of", "red", "blue", "green", "cube", "ball", "cat", "dog"]


@pytest.fixture(scope="session")
def sd_model(tmp_path_factory):
    """A tiny SD1.5-class model with a VAE, 16 px."""
    from snpo.models import save_tiny_model

    return save_tiny_model(tmp_path_factory.mktemp("sd") / "m", words=WORDS, resolution=16)


@pytest.fixture(scope="session")
def pix_model(tmp_path_factory):
    """A tiny pixel-space SD1.5-class model (no VAE), 8 px: the cheapest to run."""
    from snpo.models import save_tiny_model

    return save_tiny_model(
        tmp_path_factory.mktemp("pix") / "m", words=WORDS, resolution=8, with_vae=False
    )


@pytest.fixture(scope="session")
def pix_model_other(tmp_path_factory):
    """Same architecture as pix_model, other random weights."""
    from snpo.models import save_tiny_model

    return save_tiny_model(
        tmp_path_factory.mktemp("pix2") / "m", words=WORDS, resolution=8, with_vae=False, seed=7
    )


@pytest.fixture(scope="session")
def tiny_clip(tmp_path_factory):
    """A random small CLIPModel + CLIPProcessor (offline BPE tokenizer, CLIPImageProcessor
    config) saved in one folder, as PickScore / the aesthetic predictor's CLIP would be."""
    from transformers import CLIPConfig, CLIPImageProcessor, CLIPModel, CLIPProcessor

    from snpo.models import build_tokenizer

    path = tmp_path_factory.mktemp("clip") / "clip"
    tok = build_tokenizer(WORDS, max_length=16)
    eos = tok.convert_tokens_to_ids("<|endoftext|>")
    cfg = CLIPConfig(
        text_config=dict(
            vocab_size=len(tok),
            hidden_size=32,
            intermediate_size=64,
            num_hidden_layers=2,
            num_attention_heads=4,
            max_position_embeddings=16,
            bos_token_id=tok.convert_tokens_to_ids("<|startoftext|>"),
            eos_token_id=eos,
            pad_token_id=eos,
        ),
        vision_config=dict(
            image_size=32,
            patch_size=8,
            hidden_size=32,
            intermediate_size=64,
            num_hidden_layers=2,
            num_attention_heads=4,
        ),
        projection_dim=16,
    )
    torch.manual_seed(0)
    CLIPModel(cfg).save_pretrained(path)
    proc = CLIPProcessor(
        image_processor=CLIPImageProcessor(
            size={"shortest_edge": 32}, crop_size={"height": 32, "width": 32}
        ),
        tokenizer=tok,
    )
    proc.save_pretrained(path)
    return path


@pytest.fixture(scope="session")
def pairs_parquet(tmp_path_factory):
    """Synthetic Pick-a-Pic v2 pairs (the winner's colour matches the prompt; some rows loser
    first) plus one tie row."""
    from snpo.data import synthetic_pairs, write_pickapic_parquet

    rows = synthetic_pairs(10, WORDS, seed=0)
    tie = dict(rows[0])
    tie["label_0"] = 0.5
    rows.insert(3, tie)
    return write_pickapic_parquet(tmp_path_factory.mktemp("pairs") / "val.parquet", rows)
