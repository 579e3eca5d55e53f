"""``snpo estimate``: the per-GPU memory of a training config's model states for each DeepSpeed
ZeRO stage and offload choice, before renting the GPUs.

    snpo estimate CONFIG.yaml [--arch sd15|sdxl|sd35m] [--gpus_per_node 8] [--nodes 1]
                              [--gpu_gb 24,40,80] [--key value ...]     (config overrides)

Parameters are counted without loading weights: each component's class is built from its
``config.json`` on the ``meta`` device (LoRA: with the run's adapters added, which are then the
trainable parameters). ``--arch`` counts a known architecture instead (:data:`ARCHS`: the
denoiser built from its published diffusers config, the frozen text encoders and VAE from their
known parameter counts), for configs that name a hub model not available offline.

The model (Ψ trainable parameters, Φ frozen parameters of the denoiser — the LoRA base —,
R the reference copy of a full fine-tune, E the text encoders + VAE; w bytes per weight in the
training precision: 2 for bf16/fp16, 4 for fp32; N = gpus_per_node × nodes):

    weights     w·(Ψ + Φ)                    ZeRO-3: ÷ N     (offload_param: on the CPU)
    gradients   w·Ψ                          ZeRO-2/3: ÷ N
    optimizer   (M + S)                      ZeRO-1/2/3: ÷ N (offload_optimizer: on the CPU)
                M = 4·Ψ fp32 master weights under bf16/fp16 (0 under fp32)
                S = AdamW 8·Ψ (two fp32 moments); 8-bit AdamW 2·Ψ (two 8-bit moments);
                    Adafactor (no first moment): at ZeRO-0 fp32 4·Σ (r + c) over r × c
                    matrices (the factored second moment) + 4·numel of vectors; otherwise
                    4·Ψ — DeepSpeed's mixed-precision and ZeRO optimizers hand the optimizer
                    flat fp32 partitions, which Adafactor cannot factor
    frozen      w·(R + E)                    never partitioned (outside the engine)

This is DeepSpeed's model-states accounting (``estimate_zero2_model_states_mem_needs`` /
``estimate_zero3_model_states_mem_needs``: 2 + 2 + 12 bytes per parameter for mixed-precision
Adam) generalised to the optimizer and precision, with the run's frozen models added. It leaves
out activations, the ZeRO-3 working set of gathered layers (about the largest layer), DeepSpeed's
communication buckets and the CUDA context — a few GiB. With CUDA present ``--measure`` runs one
optimizer step of the config (its model and data must be at hand) and reports the measured peak
and the activations (peak − memory after the step); on the CPU it is skipped with a note.
nvme offloads use the same GPU memory as cpu (the CPU column then lives on the NVMe drive).
"""

from __future__ import annotations

import argparse
import json
import sys
from dataclasses import dataclass
from pathlib import Path

import torch

from snpo.config import ConfigError, TrainConfig, load_config

GIB = 2**30

# Known architectures: the denoiser's diffusers config (built on the meta device) and the frozen
# components' parameter counts (text encoders, VAE) of the public checkpoints.
ARCHS: dict[str, dict] = {
    "sd15": {  # runwayml/stable-diffusion-v1-5: UNet 859.5 M
        "family": "sd",
        "class": "UNet2DConditionModel",
        "config": {"sample_size": 64, "cross_attention_dim": 768},
        "frozen": {"text_encoder (CLIP ViT-L/14)": 123_060_480, "vae": 83_653_863},
    },
    "sdxl": {  # stabilityai/stable-diffusion-xl-base-1.0: UNet 2.57 B
        "family": "sdxl",
        "class": "UNet2DConditionModel",
        "config": {
            "sample_size": 128,
            "down_block_types": ["DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"],
            "up_block_types": ["CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"],
            "block_out_channels": [320, 640, 1280],
            "transformer_layers_per_block": [1, 2, 10],
            "attention_head_dim": [5, 10, 20],
            "cross_attention_dim": 2048,
            "use_linear_projection": True,
            "addition_embed_type": "text_time",
            "addition_time_embed_dim": 256,
            "projection_class_embeddings_input_dim": 2816,
        },
        "frozen": {
            "text_encoder (CLIP ViT-L/14)": 123_060_480,
            "text_encoder_2 (OpenCLIP bigG/14)": 694_659_840,
            "vae": 83_653_863,
        },
    },
    "sd35m": {  # stabilityai/stable-diffusion-3.5-medium: MMDiT-X 2.2 B
        "family": "sd3",
        "class": "SD3Transformer2DModel",
        "config": {
            "sample_size": 128,
            "patch_size": 2,
            "in_channels": 16,
            "out_channels": 16,
            "num_layers": 24,
            "attention_head_dim": 64,
            "num_attention_heads": 24,
            "joint_attention_dim": 4096,
            "caption_projection_dim": 1536,
            "pooled_projection_dim": 2048,
            "pos_embed_max_size": 384,
            "dual_attention_layers": list(range(13)),
            "qk_norm": "rms_norm",
        },
        "frozen": {
            "text_encoder (CLIP ViT-L/14)": 123_650_304,
            "text_encoder_2 (OpenCLIP bigG/14)": 694_659_840,
            "text_encoder_3 (T5-XXL encoder)": 4_762_310_656,
            "vae": 83_819_683,
        },
    },
}


