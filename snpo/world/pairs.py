"""Preference pairs from a model's own samples, ranked by the known reward.

Like Pick-a-Pic (one prompt, images from several generators, a person picks one), for each
prompt the model draws K candidates with classifier-free guidance, candidate j using the
guidance scale ``scales[j mod len(scales)]`` (a different "generator" per scale) and the
initial-noise seed

    seed_j(prompt) = seed·1_000_000 + prompt_id·1_000 + j,   prompt_id = all_prompts().index

so a candidate does not depend on which other prompts are asked for. Each candidate is rounded
to 8 bits (what the PNG stores) and scored with :func:`snpo.world.reward.reward`. Every pair
(a, b), a < b, of one prompt's candidates with |r_a − r_b| ≥ ``tie_threshold`` becomes a
preference row (the higher reward wins; the winner's side is random); a pair closer than that
is a near-tie: kept as a tie row (labels 0.5/0.5, has_label False, best_image_uid "none") with
probability ``tie_keep``, else dropped. ``max_pairs_per_prompt`` keeps a random subset.
All randomness after sampling comes from ``random.Random(seed)``.

Splits (docs/world.md): "train" = the 64 training prompts with seed SEEDS["pairs_train"];
"heldout" = all 80 prompts with seed SEEDS["pairs_heldout"] (new noise for the training prompts,
and the 16 held-out prompts; ``Prompt.heldout`` tells them apart).
"""

from __future__ import annotations

import json
import random
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch

from .pickapic import Row, encode_png, image_uid, write_parquet
from .reward import COMPONENTS, quantize, reward_components
from .vocab import SEEDS, Prompt, all_prompts, ordered_prompts

DEFAULT_SCALES: tuple[float, ...] = (1.0, 2.0, 3.0, 5.0, 7.0)
DEFAULT_CANDIDATES = 5
DEFAULT_STEPS = 20
DEFAULT_TIE_THRESHOLD = 0.03
DEFAULT_TIE_KEEP = 0.2
SPLITS: dict[str, tuple[str, str]] = {
    "train": ("train", "pairs_train"),
    "heldout": ("all", "pairs_heldout"),
}


def candidate_seed(seed: int, prompt: Prompt, j: int) -> int:
    """seed·1_000_000 + prompt_id·1_000 + j (module docstring); j < 1000."""
    if not 0 <= j < 1000:
        raise ValueError(f"candidate index must be in [0, 1000), got {j}")
    return int(seed) * 1_000_000 + all_prompts().index(prompt) * 1_000 + j


@dataclass
class Candidate:
    """One sampled image of a prompt, 8-bit-rounded, with its reward."""

    prompt: Prompt
    j: int
    seed: int
    guidance_scale: float
    image: torch.Tensor  # (3, S, S) in [0, 1], multiples of 1/255
    reward: float
    components: dict[str, float]
    uid: str
    generator: str  # model name @ guidance scale: the Pick-a-Pic "model_k"


@dataclass
class PairSet:
    """What :func:`generate_pairs` produced."""

    rows: list[Row]
    candidates: list[Candidate]
    stats: dict = field(default_factory=dict)


def _model_name(model) -> str:
    src = getattr(model, "source", None) or "model"
    return Path(str(src).rstrip("/")).name or "model"


