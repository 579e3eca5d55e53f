"""The EMA of the trained weights (:mod:`snpo.trainer.ema`): the update against its formula, the
ZeRO-3 partition bookkeeping, a LoRA run whose exported EMA is the formula applied to the raw
per-step exports, an exact resume, and a 2-rank ZeRO-3 run."""

from __future__ import annotations

import pytest
import torch
from safetensors.torch import load_file

from snpo.trainer.ema import EMA, ema_update_, merge_partitions

from .conftest import launch_deepspeed, train_here, write_config

LORA_FILE = "pytorch_lora_weights.safetensors"


def _toy() -> torch.nn.Module:
    torch.manual_seed(0)
    m = torch.nn.Sequential(torch.nn.Linear(3, 5), torch.nn.Linear(5, 2))
    m[1].bias.requires_grad_(False)  # frozen: not averaged
    return m


def test_update_follows_the_formula_and_swap_restores():
    m, d = _toy(), 0.8
    ema = EMA(m, d, start_step=1)
    assert len(ema.shadow) == 3 and all(e.dtype == torch.float32 for e in ema.shadow)
    trained = [p for p in m.parameters() if p.requires_grad]
    want = [p.detach().clone() for p in trained]  # ema_0 = θ_0
    for step in range(1, 5):
        with torch.no_grad():
            for p in trained:
                p.add_(torch.randn_like(p))
        ema.update(step)
        if step <= 1:
            want = [p.detach().clone() for p in trained]
        else:
            want = [d * w + (1 - d) * p.detach() for w, p in zip(want, trained)]
        for e, w in zip(ema.shadow, want):
            torch.testing.assert_close(e, w, rtol=0, atol=1e-6)
    assert not torch.equal(ema.shadow[0], trained[0])
    raw = [p.detach().clone() for p in m.parameters()]
    with ema.swapped_in():
        assert torch.equal(m[0].weight, ema.shadow[0])
    assert all(torch.equal(a, b) for a, b in zip(raw, m.parameters()))  # restored exactly
    # the pure function, on its own
    e, t = torch.ones(4), torch.arange(4.0, dtype=torch.bfloat16)
    ema_update_([e], [t], 0.25)
    torch.testing.assert_close(e, 0.25 * torch.ones(4) + 0.75 * torch.arange(4.0))
    with pytest.raises(ValueError):
        EMA(m, 1.0)


