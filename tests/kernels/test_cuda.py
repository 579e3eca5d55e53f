"""The CUDA kernels (backend="cuda") against the float64 reference and the oracle — GPU only.

Skipped without a CUDA device (tests/conftest.py); skipped with the reason when the extension
is neither installed nor JIT-buildable, failed when a JIT build was attempted and failed.
Nothing here touches torch.cuda at import time.
"""

from __future__ import annotations

import math
import os
import shutil
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch

import snpo_kernels as sk
from snpo_kernels.validation import validate_inputs

from .oracle import oracle

pytestmark = pytest.mark.gpu
ROOT = Path(__file__).resolve().parents[2]
SHAPES = [(2, 1), (2, 3, 5, 7), (6, 4, 8, 8), (4, 1027), (16, 4, 64, 64)]
HALF = (torch.bfloat16, torch.float16)
# norm-wise relative error bounds (float64 reference as truth)
LOSS_TOL = {torch.float32: 1e-5, torch.bfloat16: 3e-5, torch.float16: 3e-5}
GRAD_TOL = {torch.float32: 1e-5, torch.bfloat16: 1e-2, torch.float16: 5e-3}


@pytest.fixture(scope="module", autouse=True)
def _extension():
    from snpo_kernels.cuda import ops

    why = ops.extension_error()
    if why is not None:
        if "JIT build failed" in why:
            pytest.fail(why)
        pytest.skip(why)


def rel_err(got: torch.Tensor, want: torch.Tensor) -> float:
    got, want = got.detach().double().cpu(), want.detach().double().cpu()
    den = want.norm().item()
    return (got - want).norm().item() / (den if den > 0 else 1.0)


def make_inputs(shape, dtype=torch.float32, seed=0, spread=0.05, ref_dtype=None, tgt_dtype=None):
    """pred close to ref so that β·margin is O(1); all on the GPU."""
    g = torch.Generator().manual_seed(seed)
    target = torch.randn(shape, generator=g, dtype=torch.float64)
    ref = target + torch.randn(shape, generator=g, dtype=torch.float64)
    pred = ref + spread * torch.randn(shape, generator=g, dtype=torch.float64)
    p = shape[0] // 2
    swap = torch.rand(p, generator=g) < 0.5
    weight = (0.5 + torch.rand(p, generator=g, dtype=torch.float64)).float()
    dev = "cuda"
    return (
        pred.to(dev, dtype),
        target.to(dev, tgt_dtype or dtype),
        ref.to(dev, ref_dtype or dtype),
        swap.to(dev),
        weight.to(dev),
    )


def run_both(pred, target, ref_kw, go_seed=1, **kw):
    """(cuda loss, cuda grad, float64 reference loss, reference grad) with a random
    grad_output, plus the cuda and reference per-sample errors."""
    p_cuda = pred.detach().requires_grad_(True)  # a view: keeps offsets and strides
    out = sk.preference_loss_with_stats(p_cuda, target, **ref_kw, backend="cuda", **kw)
    assert out.backend == "cuda"
    g = torch.Generator(device="cuda").manual_seed(go_seed)
    go = torch.rand(out.loss.shape, generator=g, device="cuda") + 0.5
    (grad,) = torch.autograd.grad(out.loss, p_cuda, go)

    p64 = pred.detach().double().requires_grad_(True)
    ref64 = {k: v.double() for k, v in ref_kw.items()}
    kw64 = dict(kw)
    if isinstance(kw64.get("weight"), torch.Tensor):
        kw64["weight"] = kw64["weight"].double()
    want = sk.preference_loss_with_stats(p64, target.double(), **ref64, backend="torch", **kw64)
    (want_grad,) = torch.autograd.grad(want.loss, p64, go.double())
    return out, grad, want, want_grad


