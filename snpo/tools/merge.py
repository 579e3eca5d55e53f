"""``snpo merge``: Diffusion-NPO's weight merging of a negative model.

    θ⁻_merged = θ_ref + α·(θ⁺ − θ_ref) + β·(θ⁻ − θ_ref)

θ_ref: the reference (base) model; θ⁺: the positive (preference-aligned) model, e.g. a
Diffusion-DPO export — left out, it is θ_ref and α plays no role; θ⁻: the negative model trained
on reversed preferences (objective ``npo``). The merged model is used as the unconditional branch
at sampling (``snpo sample --negative``).

Defaults α = 1, β = 1: the Diffusion-NPO code's default (``gen.py --merge_weight 0``) loads the
positive UNet mixed with the reference by ``merge_weight`` (α = 1 − merge_weight) and fuses the
NPO LoRA (trained on the reference) at scale 1 (β = 1). Diff-SNPO reports that this merging
costs negative alignment (63.8 % → 52.3 % implicit accuracy); try smaller α.

Inputs (each of ``--reference``, ``--positive``, ``--negative``): an snpo export (full UNet or
LoRA), a diffusers model folder or hub id, or a bare UNet folder. A LoRA's delta
ΔW = scale·B·A is taken relative to the base model recorded in its export, which must be the
reference (``--allow-base-mismatch`` to override).

Output (an snpo export folder, loadable by :func:`snpo.export.load_export` and by diffusers):
- ``--format lora`` (the default when every non-reference input is a LoRA): an exact LoRA, ranks
  concatenated per layer: A = [A⁺; A⁻], B = [α·s⁺·B⁺, β·s⁻·B⁻] gives B·A = α·ΔW⁺ + β·ΔW⁻ (a layer
  adapted by one LoRA only keeps its factors; ranks are zero-padded to one rank R so that every
  diffusers version reads scale 1 = alpha/R);
- ``--format full`` (otherwise): the merged UNet weights (safetensors), computed in float32.
Nothing is written until the merge has succeeded; the output folder is replaced atomically.
"""

from __future__ import annotations

import argparse
import json
import re
import shutil
import sys
from dataclasses import dataclass, field
from pathlib import Path

import torch

from .export import (
    LORA_FILE,
    META_FILE,
    ExportError,
    load_lora_into,
    read_export_meta,
    write_export,
)
from .models import ModelLoadError

UNET_WEIGHTS = "diffusion_pytorch_model.safetensors"
UNET_INDEX = "diffusion_pytorch_model.safetensors.index.json"


class MergeError(RuntimeError):
    """Inputs that cannot be merged (the message says why)."""


# ----------------------------------------------------------------------------- pure functions


def check_same_layout(
    ref: dict[str, torch.Tensor], other: dict[str, torch.Tensor], label: str
) -> None:
    """Same keys and shapes as the reference, or a MergeError naming the differences."""
    missing = sorted(set(ref) - set(other))
    extra = sorted(set(other) - set(ref))
    shapes = [
        f"{k}: {tuple(other[k].shape)} vs reference {tuple(ref[k].shape)}"
        for k in ref
        if k in other and tuple(other[k].shape) != tuple(ref[k].shape)
    ]
    if missing or extra or shapes:
        parts = []
        if missing:
            parts.append(f"{len(missing)} reference keys missing (e.g. {missing[:3]})")
        if extra:
            parts.append(f"{len(extra)} keys the reference lacks (e.g. {extra[:3]})")
        if shapes:
            parts.append(f"{len(shapes)} shape mismatches (e.g. {shapes[:3]})")
        raise MergeError(
            f"the {label} UNet does not match the reference architecture: " + "; ".join(parts)
        )


def merge_full(
    ref: dict[str, torch.Tensor],
    negative: dict[str, torch.Tensor],
    positive: dict[str, torch.Tensor] | None = None,
    *,
    alpha: float = 1.0,
    beta: float = 1.0,
    dtype: torch.dtype | None = None,
) -> dict[str, torch.Tensor]:
    """θ_ref + α(θ⁺ − θ_ref) + β(θ⁻ − θ_ref) per tensor, in float32 (float64 stays), cast to
    ``dtype`` (default: the reference tensor's dtype)."""
    check_same_layout(ref, negative, "negative")
    if positive is not None:
        check_same_layout(ref, positive, "positive")
    out = {}
    for k, r in ref.items():
        ct = torch.float64 if r.dtype == torch.float64 else torch.float32
        r32 = r.to(ct)
        m = r32 + beta * (negative[k].to(ct) - r32)
        if positive is not None:
            m = m + alpha * (positive[k].to(ct) - r32)
        out[k] = m.to(dtype or r.dtype)
    return out


