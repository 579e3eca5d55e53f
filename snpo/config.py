"""The trainer's one typed configuration: YAML in, ``--key value`` overrides, validated up front.

    cfg = load_config("snpo/configs/tiny_cpu.yaml", ["--max_steps", "10", "--objective", "dpo"])

Every field is a flat attribute of :class:`TrainConfig`; its help text lives in the field's
metadata (``docs/trainer.md`` is generated from it by :func:`options_table`). Validation names
the field in every message. YAML is read with ``yaml.safe_load`` only.

Objective presets (``docs/objectives.md``):

| objective  | swap                    | lam default | reference |
| ---------- | ----------------------- | ----------- | --------- |
| sft        | –                       | –           | none: noise-prediction MSE on the winners |
| dpo        | none                    | 1           | Diffusion-DPO |
| bdpo       | none                    | 0.9         | Bounded DPO |
| npo        | all pairs               | 1           | Diffusion-NPO negative model |
| snpo_naive | null-prompt-branch pairs| 1           | naive Diff-SNPO |
| snpo       | null-prompt-branch pairs| 0.9         | Diff-SNPO |

Length (~900 lines, on purpose one module): the fields with their help texts are the source of
the options table, and each field's checks sit beside it in :func:`validate`; splitting them
would put an option's meaning and its refusal in two places.

``beta`` uses the Diffusion-DPO code's convention, ``-logsigmoid(-0.5·β·(model_diff − ref_diff))``:
diffusers' DPO example's ``beta_dpo=2500`` is ``beta: 5000`` here, Diffusion-NPO's SD1.5
``beta=500`` is ``beta: 1000`` here.
"""

from __future__ import annotations

import dataclasses
import difflib
import glob
import hashlib
import json
import os
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import yaml

OBJECTIVES = ("sft", "dpo", "bdpo", "npo", "snpo_naive", "snpo")


@dataclass(frozen=True)
class Preset:
    """swap: "none" | "all" | "null" (pairs drawn on the null-prompt branch); lam default."""

    swap: str
    lam: float
    uses_reference: bool = True


PRESETS: dict[str, Preset] = {
    "sft": Preset("none", 1.0, uses_reference=False),
    "dpo": Preset("none", 1.0),
    "bdpo": Preset("none", 0.9),
    "npo": Preset("all", 1.0),
    "snpo_naive": Preset("null", 1.0),
    "snpo": Preset("null", 0.9),
}


class ConfigError(ValueError):
    """An invalid configuration; the message names the offending field."""


def _f(default: Any = dataclasses.MISSING, help: str = "", **kw) -> Any:  # noqa: A002
    if isinstance(default, list):
        value = list(default)
        return field(default_factory=lambda: list(value), metadata={"help": help}, **kw)
    return field(default=default, metadata={"help": help}, **kw)


# Fields whose change does not alter the training trajectory (a resumed run may change them).
NON_TRAJECTORY_FIELDS = frozenset(
    {
        "max_steps",
        "output_dir",
        "checkpoint_every",
        "keep_checkpoints",
        "export_every",
        "log_every",
        "report_to",
        "wandb_project",
        "dataloader_num_workers",
        "resume",
        "allow_outside_paths",
        "overwrite",
        "trust_checkpoint",
        "max_skipped_steps",
        "progress_bar",
        "debug_nan_at_step",
        "debug_hang_at_step",
        "debug_fail_at_step",
        "debug_freeze_at_step",
        "debug_fail_rank",
        "debug_overflow_at_step",
        "stop_signals",
        "dist_timeout_s",
        # where e_ref / latents / embeddings come from: the same values up to float rounding
        # (a resume that switches source warns that it is then not bit-exact)
        "ref_mode",
        "cache_dir",
        "cache_use",
        "offload_nvme_path",  # where the nvme offload lives, not what is computed
        # validation images are sampled outside the trajectory (snpo.trainer.validation)
        "validation_prompts",
        "validation_every",
        "validation_cfg",
        "validation_steps",
        "validation_seed",
        "validation_negative",
    }
)


