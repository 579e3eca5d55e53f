"""backend="auto"'s self-check of the fused backends (snpo_kernels.dispatch), on the CPU.

A fake "cuda" backend (the torch reference, optionally corrupted) is put in front of "auto"
by monkeypatching the dispatch's candidate list and loader: a wrong one is dropped with
exactly one warning and torch runs; a correct one is kept; a named backend or SNPO_BACKEND
is never checked. The real Triton backend (interpreter) passes the check and is then used by
a torch.compile'd step without a graph break.
"""

from __future__ import annotations

import warnings

import pytest
import torch

import snpo_kernels as sk
from snpo_kernels import dispatch


def _inputs(seed=0, shape=(6, 3, 5)):
    g = torch.Generator().manual_seed(seed)
    target = torch.randn(shape, generator=g)
    ref = target + torch.randn(shape, generator=g)
    pred = ref + 0.1 * torch.randn(shape, generator=g)
    p = shape[0] // 2
    swap = torch.rand(p, generator=g) < 0.5
    weight = 0.5 + torch.rand(p, generator=g)
    return pred, target, ref, swap, weight


class _Fake:
    """A fused backend stand-in: the torch reference, times ``loss_factor`` / ``grad_factor``."""

    def __init__(self, loss_factor=1.0, grad_factor=1.0, raises=None):
        self.loss_factor, self.grad_factor, self.raises = loss_factor, grad_factor, raises
        self.calls = 0

    def availability(self, device, dtype):
        return None

    def run(self, x):
        self.calls += 1
        if self.raises is not None:
            raise self.raises
        pred = x.pred
        if self.grad_factor != 1.0:  # scale the gradient, not the value
            f = self.grad_factor
            pred = pred * f - pred.detach() * (f - 1.0)
        loss, e_t, e_r = dispatch._TorchBackend.run(_replace(x, pred=pred))
        return loss * self.loss_factor, e_t, e_r


def _replace(x, **kw):
    import dataclasses

    return dataclasses.replace(x, **kw)


@pytest.fixture
def fake(monkeypatch):
    """Install a fake "cuda" backend as the only fused candidate of "auto" on the CPU."""
    dispatch.reset_self_check()
    monkeypatch.delenv(dispatch.ENV_OVERRIDE, raising=False)
    monkeypatch.delenv(dispatch.SELF_CHECK_ENV, raising=False)
    real_load = dispatch._load
    holder = {}

    def install(backend):
        holder["cuda"] = backend
        monkeypatch.setattr(dispatch, "_fused_candidates", lambda device: ("cuda",))
        monkeypatch.setattr(
            dispatch, "_load", lambda name: holder[name] if name in holder else real_load(name)
        )
        return backend

    yield install
    dispatch.reset_self_check()


def _call(**kw):
    pred, target, ref, swap, weight = _inputs()
    x = pred.clone().requires_grad_(True)
    out = sk.preference_loss_with_stats(
        x, target, ref, swap=swap, weight=weight, beta=50.0, lam=0.9, **kw
    )
    out.loss.backward()
    return out, x.grad


@pytest.mark.parametrize(
    "bad",
    [
        dict(loss_factor=1.05),
        dict(grad_factor=1.05),
        dict(loss_factor=float("nan")),
        dict(raises=RuntimeError("an illegal memory access\nwas encountered")),
    ],
    ids=["value", "gradient", "nan", "raises"],
)
def test_wrong_fused_backend_falls_back_to_torch_with_one_warning(fake, bad):
    backend = fake(_Fake(**bad))
    want, want_grad = _call(backend="torch")
    with pytest.warns(dispatch.SelfCheckWarning) as record:
        out, grad = _call()
    assert len(record) == 1
    msg = str(record[0].message)
    assert "\n" not in msg and 'backend "cuda" failed its self-check' in msg
    assert out.backend == "torch"
    torch.testing.assert_close(out.loss, want.loss, rtol=0, atol=0)
    torch.testing.assert_close(grad, want_grad, rtol=0, atol=0)
    # later calls (any shape) neither re-check nor warn again, and never pick it
    calls = backend.calls
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert _call()[0].backend == "torch"
        pred, target, ref, _, _ = _inputs(1, (4, 7))
        assert sk.preference_loss_with_stats(pred, target, ref, beta=3.0).backend == "torch"
    assert backend.calls == calls
    verdicts = list(sk.self_check_verdicts().values())
    assert len(verdicts) == 1 and not verdicts[0].ok and verdicts[0].backend == "cuda"
    assert sk.resolve_backend("auto", torch.device("cpu"), torch.float32) == "torch"


def test_correct_fused_backend_is_kept_and_checked_once_per_shape_class(fake):
    backend = fake(_Fake())
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        out, _ = _call()
        assert out.backend == "cuda"
        first = backend.calls
        assert first == 2  # the self-check's run, then the call itself
        assert _call()[0].backend == "cuda"
        assert backend.calls == first + 1  # no second check for the same shape class
        pred, target, ref, _, _ = _inputs(2, (8, 11))
        assert sk.preference_loss_with_stats(pred, target, ref, beta=3.0).backend == "cuda"
    verdicts = sk.self_check_verdicts()
    assert len(verdicts) == 2 and all(v.ok for v in verdicts.values())
    assert all("agrees with torch" in v.detail for v in verdicts.values())


