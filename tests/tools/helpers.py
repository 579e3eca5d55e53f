"""Helpers of the tools' tests: exports of tiny models built on the fly."""

from __future__ import annotations

import torch


def perturbed_full_export(base, out, seed: int, scale: float = 0.05, meta: dict | None = None):
    """A full export of ``base`` with every UNet weight nudged by seeded noise."""
    from snpo.models import load_model, write_export

    m = load_model(str(base))
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in m.unet.parameters():
            p.add_(scale * torch.randn(p.shape, generator=g))
    return write_export(out, m, m.unet, lora=False, meta=meta or {"objective": "dpo"})


def lora_export(base, out, *, seed: int, r: int, alpha: float, targets: list[str], meta=None):
    """A LoRA export of ``base`` with random (seeded) factors."""
    from peft import LoraConfig

    from snpo.models import load_model, write_export

    m = load_model(str(base))
    m.unet.add_adapter(
        LoraConfig(r=r, lora_alpha=alpha, target_modules=targets, init_lora_weights="gaussian")
    )
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for n, p in m.unet.named_parameters():
            if "lora_" in n:
                p.copy_(0.2 * torch.randn(p.shape, generator=g))
    return write_export(out, m, m.unet, lora=True, meta=meta or {"objective": "npo"})