@dataclass
class TrainConfig:
    """All options of ``snpo train`` (see docs/trainer.md for the generated table)."""

    # --- model -------------------------------------------------------------------------
    model: str = _f(
        "",
        "diffusers model folder or hub id: SD1.5-, SDXL-, SD3/SD3.5- or FLUX.1-dev-class "
        "(docs/flow.md for the flow-matching families)",
    )
    revision: str | None = _f(None, "hub revision of `model`")
    variant: str | None = _f(None, 'weights variant of `model` (e.g. "fp16")')
    # --- objective ---------------------------------------------------------------------
    objective: Literal["sft", "dpo", "bdpo", "npo", "snpo_naive", "snpo"] = _f(
        "snpo", "preset of the preference loss (table in the module docstring of snpo.config)"
    )
    beta: float = _f(
        5000.0,
        "KL strength, Diffusion-DPO code convention (diffusers' beta_dpo=2500 is 5000 here); "
        "Diff-SNPO: 2000 for SD1.5, 5000 for SDXL",
    )
    lam: float | None = _f(
        None,
        "Bounded-DPO mixture weight in (0, 1]; default from the preset (0.9 bdpo/snpo, else 1)",
    )
    uncond_prob: float = _f(
        0.1, "probability that a pair uses the null-prompt branch (CFG dropout), in [0, 1]"
    )
    weighting: Literal["constant", "elbo"] = _f(
        "constant",
        'per-pair weight: "constant" = 1 (Diffusion-DPO code) or "elbo" = T·ω(t), '
        "ω(t) = β_t / (2·α_t·(1 − ᾱ_t)) (DDPM ELBO weight, σ_t² = β_t); flow-matching "
        "families: (1 − σ)/σ, the ELBO weight in velocity units (docs/flow.md)",
    )
    # --- flow matching (SD3/SD3.5, FLUX) ------------------------------------------------
    flow_sigma_sampler: Literal["logit_normal", "uniform", "mode"] = _f(
        "logit_normal",
        "how σ is drawn from the pair's uniform u: logit-normal (SD3's training), uniform, or "
        "SD3's mode sampling",
    )
    flow_logit_mean: float = _f(0.0, "logit_normal: mean of logit(σ)")
    flow_logit_std: float = _f(1.0, "logit_normal: standard deviation of logit(σ)")
    flow_mode_scale: float = _f(1.29, "mode sampling: its scale")
    flow_shift: float | None = _f(
        None,
        "timestep shift σ' = sσ/(1 + (s − 1)σ) after sampling; null = the training scheduler's "
        "static shift (3.0 for SD3.5), 1 = none",
    )
    guidance_scale: float = _f(
        3.5,
        "FLUX.1-dev-class (guidance-distilled) models: the embedded guidance the denoiser gets "
        "while training",
    )
    # --- data --------------------------------------------------------------------------
    train_data: list[str] = _f(
        [],
        "Pick-a-Pic parquet files/globs, a hub dataset id, or a JSONL/CSV of own pairs "
        "(columns winner, loser, prompt; image paths relative to the file)",
    )
    data_format: Literal["auto", "pickapic", "pairs", "hub"] = _f(
        "auto", "how to read train_data (auto: by extension; an owner/name that is no file → hub)"
    )
    data_split: str = _f("train", "split of a hub dataset")
    max_train_pairs: int | None = _f(None, "use only the first N (non-tie) pairs")
    data_order: Literal["global", "windowed"] = _f(
        "global",
        "pair order per epoch: global (every pair shuffled: one parquet row-group read per "
        "pair) or windowed (row groups shuffled, pairs shuffled within data_window_row_groups "
        "of them: each row group read once; for Pick-a-Pic-scale parquet)",
    )
    data_window_row_groups: int = _f(
        8,
        "windowed order: row groups shuffled together and kept per DataLoader worker (larger: "
        "better shuffle, more memory: about K × 33 MB per worker for Pick-a-Pic)",
    )
    resolution: int = _f(512, "training resolution (pixels, square)")
    num_frames: int = _f(
        1,
        "frames per training clip: 1 = image pairs; F > 1 (video families, F = 4k + 1 for wan) "
        "= the pairs' images are animated GIF/WebP/PNG clips, F evenly spaced frames of each "
        "(fewer frames: a bad image); one crop and flip per clip (docs/flow.md, Wan2.x)",
    )
    resolution_buckets: str | list[str] | None = _f(
        None,
        "aspect-ratio buckets: null = the square resolution crop; auto = buckets of about "
        "resolution² pixels, sides in [R/2, 2R] on a grid of 64 (the model's size multiple "
        "below R 256); or a list of sizes WxH (multiples of the VAE factor × the denoiser's "
        "downsampling). A pair trains at the bucket nearest its log-aspect, resized to cover "
        "and cropped; batches hold one bucket (docs/trainer.md, Aspect-ratio buckets)",
    )
    random_crop: bool = _f(False, "random crop (else center crop) after resizing the shorter side")
    random_flip: bool = _f(
        True, "random horizontal flip, drawn independently for winner and loser (DiffusionDPO)"
    )
    on_bad_image: Literal["skip", "fail"] = _f(
        "skip", "a corrupt/missing image: skip the pair (counted, warned) or fail naming it"
    )
    allow_outside_paths: bool = _f(
        False,
        "let image paths in own pairs (JSONL/CSV) and dataset rows be absolute or leave their "
        "file's folder (default: they resolve against that folder, symlinks too, and must stay "
        "inside it)",
    )
    # --- LoRA --------------------------------------------------------------------------
    lora_rank: int = _f(0, "LoRA rank; 0 = full fine-tune")
    lora_alpha: float | None = _f(None, "LoRA alpha (default: lora_rank)")
    lora_targets: list[str] = _f(
        ["to_q", "to_k", "to_v", "to_out.0"],
        "denoiser (UNet / transformer) module names that get LoRA adapters (SD3/FLUX: also the "
        "context projections, see snpo/configs/sd35m_snpo_lora.yaml)",
    )
    # --- optimisation ------------------------------------------------------------------
    learning_rate: float = _f(1e-5, "the optimizer's learning rate (before scale_lr)")
    scale_lr: bool = _f(
        False,
        "multiply learning_rate by the effective batch (micro × accum × world), as DiffusionDPO",
    )
    lr_warmup_steps: int = _f(0, "linear warm-up steps")
    lr_schedule: Literal["constant", "cosine", "linear"] = _f(
        "constant", "learning-rate schedule after warm-up"
    )
    adam_beta1: float = _f(0.9, "AdamW β1")
    adam_beta2: float = _f(0.999, "AdamW β2")
    adam_eps: float = _f(1e-8, "AdamW ε")
    weight_decay: float = _f(1e-2, "AdamW weight decay (DiffusionDPO: 1e-2)")
    max_grad_norm: float = _f(1.0, "gradient clipping (DeepSpeed gradient_clipping); 0 = off")
    optimizer: Literal["adamw", "adafactor", "adamw8bit"] = _f(
        "adamw",
        "adamw (torch), adafactor (transformers', factored second moment, fixed learning_rate: "
        "relative_step/scale_parameter/warmup_init off, as DiffusionDPO's SDXL runs) or "
        "adamw8bit (bitsandbytes' 8-bit moments; needs bitsandbytes)",
    )
    ema_decay: float = _f(
        0.0,
        "EMA of the trained weights, ema ← d·ema + (1 − d)·θ after every optimizer step, in "
        "fp32; export/ is then the EMA and export-raw/ the raw weights; 0 = off, in [0, 1)",
    )
    ema_start_step: int = _f(
        0, "optimizer steps during which the EMA just copies the weights before averaging"
    )
    max_steps: int = _f(1000, "optimizer steps to train")
    train_batch_size_per_gpu: int = _f(1, "preference pairs per micro-batch and process")
    gradient_accumulation_steps: int = _f(1, "micro-batches per optimizer step")
    # --- system ------------------------------------------------------------------------
    zero_stage: int = _f(0, "DeepSpeed ZeRO stage: 0, 1, 2 or 3")
    precision: Literal["fp32", "bf16", "fp16"] = _f(
        "fp32", "training precision (fp16 needs CUDA; bf16 works on CPU)"
    )
    offload_optimizer: Literal["none", "cpu", "nvme"] = _f(
        "none",
        "DeepSpeed ZeRO-Offload of the fp32 master weights and optimizer states (zero_stage ≥ 1; "
        "nvme: zero_stage 3 and offload_nvme_path)",
    )
    offload_param: Literal["none", "cpu", "nvme"] = _f(
        "none", "DeepSpeed ZeRO-3 offload of the partitioned weights (zero_stage 3 only)"
    )
    offload_nvme_path: str | None = _f(
        None, "a folder on a local NVMe drive for the nvme offloads (DeepSpeed's nvme_path)"
    )
    gradient_checkpointing: bool = _f(False, "denoiser (UNet / transformer) gradient checkpointing")
    attention: Literal["sdpa", "xformers"] = _f(
        "sdpa", "attention backend (xformers: CUDA only, optional extra)"
    )
    dataloader_num_workers: int = _f(2, "DataLoader worker processes (0 = decode in-process)")
    seed: int = _f(0, "seed of every draw (noise, timestep, branch, crop/flip, data order)")
    device: Literal["auto", "cpu", "cuda"] = _f("auto", "auto: CUDA when available, else CPU")
    backend: Literal["auto", "torch", "triton", "cuda"] = _f(
        "auto", "snpo_kernels backend of the loss"
    )
    ref_mode: Literal["live", "cache", "auto"] = _f(
        "auto",
        "where reference errors (and latents, prompt embeddings) come from: live = VAE, text "
        "encoders and reference forward every step; cache = read them from cache_dir (refuse to "
        "start when it does not match this config or lacks an epoch); auto = the cache when "
        "cache_dir holds a matching one, else live with a notice saying why",
    )
    cache_dir: str | None = _f(
        None, "a folder built by `snpo cache` for this config (ref_mode cache/auto)"
    )
    cache_use: list[str] | None = _f(
        None,
        "cache sections to read, of latents, text, ref; null = every one the cache holds that "
        "the objective needs (sft: latents, text); a list = exactly these (ref_mode cache: each "
        "required)",
    )
    # --- outputs -----------------------------------------------------------------------
    output_dir: str = _f("runs/snpo", "checkpoints/, export/, metrics.jsonl, tb/ go here")
    resume: str = _f(
        "auto",
        'resume: "auto" (latest checkpoint in output_dir/checkpoints if any), "never", or a '
        "checkpoint tag/folder",
    )
    overwrite: bool = _f(
        False,
        "a fresh start on an output_dir that holds another run: move its files aside into "
        "<output_dir>.replaced-<time>/ (without it the start is refused, exit 4)",
    )
    trust_checkpoint: bool = _f(
        False,
        "allow `resume` to name a checkpoint outside output_dir (checkpoints are pickles: only "
        "resume from folders you trust)",
    )
    checkpoint_every: int = _f(500, "save a DeepSpeed checkpoint every N steps (0 = only at end)")
    keep_checkpoints: int = _f(2, "keep the newest N checkpoints (0 = all)")
    export_every: int = _f(0, "write output_dir/export-<step> every N steps (0 = only the final)")
    log_every: int = _f(1, "log to TensorBoard/wandb every N steps (metrics.jsonl: every step)")
    report_to: Literal["tensorboard", "wandb", "none"] = _f(
        "tensorboard", "metrics sink besides metrics.jsonl"
    )
    wandb_project: str = _f("snpo", "wandb project (report_to: wandb)")
    progress_bar: bool = _f(True, "tqdm progress bar on rank 0")
    stop_signals: list[str] = _f(
        ["SIGTERM", "SIGINT", "SIGUSR1"],
        "signals that stop the run after the current optimizer step with a checkpoint (exit 8, "
        "resumable); [] = the default actions",
    )
    dist_timeout_s: float = _f(
        600.0,
        "seconds a collective waits for the other processes before the run stops naming the "
        "ranks that fell behind (exit 7)",
    )
    max_skipped_steps: int = _f(
        20,
        "fp16: consecutive optimizer steps DeepSpeed may skip for a loss-scale overflow before "
        "the run stops as non-finite (exit 3)",
    )
    debug_nan_at_step: int | None = _f(
        None, "test hook: make the loss NaN at this step (checks the non-finite guard)"
    )
    debug_hang_at_step: int | None = _f(
        None, "test hook: sleep after this step's checkpoint (lets a test SIGKILL mid-run)"
    )
    debug_fail_at_step: int | None = _f(
        None, "test hook: rank 0 alone raises an I/O error at this step (checks that no rank hangs)"
    )
    debug_overflow_at_step: int | None = _f(
        None, "test hook: scale the loss by 1e4 at this step (fp16: forces a loss-scale overflow)"
    )
    debug_fail_rank: int = _f(0, "test hook: the rank that debug_fail_at_step makes fail")
    debug_freeze_at_step: int | None = _f(
        None, "test hook: the last rank stops itself (SIGSTOP) at this step (checks dist_timeout_s)"
    )
    # --- validation (snpo.trainer.validation; docs/trainer.md "Validation images") -------
    validation_prompts: str | list[str] = _f(
        [],
        "prompts of the validation grid: a list, or a text file with one prompt per line; "
        "[] = no validation",
    )
    validation_every: int = _f(
        0,
        "sample the grid into output_dir/samples/step_<N>.png every N steps, at step 0 of a "
        "fresh run and at the end (0 = off)",
    )
    validation_cfg: list[float] = _f(
        [1.0, 7.5], "guidance scales of the grid's columns (each > 0; 1 = no CFG)"
    )
    validation_steps: int = _f(25, "sampler steps per validation image (the family's sampler)")
    validation_seed: int = _f(
        0, "prompt i's initial noise is seeded validation_seed + i (the same at every validation)"
    )
    validation_negative: str | None = _f(
        None,
        "a negative model (export or model folder) as the grid's unconditional branch "
        "(Diffusion-NPO); null = the policy's own null branch",
    )

    # ------------------------------------------------------------------------------------
    @property
    def preset(self) -> Preset:
        return PRESETS[self.objective]

    @property
    def effective_lam(self) -> float:
        return self.preset.lam if self.lam is None else float(self.lam)

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    def fingerprint(self) -> str:
        """A hash of the fields that shape the training trajectory (resume compatibility)."""
        d = {k: v for k, v in self.to_dict().items() if k not in NON_TRAJECTORY_FIELDS}
        d["lam"] = self.effective_lam
        return hashlib.sha256(json.dumps(d, sort_keys=True, default=str).encode()).hexdigest()[:16]

    def trajectory_dict(self) -> dict:
        d = {k: v for k, v in self.to_dict().items() if k not in NON_TRAJECTORY_FIELDS}
        d["lam"] = self.effective_lam
        return d


