"""``snpo eval``: implicit preference accuracy on held-out pairs, and reward scores of images.

Preference evaluation (``--pairs``)
    snpo eval --pairs val.parquet --reference BASE --model snpo=EXPORT [--model dpo=…] \\
        [--negative npo=MERGED] [--timesteps 8] [--max-pairs 500] --out runs/eval

For every pair (winner first, ties dropped: Pick-a-Pic parquet via :mod:`snpo.data`, or own
pairs as JSONL/CSV) and each of K draws, winner and loser are noised with the same timestep and
noise; every model and the reference predict on both branches — the pair's prompt (conditional)
and the model's null embedding (the null-prompt branch). Per sample e = mean squared error of
the prediction, m = e_model − e_ref (the reference is ``--reference``, the base model).
Per pair, margins are averaged over the K draws, then

- positive accuracy: fraction of pairs with m_w < m_l on the conditional branch (normal labels);
- negative accuracy: fraction with m_l < m_w on the null-prompt branch (reversed labels: the
  papers' negative-alignment measure, Diff-SNPO Table 5);
- winner log-likelihood proxy: mean of −m_w on the conditional branch (Diff-SNPO's winner
  likelihood ratio diagnostic; it falls when a model "blurs");
ties count one half. Per-draw accuracies (the training statistics' convention,
:func:`snpo_kernels.preference_stats`) are reported too.

Draws: pair i's draws are a function of (``--seed``, i) alone — a counter-based generator
(:func:`snpo.draws.generator`, a stream of its own) gives K stratified timesteps
t_j ∈ [j·T/K, (j+1)·T/K), the noise and the VAE-posterior noise — so every model sees exactly the
same noisy inputs, whatever the batch size or the set of models. Latents and text embeddings come
from the reference's VAE and text encoders (the compared models are fine-tuned UNets of the same
base; their family and UNet interface are checked). Confidence intervals: 95 % percentile
bootstrap over pairs (2000 resamples, seeded), which covers the draw noise within pairs too.

Reward evaluation (``--rewards``)
    snpo eval --rewards pickscore,aesthetic --images runs/samples --pickscore-model P … --out D
    snpo eval --rewards pickscore --model base=B --model snpo=E --prompts p.txt --out D

scores the images of a ``snpo sample`` folder (its manifest says model, prompt and seed of each
image; a folder of ``MODEL/*.png`` with same-named ``.txt`` prompts works too), or samples them
first (into ``OUT/samples``, the papers' protocol). Per model: the mean over prompts for each
seed, then mean ± std over seeds. Output: ``preference.{json,md}``, ``rewards.{json,md}``.
"""

from __future__ import annotations

import argparse
import json
import math
import sys
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch

from .models import (
    DiffusionModel,
    ModelLoadError,
    PromptEmbeddings,
    encode_images,
    encode_prompts,
    sample_latents,
    training_target,
    unet_conditioning,
)

STREAM_EVAL = 17  # snpo.draws streams 1–3 are the trainer's; evaluation draws never collide
BOOTSTRAP = 2000
CONFIDENCE = 0.95


class EvalError(RuntimeError):
    """Bad evaluation arguments or inputs (the message says which)."""


# ----------------------------------------------------------------------------- draws


@dataclass
class EvalDraws:
    """Draws of P pairs × K draws: timesteps (P, K) int64, noise (P, K, C, h, w) shared by
    winner and loser, latent_noise (P, K, 2, C, h, w) for the VAE posterior of winner, loser."""

    timesteps: torch.Tensor
    noise: torch.Tensor
    latent_noise: torch.Tensor