def sample_candidates(
    model,
    prompts: list[Prompt],
    *,
    candidates: int = DEFAULT_CANDIDATES,
    guidance_scales: tuple[float, ...] = DEFAULT_SCALES,
    steps: int = DEFAULT_STEPS,
    seed: int | None = None,
    batch_size: int = 64,
    scheduler: str = "ddim",
    progress: bool = True,
    name: str | None = None,
) -> list[Candidate]:
    """K = ``candidates`` CFG samples per prompt from ``model`` (a ``snpo.models.DiffusionModel``),
    scored with the reward; ordered by prompt, then j."""
    from snpo.models import encode_prompts, generate, null_embedding

    if candidates < 1 or not guidance_scales:
        raise ValueError("need at least one candidate and one guidance scale")
    seed = int(SEEDS["pairs_train"]) if seed is None else int(seed)
    name = name or _model_name(model)
    texts = [p.text for p in prompts]
    emb = encode_prompts(model, texts)
    null = null_embedding(model)
    jobs: dict[float, list[tuple[int, int]]] = {}
    for i in range(len(prompts)):
        for j in range(candidates):
            jobs.setdefault(float(guidance_scales[j % len(guidance_scales)]), []).append((i, j))
    images: dict[tuple[int, int], torch.Tensor] = {}
    bar = None
    if progress:
        from tqdm.auto import tqdm

        bar = tqdm(total=len(prompts) * candidates, desc="sampling candidates", unit="img")
    for g, items in jobs.items():
        for start in range(0, len(items), batch_size):
            chunk = items[start : start + batch_size]
            idx = torch.tensor([i for i, _ in chunk])
            seeds = [candidate_seed(seed, prompts[i], j) for i, j in chunk]
            out = generate(
                model,
                emb.index(idx),
                null,
                seeds,
                guidance_scale=g,
                steps=steps,
                scheduler=scheduler,
            )
            for k, key in enumerate(chunk):
                images[key] = quantize(out[k].cpu())
            if bar is not None:
                bar.update(len(chunk))
    if bar is not None:
        bar.close()
    keys = [(i, j) for i in range(len(prompts)) for j in range(candidates)]
    stack = torch.stack([images[k] for k in keys]) if keys else torch.zeros(0, 3, 1, 1)
    comps = reward_components(stack, [prompts[i] for i, _ in keys]) if keys else {}
    result = []
    for n, (i, j) in enumerate(keys):
        p = prompts[i]
        g = float(guidance_scales[j % len(guidance_scales)])
        s = candidate_seed(seed, p, j)
        result.append(
            Candidate(
                prompt=p,
                j=j,
                seed=s,
                guidance_scale=g,
                image=stack[n],
                reward=float(comps["reward"][n]),
                components={c: float(comps[c][n]) for c in COMPONENTS},
                uid=image_uid("cand", name, s, g, p.text),
                generator=f"{name}@cfg{g:g}",
            )
        )
    return result


def form_pairs(
    cands: list[Candidate],
    rng: random.Random,
    *,
    tie_threshold: float = DEFAULT_TIE_THRESHOLD,
    tie_keep: float = DEFAULT_TIE_KEEP,
    max_pairs_per_prompt: int | None = None,
) -> tuple[list[Row], dict[str, int]]:
    """Rows from the candidates of ONE prompt (module docstring) and counts
    {"pairs", "ties_kept", "ties_dropped"}."""
    png = {c.uid: encode_png(c.image) for c in cands}
    prefs, ties, dropped = [], [], 0
    for a in range(len(cands)):
        for b in range(a + 1, len(cands)):
            ca, cb = cands[a], cands[b]
            if abs(ca.reward - cb.reward) >= tie_threshold:
                w, lo = (ca, cb) if ca.reward > cb.reward else (cb, ca)
                prefs.append((w, lo))
            elif rng.random() < tie_keep:
                ties.append((ca, cb))
            else:
                dropped += 1
    if max_pairs_per_prompt is not None and len(prefs) > max_pairs_per_prompt:
        prefs = rng.sample(prefs, max_pairs_per_prompt)
    rows = []
    for w, lo in prefs:
        first, second = (w, lo) if rng.random() < 0.5 else (lo, w)
        lab = 1.0 if first is w else 0.0
        rows.append(
            Row(
                w.prompt.text,
                png[first.uid],
                png[second.uid],
                lab,
                1.0 - lab,
                first.uid,
                second.uid,
                first.generator,
                second.generator,
            )
        )
    for ca, cb in ties:
        rows.append(
            Row(
                ca.prompt.text,
                png[ca.uid],
                png[cb.uid],
                0.5,
                0.5,
                ca.uid,
                cb.uid,
                ca.generator,
                cb.generator,
            )
        )
    counts = {"pairs": len(prefs), "ties_kept": len(ties), "ties_dropped": dropped}
    return rows, counts