@dataclass
class LoraFactors:
    """One adapted layer: ΔW = scale · B·A (A: (r, in, *k), B: (out, r, 1…))."""

    A: torch.Tensor
    B: torch.Tensor
    scale: float = 1.0

    @property
    def rank(self) -> int:
        return self.A.shape[0]


def lora_delta(f: LoraFactors, weight_shape: tuple[int, ...] | None = None) -> torch.Tensor:
    """scale·B·A as a weight-shaped tensor (linear and convolution layers), in float32."""
    a = f.A.float().reshape(f.A.shape[0], -1)
    b = f.B.float().reshape(f.B.shape[0], -1)
    if b.shape[1] != a.shape[0]:
        raise MergeError(f"LoRA factors do not chain: B {tuple(f.B.shape)}, A {tuple(f.A.shape)}")
    shape = weight_shape or (f.B.shape[0], *f.A.shape[1:])
    return (f.scale * (b @ a)).reshape(shape)


def merge_lora_factors(
    negative: dict[str, LoraFactors],
    positive: dict[str, LoraFactors] | None = None,
    *,
    alpha: float = 1.0,
    beta: float = 1.0,
    pad_to_uniform_rank: bool = True,
) -> dict[str, LoraFactors]:
    """Exact LoRA of α·ΔW⁺ + β·ΔW⁻ per layer: A = [A⁺; A⁻], B = [α·s⁺·B⁺, β·s⁻·B⁻], scale 1."""
    positive = positive or {}
    out: dict[str, LoraFactors] = {}
    for name in sorted(set(negative) | set(positive)):
        parts = [(positive.get(name), alpha), (negative.get(name), beta)]
        As, Bs = [], []
        for f, coef in parts:
            if f is None:
                continue
            As.append(f.A.float())
            Bs.append(f.B.float() * (coef * f.scale))
        shapes_a = {tuple(a.shape[1:]) for a in As}
        shapes_b = {(b.shape[0], *b.shape[2:]) for b in Bs}
        if len(shapes_a) > 1 or len(shapes_b) > 1:
            raise MergeError(
                f"layer {name}: the two LoRAs disagree on its shape "
                f"(A {[tuple(a.shape) for a in As]}, B {[tuple(b.shape) for b in Bs]})"
            )
        out[name] = LoraFactors(torch.cat(As, dim=0), torch.cat(Bs, dim=1), 1.0)
    if pad_to_uniform_rank and out:
        r_max = max(f.rank for f in out.values())
        for name, f in out.items():
            extra = r_max - f.rank
            if extra:
                za = f.A.new_zeros((extra, *f.A.shape[1:]))
                zb = f.B.new_zeros((f.B.shape[0], extra, *f.B.shape[2:]))
                out[name] = LoraFactors(torch.cat([f.A, za]), torch.cat([f.B, zb], dim=1), 1.0)
    return out


def apply_deltas(
    ref: dict[str, torch.Tensor],
    deltas: list[tuple[float, dict[str, LoraFactors]]],
    *,
    dtype: torch.dtype | None = None,
) -> dict[str, torch.Tensor]:
    """θ_ref + Σ coef·ΔW over LoRA deltas (layer "x.y" changes weight "x.y.weight")."""
    out = {k: v.float() for k, v in ref.items()}
    for coef, factors in deltas:
        for name, f in factors.items():
            key = f"{name}.weight"
            if key not in out:
                raise MergeError(f"the LoRA adapts layer {name}, which the reference UNet lacks")
            out[key] = out[key] + coef * lora_delta(f, tuple(out[key].shape))
    return {k: v.to(dtype or ref[k].dtype) for k, v in out.items()}


# ----------------------------------------------------------------------------- inputs


@dataclass
class Input:
    """One merge input: full weights (a lazily read UNet state dict) or LoRA factors."""

    label: str
    path: str
    kind: str  # "full" | "lora"
    base: str | None = None  # LoRA: the model its delta is relative to
    meta: dict = field(default_factory=dict)


