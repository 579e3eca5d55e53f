"""Implicit preference accuracy of models on held-out pairs (``snpo eval --pairs``).

    snpo eval --pairs val.parquet --reference BASE --model snpo=EXPORT [--model dpo=…] \\
        [--negative npo=MERGED] [--timesteps 8] [--max-pairs 500] --out runs/eval

For every pair (winner first, ties dropped: Pick-a-Pic parquet or own
pairs as JSONL/CSV, :mod:`snpo.data`) and each of K draws, winner and loser are noised with the
same noise level and noise, through the model's family exactly as the trainer noises them
(:func:`snpo.step.noised_inputs`: DDPM x_t and ε/v target, or flow x_t = (1 − σ)·x0 + σ·ε and
velocity target); every model and the reference predict on both branches — the pair's prompt (conditional)
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
(:func:`snpo.draws.generator`, a stream of its own) gives K stratified uniforms
u_j ∈ [j/K, (j+1)/K), the noise and the VAE-posterior noise — so every model sees exactly the
same noisy inputs, whatever the batch size or the set of models. ε-families take the timestep
t_j = ⌊u_j·T⌋ (one per stratum of [0, T)); flow families the level σ(u_j) of their training
σ distribution (logit-normal, shifted by the scheduler's shift: stratified quantiles of it).
Latents and text embeddings come from the reference's VAE and text encoders (the compared models
are fine-tuned denoisers of the same base; their family and denoiser interface are checked).
Guidance-distilled (FLUX-class) models have no null branch: their "null" columns are reported
as n/a, and model and reference run at the model's embedded guidance. Confidence intervals: 95 % percentile
bootstrap over pairs (2000 resamples, seeded), which covers the draw noise within pairs too.
Output: ``preference.{json,md}``.
"""

from __future__ import annotations

import json
import math
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch

from snpo.atomic import atomic_write_text
from snpo.draws import PairDraws
from snpo.models import (
    DiffusionModel,
    IncompatibleModelError,
    ModelFamily,
    PromptEmbeddings,
    encode_images,
    encode_prompts,
    load_any,
    null_for,
    resolve_device,
    resolve_dtype,
    sample_latents,
)
from snpo.models.trained import check_interface, default_resolution
from snpo.step import EncodedBatch, StepModels, noised_inputs, unet_fn

STREAM_EVAL = 17  # snpo.draws streams 1–3 are the trainer's; evaluation draws never collide
BOOTSTRAP = 2000
CONFIDENCE = 0.95


class EvalError(RuntimeError):
    """Bad evaluation arguments or inputs (the message says which)."""


# ----------------------------------------------------------------------------- draws


_U_MIN, _U_MAX = 2.0**-54, 1.0 - 2.0**-53  # u stays strictly inside (0, 1)


@dataclass
class EvalDraws:
    """Draws of P pairs × K draws: timesteps (P, K) int64, noise (P, K, C, h, w) shared by
    winner and loser, latent_noise (P, K, 2, C, h, w) for the VAE posterior of winner, loser,
    u (P, K) float64 in (0, 1): the stratified uniform of flow families (t = ⌊u·T⌋)."""

    timesteps: torch.Tensor
    noise: torch.Tensor
    latent_noise: torch.Tensor
    u: torch.Tensor

    def pair_draws(self, j: int, ids: list[int], uncond: bool) -> PairDraws:
        """Draw j of the P pairs as the trainer's :class:`snpo.draws.PairDraws` (every pair on
        the null-prompt branch when ``uncond``; no flips or crops)."""
        p = self.timesteps.shape[0]
        return PairDraws(
            indices=torch.tensor(ids, dtype=torch.long),
            noise=self.noise[:, j],
            timesteps=self.timesteps[:, j],
            uncond=torch.full((p,), bool(uncond)),
            latent_noise=self.latent_noise[:, j],
            flip=torch.zeros(p, 2, dtype=torch.bool),
            crop=torch.zeros(p, 2, 2, dtype=torch.float64),
            u=self.u[:, j],
        )


