"""The model-family interface: what the trainer, cache, sampler and export ask of a model.

A family is one class of diffusers models that share loading, prompt encoding, noising and
sampling: SD1.5-class UNets (``sd``), SDXL-class UNets (``sdxl``), SD3-class MMDiT flow models
(``sd3``), guidance-distilled flow models (``flux``), Wan2.x-class text-to-video
transformers (``wan``). Each family is a :class:`ModelFamily`
subclass instance registered by name; adding one touches ``snpo/models/`` and a config only.

Per micro-batch of B rows (preference: 2P rows, winners then losers, a pair sharing noise ε and
its draw; sft: P rows):

- ε-families (DDPM):  x_t = √ᾱ_t·x0 + √(1−ᾱ_t)·ε, target ε (or v), timestep t ∈ [0, T) integer;
- flow families:      x_t = (1−σ)·x0 + σ·ε,         target v = ε − x0, σ = σ(u) ∈ (0, 1) from the
                      pair's uniform ``draws.u``, the transformer's timestep = 1000·σ.

The loss itself (``snpo_kernels.preference_loss`` on the per-sample MSE of the prediction
against the target, optionally weighted per pair) is the same for every family.

Families are registered when their module is imported; :func:`get_family` / :func:`find_family`
import the modules of :data:`FAMILY_MODULES` first (a module file that does not exist is
skipped; an error inside one is raised).
"""

from __future__ import annotations

import importlib
import importlib.util
from dataclasses import dataclass
from typing import TYPE_CHECKING, ClassVar

import torch

if TYPE_CHECKING:  # pragma: no cover
    from snpo.draws import PairDraws
    from snpo.models.diffusion import DiffusionModel
    from snpo.models.embeddings import PromptEmbeddings

# modules that register a family on import (a missing module file is skipped)
FAMILY_MODULES = (
    "snpo.models.sd",
    "snpo.models.sd3",
    "snpo.models.flux",
    "snpo.models.flow_unet",
    "snpo.models.wan",
)


@dataclass
class Noised:
    """The denoiser inputs of B rows.

    x_t: (B, C, h, w) float32 (the step casts it to the training dtype); timestep: (B,) as the
    denoiser takes it (ε: int64 t; flow: float32 1000·σ); target: (B, C, h, w) float32;
    weight: (B,) float32 per-row loss weight for the requested weighting, None for "constant"
    (rows of a pair share it; the step passes the first P to the loss as the pair weight).
    """

    x_t: torch.Tensor
    timestep: torch.Tensor
    target: torch.Tensor
    weight: torch.Tensor | None = None


@dataclass(frozen=True)
class LoadRequest:
    """What :func:`snpo.models.load_model` was asked for, handed to :meth:`ModelFamily.load`.

    source: local folder or hub id; index: its model_index.json as a dict; hub: keyword
    arguments for ``from_pretrained`` (``revision``); denoiser_path: a folder replacing
    ``source/<denoiser>`` (a trained export); skip: components not to load ("vae",
    "text_encoders").
    """

    source: str
    index: dict
    dtype: torch.dtype
    device: torch.device | str
    variant: str | None = None
    hub: dict | None = None
    denoiser_path: str | None = None
    skip: tuple[str, ...] = ()


