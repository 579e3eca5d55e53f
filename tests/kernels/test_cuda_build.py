"""The CUDA extension's build logic and the dispatch without it (CPU-only tests)."""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import snpo_kernels as sk
from snpo_kernels.cuda import backend, build, ops
from snpo_kernels.cuda.build import Arch, CudaBuildError, decide_cuda_build, parse_arch_list

ROOT = Path(__file__).resolve().parents[2]
NVCC = "/opt/cuda/bin/nvcc"


# ------------------------------------------------------------------ the build decision
@pytest.mark.parametrize("value", ["0", "false", "off", "skip", " 0 "])
def test_skip_switch_never_builds(value):
    ok, why = decide_cuda_build({"SNPO_BUILD_CUDA": value}, NVCC, "12.4")
    assert not ok and "SNPO_BUILD_CUDA=0" in why


@pytest.mark.parametrize("value", [None, "", "auto", "AUTO"])
def test_auto_builds_when_toolkit_and_cuda_torch_are_there(value):
    env = {} if value is None else {"SNPO_BUILD_CUDA": value}
    ok, why = decide_cuda_build(env, NVCC, "12.4")
    assert ok and NVCC in why and "12.4" in why


def test_force_builds_when_possible():
    assert decide_cuda_build({"SNPO_BUILD_CUDA": "1"}, NVCC, "13.0")[0]


@pytest.mark.parametrize(
    "nvcc, cuda, torch_error, match",
    [
        (None, "12.4", None, "no CUDA toolkit found"),
        (NVCC, None, None, "CPU build"),
        (None, None, None, "CPU build.*no CUDA toolkit"),
        (NVCC, None, "ModuleNotFoundError: No module named 'torch'", "--no-build-isolation"),
    ],
)
def test_force_without_toolkit_is_a_clear_error(nvcc, cuda, torch_error, match):
    with pytest.raises(CudaBuildError, match=f"SNPO_BUILD_CUDA=1 but.*{match}"):
        decide_cuda_build({"SNPO_BUILD_CUDA": "1"}, nvcc, cuda, torch_error)


@pytest.mark.parametrize(
    "nvcc, cuda, torch_error, match",
    [
        (None, "12.4", None, "no CUDA toolkit found"),
        (NVCC, None, None, "CPU build"),
        (NVCC, None, "ModuleNotFoundError: No module named 'torch'", "build isolation"),
    ],
)
def test_auto_without_toolkit_is_a_plain_install_with_reason(nvcc, cuda, torch_error, match):
    ok, why = decide_cuda_build({}, nvcc, cuda, torch_error)
    assert not ok
    assert "plain Python install" in why
    assert match in why


def test_bad_switch_value_is_an_error():
    with pytest.raises(CudaBuildError, match="not one of 0, 1 or auto"):
        build.build_mode({"SNPO_BUILD_CUDA": "maybe"})


def test_find_nvcc_prefers_cuda_home_and_never_runs_it(tmp_path):
    nvcc = tmp_path / "bin" / "nvcc"
    nvcc.parent.mkdir()
    nvcc.write_text("#!/bin/sh\nexit 1\n")  # would fail if run
    assert build.find_nvcc({"CUDA_HOME": str(tmp_path)}, which=lambda _: None) == str(nvcc)
    assert build.find_nvcc({"CUDA_HOME": str(tmp_path / "none")}, which=lambda _: "/x") is None
    assert build.find_nvcc({}, which=lambda _: "/usr/bin/nvcc") == "/usr/bin/nvcc"


def test_max_jobs():
    assert build.max_jobs({}) is None
    assert build.max_jobs({"MAX_JOBS": "4"}) == 4
    for bad in ("0", "-2", "four"):
        with pytest.raises(CudaBuildError, match="MAX_JOBS"):
            build.max_jobs({"MAX_JOBS": bad})
    flags = build.nvcc_flags(parse_arch_list("8.0;9.0a;9.0+PTX"), {"MAX_JOBS": "2"})
    assert "--threads=2" in flags
    assert "--threads=1" in build.nvcc_flags(parse_arch_list("8.0;9.0"), {"MAX_JOBS": "1"})


