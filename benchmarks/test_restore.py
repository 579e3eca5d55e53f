"""The trainer-step benchmark restores the weights and the optimizer before every step, so that
every timed step is the same real training step (issue 22: without it, the rows of a group
trained one shared UNet at β = 5000 into losses of 1e-21 and subnormal gradients).

Covered: the restored step equals the first step of a freshly built group bit for bit (weights
after the step, loss, optimizer state); the loss and the update are identical at every repeat;
without restoring, the steps are not the same; ``measure_interleaved`` restores before every
call, rotates the order each round and drops a row whose loss leaves the sane range.
"""

from __future__ import annotations

import pytest
import torch

from . import trainer_cases as TC

measure_interleaved = TC.measure_interleaved

pytestmark = pytest.mark.skipif(TC.diffusers_missing() is not None, reason="needs diffusers")


def _weights(g: TC.Group) -> list[torch.Tensor]:
    return [p.detach().clone() for p in g.opt.params]


def _state(g: TC.Group) -> list[torch.Tensor]:
    return [v.clone() for s in g.opt.opt.state.values() for v in s.values() if torch.is_tensor(v)]


def _equal(a: list[torch.Tensor], b: list[torch.Tensor]) -> bool:
    return len(a) == len(b) and all(torch.equal(x, y) for x, y in zip(a, b))


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_restored_step_is_the_first_step_of_a_fresh_run(dtype) -> None:
    cpu = torch.device("cpu")
    fresh = TC.Group("tiny-sd", 2, cpu, dtype)
    initial = _weights(fresh)
    loss0 = fresh.step_fn(TC.BASELINE)()  # the first step of a new run: no restore
    after0, state0 = _weights(fresh), _state(fresh)
    assert not _equal(after0, initial)  # the step did update the weights

    g = TC.Group("tiny-sd", 2, cpu, dtype)
    assert _equal(_weights(g), initial)  # the same seeded group
    step = g.step_fn(TC.BASELINE)
    results = []
    for _ in range(3):
        g.restorer.restore()
        assert _equal(_weights(g), initial)
        assert all(not t.any() for t in _state(g))  # a fresh AdamW state: zeros, step 0
        assert all(p.grad is None for p in g.opt.params)
        loss = step()
        results.append((loss, _weights(g), _state(g)))
    for loss, after, state in results:
        assert loss == loss0 and TC.is_sane(loss)
        assert _equal(after, after0) and _equal(state, state0)
    if dtype == torch.bfloat16:  # the fp32 masters are restored too
        g.restorer.restore()
        assert _equal([m.detach() for m in g.opt.master], [w.float() for w in initial])
    assert g.restorer.restores >= 3


def test_without_restore_the_steps_differ() -> None:
    """The control: the same step repeated without restoring trains on, so later steps are
    other steps (what the benchmark timed before)."""
    g = TC.Group("tiny-sd", 2, torch.device("cpu"), torch.float32)
    step = g.step_fn(TC.CACHED_DEFAULT)
    g.restorer.restore()
    first = step()
    w1 = _weights(g)
    later = [step() for _ in range(3)]
    assert all(x != first for x in later)
    assert not _equal(_weights(g), w1)


def test_measure_interleaved_restores_rotates_and_checks_the_loss() -> None:
    calls: list[str] = []
    restores: list[int] = []

    def make(rid: str, loss: float):
        def step() -> float:
            calls.append(rid)
            return loss

        return step

    steps = {
        "A": make("A", 0.69),
        "B": make("B", 0.69),
        "C": make("C", 0.69),
        "D": make("D", 1e-21),
    }
    res = measure_interleaved(
        steps,
        lambda: restores.append(len(calls)),
        torch.device("cpu"),
        warmup=1,
        rounds_min=3,
        rounds_max=3,
        target_ms=0.0,
    )
    # warm-up A B C D (D dropped: its loss is insane), then rounds A B C, B C A, C A B
    assert calls == list("ABCD") + list("ABC") + list("BCA") + list("CAB")
    assert restores[: len(calls)] == list(range(len(calls)))  # one restore before every call
    assert res["D"]["error"][0] == "error" and "outside" in res["D"]["error"][1]
    for rid in "ABC":
        assert res[rid]["error"] is None and len(res[rid]["wall"]) == 3
        assert res[rid]["loss"] == [0.69] * 3 and len(res[rid]["cpu"]) == 3


def test_measured_rows_repeat_the_same_step() -> None:
    """On a real group: every timed step of a row returns the same loss (restored weights), and
    the weights end as they began."""
    g = TC.Group("tiny-sd", 2, torch.device("cpu"), torch.float32)
    initial = _weights(g)
    steps = {k: s for k, s in g.steps().items() if k in ("reference", "live-fused-batched")}
    res = measure_interleaved(
        steps, g.restorer.restore, g.device, warmup=1, rounds_min=3, rounds_max=3, target_ms=0
    )
    for rec in res.values():
        assert rec["error"] is None, rec["error"]
        assert len(rec["loss"]) == 3 and len(set(rec["loss"])) == 1, rec["loss"]
    # policy = reference at every step: log 2 for the Diff-SNPO rows, the DPO row alike
    assert res["live-fused-batched"]["loss"][0] == pytest.approx(0.6931, abs=1e-3)
    assert res["reference"]["loss"][0] == pytest.approx(0.6931, abs=1e-3)
    assert _equal(_weights(g), initial)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_two_adamw_implementations_share_one_set_of_moments(dtype) -> None:
    """The trainer rows' AdamW is ``snpo train``'s (fused on a CPU), the reference row's torch's
    default: allocating their states leaves the weights bit for bit, the reference optimizer
    uses the trainer optimizer's moment tensors, and after a restore each optimizer's step
    equals that of a freshly built AdamW of its implementation."""
    gen = torch.Generator().manual_seed(3)
    w0 = [torch.randn(17, 5, generator=gen).to(dtype), torch.randn(9, generator=gen).to(dtype)]
    grads = [torch.randn(w.shape, generator=gen).to(dtype) for w in w0]
    params = [torch.nn.Parameter(w.clone()) for w in w0]
    opt = TC.MasterAdamW(params, lr=1e-2, weight_decay=1e-2)
    assert all(torch.equal(p, w) for p, w in zip(params, w0))  # lr-0 allocation moved nothing
    assert opt.fused and not opt.reference_opt.param_groups[0]["fused"]
    for m in opt.master:
        a, b = opt.opt.state[m], opt.reference_opt.state[m]
        assert a["exp_avg"] is b["exp_avg"] and a["exp_avg_sq"] is b["exp_avg_sq"]
        assert a["step"] is not b["step"] and float(a["step"]) == float(b["step"]) == 0.0
    restorer = TC.Restorer(opt)
    for which, fused in (("trainer", True), ("reference", False), ("trainer", True)):
        restorer.restore()
        for p, g in zip(params, grads):
            p.grad = g.clone()
        opt.step(which)
        fresh = [torch.nn.Parameter(w.clone().float()) for w in w0]
        kw = {"fused": True} if fused else {}
        want = torch.optim.AdamW(fresh, lr=1e-2, weight_decay=1e-2, **kw)
        for f, g in zip(fresh, grads):
            f.grad = g.float()
        want.step()
        for p, f in zip(params, fresh):
            assert torch.equal(p.detach(), f.detach().to(dtype)), which