def describe(path: str, label: str) -> Input:
    from .sample import is_deepspeed_checkpoint, is_unet_folder

    p = Path(path)
    if p.is_dir() and (p / META_FILE).is_file():
        meta = read_export_meta(p)
        if meta["kind"] == "lora":
            return Input(label, path, "lora", base=meta.get("base_model"), meta=meta)
        return Input(label, path, "full", meta=meta)
    if p.is_dir() and ((p / "unet").is_dir() or is_unet_folder(p)):
        return Input(label, path, "full")
    if is_deepspeed_checkpoint(p):
        raise MergeError(
            f"--{label} {path} looks like a DeepSpeed checkpoint; merge reads exports, diffusers "
            "model folders or UNet folders. Export the checkpoint first."
        )
    if p.exists():
        raise MergeError(
            f"--{label} {path} is neither an snpo export, a diffusers model folder, nor a "
            "UNet folder"
        )
    if not re.fullmatch(r"[\w.-]+/[\w.-]+", path) or path.startswith("."):
        raise MergeError(f"--{label} {path} does not exist (and is not a hub id owner/name)")
    return Input(label, path, "full")  # a hub id


def _unet_dir(path: Path) -> Path:
    if (path / "unet").is_dir():
        return path / "unet"
    return path


def read_unet_state(path: str) -> dict[str, torch.Tensor]:
    """The UNet weights of an export / model folder / UNet folder / hub id (float as stored)."""
    p = Path(path)
    if p.is_dir():
        d = _unet_dir(p)
        from safetensors.torch import load_file

        if (d / UNET_WEIGHTS).is_file():
            return load_file(str(d / UNET_WEIGHTS))
        if (d / UNET_INDEX).is_file():
            index = json.loads((d / UNET_INDEX).read_text())
            out: dict[str, torch.Tensor] = {}
            for shard in sorted(set(index["weight_map"].values())):
                out.update(load_file(str(d / shard)))
            return out
    from diffusers import UNet2DConditionModel

    try:
        if p.is_dir():
            unet = UNet2DConditionModel.from_pretrained(str(_unet_dir(p)))
        else:
            unet = UNet2DConditionModel.from_pretrained(path, subfolder="unet")
    except (OSError, ValueError) as err:
        raise MergeError(f"cannot read the UNet weights of {path}: {err}") from err
    return {k: v.detach() for k, v in unet.state_dict().items()}


def extract_lora_factors(unet: torch.nn.Module, adapter: str) -> dict[str, LoraFactors]:
    """Factors and scale of every layer of ``adapter`` loaded into ``unet`` (peft layers)."""
    from peft.tuners.tuners_utils import BaseTunerLayer

    out = {}
    for name, module in unet.named_modules():
        if not isinstance(module, BaseTunerLayer) or adapter not in getattr(module, "lora_A", {}):
            continue
        if getattr(module, "use_dora", {}).get(adapter, False):
            raise MergeError(f"layer {name}: DoRA adapters cannot be merged linearly")
        if getattr(module, "lora_bias", {}).get(adapter, False):
            raise MergeError(f"layer {name}: LoRA adapters with a bias are not supported")
        base = module.get_base_layer()
        if getattr(base, "groups", 1) > 1:
            raise MergeError(f"layer {name}: grouped convolutions are not supported")
        if getattr(module, "fan_in_fan_out", False):
            raise MergeError(f"layer {name}: fan_in_fan_out LoRA layers are not supported")
        B = module.lora_B[adapter].weight.detach()
        if any(s != 1 for s in B.shape[2:]):
            raise MergeError(f"layer {name}: LoRA B with a spatial kernel is not supported")
        out[name] = LoraFactors(
            module.lora_A[adapter].weight.detach().clone(),
            B.clone(),
            float(module.scaling[adapter]),
        )
    if not out:
        raise MergeError(f"the LoRA {adapter!r} adapts no layer of the reference UNet")
    return out


def _same_model(a: str | None, b: str | None) -> bool:
    if a is None or b is None:
        return False
    pa, pb = Path(a), Path(b)
    if pa.is_dir() and pb.is_dir():
        return pa.resolve() == pb.resolve()
    return a == b


def _inside(child: Path, parent: Path) -> bool:
    try:
        child.resolve().relative_to(parent.resolve())
        return True
    except ValueError:
        return False


# ----------------------------------------------------------------------------- the command