FIELDS = {f.name: f for f in dataclasses.fields(TrainConfig)}
_HINTS = typing.get_type_hints(TrainConfig)


# --------------------------------------------------------------------------------------------
# type coercion
def _type_name(tp) -> str:
    origin = typing.get_origin(tp)
    if origin is Literal:
        return " | ".join(repr(a) for a in typing.get_args(tp))
    if origin in (typing.Union, types.UnionType):
        return " | ".join(_type_name(a) for a in typing.get_args(tp))
    if origin is list:
        return f"list[{_type_name(typing.get_args(tp)[0])}]"
    if tp is type(None):
        return "null"
    return getattr(tp, "__name__", str(tp))


def _coerce(name: str, tp, value: Any) -> Any:
    origin = typing.get_origin(tp)
    if origin in (typing.Union, types.UnionType):
        args = typing.get_args(tp)
        if value is None and type(None) in args:
            return None
        errors = []
        for a in args:
            if a is type(None):
                continue
            try:
                return _coerce(name, a, value)
            except ConfigError as err:
                errors.append(str(err))
        raise ConfigError(f"{name}: expected {_type_name(tp)}, got {value!r}")
    if origin is Literal:
        choices = typing.get_args(tp)
        if value not in choices:
            raise ConfigError(f"{name}: must be one of {list(choices)}, got {value!r}")
        return value
    if origin is list:
        (inner,) = typing.get_args(tp)
        if isinstance(value, str):
            value = [v.strip() for v in value.split(",") if v.strip()]
        if not isinstance(value, (list, tuple)):
            raise ConfigError(f"{name}: expected a list, got {value!r}")
        return [_coerce(f"{name}[{i}]", inner, v) for i, v in enumerate(value)]
    if tp is bool:
        if isinstance(value, bool):
            return value
        raise ConfigError(f"{name}: expected true or false, got {value!r}")
    if tp is int:
        if isinstance(value, int) and not isinstance(value, bool):
            return value
        if isinstance(value, float) and value.is_integer():
            return int(value)
        raise ConfigError(f"{name}: expected an integer, got {value!r}")
    if tp is float:
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return float(value)
        if isinstance(value, str):  # YAML 1.1 reads "1e-8" as a string
            try:
                return float(value)
            except ValueError:
                pass
        raise ConfigError(f"{name}: expected a number, got {value!r}")
    if tp is str:
        if isinstance(value, str):
            return value
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return str(value)
        raise ConfigError(f"{name}: expected a string, got {value!r}")
    raise ConfigError(f"{name}: unsupported type {tp}")  # pragma: no cover