# ------------------------------------------------------------------ architecture lists
@pytest.mark.parametrize(
    "text, want",
    [
        ("8.0;9.0", [Arch(8, 0), Arch(9, 0)]),
        ("8.0 9.0+PTX", [Arch(8, 0), Arch(9, 0, ptx=True)]),
        ("sm_80,sm_90a", [Arch(8, 0), Arch(9, 0, "a")]),
        ("80;90a;100a", [Arch(8, 0), Arch(9, 0, "a"), Arch(10, 0, "a")]),
        ("9.0a", [Arch(9, 0, "a")]),
        ("8.6+ptx", [Arch(8, 6, ptx=True)]),
        ("8.0;8.0; 9.0", [Arch(8, 0), Arch(9, 0)]),
        ("Hopper", [Arch(9, 0, ptx=True)]),
        ("Ampere;9.0a", [Arch(8, 0), Arch(8, 6, ptx=True), Arch(9, 0, "a")]),
    ],
)
def test_arch_list_parsing(text, want):
    assert parse_arch_list(text) == want


@pytest.mark.parametrize("text", ["", "foo", "9.x", "sm_9", "native", "6.1"])
def test_arch_list_errors_name_the_token(text):
    with pytest.raises(CudaBuildError, match="SNPO_CUDA_ARCHS"):
        parse_arch_list(text)


def test_arch_list_source_order_and_default():
    assert build.select_arch_list({}) == (build.DEFAULT_ARCHS, "default")
    assert build.select_arch_list({"TORCH_CUDA_ARCH_LIST": "8.6"}) == (
        "8.6",
        "TORCH_CUDA_ARCH_LIST",
    )
    both = {"TORCH_CUDA_ARCH_LIST": "8.6", "SNPO_CUDA_ARCHS": "9.0a"}
    assert build.select_arch_list(both) == ("9.0a", "SNPO_CUDA_ARCHS")
    default = parse_arch_list(build.DEFAULT_ARCHS)
    assert Arch(8, 0) in default and any(a.major == 9 for a in default)  # sm_80 and sm_90


def test_gencode_flags():
    flags = build.gencode_flags(parse_arch_list("8.0;9.0a;9.0+PTX"))
    assert flags == [
        "-gencode=arch=compute_80,code=sm_80",
        "-gencode=arch=compute_90a,code=sm_90a",
        "-gencode=arch=compute_90,code=sm_90",
        "-gencode=arch=compute_90,code=compute_90",
    ]


def test_covers():
    default = parse_arch_list(build.DEFAULT_ARCHS)
    assert build.covers(default, (8, 0)) and build.covers(default, (8, 6))
    assert build.covers(default, (9, 0)) and build.covers(default, (10, 0))  # via PTX
    assert not build.covers(default, (7, 5))
    assert not build.covers(parse_arch_list("9.0a"), (10, 0))
    assert build.covers(parse_arch_list("9.0a"), (9, 0))


@pytest.mark.parametrize("text", ["8.0;9.0+PTX", "8.0;9.0a", "9.0a+PTX;10.0", "8.6"])
def test_arch_token_round_trip(text):
    archs = parse_arch_list(text)
    token = build.arch_token(archs)
    assert re.fullmatch(r"\w+", token)  # one identifier: safe in shell, ninja and -D
    assert build.parse_arch_token(token) == archs
    assert f"-DSNPO_CUDA_ARCHS={token}" in build.cxx_flags(archs)
    assert build.parse_arch_token("") == []


def test_arch_mismatch_is_an_availability_reason(monkeypatch):
    class Module:
        archs = build.arch_token(parse_arch_list("8.0;9.0"))

    monkeypatch.setitem(ops._state, "module", Module)
    monkeypatch.setattr(ops, "_arch_verdicts", {})
    caps = {0: (7, 5), 1: (8, 6), 2: (9, 0)}
    monkeypatch.setattr(ops.torch.cuda, "get_device_capability", caps.__getitem__)
    why = backend.availability(torch.device("cuda", 0), torch.float32)
    assert "compiled for 8.0, 9.0 but cuda:0 has compute capability 7.5" in why
    assert "SNPO_CUDA_ARCHS=7.5" in why
    assert backend.availability(torch.device("cuda", 1), torch.float32) is None
    assert backend.availability(torch.device("cuda", 2), torch.float32) is None
    assert len(ops._arch_verdicts) == 3  # decided once per device
    assert "7.5" in backend.availability(torch.device("cuda", 0), torch.bfloat16)


