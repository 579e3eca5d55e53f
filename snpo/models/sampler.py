"""Classifier-free-guidance sampling, with an optional negative model for the null branch.

    eps = eps_neg(x, ∅) + s·(eps_pos(x, c) − eps_neg(x, ∅))

``eps_neg`` is the same network as ``eps_pos`` (standard CFG; Diff-SNPO's single network) or a
separate negative model (Diffusion-NPO). The guidance applies to whatever the model predicts
(epsilon or velocity); the scheduler turns it into the next sample. Default: DDIM, 50 steps.
"""

from __future__ import annotations

import torch

from .models import DiffusionModel, PromptEmbeddings, decode_latents, time_ids, unet_conditioning


def make_scheduler(model: DiffusionModel, name: str = "ddim"):
    """A sampling scheduler built from the model's training scheduler config."""
    from diffusers import DDIMScheduler, DDPMScheduler, EulerDiscreteScheduler

    classes = {"ddim": DDIMScheduler, "ddpm": DDPMScheduler, "euler": EulerDiscreteScheduler}
    if name not in classes:
        raise ValueError(f"unknown scheduler {name!r}; choose one of {sorted(classes)}")
    return classes[name].from_config(model.scheduler.config)


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
    scheduler: str = "ddim",
    progress: bool = False,
) -> torch.Tensor:
    """Images in [0, 1], (B, 3, H, W), for B = len(seeds) rows of ``cond``.

    null: the (1, L, D) unconditional embedding (``snpo.models.null_embedding``).
    guidance_scale 1 → plain conditional sampling (the null branch, or negative model, is skipped).
    """
    if len(cond) != len(seeds):
        raise ValueError(f"{len(cond)} prompt embeddings but {len(seeds)} seeds")
    unet = model.unet
    device = next(unet.parameters()).device
    dtype = next(unet.parameters()).dtype
    res = resolution or unet.config.sample_size * model.latent_scale
    side = res // model.latent_scale
    sched = make_scheduler(model, scheduler)
    sched.set_timesteps(steps, device=device)
    b = len(seeds)
    x = initial_noise(seeds, (model.in_channels, side, side), device) * sched.init_noise_sigma
    cond = cond.to(device=device, dtype=dtype)
    null_b = null.to(device=device, dtype=dtype).expand(b)
    tid = time_ids(b, (res, res), device=device, dtype=dtype) if model.family == "sdxl" else None
    use_null = guidance_scale != 1.0  # at s = 1 the null branch cancels: eps = eps_c
    same_net = negative_unet is None
    it = sched.timesteps
    if progress:
        from tqdm.auto import tqdm

        it = tqdm(it, desc="sampling", leave=False)
    for t in it:
        xin = sched.scale_model_input(x, t).to(dtype)
        if use_null and same_net:
            # one forward carries both branches: rows [null; cond]
            both = PromptEmbeddings.cat([null_b, cond])
            tid2 = None if tid is None else torch.cat([tid, tid])
            out = unet(torch.cat([xin, xin]), t, **unet_conditioning(model, both, tid2)).sample
            eps_u, eps_c = out.float().chunk(2)
        else:
            eps_c = unet(xin, t, **unet_conditioning(model, cond, tid)).sample.float()
            eps_u = eps_c
            if use_null:
                eps_u = negative_unet(
                    xin, t, **unet_conditioning(model, null_b, tid)
                ).sample.float()
        eps = eps_u + guidance_scale * (eps_c - eps_u)
        x = sched.step(eps, t, x).prev_sample
    return decode_latents(model, x)