def _unknown(key: str) -> ConfigError:
    close = difflib.get_close_matches(key, FIELDS, n=1)
    hint = f" (did you mean {close[0]!r}?)" if close else ""
    return ConfigError(f"unknown option {key!r}{hint}; see docs/trainer.md for the options")


def from_dict(values: dict) -> TrainConfig:
    """A TrainConfig from a mapping (YAML or overrides), type-checked field by field."""
    kwargs = {}
    for key, value in values.items():
        if key not in FIELDS:
            raise _unknown(key)
        kwargs[key] = _coerce(key, _HINTS[key], value)
    return TrainConfig(**kwargs)


# --------------------------------------------------------------------------------------------
# CLI
def parse_overrides(argv: list[str]) -> tuple[str | None, dict]:
    """``--config C.yaml --key value --key=value`` → (config path, overrides). Values are read as
    YAML scalars/flow lists ("1e-8", "true", "[a, b]"). ``--local_rank`` (added by the
    deepspeed launcher) is accepted and ignored: LOCAL_RANK comes from the environment."""
    config_path = None
    out: dict = {}
    i = 0
    while i < len(argv):
        arg = argv[i]
        if not arg.startswith("--"):
            raise ConfigError(f"unexpected argument {arg!r}: options are --key value")
        key, eq, value = arg[2:].partition("=")
        name = key.replace("-", "_")
        if (
            not eq
            and _HINTS.get(name) is bool
            and (i + 1 >= len(argv) or argv[i + 1].startswith("--"))
        ):
            out[name] = True  # a bare --flag of a boolean option
            i += 1
            continue
        if not eq:
            if i + 1 >= len(argv) or argv[i + 1].startswith("--"):
                raise ConfigError(f"option --{key} needs a value")
            value = argv[i + 1]
            i += 1
        i += 1
        key = key.replace("-", "_")
        if key == "local_rank":
            continue
        if key == "config":
            config_path = value
            continue
        if key not in FIELDS:
            raise _unknown(key)
        tp = _HINTS[key]
        if tp is str:
            parsed: Any = value
        elif tp == (str | None):
            parsed = None if value.lower() in ("null", "none", "~") else value
        else:
            try:
                parsed = yaml.safe_load(value) if value != "" else ""
            except yaml.YAMLError:
                parsed = value
        out[key] = parsed
    return config_path, out