# ------------------------------------------------------------------ values and gradients
@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("lam", [1.0, 0.9, 0.5])
@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
@pytest.mark.parametrize("variant", ["plain", "swap", "weight", "swap+weight", "ref_err"])
def test_float32_matches_reference(shape, lam, reduction, variant):
    pred, target, ref, swap, weight = make_inputs(shape)
    kw = {"beta": 20.0, "lam": lam, "reduction": reduction}
    if "swap" in variant:
        kw["swap"] = swap
    if "weight" in variant:
        kw["weight"] = weight
    ref_kw = (
        {"ref_err": sk.per_sample_error(ref, target)} if variant == "ref_err" else {"ref_pred": ref}
    )
    out, grad, want, want_grad = run_both(pred, target, ref_kw, **kw)
    assert out.loss.dtype == torch.float32
    assert out.loss.shape == ((shape[0] // 2,) if reduction == "none" else ())
    assert not out.e_theta.requires_grad and out.e_theta.dtype == torch.float32
    assert rel_err(out.loss, want.loss) <= 1e-5
    assert rel_err(out.e_theta, want.e_theta) <= 1e-6
    assert rel_err(out.e_ref, want.e_ref) <= 1e-6
    assert grad.dtype == pred.dtype and grad.shape == pred.shape
    assert rel_err(grad, want_grad) <= GRAD_TOL[torch.float32]


@pytest.mark.parametrize("shape", [(2, 3, 5, 7), (4, 1027), (16, 4, 64, 64)])
@pytest.mark.parametrize("dtype", HALF)
@pytest.mark.parametrize("companions", ["same", "float32"])
@pytest.mark.parametrize("lam", [1.0, 0.9])
def test_half_dtypes_match_reference(shape, dtype, companions, lam):
    """bf16/fp16 pred; target and ref_pred in pred's dtype or float32."""
    other = torch.float32 if companions == "float32" else dtype
    pred, target, ref, swap, weight = make_inputs(shape, dtype, ref_dtype=other, tgt_dtype=other)
    out, grad, want, want_grad = run_both(
        pred, target, {"ref_pred": ref}, swap=swap, weight=weight, beta=20.0, lam=lam
    )
    assert rel_err(out.loss, want.loss) <= LOSS_TOL[dtype]
    assert rel_err(out.e_theta, want.e_theta) <= 1e-6
    assert grad.dtype == dtype
    assert rel_err(grad, want_grad) <= GRAD_TOL[dtype]


def test_mixed_half_target_is_cast_not_refused():
    """fp16 target with bf16 pred: run() casts the target to float32 (exact)."""
    pred, target, ref, swap, _ = make_inputs((4, 64), torch.bfloat16)
    out, grad, want, want_grad = run_both(
        pred, target.to(torch.float16), {"ref_pred": ref}, swap=swap, beta=20.0
    )
    assert rel_err(out.loss, want.loss) <= 1e-4
    assert rel_err(grad, want_grad) <= 1e-2


def test_matches_independent_oracle():
    pred, target, ref, swap, weight = make_inputs((6, 4, 8, 8), seed=7)
    p = pred.clone().requires_grad_(True)
    loss = sk.preference_loss(
        p, target, ref, swap=swap, weight=weight, beta=20.0, lam=0.9, backend="cuda"
    )
    loss.backward()
    want, want_grad, _, _ = oracle(
        pred.cpu(),
        target.cpu(),
        ref.cpu(),
        swap=swap.cpu(),
        weight=weight.cpu(),
        beta=20.0,
        lam=0.9,
    )
    assert math.isclose(loss.item(), want, rel_tol=1e-5)
    assert rel_err(p.grad, want_grad) <= 1e-5


@pytest.mark.parametrize("layout", ["transposed", "misaligned", "odd_n"])
def test_non_contiguous_misaligned_and_odd_sizes(layout):
    """Strided inputs are made contiguous; unaligned rows take the scalar path."""
    if layout == "transposed":
        base = make_inputs((8, 32, 16))
        pred, target, ref = (t.transpose(1, 2) for t in base[:3])
        assert not pred.is_contiguous()
    elif layout == "misaligned":
        base = make_inputs((8, 64))
        pred, target, ref = (
            torch.cat([t.new_zeros(1), t.flatten()])[1:].view(8, 64) for t in base[:3]
        )
        assert pred.data_ptr() % 16 != 0
    else:
        base = make_inputs((8, 3, 37))
        pred, target, ref = base[:3]
    swap, weight = base[3], base[4]
    out, grad, want, want_grad = run_both(
        pred, target, {"ref_pred": ref}, swap=swap, weight=weight, beta=20.0, lam=0.9
    )
    assert rel_err(out.loss, want.loss) <= 1e-5
    assert rel_err(grad, want_grad) <= 1e-5


def test_many_pairs_tiny_rows():
    """P larger than the finalize block (several pairs per thread), n smaller than a vector."""
    pred, target, ref, swap, weight = make_inputs((2000, 3))
    for red in ("mean", "none"):
        out, grad, want, want_grad = run_both(
            pred, target, {"ref_pred": ref}, swap=swap, weight=weight, beta=20.0, reduction=red
        )
        assert rel_err(out.loss, want.loss) <= 1e-5
        assert rel_err(grad, want_grad) <= 1e-5


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("lam", [1.0, 0.9])
@pytest.mark.parametrize("sign", [1.0, -1.0])
def test_extreme_margins_are_finite(dtype, lam, sign):
    """Margins up to ±1e6: loss and gradient finite and close to the oracle."""
    p, n = 3, 64
    target = torch.zeros(2 * p, n)
    pred = torch.full((2 * p, n), 1000.0 if sign > 0 else 0.0)
    ref = torch.full((2 * p, n), 0.0 if sign > 0 else 1000.0)
    pred[:p] = ref[:p]
    swap = torch.tensor([False, True, False])
    weight = torch.tensor([1.0, 100.0, 0.01])
    pc = pred.to("cuda", dtype).requires_grad_(True)
    loss = sk.preference_loss(
        pc,
        target.to("cuda", dtype),
        ref.to("cuda", dtype),
        swap=swap.cuda(),
        weight=weight.cuda(),
        beta=5000.0,
        lam=lam,
        backend="cuda",
    )
    loss.backward()
    assert torch.isfinite(loss) and torch.isfinite(pc.grad.float()).all()
    want, want_grad, _, _ = oracle(
        pred, target, ref, swap=swap, weight=weight, beta=5000.0, lam=lam
    )
    assert math.isclose(loss.item(), want, rel_tol=1e-2)
    torch.testing.assert_close(pc.grad.double().cpu(), want_grad, rtol=2e-2, atol=1e-3)


def test_grad_output_and_use_inside_an_expression():
    pred, target, ref, swap, weight = make_inputs((6, 9, 9))
    p1 = pred.clone().requires_grad_(True)
    total = (
        3 * sk.preference_loss(p1, target, ref, swap=swap, weight=weight, beta=20.0, backend="cuda")
        + p1.square().sum()
    )
    total.backward()
    p2 = pred.double().requires_grad_(True)
    total2 = (
        3
        * sk.preference_loss(
            p2, target.double(), ref.double(), swap=swap, weight=weight.double(), beta=20.0
        )
        + p2.square().sum()
    )
    total2.backward()
    assert rel_err(p1.grad, p2.grad) <= 1e-5


def test_no_gradient_to_target_or_reference():
    pred, target, ref, swap, _ = make_inputs((4, 16))
    pred.requires_grad_(True)
    target.requires_grad_(True)
    ref.requires_grad_(True)
    sk.preference_loss(pred, target, ref, swap=swap, beta=20.0, backend="cuda").backward()
    assert pred.grad is not None and target.grad is None and ref.grad is None


def test_deterministic_bitwise():
    pred, target, ref, swap, weight = make_inputs((16, 4, 64, 64), torch.bfloat16, seed=3)
    results = []
    for _ in range(3):
        p = pred.clone().requires_grad_(True)
        out = sk.preference_loss_with_stats(
            p, target, ref, swap=swap, weight=weight, beta=5000.0, lam=0.9, backend="cuda"
        )
        out.loss.backward()
        results.append((out.loss, out.e_theta, out.e_ref, p.grad))
    for other in results[1:]:
        for a, b in zip(results[0], other):
            assert torch.equal(a, b)


def test_auto_prefers_cuda_and_stats_match_torch():
    assert sk.resolve_backend("auto", torch.device("cuda"), torch.bfloat16) == "cuda"
    pred, target, ref, swap, weight = make_inputs((10, 33))
    a = sk.preference_loss_with_stats(pred, target, ref, swap=swap, weight=weight, beta=5.0)
    b = sk.preference_loss_with_stats(
        pred, target, ref, swap=swap, weight=weight, beta=5.0, backend="torch"
    )
    assert a.backend == "cuda"
    for k, v in b.stats.as_dict().items():
        w = a.stats.as_dict()[k]
        assert (math.isnan(v) and math.isnan(w)) or math.isclose(w, v, rel_tol=1e-5, abs_tol=1e-6)


def test_no_host_synchronisation_and_cuda_graph_capture():
    pred, target, ref, swap, weight = make_inputs((8, 4, 16, 16), torch.bfloat16)
    static = pred.clone().requires_grad_(True)

    def step():
        loss = sk.preference_loss(
            static, target, ref, swap=swap, weight=weight, beta=20.0, lam=0.9, backend="cuda"
        )
        (grad,) = torch.autograd.grad(loss, static)
        return loss, grad

    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        eager = step()  # raises on any synchronising call
    finally:
        torch.cuda.set_sync_debug_mode("default")
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        step()  # warm-up on a side stream, as CUDA graphs want
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        captured = step()
    graph.replay()
    torch.cuda.synchronize()
    assert torch.equal(captured[0], eager[0]) and torch.equal(captured[1], eager[1])


def _smoke():
    import importlib.util

    spec = importlib.util.spec_from_file_location("gpu_smoke", ROOT / "scripts" / "gpu_smoke.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules["gpu_smoke"] = module
    spec.loader.exec_module(module)
    return module


@pytest.mark.parametrize("n", [1027, 16384])
@pytest.mark.parametrize("dtype", ["bf16", "fp16", "fp32"])
def test_large_beta_near_zero_margins_match_float64(dtype, n):
    """β = 5000, λ = 0.9 where every run starts (policy ≈ reference, m_b ≈ 0): the bounded
    margin's direct form keeps the loss within ~1e-6 of float64 (the log-sum-exp alone was
    off by 2–3e-5). Tolerances from the condition number: scripts/gpu_smoke.py."""
    res = _smoke().check("cuda", dtype, torch.device("cuda"), 8, n)
    assert res.status == "OK", res.detail


def test_torch_compile_fullgraph():
    from snpo_kernels.cuda import backend

    pred, target, ref, swap, weight = make_inputs((8, 4, 8, 8))

    def f(p):
        x = validate_inputs(p, target, ref, None, swap, weight, 20.0, 0.9, "mean")
        return backend.run(x)[0]

    compiled = torch.compile(f, fullgraph=True)
    p1 = pred.clone().requires_grad_(True)
    p2 = pred.clone().requires_grad_(True)
    l1, l2 = compiled(p1), f(p2)
    l1.backward()
    l2.backward()
    torch.testing.assert_close(l1, l2)
    torch.testing.assert_close(p1.grad, p2.grad)


def test_auto_backend_under_fullgraph_compile_in_a_fresh_process():
    """The first call of a fresh process inside torch.compile(fullgraph=True) with
    backend="auto": resolving the backend must not trace into the extension's load lock."""
    code = textwrap.dedent(
        """
        import torch, snpo_kernels as sk
        g = torch.Generator().manual_seed(0)
        t = torch.randn(8, 256, generator=g).cuda()
        r = t + 0.1 * torch.randn(8, 256, generator=g).cuda()
        f = lambda p: sk.preference_loss(p, t, r, beta=5000.0, lam=0.9)
        p = (r + 0.01).requires_grad_(True)
        loss = torch.compile(f, fullgraph=True)(p)
        loss.backward()
        torch.testing.assert_close(loss, f(p.detach()))
        print("COMPILED OK")
        """
    )
    env = dict(os.environ, PYTHONPATH=str(ROOT), OMP_NUM_THREADS="1")
    env.pop("TRITON_INTERPRET", None)
    res = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, timeout=600, env=env
    )
    assert res.returncode == 0 and "COMPILED OK" in res.stdout, res.stderr[-4000:]


def test_binding_rejects_bad_inputs_with_clear_messages():
    fwd, bwd = torch.ops.snpo_cuda.forward, torch.ops.snpo_cuda.backward
    x = torch.randn(4, 8, device="cuda")
    cases = [
        ((x.t().contiguous().t(), x, x, None, None, None, 1.0, 1.0, 0), "pred must be contiguous"),
        ((x, x.half(), x, None, None, None, 1.0, 1.0, 0), "target has dtype Half"),
        ((x.bfloat16(), x.half(), x, None, None, None, 1.0, 1.0, 0), "target has dtype"),
        ((x, x.cpu(), x, None, None, None, 1.0, 1.0, 0), "target must be a CUDA tensor"),
        ((x.double(), x.double(), x.double(), None, None, None, 1.0, 1.0, 0), "float64"),
        ((x, x, None, torch.zeros(4, device="cuda").double(), None, None, 1.0, 1.0, 0), "ref_err"),
        ((x, x, x, None, None, None, 1.0, 1.5, 0), "lam must lie in"),
        ((x, x, x, None, None, None, 1.0, 1.0, 7), "reduction must be"),
        ((x, x, None, None, None, None, 1.0, 1.0, 0), "exactly one of ref_pred"),
        ((x[:3], x[:3], x[:3], None, None, None, 1.0, 1.0, 0), "shape \\(2P"),
    ]
    for args, match in cases:
        with pytest.raises(RuntimeError, match=match):
            fwd(*args)
    coef = torch.zeros(4, device="cuda")
    with pytest.raises(RuntimeError, match="grad_loss has 1 elements; expected 2"):
        bwd(torch.ones((), device="cuda"), x, x, coef, 2)


@pytest.mark.slow
def test_int64_offsets_beyond_2_pow_31_elements():
    """2 rows of 2^30 + 64 bf16 elements: flat offsets exceed int32."""
    n = 2**30 + 64
    free, _ = torch.cuda.mem_get_info()
    if free < 24 * 2**30:
        pytest.skip("needs ~24 GiB of free GPU memory")
    pred = torch.empty(2, n, device="cuda", dtype=torch.bfloat16)
    pred[0].fill_(0.5)
    pred[1].fill_(1.5)
    target = torch.zeros_like(pred)
    ref = torch.ones_like(pred)
    p = pred.requires_grad_(True)
    out = sk.preference_loss_with_stats(p, target, ref, beta=1.0, backend="cuda")
    out.loss.backward()
    torch.testing.assert_close(out.e_theta.cpu(), torch.tensor([0.25, 2.25]), rtol=1e-5, atol=0)
    torch.testing.assert_close(out.e_ref.cpu(), torch.tensor([1.0, 1.0]), rtol=1e-5, atol=0)
    # the last element of each row got its gradient (written through int64 offsets)
    want = sk.preference_loss(
        torch.tensor([[0.5], [1.5]], dtype=torch.float64, requires_grad=True),
        torch.zeros(2, 1, dtype=torch.float64),
        torch.ones(2, 1, dtype=torch.float64),
        beta=1.0,
    )
    assert math.isclose(out.loss.item(), want.item(), rel_tol=1e-5)
    g = p.grad
    assert g[0, -1].item() != 0 and g[1, -1].item() != 0
    assert torch.equal(g[0, :8], g[0, -8:]) and torch.equal(g[1, :8], g[1, -8:])


# ------------------------------------------------------------------ compute-sanitizer
_SANITIZE = textwrap.dedent(
    """
    import torch, snpo_kernels as sk
    for dtype, n in ((torch.float32, 1027), (torch.bfloat16, 4 * 8 * 8)):
        g = torch.Generator().manual_seed(0)
        t = torch.randn(6, n, generator=g).to("cuda", dtype)
        r = t + torch.randn(6, n, generator=g).to("cuda", dtype)
        p = (r + 0.05).requires_grad_(True)
        swap = torch.tensor([True, False, True], device="cuda")
        for red in ("mean", "none"):
            loss = sk.preference_loss(p, t, r, swap=swap, beta=20.0, lam=0.9, reduction=red,
                                      backend="cuda")
            torch.autograd.grad(loss.sum(), p)
    torch.cuda.synchronize()
    print("SANITIZE DONE")
    """
)


def _sanitizer() -> str | None:
    found = shutil.which("compute-sanitizer")
    if found:
        return found
    for home in (os.environ.get("CUDA_HOME"), "/usr/local/cuda"):
        if home and Path(home, "bin", "compute-sanitizer").is_file():
            return str(Path(home, "bin", "compute-sanitizer"))
    return None


@pytest.mark.parametrize("tool", ["memcheck", "racecheck"])
def test_compute_sanitizer_is_clean(tool, tmp_path):
    exe = _sanitizer()
    if exe is None:
        pytest.skip("compute-sanitizer not found")
    script = tmp_path / "sanitize.py"
    script.write_text(_SANITIZE)
    env = dict(os.environ, PYTHONPATH=str(ROOT), OMP_NUM_THREADS="1")
    res = subprocess.run(
        [exe, "--tool", tool, "--error-exitcode", "17", sys.executable, str(script)],
        capture_output=True,
        text=True,
        timeout=600,
        env=env,
    )
    log = res.stdout + res.stderr
    assert res.returncode == 0, log[-6000:]
    assert "SANITIZE DONE" in log and "ERROR SUMMARY: 0 errors" in log, log[-6000:]
