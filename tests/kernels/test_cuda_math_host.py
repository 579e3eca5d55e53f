"""The CUDA finalize kernel's per-pair math, run on the CPU in float32 against a float64 truth.

csrc/pair_math.h holds the expressions ``finalize_kernel`` runs (margins, bounded margin,
softplus loss, gradient coefficients) as ``__host__ __device__`` functions, and
tests/kernels/finalize_host.cpp drives them from stdin; it is compiled by g++ and, where nvcc
is installed, by nvcc (``-x cu``: the same header with ``__CUDACC__`` defined). The device's
expf/expm1f/log1pf are not glibc's, but both are accurate to 1–2 ulp, so agreement here at
the tolerances below says the formula is right in float32; the device run itself is in
tests/kernels/test_cuda.py (GPU only).

Tolerances come from the condition number of each output (ε = float32 machine epsilon):
    |Δm̃_b| ≤ C·ε·(|m̃_b| + s_b·|m_b| + λ·|∂m̃_b/∂λ|)      (input and evaluation rounding)
    |Δz|   ≤ C·ε·(|z| + (β/2)·(|m_a| + |m̃_b| + s_b·|m_b| + λ·|∂m̃_b/∂λ|))
    |Δℓ|   ≤ σ(−z)·|Δz| + C·ε·|ℓ|
    |Δc_a| ≤ |c_a|·(σ(z)·|Δz| + C·ε),  |Δc_b| ≤ |c_b|·(σ(z)·|Δz| + (1 − s_b)·|Δ(u−v)| + C·ε)
with u − v = log λ − m_b − log(1 − λ), |Δ(u−v)| ≤ C·ε·(|log λ| + |m_b| + |log(1 − λ)|).
Near m_b = 0 every term is O(|m|): the two-term log-sum-exp alone (an absolute error
≈ ε·|log λ| ≈ 1e-8 in m̃_b at λ = 0.9, times β/2 = 2500 in z) fails by orders of magnitude.
"""

from __future__ import annotations

import math
import os
import shutil
import subprocess
from pathlib import Path

import numpy as np
import pytest

from snpo_kernels.cuda import build

ROOT = Path(__file__).resolve().parents[2]
CSRC = ROOT / "csrc"
DRIVER = Path(__file__).with_name("finalize_host.cpp")
CXX = shutil.which(os.environ.get("CXX", "g++")) or shutil.which("c++")
NVCC = build.find_nvcc(os.environ)
EPS = float(np.finfo(np.float32).eps)
C = 4.0  # a few roundings per output
COLUMNS = ("bounded", "loss", "coef_a", "coef_b", "m_a", "m_b", "mt_b", "s_b")


def _compile(kind: str, out: Path) -> Path:
    exe = out / f"finalize_host_{kind}"
    if kind == "g++":
        if CXX is None:
            pytest.skip("no C++ compiler (g++/c++) found")
        # no -ffast-math, no FMA contraction: IEEE float32 as written
        cmd = [CXX, "-std=c++17", "-O2", "-Wall", "-Wextra", "-Werror", "-ffp-contract=off"]
    else:
        if NVCC is None:
            pytest.skip("nvcc not found (CUDA toolkit absent)")
        cmd = [NVCC, "-x", "cu", "-std=c++17", "-O2"]
    cmd += ["-I", str(CSRC), str(DRIVER), "-o", str(exe)]
    res = subprocess.run(cmd, capture_output=True, text=True, timeout=300)
    assert res.returncode == 0, f"{' '.join(cmd)}\n{res.stdout}\n{res.stderr}"
    return exe


@pytest.fixture(scope="module", params=["g++", "nvcc"])
def finalize(request, tmp_path_factory):
    """A function running the compiled per-pair math on float64 arrays (rounded to float32
    on the way in, as the kernel receives them) → dict of float64 arrays."""
    exe = _compile(request.param, tmp_path_factory.mktemp("finalize_host"))

    def run(beta, lam, w, e_theta_a, e_ref_a, e_theta_b, e_ref_b, loss_type=0):
        scalars = [np.asarray(c, dtype=np.float64) for c in (beta, lam)]
        rounded = [
            np.asarray(c, dtype=np.float32).astype(np.float64)
            for c in (w, e_theta_a, e_ref_a, e_theta_b, e_ref_b)
        ]
        kind = np.asarray(loss_type, dtype=np.float64)
        cols = [c.ravel() for c in np.broadcast_arrays(*scalars, *rounded, kind)]
        lines = "\n".join(" ".join(float(v).hex() for v in row) for row in zip(*cols))
        res = subprocess.run(
            [str(exe)], input=lines + "\n", capture_output=True, text=True, timeout=120
        )
        assert res.returncode == 0, res.stderr
        rows = [line.split() for line in res.stdout.splitlines()]
        assert len(rows) == len(cols[0])
        out = {"bounded": np.array([int(r[0]) for r in rows], dtype=bool)}
        for j, name in enumerate(COLUMNS[1:], start=1):
            out[name] = np.array([float.fromhex(r[j]) for r in rows])
        out["inputs"] = cols
        return out

    return run