def eval_draws(
    seed: int,
    pair_ids: list[int],
    k: int,
    latent_shape: tuple[int, ...],
    num_train_timesteps: int,
) -> EvalDraws:
    """Draws of each pair from (seed, pair id) alone (independent of batch and models)."""
    from .draws import generator

    ts, noise, lat = [], [], []
    shape = tuple(int(s) for s in latent_shape)
    T = int(num_train_timesteps)
    for i in pair_ids:
        g = generator(seed, 0, int(i), STREAM_EVAL)
        u = torch.rand(k, generator=g, dtype=torch.float64)
        t = ((torch.arange(k, dtype=torch.float64) + u) * T / k).floor().long().clamp(0, T - 1)
        ts.append(t)
        noise.append(torch.randn((k, *shape), generator=g))
        lat.append(torch.randn((k, 2, *shape), generator=g))
    if not ts:
        return EvalDraws(
            torch.zeros(0, k, dtype=torch.long),
            torch.zeros(0, k, *shape),
            torch.zeros(0, k, 2, *shape),
        )
    return EvalDraws(torch.stack(ts), torch.stack(noise), torch.stack(lat))


# ----------------------------------------------------------------------------- errors


UNetFn = Callable[..., torch.Tensor]


def unet_call(unet: torch.nn.Module) -> UNetFn:
    def run(x, t, **kw):
        out = unet(x, t, **kw)
        if isinstance(out, torch.Tensor):
            return out
        return out.sample if hasattr(out, "sample") else out[0]

    return run


@dataclass
class PairInputs:
    """Decoded inputs of P pairs, in the reference's representation.

    mean/logvar: VAE posterior of winners then losers (2P, C, h, w) (logvar None in pixel space);
    cond: the P prompt embeddings; time_ids: (2P, 6) for SDXL-class models, else None."""

    mean: torch.Tensor
    logvar: torch.Tensor | None
    cond: PromptEmbeddings
    time_ids: torch.Tensor | None = None

    @property
    def num_pairs(self) -> int:
        return len(self.cond)


@torch.no_grad()
def branch_errors(
    model: DiffusionModel,
    unet: UNetFn,
    inputs: PairInputs,
    draws: EvalDraws,
    null: PromptEmbeddings,
    *,
    null_unet: UNetFn | None = None,
) -> torch.Tensor:
    """Per-sample errors e, (2 branches [cond, null], 2 [winner, loser], P, K), float32.

    ``model`` supplies the scheduler and prediction type; ``unet`` predicts; ``null_unet`` (a
    Diffusion-NPO negative model) replaces it on the null-prompt branch."""
    from snpo_kernels import per_sample_error

    p = inputs.num_pairs
    k = draws.timesteps.shape[1]
    device = inputs.mean.device
    dtype = inputs.cond.embeds.dtype
    null_p = null.to(device=device, dtype=dtype).expand(p)
    both = PromptEmbeddings.cat([inputs.cond, inputs.cond])
    nulls = PromptEmbeddings.cat([null_p, null_p])
    out = torch.empty(2, 2, p, k)
    sched = model.scheduler
    for j in range(k):
        eps_lat = torch.cat([draws.latent_noise[:, j, 0], draws.latent_noise[:, j, 1]]).to(device)
        x0 = sample_latents(inputs.mean.float(), inputs.logvar, eps_lat.float())
        noise = draws.noise[:, j].to(device)
        noise2 = torch.cat([noise, noise]).float()
        t2 = torch.cat([draws.timesteps[:, j], draws.timesteps[:, j]]).to(device)
        x_t = sched.add_noise(x0, noise2, t2).to(dtype)
        target = training_target(model, x0, noise2, t2)
        # two forwards of 2P rows each, the same shapes for every model: a model with the
        # reference's weights reproduces the reference's errors bit for bit (exact ties)
        tid = inputs.time_ids
        pc = unet(x_t, t2, **unet_conditioning(model, both, tid))
        pn = (null_unet or unet)(x_t, t2, **unet_conditioning(model, nulls, tid))
        e = torch.cat([per_sample_error(pc, target), per_sample_error(pn, target)]).float().cpu()
        out[:, :, :, j] = e.reshape(2, 2, p)
    return out


# ----------------------------------------------------------------------------- statistics


