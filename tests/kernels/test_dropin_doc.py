"""docs/dropin.md is executed: its ```python blocks run in order on a tiny diffusers UNet, with
every backend this machine has (SNPO_BACKEND forces the one that "auto" picks), for a few
optimizer steps, and the one-call loss is checked against the trainer's own loss block.

Tolerance of "one call == the trainer's block": both sides accumulate each per-sample error e
(N = 4·8·8 = 256 float32 terms) with tree-shaped sums (torch's cascade reduction, Triton's
tl.sum), each within (⌈log₂N⌉ + 1)·u·e of the exact value (u = 2⁻²⁴); the logit
β′·((e_rw − e_rl) − (e_w − e_l)) combines four errors and |dℓ/dz| ≤ 1, so the two losses differ by
at most 8·β′·(⌈log₂N⌉ + 1)·u·max(e) (:func:`loss_tolerance`). The test checks that this is well
below what a β-convention mix-up changes.
"""

from __future__ import annotations

import copy
import math
import re
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

import snpo_kernels as sk

DOC = Path(__file__).resolve().parents[2] / "docs" / "dropin.md"
BLOCK = re.compile(r"^```python (\w+)\n(.*?)^```", re.M | re.S)
P, STEPS = 3, 3


def doc_blocks() -> dict[str, str]:
    """The labelled python blocks of docs/dropin.md, in document order."""
    blocks = {m.group(1): m.group(2) for m in BLOCK.finditer(DOC.read_text())}
    assert list(blocks) == ["before", "after", "snpo", "stats", "cached", "flow"], list(blocks)
    return blocks


def tiny_unet() -> torch.nn.Module:
    from diffusers import UNet2DConditionModel

    torch.manual_seed(0)
    return UNet2DConditionModel(
        sample_size=8,
        in_channels=4,
        out_channels=4,
        block_out_channels=(8, 16),
        down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
        up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"),
        layers_per_block=1,
        cross_attention_dim=16,
        attention_head_dim=4,
        norm_num_groups=4,
    )


def trainer_namespace(seed: int, unet, ref_unet) -> dict:
    """What a DPO trainer has at its loss block (docs/dropin.md, "The shapes"), seeded."""
    from diffusers import DDPMScheduler

    g = torch.Generator().manual_seed(seed)
    eps = torch.randn(P, 4, 8, 8, generator=g)
    t = torch.randint(0, 1000, (P,), generator=g)
    caption = torch.randn(P, 5, 16, generator=g)
    return {
        "torch": torch,
        "F": F,
        "P": P,
        "unet": unet,
        "ref_unet": ref_unet,
        "noise_scheduler": DDPMScheduler(num_train_timesteps=1000),
        "latents": torch.randn(2 * P, 4, 8, 8, generator=g),
        "noise": torch.cat([eps, eps]),
        "timesteps": torch.cat([t, t]),
        "prompt_embeds": torch.cat([caption, caption]),
        "null_embeds": torch.randn(1, 5, 16, generator=g),
        "beta_dpo": 2500.0,
        "null_prob": 0.5,
        "accumulation": 2,
        "gen": torch.Generator().manual_seed(seed + 100),
    }


def loss_tolerance(ns: dict) -> float:
    """8·β′·(⌈log₂N⌉ + 1)·u·max(e): the float32 rounding gap of the two loss computations."""
    e = torch.cat([ns["model_err"], ns["ref_err"]]).detach().abs().max()
    n = ns["latents"][0].numel()
    return 8.0 * ns["beta_dpo"] * (math.ceil(math.log2(n)) + 1) * 2.0**-24 * float(e)


def run_doc(ns: dict, blocks: dict[str, str]) -> dict:
    """Executes the blocks in order in ``ns``; ``ns["seen"][name]`` is the namespace's ``loss``
    right after block ``name`` (later blocks reuse the name)."""
    ns["seen"] = {}
    for name, code in blocks.items():
        exec(compile(code, f"{DOC.name}:{name}", "exec"), ns)  # noqa: S102 (our own docs)
        ns["seen"][name] = ns.get("loss")
        if name == "before":
            ns["model_pred_dpo"], ns["ref_pred_dpo"] = ns["model_pred"], ns["ref_pred"]
    return ns


def _backends() -> list[str]:
    return sk.available_backends("cpu", torch.float32) + (
        ["cuda"] if torch.cuda.is_available() else []
    )


