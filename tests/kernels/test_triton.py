"""The Triton backend against the float64 oracle and the PyTorch reference.

On a machine without CUDA the kernels run in the Triton interpreter (tests/conftest.py sets
TRITON_INTERPRET=1 before anything imports them): sizes are tiny. Tests marked ``gpu`` run on
real CUDA at production shapes, also under CUDA-graph capture, and are skipped elsewhere.
"""

from __future__ import annotations

import math
import subprocess
import sys

import pytest
import torch

import snpo_kernels as sk

from . import tolerances as tol
from .extreme import extreme_case, extreme_failures
from .oracle import oracle

pytest.importorskip("triton")
from snpo_kernels.triton import op  # noqa: E402

SHAPES = [(2, 1), (2, 3, 5, 7), (6, 4, 8, 8), (4, 1027)]
REDUCTIONS = ["mean", "sum", "none"]


def make_inputs(shape, dtype=torch.float32, *, seed: int, spread=0.05, device="cpu"):
    """pred close to ref_pred so that margins are small and β·margin is O(1); seeded."""
    g = torch.Generator().manual_seed(seed)
    target = torch.randn(shape, generator=g, dtype=torch.float64)
    ref = target + torch.randn(shape, generator=g, dtype=torch.float64)
    pred = ref + spread * torch.randn(shape, generator=g, dtype=torch.float64)
    p = shape[0] // 2
    swap = torch.rand(p, generator=g) < 0.5
    weight = (0.5 + torch.rand(p, generator=g, dtype=torch.float64)).float()

    def cast(t):
        return t.to(device=device, dtype=dtype)

    return cast(pred), cast(target), cast(ref), swap.to(device), weight.to(device)


def random_grad_output(reduction, p, device="cpu", *, seed: int):
    """A seeded grad_output: magnitudes in [0.5, 1.5), about 30 % negative."""
    g = torch.Generator().manual_seed(seed)
    shape = (p,) if reduction == "none" else ()
    mag = 0.5 + torch.rand(shape, generator=g)
    go = mag * torch.where(torch.rand(shape, generator=g) < 0.3, -1.0, 1.0)
    return go.to(device)


def run(pred, target, *, grad_output=None, backend="triton", **kw):
    """Loss and ∂(Σ grad_output·loss)/∂pred for one backend."""
    x = pred.detach().clone().requires_grad_(True)
    loss = sk.preference_loss(x, target, backend=backend, **kw)
    go = torch.ones_like(loss) if grad_output is None else grad_output.to(loss.dtype)
    (grad,) = torch.autograd.grad(loss, x, go)
    return loss.detach(), grad


def oracle_with_grad_output(pred, target, go, reduction, **kw):
    """(loss, ∂(Σ go·loss)/∂pred) from the float64 oracle; for "none" pair by pair (weights
    zeroed outside pair k make every other pair's coefficient zero)."""
    loss, grad, e_th, e_rf = oracle(pred, target, reduction=reduction, **kw)
    if reduction != "none":
        return loss, float(go) * grad, e_th, e_rf
    p = pred.shape[0] // 2
    w = kw.pop("weight", None)
    w = torch.ones(p, dtype=torch.float64) if w is None else w.double()
    total = torch.zeros_like(grad)
    for k in range(p):
        onehot = torch.zeros(p, dtype=torch.float64)
        onehot[k] = 1.0
        _, gk, _, _ = oracle(pred, target, reduction="sum", weight=w * onehot, **kw)
        total += float(go[k]) * gk
    return loss, total, e_th, e_rf


def assert_loss_close(got, want, rtol, atol):
    want = torch.as_tensor(want, dtype=torch.float64)
    torch.testing.assert_close(got.double(), want.reshape(got.shape), rtol=rtol, atol=atol)