def generate_pairs(
    model,
    prompts: list[Prompt],
    *,
    candidates: int = DEFAULT_CANDIDATES,
    guidance_scales: tuple[float, ...] = DEFAULT_SCALES,
    steps: int = DEFAULT_STEPS,
    seed: int | None = None,
    tie_threshold: float = DEFAULT_TIE_THRESHOLD,
    tie_keep: float = DEFAULT_TIE_KEEP,
    max_pairs_per_prompt: int | None = None,
    batch_size: int = 64,
    scheduler: str = "ddim",
    progress: bool = True,
) -> PairSet:
    """Sample, score and pair (module docstring). ``model``: a DiffusionModel or a folder."""
    if isinstance(model, (str, Path)):
        from snpo.models import load_model

        model = load_model(str(model))
    seed = int(SEEDS["pairs_train"]) if seed is None else int(seed)
    t0 = time.perf_counter()
    cands = sample_candidates(
        model,
        prompts,
        candidates=candidates,
        guidance_scales=guidance_scales,
        steps=steps,
        seed=seed,
        batch_size=batch_size,
        scheduler=scheduler,
        progress=progress,
    )
    t_sample = time.perf_counter() - t0
    rng = random.Random(seed)
    rows: list[Row] = []
    totals = {"pairs": 0, "ties_kept": 0, "ties_dropped": 0}
    for i in range(len(prompts)):
        group = cands[i * candidates : (i + 1) * candidates]
        r, c = form_pairs(
            group,
            rng,
            tie_threshold=tie_threshold,
            tie_keep=tie_keep,
            max_pairs_per_prompt=max_pairs_per_prompt,
        )
        rows.extend(r)
        for k in totals:
            totals[k] += c[k]
    by_scale: dict[str, float] = {}
    for g in sorted({c.guidance_scale for c in cands}):
        rs = [c.reward for c in cands if c.guidance_scale == g]
        by_scale[f"{g:g}"] = sum(rs) / len(rs)
    stats = {
        "model": str(getattr(model, "source", "")),
        "prompts": len(prompts),
        "candidates": candidates,
        "guidance_scales": list(guidance_scales),
        "steps": steps,
        "scheduler": scheduler,
        "seed": seed,
        "tie_threshold": tie_threshold,
        "tie_keep": tie_keep,
        "max_pairs_per_prompt": max_pairs_per_prompt,
        "rows": len(rows),
        **totals,
        "mean_reward": sum(c.reward for c in cands) / max(1, len(cands)),
        "mean_reward_by_scale": by_scale,
        "sampling_seconds": round(t_sample, 2),
        "total_seconds": round(time.perf_counter() - t0, 2),
    }
    return PairSet(rows, cands, stats)


def write_pairs(pairs: PairSet, out: str | Path, *, sidecar: bool = True) -> Path:
    """Write the rows as a Pick-a-Pic v2-schema parquet; with ``sidecar`` also ``OUT.json``
    (settings, counts, and every candidate's seed, guidance scale, reward and components)."""
    out = write_parquet(pairs.rows, out)
    if sidecar:
        meta = dict(pairs.stats)
        meta["candidates_detail"] = [
            {
                "caption": c.prompt.text,
                "heldout_prompt": c.prompt.heldout,
                "uid": c.uid,
                "seed": c.seed,
                "guidance_scale": c.guidance_scale,
                "reward": c.reward,
                **c.components,
            }
            for c in pairs.candidates
        ]
        out.with_suffix(".json").write_text(json.dumps(meta, indent=1) + "\n")
    return out


def split_prompts_and_seed(split: str, n: int | None = None) -> tuple[list[Prompt], int]:
    """The first n prompts (``ordered_prompts``) and the pair seed of a named split."""
    if split not in SPLITS:
        raise ValueError(f"split must be one of {sorted(SPLITS)}, got {split!r}")
    which, seed_key = SPLITS[split]
    prompts = ordered_prompts(which)
    return (prompts if n is None else prompts[:n]), int(SEEDS[seed_key])


__all__ = [
    "Candidate",
    "PairSet",
    "candidate_seed",
    "form_pairs",
    "generate_pairs",
    "sample_candidates",
    "split_prompts_and_seed",
    "write_pairs",
]
