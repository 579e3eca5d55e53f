"""The preference step as a pure function: (models, encoded batch, draws, config) → loss, metrics.

No I/O, no optimizer, no DeepSpeed: the engine calls it once per micro-batch and backpropagates
the returned loss; tests call it directly.

Layout of one micro-batch of P pairs (the ``docs/objectives.md`` contract):
- rows 0..P-1 are the winners, P..2P-1 the losers of the same pairs, in the same order;
- winner and loser of pair k share the timestep t_k and the noise ε_k (Diffusion-DPO);
- pair k takes the null-prompt branch (Y = −1) when ``draws.uncond[k]``: its prompt embedding is
  replaced by the model's null embedding (the encoded empty prompt, zeros for SDXL-class models
  with ``force_zeros_for_empty_prompt``) for both rows, and ``swap[k]`` follows the preset
  (True for snpo / snpo_naive, all True for npo, all False for dpo / bdpo);
- ONE policy forward over the 2P rows carries both branches; the reference runs on the same
  inputs under ``torch.no_grad`` (or its errors come in as ``ref_err``, e.g. from a cache:
  :func:`reference_errors` computes them from the same :func:`noised_inputs`).

The ELBO weighting (``weighting: elbo``) multiplies both errors of a pair by T·ω(t) with
ω(t) = β_t / (2·α_t·(1 − ᾱ_t)), the weight of the DDPM ELBO term at t for ε-prediction with
σ_t² = β_t (Ho et al. 2020, eq. 12), from the scheduler's betas / alphas / alphas_cumprod.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from snpo_kernels import PreferenceOutput, preference_loss_with_stats

from .draws import PairDraws
from .models import (
    DiffusionModel,
    PromptEmbeddings,
    encode_images,
    encode_prompts,
    sample_latents,
    training_target,
    unet_conditioning,
)

UNetFn = Callable[..., torch.Tensor]  # (x_t, t, **unet_conditioning) → prediction tensor


@dataclass
class StepModels:
    """What a step needs besides the batch.

    policy: the trainable UNet as a function returning the prediction tensor (a DeepSpeed
    engine or a plain module, wrapped by :func:`unet_fn`); reference: same signature, run under
    no_grad (LoRA: the same network with adapters disabled; full fine-tune: a frozen copy);
    None when reference errors are given (``ref_err``) or for sft. null: the (1, L, D)
    null embedding in the training dtype on the device.
    """

    model: DiffusionModel
    policy: UNetFn
    reference: UNetFn | None
    null: PromptEmbeddings
    device: torch.device
    dtype: torch.dtype


@dataclass
class EncodedBatch:
    """The model inputs of P pairs, before noising.

    latents: (2P, C, h, w) winners then losers (sft: (P, C, h, w), winners only);
    prompts: P prompt embeddings (the conditional branch, before the null replacement);
    time_ids: (2P | P, 6) SDXL micro-conditioning, None for SD1.5-class models.
    """

    latents: torch.Tensor
    prompts: PromptEmbeddings
    time_ids: torch.Tensor | None = None

    @property
    def num_pairs(self) -> int:
        return len(self.prompts)

    def select(self, rows: list[int] | torch.Tensor) -> EncodedBatch:
        """The sub-batch of pairs ``rows`` (both rows of each pair)."""
        rows = torch.as_tensor(rows, dtype=torch.long, device=self.latents.device)
        p = self.num_pairs
        both = rows if self.latents.shape[0] == p else torch.cat([rows, rows + p])
        tid = None if self.time_ids is None else self.time_ids[both]
        return EncodedBatch(self.latents[both], self.prompts.index(rows), tid)


@dataclass
class StepResult:
    """loss: the scalar to backpropagate; output: the loss's PreferenceOutput (None for sft);
    metrics: detached scalar tensors (no host sync)."""

    loss: torch.Tensor
    output: PreferenceOutput | None
    metrics: dict[str, torch.Tensor]


def unet_fn(module) -> UNetFn:
    """A UNet2DConditionModel (or a DeepSpeed engine wrapping one) as x, t, **kw → tensor."""

    def run(x, t, **kw):
        out = module(x, t, **kw)
        return out.sample if hasattr(out, "sample") else out[0]

    return run


def lora_reference(module, policy: UNetFn) -> UNetFn:
    """The reference of a LoRA run: the same network with its adapters disabled."""

    def run(x, t, **kw):
        module.disable_adapters()
        try:
            return policy(x, t, **kw)
        finally:
            module.enable_adapters()

    return run


# --------------------------------------------------------------------------------------------
def swap_flags(preset_swap: str, uncond: torch.Tensor) -> torch.Tensor:
    """(P,) bool: which pairs exchange winner and loser (docs/objectives.md preset table)."""
    if preset_swap == "none":
        return torch.zeros_like(uncond, dtype=torch.bool)
    if preset_swap == "all":
        return torch.ones_like(uncond, dtype=torch.bool)
    if preset_swap == "null":
        return uncond.to(torch.bool)
    raise ValueError(f"unknown swap preset {preset_swap!r}")


def elbo_weight(scheduler, timesteps: torch.Tensor) -> torch.Tensor:
    """T·ω(t), ω(t) = β_t / (2·α_t·(1 − ᾱ_t)): the DDPM ELBO weight (σ_t² = β_t), float32."""
    betas = scheduler.betas.to(torch.float64)
    alphas = scheduler.alphas.to(torch.float64)
    abar = scheduler.alphas_cumprod.to(torch.float64)
    t = timesteps.to("cpu")
    omega = betas[t] / (2.0 * alphas[t] * (1.0 - abar[t]))
    T = int(scheduler.config.num_train_timesteps)
    return (T * omega).to(torch.float32).to(timesteps.device)


def branch_embeddings(null: PromptEmbeddings, prompts: PromptEmbeddings, uncond: torch.Tensor):
    """Per pair: the null embedding where uncond (Y = −1), else the pair's own prompt."""
    null_p = null.to(device=prompts.embeds.device, dtype=prompts.embeds.dtype).expand(len(prompts))
    return PromptEmbeddings.where(uncond.to(prompts.embeds.device), null_p, prompts)