@dataclass
class Counts:
    """Parameter counts of one run: trainable Ψ, frozen denoiser Φ, reference copy R, text
    encoders + VAE E, and S_ada = Σ Adafactor state floats over the trainable tensors."""

    trainable: int
    frozen_denoiser: int
    reference: int
    encoders: int
    adafactor_floats: int
    denoiser: str
    components: dict[str, int]


def adafactor_floats(shapes: list[tuple[int, ...]]) -> int:
    """Floats of Adafactor's factored second moment: r + c per r × c matrix (times the leading
    dimensions of a higher-rank tensor), numel for a vector or scalar."""
    total = 0
    for s in shapes:
        if len(s) >= 2:
            lead = int(torch.Size(s[:-2]).numel())
            total += lead * (s[-2] + s[-1])
        else:
            total += int(torch.Size(s).numel())
    return total


def _add_lora(denoiser: torch.nn.Module, cfg: TrainConfig) -> None:
    from snpo.models import lora_config

    denoiser.requires_grad_(False)
    denoiser.add_adapter(lora_config(cfg.lora_targets, cfg.lora_rank, cfg.lora_alpha))


def _count(cfg: TrainConfig, denoiser: torch.nn.Module, name: str, frozen: dict[str, int]):
    """:class:`Counts` of ``denoiser`` (meta device) for ``cfg`` and the frozen components."""
    lora = cfg.lora_rank > 0
    if lora:
        _add_lora(denoiser, cfg)
        if not any(p.requires_grad for p in denoiser.parameters()):
            raise ConfigError(
                f"lora_targets: no {name} module matched {list(cfg.lora_targets)}; nothing would "
                "be trained"
            )
    params = list(denoiser.parameters())
    train = [p for p in params if p.requires_grad or not lora]
    n_train = sum(p.numel() for p in train)
    n_frozen = sum(p.numel() for p in params) - n_train
    ref = n_train + n_frozen if not lora and cfg.preset.uses_reference else 0
    return Counts(
        trainable=n_train,
        frozen_denoiser=n_frozen,
        reference=ref,
        encoders=sum(frozen.values()),
        adafactor_floats=adafactor_floats([tuple(p.shape) for p in train]),
        denoiser=name,
        components=dict(frozen),
    )


def count_arch(cfg: TrainConfig, arch: str) -> Counts:
    """:class:`Counts` of a known architecture (:data:`ARCHS`)."""
    import diffusers

    if arch not in ARCHS:
        raise ConfigError(f"--arch: unknown architecture {arch!r}; one of {', '.join(ARCHS)}")
    spec = ARCHS[arch]
    cls = getattr(diffusers, spec["class"])
    with torch.device("meta"):
        denoiser = cls.from_config(spec["config"])
    return _count(cfg, denoiser, f"{arch} {spec['class']}", spec["frozen"])


def _meta_component(folder: Path) -> torch.nn.Module | None:
    """A model folder's component (diffusers or transformers class from its config.json) built on
    the meta device; None for what is no model (tokenizer, scheduler)."""
    f = folder / "config.json"
    if not f.is_file():
        return None
    conf = json.loads(f.read_text())
    with torch.device("meta"):
        if "_class_name" in conf:
            import diffusers

            cls = getattr(diffusers, conf["_class_name"], None)
            return None if cls is None else cls.from_config(cls.load_config(str(folder)))
        if conf.get("architectures"):
            import transformers

            cls = getattr(transformers, conf["architectures"][0], None)
            if cls is None:
                return None
            return cls(transformers.AutoConfig.from_pretrained(str(folder)))
    return None