def load_config(
    path: str | Path | None = None,
    overrides: list[str] | dict | None = None,
    *,
    check_files: bool = True,
) -> TrainConfig:
    """Read YAML (``path``), apply overrides (argv list or dict), validate, return the config."""
    values: dict = {}
    if isinstance(overrides, list):
        cli_path, overrides = parse_overrides(overrides)
        path = path or cli_path
    if path is not None:
        p = Path(path)
        if not p.is_file():
            raise ConfigError(f"config: file {str(p)!r} does not exist")
        loaded = yaml.safe_load(p.read_text())
        if loaded is None:
            loaded = {}
        if not isinstance(loaded, dict):
            raise ConfigError(f"config: {p} must be a YAML mapping of options")
        values.update(loaded)
    values.update(overrides or {})
    cfg = from_dict(values)
    validate(cfg, check_files=check_files)
    return cfg


# --------------------------------------------------------------------------------------------
# validation
def _vae_factor(model: str) -> int | None:
    """Pixels per latent pixel from a local model's vae/config.json (None when unknown)."""
    f = Path(model) / "vae" / "config.json"
    if Path(model).is_dir():
        if not f.is_file():
            return 1
        n = len(json.loads(f.read_text()).get("block_out_channels", [0] * 4))
        return 2 ** (n - 1)
    return 8 if model else None


def expand_data_files(patterns: list[str]) -> list[str]:
    """Globs expanded (sorted); plain paths kept; hub ids kept."""
    out = []
    for pat in patterns:
        if any(c in pat for c in "*?["):
            out.extend(sorted(glob.glob(pat, recursive=True)))
        else:
            out.append(pat)
    return out


def _looks_like_hub_id(s: str) -> bool:
    return "/" in s and not os.path.exists(s) and not s.startswith((".", "/")) and s.count("/") == 1