# ------------------------------------------------------------------ float64 truth
def _sigmoid(x):
    with np.errstate(over="ignore", invalid="ignore"):
        e = np.exp(-np.abs(x))
        return np.where(x >= 0, 1.0 / (1.0 + e), e / (1.0 + e))


def _softplus(x):
    with np.errstate(over="ignore", invalid="ignore"):
        return np.maximum(x, 0.0) + np.log1p(np.exp(-np.abs(x)))


def pair_loss_truth(neg_z, hb, loss_type):
    """(ℓ, G = −dℓ/dz, r = |dG/dz|/|G|) in float64 for loss_type 0 sigmoid, 1 hinge, 2 ipo."""
    z = -neg_z
    if loss_type == 1:
        return np.maximum(1.0 - z, 0.0), (z < 1.0).astype(np.float64), np.zeros_like(z)
    if loss_type == 2:
        d = (z - 0.5) / hb
        return d * d, -2.0 * d / hb, 1.0 / np.abs(z - 0.5)
    return _softplus(neg_z), _sigmoid(neg_z), _sigmoid(-neg_z)


def truth(beta, lam, w, e_theta_a, e_ref_a, e_theta_b, e_ref_b, loss_type=0):
    """Float64 results from the same (float32-rounded) inputs, and the tolerances of the
    module docstring (σ(−z), σ(z) there become G and r = |dG/dz|/|G| of the loss type; the
    hinge's G is exact away from the kink, within |Δz| of which it is left unchecked)."""
    f32 = [
        np.asarray(c, dtype=np.float32).astype(np.float64)
        for c in (w, e_theta_a, e_ref_a, e_theta_b, e_ref_b)
    ]
    w, eta, era, etb, erb = np.broadcast_arrays(*f32)
    beta, lam = np.broadcast_arrays(np.asarray(beta, np.float64), np.asarray(lam, np.float64))
    beta, lam = np.broadcast_to(beta, w.shape), np.broadcast_to(lam, w.shape)
    with np.errstate(all="ignore"):
        m_a = w * (eta - era)
        m_b = w * (etb - erb)
        bounded = lam < 1.0
        lam_b = np.where(bounded, lam, 0.5)  # placeholder where unbounded
        log_lam, log_rest = np.log(lam_b), np.log1p(-lam_b)
        x = lam_b * np.expm1(np.clip(-m_b, -700.0, 700.0))
        direct = -np.log1p(x)
        u = log_lam - m_b
        hi = np.maximum(u, log_rest)
        lse = -(hi + np.log1p(np.exp(-np.abs(u - log_rest))))
        mt = np.where((m_b > -700.0) & (x > -0.5), direct, lse)
        s_b = _sigmoid(u - log_rest)
        dlam = np.abs(s_b - lam_b * (1.0 - s_b) / (1.0 - lam_b))  # λ·|∂m̃_b/∂λ|
        mt = np.where(bounded, mt, m_b)
        s_b = np.where(bounded, s_b, 1.0)
        dlam = np.where(bounded, dlam, 0.0)
        duv = np.where(bounded, C * EPS * (np.abs(log_lam) + np.abs(m_b) + np.abs(log_rest)), 0.0)
        hb = 0.5 * beta
        neg_z = hb * (m_a - mt)
        loss, g_slope, r = pair_loss_truth(neg_z, hb, loss_type)
        c_a = g_slope * hb * w
        c_b = -c_a * s_b
        sm = np.where(s_b > 0, s_b * np.abs(m_b), 0.0)  # s_b·|m_b| (0 for m_b = +inf)
        tol_mt = C * EPS * (np.abs(mt) + sm + dlam)
        tol_z = C * EPS * (np.abs(neg_z) + hb * (np.abs(m_a) + np.abs(mt) + sm + dlam))
        if loss_type == 2:  # the rounding of z − ½
            tol_z = tol_z + C * EPS * np.abs(neg_z + 0.5)
        tiny = float(np.finfo(np.float32).tiny)
        kink = np.where((loss_type == 1) & (np.abs(1.0 + neg_z) <= tol_z), np.inf, 0.0)
        tol = {
            "mt_b": tol_mt + tiny,
            "loss": np.abs(g_slope) * tol_z + C * EPS * loss + tiny,
            "coef_a": np.abs(c_a) * (r * tol_z + C * EPS) + tiny + kink,
            "coef_b": np.abs(c_b) * (r * tol_z + (1.0 - s_b) * duv + C * EPS) + tiny + kink,
        }
        # 0·inf (an exact zero slope times an infinite margin) contributes no error
        tol = {k: np.nan_to_num(v, nan=tiny, posinf=np.inf) for k, v in tol.items()}
    want = {
        "bounded": bounded,
        "loss": loss,
        "coef_a": c_a,
        "coef_b": c_b,
        "m_a": m_a,
        "m_b": m_b,
        "mt_b": mt,
        "s_b": s_b,
    }
    return want, tol


