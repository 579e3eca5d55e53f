"""Classifier-free-guidance sampling through the model's family, with an optional negative
model for the null branch.

    pred = pred_neg(x, ∅) + s·(pred_pos(x, c) − pred_neg(x, ∅))

``pred_neg`` is the same network as ``pred_pos`` (standard CFG; Diff-SNPO's single network) or a
separate negative model (Diffusion-NPO). The guidance applies to whatever the model predicts
(ε, v or flow velocity); the family's scheduler turns it into the next sample. Families
without a null branch (guidance-distilled) get s as their embedded guidance instead.
Default scheduler: the family's (DDIM, 50 steps, for the ε-families).
"""

from __future__ import annotations

import torch

from snpo.models.diffusion import DiffusionModel
from snpo.models.embeddings import PromptEmbeddings
from snpo.models.latents import decode_latents
from snpo.models.sd import time_ids


def initial_noise(
    seeds: list[int], shape: tuple[int, ...], device: torch.device | str = "cpu"
) -> torch.Tensor:
    """One independent N(0, I) draw of ``shape`` per seed, stacked: (len(seeds), *shape).

    Seeded per image, so an image does not depend on its batch neighbours."""
    out = [torch.randn(shape, generator=torch.Generator().manual_seed(int(s))) for s in seeds]
    return torch.stack(out).to(device)


@torch.no_grad()
def generate(
    model: DiffusionModel,
    cond: PromptEmbeddings,
    null: PromptEmbeddings,
    seeds: list[int],
    *,
    guidance_scale: float = 7.5,
    steps: int = 50,
    resolution: int | None = None,
    negative_unet: torch.nn.Module | None = None,
    scheduler: str | None = None,
    progress: bool = False,
) -> torch.Tensor:
    """Images in [0, 1], (B, 3, H, W), for B = len(seeds) rows of ``cond``.

    null: the (1, L, D) unconditional embedding (:func:`snpo.models.null_embedding`).
    guidance_scale 1 → plain conditional sampling (the null branch, or negative model, is
    skipped). scheduler: a name the family knows (ε-families: ddim, ddpm, euler), None → its
    default.
    """
    if len(cond) != len(seeds):
        raise ValueError(f"{len(cond)} prompt embeddings but {len(seeds)} seeds")
    fam = model.spec
    net = model.denoiser
    device = next(net.parameters()).device
    dtype = next(net.parameters()).dtype
    if not resolution:
        from snpo.models.trained import default_resolution

        resolution = default_resolution(model)
    res = resolution
    side = res // model.latent_scale
    shape = (model.in_channels, side, side)
    sched = fam.sampling_scheduler(model, scheduler, steps, device, shape)
    b = len(seeds)
    x = fam.initial_latents(sched, initial_noise(seeds, shape, device))
    cond = cond.to(device=device, dtype=dtype)
    null_b = null.to(device=device, dtype=dtype).expand(b)
    tid = time_ids(b, (res, res), device=device, dtype=dtype) if fam.needs_time_ids else None
    guidance = None
    if not fam.has_null_branch:  # guidance-distilled: the scale is an input, no null branch
        guidance = torch.full((b,), float(guidance_scale), device=device, dtype=dtype)
    use_null = fam.has_null_branch and guidance_scale != 1.0  # at s = 1: pred = pred_c
    same_net = negative_unet is None

    def predict(module, xin, t, emb, rows_tid, rows_guidance):
        kw = fam.conditioning(model, emb, rows_tid, guidance=rows_guidance)
        return fam.denoise(module, xin, t, kw).float()

    it = sched.timesteps
    if progress:
        from tqdm.auto import tqdm

        it = tqdm(it, desc="sampling", leave=False)
    for t in it:
        xin = fam.model_input(sched, x, t).to(dtype)
        if use_null and same_net:
            # one forward carries both branches: rows [null; cond]
            both = PromptEmbeddings.cat([null_b, cond])
            tid2 = None if tid is None else torch.cat([tid, tid])
            pred_u, pred_c = predict(net, torch.cat([xin, xin]), t, both, tid2, None).chunk(2)
        else:
            pred_c = predict(net, xin, t, cond, tid, guidance)
            pred_u = pred_c
            if use_null:
                pred_u = predict(negative_unet, xin, t, null_b, tid, None)
        pred = pred_u + guidance_scale * (pred_c - pred_u)
        x = sched.step(pred, t, x).prev_sample
    return decode_latents(model, x)