def time_id_rows(
    original_size: torch.Tensor, crop_top_left: torch.Tensor, resolution: int
) -> torch.Tensor:
    """(B, 6) SDXL micro-conditioning (orig_h, orig_w, crop_top, crop_left, R, R) per image."""
    b = original_size.shape[0]
    target = torch.tensor([resolution, resolution]).expand(b, 2)
    return torch.cat([original_size, crop_top_left, target], dim=1).to(torch.float32)


@torch.no_grad()
def encode_batch(models: StepModels, batch, draws: PairDraws, *, winners_only: bool = False):
    """Pixels → latents (VAE posterior sampled with the draws' latent noise) and prompt
    embeddings, on the device in the training dtype. ``batch`` is a :class:`snpo.data.PairBatch`.
    (A cache replaces either half: :meth:`snpo.cache.Cache.encoded_latents` and
    :meth:`snpo.cache.Cache.text`, or both at once: :meth:`snpo.cache.Cache.encoded_batch`.)"""
    latents, tid = encode_latents(models, batch, draws, winners_only=winners_only)
    prompts = encode_prompts(models.model, batch.prompts)
    return EncodedBatch(latents, prompts.to(device=models.device, dtype=models.dtype), tid)


@torch.no_grad()
def encode_latents(
    models: StepModels, batch, draws: PairDraws, *, winners_only: bool = False
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """The image half of :func:`encode_batch`: (latents (2P | P, C, h, w) winners then losers,
    SDXL time ids (2P | P, 6) or None), on the device in the training dtype."""
    m = models.model
    pix = batch.pixels.to(models.device)
    n_img = 1 if winners_only else 2
    pix = torch.cat([pix[:, j] for j in range(n_img)])  # winners then losers
    mean, logvar = encode_images(m, pix.to(models.dtype))
    latents = latents_from_posterior(mean, logvar, draws.to(models.device), winners_only)
    tid = None
    if m.family == "sdxl":
        size = torch.cat([batch.original_size[:, j] for j in range(n_img)])
        crop = torch.cat([batch.crop_top_left[:, j] for j in range(n_img)])
        res = batch.pixels.shape[-1]
        tid = time_id_rows(size, crop, res).to(device=models.device, dtype=models.dtype)
    return latents.to(models.dtype), tid


def latents_from_posterior(
    mean: torch.Tensor, logvar: torch.Tensor | None, draws: PairDraws, winners_only: bool = False
) -> torch.Tensor:
    """Sample the VAE posterior with the pairs' latent noise: mean/logvar (2P | P, C, h, w),
    winners then losers → latents of the same shape (pixel space: the mean)."""
    n_img = 1 if winners_only else 2
    eps = torch.cat([draws.latent_noise[:, j] for j in range(n_img)]).to(mean.device)
    return sample_latents(mean, logvar, eps.to(mean.dtype))


# --------------------------------------------------------------------------------------------
def noised_inputs(
    models: StepModels, batch: EncodedBatch, draws: PairDraws
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, dict]:
    """The UNet inputs of the 2P rows: (x_t in the training dtype, timesteps (2P,), target
    (float32: ε, or v for v-prediction), UNet keyword arguments). Winner and loser of a pair share
    t and ε; null-branch pairs (``draws.uncond``) get the null embedding for both rows. Shared
    by :func:`preference_step` and :func:`reference_errors`, so the policy, the live reference
    and the cached reference errors see the same inputs."""
    m = models.model
    d = draws.to(models.device)
    noise = d.noise.to(torch.float32)
    noise2 = torch.cat([noise, noise])
    t2 = torch.cat([d.timesteps, d.timesteps])
    x0 = batch.latents.to(torch.float32)
    x_t = m.scheduler.add_noise(x0, noise2, t2).to(models.dtype)
    target = training_target(m, x0, noise2, t2)
    emb = branch_embeddings(models.null, batch.prompts, d.uncond)
    kwargs = unet_conditioning(m, PromptEmbeddings.cat([emb, emb]), batch.time_ids)
    return x_t, t2, target, kwargs


@torch.no_grad()
def reference_errors(
    models: StepModels, batch: EncodedBatch, draws: PairDraws, *, backend: str = "auto"
) -> torch.Tensor:
    """(2P,) float32 e_ref of a micro-batch, winners then losers: ``models.reference`` on
    :func:`noised_inputs` (the x_t, timesteps, branch conditioning and target of the live step),
    reduced per sample by the loss backend ``backend`` (the reduction the live loss applies to
    ``ref_pred``). What ``snpo cache`` stores and the trainer passes back as ``ref_err``."""
    if models.reference is None:
        raise ValueError("reference_errors needs StepModels.reference")
    x_t, t2, target, kwargs = noised_inputs(models, batch, draws)
    ref_pred = models.reference(x_t, t2, **kwargs)
    zeros = torch.zeros(ref_pred.shape[0], dtype=torch.float32, device=ref_pred.device)
    # the backend's per-sample error of its `pred` argument (the loss value itself is unused)
    out = preference_loss_with_stats(
        ref_pred, target, None, zeros, beta=1.0, lam=1.0, backend=backend
    )
    return out.e_theta.detach().to(torch.float32)


# --------------------------------------------------------------------------------------------
def preference_step(
    models: StepModels,
    batch: EncodedBatch,
    draws: PairDraws,
    *,
    objective: str,
    beta: float,
    lam: float,
    weighting: str = "constant",
    backend: str = "auto",
    ref_err: torch.Tensor | None = None,
) -> StepResult:
    """The loss of one micro-batch (see the module docstring for the layout).

    ref_err: (2P,) reference errors e_ref (cache): the reference forward is skipped.
    """
    from .config import PRESETS

    if objective == "sft":
        return sft_step(models, batch, draws)
    preset = PRESETS[objective]
    m = models.model
    dev = models.device
    p = batch.num_pairs
    if len(draws) != p:
        raise ValueError(f"{len(draws)} draws for {p} pairs")
    d = draws.to(dev)
    x_t, t2, target, kwargs = noised_inputs(models, batch, d)
    ref_pred = None
    if ref_err is None:
        if models.reference is None:
            raise ValueError("no reference: give StepModels.reference or ref_err")
        with torch.no_grad():
            ref_pred = models.reference(x_t, t2, **kwargs).detach()
    pred = models.policy(x_t, t2, **kwargs)
    swap = swap_flags(preset.swap, d.uncond)
    weight = elbo_weight(m.scheduler, d.timesteps) if weighting == "elbo" else None
    out = preference_loss_with_stats(
        pred,
        target,
        ref_pred,
        None if ref_err is None else ref_err.to(dev),
        swap=swap,
        weight=weight,
        beta=float(beta),
        lam=float(lam),
        backend=backend,
        uncond=d.uncond,
    )
    s = out.stats
    metrics = {
        "loss": out.loss.detach(),
        "accuracy_cond": s.accuracy_cond,
        "accuracy_uncond": s.accuracy_uncond,
        "count_cond": s.count_cond,
        "count_uncond": s.count_uncond,
        "logp_proxy": s.logp_proxy,
        "mse_policy": out.e_theta.mean(),
        "mse_ref": out.e_ref.mean(),
        "pairs": torch.tensor(float(p), device=dev),
    }
    return StepResult(out.loss, out, metrics)


def sft_step(models: StepModels, batch: EncodedBatch, draws: PairDraws) -> StepResult:
    """Noise-prediction MSE on the winners with CFG dropout (no reference, no preference)."""
    m = models.model
    d = draws.to(models.device)
    p = len(d)
    x0 = batch.latents[:p].to(torch.float32)
    noise = d.noise.to(torch.float32)
    x_t = m.scheduler.add_noise(x0, noise, d.timesteps).to(models.dtype)
    target = training_target(m, x0, noise, d.timesteps)
    emb = branch_embeddings(models.null, batch.prompts, d.uncond)
    tid = None if batch.time_ids is None else batch.time_ids[:p]
    pred = models.policy(x_t, d.timesteps, **unet_conditioning(m, emb, tid))
    loss = F.mse_loss(pred.float(), target.float())
    metrics = {
        "loss": loss.detach(),
        "mse_policy": loss.detach(),
        "count_cond": (~d.uncond).sum().to(torch.float32),
        "count_uncond": d.uncond.sum().to(torch.float32),
        "pairs": torch.tensor(float(p), device=models.device),
    }
    return StepResult(loss, None, metrics)
