"""What has to hold for the GPU paths, checked on the CPU: the Triton backend's dtype contract,
the test suite's Triton mode on a CUDA host (simulated), and the GPU smoke check
(scripts/gpu_smoke.py, the first stage of scripts/gpu_suite.sh) run here on torch and the
Triton interpreter."""

from __future__ import annotations

import importlib.util
import os
import re
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch

import snpo_kernels as sk
from tests import conftest

ROOT = Path(__file__).resolve().parents[2]
SMOKE = ROOT / "scripts" / "gpu_smoke.py"
SUITE = ROOT / "scripts" / "gpu_suite.sh"
F64 = torch.float64


# ------------------------------------------------------------------ Triton: float64 companions
@pytest.mark.parametrize(
    "which", ["target", "ref_pred", "ref_err", "target+ref_pred"], ids=lambda s: f"f64_{s}"
)
def test_triton_follows_the_float64_contract_for_mixed_inputs(which):
    """float32 pred with a float64 target / reference: the contract accumulates in float64
    and returns a float64 loss (as the CUDA backend does), not the kernels' float32."""
    pytest.importorskip("triton")
    if os.environ.get("TRITON_INTERPRET") != "1":
        pytest.skip("the Triton CPU path needs TRITON_INTERPRET=1 (tests/conftest.py)")
    g = torch.Generator().manual_seed(3)
    pred = torch.randn(6, 5, generator=g)
    target = torch.randn(6, 5, generator=g, dtype=F64 if "target" in which else torch.float32)
    ref = target.double() + torch.randn(6, 5, generator=g, dtype=F64)
    if which == "ref_err":
        kw = {"ref_err": (ref - target).pow(2).mean(dim=1)}
    else:
        kw = {"ref_pred": ref if "ref_pred" in which else ref.float()}
    swap = torch.tensor([True, False, True])
    args = dict(swap=swap, beta=3.0, lam=0.9, reduction="none")
    p_tr = pred.clone().requires_grad_(True)
    p_ref = pred.clone().requires_grad_(True)
    loss = sk.preference_loss(p_tr, target, **kw, **args, backend="triton")
    want = sk.preference_loss(p_ref, target, **kw, **args, backend="torch")
    assert loss.dtype == want.dtype == F64
    assert torch.equal(loss, want)  # the same float64 computation
    go = torch.rand(3, generator=g, dtype=F64)
    (grad,) = torch.autograd.grad(loss, p_tr, go)
    (want_grad,) = torch.autograd.grad(want, p_ref, go)
    assert grad.dtype == torch.float32 and torch.equal(grad, want_grad)


# ------------------------------------------------------------------ the suite's Triton mode
@pytest.mark.parametrize(
    "expr, only_gpu",
    [
        ("", False),
        ("gpu", True),
        ("gpu and not slow", True),
        ("not gpu", False),
        ("gpu or slow", False),
        ("slow", False),
        ("(gpu)", True),
        ("gpu and slow", True),
    ],
)
def test_selects_only_gpu(expr, only_gpu):
    assert conftest.selects_only_gpu(expr) is only_gpu


def test_triton_mode_decision():
    mode = conftest.triton_mode
    assert mode(False, {}, "") == (True, "needs a CUDA device")
    assert mode(False, {}, "gpu")[0] is True
    assert mode(True, {}, "gpu") == (False, None)  # scripts/gpu_suite.sh: compiled kernels
    interpret, why = mode(True, {}, "")  # `pytest tests` on a GPU machine
    assert interpret is True and "pytest tests -m gpu" in why
    assert mode(True, {}, "not slow")[0] is True
    assert mode(True, {"TRITON_INTERPRET": "0"}, "") == (False, None)
    interpret, why = mode(True, {"TRITON_INTERPRET": "1"}, "gpu")
    assert interpret is True and why.startswith("TRITON_INTERPRET=1")


_FAKE_CUDA = "import torch\ntorch.cuda.is_available = lambda: True\n"
_PROBE = textwrap.dedent(
    """
    import os
    import pytest

    def test_cpu_probe():
        assert os.environ.get("TRITON_INTERPRET") == "1"

    @pytest.mark.gpu
    def test_gpu_probe():
        assert "TRITON_INTERPRET" not in os.environ
    """
)


def _pytest_on_fake_cuda_host(tmp_path: Path, *args: str) -> subprocess.CompletedProcess:
    """pytest in a child process where torch.cuda.is_available() is True (a plugin patches
    it before tests/conftest.py is imported) and TRITON_INTERPRET is unset."""
    (tmp_path / "fake_cuda_host.py").write_text(_FAKE_CUDA)
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env["PYTHONPATH"] = os.pathsep.join([str(tmp_path), str(ROOT)])
    env["OMP_NUM_THREADS"] = "1"
    cmd = [sys.executable, "-m", "pytest", "-p", "fake_cuda_host", "-p", "no:cacheprovider"]
    return subprocess.run(
        cmd + ["-q", "-rs", *args], cwd=ROOT, env=env, capture_output=True, text=True, timeout=600
    )


