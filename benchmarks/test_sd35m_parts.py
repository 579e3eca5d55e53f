"""The full-size SD3.5-Medium parts (``sd35m``) built on the meta device: parameter counts and
embedding widths (CPU, no memory allocated, nothing downloaded)."""

import torch

from benchmarks import sd_models as SM
from benchmarks import trainer_cases as TC
from snpo.tools.estimate import ARCHS


def _n(m: torch.nn.Module) -> int:
    return sum(p.numel() for p in m.parameters())


def test_sd35m_parts_counts_and_widths():
    from diffusers import SD3Transformer2DModel

    torch.manual_seed(0)
    tr, vae, (clip_l, clip_g, t5), toks = SM.build_flow_parts(
        "sd35m", TC.SD35M_TRANSFORMER, device="meta", dtype=torch.bfloat16
    )
    with torch.device("meta"):
        ref = SD3Transformer2DModel(**TC.SD35M_TRANSFORMER)
    assert _n(tr) == _n(ref) == 2_243_171_520  # MMDiT-X, 2.24 B
    frozen = ARCHS["sd35m"]["frozen"]
    assert _n(clip_l) == frozen["text_encoder (CLIP ViT-L/14)"] == 123_650_304
    assert _n(clip_g) == frozen["text_encoder_2 (OpenCLIP bigG/14)"] == 694_659_840
    assert _n(t5) == frozen["text_encoder_3 (T5-XXL encoder)"] == 4_762_310_656
    assert _n(vae) == frozen["vae"] == 83_819_683
    # CLIP penultimate 768 + 1280 = 2048, zero-padded to T5's 4096 = joint_attention_dim
    cl, cg, tc = clip_l.config, clip_g.config, t5.config
    assert cl.hidden_size + cg.hidden_size == 2048 < tc.d_model == 4096
    assert tr.config.joint_attention_dim == tc.d_model
    assert cl.projection_dim + cg.projection_dim == tr.config.pooled_projection_dim == 2048
    assert t5.shared.weight.shape == (32128, 4096) and len(toks[2]) < 32128
    assert toks[0].model_max_length == 77 and toks[2].model_max_length == SM.T5_TOKENS
    assert vae.config.latent_channels == tr.config.in_channels == 16
