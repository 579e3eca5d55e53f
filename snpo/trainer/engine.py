"""DeepSpeed setup, the training loop, checkpoint/resume, logging and the non-finite guard.

- Distributed: ``deepspeed.init_distributed`` with gloo on the CPU (``DS_ACCELERATOR=cpu`` is set
  when CUDA is absent) and nccl on GPUs. Without a launcher, RANK/LOCAL_RANK/WORLD_SIZE/
  MASTER_ADDR/MASTER_PORT default to a single process on a free port.
- The DeepSpeed config is built from :class:`snpo.config.TrainConfig`; the optimizer (torch AdamW)
  and LR scheduler (torch LambdaLR) are objects passed to ``deepspeed.initialize`` (no fused_adam
  JIT on the CPU).
- The reference: LoRA → the same network with adapters disabled (no copy); full fine-tune → a
  frozen copy in the training dtype, outside the engine (never touched by ZeRO or by
  ``load_checkpoint``). LoRA checkpoints exclude the frozen base weights, so a resume cannot move
  the reference either; a fingerprint of the reference is compared before/after every resume.
- Caches (``snpo cache``; ``ref_mode``, ``cache_dir``, ``cache_use``): :func:`open_run_cache`
  decides before any model loads which sections are read from the cache. Cached latents → the
  VAE is not loaded and no image is decoded (pairs come straight from the order, bad ones
  dropped by ``Cache.valid``); cached text → no text encoder; cached reference errors → no
  reference at all (no frozen copy, no adapter toggling) and ``ref_err`` goes into the loss.
- Checkpoints: ``engine.save_checkpoint`` on all ranks, tag ``step_<N>``, with client state
  {step, epoch, micro_step, config fingerprint and trajectory options}. All randomness is
  counter-based (:mod:`snpo.draws`), so step, weights, optimizer and LR-scheduler state are
  all a resume needs to continue bit-identically.
- Non-finite guard: a non-finite loss of any micro-batch (flagged on the device) or a non-finite
  gradient norm is caught before the optimizer step (all ranks agree through one all-reduce per
  optimizer step; DeepSpeed reports the norm when it computes one, after its step, which
  skips or applies nothing at ZeRO 1–3 for a non-finite norm); the run stops with an error
  naming the step and saves nothing, so the last good checkpoint stays the newest.
- Logging: ``metrics.jsonl`` (every step, rank 0), TensorBoard under ``output_dir/tb`` (default) or
  wandb, a tqdm bar on rank 0.
"""

from __future__ import annotations

import contextlib
import copy
import dataclasses
import datetime
import hashlib
import json
import math
import os
import shutil
import socket
import sys
import time
import warnings
from dataclasses import dataclass
from pathlib import Path

import torch

from .checkpoints import tag_name
from .config import ConfigError, TrainConfig
from .preemption import PREEMPTED_EXIT, Preempted, beat, stale_ranks

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}
CHECKPOINT_DIR = "checkpoints"
METRICS_FILE = "metrics.jsonl"


class NonFiniteError(RuntimeError):
    """The loss or the gradient norm became NaN/inf; the run stopped without saving."""


class ResumeError(RuntimeError):
    """A checkpoint cannot be resumed with this configuration (or the reference moved)."""


class ModelLoadError(RuntimeError):
    """The model named by ``model`` could not be loaded (missing files, wrong folder, hub)."""


class CheckpointWriteError(OSError):
    """A checkpoint could not be written (disk full, permissions); the previous one is intact."""


class DistributedError(RuntimeError):
    """DeepSpeed or torch.distributed failed (initialisation, a collective, a peer process)."""


class PeerFailed(RuntimeError):
    """Another process of the run failed at a step every process checks together; its own
    error names the problem."""


def agree(fn, what: str):
    """Run ``fn()`` on every rank and make every rank stop if any of them failed.

    The rank that failed re-raises its own error; the others raise :class:`PeerFailed`, so no
    rank waits in a later collective for a process that is gone."""
    error: BaseException | None = None
    result = None
    try:
        result = fn()
    except Exception as err:  # noqa: BLE001 - re-raised below, on every rank
        error = err
    ok = all_reduce(torch.tensor([0.0 if error is not None else 1.0]), "min")
    if error is not None:
        raise error
    if float(ok[0]) < 1.0:
        raise PeerFailed(f"another process failed while {what} (its error says why)")
    return result


def guard_decision(
    *, finite_norm: bool, overflow: bool, skipped_in_a_row: int, limit: int
) -> tuple[str, int]:
    """What the non-finite guard does after an optimizer step → (action, skipped in a row).

    fp16 loss scaling: DeepSpeed reports an overflow when the scaled gradients are not finite;
    it skips that step and lowers the scale. That is routine, not a failure — until ``limit``
    steps in a row were skipped. Without an overflow report a non-finite norm stops the run.
    action: "ok", "skipped" (a routine overflow) or "stop"."""
    if overflow:
        n = skipped_in_a_row + 1
        return ("stop" if n > limit else "skipped"), n
    if not finite_norm:
        return "stop", skipped_in_a_row
    return "ok", 0


# --------------------------------------------------------------------------------------------
# distributed setup
def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def prepare_environment(cfg: TrainConfig) -> None:
    """Environment variables DeepSpeed needs, before deepspeed is imported."""
    if cfg.device == "cpu" or not torch.cuda.is_available():
        os.environ.setdefault("DS_ACCELERATOR", "cpu")
    if "RANK" not in os.environ or "WORLD_SIZE" not in os.environ:
        os.environ.setdefault("RANK", "0")
        os.environ.setdefault("LOCAL_RANK", "0")
        os.environ.setdefault("WORLD_SIZE", "1")
        os.environ.setdefault("MASTER_ADDR", "127.0.0.1")
        os.environ.setdefault("MASTER_PORT", str(_free_port()))
    os.environ.setdefault("LOCAL_RANK", os.environ.get("RANK", "0"))


@dataclass
class DistInfo:
    rank: int
    local_rank: int
    world: int
    device: torch.device

    @property
    def is_main(self) -> bool:
        return self.rank == 0


def init_distributed(cfg: TrainConfig) -> DistInfo:
    prepare_environment(cfg)
    import deepspeed

    use_cuda = cfg.device != "cpu" and torch.cuda.is_available()
    if not torch.distributed.is_initialized():
        deepspeed.init_distributed(
            dist_backend="nccl" if use_cuda else "gloo",
            timeout=datetime.timedelta(seconds=cfg.dist_timeout_s),
        )
        release_shm_names()
    rank = torch.distributed.get_rank()
    world = torch.distributed.get_world_size()
    local = int(os.environ.get("LOCAL_RANK", "0"))
    device = torch.device("cuda", local) if use_cuda else torch.device("cpu")
    if use_cuda:
        torch.cuda.set_device(device)
    return DistInfo(rank, local, world, device)


def release_shm_names() -> None:
    """Unlink this rank's name of DeepSpeed's CPU shared-memory comm buffer
    (``/dev/shm/deepspeed_allreduce_buffer_<uid>_<addr>_<port>_<rank>``, ~69 MB) once every rank
    has mapped every buffer: the mappings stay valid, and nothing is left in /dev/shm when the
    process ends, however it ends (DeepSpeed never removes them)."""
    if not torch.distributed.is_initialized() or torch.distributed.get_world_size() < 2:
        return
    torch.distributed.barrier()  # DeepSpeed maps every peer's buffer inside init_distributed
    name = (
        f"deepspeed_allreduce_buffer_{os.getuid()}_{os.environ.get('MASTER_ADDR', '')}_"
        f"{os.environ.get('MASTER_PORT', '')}_{torch.distributed.get_rank()}"
    )
    with contextlib.suppress(OSError):
        os.unlink(os.path.join("/dev/shm", name))