def bootstrap_ci(
    values: torch.Tensor,
    *,
    resamples: int = BOOTSTRAP,
    confidence: float = CONFIDENCE,
    seed: int = 0,
) -> tuple[float, float]:
    """Percentile bootstrap interval of the mean of ``values`` (N,) over resampled items."""
    v = values.double().flatten()
    n = v.numel()
    if n == 0:
        return (math.nan, math.nan)
    g = torch.Generator().manual_seed(seed)
    means = []
    for start in range(0, resamples, 250):
        b = min(250, resamples - start)
        idx = torch.randint(0, n, (b, n), generator=g)
        means.append(v[idx].mean(dim=1))
    m = torch.cat(means)
    lo = (1.0 - confidence) / 2.0
    q = torch.quantile(m, torch.tensor([lo, 1.0 - lo], dtype=torch.float64))
    return float(q[0]), float(q[1])


def _correct(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """1 where a < b, 1/2 where equal, else 0 (preferred margin a, rejected b)."""
    return (a < b).double() + 0.5 * (a == b).double()


def preference_metrics(margins: torch.Tensor, *, seed: int = 0) -> dict:
    """Metrics from margins m = e_model − e_ref, (2 [cond, null], 2 [w, l], N pairs, K draws).

    Values with 95 % percentile-bootstrap intervals over pairs; see the module docstring."""
    from snpo_kernels import preference_stats

    if margins.ndim != 4 or margins.shape[:2] != (2, 2):
        raise ValueError(f"margins must be (2, 2, N, K), got {tuple(margins.shape)}")
    n, k = margins.shape[2], margins.shape[3]
    m = margins.double()
    pair = m.mean(dim=3)  # (2, 2, N): margins averaged over the draws
    per_pair = {
        "accuracy_pos": _correct(pair[0, 0], pair[0, 1]),
        "accuracy_neg": _correct(pair[1, 1], pair[1, 0]),
        "winner_logp_proxy": -pair[0, 0],
        "preferred_logp_proxy_null": -pair[1, 1],
    }
    out: dict = {"pairs": n, "draws_per_pair": k}
    for i, (name, v) in enumerate(per_pair.items()):
        lo, hi = bootstrap_ci(v, seed=seed + i)
        out[name] = {"value": float(v.mean()) if n else math.nan, "ci": [lo, hi]}
    # per-draw statistics, the trainer's convention (docs/objectives.md), through snpo_kernels
    zeros = torch.zeros(n * k, dtype=torch.float64)
    flat_c = torch.cat([m[0, 0].flatten(), m[0, 1].flatten()])
    flat_n = torch.cat([m[1, 0].flatten(), m[1, 1].flatten()])
    sc = preference_stats(flat_c, torch.cat([zeros, zeros]))
    sn = preference_stats(flat_n, torch.cat([zeros, zeros]), torch.ones(n * k, dtype=torch.bool))
    out["per_draw"] = {
        "accuracy_pos": float(sc.accuracy_cond),
        "accuracy_neg": float(sn.accuracy_uncond),
        "winner_logp_proxy": float(sc.logp_proxy),
    }
    return out


# ----------------------------------------------------------------------------- pairs


def open_pairs(paths: list[str], max_pairs: int | None = None):
    """A pair source (snpo.data): Pick-a-Pic parquet files, or own pairs (JSONL/CSV)."""
    from .data import ConcatSource, OwnPairs, PickapicParquet

    parquet = [p for p in paths if Path(p).suffix.lower() == ".parquet"]
    own = [p for p in paths if Path(p).suffix.lower() in (".jsonl", ".json", ".csv")]
    other = sorted(set(paths) - set(parquet) - set(own))
    if other:
        raise EvalError(f"--pairs: {other} are neither .parquet nor .jsonl/.csv files")
    for p in paths:
        if not Path(p).is_file():
            raise EvalError(f"--pairs: {p} does not exist")
    sources = ([PickapicParquet(parquet)] if parquet else []) + [OwnPairs(p) for p in own]
    src = ConcatSource(sources)
    if max_pairs is not None and len(src) > max_pairs:
        src.offsets = [min(o, max_pairs) for o in src.offsets]
    if len(src) == 0:
        raise EvalError("--pairs: no usable (non-tie) pairs")
    return src


def load_pair_pixels(source, ids: list[int], resolution: int):
    """Decoded, center-cropped pairs: (kept ids, pixels (P, 2, 3, R, R) in [−1, 1], prompts,
    original sizes (P, 2, 2), crop offsets (P, 2, 2)) and the [(id, reason)] of bad pairs."""
    from .data import BadImageError, decode_image, transform_image

    keep, pix, prompts, sizes, crops, bad = [], [], [], [], [], []
    for i in ids:
        try:
            prompt, w, l_ = source.get(i)
            xs, ss, cs = [], [], []
            for data in (w, l_):
                x, s, c = transform_image(
                    decode_image(data),
                    resolution,
                    random_crop=False,
                    flip=False,
                    crop_fraction=(0, 0),
                )
                xs.append(x)
                ss.append(s)
                cs.append(c)
        except (OSError, ValueError, SyntaxError, KeyError, BadImageError) as err:
            bad.append((i, f"{source.describe(i)}: {type(err).__name__}: {err}"))
            continue
        keep.append(i)
        pix.append(torch.stack(xs))
        prompts.append(prompt)
        sizes.append(torch.tensor(ss))
        crops.append(torch.tensor(cs))
    if not keep:
        return [], None, [], None, None, bad
    return keep, torch.stack(pix), prompts, torch.stack(sizes), torch.stack(crops), bad


@torch.no_grad()
def encode_pairs(
    ref: DiffusionModel,
    pixels: torch.Tensor,
    prompts: list[str],
    sizes: torch.Tensor | None = None,
    crops: torch.Tensor | None = None,
) -> PairInputs:
    """Pixels (P, 2, 3, R, R) in [−1, 1] and prompts → :class:`PairInputs` (reference's VAE and
    text encoders, the UNet's dtype and device)."""
    from .models import time_ids as make_time_ids

    unet_p = next(ref.unet.parameters())
    device, dtype = unet_p.device, unet_p.dtype
    p = pixels.shape[0]
    flat = torch.cat([pixels[:, 0], pixels[:, 1]]).to(device)
    if ref.vae is not None:
        flat = flat.to(ref.vae.dtype)
    mean, logvar = encode_images(ref, flat)
    cond = encode_prompts(ref, prompts).to(device=device, dtype=dtype)
    tid = None
    if ref.family == "sdxl":
        res = pixels.shape[-1]
        if sizes is None:
            tid = make_time_ids(2 * p, (res, res), device=device, dtype=dtype)
        else:
            s = torch.cat([sizes[:, 0], sizes[:, 1]])
            c = torch.cat([crops[:, 0], crops[:, 1]])
            tgt = torch.tensor([res, res]).expand(2 * p, 2)
            tid = torch.cat([s, c, tgt], dim=1).to(device=device, dtype=dtype)
    return PairInputs(mean.float(), None if logvar is None else logvar.float(), cond, tid)


@dataclass
class EvalModel:
    name: str
    model: DiffusionModel
    info: dict
    null_kind: str
    negative_unet: torch.nn.Module | None = None
    negative_info: dict | None = None


def evaluate_pairs(
    reference: DiffusionModel,
    models: list[EvalModel],
    source,
    *,
    timesteps: int = 4,
    seed: int = 0,
    batch_size: int = 4,
    resolution: int | None = None,
    ref_null_kind: str | None = None,
    progress: bool = True,
) -> tuple[dict[str, torch.Tensor], dict]:
    """Margins (2, 2, N, K) per model over all good pairs of ``source``, and run facts."""
    from tqdm.auto import tqdm

    from .sample import null_for

    if timesteps < 1:
        raise EvalError("--timesteps must be ≥ 1")
    res = resolution or reference.unet.config.sample_size * reference.latent_scale
    side = res // reference.latent_scale
    latent_shape = (reference.in_channels, side, side)
    T = int(reference.scheduler.config.num_train_timesteps)
    kinds = sorted({m.null_kind for m in models})
    nulls = {kd: null_for(reference, kd) for kd in kinds}
    ref_fn = unet_call(reference.unet)
    margins: dict[str, list[torch.Tensor]] = {m.name: [] for m in models}
    n_bad, bad_examples, kept = 0, [], []
    ids = list(range(len(source)))
    bar = tqdm(total=len(ids), desc="eval pairs", unit="pair", disable=not progress)
    for start in range(0, len(ids), batch_size):
        chunk = ids[start : start + batch_size]
        keep, pix, prompts, sizes, crops, bad = load_pair_pixels(source, chunk, res)
        n_bad += len(bad)
        bad_examples += [why for _, why in bad][: max(0, 5 - len(bad_examples))]
        bar.update(len(chunk))
        if not keep:
            continue
        kept += keep
        inputs = encode_pairs(reference, pix, prompts, sizes, crops)
        draws = eval_draws(seed, keep, timesteps, latent_shape, T)
        ref_err = {kd: branch_errors(reference, ref_fn, inputs, draws, nulls[kd]) for kd in kinds}
        for m in models:
            e = branch_errors(
                m.model,
                unet_call(m.model.unet),
                inputs,
                draws,
                nulls[m.null_kind],
                null_unet=None if m.negative_unet is None else unet_call(m.negative_unet),
            )
            margins[m.name].append(e - ref_err[m.null_kind])
    bar.close()
    if not kept:
        raise EvalError(f"no usable pairs: all {n_bad} were bad (e.g. {bad_examples[:2]})")
    out = {name: torch.cat(v, dim=2) for name, v in margins.items()}
    facts = {
        "pairs": len(kept),
        "bad_pairs": n_bad,
        "bad_examples": bad_examples,
        "resolution": res,
        "timesteps_per_pair": timesteps,
        "seed": seed,
        "ref_null_kind": ref_null_kind,
    }
    return out, facts


def check_comparable(reference: DiffusionModel, model: DiffusionModel, label: str) -> None:
    from .sample import SampleError, check_negative_compatible

    try:
        check_negative_compatible(reference, model, label)
    except SampleError as err:
        raise EvalError(str(err).replace("negative", "compared")) from err
    if reference.prediction_type != model.prediction_type:
        raise EvalError(
            f"{label}: predicts {model.prediction_type}, the reference {reference.prediction_type}"
        )


def _fmt_pct(d: dict) -> str:
    v, (lo, hi) = d["value"], d["ci"]
    return f"{100 * v:.1f} % [{100 * lo:.1f}, {100 * hi:.1f}]"


def _fmt_sci(d: dict) -> str:
    v, (lo, hi) = d["value"], d["ci"]
    return f"{v:+.3e} [{lo:+.2e}, {hi:+.2e}]"


def preference_table(results: dict[str, dict]) -> str:
    lines = [
        "| model | positive acc. (cond., normal labels) | negative acc. (null, reversed labels) "
        "| winner log-lik. proxy −m_w (cond.) | pairs |",
        "| --- | --- | --- | --- | --- |",
    ]
    for name, r in results.items():
        lines.append(
            f"| {name} | {_fmt_pct(r['accuracy_pos'])} | {_fmt_pct(r['accuracy_neg'])} | "
            f"{_fmt_sci(r['winner_logp_proxy'])} | {r['pairs']} |"
        )
    return "\n".join(lines) + "\n"


# ----------------------------------------------------------------------------- rewards


def image_records(images_dir: str | Path) -> list[dict]:
    """Images to score: from a ``snpo sample`` manifest, or MODEL/*.png with .txt prompts."""
    from .sample import MANIFEST

    d = Path(images_dir)
    if not d.is_dir():
        raise EvalError(f"--images {d} is not a folder")
    mf = d / MANIFEST
    if mf.is_file():
        man = json.loads(mf.read_text())
        recs = []
        for r in man["images"]:
            recs.append(
                {
                    "model": r["model"],
                    "prompt": r["prompt"],
                    "prompt_index": r["prompt_index"],
                    "seed": r["seed"],
                    "path": str(d / r["file"]),
                }
            )
        return recs
    recs = []
    prompts: dict[str, int] = {}
    for sub in sorted(p for p in d.iterdir() if p.is_dir()):
        for png in sorted(sub.glob("*.png")):
            txt = png.with_suffix(".txt")
            if not txt.is_file():
                raise EvalError(f"{png} has no {txt.name} with its prompt (and {d} no {MANIFEST})")
            prompt = txt.read_text(encoding="utf-8").strip()
            pi = prompts.setdefault(prompt, len(prompts))
            recs.append(
                {
                    "model": sub.name,
                    "prompt": prompt,
                    "prompt_index": pi,
                    "seed": 0,
                    "path": str(png),
                }
            )
    if not recs:
        raise EvalError(f"no images in {d}: expected a {MANIFEST} or MODEL/*.png + .txt prompts")
    return recs


def score_records(
    records: list[dict], scorers: dict, *, batch_size: int = 16, progress=True
) -> None:
    """Adds records[i]["scores"][metric] for every scorer (in place)."""
    from PIL import Image
    from tqdm.auto import tqdm

    bar = tqdm(total=len(records) * len(scorers), desc="rewards", unit="img", disable=not progress)
    for r in records:
        r.setdefault("scores", {})
    for name, scorer in scorers.items():
        for start in range(0, len(records), batch_size):
            chunk = records[start : start + batch_size]
            images = [Image.open(r["path"]).convert("RGB") for r in chunk]
            values = scorer.score(images, [r["prompt"] for r in chunk])
            for r, v in zip(chunk, values):
                r["scores"][name] = float(v)
            bar.update(len(chunk))
    bar.close()


def summarize_rewards(records: list[dict], metrics: list[str]) -> dict:
    """Per model and metric: mean over prompts per seed, then mean and std over seeds."""
    out: dict = {}
    for model in dict.fromkeys(r["model"] for r in records):
        rs = [r for r in records if r["model"] == model]
        entry: dict = {"images": len(rs), "prompts": len({r["prompt_index"] for r in rs})}
        for metric in metrics:
            per_seed: dict[int, list[float]] = {}
            for r in rs:
                per_seed.setdefault(int(r["seed"]), []).append(r["scores"][metric])
            means = {s: sum(v) / len(v) for s, v in sorted(per_seed.items())}
            vals = torch.tensor(list(means.values()), dtype=torch.float64)
            std = float(vals.std(unbiased=True)) if len(vals) > 1 else 0.0
            entry[metric] = {
                "mean": float(vals.mean()),
                "std_over_seeds": std,
                "per_seed": {str(s): m for s, m in means.items()},
            }
        out[model] = entry
    return out


def rewards_table(summary: dict, metrics: list[str]) -> str:
    from .rewards import DISPLAY, METRICS

    cols = [m for m in METRICS if m in metrics]
    lines = [
        "| model | " + " | ".join(DISPLAY[c] for c in cols) + " | images |",
        "| --- | " + " | ".join("---" for _ in cols) + " | --- |",
    ]
    for name, e in summary.items():
        cells = [f"{e[c]['mean']:.4g} ± {e[c]['std_over_seeds']:.2g}" for c in cols]
        lines.append(f"| {name} | " + " | ".join(cells) + f" | {e['images']} |")
    return "\n".join(lines) + "\n"


# ----------------------------------------------------------------------------- CLI


def build_parser() -> argparse.ArgumentParser:
    from .sample import add_model_args

    ap = argparse.ArgumentParser(
        prog="snpo eval",
        description="Implicit preference accuracy on held-out pairs (--pairs) and reward scores "
        "of generated images (--rewards).",
    )
    add_model_args(ap)
    ap.add_argument("--out", required=True, help="output folder for the JSON and markdown tables")
    g = ap.add_argument_group("preference pairs")
    g.add_argument("--pairs", action="append", help="Pick-a-Pic parquet or own pairs JSONL/CSV")
    g.add_argument("--reference", help="the reference (base) model of the margins")
    g.add_argument("--timesteps", type=int, default=4, help="draws (timesteps) per pair (4)")
    g.add_argument("--max-pairs", type=int, default=None, help="use the first N pairs")
    g.add_argument("--seed", type=int, default=0, help="seed of the draws (0)")
    g.add_argument("--batch-size", type=int, default=4, help="pairs per forward (4)")
    g.add_argument("--resolution", type=int, default=None, help="pixels (default: the UNet's)")
    r = ap.add_argument_group("rewards")
    r.add_argument("--rewards", help="comma list of pickscore, hpsv2, imagereward, aesthetic")
    r.add_argument("--images", help="a `snpo sample` output folder (or MODEL/*.png + .txt)")
    r.add_argument("--prompts", help="prompt file: sample the --model's first, then score")
    r.add_argument("--sample-seeds", default="0,1,2,3", help="seeds when sampling (0-3)")
    r.add_argument("--guidance", type=float, default=7.5, help="CFG when sampling (7.5)")
    r.add_argument("--steps", type=int, default=50, help="steps when sampling (50)")
    r.add_argument(
        "--pickscore-model", help=f"PickScore CLIP (default {'yuvalkirstain/PickScore_v1'})"
    )
    r.add_argument("--pickscore-processor", help="its processor (default the LAION CLIP-H one)")
    r.add_argument("--hps-checkpoint", help="HPS_v2.1_compressed.pt (needs hpsv2/open_clip)")
    r.add_argument("--imagereward-checkpoint", help="ImageReward.pt (needs image-reward)")
    r.add_argument("--imagereward-med-config", help="ImageReward's med_config.json")
    r.add_argument("--aesthetic-head", help="LAION aesthetic head (.pth or .safetensors)")
    r.add_argument("--aesthetic-clip", help="CLIP ViT-L/14 for it (openai/clip-vit-large-patch14)")
    r.add_argument("--reward-batch-size", type=int, default=16)
    r.add_argument(
        "--trust-pickle",
        action="store_true",
        help="unpickle an --hps-checkpoint / --aesthetic-head .pt in full when it holds more "
        "than tensors (runs code from the file: only for files you trust; off by default, "
        "when such a file is refused; a .safetensors copy needs no trust)",
    )
    ap.add_argument("--no-progress", action="store_true")
    return ap


def _write(path: Path, text: str) -> None:
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(text, encoding="utf-8")
    tmp.replace(path)


def run_preference(args, out: Path) -> dict:
    from .sample import build_entries, load_any, model_specs, resolve_device, resolve_dtype

    if not args.reference:
        raise EvalError("--pairs needs --reference (the base model the margins are taken against)")
    models, negatives = model_specs(args)
    device = resolve_device(args.device)
    # margins are small differences of errors: float32 unless asked otherwise
    dtype = torch.float32 if args.dtype == "auto" else resolve_dtype(args.dtype, device)
    ref, ref_info = load_any(args.reference, dtype=dtype, device=device, base_model=args.base_model)
    entries = build_entries(
        models, negatives, dtype=dtype, device=device, base_model=args.base_model
    )
    ems = []
    for e in entries:
        check_comparable(ref, e.model, f"--model {e.name}")
        kind = e.negative_info["null_kind"] if e.negative_info else e.info["null_kind"]
        ems.append(EvalModel(e.name, e.model, e.info, kind, e.negative_unet, e.negative_info))
    for m in ems:  # the reference's VAE and text encoders serve every model: free the others
        if m.model is not ref:
            m.model.text_encoders, m.model.tokenizers, m.model.vae = [], [], None
    source = open_pairs(args.pairs, args.max_pairs)
    margins, facts = evaluate_pairs(
        ref,
        ems,
        source,
        timesteps=args.timesteps,
        seed=args.seed,
        batch_size=args.batch_size,
        resolution=args.resolution,
        ref_null_kind=ref_info["null_kind"],
        progress=not args.no_progress,
    )
    results = {name: preference_metrics(m, seed=args.seed) for name, m in margins.items()}
    report = {
        "settings": {
            **facts,
            "pairs_files": args.pairs,
            "reference": args.reference,
            "models": {e.name: e.info["source"] for e in entries},
            "negatives": {e.name: e.negative_info["source"] for e in entries if e.negative_info},
            "null_kinds": {m.name: m.null_kind for m in ems},
            "ci": f"{int(CONFIDENCE * 100)}% percentile bootstrap over pairs, {BOOTSTRAP} resamples",
            "margin": "m = e_model - e_ref, per-sample mean squared prediction error, averaged "
            "over the draws of a pair",
        },
        "models": results,
    }
    _write(out / "preference.json", json.dumps(report, indent=2))
    head = (
        f"Implicit preference accuracy vs the reference `{args.reference}` on {facts['pairs']} "
        f"pairs ({facts['bad_pairs']} bad skipped), {args.timesteps} draws per pair, seed "
        f"{args.seed}; 95 % percentile-bootstrap intervals over pairs.\n\n"
    )
    _write(out / "preference.md", head + preference_table(results))
    return report


def run_rewards(args, out: Path) -> dict:
    from .rewards import build_scorers
    from .sample import (
        build_entries,
        model_specs,
        parse_seeds,
        read_prompts,
        resolve_device,
        resolve_dtype,
        run_sampling,
    )

    metrics = [m.strip().lower() for m in args.rewards.split(",") if m.strip()]
    device = resolve_device(args.device)
    opts = {
        k: getattr(args, k)
        for k in (
            "pickscore_model",
            "pickscore_processor",
            "hps_checkpoint",
            "imagereward_checkpoint",
            "imagereward_med_config",
            "aesthetic_head",
            "aesthetic_clip",
            "trust_pickle",
        )
    }
    scorers = build_scorers(metrics, opts, device=device)  # fail early, before sampling
    images = args.images
    if images is None:
        if not args.prompts:
            raise EvalError("--rewards needs --images DIR, or --model … with --prompts FILE")
        models, negatives = model_specs(args)
        entries = build_entries(
            models,
            negatives,
            dtype=resolve_dtype(args.dtype, device),
            device=device,
            base_model=args.base_model,
        )
        images = out / "samples"
        run_sampling(
            entries,
            read_prompts(args.prompts),
            parse_seeds(args.sample_seeds),
            images,
            guidance_scale=args.guidance,
            steps=args.steps,
            batch_size=max(1, args.batch_size),
            progress=not args.no_progress,
        )
        del entries
    records = image_records(images)
    score_records(
        records, scorers, batch_size=args.reward_batch_size, progress=not args.no_progress
    )
    summary = summarize_rewards(records, metrics)
    report = {
        "settings": {"images": str(images), "metrics": metrics, "reward_options": opts},
        "models": summary,
        "images": records,
    }
    _write(out / "rewards.json", json.dumps(report, indent=2))
    head = (
        f"Reward scores of `{images}`: per model, mean over prompts per seed, then mean ± std "
        "over seeds.\n\n"
    )
    _write(out / "rewards.md", head + rewards_table(summary, metrics))
    return report


def main(argv: list[str] | None = None) -> int:
    from .export import ExportError
    from .rewards import RewardError
    from .sample import SampleError

    args = build_parser().parse_args(argv)
    if not args.pairs and not args.rewards:
        print(
            "snpo eval: error: give --pairs (preference accuracy) and/or --rewards", file=sys.stderr
        )
        return 2
    out = Path(args.out)
    try:
        out.mkdir(parents=True, exist_ok=True)
        if args.pairs:
            rep = run_preference(args, out)
            print(preference_table(rep["models"]), end="")
        if args.rewards:
            rep = run_rewards(args, out)
            print(rewards_table(rep["models"], rep["settings"]["metrics"]), end="")
    except (EvalError, SampleError, ModelLoadError, ExportError, RewardError) as err:
        print(f"snpo eval: error: {err}", file=sys.stderr)
        return 2
    print(f"snpo eval: results in {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