def test_small_fused_error_that_a_kernel_may_make_passes(fake):
    """Float32-level differences (another summation order) are no reason to fall back."""
    fake(_Fake(loss_factor=1.0 + 1e-6, grad_factor=1.0 + 1e-6))
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert _call()[0].backend == "cuda"


def test_explicit_backend_and_env_override_are_not_checked(fake, monkeypatch):
    backend = fake(_Fake(loss_factor=2.0))
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        out, _ = _call(backend="cuda")
        assert out.backend == "cuda" and backend.calls == 1
        monkeypatch.setenv(dispatch.ENV_OVERRIDE, "cuda")
        out, _ = _call()
        assert out.backend == "cuda" and backend.calls == 2
    assert sk.self_check_verdicts() == {}
    want, _ = _call(backend="torch")
    torch.testing.assert_close(out.loss, 2 * want.loss)  # forced: used as it is


def test_self_check_can_be_disabled(fake, monkeypatch):
    backend = fake(_Fake(loss_factor=2.0))
    monkeypatch.setenv(dispatch.SELF_CHECK_ENV, "0")
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert _call()[0].backend == "cuda"
    assert backend.calls == 1 and sk.self_check_verdicts() == {}
    monkeypatch.setenv(dispatch.SELF_CHECK_ENV, "maybe")
    with pytest.raises(ValueError, match="SNPO_SELF_CHECK='maybe'"):
        _call()


def test_self_check_runs_under_no_grad_and_inference_mode(fake):
    """The trainer computes cached reference errors under no_grad: the check still works."""
    fake(_Fake(grad_factor=1.1))
    pred, target, ref, _, _ = _inputs()
    with torch.inference_mode(), pytest.warns(dispatch.SelfCheckWarning):
        out = sk.preference_loss_with_stats(pred, target, ref, beta=5.0)
    assert out.backend == "torch"


def test_bad_env_backend_is_named():
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv(dispatch.ENV_OVERRIDE, "tpu")
        pred, target, ref, _, _ = _inputs()
        with pytest.raises(ValueError, match="SNPO_BACKEND='tpu' is not a backend"):
            sk.preference_loss(pred, target, ref, beta=1.0)


# ------------------------------------------------------------------ the real Triton backend
def test_triton_interpreter_passes_the_self_check_and_compiles(monkeypatch):
    """On the CPU the Triton kernels run in the interpreter: "auto" with Triton as its fused
    candidate checks it (passes), uses it, and a torch.compile(fullgraph=True) step over
    "auto" traces without a graph break (the check is skipped while tracing)."""
    pytest.importorskip("triton")
    from snpo_kernels.triton import op  # noqa: F401  (registers the custom op)

    dispatch.reset_self_check()
    monkeypatch.delenv(dispatch.ENV_OVERRIDE, raising=False)
    monkeypatch.delenv(dispatch.SELF_CHECK_ENV, raising=False)
    monkeypatch.setattr(dispatch, "_fused_candidates", lambda device: ("triton",))
    pred, target, ref, swap, weight = _inputs(3, (4, 2, 9))
    for dtype in (torch.float32, torch.bfloat16):
        for reduction in ("mean", "none"):
            with warnings.catch_warnings():
                warnings.simplefilter("error")
                out = sk.preference_loss_with_stats(
                    pred.to(dtype),
                    target.to(dtype),
                    ref.to(dtype),
                    swap=swap,
                    weight=weight,
                    beta=500.0,
                    lam=0.9,
                    reduction=reduction,
                )
            assert out.backend == "triton", sk.self_check_verdicts()
    assert all(v.ok for v in sk.self_check_verdicts().values())

    def step(p):
        return sk.preference_loss(p, target, ref, swap=swap, weight=weight, beta=50.0, lam=0.9)

    torch._dynamo.reset()
    compiled = torch.compile(step, fullgraph=True, backend="aot_eager")
    x1, x2 = pred.clone().requires_grad_(True), pred.clone().requires_grad_(True)
    l1, l2 = compiled(x1), step(x2)
    l1.backward()
    l2.backward()
    torch.testing.assert_close(l1, l2, rtol=1e-6, atol=1e-7)
    torch.testing.assert_close(x1.grad, x2.grad, rtol=1e-5, atol=1e-7)

    # with no verdict yet, tracing picks torch (no check can run inside a graph)
    dispatch.reset_self_check()
    torch._dynamo.reset()
    compiled = torch.compile(step, fullgraph=True, backend="aot_eager")
    torch.testing.assert_close(compiled(pred), step(pred), rtol=1e-6, atol=1e-7)
    dispatch.reset_self_check()
