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

Inputs (each of ``--reference``, ``--positive``, ``--negative``): an snpo export (full
denoiser or LoRA), a diffusers model folder or hub id, or a bare denoiser folder, all of one
model family with a CFG null branch (SD1.5-, SDXL- or SD3-class: the UNet, or the SD3
transformer, is merged; FLUX-class models have no null branch for a negative to serve and are
refused). A LoRA's delta ΔW = scale·B·A is taken relative to the base model recorded in its
export, which must be the reference (``--allow-base-mismatch`` to override).

Output (an snpo export folder, loadable by :func:`snpo.models.load_export` and by diffusers):
- ``--format lora`` (the default when every non-reference input is a LoRA): an exact LoRA, ranks
  concatenated per layer: A = [A⁺; A⁻], B = [α·s⁺·B⁺, β·s⁻·B⁻] gives B·A = α·ΔW⁺ + β·ΔW⁻ (a layer
  adapted by one LoRA only keeps its factors; ranks are zero-padded to one rank R so that every
  diffusers version reads scale 1 = alpha/R);
- ``--format full`` (otherwise): the merged denoiser weights (safetensors, in ``unet/`` or
  ``transformer/``), computed in float32.
Nothing is written until the merge has succeeded; the output folder is replaced atomically.
"""

from __future__ import annotations

import argparse
import json
import re
import sys
from dataclasses import dataclass, field
from pathlib import Path

import torch

from snpo.models import (
    META_FILE,
    DiffusionModel,
    ExportError,
    ModelLoadError,
    detect_family,
    get_family,
    is_deepspeed_checkpoint,
    load_any,
    load_lora_into,
    lora_config,
    read_export_meta,
    write_export,
)
from snpo.models.trained import denoiser_class_of, is_model_folder
from snpo.precision import dtype_of

UNET_WEIGHTS = "diffusion_pytorch_model.safetensors"
UNET_INDEX = "diffusion_pytorch_model.safetensors.index.json"


class MergeError(RuntimeError):
    """Inputs that cannot be merged (the message says why)."""


# ----------------------------------------------------------------------------- pure functions


def check_same_layout(
    ref: dict[str, torch.Tensor], other: dict[str, torch.Tensor], label: str, what: str = "UNet"
) -> None:
    """Same keys and shapes as the reference, or a MergeError naming the differences
    (``what``: the denoiser, "UNet" | "transformer", in the message)."""
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
            f"the {label} {what} does not match the reference architecture: " + "; ".join(parts)
        )


def merge_full(
    ref: dict[str, torch.Tensor],
    negative: dict[str, torch.Tensor],
    positive: dict[str, torch.Tensor] | None = None,
    *,
    alpha: float = 1.0,
    beta: float = 1.0,
    dtype: torch.dtype | None = None,
    what: str = "UNet",
) -> dict[str, torch.Tensor]:
    """θ_ref + α(θ⁺ − θ_ref) + β(θ⁻ − θ_ref) per tensor, in float32 (float64 stays), cast to
    ``dtype`` (default: the reference tensor's dtype). Any denoiser's state dict (UNet or
    transformer: ``what`` names it in errors)."""
    check_same_layout(ref, negative, "negative", what)
    if positive is not None:
        check_same_layout(ref, positive, "positive", what)
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
                raise MergeError(f"the LoRA adapts layer {name}, which the reference lacks")
            out[key] = out[key] + coef * lora_delta(f, tuple(out[key].shape))
    return {k: v.to(dtype or ref[k].dtype) for k, v in out.items()}


# ----------------------------------------------------------------------------- inputs


@dataclass
class Input:
    """One merge input: full weights (a lazily read denoiser state dict) or LoRA factors.

    family: its model family where the folder says (export, model folder), else None;
    denoiser_class: the diffusers class of a bare denoiser folder, else None."""

    label: str
    path: str
    kind: str  # "full" | "lora"
    base: str | None = None  # LoRA: the model its delta is relative to
    meta: dict = field(default_factory=dict)
    family: str | None = None
    denoiser_class: str | None = None


def describe(path: str, label: str) -> Input:
    p = Path(path)
    if p.is_dir() and (p / META_FILE).is_file():
        meta = read_export_meta(p)
        fam = meta.get("family", "sd")
        if meta["kind"] == "lora":
            return Input(label, path, "lora", meta.get("base_model"), meta, family=fam)
        return Input(label, path, "full", meta=meta, family=fam)
    if is_model_folder(p):
        try:
            return Input(label, path, "full", family=detect_family(path))
        except ModelLoadError as err:
            raise MergeError(f"--{label} {path}: {err}") from None
    if p.is_dir() and denoiser_class_of(p) is not None:
        return Input(label, path, "full", denoiser_class=denoiser_class_of(p))
    if is_deepspeed_checkpoint(p):
        raise MergeError(
            f"--{label} {path} looks like a DeepSpeed checkpoint; merge reads exports, diffusers "
            "model folders or UNet/transformer folders. Export the checkpoint first."
        )
    if p.exists():
        raise MergeError(
            f"--{label} {path} is neither an snpo export, a diffusers model folder, nor a "
            "UNet or transformer folder"
        )
    if not re.fullmatch(r"[\w.-]+/[\w.-]+", path) or path.startswith("."):
        raise MergeError(f"--{label} {path} does not exist (and is not a hub id owner/name)")
    return Input(label, path, "full")  # a hub id


def check_families(family: str, inputs: list[Input]) -> None:
    """Every input is of ``family`` (the reference's) and the family has a CFG null branch for
    the merged negative to serve; MergeError (one line) otherwise."""
    spec = get_family(family)
    if not spec.has_null_branch:
        raise MergeError(
            f"the reference is {family}-class, a guidance-distilled family without a CFG null "
            "branch: a merged negative model has no use there (snpo sample refuses --negative)"
        )
    for i in inputs:
        if i.family is not None and i.family != family:
            raise MergeError(
                f"cannot merge across model families: the reference is {family}-class, the "
                f"--{i.label} {i.path} is {i.family}-class"
            )
        if i.denoiser_class is not None and i.denoiser_class != spec.denoiser_class:
            raise MergeError(
                f"cannot merge across model families: the reference's denoiser is a "
                f"{spec.denoiser_class}, the --{i.label} {i.path} is a {i.denoiser_class}"
            )


def _denoiser_dir(path: Path, family: str) -> Path:
    """The denoiser folder of an export or model folder of ``family`` (a bare folder: itself)."""
    sub = path / get_family(family).denoiser
    return sub if sub.is_dir() else path


def read_denoiser_state(path: str, family: str = "sd") -> dict[str, torch.Tensor]:
    """The denoiser weights (UNet or transformer) of an export / model folder / bare denoiser
    folder / hub id of ``family`` (float as stored)."""
    import diffusers

    p = Path(path)
    spec = get_family(family)
    if p.is_dir():
        d = _denoiser_dir(p, family)
        from safetensors.torch import load_file

        if (d / UNET_WEIGHTS).is_file():
            return load_file(str(d / UNET_WEIGHTS))
        if (d / UNET_INDEX).is_file():
            index = json.loads((d / UNET_INDEX).read_text())
            out: dict[str, torch.Tensor] = {}
            for shard in sorted(set(index["weight_map"].values())):
                out.update(load_file(str(d / shard)))
            return out
    cls = getattr(diffusers, spec.denoiser_class)
    try:
        if p.is_dir():
            net = cls.from_pretrained(str(_denoiser_dir(p, family)))
        else:
            net = cls.from_pretrained(path, subfolder=spec.denoiser)
    except (OSError, ValueError) as err:
        raise MergeError(f"cannot read the {spec.denoiser} weights of {path}: {err}") from err
    return {k: v.detach() for k, v in net.state_dict().items()}


read_unet_state = read_denoiser_state


def extract_lora_factors(unet: torch.nn.Module, adapter: str) -> dict[str, LoraFactors]:
    """Factors and scale of every layer of ``adapter`` loaded into the denoiser ``unet`` (peft
    layers)."""
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
        raise MergeError(f"the LoRA {adapter!r} adapts no layer of the reference denoiser")
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
    if ref_desc.family is not None:  # known before loading anything
        check_families(ref_desc.family, inputs)
    all_lora = all(i.kind == "lora" for i in inputs)
    if fmt == "lora" and not all_lora:
        full = [i.label for i in inputs if i.kind == "full"]
        raise MergeError(
            f"--format lora needs LoRA inputs, but the {', '.join(full)} input is full weights; "
            "use --format full"
        )
    out_fmt = "lora" if (fmt == "lora" or (fmt == "auto" and all_lora)) else "full"

    model, ref_info = load_any(reference, dtype=torch.float32, device="cpu", base_model=base_model)
    check_families(model.family, inputs)
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
    part = model.spec.denoiser  # "unet" | "transformer"
    what = denoiser_word(model)
    ref_sd = {k: v.detach() for k, v in unet.state_dict().items()}

    factors: dict[str, dict[str, LoraFactors]] = {}
    for i in inputs:
        if i.kind == "lora":
            try:
                load_lora_into(unet, i.path, adapter_name=i.label, prefix=part)
            except (ValueError, KeyError, RuntimeError) as err:
                raise MergeError(
                    f"the {i.label} LoRA {i.path} does not fit the reference {what}: {err}"
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
            raise MergeError(f"internal: the reference {what} changed while reading the LoRAs")

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
        attach_lora_factors(unet, merged, save_dtype)
        model.force_zeros_for_empty_prompt = null_kind == "zeros"
        meta["lora_rank"] = max(f.rank for f in merged.values())
        return write_export(out, model, unet, lora=True, meta=meta)

    # full weights: merge_full on θ⁺, θ⁻ (a LoRA input as θ_ref + ΔW); holds the reference,
    # both inputs and the result in memory at once
    thetas = {
        i.label: apply_deltas(ref_sd, [(1.0, factors[i.label])], dtype=torch.float32)
        if i.kind == "lora"
        else read_denoiser_state(i.path, model.family)
        for i in inputs
    }
    result = merge_full(
        ref_sd,
        thetas["negative"],
        thetas.get("positive"),
        alpha=alpha,
        beta=beta,
        dtype=torch.float32,
        what=what,
    )
    del thetas
    if save_dtype != torch.float32:
        unet.to(save_dtype)
    unet.load_state_dict({k: v.to(save_dtype) for k, v in result.items()})
    model.force_zeros_for_empty_prompt = null_kind == "zeros"
    return write_export(out, model, unet, lora=False, meta=meta)


def denoiser_word(model: DiffusionModel) -> str:
    """ "UNet" or "transformer": the merged denoiser, as the messages name it."""
    return "UNet" if model.spec.denoiser == "unet" else model.spec.denoiser


def attach_lora_factors(
    unet: torch.nn.Module, factors: dict[str, LoraFactors], dtype: torch.dtype
) -> None:
    """Add an adapter "default" to the denoiser ``unet`` holding ``factors`` exactly: one rank R (they are
    padded to it), lora_alpha R (scale 1), target modules the factors' layer names."""
    ranks = {f.rank for f in factors.values()}
    if len(ranks) != 1 or any(f.scale != 1.0 for f in factors.values()):
        raise MergeError("internal: merged LoRA factors must have one rank and scale 1")
    (rank,) = ranks
    unet.add_adapter(lora_config(sorted(factors), rank, rank))
    modules = dict(unet.named_modules())
    with torch.no_grad():
        for name, f in factors.items():
            layer = modules[name]
            layer.lora_A["default"].weight.data = f.A.to(dtype).reshape_as(
                layer.lora_A["default"].weight
            )
            layer.lora_B["default"].weight.data = f.B.to(dtype).reshape_as(
                layer.lora_B["default"].weight
            )


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
    ap.add_argument(
        "--base-model", help="base model of a bare UNet/transformer or moved-export reference"
    )
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
    args = build_parser().parse_args(argv)
    try:
        try:
            save_dtype = dtype_of(args.save_dtype)
        except ValueError as err:
            raise MergeError(f"--save-dtype: {err}") from None
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
            save_dtype=save_dtype,
        )
    except (MergeError, ExportError, ModelLoadError) as err:
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