# ------------------------------------------------------------------ fp32 against the oracle
@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("lam", [1.0, 0.9, 0.5])
@pytest.mark.parametrize("reduction", REDUCTIONS)
@pytest.mark.parametrize("variant", ["plain", "swap+weight", "ref_err"])
def test_values_and_gradients_match_oracle(shape, lam, reduction, variant):
    pred, target, ref, swap, weight = make_inputs(shape, seed=1)
    p = shape[0] // 2
    kw = dict(beta=20.0, lam=lam)
    if variant != "plain":
        kw.update(swap=swap, weight=weight)
    if variant == "ref_err":
        kw["ref_err"] = sk.per_sample_error(ref, target)
    else:
        kw["ref_pred"] = ref
    go = random_grad_output(reduction, p, seed=2)
    # small blocks: several blocks per split, several splits per row, a partial last block
    with op.launch_overrides(block=128):
        loss, grad = run(pred, target, grad_output=go, reduction=reduction, **kw)
    want, want_grad, _, _ = oracle_with_grad_output(pred, target, go, reduction, **kw)
    assert loss.dtype == torch.float32 and grad.dtype == torch.float32
    assert loss.shape == ((p,) if reduction == "none" else ())
    assert_loss_close(loss, want, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(grad.double(), want_grad, rtol=1e-4, atol=1e-7)


@pytest.mark.parametrize("shape", [(2, 1), (8, 4, 16, 16)])
def test_default_launch_configuration(shape):
    pred, target, ref, swap, weight = make_inputs(shape, seed=4)
    kw = dict(ref_pred=ref, swap=swap, weight=weight, beta=50.0, lam=0.9)
    loss, grad = run(pred, target, **kw)
    want, want_grad, _, _ = oracle(pred, target, **kw)
    assert_loss_close(loss, want, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(grad.double(), want_grad, rtol=1e-4, atol=1e-7)


def test_launch_config_heuristic(monkeypatch):
    """8 SD1.5 pairs on a 132-SM GPU fill it; small rows never get empty splits."""
    monkeypatch.setattr(op, "_sm_count", lambda index: 132)
    cuda = torch.device("cuda", 0)  # metadata only: nothing touches the GPU
    sd15 = op.launch_config(4 * 64 * 64, 16, cuda)
    assert (sd15.block, sd15.splits, sd15.chunk) == (1024, 16, 1024)
    sdxl = op.launch_config(4 * 128 * 128, 16, cuda)
    assert (sdxl.block, sdxl.splits, sdxl.chunk) == (1024, 32, 2048)
    assert 16 * sdxl.splits >= 4 * 132 * 0.9
    for n in (1, 7, 1000, 1025, 5000, 10**6):
        for rows in (2, 16, 64, 1024):
            c = op.launch_config(n, rows, cuda)
            assert 1 <= c.splits <= op.MAX_SPLITS
            assert c.chunk % c.block == 0
            assert (c.splits - 1) * c.chunk < n <= c.splits * c.chunk  # every split non-empty
    with op.launch_overrides(block=64, splits=5):
        c = op.launch_config(1000, 4, torch.device("cpu"))
        assert (c.block, c.splits, c.chunk) == (64, 4, 256)  # 16 blocks: 5 splits → 4 of 4


@pytest.mark.parametrize("lam", [0.99, 0.9, 0.5])
def test_bounded_margin_accurate_near_zero_margin(lam):
    """Near m_b = 0 the log-sum-exp form of m̃_b cancels two O(|log λ|) terms; the kernel
    switches to −log1p(λ·expm1(−m_b)) there and stays at float32 accuracy at β = 5000."""
    g = torch.Generator().manual_seed(11)
    target = torch.randn(8, 512, generator=g, dtype=torch.float64)
    ref = target + 0.01 * torch.randn(8, 512, generator=g, dtype=torch.float64)
    pred = ref + 1e-4 * torch.randn(8, 512, generator=g, dtype=torch.float64)
    pred, target, ref = pred.float(), target.float(), ref.float()
    kw = dict(ref_pred=ref, beta=5000.0, lam=lam)
    loss, grad = run(pred, target, **kw)
    want, want_grad, _, _ = oracle(pred, target, **kw)
    assert math.isclose(loss.item(), want, rel_tol=1e-6)
    rel = ((grad.double() - want_grad).norm() / want_grad.norm()).item()
    assert rel <= 2e-6


# ------------------------------------------------------------------ low precision
def _max_err(got, want):
    return (got.double() - want).abs().max().item()


def check_low_precision(dtype, lam, reduction, seed):
    """flash-attention rule: |kernel − oracle| ≤ 2·|torch(low precision) − oracle| + floor, the
    oracle in float64 on the same low-precision inputs. The floors come from the condition
    numbers (tests/kernels/tolerances.py): both backends accumulate in float32 in different
    orders, so either may be the more accurate one by k·ε₃₂·(|ℓ| + S_k); the gradient is
    rounded to ``dtype`` last (one ulp: the triton 3.7.1 interpreter truncates float32 →
    bfloat16 instead of rounding to nearest even as the GPU does)."""
    shape = (6, 4, 8, 9)
    n = math.prod(shape[1:])
    pred, target, ref, swap, weight = make_inputs(shape, dtype, seed=seed)
    go = random_grad_output(reduction, 3, seed=seed + 1)
    kw = dict(ref_pred=ref, swap=swap, weight=weight, beta=20.0, lam=lam, reduction=reduction)
    with op.launch_overrides(block=64):
        loss, grad = run(pred, target, grad_output=go, **kw)
    t_loss, t_grad = run(pred, target, grad_output=go, backend="torch", **kw)
    kw.pop("reduction")
    want, want_grad, e_th, e_rf = oracle_with_grad_output(pred, target, go, reduction, **kw)
    assert loss.dtype == torch.float32 and grad.dtype == dtype
    s_cond, k_cond = tol.pair_conditions(e_th, e_rf, swap, weight, 20.0, lam)
    per_pair, _, _, _ = oracle(pred, target, reduction="none", **kw)
    loss_floor = tol.loss_bounds(per_pair, s_cond, n)
    if reduction == "mean":
        loss_floor = loss_floor.mean()
    want = torch.as_tensor(want, dtype=torch.float64)
    tag = f"{dtype} lam={lam} {reduction} seed={seed}"
    tol.assert_within(loss, want, 2 * _max_err(t_loss, want) + loss_floor, f"loss ({tag})")
    grad_floor = tol.grad_bounds(want_grad, k_cond, n, dtype)
    tol.assert_within(
        grad, want_grad, 2 * _max_err(t_grad, want_grad) + grad_floor, f"grad ({tag})"
    )


@pytest.mark.parametrize("seed", [0, 61])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("lam", [1.0, 0.9, 0.5])
@pytest.mark.parametrize("reduction", ["mean", "none"])
def test_low_precision_error_within_twice_torch(dtype, lam, reduction, seed):
    """See check_low_precision; seed 61 failed the earlier fixed floors (1e-6 on the loss)."""
    check_low_precision(dtype, lam, reduction, seed)


def test_mixed_dtype_target_and_reference():
    """float32 target and float16 ref_pred beside a bfloat16 pred: each loaded in its own
    dtype and cast to float32 at once, as the reference does."""
    pred, target, ref, swap, weight = make_inputs((4, 3, 7, 5), torch.float32, seed=6)
    pred = pred.bfloat16()
    ref = ref.half()
    kw = dict(ref_pred=ref, swap=swap, weight=weight, beta=30.0, lam=0.9)
    loss, grad = run(pred, target, **kw)
    t_loss, t_grad = run(pred, target, backend="torch", **kw)
    assert grad.dtype == torch.bfloat16
    torch.testing.assert_close(loss, t_loss, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(grad.float(), t_grad.float(), rtol=1e-2, atol=1e-6)
    want, want_grad, _, _ = oracle(pred, target, **kw)
    assert math.isclose(loss.item(), want, rel_tol=1e-5, abs_tol=1e-6)
    torch.testing.assert_close(grad.double(), want_grad, rtol=1e-2, atol=1e-6)


# ------------------------------------------------------------------ layouts
def _noncontiguous_cases():
    return {
        # batch dimension last in memory: (6, 5, 7) with strides (1, 42, 6) — a strided view
        "batch_last": lambda t: t.permute(1, 2, 0).contiguous().permute(2, 0, 1),
        # every other column: viewable as (2P, N) with column stride 2
        "column_step": lambda t: torch.stack([t, t + 1], dim=-1)[..., 0],
        # a slice of the last dimension of a 3-D tensor: not one stride, copied once
        "last_dim_slice": lambda t: torch.cat([t, t[..., :3]], dim=-1)[..., :7],
    }


@pytest.mark.parametrize("layout", ["batch_last", "column_step", "last_dim_slice"])
@pytest.mark.parametrize("reduction", ["mean", "none"])
def test_noncontiguous_inputs(layout, reduction):
    pred, target, ref, swap, weight = make_inputs((6, 5, 7), seed=7)
    make = _noncontiguous_cases()[layout]
    pred_nc, target_nc, ref_nc = make(pred), make(target), make(ref)
    assert not pred_nc.is_contiguous() and torch.equal(pred_nc, pred)
    # strided swap and ref_err views, and a stride-0 grad_output for "none" (loss.sum())
    swap_nc = torch.stack([swap, ~swap], dim=1)[:, 0]
    kw = dict(ref_pred=ref_nc, swap=swap_nc, weight=weight, beta=20.0, lam=0.9)
    with op.launch_overrides(block=16):
        x = pred_nc.detach().requires_grad_(True)
        loss = sk.preference_loss(x, target_nc, reduction=reduction, backend="triton", **kw)
        loss.sum().backward()
    want, want_grad, _, _ = oracle(pred, target, **dict(kw, ref_pred=ref, swap=swap))
    if reduction == "none":  # the oracle's "mean" (P = 3); "none" then .sum() is the sum
        want, want_grad = 3 * want, 3 * want_grad
    assert math.isclose(loss.sum().item(), want, rel_tol=1e-5, abs_tol=1e-6)
    torch.testing.assert_close(x.grad.double(), want_grad, rtol=1e-4, atol=1e-7)

    ref_err_big = torch.stack([sk.per_sample_error(ref, target)] * 2, dim=1)
    ref_err_nc = ref_err_big[:, 1]
    assert ref_err_nc.stride(0) == 2
    loss2, _ = run(pred_nc, target_nc, ref_err=ref_err_nc, swap=swap_nc, beta=20.0, lam=0.9)
    want2, _, _, _ = oracle(pred, target, ref_err=ref_err_nc, swap=swap, beta=20.0, lam=0.9)
    assert math.isclose(loss2.item(), want2, rel_tol=1e-5, abs_tol=1e-6)


def test_strided_views_are_not_copied():
    t = torch.randn(6, 5, 7, generator=torch.Generator().manual_seed(8))
    batch_last = t.permute(1, 2, 0).contiguous().permute(2, 0, 1)
    column_step = torch.stack([t, t], dim=-1)[..., 0]
    for v in (batch_last, column_step, t[1:5], t[:1].expand(6, 5, 7)):
        rows = op._as_rows(v)
        assert rows.data_ptr() == v.data_ptr() and rows.shape == (v.shape[0], 35)
    assert op._as_rows(batch_last).stride() == (1, 6)
    assert op._as_rows(column_step).stride() == (70, 2)


# ------------------------------------------------------------------ robustness
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("lam", [1.0, 0.9])
@pytest.mark.parametrize("sign", [1.0, -1.0])
def test_extreme_margins_are_finite(dtype, lam, sign):
    """Margins up to ±1e6 (×100 with the weight): no NaN or inf, and the oracle's per-pair
    losses, gradient and mean within the per-dtype bounds (tests/kernels/extreme.py)."""
    assert extreme_failures("triton", dtype, lam, sign) == []
    x, target, ref, swap, weight = extreme_case(dtype, sign)
    loss, grad = run(
        x, target, ref_pred=ref, swap=swap, weight=weight, beta=5000.0, lam=lam, reduction="sum"
    )
    assert torch.isfinite(loss).all() and torch.isfinite(grad.float()).all()


@pytest.mark.parametrize("reduction", REDUCTIONS)
@pytest.mark.parametrize("ref_kind", ["ref_pred", "ref_err"])
def test_every_output_element_is_written(monkeypatch, reduction, ref_kind):
    """Outputs and partial buffers start as NaN: any element a kernel skips would show."""
    monkeypatch.setattr(op, "DEBUG_POISON", True)
    pred, target, ref, swap, weight = make_inputs((6, 3, 37), seed=9)
    ref_pred = ref if ref_kind == "ref_pred" else None
    ref_err = sk.per_sample_error(ref, target) if ref_kind == "ref_err" else None
    with op.launch_overrides(block=16, splits=3):
        outs = op.preference_forward(
            pred, target, ref_pred, ref_err, swap, weight, 20.0, 0.9, reduction
        )
        for t in outs:
            assert torch.isfinite(t).all()
        loss, e_theta, e_ref, coef = outs
        go = random_grad_output(reduction, 3, seed=10)
        grad = op.preference_backward(go, pred, target, coef)
        assert torch.isfinite(grad).all() and grad.shape == pred.shape
    want, want_grad, e_th, e_rf = oracle_with_grad_output(
        pred,
        target,
        go,
        reduction,
        ref_pred=ref_pred,
        ref_err=ref_err,
        swap=swap,
        weight=weight,
        beta=20.0,
        lam=0.9,
    )
    assert_loss_close(loss, want, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(e_theta.double(), torch.tensor(e_th, dtype=torch.float64))
    torch.testing.assert_close(e_ref.double(), torch.tensor(e_rf, dtype=torch.float64))
    torch.testing.assert_close(grad.double(), want_grad, rtol=1e-4, atol=1e-7)


def test_deterministic_bit_identical():
    pred, target, ref, swap, weight = make_inputs((8, 2, 101), torch.bfloat16, seed=12)
    kw = dict(ref_pred=ref, swap=swap, weight=weight, beta=500.0, lam=0.9, reduction="sum")
    with op.launch_overrides(block=32, splits=3):  # 7 blocks per row: splits of 3, 3, 1
        a = sk.preference_loss_with_stats(pred, target, backend="triton", **kw)
        b = sk.preference_loss_with_stats(pred, target, backend="triton", **kw)
        _, ga = run(pred, target, **kw)
        _, gb = run(pred, target, **kw)
    assert torch.equal(a.loss, b.loss)
    assert torch.equal(a.e_theta, b.e_theta) and torch.equal(a.e_ref, b.e_ref)
    assert torch.equal(ga, gb)
    assert a.backend == "triton"


def test_loss_inside_larger_expression():
    pred, target, ref, swap, weight = make_inputs((6, 2, 9), seed=13)
    grads = {}
    for backend in ("triton", "torch"):
        x = pred.detach().clone().requires_grad_(True)
        kw = dict(swap=swap, weight=weight, beta=20.0, lam=0.9, backend=backend)
        per_pair = sk.preference_loss(x, target, ref, reduction="none", **kw)
        total = (
            3 * sk.preference_loss(x, target, ref, **kw)
            + (torch.arange(3.0) * per_pair).sum()
            + x.square().sum()
        )
        total.backward()
        grads[backend] = x.grad
    torch.testing.assert_close(grads["triton"], grads["torch"], rtol=1e-4, atol=1e-6)


def test_outputs_and_stats_match_torch_backend():
    pred, target, ref, swap, weight = make_inputs((10, 33), seed=3)
    kw = dict(swap=swap, weight=weight, beta=5.0, lam=0.9)
    got = sk.preference_loss_with_stats(pred, target, ref, backend="triton", **kw)
    want = sk.preference_loss_with_stats(pred, target, ref, backend="torch", **kw)
    torch.testing.assert_close(got.loss, want.loss)
    torch.testing.assert_close(got.e_theta, want.e_theta)
    torch.testing.assert_close(got.e_ref, want.e_ref)
    assert not got.e_theta.requires_grad and not got.e_ref.requires_grad
    # margins are differences of O(1) float32 errors: absolute tolerance ~ float32 epsilon
    assert got.stats.as_dict() == pytest.approx(want.stats.as_dict(), abs=1e-6, nan_ok=True)


def test_no_gradient_to_target_or_reference():
    pred, target, ref, _, _ = make_inputs((4, 6), seed=14)
    x, t, r = (v.clone().requires_grad_(True) for v in (pred, target, ref))
    sk.preference_loss(x, t, r, beta=10.0, backend="triton").backward()
    assert x.grad is not None and t.grad is None and r.grad is None


# ------------------------------------------------------------------ availability / import
def test_availability_reasons(monkeypatch):
    from snpo_kernels.triton import backend

    assert backend.availability(torch.device("cpu"), torch.float32) is None
    assert backend.availability(torch.device("cuda", 0), torch.bfloat16) is None
    assert "backend='torch' for float64" in backend.availability(torch.device("cpu"), torch.float64)
    assert "int32" in backend.availability(torch.device("cpu"), torch.int32)
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    assert "TRITON_INTERPRET=1" in backend.availability(torch.device("cpu"), torch.float32)
    assert "CUDA" in backend.availability(torch.device("meta"), torch.float32)


def test_float64_refused_with_reason():
    pred, target, ref, _, _ = make_inputs((2, 3), torch.float64, seed=15)
    with pytest.raises(sk.BackendUnavailableError, match="float64"):
        sk.preference_loss(pred, target, ref, beta=1.0, backend="triton")


def test_import_does_not_import_triton():
    code = (
        "import sys, snpo_kernels, snpo_kernels.triton, snpo_kernels.triton.backend; "
        "assert 'triton' not in sys.modules, 'triton imported'"
    )
    subprocess.run([sys.executable, "-c", code], check=True)


# ------------------------------------------------------------------ real CUDA
SD15 = (16, 4, 64, 64)
SDXL = (16, 4, 128, 128)


def _gpu_inputs(shape, dtype, seed=0):
    """Realistic scales: errors ~1e-3 so that β = 5000 leaves the float32 sums well conditioned."""
    g = torch.Generator(device="cuda").manual_seed(seed)
    target = torch.randn(shape, generator=g, device="cuda", dtype=torch.float64)
    ref = target + 0.03 * torch.randn(shape, generator=g, device="cuda", dtype=torch.float64)
    pred = ref + 0.003 * torch.randn(shape, generator=g, device="cuda", dtype=torch.float64)
    p = shape[0] // 2
    swap = torch.rand(p, generator=g, device="cuda") < 0.5
    weight = 0.5 + torch.rand(p, generator=g, device="cuda")
    return pred.to(dtype), target.to(dtype), ref.to(dtype), swap, weight


def _rel(got, want):
    return ((got.double() - want.double()).norm() / want.double().norm()).item()


@pytest.mark.gpu
@pytest.mark.parametrize("shape", [SD15, SDXL], ids=["sd15", "sdxl"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("lam", [1.0, 0.9])
@pytest.mark.parametrize("reduction", ["mean", "none"])
def test_gpu_matches_reference(shape, dtype, lam, reduction):
    pred, target, ref, swap, weight = _gpu_inputs(shape, dtype)
    go = random_grad_output(reduction, shape[0] // 2, "cuda", seed=16)
    kw = dict(ref_pred=ref, swap=swap, weight=weight, beta=5000.0, lam=lam, reduction=reduction)
    loss, grad = run(pred, target, grad_output=go, **kw)
    assert grad.dtype == dtype and loss.dtype == torch.float32
    # the reference in float64 on the same (rounded) inputs, and in the inputs' own dtype
    kw64 = dict(kw, ref_pred=ref.double())
    w_loss, w_grad = run(pred.double(), target.double(), grad_output=go, backend="torch", **kw64)
    t_loss, t_grad = run(pred, target, grad_output=go, backend="torch", **kw)
    loss_tol, grad_tol = (1e-5, 1e-5) if dtype == torch.float32 else (1e-4, 1e-2)
    assert _rel(loss, w_loss) <= loss_tol
    assert _rel(grad, w_grad) <= grad_tol
    # and no worse than twice the PyTorch reference in the same dtype (which near m_b = 0
    # with λ < 1 is itself ~1e-5 off in float32: its log-sum-exp cancels there)
    assert _rel(loss, w_loss) <= 2 * _rel(t_loss, w_loss) + 1e-6
    assert _rel(grad, w_grad) <= 2 * _rel(t_grad, w_grad) + 1e-6


@pytest.mark.gpu
@pytest.mark.parametrize("reduction", ["mean", "none"])
def test_gpu_cuda_graph_capture(reduction):
    shape = SD15
    pred, target, ref, swap, weight = _gpu_inputs(shape, torch.bfloat16)
    static = [t.clone() for t in (pred, target, ref)]
    static_pred = static[0].requires_grad_(True)
    go = random_grad_output(reduction, shape[0] // 2, "cuda", seed=17)
    kw = dict(swap=swap, weight=weight, beta=5000.0, lam=0.9, reduction=reduction)

    def step():
        loss = sk.preference_loss(static_pred, static[1], static[2], backend="triton", **kw)
        (grad,) = torch.autograd.grad(loss, static_pred, go)
        return loss, grad

    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        for _ in range(3):  # JIT and allocator warm-up outside the capture
            step()
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        s_loss, s_grad = step()

    for seed in (1, 2):
        new = _gpu_inputs(shape, torch.bfloat16, seed)
        with torch.no_grad():
            for dst, src in zip(static, new[:3]):
                dst.copy_(src)
        graph.replay()
        e_loss, e_grad = run(new[0], new[1], ref_pred=new[2], grad_output=go, **kw)
        torch.testing.assert_close(s_loss.detach(), e_loss, rtol=0, atol=0)
        torch.testing.assert_close(s_grad, e_grad, rtol=0, atol=0)


@pytest.mark.gpu
def test_gpu_deterministic_and_extreme_fp16():
    pred, target, ref, swap, weight = _gpu_inputs(SDXL, torch.float16)
    kw = dict(ref_pred=ref, swap=swap, weight=weight, beta=5000.0, lam=0.9)
    a = run(pred, target, **kw)
    b = run(pred, target, **kw)
    assert torch.equal(a[0], b[0]) and torch.equal(a[1], b[1])
    far = torch.full_like(pred, 30.0)
    loss, grad = run(far, target, ref_pred=ref, swap=swap, weight=weight, beta=5000.0, lam=0.9)
    assert torch.isfinite(loss).all() and torch.isfinite(grad.float()).all()
