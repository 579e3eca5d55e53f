"""The comparison's evaluation protocol (docs/world.md): sample fixed prompts and noise seeds
at fixed guidance scales, score with the known reward, average per split and scale.

For prompt p and k = 0 … n_seeds − 1 the noise seed is SEEDS["eval_noise"] + k (the same noise
for every prompt and every model, so models are compared on identical draws). Reported per
guidance scale and per prompt split ("train": the 64 training prompts, "heldout": the 16
held-out ones, "all"): the mean reward, the mean of each component, and ``good`` = the fraction
of images with reward ≥ GOOD (the right object, crisp).
"""

from __future__ import annotations

import torch

from .reward import COMPONENTS, reward_components
from .vocab import SEEDS, Prompt, all_prompts

EVAL_SCALES: tuple[float, ...] = (1.0, 3.0, 7.5)
EVAL_SEEDS = 4
EVAL_STEPS = 20
GOOD = 0.9


def eval_seeds(n_seeds: int = EVAL_SEEDS) -> list[int]:
    """SEEDS["eval_noise"] + k, k = 0 … n_seeds − 1."""
    return [int(SEEDS["eval_noise"]) + k for k in range(n_seeds)]


def summarize(scores: dict[str, torch.Tensor], prompts: list[Prompt]) -> dict[str, dict]:
    """Means per split of the reward, each component and ``good`` (module docstring)."""
    held = torch.tensor([p.heldout for p in prompts], dtype=torch.bool)
    out = {}
    for split, mask in (("all", torch.ones_like(held)), ("train", ~held), ("heldout", held)):
        if not mask.any():
            continue
        r = scores["reward"][mask]
        row = {
            "n": int(mask.sum()),
            "reward": float(r.mean()),
            "good": float((r >= GOOD).float().mean()),
        }
        row.update({c: float(scores[c][mask].mean()) for c in COMPONENTS})
        out[split] = row
    return out


@torch.no_grad()
def evaluate_model(
    model,
    *,
    prompts: list[Prompt] | None = None,
    guidance_scales: tuple[float, ...] = EVAL_SCALES,
    n_seeds: int = EVAL_SEEDS,
    steps: int = EVAL_STEPS,
    negative_unet: torch.nn.Module | None = None,
    batch_size: int = 128,
    scheduler: str = "ddim",
    progress: bool = True,
    return_images: bool = False,
) -> dict:
    """Sample ``prompts`` (default all 80) × ``n_seeds`` eval seeds at each guidance scale and
    score them. Returns {"settings": …, "scales": {"<g>": summarize(...)}} and, with
    ``return_images``, "images": {"<g>": (P·n_seeds, 3, S, S)} in prompt-major order.

    ``negative_unet``: Diffusion-NPO's merged negative model as the null branch (None: the
    model's own null branch — standard CFG and Diff-SNPO)."""
    from snpo.models import encode_prompts, generate, null_embedding

    prompts = all_prompts() if prompts is None else prompts
    seeds = eval_seeds(n_seeds)
    rows = [(p, s) for p in prompts for s in seeds]
    emb = encode_prompts(model, [p.text for p in prompts])
    null = null_embedding(model)
    bar = None
    if progress:
        from tqdm.auto import tqdm

        bar = tqdm(total=len(rows) * len(guidance_scales), desc="evaluating", unit="img")
    result: dict = {
        "settings": {
            "prompts": len(prompts),
            "seeds": seeds,
            "guidance_scales": list(guidance_scales),
            "steps": steps,
            "scheduler": scheduler,
            "negative_unet": negative_unet is not None,
        },
        "scales": {},
    }
    images_by_scale = {}
    for g in guidance_scales:
        chunks = []
        for start in range(0, len(rows), batch_size):
            part = rows[start : start + batch_size]
            idx = torch.tensor([prompts.index(p) for p, _ in part])
            chunks.append(
                generate(
                    model,
                    emb.index(idx),
                    null,
                    [s for _, s in part],
                    guidance_scale=g,
                    steps=steps,
                    negative_unet=negative_unet,
                    scheduler=scheduler,
                ).cpu()
            )
            if bar is not None:
                bar.update(len(part))
        images = torch.cat(chunks)
        scores = reward_components(images, [p for p, _ in rows])
        result["scales"][f"{g:g}"] = summarize(scores, [p for p, _ in rows])
        if return_images:
            images_by_scale[f"{g:g}"] = images
    if bar is not None:
        bar.close()
    if return_images:
        result["images"] = images_by_scale
    return result
