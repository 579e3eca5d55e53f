"""The reference row of the trainer-step benchmark: one micro-batch trained the way the public
Diffusion-DPO ``train.py`` (SalesforceAIResearch/DiffusionDPO, its ``train_method == 'dpo'``
loop) does it, written here on the benchmark's own model objects — no code of that repository
is used.

What one step does, in that script's order:

1. the 2P images (winners then losers, its ``pixel_values`` split along the channel axis)
   through ``vae.encode(...).latent_dist.sample()`` × the scaling factor, under no_grad;
2. fresh noise and timesteps from the global generator, the first half repeated so that the
   two images of a pair share them, ``scheduler.add_noise``;
3. the text conditioning: SD1.5-class — the text encoder on the token ids (tokenized by its
   data loader, so here once at setup) then repeated for the two halves; SDXL-class — the
   captions tokenized and both encoders run inside the step (penultimate hidden states
   concatenated, the last encoder's pooled output), plus its constant time ids;
4. the policy UNet on the 2P rows (with grad), its per-sample MSE, the winner/loser split;
5. the reference UNet on the same inputs under no_grad, its per-sample MSE;
6. the DPO loss ``−log σ(−β/2 · (Δθ − Δref))`` and its implicit accuracy, in eager PyTorch;
7. four scalars read to the host for its logs (``.item()`` on loss, model MSE, reference MSE
   and accuracy), ``backward``, ``clip_grad_norm_`` at 1.0 (torch's default implementation),
   the optimizer step, ``zero_grad``.

Deliberate sameness with the trainer rows, so that the ratio compares step code, not setups:
the same policy weights (restored before each step), the same frozen reference copy, VAE and
text encoders, pixels and prompts, and the same fp32 masters for bf16 weights on a GPU (the
script itself trains fp32 weights under autocast, which is not modelled). The optimizer is the
script's: ``torch.optim.AdamW`` with torch's default implementation
(``trainer_cases.MasterAdamW.reference_opt``; the trainer rows use ``snpo train``'s fused one),
over the same masters and moment tensors. β is the benchmark's (5000). Its CFG prompt dropout
(``proportion_empty_prompts``) does not change the work and is left out.

SD3-class (flow-matching) groups get the same loop in the flow-matching manner
(:func:`flow_dpo_step`), as a Diffusion-DPO loop on diffusers' SD3 training script
(``train_dreambooth_sd3.py``) does it: the latents ``(sample − shift_factor) × scaling_factor``;
the logit-normal density (``compute_density_for_timestep_sampling``, mean 0, std 1) turned into
an index into the scheduler's shifted training table, its timestep and σ, shared per pair;
x_t = (1 − σ)·x0 + σ·ε; the prompt encoded in the step by all three encoders as
``StableDiffusion3Pipeline.encode_prompt`` does (CLIP-L and CLIP-G penultimate hidden states
concatenated and zero-padded to the T5 width, T5 appended along the sequence, both pooled
outputs concatenated); the policy and the no-grad reference transformer on the concatenated
winner/loser batch, the velocity target ε − x0, no loss weighting; then steps 6-7 above.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from snpo.models.sd3 import tokenize

from . import trainer_cases as TC


def diffusion_dpo_step(g: TC.Group):
    """The reference step on group ``g``'s model and micro-batch (a callable returning the
    loss as a float); flow-matching families: :func:`flow_dpo_step`."""
    if g.model.spec.flow:
        return flow_dpo_step(g)
    model, dev, dt = g.model, g.device, g.dtype
    vae, unet, ref_unet = model.vae, g.unet, g.reference
    encoders, tokenizers = model.text_encoders, model.tokenizers
    scheduler = model.scheduler
    sdxl = model.family == "sdxl"
    num_t = int(scheduler.config.num_train_timesteps)
    res = g.spec.resolution
    # its data loader's output: winner and loser images concatenated along the channel axis
    # (P, 6, R, R), and for SD1.5-class models the token ids of the captions
    pixel_values = torch.cat([g.batch.pixels[:, 0], g.batch.pixels[:, 1]], dim=1).to(dev)
    captions = list(g.prompts)
    input_ids = None
    if not sdxl:
        tok = tokenizers[0]
        input_ids = tok(
            captions,
            max_length=tok.model_max_length,
            padding="max_length",
            truncation=True,
            return_tensors="pt",
        ).input_ids.to(dev)

    def encode_sdxl(texts):
        hidden, pooled = [], None
        with torch.no_grad():
            for tok, enc in zip(tokenizers, encoders):
                ids = tok(
                    texts,
                    padding="max_length",
                    max_length=tok.model_max_length,
                    truncation=True,
                    return_tensors="pt",
                ).input_ids
                out = enc(ids.to(dev), output_hidden_states=True)
                pooled = out[0]
                hidden.append(out.hidden_states[-2])
        return torch.cat(hidden, dim=-1), pooled

    def step(_=None) -> float:
        feed = torch.cat(pixel_values.chunk(2, dim=1))  # (2P, 3, R, R): winners, then losers
        with torch.no_grad():
            latents = vae.encode(feed.to(dt)).latent_dist.sample()
            latents = latents * vae.config.scaling_factor
        noise = torch.randn_like(latents)
        bsz = latents.shape[0]
        timesteps = torch.randint(0, num_t, (bsz,), device=latents.device).long()
        timesteps = timesteps.chunk(2)[0].repeat(2)  # one t and one ε per pair
        noise = noise.chunk(2)[0].repeat(2, 1, 1, 1)
        noisy = scheduler.add_noise(latents, noise, timesteps)
        added = None
        if sdxl:
            tid = torch.tensor([res, res, 0, 0, res, res], dtype=dt, device=dev)
            tid = tid[None, :].repeat(timesteps.size(0), 1)
            embeds, pooled = encode_sdxl(captions)
            hidden = embeds.repeat(2, 1, 1)
            added = {"time_ids": tid, "text_embeds": pooled.repeat(2, 1)}
        else:
            hidden = encoders[0](input_ids)[0].repeat(2, 1, 1)
        target = noise  # epsilon prediction
        pred = unet(noisy, timesteps, hidden, added_cond_kwargs=added).sample
        losses = (pred - target).pow(2).mean(dim=[1, 2, 3])
        losses_w, losses_l = losses.chunk(2)
        raw_model_loss = 0.5 * (losses_w.mean() + losses_l.mean())
        with torch.no_grad():
            ref_pred = ref_unet(noisy, timesteps, hidden, added_cond_kwargs=added).sample.detach()
            ref_losses = (ref_pred - target).pow(2).mean(dim=[1, 2, 3])
        return _dpo_update(g, losses, ref_losses, raw_model_loss)

    return step


def _dpo_update(g: TC.Group, losses: torch.Tensor, ref_losses: torch.Tensor, raw_model_loss):
    """Steps 6-7: the DPO loss of the per-sample (2P,) policy and reference errors (winners
    then losers), its four logged scalars, backward, the default clip, AdamW; the loss."""
    losses_w, losses_l = losses.chunk(2)
    model_diff = losses_w - losses_l
    ref_w, ref_l = ref_losses.chunk(2)
    ref_diff = ref_w - ref_l
    raw_ref_loss = ref_losses.mean()
    inside = -0.5 * TC.BETA * (model_diff - ref_diff)
    implicit_acc = (inside > 0).sum().float() / inside.size(0)
    loss = -1 * F.logsigmoid(inside).mean()
    # its logging: one host read per scalar, every step
    logged = [t.item() for t in (loss, raw_model_loss, raw_ref_loss, implicit_acc)]
    loss.backward()
    torch.nn.utils.clip_grad_norm_(g.opt.params, TC.MAX_GRAD_NORM)
    g.opt.step("reference")  # torch's default AdamW implementation, as the script builds it
    g.opt.zero_grad()
    return float(logged[0])


def flow_dpo_step(g: TC.Group):
    """The reference step of an SD3-class group in the flow-matching manner (module
    docstring): a callable returning the loss as a float."""
    model, dev, dt = g.model, g.device, g.dtype
    vae, transformer, ref_transformer = model.vae, g.unet, g.reference
    encoders, tokenizers = model.text_encoders, model.tokenizers
    scheduler = model.scheduler
    num_t = int(scheduler.config.num_train_timesteps)
    # the scheduler's training tables (shifted at construction), as the script's get_sigmas
    table_t = scheduler.timesteps.to(dev)
    table_sigma = scheduler.sigmas.to(device=dev, dtype=torch.float32)
    t5_len = int(model.extra.get("max_sequence_length", 256))
    shift = getattr(vae.config, "shift_factor", None) or 0.0
    pixel_values = torch.cat([g.batch.pixels[:, 0], g.batch.pixels[:, 1]], dim=1).to(dev)
    captions = list(g.prompts)

    def ids(tok, length):
        return tokenize(tok, captions, length, dev)  # the pipelines' tokenizer call

    def encode_prompt():
        """(embeds (P, 77 + T5 length, D_t5), pooled (P, D_l + D_g)) as the SD3 pipeline."""
        with torch.no_grad():
            hidden, pooled = [], []
            clip_len = tokenizers[0].model_max_length
            for tok, enc in zip(tokenizers[:2], encoders[:2]):
                out = enc(ids(tok, clip_len), output_hidden_states=True)
                pooled.append(out[0])
                hidden.append(out.hidden_states[-2])
            t5 = encoders[2](ids(tokenizers[2], t5_len))[0]
            clip = torch.cat(hidden, dim=-1)
            clip = F.pad(clip, (0, t5.shape[-1] - clip.shape[-1]))
            return torch.cat([clip, t5], dim=-2), torch.cat(pooled, dim=-1)

    def step(_=None) -> float:
        feed = torch.cat(pixel_values.chunk(2, dim=1))  # (2P, 3, R, R): winners, then losers
        with torch.no_grad():
            latents = vae.encode(feed.to(dt)).latent_dist.sample()
            latents = (latents - shift) * vae.config.scaling_factor
        noise = torch.randn_like(latents)
        bsz = latents.shape[0]
        u = torch.sigmoid(torch.normal(0.0, 1.0, size=(bsz,), device=dev))  # logit-normal
        indices = (u * num_t).long().clamp(max=num_t - 1)
        indices = indices.chunk(2)[0].repeat(2)  # one σ and one ε per pair
        noise = noise.chunk(2)[0].repeat(2, 1, 1, 1)
        timesteps = table_t[indices]
        sigmas = table_sigma[indices].view(-1, 1, 1, 1)
        noisy = ((1.0 - sigmas) * latents + sigmas * noise).to(dt)
        embeds, pooled = encode_prompt()
        cond = {
            "encoder_hidden_states": embeds.repeat(2, 1, 1),
            "pooled_projections": pooled.repeat(2, 1),
        }
        target = noise - latents  # the velocity
        pred = transformer(hidden_states=noisy, timestep=timesteps, **cond).sample
        losses = (pred.float() - target.float()).pow(2).mean(dim=[1, 2, 3])
        losses_w, losses_l = losses.chunk(2)
        raw_model_loss = 0.5 * (losses_w.mean() + losses_l.mean())
        with torch.no_grad():
            ref_pred = ref_transformer(hidden_states=noisy, timestep=timesteps, **cond).sample
            ref_losses = (ref_pred.float() - target.float()).pow(2).mean(dim=[1, 2, 3])
        return _dpo_update(g, losses, ref_losses, raw_model_loss)

    return step