def count_folder(cfg: TrainConfig, folder: Path) -> Counts:
    """:class:`Counts` of a local diffusers model folder (no weights are read)."""
    from snpo.models import detect_family, get_family

    family = get_family(detect_family(str(folder)))
    frozen: dict[str, int] = {}
    denoiser = None
    for sub in sorted(p for p in folder.iterdir() if p.is_dir()):
        module = _meta_component(sub)
        if module is None:
            continue
        if sub.name == family.denoiser:
            denoiser = module
        else:
            frozen[sub.name] = sum(p.numel() for p in module.parameters())
    if denoiser is None:
        raise ConfigError(f"model: {folder} has no {family.denoiser}/config.json to count")
    return _count(cfg, denoiser, f"{family.name} {type(denoiser).__name__}", frozen)


# --------------------------------------------------------------------------------------------
SETUPS = (  # (zero stage, offload_optimizer, offload_param)
    (0, "none", "none"),
    (1, "none", "none"),
    (1, "cpu", "none"),
    (2, "none", "none"),
    (2, "cpu", "none"),
    (3, "none", "none"),
    (3, "cpu", "none"),
    (3, "cpu", "cpu"),
)


def state_bytes(cfg: TrainConfig, c: Counts, zero_stage: int) -> tuple[int, int]:
    """(M, S): bytes of fp32 master weights and of optimizer states at ``zero_stage`` (module
    docstring)."""
    master = 4 * c.trainable if cfg.precision in ("bf16", "fp16") else 0
    if cfg.optimizer == "adafactor":
        factored = zero_stage == 0 and cfg.precision == "fp32"  # else flat partitions
        states = 4 * (c.adafactor_floats if factored else c.trainable)
    elif cfg.optimizer == "adamw8bit":
        states = 2 * c.trainable
    else:
        states = 8 * c.trainable
    return master, states


def memory_rows(cfg: TrainConfig, c: Counts, gpus: int, nodes: int = 1) -> list[dict]:
    """Per-GPU bytes of weights, gradients, optimizer (master + states), frozen models and their
    total, and CPU bytes per node, for every setup of :data:`SETUPS`."""
    w = 4 if cfg.precision == "fp32" else 2
    frozen = w * (c.reference + c.encoders)
    rows = []
    for stage, off_opt, off_param in SETUPS:
        master, states = state_bytes(cfg, c, stage)
        weights = w * (c.trainable + c.frozen_denoiser) / (gpus if stage == 3 else 1)
        grads = w * c.trainable / (gpus if stage >= 2 else 1)
        optim = (master + states) / (gpus if stage >= 1 else 1)
        cpu = 0.0
        if off_opt != "none":
            cpu += optim * gpus / nodes
            optim = 0.0
        if off_param != "none":
            cpu += weights * gpus / nodes
            weights = 0.0
        rows.append(
            {
                "zero_stage": stage,
                "offload": "+".join(
                    n for n, d in (("optimizer", off_opt), ("param", off_param)) if d != "none"
                )
                or "none",
                "weights": weights,
                "gradients": grads,
                "optimizer": optim,
                "frozen": float(frozen),
                "total": weights + grads + optim + frozen,
                "cpu_per_node": cpu,
            }
        )
    return rows


