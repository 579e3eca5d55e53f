"""Counter-based random draws: every random choice of a training pair is a function of
(seed, epoch, pair index) alone.

Nothing depends on batch composition, world size, worker count, device or the order in which
pairs are processed, so
- a resumed run redraws exactly what the uninterrupted run would have drawn (no RNG state to save),
- a cache of reference errors computed earlier (``snpo cache``) matches the trainer's draws, and
- changing the number of GPUs or the micro-batch size leaves each pair's draws unchanged.

Each pair gets independent streams: a 63-bit key from a SplitMix64 chain over
(seed, epoch, index, stream) seeds a CPU ``torch.Generator``; the draws are made on the CPU in a
fixed order and moved to the target device afterwards.

    stream AUGMENT: flip (2,) bools, crop (2, 2) fractions in [0, 1) — winner then loser,
                    independent per image (DiffusionDPO applies RandomHorizontalFlip /
                    RandomCrop to each image separately)
    stream DIFFUSION: timestep, branch (null prompt with probability uncond_prob),
                    the shared noise (winner and loser share timestep and noise), the
                    VAE-posterior noise of winner and loser, then the uniform u of flow
                    families (σ = σ(u)), drawn last so the earlier draws do not depend on it
    stream ORDER:   the per-epoch permutation of the pairs (index = -1)
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

_MASK64 = (1 << 64) - 1

STREAM_AUGMENT = 1
STREAM_DIFFUSION = 2
STREAM_ORDER = 3

_U_MIN = 2.0**-54  # u = max(U[0, 1), 2^-54) ∈ (0, 1)


def splitmix64(x: int) -> int:
    """One SplitMix64 step (Steele et al.; the seeding function of xoshiro)."""
    x = (x + 0x9E3779B97F4A7C15) & _MASK64
    z = x
    z = ((z ^ (z >> 30)) * 0xBF58476D1CE4E5B9) & _MASK64
    z = ((z ^ (z >> 27)) * 0x94D049BB133111EB) & _MASK64
    return z ^ (z >> 31)


def draw_key(seed: int, epoch: int, index: int, stream: int) -> int:
    """A 63-bit generator seed for (seed, epoch, index, stream); each input is mixed in turn."""
    h = splitmix64(int(seed) & _MASK64)
    for v in (epoch, index, stream):
        h = splitmix64(h ^ (int(v) & _MASK64))
    return h >> 1


def generator(seed: int, epoch: int, index: int, stream: int) -> torch.Generator:
    return torch.Generator(device="cpu").manual_seed(draw_key(seed, epoch, index, stream))


@dataclass
class AugmentDraws:
    """flip: (2,) bool (winner, loser); crop: (2, 2) float64 fractions (top, left) in [0, 1)."""

    flip: torch.Tensor
    crop: torch.Tensor


def augment_draws(seed: int, epoch: int, index: int) -> AugmentDraws:
    """Flip and crop decisions of one pair (used by the data workers)."""
    g = generator(seed, epoch, index, STREAM_AUGMENT)
    u = torch.rand(6, generator=g, dtype=torch.float64)
    return AugmentDraws(flip=u[:2] < 0.5, crop=u[2:].reshape(2, 2))


def crop_offset(fraction: float, size: int, crop: int) -> int:
    """Pixel offset of a random crop of length ``crop`` in ``size`` from a fraction in [0, 1)."""
    return min(int(fraction * (size - crop + 1)), size - crop)


@dataclass
class PairDraws:
    """Draws of P pairs (CPU or moved with :meth:`to`).

    noise: (P, *latent_shape) shared by winner and loser; timesteps: (P,) int64;
    uncond: (P,) bool (Y = −1: null-prompt branch); latent_noise: (P, 2, *latent_shape) for
    sampling the VAE posterior of winner and loser; flip: (P, 2) bool; crop: (P, 2, 2) float64;
    u: (P,) float64 in (0, 1), the flow families' noise-level draw.
    """

    indices: torch.Tensor
    noise: torch.Tensor
    timesteps: torch.Tensor
    uncond: torch.Tensor
    latent_noise: torch.Tensor
    flip: torch.Tensor
    crop: torch.Tensor
    u: torch.Tensor

    def __len__(self) -> int:
        return self.indices.shape[0]

    def conditional_pairs(self) -> list[int]:
        """Positions k of the pairs on the conditional branch (not ``uncond[k]``). The draws
        are made on the host from the seed, so this reads no device (unless they were moved
        with :meth:`to`)."""
        return [k for k, u in enumerate(self.uncond.tolist()) if not u]

    def to(self, device: torch.device | str) -> PairDraws:
        return PairDraws(
            *(getattr(self, f).to(device) for f in self.__dataclass_fields__)  # type: ignore[arg-type]
        )

    def select(self, rows: torch.Tensor | list[int]) -> PairDraws:
        rows = torch.as_tensor(rows, dtype=torch.long)
        return PairDraws(*(getattr(self, f)[rows] for f in self.__dataclass_fields__))

    def repeat(self, times: int) -> PairDraws:
        """``times`` stacked copies (times·P rows; row c·P + k is pair k): the per-row draws of
        a micro-batch whose winners and losers share their pair's draw."""
        return PairDraws(
            *(torch.cat([getattr(self, f)] * times) for f in self.__dataclass_fields__)
        )