def is_timeout(err: BaseException) -> bool:
    """A torch.distributed collective that gave up waiting for a peer."""
    text = f"{type(err).__name__} {err}".lower()
    return "timed out" in text or "timeout" in text


def all_reduce(t: torch.Tensor, op: str = "sum") -> torch.Tensor:
    """In-place all-reduce of a small host or device tensor (through the GPU under nccl, which
    has no CPU tensors)."""
    if torch.distributed.is_initialized() and torch.distributed.get_world_size() > 1:
        ops = {"sum": torch.distributed.ReduceOp.SUM, "min": torch.distributed.ReduceOp.MIN}
        if torch.distributed.get_backend() == "nccl" and t.device.type != "cuda":
            buf = t.to("cuda")
            torch.distributed.all_reduce(buf, op=ops[op])
            t.copy_(buf.cpu())
        else:
            torch.distributed.all_reduce(t, op=ops[op])
    return t


def barrier() -> None:
    if torch.distributed.is_initialized() and torch.distributed.get_world_size() > 1:
        torch.distributed.barrier()


# --------------------------------------------------------------------------------------------
# models
@dataclass
class Models:
    model: object  # snpo.models.DiffusionModel (its unet is the trainable module)
    reference: torch.nn.Module | None  # frozen copy (full fine-tune), None for LoRA / sft
    lora: bool


