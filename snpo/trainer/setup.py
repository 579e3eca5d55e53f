"""What a run builds before its first step: the model and its reference, the optimizer and LR
schedule, the DeepSpeed config and engine.

- The reference: LoRA → the same network with adapters disabled (no copy); full fine-tune → a
  frozen copy in the training dtype, outside the engine (never touched by ZeRO or by
  ``load_checkpoint``). LoRA checkpoints exclude the frozen base weights, so a resume cannot move
  the reference either; :func:`reference_fingerprint` is compared before/after every resume.
- The optimizer (``optimizer``: torch AdamW, transformers' Adafactor or bitsandbytes' 8-bit
  AdamW, :func:`build_optimizer`) and LR scheduler (torch LambdaLR) are objects passed to
  ``deepspeed.initialize`` (no fused_adam JIT on the CPU); ZeRO-Offload (``offload_optimizer``,
  ``offload_param``) is an entry of the DeepSpeed config (:func:`offload_config`).
"""

from __future__ import annotations

import copy
import hashlib
import math
import os
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch

from snpo.config import ConfigError, TrainConfig
from snpo.precision import dtype_of
from snpo.trainer.errors import DistributedError, ModelLoadError


@dataclass
class Models:
    """model: the DiffusionModel (its denoiser ``unet``, a UNet or a flow family's transformer,
    is the trainable module); reference: the frozen copy of a full fine-tune, None for LoRA,
    sft or cached reference errors."""

    model: object
    reference: torch.nn.Module | None
    lora: bool


def _lora_config(cfg: TrainConfig, *, gaussian_init: bool = False):
    from snpo.models import lora_config

    return lora_config(cfg.lora_targets, cfg.lora_rank, cfg.lora_alpha, gaussian_init=gaussian_init)


def build_models(
    cfg: TrainConfig,
    device: torch.device,
    *,
    skip: tuple[str, ...] = (),
    reference: bool = True,
    model_path: Path | None = None,
) -> Models:
    """Load the model, add LoRA or unfreeze the denoiser, build the reference, set attention.

    skip: components not to load ("vae", "text_encoders": their outputs come from a cache);
    reference: False when the reference errors come from a cache (no frozen copy is made);
    model_path: the local folder ``cfg.model`` resolved to (:func:`resolve_model`).

    Policy and reference run in the same (eval) mode: with the same weights they compute the
    same numbers bit for bit (diffusers' resnets take another memory layout in train mode), so
    step 1 of every objective starts exactly at the pair loss ln 2. Dropout, which SD1.5/SDXL
    configs set to 0, is therefore off."""
    from snpo.models import load_model

    dtype = dtype_of(cfg.precision)
    try:
        model = load_model(
            str(model_path) if model_path is not None else cfg.model,
            dtype=dtype,
            device=device,
            revision=None if model_path is not None else cfg.revision,
            variant=cfg.variant,
            skip=skip,
        )
    except ConfigError:
        raise
    except Exception as err:  # noqa: BLE001 - diffusers/transformers/hub raise many kinds
        raise ModelLoadError(
            f"model: cannot load {cfg.model!r}: {type(err).__name__}: {err}".splitlines()[0]
        ) from err
    model.spec.configure(model, cfg)  # e.g. a flow family's σ sampling
    unet = model.unet
    if cfg.attention == "xformers":
        try:
            unet.enable_xformers_memory_efficient_attention()
        except Exception as err:  # noqa: BLE001 - diffusers raises several kinds
            raise ConfigError(f"attention: cannot enable xformers: {err}") from err
    lora = cfg.lora_rank > 0
    frozen = None
    if lora:
        # the gaussian LoRA init: the same on every rank, whichever components were loaded
        torch.manual_seed(cfg.seed)
        unet.add_adapter(_lora_config(cfg, gaussian_init=True))
        for p in unet.parameters():  # peft keeps LoRA weights fp32-compatible: match the dtype
            if p.requires_grad:
                p.data = p.data.to(dtype)
    else:
        if cfg.preset.uses_reference and reference:
            frozen = copy.deepcopy(unet).to(device)  # already in the training dtype
            frozen.requires_grad_(False)
        unet.requires_grad_(True)
    if cfg.gradient_checkpointing:
        unet.enable_gradient_checkpointing()
    unet.eval()  # see the docstring: the same mode as the reference
    if frozen is not None:
        frozen.eval()
    if not any(p.requires_grad for p in unet.parameters()):
        raise ConfigError(
            f"lora_targets: no {model.spec.denoiser} module matched {list(cfg.lora_targets)}; "
            f"nothing would be trained (the {model.family} family's usual targets: "
            f"{list(model.spec.lora_targets)})"
        )
    return Models(model, frozen, lora)