def format_table(rows: list[dict], gpu_gb: list[float]) -> str:
    """The rows as a Markdown table in GiB, with a ✓/✗ column per GPU size (model states only)."""
    head = ["ZeRO", "offload", "weights", "grads", "optimizer", "frozen", "total/GPU", "CPU/node"]
    head += [f"{g:g} GB" for g in gpu_gb]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for r in rows:
        cells = [str(r["zero_stage"]), r["offload"]]
        cells += [
            f"{r[k] / GIB:.1f}"
            for k in ("weights", "gradients", "optimizer", "frozen", "total", "cpu_per_node")
        ]
        cells += ["✓" if r["total"] <= g * 1e9 else "✗" for g in gpu_gb]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def measure_step(cfg: TrainConfig) -> dict | None:
    """One optimizer step of ``cfg`` on CUDA in a temporary output_dir → {peak_gib,
    after_gib, activations_gib} (activations ≈ the step's peak − what stays allocated after it);
    None without CUDA."""
    if not torch.cuda.is_available():
        return None
    import dataclasses
    import tempfile

    from snpo.trainer.metrics import MetricsLogger
    from snpo.trainer.preemption import StopRequest
    from snpo.trainer.trainer import Trainer

    with tempfile.TemporaryDirectory() as tmp:
        run = dataclasses.replace(
            cfg,
            output_dir=tmp,
            max_steps=1,
            resume="never",
            checkpoint_every=0,
            export_every=0,
            report_to="none",
            progress_bar=False,
        )
        t = Trainer(run)
        t.stop = StopRequest()
        with t._held:
            t.setup()
            logger = MetricsLogger(run, t.dist.is_main, 0)
            it = t.inputs.batches(0, t.data_step(1))
            torch.cuda.synchronize()
            torch.cuda.reset_peak_memory_stats()
            t._optimizer_step(it, 1, logger, 0)
            torch.cuda.synchronize()
            peak, after = torch.cuda.max_memory_allocated(), torch.cuda.memory_allocated()
            logger.close()
            del it
    return {
        "peak_gib": peak / GIB,
        "after_gib": after / GIB,
        "activations_gib": (peak - after) / GIB,
    }


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="snpo estimate",
        description="Per-GPU memory of a training config's model states for each ZeRO stage and "
        "offload (see the module docstring of snpo.tools.estimate for the formulas). Other "
        "--key value options override the config.",
    )
    p.add_argument("config", help="a training config (YAML)")
    p.add_argument("--arch", choices=sorted(ARCHS), help="count a known architecture instead")
    p.add_argument("--gpus_per_node", "--gpus-per-node", type=int, default=1)
    p.add_argument("--nodes", type=int, default=1)
    p.add_argument(
        "--gpu_gb", "--gpu-gb", default="24,40,80", help="GPU sizes to check, comma-separated"
    )
    p.add_argument(
        "--measure", action="store_true", help="CUDA only: profile one step (activations)"
    )
    p.add_argument("--json", action="store_true", help="print the rows as JSON")
    return p


def main(argv: list[str] | None = None) -> int:
    args, overrides = build_parser().parse_known_args(argv)
    try:
        if args.gpus_per_node < 1 or args.nodes < 1:
            raise ConfigError("--gpus_per_node and --nodes: must be ≥ 1")
        try:
            gpu_gb = [float(x) for x in args.gpu_gb.split(",") if x.strip()]
        except ValueError:
            raise ConfigError(
                f"--gpu_gb: numbers separated by commas, got {args.gpu_gb!r}"
            ) from None
        cfg = load_config(args.config, overrides, check_files=False)
        if args.arch:
            counts = count_arch(cfg, args.arch)
        elif Path(cfg.model).is_dir():
            counts = count_folder(cfg, Path(cfg.model))
        else:
            raise ConfigError(
                f"model: {cfg.model!r} is no local folder to count; pass --arch "
                f"({', '.join(ARCHS)}) to estimate a known architecture without its weights"
            )
    except ConfigError as err:
        print(f"snpo estimate: error: {err}", file=sys.stderr)
        return 2
    gpus = args.gpus_per_node * args.nodes
    rows = memory_rows(cfg, counts, gpus, args.nodes)
    if args.json:
        print(json.dumps({"counts": counts.__dict__, "gpus": gpus, "rows": rows}, indent=1))
        return 0
    kind = f"LoRA rank {cfg.lora_rank}" if cfg.lora_rank else "full fine-tune"
    print(
        f"snpo estimate: {counts.denoiser}, {kind}, {cfg.precision}, {cfg.optimizer}, "
        f"{gpus} GPU(s) ({args.gpus_per_node} per node × {args.nodes} node(s))"
    )
    print(
        f"parameters: trainable {counts.trainable / 1e6:.1f} M, frozen denoiser "
        f"{counts.frozen_denoiser / 1e6:.1f} M, reference copy {counts.reference / 1e6:.1f} M, "
        f"text encoders + VAE {counts.encoders / 1e6:.1f} M"
    )
    print("model states in GiB per GPU (activations, buffers and the CUDA context not included):")
    print(format_table(rows, gpu_gb))
    if args.measure:
        measured = measure_step(cfg)
        if measured is None:
            print("activations: not measured (no CUDA device: --measure profiles a CUDA step)")
        else:
            print(
                f"one step at zero_stage {cfg.zero_stage}: peak {measured['peak_gib']:.2f} GiB, "
                f"after it {measured['after_gib']:.2f} GiB, activations ≈ "
                f"{measured['activations_gib']:.2f} GiB"
            )
    else:
        print("activations: not included (--measure on a CUDA machine profiles one step)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