def check(got, want, tol, names=("mt_b", "loss", "coef_a", "coef_b")):
    assert np.array_equal(got["bounded"], want["bounded"])
    for name in names:
        g, w_, t = got[name], want[name], tol[name]
        same_nonfinite = (~np.isfinite(w_)) & ((g == w_) | (np.isnan(g) & np.isnan(w_)))
        with np.errstate(invalid="ignore"):
            ok = same_nonfinite | (np.abs(g - w_) <= t)
        if not ok.all():
            i = int(np.flatnonzero(~ok)[0])
            inputs = [float(c[i]) for c in got["inputs"]]
            raise AssertionError(
                f"{name}: {int((~ok).sum())} of {ok.size} cases off; first: got {g[i]!r}, "
                f"want {w_[i]!r} (|Δ| {abs(g[i] - w_[i]):.3g} > tol {t[i]:.3g}); "
                f"inputs beta, lam, w, e_theta_a, e_ref_a, e_theta_b, e_ref_b = {inputs}"
            )


# ------------------------------------------------------------------ the cases
def _start_of_training(seed: int, n: int = 400):
    """Errors O(0.1–1), policy ≈ reference: margins ~1e-5..1e-4, so βm is O(1) at β = 5000."""
    rng = np.random.default_rng(seed)
    e_ref = rng.uniform(0.05, 1.5, size=(4, n)).astype(np.float32)
    rel = rng.normal(0.0, 1e-4, size=(4, n))
    e_theta = (e_ref * (1.0 + rel)).astype(np.float32)
    w = rng.uniform(0.5, 1.5, size=n)
    return w, e_theta[0], e_ref[0], e_theta[1], e_ref[1]


@pytest.mark.parametrize("lam", [0.5, 0.9, 0.99])
@pytest.mark.parametrize("beta", [5000.0, 2000.0])
def test_bounded_margin_near_zero_at_large_beta(finalize, beta, lam):
    """Where every run starts (policy = reference, m_b ≈ 0), at β = 5000: the direct form.
    The log-sum-exp alone biases the loss by 2–3e-5 relative here (up to 6e-5 per pair)."""
    args = (beta, lam, *_start_of_training(seed=int(beta) + int(1000 * lam)))
    got = finalize(*args)
    want, tol = truth(*args)
    check(got, want, tol)
    rel = np.abs(got["loss"] - want["loss"]) / want["loss"]
    assert rel.max() < 2e-6, f"max relative loss error {rel.max():.2e}"


def _broad(seed: int):
    rng = np.random.default_rng(seed)
    mags = np.concatenate([np.logspace(-8, 6, 57), [0.0, 0.69, 0.7, 79.0, 80.0, 81.0, 85.0]])
    m = np.concatenate([mags, -mags])
    scale = rng.uniform(0.5, 2.0, size=m.shape)
    e_ref_b = (scale * np.maximum(np.abs(m), 1e-3)).astype(np.float32)
    e_theta_b = (e_ref_b.astype(np.float64) + m).astype(np.float32)
    e_ref_a = rng.uniform(0.1, 1.0, size=m.shape).astype(np.float32)
    e_theta_a = (e_ref_a * (1.0 + rng.normal(0.0, 1e-3, size=m.shape))).astype(np.float32)
    w = rng.uniform(0.5, 1.5, size=m.shape)
    return w, e_theta_a, e_ref_a, e_theta_b, e_ref_b


@pytest.mark.parametrize("lam", [1e-3, 0.3, 0.5, 0.9, 0.999, 1.0 - 2.0**-20, 1.0])
@pytest.mark.parametrize("beta", [1.0, 20.0, 5000.0])
def test_every_margin_both_branches(finalize, beta, lam):
    """|m_b| from 1e-8 to 1e6, both signs, around the branch edges (x = −0.5, m_b = −80)."""
    args = (beta, lam, *_broad(seed=7 + int(beta)))
    got = finalize(*args)
    want, tol = truth(*args)
    check(got, want, tol)
    assert np.isfinite(got["loss"]).all() and np.isfinite(got["coef_b"]).all()