def test_zero3_partitions_merge_and_reslice():
    """Simulated ZeRO-3 partitions (ds_tensor = a padded flat slice): 2 ranks' states merge into
    the whole tensors, and 3 ranks each take their own slice of them."""
    full = {"w": torch.randn(5, 3), "b": torch.randn(7)}

    def ranks(world: int) -> list[EMA]:
        out = []
        for r in range(world):
            m = torch.nn.Module()
            for name, t in full.items():
                p = torch.nn.Parameter(torch.empty(0))
                size = -(-t.numel() // world)
                part = torch.zeros(size)
                piece = t.reshape(-1)[r * size : (r + 1) * size]
                part[: piece.numel()] = piece
                p.ds_tensor, p.ds_shape = part, t.shape
                m.register_parameter(name, p)
            out.append(EMA(m, 0.5, rank=r, world=world))
        return out

    two = ranks(2)
    assert all(e.partitioned for e in two)
    merged = merge_partitions([e.state() for e in two], two[0].shapes())
    assert all(torch.equal(merged[k], full[k]) for k in full)
    three = ranks(3)
    for e in three:
        before = [s.clone() for s in e.shadow]
        for s in e.shadow:
            s.zero_()
        e.load_full(merged)
        assert all(torch.equal(a, b) for a, b in zip(before, e.shadow))
    with pytest.raises(ValueError, match="does not match"):
        three[0].load_full({"w": full["w"]})


def _lora_cfg(tmp_path, tiny_sd, pickapic_clean, name, **kw):
    return write_config(
        tmp_path / f"{name}.yaml",
        model=tiny_sd,
        train_data=pickapic_clean,
        objective="dpo",
        lora_rank=4,
        learning_rate=1e-2,
        max_steps=4,
        ema_decay=0.9,
        ema_start_step=1,
        export_every=1,
        checkpoint_every=2,
        keep_checkpoints=0,
        output_dir=tmp_path / name,
        **kw,
    )


def test_lora_ema_export_is_the_formula_and_resume_is_exact(
    tmp_path, tiny_sd, pickapic_clean, one_thread, capsys
):
    d = 0.9
    ref = tmp_path / "ref"
    assert train_here(_lora_cfg(tmp_path, tiny_sd, pickapic_clean, "ref")) == 0
    raws = [load_file(ref / f"export-step{s:08d}-raw" / LORA_FILE) for s in (1, 2, 3)]
    raws.append(load_file(ref / "export-raw" / LORA_FILE))
    ema = load_file(ref / "export" / LORA_FILE)
    assert ema.keys() == raws[-1].keys() and len(ema) > 0
    want = {k: v.clone() for k, v in raws[0].items()}  # step 1 ≤ ema_start_step: a copy
    for raw in raws[1:]:
        want = {k: d * want[k] + (1 - d) * raw[k] for k in want}
    for k in ema:
        torch.testing.assert_close(ema[k], want[k], rtol=0, atol=1e-6)
    assert any(not torch.allclose(ema[k], raws[-1][k]) for k in ema)  # the EMA lags the raw
    step1 = load_file(ref / "export-step00000001" / LORA_FILE)
    assert all(torch.equal(step1[k], raws[0][k]) for k in step1)
    assert (ref / "checkpoints" / "step_00000002" / "snpo_ema.safetensors").is_file()

    # stopped after step 2's checkpoint, resumed to 4: the same EMA and raw weights
    cfg = _lora_cfg(tmp_path, tiny_sd, pickapic_clean, "split")
    assert train_here(cfg, "--max_steps", "2") == 0
    assert train_here(cfg) == 0
    out = tmp_path / "split"
    for folder in ("export", "export-raw"):
        a, b = load_file(ref / folder / LORA_FILE), load_file(out / folder / LORA_FILE)
        assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a), folder
    # the EMA options shape what is exported: changing one refuses to resume
    capsys.readouterr()
    assert train_here(cfg, "--max_steps", "5", "--ema_decay", "0.5") == 4
    assert "ema_decay" in capsys.readouterr().err


@pytest.mark.slow
def test_zero3_two_ranks_ema_exports_a_loadable_model(tmp_path, tiny_sd, pickapic_clean):
    from diffusers import UNet2DConditionModel

    d, out = 0.5, tmp_path / "z3"
    cfg = write_config(
        tmp_path / "c.yaml",
        model=tiny_sd,
        train_data=pickapic_clean,
        objective="dpo",
        zero_stage=3,
        max_steps=2,
        learning_rate=1e-3,
        ema_decay=d,
        ema_start_step=1,
        export_every=1,
        checkpoint_every=1,
        keep_checkpoints=0,
        output_dir=out,
    )
    launch_deepspeed(cfg)
    tag = out / "checkpoints" / "step_00000002"
    assert sorted(p.name for p in tag.glob("snpo_ema*")) == [
        "snpo_ema_rank00000.safetensors",
        "snpo_ema_rank00001.safetensors",
    ]
    ema = UNet2DConditionModel.from_pretrained(str(out / "export" / "unet")).state_dict()
    raw1 = UNet2DConditionModel.from_pretrained(str(out / "export-step00000001-raw" / "unet"))
    raw2 = UNet2DConditionModel.from_pretrained(str(out / "export-raw" / "unet"))
    r1, r2 = raw1.state_dict(), raw2.state_dict()
    assert any(not torch.equal(r1[k], r2[k]) for k in r1)  # it trained
    for k in ema:  # ema_2 = d·θ_1 + (1 − d)·θ_2, gathered from the two ranks' partitions
        torch.testing.assert_close(ema[k], d * r1[k] + (1 - d) * r2[k], rtol=0, atol=1e-6)