def validate(cfg: TrainConfig, *, check_files: bool = True) -> None:
    """Raise ConfigError naming the field of the first problem found."""
    if not cfg.model:
        raise ConfigError("model: required (a diffusers model folder or a hub id)")
    if not cfg.beta > 0 or cfg.beta == float("inf"):
        raise ConfigError(f"beta: must be a finite number > 0, got {cfg.beta}")
    if not 0.0 < cfg.flow_logit_std < float("inf"):
        raise ConfigError(f"flow_logit_std: must be a finite number > 0, got {cfg.flow_logit_std}")
    if cfg.flow_shift is not None and not 0.0 < cfg.flow_shift < float("inf"):
        raise ConfigError(
            f"flow_shift: must be a finite number > 0 (1 = none), got {cfg.flow_shift}"
        )
    if not 0.0 <= cfg.guidance_scale < float("inf"):
        raise ConfigError(f"guidance_scale: must be a finite number ≥ 0, got {cfg.guidance_scale}")
    if cfg.lam is not None and not 0.0 < cfg.lam <= 1.0:
        raise ConfigError(f"lam: must lie in (0, 1] (1 = unbounded DPO), got {cfg.lam}")
    if not 0.0 <= cfg.uncond_prob <= 1.0:
        raise ConfigError(f"uncond_prob: must lie in [0, 1], got {cfg.uncond_prob}")
    if cfg.zero_stage not in (0, 1, 2, 3):
        raise ConfigError(f"zero_stage: must be 0, 1, 2 or 3, got {cfg.zero_stage}")
    positive = (
        "resolution",
        "max_steps",
        "train_batch_size_per_gpu",
        "gradient_accumulation_steps",
    )
    for name in positive:
        if getattr(cfg, name) < 1:
            raise ConfigError(f"{name}: must be ≥ 1, got {getattr(cfg, name)}")
    for name in (
        "lora_rank",
        "lr_warmup_steps",
        "dataloader_num_workers",
        "checkpoint_every",
        "export_every",
        "keep_checkpoints",
        "max_skipped_steps",
    ):
        if getattr(cfg, name) < 0:
            raise ConfigError(f"{name}: must be ≥ 0, got {getattr(cfg, name)}")
    if cfg.log_every < 1:
        raise ConfigError(f"log_every: must be ≥ 1, got {cfg.log_every}")
    if cfg.max_train_pairs is not None and cfg.max_train_pairs < 1:
        raise ConfigError(f"max_train_pairs: must be ≥ 1, got {cfg.max_train_pairs}")
    if isinstance(cfg.data_window_row_groups, bool) or cfg.data_window_row_groups < 1:
        raise ConfigError(
            f"data_window_row_groups: must be an integer ≥ 1, got {cfg.data_window_row_groups!r}"
        )
    if not isinstance(cfg.allow_outside_paths, bool):
        raise ConfigError(
            f"allow_outside_paths: must be true or false, got {cfg.allow_outside_paths!r}"
        )
    if not cfg.learning_rate > 0:
        raise ConfigError(f"learning_rate: must be > 0, got {cfg.learning_rate}")
    import signal as _signal

    bad_signals = [
        n
        for n in cfg.stop_signals
        if not isinstance(getattr(_signal, str(n), None), _signal.Signals)
    ]
    if bad_signals or any(n in ("SIGKILL", "SIGSTOP") for n in cfg.stop_signals):
        raise ConfigError(
            f"stop_signals: {bad_signals or cfg.stop_signals} — name catchable signals such as "
            "SIGTERM, SIGINT, SIGUSR1"
        )
    if not cfg.dist_timeout_s > 0:
        raise ConfigError(f"dist_timeout_s: must be > 0, got {cfg.dist_timeout_s}")
    if cfg.max_grad_norm < 0:
        raise ConfigError(f"max_grad_norm: must be ≥ 0, got {cfg.max_grad_norm}")
    if cfg.weight_decay < 0:
        raise ConfigError(f"weight_decay: must be ≥ 0, got {cfg.weight_decay}")
    for name in ("adam_beta1", "adam_beta2"):
        if not 0.0 <= getattr(cfg, name) < 1.0:
            raise ConfigError(f"{name}: must lie in [0, 1), got {getattr(cfg, name)}")
    if not cfg.adam_eps > 0:
        raise ConfigError(f"adam_eps: must be > 0, got {cfg.adam_eps}")
    if cfg.lora_alpha is not None and cfg.lora_alpha <= 0:
        raise ConfigError(f"lora_alpha: must be > 0, got {cfg.lora_alpha}")
    if cfg.lora_rank > 0 and not cfg.lora_targets:
        raise ConfigError("lora_targets: at least one module name is needed when lora_rank > 0")
    if cfg.objective == "sft" and cfg.lam is not None and cfg.lam != 1.0:
        raise ConfigError("lam: the sft objective has no preference term; leave lam unset")
    if cfg.weighting == "elbo" and cfg.objective == "sft":
        raise ConfigError("weighting: elbo applies to preference objectives, not sft")
    _validate_cache_options(cfg)
    _validate_frames(cfg)
    _validate_buckets(cfg, check_files=check_files)
    _validate_memory_options(cfg)
    _validate_system(cfg)
    _validate_validation(cfg, check_files=check_files)
    if check_files:
        _validate_files(cfg)


CACHE_SECTIONS = ("latents", "text", "ref")


def _validate_cache_options(cfg: TrainConfig) -> None:
    if cfg.ref_mode == "cache" and not cfg.cache_dir:
        raise ConfigError(
            "cache_dir: ref_mode 'cache' needs cache_dir, a folder built by `snpo cache` "
            "(or use ref_mode auto / live)"
        )
    if cfg.cache_use is None:
        return
    bad = [u for u in cfg.cache_use if u not in CACHE_SECTIONS]
    if bad:
        raise ConfigError(
            f"cache_use: unknown section(s) {bad}; choose from {list(CACHE_SECTIONS)} (or null "
            "for every section the cache holds)"
        )
    if not cfg.cache_use:
        raise ConfigError(
            "cache_use: name at least one of latents, text, ref (or null for every section the "
            "cache holds)"
        )
    if cfg.ref_mode == "cache":
        if cfg.preset.uses_reference and "ref" not in cfg.cache_use:
            raise ConfigError(
                "cache_use: ref_mode 'cache' reads the reference errors from the cache, so "
                "cache_use must include ref (or use ref_mode auto: cached latents/text, live "
                "reference)"
            )
        if not cfg.preset.uses_reference and not {"latents", "text"} & set(cfg.cache_use):
            raise ConfigError(
                "cache_use: sft reads no reference errors; with ref_mode 'cache' name latents "
                "and/or text"
            )