@pytest.mark.parametrize("lam", [1.0 - 2.0**-26, 1.0 - 2.0**-30, 1.0 - 1e-9])
def test_lambda_within_float_rounding_of_one_still_bounds(finalize, lam):
    """λ ∈ (1 − 2⁻²⁵, 1) is 1.0f, but the bound −log(1 − λ) ≈ 18–21 must still apply: at
    m_b = 100, β = 1 the loss is ≈ 1e-4 (torch), not softplus(−50) ≈ 2e-22."""
    args = (1.0, lam, 1.0, [0.0, 0.5, 0.0], [0.0, 0.5, 0.0], [100.0, 1e6, 0.3], [0.0, 0.0, 0.3])
    got = finalize(*args)
    want, tol = truth(*args)
    assert got["bounded"].all()
    check(got, want, tol)
    assert got["loss"][0] > 1e-5 and got["mt_b"][0] < 25.0


def test_non_finite_margins(finalize):
    """NaN stays NaN (a guard must see it); ±inf follows the formula's limits."""
    inf, nan = math.inf, math.nan
    args = (20.0, 0.9, 1.0, [0.1, 0.1, 0.1, nan], [0.1] * 4, [nan, inf, -inf, 0.2], [0.0] * 4)
    got = finalize(*args)
    want, tol = truth(*args)
    assert np.isnan(got["loss"][0]) and np.isnan(got["coef_b"][0])
    assert got["mt_b"][1] == pytest.approx(-math.log1p(-0.9), rel=4 * EPS)
    assert np.isfinite(got["loss"][1]) and got["coef_b"][1] == 0.0
    assert got["mt_b"][2] == -inf and got["loss"][2] == inf
    assert np.isnan(got["loss"][3])
    assert abs(got["loss"][1] - want["loss"][1]) <= tol["loss"][1]


def test_kernel_and_launcher_use_the_shared_math():
    """The kernel calls pair_math.h (nothing of its own), and β, λ reach the launcher in
    double (the bound is decided there, by loss_scalars)."""
    cu = (CSRC / "preference_loss_kernels.cu").read_text()
    binding = (CSRC / "binding.cpp").read_text()
    header = (CSRC / "preference_loss.h").read_text()
    assert '#include "pair_math.h"' in cu and "math::pair_terms(" in cu
    assert "math::loss_scalars(p.beta, p.lam)" in cu
    assert "double lam;" in header and "double beta;" in header
    assert "static_cast<float>(lam)" not in binding and "static_cast<float>(beta)" not in binding


# ------------------------------------------------------------------ loss types (hinge, ipo)
LOSS_TYPE_CODES = {"sigmoid": 0, "hinge": 1, "ipo": 2}


@pytest.mark.parametrize("loss_type", ["sigmoid", "hinge", "ipo"])
@pytest.mark.parametrize("lam", [0.5, 0.9, 1.0])
@pytest.mark.parametrize("beta", [1.0, 20.0, 5000.0])
def test_loss_types_against_float64(finalize, beta, lam, loss_type):
    """pair_math.h's pair loss and G = −dℓ/dz for each diffusers --loss_type, at the start of
    training (z = O(1) at β = 5000) and over every margin, against the float64 formulas."""
    code = LOSS_TYPE_CODES[loss_type]
    for inputs in (_start_of_training(seed=11 + int(beta)), _broad(seed=13 + int(beta))):
        args = (beta, lam, *inputs)
        got = finalize(*args, loss_type=code)
        want, tol = truth(*args, loss_type=code)
        check(got, want, tol)


def test_loss_types_differ_where_they_should(finalize):
    """The hinge is flat beyond z = 1 (ℓ = 0, no gradient), the ipo loss is 0 at z = ½ with
    a gradient of the sign that pulls z back to ½ (c_a < 0 for z > ½): a kernel that ignored
    loss_type (sigmoid everywhere) fails each of these."""
    # β = 2, w = 1, λ = 1: z = −(m_a − m_b) = e_ref_a − e_θ_a (m_b = 0); z = 2, 0.5, −1
    args = (2.0, 1.0, 1.0, [0.0, 0.5, 2.0], [2.0, 1.0, 1.0], [0.3, 0.3, 0.3], [0.3, 0.3, 0.3])
    hinge = finalize(*args, loss_type=1)
    assert hinge["loss"][0] == 0.0 and hinge["coef_a"][0] == 0.0
    assert hinge["loss"][2] == pytest.approx(2.0) and hinge["coef_a"][2] == pytest.approx(1.0)
    ipo = finalize(*args, loss_type=2)
    assert ipo["loss"][1] == 0.0 and ipo["coef_a"][1] == 0.0
    assert ipo["loss"][0] == pytest.approx(2.25) and ipo["coef_a"][0] == pytest.approx(-3.0)