def test_jit_arch_list():
    assert build.jit_arch_list({}, [(9, 0), (9, 0)]) == [Arch(9, 0)]
    assert build.jit_arch_list({"SNPO_CUDA_ARCHS": "8.0"}, [(9, 0)]) == [Arch(8, 0)]
    assert build.jit_arch_list({"TORCH_CUDA_ARCH_LIST": "native"}, [(8, 6)]) == [Arch(8, 6)]
    with pytest.raises(CudaBuildError, match="visible CUDA device"):
        build.jit_arch_list({}, [])


def test_jit_unavailable_reasons():
    assert "SNPO_CUDA_JIT=0" in build.jit_unavailable_reason({"SNPO_CUDA_JIT": "0"}, "12.4", NVCC)
    assert "CPU build" in build.jit_unavailable_reason({}, None, NVCC)
    assert "nvcc not found" in build.jit_unavailable_reason({}, "12.4", None)
    assert build.csrc_dir({}) == ROOT / "csrc"  # the checkout's sources are found
    assert build.jit_unavailable_reason({}, "12.4", NVCC) is None


# ------------------------------------------------------------------ setup.py itself
def _setup_py(value: str | None, *args: str) -> subprocess.CompletedProcess:
    env = {k: v for k, v in os.environ.items() if k != "SNPO_BUILD_CUDA"}
    if value is not None:
        env["SNPO_BUILD_CUDA"] = value
    return subprocess.run(
        [sys.executable, "setup.py", *args],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
    )


def test_setup_kwargs_skip_switch_adds_no_extension():
    logs = []
    assert build.setup_kwargs(ROOT, {"SNPO_BUILD_CUDA": "0"}, logs.append) == {}
    assert "SNPO_BUILD_CUDA=0" in logs[0]


@pytest.mark.skipif(torch.version.cuda is not None, reason="checks the CPU-torch path")
def test_setup_kwargs_auto_on_cpu_torch_is_plain_with_reason():
    logs = []
    assert build.setup_kwargs(ROOT, {}, logs.append) == {}
    assert "CPU build" in logs[0]


@pytest.mark.skipif(torch.version.cuda is not None, reason="checks the CPU-torch path")
def test_setup_py_auto_is_plain_and_force_fails_clearly():
    res = _setup_py(None, "--version")
    assert res.returncode == 0, res.stderr
    assert res.stdout.strip().endswith("0.1.0") or "0.1.0" in res.stdout
    assert "the CUDA extension is not built" in res.stderr
    res = _setup_py("1", "--version")
    assert res.returncode != 0
    assert "SNPO_BUILD_CUDA=1 but the CUDA extension cannot be built" in res.stderr
    assert "Traceback" not in res.stderr
    res = _setup_py("0", "--version")
    assert res.returncode == 0 and "SNPO_BUILD_CUDA=0" in res.stderr


# ------------------------------------------------------------------ dispatch without the extension
@pytest.fixture
def no_extension(monkeypatch):
    """As on a machine where the extension is neither installed nor JIT-buildable."""
    monkeypatch.setitem(ops._state, "module", None)
    monkeypatch.setitem(ops._state, "error", None)
    monkeypatch.setenv("SNPO_CUDA_JIT", "0")
    real_import = ops.importlib.import_module

    def fake_import(name, *a, **k):
        if name == build.EXTENSION_NAME:
            raise ModuleNotFoundError(f"No module named {name!r}")
        return real_import(name, *a, **k)

    monkeypatch.setattr(ops.importlib, "import_module", fake_import)


def test_availability_reasons_without_touching_cuda(no_extension):
    assert backend.availability(torch.device("cpu"), torch.float32) == "device is cpu"
    cuda = torch.device("cuda", 0)
    assert backend.availability(cuda, torch.float64) == (
        "float64 is not supported, use backend='torch'"
    )
    why = backend.availability(cuda, torch.bfloat16)
    assert why.startswith(ops.NOT_BUILT) and "SNPO_CUDA_JIT=0" in why
    assert ops._state["error"] == why  # remembered: later calls do not retry