def merge(
    *,
    reference: str,
    negative: str,
    out: str | Path,
    positive: str | None = None,
    alpha: float = 1.0,
    beta: float = 1.0,
    fmt: str = "auto",
    base_model: str | None = None,
    allow_base_mismatch: bool = False,
    save_dtype: torch.dtype = torch.float32,
) -> Path:
    """Merge and write an export folder at ``out`` (see the module docstring); returns its path."""
    from .sample import load_any

    if fmt not in ("auto", "full", "lora"):
        raise MergeError(f"--format must be auto, full or lora, not {fmt!r}")
    out = Path(out)
    given = {"reference": reference, "negative": negative}
    if positive is not None:
        given["positive"] = positive
    for label, src in given.items():
        if Path(src).exists() and (_inside(out, Path(src)) or _inside(Path(src), out)):
            raise MergeError(f"--out {out} overlaps the --{label} input {src}; choose another")
    neg = describe(negative, "negative")
    pos = describe(positive, "positive") if positive is not None else None
    inputs = [i for i in (pos, neg) if i is not None]
    ref_desc = describe(reference, "reference")
    if ref_desc.kind == "lora":
        raise MergeError(
            "--reference must be full weights (the base model); a LoRA export is a delta"
        )
    all_lora = all(i.kind == "lora" for i in inputs)
    if fmt == "lora" and not all_lora:
        full = [i.label for i in inputs if i.kind == "full"]
        raise MergeError(
            f"--format lora needs LoRA inputs, but the {', '.join(full)} input is full weights; "
            "use --format full"
        )
    out_fmt = "lora" if (fmt == "lora" or (fmt == "auto" and all_lora)) else "full"

    model, ref_info = load_any(reference, dtype=torch.float32, device="cpu", base_model=base_model)
    ref_source = ref_info["source"] if ref_info["kind"] == "model" else None
    for i in inputs:
        if i.kind == "lora" and not allow_base_mismatch and not _same_model(i.base, reference):
            raise MergeError(
                f"the {i.label} LoRA ({i.path}) is a delta on {i.base!r}, not on the reference "
                f"{reference!r}; θ_ref + ΔW would be wrong. Give that model as --reference, or "
                "--allow-base-mismatch if they are the same model"
            )
    if out_fmt == "lora" and ref_source is None:
        raise MergeError(
            "a LoRA output needs the reference to be a diffusers model folder or hub id "
            f"(it is {ref_info['kind']}); use --format full"
        )
    unet = model.unet
    ref_sd = {k: v.detach() for k, v in unet.state_dict().items()}

    factors: dict[str, dict[str, LoraFactors]] = {}
    for i in inputs:
        if i.kind == "lora":
            try:
                load_lora_into(unet, i.path, adapter_name=i.label)
            except (ValueError, KeyError, RuntimeError) as err:
                raise MergeError(
                    f"the {i.label} LoRA {i.path} does not fit the reference UNet: {err}"
                ) from err
            factors[i.label] = extract_lora_factors(unet, i.label)
            for name, f in factors[i.label].items():
                w = ref_sd.get(f"{name}.weight")
                if (
                    w is None
                    or w.shape[0] != f.B.shape[0]
                    or tuple(w.shape[1:]) != tuple(f.A.shape[1:])
                ):
                    raise MergeError(
                        f"the {i.label} LoRA's layer {name} (A {tuple(f.A.shape)}, B "
                        f"{tuple(f.B.shape)}) does not fit the reference weight "
                        f"{None if w is None else tuple(w.shape)}"
                    )
    if factors:
        unet.unload_lora()
        now = unet.state_dict()
        if set(now) != set(ref_sd):
            raise MergeError("internal: the reference UNet changed while reading the LoRAs")

    neg_meta = neg.meta
    null_kind = neg_meta.get("null_kind", model.null_kind)
    merge_info = {
        "formula": "theta_ref + alpha*(theta_pos - theta_ref) + beta*(theta_neg - theta_ref)",
        "alpha": alpha,
        "beta": beta,
        "reference": reference,
        "positive": positive,
        "negative": negative,
        "format": out_fmt,
    }
    meta = {"objective": "npo_merged", "merge": merge_info}
    if out_fmt == "lora":
        merged = merge_lora_factors(
            factors["negative"], factors.get("positive"), alpha=alpha, beta=beta
        )
        return _write_lora_export(out, model, merged, null_kind, meta, save_dtype)

    # full weights: θ_ref + Σ coef·(θ − θ_ref), LoRA inputs contributing coef·ΔW
    result = {k: v.to(torch.float32) for k, v in ref_sd.items()}
    for i, coef in ((pos, alpha), (neg, beta)):
        if i is None:
            continue
        if i.kind == "lora":
            result = apply_deltas(result, [(coef, factors[i.label])], dtype=torch.float32)
        else:
            sd = read_unet_state(i.path)
            check_same_layout(ref_sd, sd, i.label)
            for k in result:
                result[k] = result[k] + coef * (sd[k].to(torch.float32) - ref_sd[k].float())
            del sd
    if save_dtype != torch.float32:
        unet.to(save_dtype)
    unet.load_state_dict({k: v.to(save_dtype) for k, v in result.items()})
    model.force_zeros_for_empty_prompt = null_kind == "zeros"
    return write_export(out, model, unet, lora=False, meta=meta)


