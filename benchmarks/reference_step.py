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
text encoders, pixels and prompts, and the same optimizer (``trainer_cases.MasterAdamW``:
torch's AdamW; bf16 weights with fp32 masters on a GPU — the script itself trains fp32 weights
under autocast, which is not modelled). β is the benchmark's (5000). Its CFG prompt dropout
(``proportion_empty_prompts``) does not change the work and is left out.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from . import trainer_cases as TC


def diffusion_dpo_step(g: TC.Group):
    """The reference step on group ``g``'s model and micro-batch (a callable returning the
    loss as a float)."""
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
    params, opt = g.opt.params, g.opt

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
        model_diff = losses_w - losses_l
        with torch.no_grad():
            ref_pred = ref_unet(noisy, timesteps, hidden, added_cond_kwargs=added).sample.detach()
            ref_losses = (ref_pred - target).pow(2).mean(dim=[1, 2, 3])
            ref_w, ref_l = ref_losses.chunk(2)
            ref_diff = ref_w - ref_l
            raw_ref_loss = ref_losses.mean()
        inside = -0.5 * TC.BETA * (model_diff - ref_diff)
        implicit_acc = (inside > 0).sum().float() / inside.size(0)
        loss = -1 * F.logsigmoid(inside).mean()
        # its logging: one host read per scalar, every step
        logged = [t.item() for t in (loss, raw_model_loss, raw_ref_loss, implicit_acc)]
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, TC.MAX_GRAD_NORM)
        opt.step()
        opt.zero_grad()
        return float(logged[0])

    return step
