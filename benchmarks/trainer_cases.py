"""The trainer-step benchmark: model configs, the rows compared, the inputs, the steps.

One *training step* of a trainer row = what ``snpo train`` does for one micro-batch of P pairs
with gradient accumulation 1 and ZeRO-0: the pairs' draws (:func:`snpo.draws.pair_draws`), the
inputs — live: :func:`snpo.step.encode_batch` (VAE encode of the 2P images, text encoder on the
P prompts); cached: the posterior mean/log-variance, prompt embeddings and ``ref_err`` as
``snpo cache`` stores them, sampled with the draws' latent noise as
:meth:`snpo.cache.Cache.encoded_batch` does —, :func:`snpo.step.preference_step` (ONE policy
forward over the 2P rows; the reference forward under no_grad, or the cached ``ref_err``),
``loss.backward()``, gradient clipping at 1.0 in one foreach pass, AdamW as ``snpo train``
builds it (fused where torch has the kernel), one host read of the
loss. bf16 runs update fp32 master copies of the bf16 weights, as DeepSpeed's bf16 optimizer
does. Data loading (image decoding, collation) is in no row.

The *reference step* (:mod:`benchmarks.reference_step`) is the same micro-batch trained the way
the public Diffusion-DPO ``train.py`` does it: VAE encode + text encoder + reference UNet every
step, the policy on the concatenated winner/loser batch, its eager loss, clipping, torch's
default AdamW and its
per-step ``.item()`` logging — on the same weights, optimizer, pixels and prompts.

Length (~720 lines): the rows, their model specs and the one interleaved measurement share the
objects they time (Restorer, Group); each piece is small, and a split would cut the measurement
from the state it restores.

Before every step (warm-up and timed) the weights and the optimizer are restored
(:class:`Restorer`): every step is the first AdamW step from the initial weights, so the loss
stays log 2 (policy = reference) and no row times a run that has trained itself into subnormal
gradients. The rows are timed interleaved, in rounds whose order rotates.

Models: UNet2DConditionModel, AutoencoderKL and CLIP text encoders with random weights from the
real SD1.5 and SDXL configs (written out here and in ``sd_models.py``: the parameter counts and
therefore the costs are the real ones; nothing is downloaded); ``sd15-small``, SD1.5's
structure at reduced width for the CPU rows; ``sd35m-small``, SD3.5-Medium's MMDiT structure
reduced (SD3Transformer2DModel, 16-channel latents, three text encoders; family ``sd3``, whose
reference row is :func:`benchmarks.reference_step.flow_dpo_step`); tiny models for the CI
subset and the SD3 smoke test. Inputs: random
pixels in [-1, 1] and prompts of benchmark words; half the pairs on the null-prompt branch.

Trainer variants, each a row (the baseline is live · fused · batched):
  ref       live   = ``ref_mode: live``: VAE, text encoder and a frozen copy of the UNet (full
                     fine-tune) run every step
            cached = ``ref_mode: cache``: latents, text and ``ref_err`` from the cache; no VAE,
                     text encoder or reference held or run
  loss      fused = ``backend="auto"`` (cuda → triton → torch; torch on a CPU)
            eager = ``backend="torch"`` (the PyTorch reference of the loss)
  branches  batched = both branches (conditional and null-prompt pairs) in one 2P forward
            split   = one branch after the other: two forwards (conditional rows, then null
                      rows), outputs put back in row order; also for the live reference
"""

from __future__ import annotations

import copy
import gc
import math
import os
import time
from dataclasses import dataclass
from typing import Any

import torch

from snpo.tools.estimate import ARCHS

from . import harness as H
from . import sd_models as SM

# ---------------------------------------------------------------------------------------------
# UNet configs (UNet2DConditionModel keyword arguments)
# ---------------------------------------------------------------------------------------------
# stable-diffusion-v1-5/unet/config.json: 859,520,964 parameters
SD15_UNET: dict[str, Any] = {
    "sample_size": 64,
    "in_channels": 4,
    "out_channels": 4,
    "center_input_sample": False,
    "flip_sin_to_cos": True,
    "freq_shift": 0,
    "down_block_types": (
        "CrossAttnDownBlock2D",
        "CrossAttnDownBlock2D",
        "CrossAttnDownBlock2D",
        "DownBlock2D",
    ),
    "up_block_types": (
        "UpBlock2D",
        "CrossAttnUpBlock2D",
        "CrossAttnUpBlock2D",
        "CrossAttnUpBlock2D",
    ),
    "block_out_channels": (320, 640, 1280, 1280),
    "layers_per_block": 2,
    "downsample_padding": 1,
    "mid_block_scale_factor": 1,
    "act_fn": "silu",
    "norm_num_groups": 32,
    "norm_eps": 1e-5,
    "cross_attention_dim": 768,
    "attention_head_dim": 8,
}