def _write_lora_export(
    out: Path,
    model,
    factors: dict[str, LoraFactors],
    null_kind: str,
    meta: dict,
    save_dtype: torch.dtype,
) -> Path:
    """The export layout of :func:`snpo.export.write_export` for a LoRA given as factors."""
    from safetensors.torch import save_file

    from snpo_kernels import __version__

    weights = {}
    for name, f in factors.items():
        weights[f"unet.{name}.lora_A.weight"] = f.A.to(save_dtype).contiguous()
        weights[f"unet.{name}.lora_B.weight"] = f.B.to(save_dtype).contiguous()
    tmp = out.with_name(out.name + ".partial")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    save_file(weights, str(tmp / LORA_FILE), metadata={"format": "pt"})
    src = model.source
    info = {
        "base_model": str(Path(src).resolve()) if Path(src).is_dir() else src,
        "kind": "lora",
        "family": model.family,
        "null_kind": null_kind,
        "prediction_type": model.prediction_type,
        "snpo_version": __version__,
        "lora_rank": max(f.rank for f in factors.values()),
        **meta,
    }
    (tmp / META_FILE).write_text(json.dumps(info, indent=2, sort_keys=True))
    old = out.with_name(out.name + ".old")
    shutil.rmtree(old, ignore_errors=True)
    if out.exists():
        out.rename(old)
    tmp.rename(out)
    shutil.rmtree(old, ignore_errors=True)
    return out


def build_parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(
        prog="snpo merge",
        description="Diffusion-NPO weight merging: θ_ref + α(θ⁺ − θ_ref) + β(θ⁻ − θ_ref).",
    )
    ap.add_argument("--reference", required=True, help="θ_ref: the base model (folder or hub id)")
    ap.add_argument(
        "--positive", help="θ⁺: the preference-aligned model (export, folder); default θ_ref"
    )
    ap.add_argument("--negative", required=True, help="θ⁻: the NPO negative model (export)")
    ap.add_argument("--alpha", type=float, default=1.0, help="weight of θ⁺ − θ_ref (default 1)")
    ap.add_argument("--beta", type=float, default=1.0, help="weight of θ⁻ − θ_ref (default 1)")
    ap.add_argument("--out", required=True, help="the merged export folder (replaced atomically)")
    ap.add_argument(
        "--format",
        default="auto",
        choices=["auto", "full", "lora"],
        help="auto: LoRA when every non-reference input is a LoRA, else full weights",
    )
    ap.add_argument("--base-model", help="base model of a bare-UNet or moved-export reference")
    ap.add_argument(
        "--allow-base-mismatch",
        action="store_true",
        help="accept LoRAs whose recorded base is not --reference (same model elsewhere)",
    )
    ap.add_argument(
        "--save-dtype", default="float32", help="dtype of the written weights (default float32)"
    )
    return ap


def main(argv: list[str] | None = None) -> int:
    from .sample import DTYPES, SampleError

    args = build_parser().parse_args(argv)
    try:
        if args.save_dtype not in DTYPES:
            raise MergeError(f"--save-dtype: one of {', '.join(sorted(DTYPES))}")
        path = merge(
            reference=args.reference,
            positive=args.positive,
            negative=args.negative,
            out=args.out,
            alpha=args.alpha,
            beta=args.beta,
            fmt=args.format,
            base_model=args.base_model,
            allow_base_mismatch=args.allow_base_mismatch,
            save_dtype=DTYPES[args.save_dtype],
        )
    except (MergeError, ExportError, ModelLoadError, SampleError) as err:
        print(f"snpo merge: error: {err}", file=sys.stderr)
        return 2
    meta = read_export_meta(path)
    print(
        f"snpo merge: wrote {meta['kind']} export {path} (alpha={args.alpha}, beta={args.beta}, "
        f"null_kind={meta['null_kind']})"
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
