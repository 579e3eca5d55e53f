"""The flow-matching UNet family (``flow_unet``): an SD1.5-class folder trained by flow matching.

Folder: ``unet/`` (UNet2DConditionModel), ``scheduler/`` (FlowMatchEulerDiscreteScheduler),
``text_encoder/`` + ``tokenizer/`` (one CLIP encoder), optionally ``vae/``; model_index.json
names the scheduler class, which is how the family is told from ``sd`` (the same folder with a
DDPM scheduler). The small world's flow base (``snpo/world/flow.py``) is one.

- conditioning and null embedding: as ``sd`` (last hidden state of the CLIP encoder; the null
  branch is the encoded empty prompt);
- noising, target and sampling: :class:`snpo.models.sd3.FlowMatchingFamily`'s (x_t = (1−σ)·x0 +
  σ·ε, target ε − x0, σ from the pair's ``draws.u``, Euler sampling on the scheduler's σ grid);
- denoise: ``unet(x_t, 1000·σ, encoder_hidden_states=…)``, the UNet's time embedding fed the
  flow timestep (float) instead of the DDPM step.

Detection precedence: :func:`register_first` puts this family before ``sd`` in the registry, so
that :func:`snpo.models.family.find_family` asks it first (``sd.matches`` also accepts the
folder: it only looks for ``unet/`` without ``text_encoder_2/``).
"""

from __future__ import annotations

from typing import ClassVar

from snpo.models.diffusion import DiffusionModel
from snpo.models.family import FAMILIES, LoadRequest, ModelFamily
from snpo.models.sd import SD15
from snpo.models.sd3 import FlowMatchingFamily, index_class

FLOW_SCHEDULERS = ("FlowMatchEulerDiscreteScheduler",)


def has_flow_scheduler(index: dict) -> bool:
    """Whether model_index.json names a flow-matching scheduler."""
    return index_class(index, "scheduler") in FLOW_SCHEDULERS


class FlowUNetFamily(FlowMatchingFamily):
    """A CLIP-conditioned UNet2DConditionModel trained by flow matching (module docstring)."""

    name: ClassVar[str] = "flow_unet"
    denoiser: ClassVar[str] = "unet"
    denoiser_class: ClassVar[str] = "UNet2DConditionModel"
    pipeline_class: ClassVar[str] = "StableDiffusionPipeline"  # LoRA export keys ("unet.…")
    lora_targets: ClassVar[tuple[str, ...]] = ModelFamily.lora_targets

    def matches(self, index: dict, components: set[str]) -> bool:
        return (
            "unet" in components
            and "text_encoder_2" not in components
            and has_flow_scheduler(index)
        )

    def load(self, request: LoadRequest) -> DiffusionModel:
        """``sd``'s loading of the UNet, CLIP encoder and VAE, with the flow scheduler."""
        from diffusers import FlowMatchEulerDiscreteScheduler

        model = SD15.load(request)
        model.scheduler = FlowMatchEulerDiscreteScheduler.from_pretrained(
            request.source, subfolder="scheduler", **(request.hub or {})
        )
        model.family = self.name
        return model

    def encode_prompts(self, model, prompts):
        return SD15.encode_prompts(model, prompts)

    def null_embedding(self, model):
        """The encoded empty prompt (1, L, D), as SD1.5's CFG uses."""
        return SD15.null_embedding(model)

    def conditioning(self, model, emb, time_ids=None, *, guidance=None) -> dict:
        return {"encoder_hidden_states": emb.embeds}

    def denoise(self, module, x_t, timestep, cond):
        """unet(x_t, timestep = 1000·σ (B,) or 0-d, **cond).sample: the velocity (B, C, h, w)."""
        if timestep.ndim == 0:
            timestep = timestep.expand(x_t.shape[0])
        out = module(x_t, timestep, **cond)
        return out.sample if hasattr(out, "sample") else out[0]


def register_first(family: ModelFamily) -> ModelFamily:
    """Register ``family`` at the front of :data:`FAMILIES` (asked first by find_family)."""
    rest = {k: v for k, v in FAMILIES.items() if k != family.name}
    FAMILIES.clear()
    FAMILIES[family.name] = family
    FAMILIES.update(rest)
    return family


FLOW_UNET = register_first(FlowUNetFamily())