def test_named_cuda_backend_is_refused_with_the_reason(no_extension):
    with pytest.raises(sk.BackendUnavailableError, match="the snpo CUDA extension is not built"):
        sk.resolve_backend("cuda", torch.device("cuda", 0), torch.float32)
    with pytest.raises(ops.ExtensionUnavailableError, match="not built"):
        ops.require()
    x = torch.zeros(4, 3)
    with pytest.raises(sk.BackendUnavailableError, match="device is cpu"):
        sk.preference_loss(x, x, x, beta=1.0, backend="cuda")


def test_auto_still_works_without_the_extension(no_extension):
    name = sk.resolve_backend("auto", torch.device("cuda", 0), torch.float32)
    assert name in ("triton", "torch")
    pred = torch.randn(4, 3, generator=torch.Generator().manual_seed(0), requires_grad=True)
    loss = sk.preference_loss(pred, torch.zeros(4, 3), torch.ones(4, 3), beta=2.0)
    loss.backward()
    assert torch.isfinite(loss) and pred.grad is not None


def test_jit_failure_message_is_clear(no_extension, monkeypatch):
    monkeypatch.setenv("SNPO_CUDA_JIT", "1")
    monkeypatch.setattr(ops.torch.version, "cuda", "12.4")
    monkeypatch.setattr(build, "find_nvcc", lambda env: NVCC)

    def boom(**kw):
        raise RuntimeError("Error building extension 'snpo_cuda_jit'")

    monkeypatch.setattr(build, "jit_build", boom)
    why = ops.extension_error()
    assert why.startswith(ops.NOT_BUILT)
    assert "the JIT build failed with RuntimeError: Error building extension" in why
    assert "SNPO_CUDA_JIT_VERBOSE=1" in why


def test_float64_inputs_use_the_reference_path():
    """run() hands float64 companions to the reference (float64 accumulation), no kernel."""
    from snpo_kernels.validation import validate_inputs

    g = torch.Generator().manual_seed(0)
    pred = torch.randn(4, 5, generator=g)
    target = torch.randn(4, 5, generator=g, dtype=torch.float64)
    x = validate_inputs(pred, target, target + 1, None, None, None, 3.0, 0.9, "mean")
    loss, e_t, _ = backend.run(x)
    assert loss.dtype == torch.float64 and e_t.shape == (4,)


def test_importing_the_backend_does_not_initialise_cuda():
    code = (
        "import torch, snpo_kernels.cuda.backend, snpo_kernels.cuda.ops;"
        "import sys; sys.exit(1 if torch.cuda.is_initialized() else 0)"
    )
    res = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=ROOT)
    assert res.returncode == 0, res.stderr


# ------------------------------------------------------------------ torch.compile, CUDA metadata
def _trace(fn, *args):
    """fn compiled with fullgraph=True (graph captured, run eagerly by the graph module)."""
    torch._dynamo.reset()
    graphs = []

    def capture(gm, example_inputs):
        graphs.append(gm)
        return gm.forward

    out = torch.compile(fn, fullgraph=True, backend=capture)(*args)
    torch._dynamo.reset()
    return out, graphs


@pytest.mark.parametrize("tried_before", [False, True])
def test_auto_resolves_under_fullgraph_tracing_with_cuda_metadata(no_extension, tried_before):
    """Backend "auto" for a CUDA device inside torch.compile(fullgraph=True), in a fresh
    process (nothing tried yet) and after a failed load: the availability check must not
    trace into its lock (Dynamo: "Unsupported context manager")."""
    if tried_before:
        assert ops.extension_error() is not None

    def f(x):
        name = sk.resolve_backend("auto", torch.device("cuda", 0), x.dtype)
        return x + (1.0 if name == "torch" else 2.0 if name == "triton" else 3.0)

    x = torch.zeros(3)
    out, graphs = _trace(f, x)
    assert len(graphs) == 1
    torch.testing.assert_close(out, f(x))  # the same answer as eagerly
    assert "SNPO_CUDA_JIT=0" in ops._state["error"]  # resolved once, eagerly, and remembered