@pytest.mark.parametrize("backend", sorted(set(_backends())))
def test_dropin_doc_runs_and_matches_the_trainers_own_loss(backend, monkeypatch):
    """A minimal training loop made of the doc's blocks: the one-call loss equals the
    hand-written block each step, Diff-SNPO mode trains (finite loss, weights move), the
    statistics have no NaN, and cached reference errors give the live reference's loss."""
    monkeypatch.setenv("SNPO_BACKEND", backend)
    device = "cuda" if backend == "cuda" else "cpu"
    blocks = doc_blocks()
    unet = tiny_unet().to(device)
    ref_unet = copy.deepcopy(unet).requires_grad_(False)
    with torch.no_grad():  # the policy starts away from the reference, as after some training
        g = torch.Generator().manual_seed(1)
        for p in unet.parameters():
            p.add_(3e-2 * torch.randn(p.shape, generator=g).to(device))
    opt = torch.optim.SGD(unet.parameters(), lr=1e-3)
    start = [p.detach().clone() for p in unet.parameters()]
    for step in range(STEPS):
        ns = trainer_namespace(step, unet, ref_unet)
        ns = {k: (v.to(device) if isinstance(v, torch.Tensor) else v) for k, v in ns.items()}
        opt.zero_grad()
        run_doc(ns, blocks)
        tol = loss_tolerance(ns)
        torch.testing.assert_close(ns["seen"]["after"], ns["loss_before"], rtol=0, atol=tol)
        if backend == "torch":  # the reference is the block's arithmetic, bit for bit
            assert torch.equal(ns["seen"]["after"], ns["loss_before"])
        # the tolerance tells the conventions apart: β′ passed as `beta` halves the strength
        wrong = sk.preference_loss(
            ns["model_pred_dpo"], ns["noise"], ns["ref_pred_dpo"], beta=2500.0
        )
        assert abs(float(wrong.detach() - ns["loss_before"].detach())) > 3 * tol
        dropped = ns["dropped"]
        assert dropped.dtype == torch.bool and dropped.shape == (P,)
        assert torch.isfinite(ns["loss_flow"]) and torch.isfinite(ns["loss"])
        # the cached errors are computed apart from the loss's own pass: the same float32
        # rounding bound as above, at the Diff-SNPO block's β = 2β′ (the loss is β-linear here)
        torch.testing.assert_close(ns["loss_cached"], ns["loss"], rtol=0, atol=2 * tol)
        metrics = ns["metrics"]
        assert metrics["count_cond"] + metrics["count_uncond"] == ns["accumulation"] * P
        assert all(v == v for v in metrics.values()), metrics  # no NaN, ever
        assert ("accuracy_uncond" in metrics) == bool(dropped.any())
        opt.step()  # the gradients of the Diff-SNPO block's loss.backward()
    moved = sum(float((p.detach() - s).abs().sum()) for p, s in zip(unet.parameters(), start))
    assert moved > 0


def test_doc_loss_equals_the_reference_formula_in_float64():
    """The "after" block against the contract computed by hand in float64: the doc's claim
    that beta_logit=β′ is the trainer's -logsigmoid(β′·(Δ_ref − Δ_model))."""
    g = torch.Generator().manual_seed(7)
    pred, target, ref = (
        torch.randn(2 * P, 4, 3, 3, generator=g, dtype=torch.float64) for _ in "abc"
    )
    e = lambda x: (x - target).pow(2).mean(dim=[1, 2, 3])  # noqa: E731
    (mw, ml), (rw, rl) = e(pred).chunk(2), e(ref).chunk(2)
    want = -F.logsigmoid(0.3 * ((rw - rl) - (mw - ml))).mean()
    got = sk.preference_loss(pred, target, ref, beta_logit=0.3, lam=1.0, backend="torch")
    torch.testing.assert_close(got, want, rtol=1e-12, atol=0)


def test_readme_quick_start_runs():
    """The README's Diff-SNPO quick start, executed with a trainer's names bound."""
    readme = (DOC.parents[1] / "README.md").read_text()
    section = readme[readme.index("## The loss in your trainer") :]
    code = re.search(r"```python\n(.*?)^```", section, re.M | re.S).group(1)
    unet = tiny_unet()
    ns = trainer_namespace(0, unet, copy.deepcopy(unet).requires_grad_(False))
    ns.update(
        noisy=ns["noise_scheduler"].add_noise(ns["latents"], ns["noise"], ns["timesteps"]),
        t=ns["timesteps"],
        embeds=ns["prompt_embeds"],
    )
    torch.manual_seed(3)
    exec(compile(code, "README.md", "exec"), ns)  # noqa: S102 (our own README)
    assert torch.isfinite(ns["loss"])
    assert any(p.grad is not None and p.grad.abs().sum() > 0 for p in unet.parameters())