# stable-diffusion-xl-base-1.0/unet/config.json: 2,567,463,684 parameters
SDXL_UNET: dict[str, Any] = {
    "sample_size": 128,
    "in_channels": 4,
    "out_channels": 4,
    "center_input_sample": False,
    "flip_sin_to_cos": True,
    "freq_shift": 0,
    "down_block_types": ("DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
    "up_block_types": ("CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"),
    "block_out_channels": (320, 640, 1280),
    "layers_per_block": 2,
    "transformer_layers_per_block": (1, 2, 10),
    "attention_head_dim": (5, 10, 20),
    "cross_attention_dim": 2048,
    "use_linear_projection": True,
    "addition_embed_type": "text_time",
    "addition_time_embed_dim": 256,
    "projection_class_embeddings_input_dim": 2816,  # pooled 1280 + 6 time ids × 256
    "downsample_padding": 1,
    "mid_block_scale_factor": 1,
    "act_fn": "silu",
    "norm_num_groups": 32,
    "norm_eps": 1e-5,
}

# SD1.5's structure at a fifth of its width (CPU rows): 37,522,628 parameters, 256 px
SD15_SMALL_UNET: dict[str, Any] = {
    **SD15_UNET,
    "sample_size": 32,
    "block_out_channels": (64, 128, 256, 256),
}

# the tiny UNets of snpo.models.tiny (CPU harness checks; ~1 M parameters)
TINY_SD_UNET: dict[str, Any] = {
    "sample_size": 8,
    "in_channels": 4,
    "out_channels": 4,
    "down_block_types": ("CrossAttnDownBlock2D", "DownBlock2D"),
    "up_block_types": ("UpBlock2D", "CrossAttnUpBlock2D"),
    "block_out_channels": (32, 64),
    "layers_per_block": 1,
    "cross_attention_dim": 32,
    "attention_head_dim": 8,
    "norm_num_groups": 8,
}
TINY_SDXL_UNET: dict[str, Any] = {
    **TINY_SD_UNET,
    "cross_attention_dim": 64,  # two 32-wide text encoders, concatenated
    "addition_embed_type": "text_time",
    "addition_time_embed_dim": 8,
    "projection_class_embeddings_input_dim": 6 * 8 + 32,
}

# ---------------------------------------------------------------------------------------------
# SD3-class transformer configs (SD3Transformer2DModel keyword arguments)
# ---------------------------------------------------------------------------------------------
# stable-diffusion-3.5-medium/transformer/config.json as far as we know it (not verified
# offline: nothing is downloaded): 24 MMDiT blocks of width 24 × 64 = 1536, the first 13 with
# SD3.5's second (image-only) attention, RMS-norm q/k; 16-channel latents in 2×2 patches. One
# copy, the one `snpo estimate --arch sd35m` counts.
SD35M_TRANSFORMER: dict[str, Any] = dict(ARCHS["sd35m"]["config"])


SD35M_SMALL_TRANSFORMER: dict[str, Any] = {
    **SD35M_TRANSFORMER,
    "sample_size": 32,
    "num_layers": 4,
    "num_attention_heads": 6,
    "joint_attention_dim": 512,
    "caption_projection_dim": 384,
    "pooled_projection_dim": 512,
    "pos_embed_max_size": 96,
    "dual_attention_layers": (0, 1),
}
# snpo.models.tiny_flow's transformer shape with SD3.5's options (the smoke test)
TINY_SD3_TRANSFORMER: dict[str, Any] = {
    **SD35M_TRANSFORMER,
    "sample_size": 8,
    "num_layers": 2,
    "attention_head_dim": 8,
    "num_attention_heads": 4,
    "joint_attention_dim": 48,
    "caption_projection_dim": 32,
    "pooled_projection_dim": 64,
    "pos_embed_max_size": 16,
    "dual_attention_layers": (0,),
}
SD3_SHIFT = 3.0  # the static shift of SD3.x's FlowMatchEulerDiscreteScheduler config


@dataclass(frozen=True)
class ModelSpec:
    label: str
    family: str  # "sd" | "sdxl" | "sd3"
    unet: dict[str, Any]  # the denoiser's config (UNet2DConditionModel / SD3Transformer2DModel)
    latent: tuple[int, int, int]
    text: tuple[int, int]  # (tokens, width) of the prompt embedding
    pooled: int | None  # SDXL / SD3 pooled text embedding width
    resolution: int  # pixels (time ids)
    gpu_only: bool


MODELS: dict[str, ModelSpec] = {
    "sd15": ModelSpec(
        "SD1.5 (UNet 859.5 M params, VAE 83.7 M, CLIP-L text 123.1 M), 512 px: latent 4×64×64, "
        "text 77×768",
        "sd",
        SD15_UNET,
        (4, 64, 64),
        (77, 768),
        None,
        512,
        True,
    ),
    "sdxl": ModelSpec(
        "SDXL (UNet 2567.5 M params, VAE 83.7 M, CLIP-L 123.1 M + OpenCLIP-bigG 694.7 M text), "
        "1024 px: latent 4×128×128, text 77×2048 + pooled 1280",
        "sdxl",
        SDXL_UNET,
        (4, 128, 128),
        (77, 2048),
        1280,
        1024,
        True,
    ),
    "sd35m": ModelSpec(
        "SD3.5-Medium (MMDiT-X 2243.2 M params, VAE 83.8 M, CLIP-L 123.7 M + OpenCLIP-bigG "
        "694.7 M + T5-XXL encoder 4762.3 M text), 1024 px: latent 16×128×128, text "
        "333×4096 + pooled 2048",
        "sd3",
        SD35M_TRANSFORMER,
        (16, 128, 128),
        (77 + 256, 4096),
        2048,
        1024,
        True,
    ),
    "sd15-small": ModelSpec(
        "SD1.5-structured UNet at channels 64/128/256/256 (37.5 M params), 256 px: latent "
        "4×32×32, text 77×768; VAE of SD's structure at ¼ width (5.3 M), 2-layer CLIP-L-width "
        "text encoder (15.0 M)",
        "sd",
        SD15_SMALL_UNET,
        (4, 32, 32),
        (77, 768),
        None,
        256,
        False,
    ),
    "tiny-sd": ModelSpec(
        "tiny SD-class model (CPU harness check): 16 px, 2× VAE, latent 4×8×8, text 16×32",
        "sd",
        TINY_SD_UNET,
        (4, 8, 8),
        (16, 32),
        None,
        16,
        False,
    ),
    "tiny-sdxl": ModelSpec(
        "tiny SDXL-class model (CPU harness check): 16 px, latent 4×8×8, text 16×64 + pooled 32",
        "sdxl",
        TINY_SDXL_UNET,
        (4, 8, 8),
        (16, 64),
        32,
        16,
        False,
    ),
    "sd35m-small": ModelSpec(
        "SD3.5-Medium-structured MMDiT (4 blocks of width 384, 2 dual-attention, RMS q/k norm; "
        "22.6 M params), 256 px: latent 16×32×32, text 333×512 + pooled 512; SD3's VAE "
        "structure (16 channels, shift/scale) at ¼ width (5.3 M), CLIP-L/CLIP-G at ¼ width "
        "and T5 of width 512, 2 layers each (8.3 M)",
        "sd3",
        SD35M_SMALL_TRANSFORMER,
        (16, 32, 32),
        (77 + 256, 512),
        512,
        256,
        False,
    ),
    "tiny-sd3": ModelSpec(
        "tiny SD3.5-class model (CPU smoke test, 0.09 M params): 16 px, 2× VAE, latent "
        "16×8×8, text 272×48 + pooled 64",
        "sd3",
        TINY_SD3_TRANSFORMER,
        (16, 8, 8),
        (16 + 256, 48),
        64,
        16,
        False,
    ),
}

# (model, pairs) groups. GPU: SD1.5 at the paper configs' micro-batch (1) and at 8 pairs; SDXL
# at 1 and 2 pairs (a full fine-tune with fp32 master weights and Adam states is ~41 GB before
# activations; larger micro-batches are recorded as out of memory where they do not fit).
GPU_GROUPS: tuple[tuple[str, int], ...] = (
    ("sd15", 1), ("sd15", 8), ("sdxl", 1), ("sdxl", 2), ("sd35m", 1), ("sd35m", 2),
)  # fmt: skip
# CI subset on a CPU: the same code on tiny models in seconds (numbers that claim nothing)
CPU_GROUPS: tuple[tuple[str, int], ...] = (("tiny-sd", 2), ("tiny-sdxl", 2))
# the CPU measurement (opt-in, SNPO_BENCH_TRAINER=full: a few minutes on 2 cores)
CPU_FULL_GROUPS: tuple[tuple[str, int], ...] = (("sd15-small", 2),)
# the SD3.5-M-structured CPU measurement (opt-in, SNPO_BENCH_TRAINER=sd3); the real-size SD3.5-M
# rows are GPU groups (never run yet: no device was lent)
CPU_SD3_GROUPS: tuple[tuple[str, int], ...] = (("sd35m-small", 2),)
# models whose rows are judged against the targets; the tiny rows only check the harness
TARGET_MODELS = ("sd15-small", "sd35m-small", "sd15", "sdxl", "sd35m")

# The loss settings: Diff-SNPO (β = 5000, λ = 0.9); lr small (random weights, the value is moot).
OBJECTIVE, BETA, LAM = "snpo", 5000.0, 0.9
LEARNING_RATE, WEIGHT_DECAY, MAX_GRAD_NORM = 1e-6, 1e-2, 1.0
# every step starts from policy = reference, where every objective's loss is log 2 ≈ 0.693; a
# timed loss outside this range means the step did not do what the row says (the check fails)
SANE_LOSS = (0.3, 1.2)


@dataclass(frozen=True)
class Variant:
    ref: str  # "live" | "cached"
    loss: str  # "fused" | "eager"
    branches: str  # "batched" | "split"

    @property
    def id(self) -> str:
        return f"{self.ref}-{self.loss}-{self.branches}"

    @property
    def backend(self) -> str:
        return "auto" if self.loss == "fused" else "torch"

    @property
    def is_baseline(self) -> bool:
        return self == BASELINE


BASELINE = Variant("live", "fused", "batched")
CACHED_DEFAULT = Variant("cached", "fused", "batched")  # what snpo train runs from a cache
VARIANTS: tuple[Variant, ...] = tuple(
    Variant(r, lo, b)
    for r in ("live", "cached")
    for lo in ("fused", "eager")
    for b in ("batched", "split")
)
REFERENCE_ID = "reference"  # the Diffusion-DPO-style step (benchmarks/reference_step.py)
ROW_IDS: tuple[str, ...] = (REFERENCE_ID, *(v.id for v in VARIANTS))
# the rows the targets are judged on (SNPO_BENCH_TRAINER_ROWS=targets: more rounds in the time)
TARGET_ROW_IDS: tuple[str, ...] = (REFERENCE_ID, BASELINE.id, CACHED_DEFAULT.id)


def row_ids(env: dict[str, str] | None = None) -> tuple[str, ...]:
    """The rows each group times: all of :data:`ROW_IDS` (``SNPO_BENCH_TRAINER_ROWS=all``, the
    default) or only the judged ones, :data:`TARGET_ROW_IDS` (``targets``)."""
    env = dict(os.environ) if env is None else env
    mode = env.get("SNPO_BENCH_TRAINER_ROWS", "all") or "all"
    if mode not in ("all", "targets"):
        raise ValueError(f"SNPO_BENCH_TRAINER_ROWS={mode!r}: choose all or targets")
    return ROW_IDS if mode == "all" else TARGET_ROW_IDS


def trainer_groups(on_gpu: bool, env: dict[str, str] | None = None) -> list[tuple[str, int]]:
    """The (model, pairs) groups this run parametrizes. GPU: the GPU groups. CPU: the tiny
    groups (``auto``), the ``sd15-small`` measurement (``full``) or the SD3.5-M-structured
    ``sd35m-small`` one (``sd3``), plus the GPU groups (skipped with the reason).
    SNPO_BENCH_TRAINER=none drops all."""
    env = dict(os.environ) if env is None else env
    mode = env.get("SNPO_BENCH_TRAINER", "auto") or "auto"
    if mode not in ("auto", "none", "full", "sd3"):
        raise ValueError(f"SNPO_BENCH_TRAINER={mode!r}: choose auto, full, sd3 or none")
    if mode == "none":
        return []
    if on_gpu:
        return list(GPU_GROUPS)
    cpu = {"full": CPU_FULL_GROUPS, "sd3": CPU_SD3_GROUPS}.get(mode, CPU_GROUPS)
    return list(cpu) + list(GPU_GROUPS)


def diffusers_missing() -> str | None:
    try:
        import diffusers  # noqa: F401
    except ImportError as err:
        return (
            f"diffusers is not installed ({err}); on a GPU image carry its wheel in .whl/ "
            "(benchmarks/README.md)"
        )
    return None


# ---------------------------------------------------------------------------------------------
# the optimizer and its restoration
# ---------------------------------------------------------------------------------------------
class MasterAdamW:
    """AdamW on fp32 master copies of low-precision parameters (DeepSpeed's bf16 optimizer): the
    step casts the gradients to fp32, updates the masters and writes them back. fp32 parameters
    are updated in place.

    Two torch AdamW objects over the same masters, one per kind of row: ``opt``, as ``snpo
    train`` builds it (:func:`snpo.trainer.setup.adamw_implementation`: fused where torch has
    the kernel), and ``reference_opt``, torch's default implementation (foreach on CUDA, a loop
    on a CPU), as Diffusion-DPO's ``train.py`` constructs ``torch.optim.AdamW``. Their states are
    allocated here and share the moment tensors (``exp_avg``, ``exp_avg_sq``; each keeps its own
    ``step``), so the group holds one set of moments; :class:`Restorer` zeroes them before
    every step, so sharing changes no step."""

    def __init__(self, params, *, lr: float, weight_decay: float) -> None:
        from snpo.trainer.setup import adamw_implementation

        self.params = [p for p in params if p.requires_grad]
        self.low = self.params[0].dtype != torch.float32
        self.master = [p.detach().float().clone() for p in self.params] if self.low else self.params
        kw = {"lr": lr, "weight_decay": weight_decay}
        self.opt = torch.optim.AdamW(self.master, **kw, **adamw_implementation(self.master))
        self.reference_opt = torch.optim.AdamW(self.master, **kw)
        self._allocate_states()

    @property
    def fused(self) -> bool:
        return bool(self.opt.param_groups[0].get("fused"))

    def _allocate_states(self) -> None:
        """One step of each optimizer at learning rate 0 on zero gradients (the weights stay
        bit for bit: p·(1 − 0·wd) − 0·m/(√v + ε)) makes torch allocate each state as it would;
        then the reference optimizer takes the trainer optimizer's moment tensors."""
        with torch.no_grad():
            for m in self.master:
                m.grad = torch.zeros_like(m)
            for opt in (self.opt, self.reference_opt):
                lrs = [g["lr"] for g in opt.param_groups]
                for g in opt.param_groups:
                    g["lr"] = 0.0
                opt.step()
                for g, lr in zip(opt.param_groups, lrs):
                    g["lr"] = lr
            for m in self.master:
                own, shared = self.reference_opt.state[m], self.opt.state[m]
                for k in ("exp_avg", "exp_avg_sq", "max_exp_avg_sq"):
                    if k in own:
                        own[k] = shared[k]
                for state in (own, shared):
                    for v in state.values():
                        v.zero_()
        self.zero_grad()

    def states(self) -> list[dict]:
        """Every per-parameter state of both optimizers (shared moments appear twice)."""
        return [*self.opt.state.values(), *self.reference_opt.state.values()]

    def step(self, which: str = "trainer") -> None:
        """One AdamW step: ``which`` = "trainer" (``snpo train``'s implementation) or
        "reference" (torch's default, the reference row's)."""
        opt = {"trainer": self.opt, "reference": self.reference_opt}[which]
        if self.low:
            for m, p in zip(self.master, self.params):
                m.grad = None if p.grad is None else p.grad.float()
        opt.step()
        if self.low:
            with torch.no_grad():
                torch._foreach_copy_(self.params, self.master)

    def zero_grad(self) -> None:
        for p in self.params:
            p.grad = None
        if self.low:
            for m in self.master:
                m.grad = None


class Restorer:
    """The trainable weights (and fp32 masters) as they were when it was made, and the
    optimizer's fresh state; :meth:`restore` puts both back in place (no reallocation) before a
    step, so that every step is the first AdamW step from the same initial weights.

    AdamW's fresh state is all zeros (``step``, ``exp_avg``, ``exp_avg_sq``, and
    ``max_exp_avg_sq`` with amsgrad): zeroing the tensors of a state that one step has
    allocated gives a step bit-identical to one on a freshly built optimizer
    (``test_restore.py``). Gradients are set to None, as ``zero_grad`` does."""

    def __init__(self, opt: MasterAdamW) -> None:
        self.opt = opt
        # one fp32 copy: the masters' (the bf16 weights are the masters rounded, exactly), or
        # the fp32 weights themselves
        with torch.no_grad():
            self.saved = [m.detach().clone() for m in opt.master]
        self.restores = 0

    @property
    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in self.saved)

    def restore(self) -> None:
        opt = self.opt
        with torch.no_grad():
            torch._foreach_copy_(opt.master, self.saved)
            if opt.low:  # fp32 → bf16: the masters hold bf16 values, so the copy is exact
                torch._foreach_copy_(opt.params, self.saved)
        opt.zero_grad()
        for state in opt.states():
            for k, v in list(state.items()):
                if isinstance(v, torch.Tensor):
                    v.zero_()
                elif isinstance(v, (int, float)):
                    state[k] = type(v)(0)
        self.restores += 1