def test_cpu_triton_tests_pass_on_a_cuda_host(tmp_path):
    """On a GPU machine `pytest tests` runs the CPU Triton tests in the interpreter (they
    failed there: the interpreter was only turned on without CUDA) and skips the gpu tests
    with the command that runs them."""
    pytest.importorskip("triton")
    res = _pytest_on_fake_cuda_host(
        tmp_path,
        "tests/kernels/test_triton.py",
        "-k",
        "test_deterministic_bit_identical or test_no_gradient_to_target_or_reference "
        "or test_gpu_cuda_graph_capture",
    )
    out = res.stdout + res.stderr
    assert res.returncode == 0, out[-4000:]
    assert re.search(r"\b2 passed\b", out) and re.search(r"\b2 skipped\b", out), out[-2000:]
    assert "pytest tests -m gpu" in out


def test_one_triton_mode_per_process_on_a_cuda_host(tmp_path):
    """The same probe, selected both ways: interpreted for the CPU tests (gpu ones skipped),
    compiled for `-m gpu`."""
    probe = tmp_path / "test_probe.py"
    probe.write_text(_PROBE)
    res = _pytest_on_fake_cuda_host(tmp_path, "-p", "tests.conftest", str(probe))
    assert res.returncode == 0 and "1 passed, 1 skipped" in res.stdout, res.stdout[-3000:]
    res = _pytest_on_fake_cuda_host(tmp_path, "-p", "tests.conftest", "-m", "gpu", str(probe))
    assert res.returncode == 0 and "1 passed, 1 deselected" in res.stdout, res.stdout[-3000:]


# ------------------------------------------------------------------ the GPU smoke check, on CPU
def _smoke_module():
    spec = importlib.util.spec_from_file_location("gpu_smoke", SMOKE)
    module = importlib.util.module_from_spec(spec)
    sys.modules["gpu_smoke"] = module  # dataclasses look their module up there
    spec.loader.exec_module(module)
    return module


def test_smoke_check_runs_on_the_cpu():
    """What gpu_suite.sh runs first, here on torch and the Triton interpreter (the script's
    own process, so TRITON_INTERPRET is passed explicitly)."""
    pytest.importorskip("triton")
    env = dict(os.environ, TRITON_INTERPRET="1", OMP_NUM_THREADS="1")
    res = subprocess.run(
        [sys.executable, str(SMOKE), "--device", "cpu", "--backends", "torch,triton"],
        capture_output=True,
        text=True,
        timeout=300,
        env=env,
        cwd="/",
    )
    out = res.stdout + res.stderr
    assert res.returncode == 0, out[-3000:]
    lines = [ln for ln in res.stdout.splitlines() if ln.startswith("smoke ")]
    assert len(lines) == 4 and all(" OK " in ln for ln in lines), out
    assert res.stdout.rstrip().endswith("SMOKE OK") and "β=5000.0" in res.stdout


def test_smoke_check_reports_an_unavailable_backend():
    smoke = _smoke_module()
    res = smoke.check("cuda", "fp32", torch.device("cpu"), 2, 16)
    assert res.status == "UNAVAILABLE" and "device is cpu" in res.detail


def test_smoke_check_catches_a_log_sum_exp_only_bounded_margin(monkeypatch):
    """The bias of item 1 (the two-term log-sum-exp alone near m_b = 0, in float32, at
    β = 5000) is caught by the smoke check's loss tolerance."""
    import math

    from snpo_kernels import reference

    smoke = _smoke_module()
    ok = smoke.check("torch", "fp32", torch.device("cpu"), 8, 256)
    assert ok.status == "OK", ok.detail

    def lse_only(m_b, lam):
        if lam == 1.0:
            return m_b
        u = math.log(lam) - m_b
        v = torch.full_like(m_b, math.log1p(-lam))
        return -torch.logaddexp(u, v)

    monkeypatch.setattr(reference, "bounded_margin", lse_only)
    bad = smoke.check("torch", "fp32", torch.device("cpu"), 8, 256)
    assert bad.status == "FAIL" and "loss" in bad.detail, bad.detail


def test_smoke_check_catches_a_wrong_gradient():
    smoke = _smoke_module()

    class Scaled(torch.autograd.Function):
        @staticmethod
        def forward(ctx, x):
            return x.clone()

        @staticmethod
        def backward(ctx, g):
            return 1.02 * g  # a 2 % error in every gradient coefficient

    def run(pred, target, ref, swap, weight, beta, lam):
        return sk.preference_loss(
            Scaled.apply(pred),
            target,
            ref,
            swap=swap,
            weight=weight,
            beta=beta,
            lam=lam,
            backend="torch",
        )

    res = smoke.check("torch", "bf16", torch.device("cpu"), 8, 256, run=run)
    assert res.status == "FAIL" and "gradient" in res.detail, res.detail


def test_gpu_suite_runs_the_smoke_check_first_and_the_sanitizer_on_its_own():
    text = SUITE.read_text()
    assert subprocess.run(["bash", "-n", str(SUITE)], capture_output=True).returncode == 0
    stages = re.findall(r"^\s*run_stage (\w+) \"?(?:\$\{)?(\w+)", text, re.MULTILINE)
    names = [name for name, _ in stages]
    assert names[0] == "smoke" and "scripts/gpu_smoke.py" in text.split("run_stage smoke")[1][:200]
    assert names.index("tests") < names.index("sanitizer") < names.index("bench")
    caps = dict(stages)
    assert caps["smoke"] == "SNPO_SMOKE_S" and caps["sanitizer"] == "SNPO_SANITIZER_S"
    tests_cmd = text.split("run_stage tests")[1].split("\n  rc=")[0]
    assert '-k "not compute_sanitizer"' in tests_cmd
    assert "-k compute_sanitizer" in text.split("run_stage sanitizer")[1][:300]