def _validate_frames(cfg: TrainConfig) -> None:
    """``num_frames`` ≥ 1; clips (F > 1) not with cached latents / reference errors (they hold
    one-frame latents). The family's frame axis and 4k + 1 are checked with the model folder
    (:func:`check_frames`)."""
    if cfg.num_frames < 1:
        raise ConfigError(f"num_frames: must be ≥ 1 (1 = image pairs), got {cfg.num_frames}")
    reads_images = cfg.cache_use is None or set(cfg.cache_use) - {"text"}
    if cfg.num_frames > 1 and cfg.cache_dir and cfg.ref_mode != "live" and reads_images:
        raise ConfigError(
            f"num_frames: {cfg.num_frames} frames per clip, but a latents / reference-error "
            f"cache (cache_dir, cache_use {cfg.cache_use}) holds one-frame image latents; with "
            "clips set cache_use: [text], or ref_mode: live, or num_frames: 1"
        )


def check_frames(num_frames: int, family) -> str | None:
    """Why ``num_frames`` does not fit ``family`` (a :class:`snpo.models.ModelFamily`), or None:
    F > 1 needs a family with a frame axis, and F = k·factor + 1 for its VAE's temporal factor."""
    if num_frames == 1:
        return None
    factor = family.temporal_factor
    if not factor:
        return (
            f"num_frames: {num_frames}, but {family.name}-class models are image models (no "
            "frame axis); use num_frames: 1, or a video family (wan)"
        )
    if (num_frames - 1) % factor:
        lo = (num_frames - 1) // factor * factor + 1
        return (
            f"num_frames: {num_frames} does not fit the {family.name} VAE's temporal factor "
            f"{factor}: use {factor}k + 1 frames (e.g. {lo} or {lo + factor})"
        )
    return None


def _validate_buckets(cfg: TrainConfig, *, check_files: bool) -> None:
    """``resolution_buckets``: auto or WxH sizes, on the VAE factor's grid; not with the
    windowed order (a cache built for the bucketed config serves it: docs/cache.md)."""
    if cfg.resolution_buckets is None:
        return
    from snpo.data.buckets import AUTO, check_buckets, parse_buckets

    try:
        parsed = parse_buckets(cfg.resolution_buckets)
    except ValueError as err:
        raise ConfigError(f"resolution_buckets: {err}") from None
    if cfg.data_order == "windowed":
        raise ConfigError(
            "resolution_buckets: buckets make their own order (one bucket per micro-batch); "
            "they do not combine with data_order: windowed — use data_order: global"
        )
    factor = _vae_factor(cfg.model) if check_files else None
    if parsed != AUTO and factor:
        problem = check_buckets(parsed, factor)
        if problem:
            raise ConfigError(problem)


def _validate_memory_options(cfg: TrainConfig) -> None:
    """EMA, optimizer choice and ZeRO-Offload (the stages DeepSpeed supports them at)."""
    if not 0.0 <= cfg.ema_decay < 1.0:
        raise ConfigError(f"ema_decay: must lie in [0, 1) (0 = no EMA), got {cfg.ema_decay}")
    if cfg.ema_start_step < 0:
        raise ConfigError(f"ema_start_step: must be ≥ 0, got {cfg.ema_start_step}")
    if cfg.optimizer == "adamw8bit":
        import importlib.util

        if importlib.util.find_spec("bitsandbytes") is None:
            raise ConfigError(
                "optimizer: adamw8bit needs bitsandbytes, which is not installed "
                "(pip install bitsandbytes), or use optimizer: adamw / adafactor"
            )
    if cfg.offload_optimizer != "none" and cfg.zero_stage == 0:
        raise ConfigError(
            f"offload_optimizer: {cfg.offload_optimizer} needs a ZeRO optimizer (zero_stage 1, 2 "
            "or 3); zero_stage is 0"
        )
    if cfg.offload_optimizer == "nvme" and cfg.zero_stage != 3:
        raise ConfigError(
            f"offload_optimizer: nvme is ZeRO-Infinity, zero_stage 3 only (zero_stage is "
            f"{cfg.zero_stage}); use offload_optimizer: cpu"
        )
    if cfg.offload_param != "none" and cfg.zero_stage != 3:
        raise ConfigError(
            f"offload_param: {cfg.offload_param} offloads ZeRO-3's partitioned weights; it needs "
            f"zero_stage 3 (zero_stage is {cfg.zero_stage})"
        )
    if cfg.ema_decay > 0 and cfg.offload_param == "nvme":
        raise ConfigError(
            "ema_decay: the EMA averages the weight partitions each step, which offload_param: "
            "nvme keeps on disk; use offload_param: cpu (or none) with an EMA"
        )
    nvme = "nvme" in (cfg.offload_optimizer, cfg.offload_param)
    if nvme and not cfg.offload_nvme_path:
        raise ConfigError("offload_nvme_path: an nvme offload needs a folder on a local NVMe drive")
    if cfg.offload_nvme_path and not nvme:
        raise ConfigError(
            "offload_nvme_path: set, but neither offload_optimizer nor offload_param is nvme"
        )