def build_models(
    cfg: TrainConfig,
    device: torch.device,
    *,
    skip: tuple[str, ...] = (),
    reference: bool = True,
    model_path: Path | None = None,
) -> Models:
    """Load the model, add LoRA or unfreeze the UNet, build the reference, set attention.

    skip: components not to load ("vae", "text_encoders": their outputs come from a cache);
    reference: False when the reference errors come from a cache (no frozen copy is made);
    model_path: the local folder ``cfg.model`` resolved to (:func:`resolve_model`).

    Policy and reference run in the same (eval) mode: with the same weights they compute the
    same numbers bit for bit (diffusers' resnets take another memory layout in train mode), so
    step 1 of every objective starts exactly at the pair loss ln 2. Dropout, which SD1.5/SDXL
    configs set to 0, is therefore off."""
    from .models import load_model

    dtype = DTYPES[cfg.precision]
    try:
        model = load_model(
            str(model_path) if model_path is not None else cfg.model,
            dtype=dtype,
            device=device,
            revision=None if model_path is not None else cfg.revision,
            variant=cfg.variant,
            skip=skip,
        )
    except (ConfigError, ModelLoadError):
        raise
    except Exception as err:  # noqa: BLE001 - diffusers/transformers/hub raise many kinds
        raise ModelLoadError(
            f"model: cannot load {cfg.model!r}: {type(err).__name__}: {err}".splitlines()[0]
        ) from err
    unet = model.unet
    if cfg.attention == "xformers":
        try:
            unet.enable_xformers_memory_efficient_attention()
        except Exception as err:  # noqa: BLE001 - diffusers raises several kinds
            raise ConfigError(f"attention: cannot enable xformers: {err}") from err
    lora = cfg.lora_rank > 0
    want_reference, reference = reference, None
    if lora:
        from peft import LoraConfig

        # the gaussian LoRA init: the same on every rank, whichever components were loaded
        torch.manual_seed(cfg.seed)
        unet.add_adapter(
            LoraConfig(
                r=cfg.lora_rank,
                lora_alpha=cfg.lora_alpha or cfg.lora_rank,
                init_lora_weights="gaussian",
                target_modules=list(cfg.lora_targets),
            )
        )
        for p in unet.parameters():  # peft keeps LoRA weights fp32-compatible: match the dtype
            if p.requires_grad:
                p.data = p.data.to(dtype)
    else:
        if cfg.preset.uses_reference and want_reference:
            reference = copy.deepcopy(unet).to(device)  # already in the training dtype
            reference.requires_grad_(False)
        unet.requires_grad_(True)
    if cfg.gradient_checkpointing:
        unet.enable_gradient_checkpointing()
    unet.eval()  # see the docstring: the same mode as the reference
    if reference is not None:
        reference.eval()
    if not any(p.requires_grad for p in unet.parameters()):
        raise ConfigError("lora_targets: no UNet module matched; nothing would be trained")
    return Models(model, reference, lora)


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
    frozen base weights of the UNet. Under ZeRO-3 the local partitions are hashed."""
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
# caches
def sections_used(cfg: TrainConfig) -> tuple[str, ...]:
    """The cache sections an objective reads: sft needs no reference errors."""
    return ("latents", "text", "ref") if cfg.preset.uses_reference else ("latents", "text")


def open_run_cache(cfg: TrainConfig, num_pairs: int, world: int):
    """(Cache or None, a line saying where the inputs come from and why), per ``ref_mode``.

    live: None. cache: the cache in ``cache_dir`` opened for this config (sections: ``cache_use``,
    or every needed one it holds; reference errors always, for preference objectives), covering
    the epochs the run touches — else the CacheError of :func:`snpo.cache.open_cache` (the
    mismatch message names the differing field). auto: the same, or None with the reason when
    it cannot be used (no cache_dir, no cache, a mismatch, an epoch not covered)."""
    from .cache import SECTION_LABEL, epochs_needed, open_cache
    from .cache_store import CacheError, load_manifest

    live = "VAE, text encoders and reference run every step"
    if cfg.ref_mode == "live":
        return None, f"inputs: live (ref_mode live): {live}"
    if not cfg.cache_dir:
        return None, f"inputs: live (ref_mode auto, no cache_dir): {live}"
    root = Path(cfg.cache_dir)
    wanted = [n for n in sections_used(cfg) if cfg.cache_use is None or n in cfg.cache_use]
    try:
        need = wanted
        view = load_manifest(root) if cfg.cache_use is None else None
        if view is not None:  # default: the needed sections the cache holds
            need = [n for n in wanted if n in view["sections"]]
            if cfg.ref_mode == "cache" and "ref" in wanted and "ref" not in need:
                need.append("ref")  # required: open_cache names what is missing
        if not need:
            raise CacheError(
                f"the cache at {root} holds none of the sections this run reads "
                f"({', '.join(sections_used(cfg))}; cache_use: {cfg.cache_use})"
            )
        cache = open_cache(
            root,
            cfg,
            need,
            epochs=epochs_needed(cfg, num_pairs, world),
            num_pairs=num_pairs,
        )
    except CacheError as err:
        if cfg.ref_mode == "cache":
            raise
        return None, f"inputs: live (ref_mode auto: not using the cache: {err}): {live}"
    parts = [
        f"{SECTION_LABEL[n]} from the cache" if n in cache.sections else f"{n} live"
        for n in sections_used(cfg)
    ]
    return cache, f"inputs: {'; '.join(parts)} ({cache.describe()})"


# --------------------------------------------------------------------------------------------
# optimizer, schedule, DeepSpeed config
def effective_lr(cfg: TrainConfig, world: int) -> float:
    """learning_rate, × micro × accumulation × world when scale_lr (DiffusionDPO's rule)."""
    if not cfg.scale_lr:
        return cfg.learning_rate
    return (
        cfg.learning_rate * cfg.train_batch_size_per_gpu * cfg.gradient_accumulation_steps * world
    )


def lr_lambda(cfg: TrainConfig):
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
    trainer clips (and gets the norm) itself, in one pass (:meth:`Trainer._norm_and_clip`)."""
    return cfg.zero_stage == 0 and cfg.precision == "fp32"


def deepspeed_config(cfg: TrainConfig, world: int) -> dict:
    micro, accum = cfg.train_batch_size_per_gpu, cfg.gradient_accumulation_steps
    conf: dict = {
        "train_micro_batch_size_per_gpu": micro,
        "gradient_accumulation_steps": accum,
        "train_batch_size": micro * accum * world,
        "zero_optimization": {"stage": cfg.zero_stage},
        "zero_allow_untested_optimizer": True,
        "steps_per_print": 10**9,
        "wall_clock_breakdown": False,
    }
    if cfg.max_grad_norm > 0 and not clips_itself(cfg):
        conf["gradient_clipping"] = cfg.max_grad_norm
    if cfg.precision == "bf16":
        conf["bf16"] = {"enabled": True}
    elif cfg.precision == "fp16":
        conf["fp16"] = {"enabled": True, "initial_scale_power": 16}
    return conf


# --------------------------------------------------------------------------------------------
# logging
def keep_metrics_until(path: Path, step: int) -> int:
    """Rewrite ``path`` (atomically) keeping the records of steps ≤ ``step``; a torn or
    unreadable line (a run killed mid-write) is dropped with a warning. → lines dropped as torn."""
    keep, torn = [], 0
    for line in path.read_text(errors="replace").splitlines():
        if not line.strip():
            continue
        try:
            rec = json.loads(line)
            at = int(rec.get("step", 0))
        except (ValueError, TypeError, AttributeError):
            torn += 1
            continue
        if at <= step:
            keep.append(line)
    if torn:
        warnings.warn(
            f"{path}: skipped {torn} unreadable line(s) (a run stopped while writing)",
            stacklevel=2,
        )
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text("".join(k + "\n" for k in keep))
    os.replace(tmp, path)
    return torn


def rebase_position(
    epoch: int, batch: int, *, micro: int, old_world: int, new_world: int, batches_per_epoch: int
) -> tuple[int, int, int]:
    """Where the data order of ``new_world`` processes continues a run that stopped before
    micro-batch ``batch`` of ``epoch`` on ``old_world`` → (global micro-step, its epoch, pairs
    skipped). The pairs of an epoch are consumed in permutation order, micro × world per
    global micro-batch, so batch × micro × old_world pairs are done; the new order starts at the
    first whole batch past them (none repeats; ``skipped`` < micro × new_world are left out
    when the count does not divide)."""
    consumed = batch * micro * old_world
    per_batch = micro * new_world
    new_batch = -(-consumed // per_batch)
    skipped = new_batch * per_batch - consumed
    if new_batch >= batches_per_epoch:
        epoch, new_batch, skipped = epoch + 1, 0, 0
    return epoch * batches_per_epoch + new_batch, epoch, skipped


class MetricsLogger:
    """metrics.jsonl (every step) + TensorBoard / wandb (every log_every) + tqdm, rank 0 only."""

    def __init__(self, cfg: TrainConfig, dist: DistInfo, start_step: int) -> None:
        self.cfg, self.active = cfg, dist.is_main
        self.tb = self.wandb = self.bar = None
        self.path = Path(cfg.output_dir) / METRICS_FILE
        if not self.active:
            return
        if self.path.exists():  # a resumed run: drop what the interrupted run logged past here
            keep_metrics_until(self.path, start_step)
        if cfg.report_to == "tensorboard":
            from torch.utils.tensorboard import SummaryWriter

            self.tb = SummaryWriter(
                str(Path(cfg.output_dir) / "tb"), purge_step=start_step + 1 if start_step else None
            )
        elif cfg.report_to == "wandb":
            import wandb

            self.wandb = wandb.init(
                project=cfg.wandb_project, config=cfg.to_dict(), dir=cfg.output_dir
            )
        if cfg.progress_bar:
            from tqdm.auto import tqdm

            self.bar = tqdm(
                total=cfg.max_steps, initial=start_step, desc=f"{cfg.objective}", dynamic_ncols=True
            )

    def log(self, record: dict) -> None:
        if not self.active:
            return
        clean = {k: (None if isinstance(v, float) and v != v else v) for k, v in record.items()}
        with open(self.path, "a") as fh:
            fh.write(json.dumps(clean) + "\n")
        step = record["step"]
        scalars = {k: v for k, v in record.items() if isinstance(v, (int, float)) and k != "step"}
        if step % self.cfg.log_every == 0 or step == self.cfg.max_steps:
            if self.tb is not None:
                for k, v in scalars.items():
                    if v == v:  # skip NaN (an empty branch)
                        self.tb.add_scalar(f"train/{k}", v, step)
            if self.wandb is not None:
                self.wandb.log({f"train/{k}": v for k, v in scalars.items()}, step=step)
        if self.bar is not None:
            self.bar.update(1)
            post = {"loss": f"{record['loss']:.4g}"}
            for k in ("accuracy_cond", "accuracy_uncond"):
                if k in record and record[k] == record[k]:
                    post[k.replace("accuracy_", "acc_")] = f"{record[k]:.2f}"
            self.bar.set_postfix(post)

    def message(self, text: str) -> None:
        if self.active:
            (self.bar.write if self.bar is not None else print)(text)

    def close(self) -> None:
        if self.tb is not None:
            self.tb.close()
        if self.wandb is not None:
            self.wandb.finish()
        if self.bar is not None:
            self.bar.close()


# --------------------------------------------------------------------------------------------
# checkpoints
def checkpoint_dir(cfg: TrainConfig) -> Path:
    return Path(cfg.output_dir) / CHECKPOINT_DIR


def resume_target(cfg: TrainConfig) -> tuple[Path, str, str | None] | None:
    """(folder, tag, warning) to resume from per ``cfg.resume``, or None for a fresh start.

    auto: the newest complete tag in output_dir/checkpoints (``latest`` when it names one).
    A tag or folder: that checkpoint; outside output_dir only with ``trust_checkpoint``
    (checkpoints are pickles)."""
    from .checkpoints import LATEST_FILE, CheckpointError, choose_tag, inside

    if cfg.resume == "never":
        return None
    d = checkpoint_dir(cfg)
    if cfg.resume == "auto":
        tag, warning = choose_tag(d)
        return None if tag is None else (d, tag, warning)
    p = Path(cfg.resume)
    if p.is_dir() and ((p / LATEST_FILE).is_file() or not (p / "snpo-checksums.json").is_file()):
        folder, tag, warning = (p, *choose_tag(p))
        if tag is None:
            raise ConfigError(f"resume: {cfg.resume!r} holds no checkpoint")
    elif p.is_dir():
        folder, tag, warning = p.parent, p.name, None
    elif (d / cfg.resume).is_dir():
        folder, tag, warning = d, cfg.resume, None
    else:
        raise ConfigError(
            f"resume: no checkpoint {cfg.resume!r} (a folder or a tag in checkpoints/)"
        )
    if not inside(folder, Path(cfg.output_dir)) and not cfg.trust_checkpoint:
        raise CheckpointError(
            f"resume: {folder} is outside output_dir {cfg.output_dir}; DeepSpeed checkpoints are "
            "pickles that can run code when loaded, so snpo resumes only from its own folder: "
            "add --trust_checkpoint if you wrote it or trust its author"
        )
    return folder, tag, warning


# --------------------------------------------------------------------------------------------
# the trainer
class Trainer:
    """One training run: ``Trainer(cfg).run()`` → summary dict."""

    def __init__(self, cfg: TrainConfig) -> None:
        self.cfg = cfg
        self._held = contextlib.ExitStack()  # the output folder's lock, for the whole run
        self.bad_total = 0  # pairs skipped for bad images, over the whole run (checkpointed)
        self.stop = None  # snpo.preemption.StopRequest while running

    # setup ---------------------------------------------------------------------------------
    def setup(self) -> None:
        from .data import PairDataset, PairOrder, open_source
        from .models import null_embedding
        from .step import StepModels, lora_reference, unet_fn

        cfg = self.cfg
        try:
            self.dist = dist = init_distributed(cfg)
        except Exception as err:  # noqa: BLE001 - gloo/nccl/launcher errors
            raise DistributedError(f"cannot start torch.distributed: {err}") from err
        torch.manual_seed(cfg.seed)
        self.target = agree(self._claim_output_dir, "checking output_dir")
        self.dtype = DTYPES[cfg.precision]
        self.model_path = agree(lambda: resolve_model(cfg), "resolving the model")
        self.source = open_source(cfg)
        # which inputs come from a cache decides what is loaded at all
        self.cache, self.inputs_note = self._agreed_cache()
        cached = set(self.cache.sections) if self.cache is not None else set()
        self.sources = {n: "cache" if n in cached else "live" for n in sections_used(cfg)}
        skip = tuple(c for c, n in (("vae", "latents"), ("text_encoders", "text")) if n in cached)
        self.models = agree(
            lambda: build_models(
                cfg,
                dist.device,
                skip=skip,
                reference="ref" not in cached,
                model_path=self.model_path,
            ),
            "loading the model",
        )
        m = self.models.model
        if cfg.resolution % m.latent_scale:
            raise ConfigError(
                f"resolution: {cfg.resolution} is not divisible by the VAE factor {m.latent_scale}"
            )
        self.dataset = PairDataset(
            self.source,
            resolution=cfg.resolution,
            seed=cfg.seed,
            random_crop=cfg.random_crop,
            random_flip=cfg.random_flip,
            on_bad_image=cfg.on_bad_image,
            winners_only=cfg.objective == "sft",
        )
        self.captions = None
        if "latents" in cached and "text" not in cached:  # prompts without decoding images
            from .cache import captions

            self.captions = captions(self.source)
        self.order = PairOrder(
            len(self.source),
            seed=cfg.seed,
            rank=dist.rank,
            world=dist.world,
            micro=cfg.train_batch_size_per_gpu,
        )
        side = cfg.resolution // m.latent_scale
        self.latent_shape = (m.in_channels, side, side)
        self.base_fingerprint = reference_fingerprint(self.models)  # before any checkpoint load
        self.universal = False
        if self.target is not None:
            self.target = agree(self._prepare_world_change, "preparing the checkpoint")
        self.engine = self._init_deepspeed()
        policy = unet_fn(self.engine)
        if not cfg.preset.uses_reference or "ref" in cached:
            reference = None
        elif self.models.lora:
            reference = lora_reference(self.engine.module, policy)
        else:
            reference = unet_fn(self.models.reference)
        null = self.cache.null() if "text" in cached else null_embedding(m)
        null = null.to(device=dist.device, dtype=self.dtype)
        self.step_models = StepModels(m, policy, reference, null, dist.device, self.dtype)

    def _claim_output_dir(self):
        """Lock output_dir (rank 0), refuse what would mix or lose runs, pick the checkpoint to
        resume (see :mod:`snpo.run_dir`); → (folder, tag) or None. Every rank computes the
        resume target; only rank 0 locks, moves aside and writes run.json."""
        from .run_dir import check_fresh_start, check_inputs_outside, move_aside, write_run_file

        cfg, out = self.cfg, Path(self.cfg.output_dir)
        check_inputs_outside(cfg, whole_folder=False)
        if self.dist.is_main:
            out.mkdir(parents=True, exist_ok=True)
            from .locks import exclusive_lock

            self._held.enter_context(exclusive_lock(out, "training run"))
        found = resume_target(cfg)
        if found is not None and found[2]:
            warnings.warn(found[2], stacklevel=2)
        check_fresh_start(cfg, resumable=found is not None)
        if self.dist.is_main and found is None:
            if cfg.overwrite:
                check_inputs_outside(cfg, whole_folder=True)
                moved = move_aside(out)
                if moved is not None:
                    print(f"snpo train: moved the previous run in {out} aside to {moved}")
            write_run_file(out, cfg.fingerprint(), cfg.trajectory_dict())
        return None if found is None else found[:2]

    def _prepare_world_change(self) -> tuple[Path, str]:
        """A ZeRO-1/2/3 checkpoint saved by another number of processes becomes a universal
        checkpoint (:mod:`snpo.universal`): its files are verified, rank 0 converts and seals
        ``<tag>_universal``, and the engine is built to load it. → the tag to load."""
        from .checkpoints import digests, seal, tag_files
        from .universal import (
            convert_to_universal,
            is_universal,
            needs_conversion,
            saved_world_size,
            universal_tag,
            unsupported_reason,
        )

        cfg, world = self.cfg, self.dist.world
        folder, tag = self.target
        if is_universal(folder, tag):
            self.universal = True
            return folder, tag
        old = saved_world_size(folder, tag)
        if not needs_conversion(cfg.zero_stage, old, world):
            return folder, tag
        why = unsupported_reason(cfg.zero_stage, self.models.lora, cfg.precision, old, world)
        if why:
            raise ResumeError(why)
        self.verify_checkpoint(folder, tag)  # the converter unpickles: verify first
        new = universal_tag(tag)
        if self.dist.is_main:
            convert_to_universal(folder, tag, zero_stage=cfg.zero_stage, log=print)
            seal(folder, new, digests(folder / new, tag_files(folder / new)), latest=False)
        barrier()
        self.universal = True
        return folder, new

    def _agreed_cache(self):
        """:func:`open_run_cache` on every rank, and the same decision on all of them: a rank
        that cannot open the cache (ref_mode cache) makes every rank stop; ranks that would read
        different sections (ref_mode auto, e.g. a cache one node cannot see) all train live."""
        from .cache_store import CacheError

        cfg, world = self.cfg, self.dist.world
        if self.model_path is not None and str(self.model_path) != cfg.model:
            # a hub id: fingerprint the very snapshot that is loaded (content hashes only)
            cfg = dataclasses.replace(cfg, model=str(self.model_path), revision=None)
        error = None
        try:
            cache, note = open_run_cache(cfg, len(self.source), world)
        except CacheError as err:
            cache, note, error = None, "", err
        have = set(cache.sections) if cache is not None else set()
        flags = torch.tensor(
            [float(n in have) for n in sections_used(cfg)] + [float(error is None)]
        )
        total = all_reduce(flags.clone(), "sum")
        if error is not None:
            raise error
        if float(total[-1]) < world:
            raise CacheError(
                f"ref_mode cache: another process could not open the cache in {cfg.cache_dir} "
                "(see its error)"
            )
        if any(0.0 < float(x) < world for x in total[:-1]):
            if cfg.ref_mode == "cache":
                raise CacheError(
                    f"ref_mode cache: the processes found different sections in {cfg.cache_dir}"
                )
            note = (
                f"inputs: live (ref_mode auto: not every process can use the cache in "
                f"{cfg.cache_dir}): VAE, text encoders and reference run every step"
            )
            cache = None
        return cache, note

    def _init_deepspeed(self):
        import deepspeed

        cfg, unet = self.cfg, self.models.model.unet
        params = [p for p in unet.parameters() if p.requires_grad]
        self.lr = effective_lr(cfg, self.dist.world)
        opt = torch.optim.AdamW(
            params,
            lr=self.lr,
            betas=(cfg.adam_beta1, cfg.adam_beta2),
            eps=cfg.adam_eps,
            weight_decay=cfg.weight_decay,
        )
        sched = torch.optim.lr_scheduler.LambdaLR(opt, lr_lambda(cfg))
        conf = deepspeed_config(cfg, self.dist.world)
        if self.universal:
            from .universal import universal_load_config

            conf = universal_load_config(conf)
        try:
            engine, _, _, _ = deepspeed.initialize(
                model=unet,
                model_parameters=params,
                optimizer=opt,
                lr_scheduler=sched,
                config=conf,
            )
        except (ConfigError, OSError):
            raise
        except Exception as err:  # noqa: BLE001 - DeepSpeed raises many kinds
            raise DistributedError(
                f"deepspeed.initialize failed: {type(err).__name__}: {err}".splitlines()[0]
            ) from err
        if self.dist.world == 1 and cfg.zero_stage == 0:
            # one process: nothing to average, so no flattening, all-reduce and copy-back of
            # every gradient at each boundary
            engine.enable_backward_allreduce = False
        return engine

    # checkpoint ----------------------------------------------------------------------------
    def data_step(self, step: int) -> int:
        """The data order's global micro-step at the start of optimizer step ``step`` + 1:
        step × accumulation, shifted when a resume on another number of processes re-based
        the order (:meth:`_rebase_data_position`)."""
        return step * self.cfg.gradient_accumulation_steps + self.data_offset

    def client_state(self, step: int) -> dict:
        epoch, batch = self.order.position(self.data_step(step))
        return {
            "snpo_step": step,
            "snpo_epoch": epoch,
            "snpo_batch_in_epoch": batch,
            "snpo_micro_step": self.data_step(step),
            "snpo_data_offset": self.data_offset,
            "snpo_micro": self.cfg.train_batch_size_per_gpu,
            "snpo_fingerprint": self.cfg.fingerprint(),
            "snpo_trajectory": self.cfg.trajectory_dict(),
            "snpo_world": self.dist.world,
            "snpo_zero_stage": self.cfg.zero_stage,
            "snpo_sources": self.sources,
            "snpo_bad_images": self.bad_images_so_far(),
            "snpo_base_fingerprint": self.base_fingerprint,
        }

    def bad_images_so_far(self) -> int:
        """Pairs skipped for bad images since the run began (all ranks; collective)."""
        return int(all_reduce(torch.tensor([self.bad_total]), "sum").item()) + self.bad_resumed

    def save(self, step: int) -> None:
        """Every rank writes its DeepSpeed files, every rank hashes its share of them, rank 0
        writes the checksum file and then ``latest`` (:mod:`snpo.checkpoints`). A write that
        fails (a full disk) removes the partial tag and raises :class:`CheckpointWriteError`;
        ``latest`` and the older tags are untouched."""
        from .checkpoints import digests, my_share, prune, read_checksums, seal, tag_files

        tag, d = tag_name(step), checkpoint_dir(self.cfg)
        state = self.client_state(step)
        if self.dist.is_main:
            if (d / tag).is_dir() and read_checksums(d / tag) is None:
                shutil.rmtree(d / tag, ignore_errors=True)  # a save of this step that died
            self._check_disk_space(d)
        barrier()
        try:
            if self.cfg.debug_fail_at_step == step and self.dist.rank == self.cfg.debug_fail_rank:
                (d / tag).mkdir(parents=True, exist_ok=True)
                raise OSError(28, f"No space left on device (debug_fail_at_step {step})")
            self.engine.save_checkpoint(
                str(d),
                tag=tag,
                client_state=state,
                save_latest=False,
                exclude_frozen_parameters=self.models.lora,
            )
        except (OSError, RuntimeError) as err:
            shutil.rmtree(d / tag, ignore_errors=True)
            free = shutil.disk_usage(d).free if d.is_dir() else 0
            raise CheckpointWriteError(
                f"cannot write checkpoint {tag} in {d}: {str(err).splitlines()[0] if str(err) else type(err).__name__}"
                f"; {free / 2**30:.2f} GiB free there, a checkpoint takes about "
                f"{self._checkpoint_bytes() / 2**30:.2f} GiB; the partial tag was removed, "
                f"latest still names {self._last_tag()}"
            ) from err
        barrier()
        names = tag_files(d / tag)
        mine = digests(d / tag, my_share(names, self.dist.rank, self.dist.world))
        parts = [mine]
        if self.dist.world > 1:
            parts = [None] * self.dist.world
            torch.distributed.all_gather_object(parts, mine)
        if self.dist.is_main:
            files = {k: v for part in parts for k, v in part.items()}
            seal(d, tag, files)
            self.saved_bytes = sum(v["size"] for v in files.values())
            prune(d, self.cfg.keep_checkpoints, tag)
        barrier()

    def _checkpoint_bytes(self) -> int:
        """The size of one checkpoint: measured after the first save, else estimated (weights
        in the training dtype + fp32 master copy and two AdamW moments of what trains, + the
        frozen weights unless LoRA excludes them)."""
        if getattr(self, "saved_bytes", 0):
            return self.saved_bytes
        params = list(self.engine.module.parameters())
        n_train = sum(
            p.ds_numel if hasattr(p, "ds_numel") else p.numel() for p in params if p.requires_grad
        )
        n_frozen = sum(p.numel() for p in params if not p.requires_grad)
        elem = DTYPES[self.cfg.precision].itemsize
        return n_train * (elem + 12) + (0 if self.models.lora else n_frozen * elem)

    def _check_disk_space(self, d: Path) -> None:
        """Warn (once) when the disk cannot hold keep_checkpoints + 1 checkpoints: the newest
        is written before the oldest is pruned."""
        if getattr(self, "_space_warned", False):
            return
        d.mkdir(parents=True, exist_ok=True)
        keep = self.cfg.keep_checkpoints
        need = self._checkpoint_bytes() * ((keep + 1) if keep else 1)
        have = shutil.disk_usage(d).free + sum(
            f.stat().st_size for f in d.rglob("*") if f.is_file()
        ) * bool(keep)
        if have < need:
            self._space_warned = True
            warnings.warn(
                f"{d}: {have / 2**30:.2f} GiB available for checkpoints, but "
                f"{'keep_checkpoints + 1 = ' + str(keep + 1) if keep else 'one'} checkpoint(s) "
                f"of about {self._checkpoint_bytes() / 2**30:.2f} GiB need "
                f"{need / 2**30:.2f} GiB: a save may fail (lower keep_checkpoints or free space)",
                stacklevel=2,
            )

    def verify_checkpoint(self, folder: Path, tag: str) -> None:
        """Check every file of ``folder/tag`` against its checksum file before DeepSpeed opens
        any (the hashing is spread over the ranks); CheckpointError names each bad file."""
        from .checkpoints import (
            CheckpointError,
            extra_files,
            my_share,
            read_checksums,
            verify_files,
        )

        listed = read_checksums(folder / tag)
        if listed is None:
            raise CheckpointError(
                f"checkpoint {folder / tag} has no checksum file: it is incomplete or was not "
                "written by snpo; nothing from it is loaded"
            )
        names = sorted(listed)
        bad = verify_files(folder / tag, listed, my_share(names, self.dist.rank, self.dist.world))
        if self.dist.is_main:
            bad += [
                f"{folder / tag / n}: not listed in the checksum file"
                for n in extra_files(folder / tag, listed)
            ]
        found = [bad]
        if self.dist.world > 1:
            found = [None] * self.dist.world
            torch.distributed.all_gather_object(found, bad)
        problems = [b for part in found for b in part]
        if problems:
            raise CheckpointError(
                f"checkpoint {folder / tag} is corrupt, nothing was loaded: "
                + "; ".join(problems[:4])
                + (f" (+{len(problems) - 4} more)" if len(problems) > 4 else "")
                + "; delete that tag folder to resume from the previous checkpoint"
            )

    def resume(self) -> int:
        if self.target is None:
            return 0
        folder, tag = self.target
        self.verify_checkpoint(folder, tag)
        before = reference_fingerprint(self.models)
        try:
            path, state = self.engine.load_checkpoint(
                str(folder),
                tag=tag,
                load_module_strict=not self.models.lora,
                load_optimizer_states=True,
                load_lr_scheduler_states=True,
            )
        except Exception as err:  # noqa: BLE001 - DeepSpeed raises many kinds
            raise ResumeError(
                f"DeepSpeed could not load checkpoint {folder / tag}: {type(err).__name__}: "
                f"{err}".splitlines()[0]
            ) from err
        if path is None or state is None:
            raise ResumeError(f"could not load checkpoint {tag!r} from {folder}")
        if state.get("snpo_world") is None and self.universal:
            raise ResumeError(f"checkpoint {folder / tag} carries no snpo client state")
        if state.get("snpo_fingerprint") != self.cfg.fingerprint():
            old = state.get("snpo_trajectory", {})
            new = self.cfg.trajectory_dict()
            diff = sorted(k for k in set(old) | set(new) if old.get(k) != new.get(k))
            raise ResumeError(
                f"checkpoint {folder / tag} was written with different training options: "
                f"{', '.join(diff) or 'unknown'}; use resume: never and a new output_dir, or "
                "restore those options"
            )
        self._check_base_model(state, folder / tag)
        old_sources = state.get("snpo_sources")
        if old_sources is not None and old_sources != self.sources:
            warnings.warn(
                f"resuming a run whose inputs came from {old_sources} with {self.sources}: the "
                "same objective, but equal to the uninterrupted run only up to float rounding",
                stacklevel=2,
            )
        after = reference_fingerprint(self.models)
        if before != after:
            raise ResumeError(
                "the frozen reference changed while loading the checkpoint (it must stay the "
                "base model); refusing to continue"
            )
        self.reference_fingerprint = after
        self.bad_resumed = int(state.get("snpo_bad_images", 0))
        step = int(state["snpo_step"])
        self.data_offset = int(state.get("snpo_data_offset", 0))
        old_world = state.get("snpo_world")
        if old_world not in (None, self.dist.world):
            self._rebase_data_position(state, step)
        return step

    def _rebase_data_position(self, state: dict, step: int) -> None:
        """Continue the data where a run on another number of processes stopped: the pairs
        of the saved epoch consumed so far (batch × micro × old world, all ranks together) are
        skipped, so no pair is seen twice or left out — exact when that count divides by
        micro × new world; otherwise up to one global batch of pairs is skipped, with a
        warning. The draws of each pair are keyed by (seed, epoch, pair), unchanged."""
        old_world = int(state["snpo_world"])
        target, epoch, skipped = rebase_position(
            int(state["snpo_epoch"]),
            int(state["snpo_batch_in_epoch"]),
            micro=self.cfg.train_batch_size_per_gpu,
            old_world=old_world,
            new_world=self.dist.world,
            batches_per_epoch=self.order.batches_per_epoch,
        )
        self.data_offset = target - step * self.cfg.gradient_accumulation_steps
        note = (
            "the data continues exactly where it stopped"
            if skipped == 0
            else f"{skipped} pair(s) of epoch {epoch} are skipped to realign the batches"
        )
        warnings.warn(
            f"resuming a run saved with {old_world} process(es) on {self.dist.world}: {note}; "
            f"the learning rate and schedule continue as saved (lr {self.engine.get_lr()[0]:.3g})",
            stacklevel=2,
        )

    def _check_base_model(self, state: dict, where: Path) -> None:
        """The base model (the reference) must be the one the checkpoint was trained from."""
        saved = state.get("snpo_base_fingerprint")  # of the full weights, before ZeRO partitions
        if saved is None or saved == self.base_fingerprint:
            return
        raise ResumeError(
            f"model: {self.cfg.model!r} is not the base model checkpoint {where} was trained "
            "from (its weights differ); point model at the original weights, or start a new run"
        )

    # export --------------------------------------------------------------------------------
    def export(self, step: int, final: bool) -> Path | None:
        from .export import write_export

        cfg, m = self.cfg, self.models.model
        out = Path(cfg.output_dir) / ("export" if final else f"export-step{step:08d}")
        meta = {
            "objective": cfg.objective,
            "beta": cfg.beta,
            "lam": cfg.effective_lam,
            "uncond_prob": cfg.uncond_prob,
            "weighting": cfg.weighting,
            "inputs": self.sources,
            "step": step,
            "config": cfg.to_dict(),
        }
        if cfg.zero_stage == 3:
            sd = self.engine._zero3_consolidated_16bit_state_dict()
            if not self.dist.is_main:
                barrier()
                return None
            unet = self._fresh_unet()
            missing, unexpected = unet.load_state_dict(sd, strict=False)
            if unexpected or (missing and not self.models.lora):
                raise RuntimeError(f"export: state dict mismatch {missing[:3]} {unexpected[:3]}")
        else:
            unet = self.engine.module
        if self.dist.is_main:
            write_export(out, m, unet, lora=self.models.lora, meta=meta)
        barrier()
        return out

    def _fresh_unet(self):
        from diffusers import UNet2DConditionModel

        cfg = self.cfg
        kw = {"revision": cfg.revision} if cfg.revision else {}
        unet = UNet2DConditionModel.from_pretrained(
            cfg.model, subfolder="unet", torch_dtype=self.dtype, variant=cfg.variant, **kw
        )
        if self.models.lora:
            from peft import LoraConfig

            unet.add_adapter(
                LoraConfig(
                    r=cfg.lora_rank,
                    lora_alpha=cfg.lora_alpha or cfg.lora_rank,
                    target_modules=list(cfg.lora_targets),
                )
            )
        return unet

    # loop ----------------------------------------------------------------------------------
    def _micro_step(self, batch, step: int):
        from .draws import pair_draws
        from .step import preference_step

        cfg = self.cfg
        sft = cfg.objective == "sft"
        empty = len(batch) == 0
        if empty:  # every pair was bad: a zero-weight placeholder keeps the ranks in step
            enc, draws, ref_err = self._placeholder(batch.epoch)
        else:
            draws = pair_draws(
                cfg.seed,
                batch.epoch,
                batch.indices,
                self.latent_shape,
                self.models.model.scheduler,
                cfg.uncond_prob,
            )
            enc = self._encode(batch, draws, winners_only=sft)
            ref_err = None
            if self.sources.get("ref") == "cache":
                ref_err = self.cache.ref_err(batch.epoch, batch.indices)
        res = preference_step(
            self.step_models,
            enc,
            draws,
            objective=cfg.objective,
            beta=cfg.beta,
            lam=cfg.effective_lam,
            weighting=cfg.weighting,
            backend=cfg.backend,
            ref_err=ref_err,
        )
        loss = res.loss
        if empty:
            loss = loss * 0.0
            res.metrics = {k: torch.zeros_like(v) for k, v in res.metrics.items()}
        if cfg.debug_nan_at_step is not None and step == cfg.debug_nan_at_step:
            loss = loss * float("nan")
        if cfg.debug_overflow_at_step is not None and step == cfg.debug_overflow_at_step:
            loss = loss * 1e4  # finite, but fp16 loss scaling makes the gradients overflow
        return loss, res.metrics

    def _encode(self, batch, draws, *, winners_only: bool):
        """The EncodedBatch of a micro-batch: latents and prompt embeddings each from the cache
        or encoded live (:func:`snpo.step.encode_batch`'s two halves)."""
        from .models import encode_prompts
        from .step import EncodedBatch, encode_latents

        sm, dev, dt = self.step_models, self.dist.device, self.dtype
        if self.sources["latents"] == "cache":
            latents, tid = self.cache.encoded_latents(
                batch.epoch, batch.indices, draws, device=dev, dtype=dt, winners_only=winners_only
            )
        else:
            latents, tid = encode_latents(sm, batch, draws, winners_only=winners_only)
        if self.sources["text"] == "cache":
            prompts = self.cache.text(batch.indices)
        else:
            prompts = encode_prompts(sm.model, batch.prompts)
        return EncodedBatch(latents, prompts.to(device=dev, dtype=dt), tid)

    def _placeholder(self, epoch: int):
        """(EncodedBatch, draws, ref_err) of one zero-latent pair on the null branch's
        embedding: what an all-bad micro-batch runs (its loss is multiplied by 0)."""
        from .draws import pair_draws
        from .step import EncodedBatch, time_id_rows

        cfg, sm = self.cfg, self.step_models
        n_img = 1 if cfg.objective == "sft" else 2
        draws = pair_draws(
            cfg.seed, epoch, [0], self.latent_shape, self.models.model.scheduler, cfg.uncond_prob
        )
        latents = torch.zeros(n_img, *self.latent_shape, device=sm.device, dtype=sm.dtype)
        tid = None
        if self.models.model.family == "sdxl":
            r = cfg.resolution
            size = torch.full((n_img, 2), r, dtype=torch.long)
            tid = time_id_rows(size, torch.zeros_like(size), r).to(sm.device, sm.dtype)
        ref_err = None
        if self.sources.get("ref") == "cache":
            ref_err = torch.zeros(2, dtype=torch.float32, device=sm.device)
        return EncodedBatch(latents, sm.null, tid), draws, ref_err

    def _cached_batches(self, start: int, stop: int):
        """Micro-batches for global micro-steps start..stop-1 when the latents come from the
        cache: no image is decoded; pairs the cache marked bad are dropped (and reported) as
        the live path drops undecodable ones."""
        from .data import PairBatch

        n_img = 1 if self.cfg.objective == "sft" else 2
        for g in range(start, stop):
            pairs = self.order.batch(g)
            epoch, idx = pairs[0][0], [i for _, i in pairs]
            ok = self.cache.valid(epoch, idx, winners_only=n_img == 1).tolist()
            good = [i for i, v in zip(idx, ok) if v]
            dropped = [i for i, v in zip(idx, ok) if not v]
            why = dict(self.cache.bad(epoch, dropped)) if dropped else {}
            bad = [
                (i, why.get(i, f"pair {i}: marked bad when the cache was built")) for i in dropped
            ]
            size = torch.zeros(len(good), n_img, 2, dtype=torch.long)
            prompts = [self.captions[i] for i in good] if self.captions is not None else []
            yield PairBatch(
                torch.tensor(good, dtype=torch.long),
                epoch,
                torch.zeros(0),
                prompts,
                size,
                size,
                bad,
            )

    def run(self) -> dict:
        from .preemption import StopRequest

        self.stop = StopRequest()
        self.stop.install(list(self.cfg.stop_signals))
        try:
            with self._held:
                return self._run()
        finally:
            self.stop.close()

    def _run(self) -> dict:
        from .data import make_loader

        self.setup()
        cfg, dist = self.cfg, self.dist
        if dist.world > 1:
            self.stop.watch_launchers()
        self.bad_resumed = 0
        self.data_offset = 0
        start = self.resume()
        self.reference_fingerprint = reference_fingerprint(self.models)
        logger = MetricsLogger(cfg, dist, start)
        if start:
            logger.message(f"resumed from step {start}")
        s = self.source.stats
        logger.message(
            f"data: {s.kept} pairs ({s.ties_dropped} ties dropped, {s.swapped} loser-first rows "
            f"swapped); world {dist.world}, {cfg.train_batch_size_per_gpu} pair(s)/micro-batch, "
            f"accumulation {cfg.gradient_accumulation_steps}, lr {self.lr:.3g}"
        )
        logger.message(self.inputs_note)
        accum = cfg.gradient_accumulation_steps
        if self.sources["latents"] == "cache":
            it = self._cached_batches(self.data_step(start), self.data_step(cfg.max_steps))
        else:
            loader = make_loader(
                self.dataset,
                self.order,
                start=self.data_step(start),
                stop=self.data_step(cfg.max_steps),
                num_workers=cfg.dataloader_num_workers,
            )
            it = iter(loader)
        self.bad_total = 0
        skipped_in_a_row = 0
        step = start
        last_record: dict = {}
        try:
            while step < cfg.max_steps:
                step += 1
                t0 = time.perf_counter()
                sums = torch.zeros(METRIC_SLOTS, dtype=torch.float64, device=dist.device)
                bad_loss = torch.zeros((), dtype=torch.bool, device=dist.device)
                own_norm = None
                for m in range(accum):
                    batch = next(it)
                    if batch.bad:
                        self.bad_total += len(batch.bad)
                        for _, why in batch.bad:
                            logger.message(f"warning: skipping a bad pair: {why}")
                            warnings.warn(f"skipping a bad pair: {why}", stacklevel=1)
                    loss, metrics = self._micro_step(batch, step)
                    bad_loss |= ~torch.isfinite(loss.detach())  # on the device: no sync here
                    self.engine.backward(loss)
                    sums += _metric_vector(metrics, sums)
                    if m == accum - 1:  # the boundary: one host sync and one collective
                        own_norm = self._norm_and_clip()
                        self._debug_freeze(step)
                        if dist.world > 1:
                            beat(cfg.output_dir, dist.rank, step)
                        self._check_before_step(bad_loss, own_norm, sums, step)
                    skipped_before = self._skipped_steps()
                    self.engine.step()
                grad_norm = self._grad_norm()
                if grad_norm is None and own_norm is not None:
                    grad_norm = float(own_norm)
                action, skipped_in_a_row = guard_decision(
                    finite_norm=grad_norm is None or math.isfinite(grad_norm),
                    overflow=self._skipped_steps() > skipped_before,
                    skipped_in_a_row=skipped_in_a_row,
                    limit=cfg.max_skipped_steps,
                )
                if action == "stop":
                    what = (
                        f"{skipped_in_a_row} optimizer steps in a row skipped for fp16 overflow"
                        if skipped_in_a_row > cfg.max_skipped_steps
                        else "non-finite gradient norm"
                    )
                    raise NonFiniteError(
                        f"{what} at step {step}; stopped, nothing saved "
                        f"(the last good checkpoint is {self._last_tag()})"
                    )
                if action == "skipped":
                    logger.message(
                        f"step {step}: fp16 loss-scale overflow, DeepSpeed skipped the update "
                        f"({skipped_in_a_row} in a row; the limit is {cfg.max_skipped_steps})"
                    )
                sums = sums.cpu()
                sums[METRIC_SLOTS - 1] = self.bad_total
                sums[METRIC_SLOTS - 2] = float(self.stop.reason is not None)
                all_reduce(sums)  # also how every rank learns that one was asked to stop
                sums = sums.tolist()  # the one read of this step's metrics
                dt = time.perf_counter() - t0
                last_record = _record(sums, step, self.order.position(self.data_step(step) - 1)[0])
                last_record.update(
                    grad_norm=grad_norm if grad_norm is not None else float("nan"),
                    lr=float(self.engine.get_lr()[0]),
                    pairs_per_s=float(sums[1]) / dt if dt > 0 else float("nan"),
                    # pairs skipped for bad images since the run began (resumes included)
                    bad_images=int(sums[METRIC_SLOTS - 1]) + self.bad_resumed,
                    skipped_step=action == "skipped",
                    seconds=dt,
                )
                if torch.cuda.is_available() and dist.device.type == "cuda":
                    last_record["gpu_mem_gb"] = torch.cuda.max_memory_allocated() / 2**30
                logger.log(last_record)
                saved = bool(cfg.checkpoint_every and step % cfg.checkpoint_every == 0)
                if saved:
                    self.save(step)
                if sums[METRIC_SLOTS - 2] > 0:  # some rank was asked to stop: all stop here
                    if not saved:
                        self.save(step)
                    why = self.stop.reason or "another process was asked to stop"
                    raise Preempted(
                        f"{why}: stopped after step {step} with checkpoint {tag_name(step)} "
                        f"written; run the same command again to resume (exit {PREEMPTED_EXIT})"
                    )
                if cfg.debug_hang_at_step is not None and step == cfg.debug_hang_at_step:
                    logger.message(f"debug: hanging after step {step} (debug_hang_at_step)")
                    time.sleep(3600)
                if cfg.export_every and step % cfg.export_every == 0 and step < cfg.max_steps:
                    self.export(step, final=False)
            if not (cfg.checkpoint_every and step % cfg.checkpoint_every == 0) and step > start:
                self.save(step)
            out = self.export(step, final=True)
        except (Preempted, NonFiniteError):
            raise
        except Exception as err:  # noqa: BLE001 - only timeouts are re-worded
            if dist.world > 1 and is_timeout(err):
                behind = stale_ranks(cfg.output_dir, dist.world, step)
                raise DistributedError(
                    f"rank {dist.rank}: a collective at step {step} timed out after "
                    f"{cfg.dist_timeout_s:g} s (dist_timeout_s): "
                    + (
                        f"{', '.join(behind)} stopped answering"
                        if behind
                        else "no rank is behind this one (a peer failed inside the step)"
                    )
                ) from err
            raise
        finally:
            logger.close()
            with contextlib.suppress(Exception):
                del it
        if self.reference_fingerprint != reference_fingerprint(self.models):
            raise RuntimeError("the reference changed during training (it must stay frozen)")
        return {"step": step, "export": str(out) if out else None, "last": last_record}

    def _last_tag(self) -> str:
        from .checkpoints import complete_tags

        tags = complete_tags(checkpoint_dir(self.cfg))
        return tags[-1] if tags else "none"

    def _debug_freeze(self, step: int) -> None:
        """Test hook: the last rank stops itself (SIGSTOP) at ``debug_freeze_at_step``."""
        if self.cfg.debug_freeze_at_step == step and self.dist.rank == self.dist.world - 1:
            import signal as _signal

            os.kill(os.getpid(), _signal.SIGSTOP)

    def _norm_and_clip(self) -> torch.Tensor | None:
        """ZeRO-0 fp32 (:func:`clips_itself`): the global gradient norm as a device tensor, in
        one foreach pass that also clips to ``max_grad_norm`` (gradients are whole and, with
        several processes, already averaged at the boundary). None elsewhere: DeepSpeed
        reports its own norm after the step."""
        if not clips_itself(self.cfg):
            return None
        params = [p for p in self.engine.module.parameters() if p.grad is not None]
        if not params:
            return None
        if self.cfg.max_grad_norm > 0:
            return torch.nn.utils.clip_grad_norm_(params, self.cfg.max_grad_norm, foreach=True)
        return torch.nn.utils.get_total_norm([p.grad for p in params], foreach=True)

    def _check_before_step(self, bad_loss, own_norm, sums, step: int) -> None:
        """Stop before the update when any rank saw a non-finite loss (or, with our own norm,
        a non-finite gradient): one device-to-host copy and one all-reduce per optimizer step."""
        bad_norm = ~torch.isfinite(own_norm) if own_norm is not None else torch.zeros_like(bad_loss)
        flags = torch.stack([bad_loss, bad_norm]).to(torch.float64).cpu()
        all_reduce(flags)
        if float(flags[0]) > 0:
            mean = float(sums[0] / sums[1]) if float(sums[1]) > 0 else float("nan")
            raise NonFiniteError(
                f"non-finite loss ({mean}) at step {step}; stopped before the update, nothing "
                f"saved (the last good checkpoint is {self._last_tag()})"
            )
        if float(flags[1]) > 0:
            raise NonFiniteError(
                f"non-finite gradient norm at step {step}; stopped before the update, nothing "
                f"saved (the last good checkpoint is {self._last_tag()})"
            )

    def _skipped_steps(self) -> int:
        """DeepSpeed's count of optimizer steps skipped for a loss-scale overflow (fp16)."""
        return int(getattr(self.engine, "skipped_steps", 0) or 0)

    def _grad_norm(self) -> float | None:
        g = self.engine.get_global_grad_norm()
        if g is None:
            return None
        return float(g.item() if isinstance(g, torch.Tensor) else g)


METRIC_SLOTS = 12


def _metric_vector(m: dict, like: torch.Tensor) -> torch.Tensor:
    """The sums over micro-batches (and ranks) of one micro-batch, on ``like``'s device with no
    host synchronisation: loss·P, P, acc_c·n_c, n_c, acc_u·n_u, n_u, logp·P, mse_policy·P,
    mse_ref·P, micro-batches, and two slots the loop fills: stop requested, bad images."""

    def g(k):
        v = m.get(k)
        if v is None:
            return torch.zeros((), dtype=like.dtype, device=like.device)
        return torch.nan_to_num(v.detach().to(like.device, like.dtype).reshape(()), nan=0.0)

    p, n_c, n_u = g("pairs"), g("count_cond"), g("count_uncond")
    one = torch.ones((), dtype=like.dtype, device=like.device)
    return torch.stack(
        [
            g("loss") * p,
            p,
            g("accuracy_cond") * n_c,
            n_c,
            g("accuracy_uncond") * n_u,
            n_u,
            g("logp_proxy") * p,
            g("mse_policy") * p,
            g("mse_ref") * p,
            one,
            torch.zeros_like(one),
            torch.zeros_like(one),
        ]
    )


def _record(s: list[float], step: int, epoch: int) -> dict:
    def div(a, b):
        return float(a / b) if b > 0 else float("nan")

    return {
        "step": step,
        "epoch": epoch,
        "loss": div(s[0], s[1]),
        "pairs": int(s[1]),
        "accuracy_cond": div(s[2], s[3]),
        "accuracy_uncond": div(s[4], s[5]),
        "pairs_cond": int(s[3]),
        "pairs_uncond": int(s[5]),
        "logp_proxy": div(s[6], s[1]),
        "mse_policy": div(s[7], s[1]),
        "mse_ref": div(s[8], s[1]),
    }


def run(cfg: TrainConfig) -> dict:
    """Train per ``cfg``; NonFiniteError / ResumeError / ConfigError on failure."""
    try:
        return Trainer(cfg).run()
    finally:
        sys.stdout.flush()