def num_train_timesteps(scheduler) -> int:
    return int(scheduler.config.num_train_timesteps)


def pair_draws(
    seed: int,
    epoch: int,
    indices: list[int] | torch.Tensor,
    latent_shape: tuple[int, ...],
    scheduler,
    uncond_prob: float,
) -> PairDraws:
    """All draws of the pairs ``indices`` of ``epoch`` (see the module docstring).

    latent_shape: (C, h, w) of one latent; scheduler: the training noise scheduler (its
    num_train_timesteps bounds the timestep); uncond_prob: probability of the null branch.
    """
    idx = [int(i) for i in (indices.tolist() if isinstance(indices, torch.Tensor) else indices)]
    t_max = num_train_timesteps(scheduler)
    shape = tuple(int(s) for s in latent_shape)
    noise, lat, ts, unc, flips, crops, us = [], [], [], [], [], [], []
    for i in idx:
        g = generator(seed, epoch, i, STREAM_DIFFUSION)
        ts.append(torch.randint(0, t_max, (1,), generator=g))
        unc.append(torch.rand(1, generator=g, dtype=torch.float64) < uncond_prob)
        noise.append(torch.randn(shape, generator=g))
        lat.append(torch.randn((2, *shape), generator=g))
        us.append(torch.rand(1, generator=g, dtype=torch.float64).clamp_(min=_U_MIN))
        a = augment_draws(seed, epoch, i)
        flips.append(a.flip)
        crops.append(a.crop)
    return PairDraws(
        indices=torch.tensor(idx, dtype=torch.long),
        noise=torch.stack(noise) if idx else torch.zeros((0, *shape)),
        timesteps=torch.cat(ts) if idx else torch.zeros(0, dtype=torch.long),
        uncond=torch.cat(unc) if idx else torch.zeros(0, dtype=torch.bool),
        latent_noise=torch.stack(lat) if idx else torch.zeros((0, 2, *shape)),
        flip=torch.stack(flips) if idx else torch.zeros((0, 2), dtype=torch.bool),
        crop=torch.stack(crops) if idx else torch.zeros((0, 2, 2), dtype=torch.float64),
        u=torch.cat(us) if idx else torch.zeros(0, dtype=torch.float64),
    )


def epoch_permutation(seed: int, epoch: int, n: int) -> torch.Tensor:
    """The order of the n pairs in ``epoch`` (a function of (seed, epoch) only)."""
    return torch.randperm(n, generator=generator(seed, epoch, -1, STREAM_ORDER))
