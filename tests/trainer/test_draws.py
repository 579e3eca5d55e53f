"""Counter-based draws: independent of batch composition, keyed by (seed, epoch, index)."""

from __future__ import annotations

import torch

from snpo.data import PairOrder
from snpo.draws import augment_draws, draw_key, epoch_permutation, pair_draws
from snpo.models import build_scheduler

SCHED = build_scheduler()
SHAPE = (4, 8, 8)


def test_draws_do_not_depend_on_batch_composition():
    big = pair_draws(3, 1, [5, 9, 2, 7], SHAPE, SCHED, 0.5)
    for row, idx in enumerate([5, 9, 2, 7]):
        one = pair_draws(3, 1, [idx], SHAPE, SCHED, 0.5)
        for name in ("noise", "timesteps", "uncond", "latent_noise", "flip", "crop"):
            assert torch.equal(getattr(big, name)[row], getattr(one, name)[0]), name
    sub = big.select([2, 0])
    assert sub.indices.tolist() == [2, 5]
    again = pair_draws(3, 1, [7, 2], SHAPE, SCHED, 0.5)
    assert torch.equal(again.noise[1], big.noise[2])


def test_draws_change_with_seed_epoch_index_and_have_the_right_law():
    a = pair_draws(0, 0, [1], SHAPE, SCHED, 0.1)
    assert not torch.equal(a.noise, pair_draws(1, 0, [1], SHAPE, SCHED, 0.1).noise)
    assert not torch.equal(a.noise, pair_draws(0, 1, [1], SHAPE, SCHED, 0.1).noise)
    assert not torch.equal(a.noise, pair_draws(0, 0, [2], SHAPE, SCHED, 0.1).noise)
    assert len({draw_key(0, 0, i, 2) for i in range(1000)}) == 1000
    many = pair_draws(0, 0, list(range(2000)), (1, 2, 2), SCHED, 0.1)
    assert 0.07 < many.uncond.float().mean() < 0.13
    assert many.timesteps.min() >= 0 and many.timesteps.max() < 1000
    assert many.timesteps.float().std() > 250  # uniform over [0, 1000)
    assert abs(many.noise.mean()) < 0.05 and abs(many.noise.std() - 1) < 0.05
    # winner/loser VAE noise differs; flips are independent per image
    assert not torch.equal(many.latent_noise[:, 0], many.latent_noise[:, 1])
    assert 0.4 < (many.flip[:, 0] != many.flip[:, 1]).float().mean() < 0.6
    assert torch.equal(augment_draws(0, 0, 17).flip, many.flip[17])
    assert pair_draws(0, 0, [], SHAPE, SCHED, 0.1).noise.shape == (0, *SHAPE)


def test_order_is_sharded_deterministic_and_resumable():
    n, micro = 23, 2
    seen = []
    orders = [PairOrder(n, seed=4, rank=r, world=2, micro=micro) for r in range(2)]
    assert orders[0].batches_per_epoch == 5  # 11 pairs per rank → 5 micro-batches
    for o in orders:
        for g in range(5):
            seen += [i for _, i in o.batch(g)]
    assert len(seen) == len(set(seen)) == 20  # disjoint shards, no pair twice in an epoch
    assert orders[0].batch(5)[0][0] == 1  # micro-step 5 is epoch 1
    fresh = PairOrder(n, seed=4, rank=0, world=2, micro=micro)
    assert fresh.batch(7) == orders[0].batch(7)  # a resumed run sees the same pairs
    assert not torch.equal(epoch_permutation(4, 0, n), epoch_permutation(4, 1, n))


def _old_diffusion_draws(seed, epoch, index, shape, t_max, uncond_prob):
    """The DIFFUSION stream as it was before the flow draw u was added."""
    from snpo.draws import STREAM_DIFFUSION, generator

    g = generator(seed, epoch, index, STREAM_DIFFUSION)
    t = torch.randint(0, t_max, (1,), generator=g)
    unc = torch.rand(1, generator=g, dtype=torch.float64) < uncond_prob
    noise = torch.randn(shape, generator=g)
    lat = torch.randn((2, *shape), generator=g)
    return t, unc, noise, lat, g


def test_flow_uniform_u_is_drawn_last_and_keeps_every_other_draw():
    idx = [3, 0, 11]
    d = pair_draws(5, 2, idx, SHAPE, SCHED, 0.3)
    assert d.u.shape == (3,) and d.u.dtype == torch.float64
    for row, i in enumerate(idx):
        t, unc, noise, lat, g = _old_diffusion_draws(5, 2, i, SHAPE, 1000, 0.3)
        assert torch.equal(d.timesteps[row : row + 1], t)
        assert torch.equal(d.uncond[row : row + 1], unc)
        assert torch.equal(d.noise[row], noise)
        assert torch.equal(d.latent_noise[row], lat)
        assert torch.equal(d.u[row : row + 1], torch.rand(1, generator=g, dtype=torch.float64))
    many = pair_draws(0, 0, list(range(2000)), (1, 1, 1), SCHED, 0.1).u
    assert (many > 0).all() and (many < 1).all()
    assert abs(many.mean() - 0.5) < 0.03 and abs(many.std() - 12**-0.5) < 0.02
    assert torch.equal(d.select([2, 0]).u, d.u[[2, 0]])
    assert torch.equal(d.to("cpu").u, d.u)
    two = d.repeat(2)
    assert len(two) == 6 and torch.equal(two.u, torch.cat([d.u, d.u]))
    assert torch.equal(two.timesteps, torch.cat([d.timesteps, d.timesteps]))
    assert pair_draws(0, 0, [], SHAPE, SCHED, 0.1).u.shape == (0,)
