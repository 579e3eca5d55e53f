"""β conventions: which number to pass, for each published training script.

Every code writes the same sigmoid loss with a different scale on the logit. With
Δθ = e_θ(w) − e_θ(l) and Δref = e_ref(w) − e_ref(l):

    half form   (``beta=``):        −log σ(−½·β·(Δθ − Δref))
    logit form  (``beta_logit=``):  −log σ(β′·(Δref − Δθ))          β = 2·β′

| script | form | its default | keyword here |
| --- | --- | --- | --- |
| Diffusion-DPO ``train.py`` (SD1.5 and SDXL, ``--beta_dpo``) | half | 5000 | ``beta=5000`` |
| diffusers ``train_diffusion_dpo_sdxl.py`` (``--beta_dpo``) | half | 5000 | ``beta=5000`` |
| diffusers ``train_diffusion_dpo.py`` (SD1.5, ``--beta_dpo``) | logit | 2500 | ``beta_logit=2500`` |
| Diffusion-NPO's SD1.5 script | logit | 500 | ``beta_logit=500`` |

Both diffusers scripts call the argument ``--beta_dpo`` but use different forms, so there is
no ``beta_diffusers=`` keyword: name the script with :func:`beta_from` instead
(``beta=beta_from(2500, "diffusers_sd15")``), or pick the keyword by form.
"""

from __future__ import annotations

from .validation import _real

# script name → factor f with β (half form) = f · (the script's own β)
BETA_SCRIPTS: dict[str, float] = {
    "diffusion_dpo": 1.0,
    "diffusers_sdxl": 1.0,
    "diffusers_sd15": 2.0,
    "diffusion_npo": 2.0,
}


def beta_from(value: float, script: str) -> float:
    """β in this package's (half-form) convention from ``value`` as written in ``script``
    (a key of :data:`BETA_SCRIPTS`): β = f·value."""
    if script not in BETA_SCRIPTS:
        raise ValueError(f"script must be one of {tuple(BETA_SCRIPTS)}, got {script!r}")
    return BETA_SCRIPTS[script] * _real("value", value)


def resolve_beta(beta: float | None = None, beta_logit: float | None = None) -> float:
    """The half-form β from exactly one of ``beta`` (half form) and ``beta_logit`` (logit
    form, β = 2·β′); TypeError naming both when none or both are given. Range checks follow
    in :func:`snpo_kernels.validation.validate_inputs`."""
    given = [name for name, v in (("beta", beta), ("beta_logit", beta_logit)) if v is not None]
    if len(given) != 1:
        which = (
            f"got both {given}"
            if given
            else "beta must be a Python number or a NumPy real scalar, got neither it nor "
            "beta_logit"
        )
        raise TypeError(
            f"{which}: give exactly one of beta= (Diffusion-DPO / diffusers SDXL form "
            "−logσ(−½β(Δθ−Δref)), e.g. 5000) and beta_logit= (diffusers SD1.5 / Diffusion-NPO "
            "form −logσ(β′(Δref−Δθ)), e.g. 2500; β = 2β′)"
        )
    if beta is not None:
        return _real("beta", beta)
    return 2.0 * _real("beta_logit", beta_logit)