def test_public_api_traces_with_fake_cuda_tensors(no_extension):
    """The review's case: validation and dispatch ("auto") of FakeTensor inputs on device
    cuda, traced on a CPU machine with fullgraph=True."""
    from torch._subclasses.fake_tensor import FakeTensorMode

    from snpo_kernels.dispatch import select_backend
    from snpo_kernels.validation import validate_inputs

    picked = []

    def f(p, t, r):
        x = validate_inputs(p, t, r, None, None, None, 5000.0, 0.9, "mean")
        name = select_backend("auto", x)
        picked.append(name)
        return p * (1.0 if name == "torch" else 2.0)

    with FakeTensorMode():
        p = torch.empty(4, 3, device="cuda")
        t = torch.empty(4, 3, device="cuda")
    out, graphs = _trace(f, p, t, t)
    assert len(graphs) == 1 and out.device.type == "cuda"
    assert picked[-1] in ("triton", "torch")


def test_arch_check_under_tracing_is_resolved_eagerly(monkeypatch):
    """With the extension loaded, the arch check (torch.cuda queries, a dict cache) runs
    eagerly under tracing too, and gives the same verdict."""

    class Module:
        archs = build.arch_token(parse_arch_list("8.0;9.0"))

    monkeypatch.setitem(ops._state, "module", Module)
    monkeypatch.setattr(ops, "_arch_verdicts", {})
    caps = {0: (7, 5), 1: (9, 0)}
    monkeypatch.setattr(ops.torch.cuda, "get_device_capability", caps.__getitem__)

    def f(x):
        bad = backend.availability(torch.device("cuda", 0), torch.float32)
        good = backend.availability(torch.device("cuda", 1), torch.float32)
        return x + (1.0 if bad is not None and "7.5" in bad else 0.0) + (good is None)

    x = torch.zeros(2)
    out, graphs = _trace(f, x)
    assert len(graphs) == 1
    torch.testing.assert_close(out, torch.full((2,), 2.0))


# ------------------------------------------------------------------ archs the nvcc supports
SUPPORTED_13 = frozenset({(7, 5), (8, 0), (8, 6), (8, 7), (8, 9), (9, 0), (10, 0), (12, 0)})


def test_jit_build_uses_the_visible_gpu_not_torch_cuda_arch_list():
    """Images set TORCH_CUDA_ARCH_LIST for their own torch build (often with 7.0, which
    nvcc 13 rejects): the JIT build compiles for the GPU it runs on instead."""
    env = {"TORCH_CUDA_ARCH_LIST": "7.0;7.5;8.0;8.6;9.0+PTX"}
    assert build.jit_arch_list(env, [(9, 0)]) == [Arch(9, 0)]
    assert build.jit_arch_list(env, [(9, 0)], SUPPORTED_13) == [Arch(9, 0)]
    both = {**env, "SNPO_CUDA_ARCHS": "9.0a"}
    assert build.jit_arch_list(both, [(9, 0)], SUPPORTED_13) == [Arch(9, 0, "a")]


def test_unsupported_archs_are_dropped_with_one_warning_line():
    logs: list[str] = []
    env = {"SNPO_CUDA_ARCHS": "7.0;8.0;9.0a;9.0+PTX"}
    got = build.jit_arch_list(env, [(9, 0)], SUPPORTED_13, logs.append)
    assert got == [Arch(8, 0), Arch(9, 0, "a"), Arch(9, 0, ptx=True)]
    assert len(logs) == 1 and "7.0" in logs[0] and "SNPO_CUDA_ARCHS" in logs[0]
    assert "WARNING" in logs[0] and "\n" not in logs[0]
    # ahead-of-time builds (setup.py) filter the same way, TORCH_CUDA_ARCH_LIST included
    logs.clear()
    text, source = build.select_arch_list({"TORCH_CUDA_ARCH_LIST": "7.0;8.0"})
    got = build.supported_arch_list(
        parse_arch_list(text, source), SUPPORTED_13, source, logs.append
    )
    assert got == [Arch(8, 0)] and "TORCH_CUDA_ARCH_LIST" in logs[0]
    # nothing is filtered when the nvcc cannot say
    assert build.supported_arch_list([Arch(7, 0)], None, "x") == [Arch(7, 0)]