# ---------------------------------------------------------------------------------------------
# the setup of one (model, pairs) group
# ---------------------------------------------------------------------------------------------
def split_branches(fn, uncond_rows: torch.Tensor):
    """A UNet function that runs the conditional rows and the null-prompt rows as two forwards
    (one branch after the other) and returns the outputs in the original row order."""
    idx_c = torch.nonzero(~uncond_rows).flatten()
    idx_u = torch.nonzero(uncond_rows).flatten()
    groups = [g for g in (idx_c, idx_u) if g.numel()]
    order = torch.cat(groups)
    inverse = torch.empty_like(order)
    inverse[order] = torch.arange(order.numel(), device=order.device)

    def pick(v, g):
        if isinstance(v, torch.Tensor):
            return v[g]
        if isinstance(v, dict):
            return {k: pick(x, g) for k, x in v.items()}
        return v

    def run(x, t, **kw):
        if len(groups) == 1:
            return fn(x, t, **kw)
        outs = [fn(x[g], t[g], **pick(kw, g)) for g in groups]
        return torch.cat(outs)[inverse]

    return run


def _nbytes(module) -> int:
    return sum(t.numel() * t.element_size() for t in module.parameters())


class Group:
    """One model on the device with the inputs of P pairs, shared by every row of the group:
    the policy UNet (trained by every row, restored before every step), its frozen reference
    copy, VAE and text encoder(s), the pixels and prompts of the micro-batch, what ``snpo
    cache`` stores for it, one optimizer and its :class:`Restorer`. :meth:`steps` builds the
    step of every row."""

    def __init__(self, name: str, pairs: int, device: torch.device, dtype: torch.dtype) -> None:
        from snpo.data import PairBatch
        from snpo.models import (
            DiffusionModel,
            build_scheduler,
            encode_images,
            encode_prompts,
            null_embedding,
        )
        from snpo.step import StepModels, reference_errors, time_id_rows, unet_fn

        spec = MODELS[name]
        self.name, self.spec, self.pairs, self.device, self.dtype = name, spec, pairs, device, dtype
        flow = spec.family == "sd3"
        build = SM.build_flow_parts if flow else SM.build_parts
        unet, vae, encs, toks = build(name, spec.unet, device=device, dtype=dtype)
        self.unet = unet.train().requires_grad_(True)
        self.num_params = sum(p.numel() for p in self.unet.parameters())
        if flow:  # as StableDiffusion3Pipeline's folder: its scheduler and T5 length
            from diffusers import FlowMatchEulerDiscreteScheduler

            scheduler = FlowMatchEulerDiscreteScheduler(num_train_timesteps=1000, shift=SD3_SHIFT)
            extra = {"max_sequence_length": SM.T5_TOKENS}
        else:
            scheduler, extra = build_scheduler(), {}
        self.model = DiffusionModel(
            unet=self.unet,
            scheduler=scheduler,
            text_encoders=encs,
            tokenizers=toks,
            vae=vae,
            family=spec.family,
            source=f"benchmark:{name}",
            force_zeros_for_empty_prompt=spec.family == "sdxl",
            extra=extra,
        )
        self.family = self.model.spec
        if self.model.latent_scale * spec.latent[-1] != spec.resolution:
            raise ValueError(f"{name}: VAE factor × latent size ≠ resolution {spec.resolution}")
        # the frozen reference of a full fine-tune: a copy of the initial weights
        self.reference = copy.deepcopy(self.unet).requires_grad_(False).eval()
        p, r = pairs, spec.resolution
        gen = torch.Generator(device="cpu").manual_seed(1)
        pixels = torch.rand((p, 2, 3, r, r), generator=gen) * 2.0 - 1.0  # as collate_pairs gives
        self.prompts = SM.prompts(p)
        size = torch.full((p, 2, 2), r, dtype=torch.long)
        crop = torch.zeros((p, 2, 2), dtype=torch.long)
        self.batch = PairBatch(torch.arange(p), 0, pixels, self.prompts, size, crop, [])
        self.null = null_embedding(self.model).to(device=device, dtype=dtype)
        self.uncond = torch.arange(p) % 2 == 1  # both branches once P ≥ 2
        self.uncond_rows = torch.cat([self.uncond, self.uncond]).to(device)
        self.branch_pairs = (int((~self.uncond).sum()), int(self.uncond.sum()))
        # what `snpo cache` stores for these pairs, in host memory as its shards are: the VAE
        # posterior in the default --latent_dtype (fp16 for fp32 runs, else the training dtype),
        # the prompt embeddings in the training dtype, the reference errors (ref_inputs cache)
        store = torch.float16 if dtype == torch.float32 else dtype
        with torch.no_grad():
            pix = torch.cat([pixels[:, 0], pixels[:, 1]]).to(device=device, dtype=dtype)
            mean, logvar = encode_images(self.model, pix)
            self.c_mean, self.c_logvar = mean.to("cpu", store), logvar.to("cpu", store)
            self.c_text = encode_prompts(self.model, self.prompts).to(device="cpu", dtype=dtype)
        self.c_tid = None
        if spec.family == "sdxl":
            self.c_tid = time_id_rows(torch.cat([size[:, 0], size[:, 1]]), torch.zeros(2 * p, 2), r)
        ref_fn = unet_fn(self.reference, self.family)
        sm = StepModels(self.model, None, ref_fn, self.null, device, dtype)
        draws = self.draws()
        self.c_ref = reference_errors(sm, self.cached_batch(draws), draws).to("cpu")
        self.opt = MasterAdamW(self.unet.parameters(), lr=LEARNING_RATE, weight_decay=WEIGHT_DECAY)
        self.restorer = Restorer(self.opt)
        # what each kind of row needs resident besides the policy and its optimizer
        self.frozen_bytes = {
            "reference": _nbytes(self.reference),
            "vae": _nbytes(vae),
            "text": sum(_nbytes(e) for e in encs),
        }

    # -- inputs ---------------------------------------------------------------------------------
    def draws(self):
        """The pairs' draws as ``snpo train`` makes them each micro-step (seed 0, epoch 0), with
        the null branch fixed to every second pair so that both branches are always present.
        Host tensors, as in the trainer: the step moves them to the device."""
        from snpo.draws import pair_draws

        d = pair_draws(0, 0, list(range(self.pairs)), self.spec.latent, self.model.scheduler, 0.5)
        d.uncond = self.uncond.clone()
        return d

    def cached_batch(self, draws):
        """What :meth:`snpo.cache.Cache.encoded_batch` returns for the pairs, from the stored
        posterior, prompt embeddings and time ids (the shard read itself is not included)."""
        from snpo.step import EncodedBatch, latents_from_posterior

        dev, dt = self.device, self.dtype
        mean = self.c_mean.to(dev).to(dt)
        logvar = self.c_logvar.to(dev).to(dt)
        latents = latents_from_posterior(mean, logvar, draws).to(dt)
        tid = None if self.c_tid is None else self.c_tid.to(device=dev, dtype=dt)
        return EncodedBatch(latents, self.c_text.to(device=dev, dtype=dt), tid)

    # -- steps ----------------------------------------------------------------------------------
    def step_fn(self, v: Variant):
        """The training step of trainer variant ``v`` (a callable returning the loss as a
        float: the step's one host read, as ``snpo train`` reads its metrics once per step)."""
        from snpo.step import StepModels, encode_batch, preference_step, unet_fn

        live = v.ref == "live"
        policy = unet_fn(self.unet, self.family)
        reference = unet_fn(self.reference, self.family) if live else None
        if v.branches == "split":
            policy = split_branches(policy, self.uncond_rows)
            reference = None if reference is None else split_branches(reference, self.uncond_rows)
        sm = StepModels(self.model, policy, reference, self.null, self.device, self.dtype)
        params, opt = self.opt.params, self.opt

        def step(_=None) -> float:
            draws = self.draws()
            if live:
                enc = encode_batch(sm, self.batch, draws)
                ref_err = None
            else:
                enc = self.cached_batch(draws)
                ref_err = self.c_ref.to(self.device)
            res = preference_step(
                sm,
                enc,
                draws,
                objective=OBJECTIVE,
                beta=BETA,
                lam=LAM,
                backend=v.backend,
                ref_err=ref_err,
            )
            res.loss.backward()
            torch.nn.utils.clip_grad_norm_(params, MAX_GRAD_NORM, foreach=True)
            opt.step()
            opt.zero_grad()
            return float(res.loss.detach())

        return step

    def steps(self, ids: tuple[str, ...] = ROW_IDS) -> dict[str, Any]:
        """{row id: step} for the reference step and the trainer variants in ``ids`` (ROW_IDS
        order)."""
        from .reference_step import diffusion_dpo_step

        out: dict[str, Any] = {}
        if REFERENCE_ID in ids:
            out[REFERENCE_ID] = diffusion_dpo_step(self)
        out.update({v.id: self.step_fn(v) for v in VARIANTS if v.id in ids})
        return out

    def holds_bytes(self, row_id: str) -> int:
        """Bytes of weights a run of this row keeps resident besides the policy, its gradients
        and optimizer: the reference copy, VAE and text encoders for live/reference rows,
        nothing for cached rows."""
        if row_id.startswith("cached"):
            return 0
        return sum(self.frozen_bytes.values())

    def close(self) -> None:
        for p in self.unet.parameters():
            p.grad = None
        self.opt = self.restorer = None
        del self.unet, self.reference, self.model, self.batch