def fresh_denoiser(cfg: TrainConfig, lora: bool, family=None, source: Path | str | None = None):
    """The base denoiser (UNet or transformer) as saved, in the training dtype, with the run's
    LoRA adapters added when ``lora``: the module a ZeRO-3 export loads the consolidated
    weights into. family: the model's :class:`snpo.models.ModelFamily` (None: detected from
    ``cfg.model``); source: the resolved model folder (None: ``cfg.model`` and its revision)."""
    import diffusers

    from snpo.models import detect_family, get_family

    kw = {"revision": cfg.revision} if cfg.revision and source is None else {}
    source = str(source) if source is not None else cfg.model
    family = family or get_family(detect_family(source))
    cls = getattr(diffusers, family.denoiser_class)
    denoiser = cls.from_pretrained(
        source,
        subfolder=family.denoiser,
        torch_dtype=dtype_of(cfg.precision),
        variant=cfg.variant,
        **kw,
    )
    if lora:
        denoiser.add_adapter(_lora_config(cfg))
    return denoiser


fresh_unet = fresh_denoiser


def latent_grid_problem(model, resolution: int) -> str | None:
    """Why ``resolution``² images do not fit the denoiser's token grid, or None.

    A latent side s = resolution / latent_scale must split into whole patches of
    patch_size × k (k: the 2×2 packing of families whose denoiser counts packed channels,
    in_channels = k²·C, e.g. FLUX), and s / patch_size may not exceed a learned position
    table (``pos_embed_max_size``, SD3). UNets have neither: always None."""
    conf = model.unet.config
    side = resolution // model.latent_scale
    patch = conf.get("patch_size", 1) or 1
    patch = int(patch[-1] if isinstance(patch, (list, tuple)) else patch)  # Wan: (t, h, w)
    packed = max(1, math.isqrt(max(1, int(conf.get("in_channels", 1)) // model.in_channels)))
    step = patch * packed
    if side % step:
        return (
            f"resolution: {resolution} gives latents of side {side}, which the "
            f"{model.family} denoiser cannot split into patches of {step}; use a multiple of "
            f"{step * model.latent_scale}"
        )
    limit = conf.get("pos_embed_max_size")
    if limit and side // patch > int(limit):
        return (
            f"resolution: {resolution} gives {side // patch} patches per side, more than the "
            f"{model.family} denoiser's position table holds (pos_embed_max_size {limit}); "
            f"use at most {int(limit) * patch * model.latent_scale}"
        )
    return None


def resolve_model(cfg: TrainConfig) -> Path | None:
    """The local folder of ``cfg.model``: itself, or for a hub id the snapshot of ``revision``
    resolved once (downloaded when not cached), so that the cache check, the load and the
    checkpoint's model identity all see the same commit. None when it cannot be resolved here
    (the load then reports why)."""
    if os.path.isdir(cfg.model):
        return Path(cfg.model)
    try:
        from huggingface_hub import snapshot_download

        return Path(snapshot_download(cfg.model, revision=cfg.revision))
    except Exception:  # noqa: BLE001 - offline, unknown id: load_model names the problem
        return None


def reference_fingerprint(models: Models) -> str:
    """A hash of (a strided sample of) every reference weight: the frozen copy, or for LoRA the
    frozen base weights of the denoiser. Under ZeRO-3 the local partitions are hashed."""
    if models.lora:
        params = [(n, p) for n, p in models.model.unet.named_parameters() if not p.requires_grad]
    elif models.reference is not None:
        params = list(models.reference.named_parameters())
    else:
        return ""
    h = hashlib.sha256()
    for name, p in params:
        t = getattr(p, "ds_tensor", p).detach().reshape(-1)
        stride = max(1, t.numel() // 4096)
        sample = t[::stride].to("cpu", torch.float32).contiguous()
        h.update(name.encode())
        h.update(sample.numpy().tobytes())
        h.update(repr(float(t.to(torch.float64).sum())).encode())
    return h.hexdigest()


# --------------------------------------------------------------------------------------------
def effective_lr(cfg: TrainConfig, world: int) -> float:
    """learning_rate, × micro × accumulation × world when scale_lr (DiffusionDPO's rule)."""
    if not cfg.scale_lr:
        return cfg.learning_rate
    return (
        cfg.learning_rate * cfg.train_batch_size_per_gpu * cfg.gradient_accumulation_steps * world
    )


def lr_lambda(cfg: TrainConfig) -> Callable[[int], float]:
    """The LR factor of optimizer step s: linear warmup over lr_warmup_steps, then constant,
    linear to 0 or half a cosine to 0 at max_steps."""
    warm, total, kind = cfg.lr_warmup_steps, cfg.max_steps, cfg.lr_schedule

    def f(step: int) -> float:
        if warm and step < warm:
            return (step + 1) / warm
        if kind == "constant":
            return 1.0
        frac = min(1.0, (step - warm) / max(1, total - warm))
        if kind == "linear":
            return max(0.0, 1.0 - frac)
        return 0.5 * (1.0 + math.cos(math.pi * frac))

    return f


def clips_itself(cfg: TrainConfig) -> bool:
    """ZeRO-0 fp32: DeepSpeed would compute the gradient norm to clip and then drop it, so the
    trainer clips (and gets the norm) itself, in one pass (:func:`snpo.trainer.guard.norm_and_clip`)."""
    return cfg.zero_stage == 0 and cfg.precision == "fp32"


def offload_config(cfg: TrainConfig) -> dict:
    """The ``zero_optimization`` entries of ZeRO-Offload / ZeRO-Infinity (validated in
    :mod:`snpo.config`: the optimizer offload from stage 1, nvme and the weight offload at stage 3
    only): ``offload_optimizer`` moves the fp32 master weights and optimizer states (and their
    step) to CPU memory or an NVMe folder, ``offload_param`` ZeRO-3's weight partitions. CPU
    buffers are pinned (faster copies) except on the CPU accelerator, which has nothing to pin
    for."""
    pin = torch.cuda.is_available()
    out: dict = {}
    for key, device in (
        ("offload_optimizer", cfg.offload_optimizer),
        ("offload_param", cfg.offload_param),
    ):
        if device == "none":
            continue
        entry: dict = {"device": device, "pin_memory": pin}
        if device == "nvme":
            entry["nvme_path"] = str(cfg.offload_nvme_path)
        out[key] = entry
    return out


def deepspeed_config(cfg: TrainConfig, world: int) -> dict:
    """The DeepSpeed config dict: batch sizes, ZeRO stage and offload, clipping, bf16/fp16 (no
    optimizer or scheduler entries: those are torch objects). With an offload the client
    optimizer runs on the CPU copies (``zero_force_ds_cpu_optimizer`` off: DeepSpeed would
    otherwise insist on its own CPU Adam)."""
    micro, accum = cfg.train_batch_size_per_gpu, cfg.gradient_accumulation_steps
    zero: dict = {"stage": cfg.zero_stage, **offload_config(cfg)}
    conf: dict = {
        "train_micro_batch_size_per_gpu": micro,
        "gradient_accumulation_steps": accum,
        "train_batch_size": micro * accum * world,
        "zero_optimization": zero,
        "zero_allow_untested_optimizer": True,
        "steps_per_print": 10**9,
        "wall_clock_breakdown": False,
    }
    if "offload_optimizer" in zero:
        conf["zero_force_ds_cpu_optimizer"] = False
    if cfg.max_grad_norm > 0 and not clips_itself(cfg):
        conf["gradient_clipping"] = cfg.max_grad_norm
    if cfg.precision == "bf16":
        conf["bf16"] = {"enabled": True}
    elif cfg.precision == "fp16":
        conf["fp16"] = {"enabled": True, "initial_scale_power": 16}
    return conf


def build_optimizer(cfg: TrainConfig, params: list[torch.nn.Parameter], lr: float):
    """The ``optimizer`` over ``params`` at learning rate ``lr``.

    adamw: torch AdamW (β1, β2, ε, decoupled weight decay); two fp32 moments m, v per weight;
    its fused implementation where torch has one (:func:`adamw_implementation`).
    adafactor: transformers' Adafactor with ``relative_step``, ``scale_parameter`` and
    ``warmup_init`` off, so the step size is ``lr`` (and the LR schedule) as for AdamW, with
    ``clip_threshold`` 1 and the weight decay, as DiffusionDPO trains SDXL; no first moment
    (β1 None) and, for an r × c matrix, a factored second moment V ≈ R·Cᵀ / ΣR of r + c floats —
    at ZeRO-0 fp32 only: DeepSpeed's bf16/fp16 and ZeRO optimizers pass flat fp32 partitions,
    whose second moment is not factored (4 bytes per parameter).
    adamw8bit: bitsandbytes' AdamW8bit (m and v block-quantised to 8 bits)."""
    if cfg.optimizer == "adafactor":
        from transformers.optimization import Adafactor

        return Adafactor(
            params,
            lr=lr,
            relative_step=False,
            scale_parameter=False,
            warmup_init=False,
            clip_threshold=1.0,
            weight_decay=cfg.weight_decay,
        )
    if cfg.optimizer == "adamw8bit":
        try:
            import bitsandbytes as bnb
        except ImportError as err:
            raise ConfigError(
                "optimizer: adamw8bit needs bitsandbytes, which cannot be imported "
                f"({err}); pip install bitsandbytes, or use optimizer: adamw / adafactor"
            ) from err
        return bnb.optim.AdamW8bit(
            params,
            lr=lr,
            betas=(cfg.adam_beta1, cfg.adam_beta2),
            eps=cfg.adam_eps,
            weight_decay=cfg.weight_decay,
        )
    return torch.optim.AdamW(
        params,
        lr=lr,
        betas=(cfg.adam_beta1, cfg.adam_beta2),
        eps=cfg.adam_eps,
        weight_decay=cfg.weight_decay,
        **adamw_implementation(params),
    )


def adamw_implementation(params: list[torch.Tensor]) -> dict[str, bool]:
    """Keyword arguments choosing torch AdamW's implementation: ``{"fused": True}`` when torch
    has its fused kernel for every parameter's device and dtype (CUDA, CPU: one pass over each
    tensor instead of a dozen elementwise ops per tensor), else ``{}`` (torch's default:
    foreach on CUDA, a loop elsewhere). The update is the same AdamW (the same state: ``step``, ``exp_avg``,
    ``exp_avg_sq``); its rounding may differ from the default's in the last bit. A checkpoint
    keeps its implementation: ``load_state_dict`` restores the saved param group's ``fused``
    flag, so a run resumed from an older checkpoint continues as it started."""
    from torch.optim.optimizer import _get_fused_kernels_supported_devices

    devices = set(_get_fused_kernels_supported_devices())
    ok = bool(params) and all(
        torch.is_floating_point(p) and p.device.type in devices for p in params
    )
    return {"fused": True} if ok else {}


def init_engine(cfg: TrainConfig, unet: torch.nn.Module, world: int, *, universal: bool):
    """``deepspeed.initialize`` of the trainable denoiser with the optimizer
    (:func:`build_optimizer`) and the LR schedule; universal: load a universal checkpoint
    (:mod:`snpo.trainer.universal`). → (engine, learning rate)."""
    import deepspeed

    params = [p for p in unet.parameters() if p.requires_grad]
    lr = effective_lr(cfg, world)
    opt = build_optimizer(cfg, params, lr)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lr_lambda(cfg))
    conf = deepspeed_config(cfg, world)
    if universal:
        from snpo.trainer.universal import universal_load_config

        conf = universal_load_config(conf)
    try:
        engine, _, _, _ = deepspeed.initialize(
            model=unet, model_parameters=params, optimizer=opt, lr_scheduler=sched, config=conf
        )
    except (ConfigError, OSError):
        raise
    except Exception as err:  # noqa: BLE001 - DeepSpeed raises many kinds
        raise DistributedError(
            f"deepspeed.initialize failed: {type(err).__name__}: {err}".splitlines()[0]
        ) from err
    if world == 1 and cfg.zero_stage == 0:
        # one process: nothing to average, so no flattening, all-reduce and copy-back of
        # every gradient at each boundary
        engine.enable_backward_allreduce = False
    return engine, lr