def test_a_gpu_newer_than_the_nvcc_gets_ptx_and_nothing_left_is_an_error():
    logs: list[str] = []
    old_nvcc = frozenset({(7, 5), (8, 0), (8, 6), (9, 0)})
    assert build.jit_arch_list({}, [(12, 0)], old_nvcc, logs.append) == [Arch(9, 0, ptx=True)]
    assert len(logs) == 1 and "12.0" in logs[0]
    with pytest.raises(CudaBuildError, match="none of the CUDA architectures 7.0"):
        build.jit_arch_list({"SNPO_CUDA_ARCHS": "7.0"}, [(9, 0)], old_nvcc)


def test_nvcc_supported_archs_parses_list_gpu_arch():
    out = "compute_75\ncompute_80\ncompute_90\ncompute_90a\ncompute_100f\n"

    def run(cmd, **kw):
        assert cmd[1:] == ["--list-gpu-arch"]
        return subprocess.CompletedProcess(cmd, 0, out, "")

    assert build.nvcc_supported_archs("/x/nvcc", run) == {(7, 5), (8, 0), (9, 0), (10, 0)}
    assert build.nvcc_supported_archs(None, run) is None

    def old(cmd, **kw):  # an nvcc without --list-gpu-arch
        return subprocess.CompletedProcess(cmd, 1, "", "nvcc fatal: Unknown option")

    assert build.nvcc_supported_archs("/x/nvcc", old) is None


_LOCAL_NVCC = build.find_nvcc(os.environ)


@pytest.mark.skipif(_LOCAL_NVCC is None, reason="nvcc not found (CUDA toolkit absent)")
def test_installed_nvcc_compiles_what_the_jit_build_asks_for(tmp_path):
    """With the installed nvcc (13.x here: no sm_70) and TORCH_CUDA_ARCH_LIST=7.0;8.0 set, the
    JIT build's arch flags compile; the list as given would not."""
    supported = build.nvcc_supported_archs(_LOCAL_NVCC)
    assert supported is not None and (8, 0) in supported
    env = {"TORCH_CUDA_ARCH_LIST": "7.0;8.0", "SNPO_CUDA_ARCHS": "7.0;8.0"}
    cu = tmp_path / "k.cu"
    cu.write_text("__global__ void k(float* x) { x[threadIdx.x] += 1.0f; }\n")

    def nvcc(archs):
        flags = build.gencode_flags(archs)
        cmd = [_LOCAL_NVCC, "-c", *flags, str(cu), "-o", str(tmp_path / "k.o")]
        return subprocess.run(cmd, capture_output=True, text=True, timeout=300)

    archs = build.jit_arch_list(env, [(8, 0)], supported, lambda msg: None)
    res = nvcc(archs)
    assert res.returncode == 0, res.stderr
    if (7, 0) not in supported:
        assert archs == [Arch(8, 0)]
        res = nvcc(parse_arch_list("7.0;8.0"))
        assert res.returncode != 0 and "compute_70" in res.stderr + res.stdout


# ------------------------------------------------------------------ torch >= 2.11 for the binding
def test_torch_older_than_2_11_is_refused_with_the_reason():
    assert build.torch_version_problem("2.13.0+cpu") is None
    assert build.torch_version_problem("2.11.0") is None
    assert build.torch_version_problem(None) is None
    why = build.torch_version_problem("2.10.1+cu128")
    assert "torch >= 2.11" in why and "native_handle" in why and "2.10.1+cu128" in why
    assert "torch >= 2.11" in build.jit_unavailable_reason({}, "12.8", NVCC, "2.9.0")
    assert build.jit_unavailable_reason({}, "12.8", NVCC, "2.11.0") is None
    with pytest.raises(CudaBuildError, match="torch >= 2.11"):
        decide_cuda_build({"SNPO_BUILD_CUDA": "1"}, NVCC, "12.8", None, "2.10.0")
    ok, why = decide_cuda_build({}, NVCC, "12.8", None, "2.10.0")
    assert not ok and "torch >= 2.11" in why
    assert "TORCH_VERSION_MINOR) < 211" in (ROOT / "csrc" / "binding.cpp").read_text()


def test_the_constant_marker_is_the_one_torch_sets():
    """ops marks its resolvers as torch.compiler.assume_constant_result does, without
    importing torch._dynamo at import time."""

    def probe():
        return None

    marked = torch.compiler.assume_constant_result(probe)
    assert vars(marked) == {"_dynamo_marked_constant": True}
    assert vars(ops._resolve_extension) == vars(marked) == vars(ops._arch_verdict)