def eval_draws(
    seed: int,
    pair_ids: list[int],
    k: int,
    latent_shape: tuple[int, ...],
    num_train_timesteps: int,
) -> EvalDraws:
    """Draws of each pair from (seed, pair id) alone (independent of batch and models)."""
    from snpo.draws import generator

    ts, noise, lat, us = [], [], [], []
    shape = tuple(int(s) for s in latent_shape)
    T = int(num_train_timesteps)
    for i in pair_ids:
        g = generator(seed, 0, int(i), STREAM_EVAL)
        u = torch.rand(k, generator=g, dtype=torch.float64)
        t = ((torch.arange(k, dtype=torch.float64) + u) * T / k).floor().long().clamp(0, T - 1)
        ts.append(t)
        us.append(((torch.arange(k, dtype=torch.float64) + u) / k).clamp(_U_MIN, _U_MAX))
        noise.append(torch.randn((k, *shape), generator=g))
        lat.append(torch.randn((k, 2, *shape), generator=g))
    if not ts:
        return EvalDraws(
            torch.zeros(0, k, dtype=torch.long),
            torch.zeros(0, k, *shape),
            torch.zeros(0, k, 2, *shape),
            torch.zeros(0, k, dtype=torch.float64),
        )
    return EvalDraws(torch.stack(ts), torch.stack(noise), torch.stack(lat), torch.stack(us))


# ----------------------------------------------------------------------------- errors


UNetFn = Callable[..., torch.Tensor]


@dataclass
class _Output:
    sample: torch.Tensor