def is_sane(loss: float) -> bool:
    return math.isfinite(loss) and SANE_LOSS[0] < loss < SANE_LOSS[1]


def is_oom(err: BaseException) -> bool:
    return isinstance(err, torch.OutOfMemoryError) or "out of memory" in str(err).lower()


def _free(device: torch.device) -> None:
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()


def measure_interleaved(
    steps: dict[str, Any],
    restore,
    device: torch.device,
    *,
    warmup: int,
    rounds_min: int,
    rounds_max: int,
    target_ms: float,
    out_of_time=lambda: False,
) -> dict[str, dict[str, Any]]:
    """Time every step of ``steps`` ({row id: callable returning the loss}) in interleaved
    rounds, ``restore()`` (untimed) before each call. Returns per row id: {"wall", "cpu",
    "loss": lists over the timed steps, "first_ms", "error": None | (status, reason)}. A row
    whose step raises or returns a loss outside ``SANE_LOSS`` is dropped from the rounds
    with the reason; the others go on. Rounds stop after ``rounds_max``, or once
    ``rounds_min`` are done and ``target_ms`` has passed, or when ``out_of_time()`` (after at
    least one round)."""
    res: dict[str, dict[str, Any]] = {
        rid: {"wall": [], "cpu": [], "loss": [], "first_ms": None, "error": None} for rid in steps
    }
    active = list(steps)

    def attempt(rid: str, timed: bool) -> None:
        rec = res[rid]
        try:
            restore()
            H.synchronize(device)
            w0, c0 = time.perf_counter(), H.cpu_time_s()
            loss = steps[rid]()
            H.synchronize(device)
            wall, cpu = (time.perf_counter() - w0) * 1e3, (H.cpu_time_s() - c0) * 1e3
        except Exception as err:  # one row failing must not hide the others
            rec["error"] = (
                ("skipped", "out of memory")
                if is_oom(err)
                else ("error", f"{type(err).__name__}: {err}"[:300])
            )
            active.remove(rid)
            restore()
            _free(device)
            return
        if not is_sane(loss):
            rec["error"] = (
                "error",
                f"loss {loss!r} outside {SANE_LOSS}: the step is not a real training step",
            )
            active.remove(rid)
            return
        if rec["first_ms"] is None:
            rec["first_ms"] = wall
        if timed:
            rec["wall"].append(wall)
            rec["cpu"].append(cpu)
            rec["loss"].append(loss)

    for k in range(warmup):
        for rid in H.rotated(list(active), k):
            attempt(rid, timed=False)
    start = time.perf_counter()
    for r in range(rounds_max):
        if not active:
            break
        elapsed = (time.perf_counter() - start) * 1e3
        if r >= rounds_min and elapsed >= target_ms:
            break
        if r >= 1 and out_of_time():
            break
        for rid in H.rotated(list(active), r):
            attempt(rid, timed=True)
    restore()
    return res
