"""VAE latents: the scaled posterior of images, sampling it, decoding.

Latents are z = s·(x − shift) with the VAE's scaling factor s (and shift factor, where the VAE
has one); without a VAE the model works in pixel space and the images in [-1, 1] are the
latents.
"""

from __future__ import annotations

import torch

from snpo.models.diffusion import DiffusionModel, ModelLoadError


def _factors(vae) -> tuple[float, float]:
    """(scaling factor s, shift factor) of a VAE config."""
    return vae.config.scaling_factor, getattr(vae.config, "shift_factor", None) or 0.0


def encode_images(
    model: DiffusionModel, pixels: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """The latent posterior of images (B, 3, H, W) in [-1, 1]: (mean, logvar), each
    (B, C, h, w), already scaled. Pixel space: (pixels, None), a point mass."""
    if model.vae is None:
        if "vae" in model.skipped:
            raise ModelLoadError(
                f"the VAE of {model.source!r} was not loaded (skip=vae: the latents come from a "
                "cache)"
            )
        return pixels, None
    own = model.spec.vae_posterior(model, pixels)  # a family's own VAE (Wan: video, per channel)
    if own is not None:
        return own
    with torch.no_grad():
        dist = model.vae.encode(pixels.to(model.vae.dtype)).latent_dist
    s, shift = _factors(model.vae)
    mean = (dist.mean - shift) * s
    # scaling y = s·x scales the variance by s²: logvar + 2·log s
    logvar = dist.logvar + 2.0 * torch.log(torch.tensor(s, dtype=dist.logvar.dtype))
    return mean, logvar


def sample_latents(
    mean: torch.Tensor, logvar: torch.Tensor | None, noise: torch.Tensor
) -> torch.Tensor:
    """z = mean + exp(logvar / 2)·ε with ε given (reproducible draws); pixel space: z = mean."""
    if logvar is None:
        return mean
    return mean + torch.exp(0.5 * logvar) * noise


def decode_latents(model: DiffusionModel, latents: torch.Tensor) -> torch.Tensor:
    """Latents (B, C, h, w) → images in [0, 1], (B, 3, H, W), float32."""
    if model.vae is None:
        if "vae" in model.skipped:
            raise ModelLoadError(f"the VAE of {model.source!r} was not loaded (skip=vae)")
        x = latents
    elif (own := model.spec.vae_decode(model, latents)) is not None:
        x = own
    else:
        s, shift = _factors(model.vae)
        with torch.no_grad():
            x = model.vae.decode((latents / s + shift).to(model.vae.dtype)).sample
    return ((x.float() + 1.0) / 2.0).clamp(0.0, 1.0)