def unet_call(unet: torch.nn.Module, family: ModelFamily | None = None) -> UNetFn:
    """The denoiser ``unet`` as x_t, timestep, **cond → prediction, called the way ``family``
    calls it (:func:`snpo.step.unet_fn`; None: a UNet). A module returning a bare tensor (a
    wrapper, a test double) is accepted too."""

    def module(*args, **kw):
        out = unet(*args, **kw)
        return _Output(out) if isinstance(out, torch.Tensor) else out

    return unet_fn(module, family)


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

    ``model`` supplies the family's noising, target and conditioning
    (:func:`snpo.step.noised_inputs` on the draws as :class:`snpo.draws.PairDraws`); ``unet``
    predicts; ``null_unet`` (a Diffusion-NPO negative model) replaces it on the null-prompt
    branch."""
    from snpo_kernels import per_sample_error

    p = inputs.num_pairs
    k = draws.timesteps.shape[1]
    device = inputs.mean.device
    dtype = inputs.cond.embeds.dtype
    step_models = StepModels(model, None, None, null, device, dtype)
    out = torch.empty(2, 2, p, k)
    ids = list(range(p))
    for j in range(k):
        eps_lat = torch.cat([draws.latent_noise[:, j, 0], draws.latent_noise[:, j, 1]]).to(device)
        x0 = sample_latents(inputs.mean.float(), inputs.logvar, eps_lat.float())
        batch = EncodedBatch(x0, inputs.cond, inputs.time_ids)
        # two forwards of 2P rows each, the same shapes for every model: a model with the
        # reference's weights reproduces the reference's errors bit for bit (exact ties)
        errs = []
        for uncond, fn in ((False, unet), (True, null_unet or unet)):
            d = draws.pair_draws(j, ids, uncond)
            x_t, t2, target, cond = noised_inputs(step_models, batch, d)
            errs.append(per_sample_error(fn(x_t, t2, **cond), target))
        e = torch.cat(errs).float().cpu()
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


def open_pairs(
    paths: list[str], max_pairs: int | None = None, *, allow_outside_paths: bool = False
):
    """A pair source (:mod:`snpo.data`): Pick-a-Pic parquet files, or own pairs (JSONL/CSV);
    image paths are checked as the trainer checks them (``allow_outside_paths``)."""
    from snpo.data import ConcatSource, OwnPairs, PickapicParquet

    parquet = [p for p in paths if Path(p).suffix.lower() == ".parquet"]
    own = [p for p in paths if Path(p).suffix.lower() in (".jsonl", ".json", ".csv")]
    other = sorted(set(paths) - set(parquet) - set(own))
    if other:
        raise EvalError(f"--pairs: {other} are neither .parquet nor .jsonl/.csv files")
    for p in paths:
        if not Path(p).is_file():
            raise EvalError(f"--pairs: {p} does not exist")
    allow = {"allow_outside_paths": allow_outside_paths}
    sources = [PickapicParquet(parquet, **allow)] if parquet else []
    sources += [OwnPairs(p, **allow) for p in own]
    src = ConcatSource(sources).cap(max_pairs)
    if len(src) == 0:
        st = src.stats
        raise EvalError(
            f"--pairs: no usable (non-tie) pairs in {', '.join(str(p) for p in paths)}: "
            f"{st.rows} row(s) read, {st.ties_dropped} of them ties or unlabelled and dropped"
        )
    return src


def load_pair_pixels(source, ids: list[int], resolution: int):
    """Decoded, center-cropped, unflipped pairs: (kept ids, pixels (P, 2, 3, R, R) in [−1, 1],
    prompts, original sizes (P, 2, 2), crop offsets (P, 2, 2)) and the [(id, reason)] of bad
    pairs. Decoding and the bad-image rule are the trainer's (:class:`snpo.data.PairDataset`,
    ``on_bad_image: skip``): a pair with an undecodable image is bad and skipped."""
    from snpo.data import PairDataset

    data = PairDataset(source, resolution=resolution, seed=0, random_crop=False, random_flip=False)
    items = [data[(0, i)] for i in ids]
    bad = [(it["index"], it["bad"]) for it in items if it["bad"] is not None]
    good = [it for it in items if it["bad"] is None]
    if not good:
        return [], None, [], None, None, bad
    return (
        [it["index"] for it in good],
        torch.stack([it["pixels"] for it in good]),
        [it["prompt"] for it in good],
        torch.stack([it["original_size"] for it in good]),
        torch.stack([it["crop_top_left"] for it in good]),
        bad,
    )


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
    from snpo.models import time_ids as make_time_ids

    unet_p = next(ref.unet.parameters())
    device, dtype = unet_p.device, unet_p.dtype
    p = pixels.shape[0]
    flat = torch.cat([pixels[:, 0], pixels[:, 1]]).to(device)
    if ref.vae is not None:
        flat = flat.to(ref.vae.dtype)
    mean, logvar = encode_images(ref, flat)
    cond = encode_prompts(ref, prompts).to(device=device, dtype=dtype)
    tid = None
    if ref.spec.needs_time_ids:
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

    if timesteps < 1:
        raise EvalError("--timesteps must be ≥ 1")
    res = resolution or default_resolution(reference)
    check_eval_resolution(reference, res)
    side = res // reference.latent_scale
    latent_shape = (reference.in_channels, side, side)
    T = int(reference.scheduler.config.num_train_timesteps)
    kinds = sorted({m.null_kind for m in models})
    nulls = {kd: null_for(reference, kd) for kd in kinds}
    fam = reference.spec
    ref_fn = unet_call(reference.unet, fam)
    # the reference runs with each model's conditioning settings (FLUX: its embedded guidance)
    keys = {m.name: (m.null_kind, embedded_guidance(m.model)) for m in models}
    refs = {key: with_guidance(reference, key[1]) for key in set(keys.values())}
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
        ref_err = {
            key: branch_errors(r, ref_fn, inputs, draws, nulls[key[0]]) for key, r in refs.items()
        }
        for m in models:
            e = branch_errors(
                m.model,
                unet_call(m.model.unet, fam),
                inputs,
                draws,
                nulls[m.null_kind],
                null_unet=None if m.negative_unet is None else unet_call(m.negative_unet, fam),
            )
            margins[m.name].append(e - ref_err[keys[m.name]])
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
        "family": reference.family,
        "null_branch": fam.has_null_branch,
    }
    return out, facts


def embedded_guidance(model: DiffusionModel) -> float | None:
    """The embedded guidance a guidance-distilled model runs at (``model.extra``), else None."""
    if model.spec.has_null_branch:
        return None
    return model.extra.get("guidance_scale")


def with_guidance(model: DiffusionModel, guidance: float | None) -> DiffusionModel:
    """``model`` (same modules) conditioned at embedded guidance ``guidance`` (None: as is)."""
    if guidance is None:
        return model
    from dataclasses import replace

    return replace(model, extra={**model.extra, "guidance_scale": guidance})


def check_eval_resolution(model: DiffusionModel, resolution: int) -> None:
    """Transformers need sides that are multiples of the VAE factor × 2 (2×2 patches)."""
    step = model.latent_scale * 2
    if model.spec.denoiser == "transformer" and (resolution < step or resolution % step):
        raise EvalError(
            f"--resolution {resolution}: {model.family}-class models need a multiple of {step}"
        )


def check_comparable(reference: DiffusionModel, model: DiffusionModel, label: str) -> None:
    """``model`` is comparable with ``reference``: same family, denoiser interface, prediction
    type."""
    try:
        check_interface(reference, model, label, "compared")
    except IncompatibleModelError as err:
        raise EvalError(str(err)) from err
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


def preference_table(results: dict[str, dict], null_branch: bool = True) -> str:
    """The markdown table of :func:`preference_metrics` per model (``null_branch`` False:
    the null-branch column is n/a, guidance-distilled models have none)."""
    lines = [
        "| model | positive acc. (cond., normal labels) | negative acc. (null, reversed labels) "
        "| winner log-lik. proxy −m_w (cond.) | pairs |",
        "| --- | --- | --- | --- | --- |",
    ]
    for name, r in results.items():
        lines.append(
            f"| {name} | {_fmt_pct(r['accuracy_pos'])} | "
            f"{_fmt_pct(r['accuracy_neg']) if null_branch else 'n/a (no null branch)'} | "
            f"{_fmt_sci(r['winner_logp_proxy'])} | {r['pairs']} |"
        )
    return "\n".join(lines) + "\n"


def evaluate_preference(
    reference: str,
    models: dict[str, str],
    pairs: list[str],
    out: str | Path,
    *,
    negatives: dict[str, str] | None = None,
    timesteps: int = 4,
    max_pairs: int | None = None,
    seed: int = 0,
    batch_size: int = 4,
    resolution: int | None = None,
    device: str = "auto",
    dtype: str = "auto",
    base_model: str | None = None,
    allow_outside_paths: bool = False,
    progress: bool = True,
) -> dict:
    """Implicit preference accuracy of ``models`` (name → source) against ``reference`` on
    ``pairs``; writes ``out/preference.{json,md}`` and returns the report
    {"settings", "models": name → :func:`preference_metrics`}.

    ``negatives``: name → source of a Diffusion-NPO negative model for that model's null-prompt
    branch; ``dtype`` "auto" is float32 here (margins are small differences of errors)."""
    from snpo.tools.sample import build_entries

    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    source = open_pairs(pairs, max_pairs, allow_outside_paths=allow_outside_paths)
    device = resolve_device(device)
    torch_dtype = torch.float32 if dtype == "auto" else resolve_dtype(dtype, device)
    ref, ref_info = load_any(reference, dtype=torch_dtype, device=device, base_model=base_model)
    entries = build_entries(
        models, negatives or {}, dtype=torch_dtype, device=device, base_model=base_model
    )
    ems = []
    for e in entries:
        check_comparable(ref, e.model, f"--model {e.name}")
        kind = e.negative_info["null_kind"] if e.negative_info else e.info["null_kind"]
        ems.append(EvalModel(e.name, e.model, e.info, kind, e.negative_unet, e.negative_info))
    for m in ems:  # the reference's VAE and text encoders serve every model: free the others
        if m.model is not ref:
            m.model.text_encoders, m.model.tokenizers, m.model.vae = [], [], None
    margins, facts = evaluate_pairs(
        ref,
        ems,
        source,
        timesteps=timesteps,
        seed=seed,
        batch_size=batch_size,
        resolution=resolution,
        ref_null_kind=ref_info["null_kind"],
        progress=progress,
    )
    results = {name: preference_metrics(m, seed=seed) for name, m in margins.items()}
    report = {
        "settings": {
            **facts,
            "pairs_files": list(pairs),
            "reference": reference,
            "models": {e.name: e.info["source"] for e in entries},
            "negatives": {e.name: e.negative_info["source"] for e in entries if e.negative_info},
            "null_kinds": {m.name: m.null_kind for m in ems},
            "ci": f"{int(CONFIDENCE * 100)}% percentile bootstrap over pairs, {BOOTSTRAP} resamples",
            "margin": "m = e_model - e_ref, per-sample mean squared prediction error, averaged "
            "over the draws of a pair",
        },
        "models": results,
    }
    atomic_write_text(out / "preference.json", json.dumps(report, indent=2))
    head = (
        f"Implicit preference accuracy vs the reference `{reference}` on {facts['pairs']} "
        f"pairs ({facts['bad_pairs']} bad skipped), {timesteps} draws per pair, seed "
        f"{seed}; 95 % percentile-bootstrap intervals over pairs.\n\n"
    )
    table = preference_table(results, facts["null_branch"])
    atomic_write_text(out / "preference.md", head + table)
    return report