def _validate_validation(cfg: TrainConfig, *, check_files: bool) -> None:
    """The validation images' options (:mod:`snpo.trainer.validation`)."""
    if cfg.validation_every < 0:
        raise ConfigError(
            f"validation_every: must be ≥ 0 (0 = no validation images), got {cfg.validation_every}"
        )
    if cfg.validation_every and not cfg.validation_prompts:
        raise ConfigError(
            f"validation_prompts: validation_every is {cfg.validation_every} but no prompt is "
            "given (a list of prompts or a text file with one per line)"
        )
    if not cfg.validation_cfg:
        raise ConfigError("validation_cfg: give at least one guidance scale, e.g. [1.0, 7.5]")
    bad = [s for s in cfg.validation_cfg if not 0.0 < s < float("inf")]
    if bad:
        raise ConfigError(f"validation_cfg: every guidance scale must be > 0 and finite, got {bad}")
    if cfg.validation_steps < 1:
        raise ConfigError(f"validation_steps: must be ≥ 1, got {cfg.validation_steps}")
    if isinstance(cfg.validation_prompts, list) and not all(
        p.strip() for p in cfg.validation_prompts
    ):
        raise ConfigError("validation_prompts: a prompt is empty")
    if not check_files:
        return
    prompts_file = cfg.validation_prompts if isinstance(cfg.validation_prompts, str) else ""
    if prompts_file and not os.path.isfile(prompts_file):
        raise ConfigError(
            f"validation_prompts: the prompts file {cfg.validation_prompts!r} does not exist "
            "(give a text file with one prompt per line, or a list of prompts)"
        )
    if cfg.validation_negative and not os.path.isdir(cfg.validation_negative):
        raise ConfigError(
            f"validation_negative: {cfg.validation_negative!r} is not a folder (give an snpo "
            "export or a diffusers model folder)"
        )


def _cuda_available() -> bool:
    try:
        import torch

        return torch.cuda.is_available()
    except ImportError:  # pragma: no cover
        return False


def _validate_system(cfg: TrainConfig) -> None:
    cuda = _cuda_available()
    if cfg.device == "cuda" and not cuda:
        raise ConfigError("device: 'cuda' was asked for but no CUDA device is available")
    on_cpu = cfg.device == "cpu" or not cuda
    if cfg.precision == "fp16" and on_cpu:
        raise ConfigError(
            "precision: fp16 is not supported on the CPU (DeepSpeed: 'Type fp16 is not "
            "supported'); use bf16 or fp32"
        )
    if cfg.attention == "xformers":
        import importlib.util

        if importlib.util.find_spec("xformers") is None:
            raise ConfigError(
                "attention: xformers was asked for but is not installed "
                "(pip install 'snpo[xformers]' on a CUDA machine), or use attention: sdpa"
            )
        if on_cpu:
            raise ConfigError("attention: xformers needs a CUDA device; use attention: sdpa")
    if cfg.report_to == "wandb":
        import importlib.util

        if importlib.util.find_spec("wandb") is None:
            raise ConfigError(
                "report_to: wandb was asked for but is not installed (pip install wandb), "
                "or use report_to: tensorboard"
            )


def _validate_files(cfg: TrainConfig) -> None:
    if os.path.exists(cfg.model):
        _validate_family(cfg)
    elif cfg.model.startswith((".", "/")) or "/" not in cfg.model:
        raise ConfigError(f"model: {cfg.model!r} is neither an existing folder nor a hub id")
    factor = _vae_factor(cfg.model)
    if factor and cfg.resolution % factor:
        raise ConfigError(
            f"resolution: {cfg.resolution} is not divisible by the VAE factor {factor} of "
            f"{cfg.model!r}"
        )
    if not cfg.train_data:
        raise ConfigError("train_data: required (parquet files/globs, a JSONL/CSV, or a hub id)")
    for pat in cfg.train_data:
        hub = cfg.data_format == "hub" or (cfg.data_format == "auto" and _looks_like_hub_id(pat))
        if hub:
            continue
        if any(c in pat for c in "*?["):
            if not glob.glob(pat, recursive=True):
                raise ConfigError(f"train_data: the glob {pat!r} matches no file")
        elif not os.path.isfile(pat):
            raise ConfigError(f"train_data: file {pat!r} does not exist")


def _validate_family(cfg: TrainConfig) -> None:
    """The model folder is of a known family, and the objective fits it: a family without a
    null (unconditional) branch cannot train the reversed-preference branch."""
    from snpo.models import ModelLoadError, detect_family, get_family

    try:
        family = get_family(detect_family(cfg.model))
    except ModelLoadError as err:
        raise ConfigError(f"model: {err}") from None
    frames = check_frames(cfg.num_frames, family)
    if frames:
        raise ConfigError(frames)
    if not family.has_null_branch:
        from snpo.models.flux import check_objective

        try:
            check_objective(cfg.objective, family.has_null_branch)
        except ValueError as err:
            raise ConfigError(str(err)) from None
        if cfg.uncond_prob:
            raise ConfigError(
                f"uncond_prob: {cfg.uncond_prob} but {family.name}-class models have no null "
                "branch to drop captions into; set uncond_prob: 0"
            )


# --------------------------------------------------------------------------------------------
# docs
def options_table() -> str:
    """The Markdown table of every option (docs/trainer.md is generated from it)."""
    rows = ["| option | type | default | meaning |", "| --- | --- | --- | --- |"]
    for f in dataclasses.fields(TrainConfig):
        default = f.default if f.default is not dataclasses.MISSING else f.default_factory()
        d = "—" if default in ("", None) else f"`{json.dumps(default)}`"
        t = _type_name(_HINTS[f.name]).replace("|", "\\|")
        rows.append(f"| `{f.name}` | {t} | {d} | {f.metadata.get('help', '')} |")
    return "\n".join(rows)


if __name__ == "__main__":  # python -m snpo.config  → the options table of docs/trainer.md
    print(options_table())