class ModelFamily:
    """One model family (see the module docstring). Subclasses set the class attributes and
    implement the methods; instances are stateless (all state lives in the DiffusionModel)."""

    name: ClassVar[str]
    denoiser: ClassVar[str] = "unet"  # the pipeline component trained: "unet" | "transformer"
    pipeline_class: ClassVar[str]  # the diffusers pipeline an export loads into
    denoiser_class: ClassVar[str] = "UNet2DConditionModel"  # diffusers class of the denoiser
    has_null_branch: ClassVar[bool] = True  # False: guidance-distilled, no CFG null branch
    flow: ClassVar[bool] = False  # flow matching (velocity target) rather than DDPM
    needs_time_ids: ClassVar[bool] = False  # SDXL micro-conditioning rows (B, 6)
    lora_targets: ClassVar[tuple[str, ...]] = ("to_q", "to_k", "to_v", "to_out.0")
    default_sampler: ClassVar[str] = "ddim"  # the :meth:`sampling_scheduler` name by default
    # video families: frames per latent frame of the VAE (Wan: 4, F = 4k + 1 frames → k + 1);
    # 0: images only (no frame axis; ``num_frames`` must be 1)
    temporal_factor: ClassVar[int] = 0

    # --- detection and loading -------------------------------------------------------------
    def matches(self, index: dict, components: set[str]) -> bool:
        """Whether a model folder is of this family: ``index`` its model_index.json (a dict),
        ``components`` the names of its component subfolders (local) or index entries (hub)."""
        raise NotImplementedError

    def load(self, request: LoadRequest) -> DiffusionModel:
        """Load every component (each in ``request.dtype``, on ``request.device``, frozen, in
        eval mode) into a :class:`DiffusionModel` whose ``family`` is :attr:`name`."""
        raise NotImplementedError

    def null_kind(self, index: dict) -> str:
        """The null embedding a folder of this family uses, from its model_index.json:
        "empty_prompt" (the encoded empty prompt) or "zeros"."""
        return "empty_prompt"

    def prediction_type(self, model: DiffusionModel) -> str:
        """What the denoiser predicts: "epsilon" | "v_prediction" | "flow" (velocity ε − x0)."""
        return "flow" if self.flow else model.scheduler.config.prediction_type

    def load_denoiser(self, request: LoadRequest) -> torch.nn.Module:
        """The denoiser (``denoiser_class``) from ``request.denoiser_path`` when given (a
        trained copy), else from the folder's ``denoiser`` subfolder, in ``request.dtype``."""
        import diffusers

        cls = getattr(diffusers, self.denoiser_class)
        if request.denoiser_path is not None:
            return cls.from_pretrained(request.denoiser_path, torch_dtype=request.dtype)
        return cls.from_pretrained(
            request.source,
            subfolder=self.denoiser,
            torch_dtype=request.dtype,
            variant=request.variant,
            **(request.hub or {}),
        )

    def configure(self, model: DiffusionModel, options) -> None:
        """Apply the training options this family reads (``options``: a TrainConfig or any
        object with its attributes) to a loaded model; ε-families read none."""

    def latent_channels(self, model: DiffusionModel) -> int:
        """Channels C of a latent (B, C, h, w) as the VAE, the noising and the sampler see it
        (a denoiser that packs patches counts more input channels)."""
        return model.unet.config.in_channels

    # --- latents ---------------------------------------------------------------------------
    def vae_posterior(
        self, model: DiffusionModel, pixels: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor] | None:
        """The scaled latent posterior (mean, logvar) of images (B, 3, H, W) in [-1, 1] for a
        family whose VAE the generic z = s·(x − shift) of :mod:`snpo.models.latents` does not
        fit (video frames, per-channel statistics: Wan); None (the default): the generic path."""
        return None

    def vae_decode(self, model: DiffusionModel, latents: torch.Tensor) -> torch.Tensor | None:
        """The family's own decoding of latents to pixels in [-1, 1] (the inverse of
        :meth:`vae_posterior`'s scaling); None (the default): the generic path."""
        return None

    # --- text conditioning -----------------------------------------------------------------
    def encode_prompts(self, model: DiffusionModel, prompts: list[str]) -> PromptEmbeddings:
        """Prompt embeddings of B prompts: embeds (B, L, D) (and pooled (B, D2) where the
        family has one), in the text encoders' dtype, on their device, without gradients."""
        raise NotImplementedError

    def null_embedding(self, model: DiffusionModel) -> PromptEmbeddings:
        """The (1, L, D) unconditional embedding of CFG and of the reversed-preference branch
        (the encoded empty prompt, or zeros where the model says so)."""
        raise NotImplementedError

    def conditioning(
        self,
        model: DiffusionModel,
        emb: PromptEmbeddings,
        time_ids: torch.Tensor | None = None,
        *,
        guidance: torch.Tensor | None = None,
    ) -> dict:
        """The denoiser keyword arguments of B rows from their embeddings (B rows), the SDXL
        micro-conditioning ``time_ids`` (B, 6) where :attr:`needs_time_ids`, and the embedded
        guidance scale ``guidance`` (B,) of guidance-distilled families (ignored by others).
        Whatever :meth:`denoise` needs besides x_t and the timestep goes here."""
        raise NotImplementedError

    def denoise(
        self, module, x_t: torch.Tensor, timestep: torch.Tensor, cond: dict
    ) -> torch.Tensor:
        """The prediction (B, C, h, w) of the denoiser ``module`` (the network, a PEFT/DeepSpeed
        wrapper of it) at x_t (B, C, h, w) and ``timestep`` ((B,), or a 0-d tensor during
        sampling: expand it if the denoiser needs rows), with ``cond`` from
        :meth:`conditioning`. Any latent packing happens inside."""
        raise NotImplementedError

    # --- noising ---------------------------------------------------------------------------
    def noised(
        self,
        model: DiffusionModel,
        x0: torch.Tensor,
        noise: torch.Tensor,
        draws: PairDraws,
        *,
        weighting: str = "constant",
    ) -> Noised:
        """The training inputs of B rows (see the module docstring).

        x0, noise: (B, C, h, w) float32; draws: the draws of the B rows (row i's own draw: the
        step passes each pair's draw twice for its winner and loser), on x0's device — the
        ε-families read ``draws.timesteps``, flow families ``draws.u``. ``weighting``:
        "constant" → weight None; "elbo" → the family's ELBO weight per row; a family raises
        ValueError on a weighting it does not define.
        """
        raise NotImplementedError

    # --- sampling --------------------------------------------------------------------------
    def sampling_scheduler(
        self,
        model: DiffusionModel,
        name: str | None,
        steps: int,
        device: torch.device | str,
        latent_shape: tuple[int, int, int],
    ):
        """A sampling scheduler (``name``: family-specific, None → :attr:`default_sampler`)
        with ``set_timesteps(steps)`` done for latents of ``latent_shape`` (C, h, w) (flow
        families may shift the schedule by resolution)."""
        raise NotImplementedError

    def initial_latents(self, sched, noise: torch.Tensor) -> torch.Tensor:
        """x_T from N(0, I) noise (B, C, h, w): scaled by the scheduler's init_noise_sigma."""
        return noise * getattr(sched, "init_noise_sigma", 1.0)

    def model_input(self, sched, x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        """The denoiser input at sampling step t (the scheduler's scale_model_input if any)."""
        scale = getattr(sched, "scale_model_input", None)
        return x if scale is None else scale(x, t)


FAMILIES: dict[str, ModelFamily] = {}


def register(family: ModelFamily) -> ModelFamily:
    """Add ``family`` to :data:`FAMILIES` under its name (one instance per family)."""
    FAMILIES[family.name] = family
    return family


def load_families() -> dict[str, ModelFamily]:
    """Import every module of :data:`FAMILY_MODULES` whose file exists; :data:`FAMILIES`."""
    for mod in FAMILY_MODULES:
        if importlib.util.find_spec(mod) is not None:
            importlib.import_module(mod)
    return FAMILIES


def get_family(name: str) -> ModelFamily:
    """The registered family called ``name``; ValueError listing the known ones otherwise."""
    families = FAMILIES if name in FAMILIES else load_families()
    if name not in families:
        raise ValueError(f"unknown model family {name!r}; known: {', '.join(sorted(families))}")
    return families[name]


def find_family(index: dict, components: set[str]) -> ModelFamily | None:
    """The first registered family whose :meth:`ModelFamily.matches` accepts the folder, or
    None (families should match disjoint folders: the order is registration order)."""
    for family in load_families().values():
        if family.matches(index, components):
            return family
    return None


def family_of(model: DiffusionModel) -> ModelFamily:
    """The family object of a loaded model (``model.family`` is its name)."""
    return get_family(model.family)
