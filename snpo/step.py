"""The preference step as a pure function: (models, encoded batch, draws, config) → loss, metrics.

No I/O, no optimizer, no DeepSpeed: the engine calls it once per micro-batch and backpropagates
the returned loss; tests call it directly. Every model-specific part (noising, target,
conditioning, the denoiser call, the ``weighting: elbo`` weight) comes from the model's family
(:class:`snpo.models.ModelFamily`).

Layout of one micro-batch of P pairs (the ``docs/objectives.md`` contract):
- rows 0..P-1 are the winners, P..2P-1 the losers of the same pairs, in the same order;
- winner and loser of pair k share the pair's draw (timestep t_k or flow level u_k) and the
  noise ε_k (Diffusion-DPO);
- pair k takes the null-prompt branch (Y = −1) when ``draws.uncond[k]``: its prompt embedding is
  replaced by the model's null embedding for both rows, and ``swap[k]`` follows the preset
  (True for snpo / snpo_naive, all True for npo, all False for dpo / bdpo);
- ONE policy forward over the 2P rows carries both branches; the reference runs on the same
  inputs under ``torch.no_grad`` (or its errors come in as ``ref_err``, e.g. from a cache:
  :func:`reference_errors` computes them from the same :func:`noised_inputs`).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from snpo.draws import PairDraws
from snpo.models import (
    DiffusionModel,
    ModelFamily,
    Noised,
    PromptEmbeddings,
    encode_images,
    encode_prompts,
    get_family,
    sample_latents,
    sdxl_time_ids,
)
from snpo_kernels import PreferenceOutput, per_sample_error, preference_loss_with_stats

UNetFn = Callable[..., torch.Tensor]  # (x_t, timestep, **family conditioning) → prediction


@dataclass
class StepModels:
    """What a step needs besides the batch.

    policy: the trainable denoiser as a function returning the prediction tensor (a DeepSpeed
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
    prompts: P prompt embeddings (the conditional branch, before the null replacement; live
    text leaves a null-branch pair's prompt unencoded and gives it the null embedding, a
    cache gives its stored prompt: the step sees the null in both);
    time_ids: (2P | P, 6) SDXL micro-conditioning, None for families without
    (``ModelFamily.needs_time_ids``).
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


def unet_fn(module, family: ModelFamily | None = None) -> UNetFn:
    """The denoiser ``module`` (or a DeepSpeed engine wrapping it) as x_t, timestep, **cond →
    prediction tensor, called the way ``family`` calls it (None: a UNet, ``module(x, t,
    **cond).sample``)."""
    family = family or get_family("sd")

    def run(x, t, **kw):
        return family.denoise(module, x, t, kw)

    return run


denoiser_fn = unet_fn


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


def branch_embeddings(null: PromptEmbeddings, prompts: PromptEmbeddings, uncond: torch.Tensor):
    """Per pair: the null embedding where uncond (Y = −1), else the pair's own prompt."""
    null_p = null.to(device=prompts.embeds.device, dtype=prompts.embeds.dtype).expand(len(prompts))
    return PromptEmbeddings.where(uncond.to(prompts.embeds.device), null_p, prompts)


def time_id_rows(
    original_size: torch.Tensor, crop_top_left: torch.Tensor, resolution: int | tuple[int, int]
) -> torch.Tensor:
    """(B, 6) SDXL micro-conditioning (orig_h, orig_w, crop_top, crop_left, h, w) per image:
    :func:`snpo.models.sdxl_time_ids` at the trained size — the square resolution R, or the
    (h, w) of a ``resolution_buckets`` bucket."""
    size = (resolution, resolution) if isinstance(resolution, int) else tuple(resolution)
    return sdxl_time_ids(original_size, crop_top_left, size)


@torch.no_grad()
def encode_batch(
    models: StepModels, batch, draws: PairDraws, *, winners_only: bool = False
) -> EncodedBatch:
    """Pixels → latents (VAE posterior sampled with the draws' latent noise) and prompt
    embeddings, on the device in the training dtype; ``batch``: a :class:`snpo.data.PairBatch`.
    A cache replaces either half, or both (``Cache.encoded_latents``, ``Cache.text``,
    ``Cache.encoded_batch``)."""
    latents, tid = encode_latents(models, batch, draws, winners_only=winners_only)
    prompts = encode_branch_prompts(models, batch.prompts, draws.conditional_pairs())
    return EncodedBatch(latents, prompts, tid)


@torch.no_grad()
def encode_branch_prompts(
    models: StepModels, prompts: list[str], keep: list[int]
) -> PromptEmbeddings:
    """The P prompt embeddings of a micro-batch (device, training dtype), the text encoders run
    on the conditional pairs ``keep`` only (:meth:`snpo.draws.PairDraws.conditional_pairs`): a
    null-branch pair gets ``models.null``, which :func:`branch_embeddings` would put in its rows
    anyway, so its prompt is never encoded. A conditional row's embedding is the one
    :func:`encode_prompts` gives for the whole list (batch-size independent up to rounding of
    the pooled projection)."""
    dev, dt = models.device, models.dtype
    if len(keep) == len(prompts):
        return encode_prompts(models.model, list(prompts)).to(device=dev, dtype=dt)
    null = models.null.to(device=dev, dtype=dt).expand(len(prompts))
    out = PromptEmbeddings(
        null.embeds.clone(), None if null.pooled is None else null.pooled.clone()
    )
    if keep:
        emb = encode_prompts(models.model, [prompts[k] for k in keep]).to(device=dev, dtype=dt)
        rows = torch.tensor(keep, device=dev)
        out.embeds[rows] = emb.embeds
        if out.pooled is not None:
            out.pooled[rows] = emb.pooled
    return out


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
    if m.spec.needs_time_ids:
        size = torch.cat([batch.original_size[:, j] for j in range(n_img)])
        crop = torch.cat([batch.crop_top_left[:, j] for j in range(n_img)])
        res = (int(batch.pixels.shape[-2]), int(batch.pixels.shape[-1]))  # (h, w) trained
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
def noised_rows(
    models: StepModels, batch: EncodedBatch, draws: PairDraws, *, weighting: str = "constant"
) -> tuple[Noised, dict]:
    """The family's :class:`snpo.models.Noised` of the B = 2P rows (sft: P) with x_t in the
    training dtype, and the denoiser conditioning. Row c·P + k belongs to pair k: it takes the
    pair's draw and ε, and the null embedding when ``draws.uncond[k]``."""
    m = models.model
    fam = m.spec
    d = draws.to(models.device)
    copies = batch.latents.shape[0] // len(d)  # 2: winners and losers; 1: sft
    noise = torch.cat([d.noise.to(torch.float32)] * copies)
    x0 = batch.latents.to(torch.float32)
    out = fam.noised(m, x0, noise, d.repeat(copies), weighting=weighting)
    out.x_t = out.x_t.to(models.dtype)
    emb = branch_embeddings(models.null, batch.prompts, d.uncond)
    return out, fam.conditioning(m, PromptEmbeddings.cat([emb] * copies), batch.time_ids)


def noised_inputs(
    models: StepModels, batch: EncodedBatch, draws: PairDraws
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, dict]:
    """(x_t in the training dtype, the denoiser's timesteps (2P,), target float32, denoiser
    keyword arguments) of :func:`noised_rows`. Shared by :func:`preference_step` and
    :func:`reference_errors`, so the policy, the live reference and the cached reference errors
    see the same inputs."""
    out, cond = noised_rows(models, batch, draws)
    return out.x_t, out.timestep, out.target, cond


@torch.no_grad()
def reference_errors(
    models: StepModels, batch: EncodedBatch, draws: PairDraws, *, backend: str = "auto"
) -> torch.Tensor:
    """(2P,) float32 e_ref(i) = mean_j (ref_pred[i, j] − target[i, j])² of a micro-batch,
    winners then losers: ``models.reference`` on :func:`noised_inputs` (the inputs of the live
    step), reduced by :func:`snpo_kernels.per_sample_error`. What ``snpo cache`` stores and the
    trainer passes back as ``ref_err``. ``backend`` is accepted for compatibility (the
    reduction is the loss contract's, whichever backend the live loss uses)."""
    if models.reference is None:
        raise ValueError("reference_errors needs StepModels.reference")
    x_t, t, target, kwargs = noised_inputs(models, batch, draws)
    ref_pred = models.reference(x_t, t, **kwargs)
    return per_sample_error(ref_pred, target).detach().to(torch.float32)


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
    from snpo.config import PRESETS

    if objective == "sft":
        return sft_step(models, batch, draws)
    preset = PRESETS[objective]
    dev = models.device
    p = batch.num_pairs
    if len(draws) != p:
        raise ValueError(f"{len(draws)} draws for {p} pairs")
    d = draws.to(dev)
    noised, kwargs = noised_rows(models, batch, d, weighting=weighting)
    x_t, t2, target = noised.x_t, noised.timestep, noised.target
    ref_pred = None
    if ref_err is None:
        if models.reference is None:
            raise ValueError("no reference: give StepModels.reference or ref_err")
        with torch.no_grad():
            ref_pred = models.reference(x_t, t2, **kwargs).detach()
    pred = models.policy(x_t, t2, **kwargs)
    swap = swap_flags(preset.swap, d.uncond)
    weight = None if noised.weight is None else noised.weight[:p]  # rows of a pair share it
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
        "stat_sums": s.sums(),  # what the trainer adds over micro-batches and ranks
        "mse_policy": out.e_theta.mean(),
        "mse_ref": out.e_ref.mean(),
        "pairs": torch.tensor(float(p), device=dev),
    }
    return StepResult(out.loss, out, metrics)


def sft_step(models: StepModels, batch: EncodedBatch, draws: PairDraws) -> StepResult:
    """The denoising MSE on the winners with CFG dropout (no reference, no preference)."""
    d = draws.to(models.device)
    p = len(d)
    winners = EncodedBatch(
        batch.latents[:p], batch.prompts, None if batch.time_ids is None else batch.time_ids[:p]
    )
    noised, cond = noised_rows(models, winners, d)
    pred = models.policy(noised.x_t, noised.timestep, **cond)
    loss = F.mse_loss(pred.float(), noised.target.float())
    metrics = {
        "loss": loss.detach(),
        "mse_policy": loss.detach(),
        "count_cond": (~d.uncond).sum().to(torch.float32),
        "count_uncond": d.uncond.sum().to(torch.float32),
        "pairs": torch.tensor(float(p), device=models.device),
    }
    return StepResult(loss, None, metrics)
