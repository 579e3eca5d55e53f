"""Smoke check of the loss backends: are the kernels right? (the first stage of gpu_suite.sh)

For each backend (torch, triton, cuda) and dtype (bf16, fp32): make the backend available
(the CUDA extension JIT-builds here on first use), run one forward and backward of
``snpo_kernels.preference_loss`` at β = 5000, λ = 0.9 with swapped and weighted pairs, and
compare the loss and the gradient with the float64 reference on the same (already rounded)
inputs. One line per case, then ``SMOKE OK`` or ``SMOKE FAIL``:

    python scripts/gpu_smoke.py                    # CUDA device: torch, triton, cuda
    TRITON_INTERPRET=1 python scripts/gpu_smoke.py --device cpu --backends torch,triton

Exit status: 0 every case passed; 1 a case disagreed or raised; 2 none failed but a
requested backend was unavailable here (the reason is printed).

Inputs (seeded): errors e ≈ 1e-4 with per-sample scales so that the margins m ≈ ±1e-4 are
comparable to the errors and z = −(β/2)(m_a − m̃_b) is O(1); m_b ≈ 0 is where the bounded
margin needs its direct form (a log-sum-exp there is off by ≈ 3e-5 in z at β = 5000).

Tolerances from the condition number (ε = float32 epsilon, d = 2·log2(N) the depth of a
float32 sum of N terms, C = 4), per pair k with a = preferred, b = rejected:
    Δz_k ≤ (β/2)·(d·ε·w_k·Σ_{i∈k}(e_θ,i + e_ref,i) + C·ε·(|m_a| + |m̃_b| + |m_b| + λ|∂m̃_b/∂λ|))
           + C·ε·|z_k|
    Δℓ ≤ mean_k σ(−z_k)·Δz_k + C·ε·ℓ
    Δg ≤ (ε_out + C·ε + σ(z_k)·Δz_k + [row b] (1 − s_b)·C·ε·(|log λ| + |m_b| + |log(1−λ)|))·|g|
         + tiny(dtype)
with ε_out one ulp of the output dtype (2⁻⁷ for bf16: Triton's interpreter truncates where
the GPU rounds to nearest). Loose for any correct kernel; the loss bound is about 10× tighter
than the bias of a log-sum-exp-only bounded margin.
"""

from __future__ import annotations

import argparse
import math
import os
import sys
import time
from dataclasses import dataclass
from pathlib import Path

if __package__ in (None, ""):  # run as a script from anywhere: the checkout first on the path
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch  # noqa: E402

BETA, LAM = 5000.0, 0.9
SEED = 20260501
EPS32 = torch.finfo(torch.float32).eps
C = 4.0
DTYPES = {"bf16": torch.bfloat16, "fp32": torch.float32, "fp16": torch.float16}


@dataclass
class Result:
    backend: str
    dtype: str
    status: str  # "OK", "FAIL", "UNAVAILABLE"
    detail: str
    seconds: float

    def line(self) -> str:
        return (
            f"smoke {self.backend:6s} {self.dtype:4s} {self.status:11s} {self.detail} "
            f"({self.seconds:.1f}s)"
        )


def make_inputs(device: torch.device, dtype: torch.dtype, pairs: int, n: int, seed: int = SEED):
    """(pred, target, ref, swap, weight, grad_output), pred/target/ref in ``dtype``."""
    g = torch.Generator().manual_seed(seed)
    rows = 2 * pairs
    f64 = torch.float64
    target = torch.randn(rows, n, generator=g, dtype=f64)
    ref = target + 0.01 * torch.randn(rows, n, generator=g, dtype=f64)  # e_ref ≈ 1e-4
    scale = 0.5 + torch.rand(rows, 1, generator=g, dtype=f64)  # e_θ ≈ scale²·1e-4
    pred = target + 0.01 * scale * torch.randn(rows, n, generator=g, dtype=f64)
    swap = torch.rand(pairs, generator=g) < 0.5
    weight = 0.5 + torch.rand(pairs, generator=g)
    go = 0.5 + torch.rand((), generator=g)

    def cast(t):
        return t.to(device=device, dtype=dtype)

    return cast(pred), cast(target), cast(ref), swap.to(device), weight.to(device), go.to(device)


def default_run(backend: str):
    import snpo_kernels as sk

    def run(pred, target, ref, swap, weight, beta, lam):
        return sk.preference_loss(
            pred, target, ref, swap=swap, weight=weight, beta=beta, lam=lam, backend=backend
        )

    return run


def _truth(pred, target, ref, swap, weight, go, beta, lam):
    """float64 loss, gradient and the per-pair quantities of the tolerance."""
    from snpo_kernels.reference import bounded_margin, bounded_margin_slope, pair_logits

    f64 = torch.float64
    p64 = pred.detach().to(f64).cpu().requires_grad_(True)
    t64, r64 = target.to(f64).cpu(), ref.to(f64).cpu()
    sw, w = swap.cpu(), weight.to(f64).cpu()
    e_th = (p64 - t64).pow(2).mean(dim=1)
    e_rf = (r64 - t64).pow(2).mean(dim=1)
    z, m_a, m_b = pair_logits(e_th, e_rf, sw, w, beta, lam)
    loss = torch.nn.functional.softplus(-z).mean()
    (grad,) = torch.autograd.grad(loss * go.to(f64).cpu(), p64)
    with torch.no_grad():
        z, m_a, m_b = z.detach(), m_a.detach(), m_b.detach()
        mt = bounded_margin(m_b, lam)
        s_b = bounded_margin_slope(m_b, lam)
        lam_term = (s_b - lam * (1 - s_b) / (1 - lam)).abs() if lam < 1 else torch.zeros_like(m_b)
        mag = e_th.detach().abs() + e_rf.abs()
        p = mag.shape[0] // 2
        mag_pair = w * (mag[:p] + mag[p:])
    return loss.detach(), grad, z, m_a, m_b, mt, s_b, lam_term, mag_pair


def compare(pred, target, ref, swap, weight, go, loss, grad, beta=BETA, lam=LAM):
    """(ok, detail): whether (loss, grad) agree with the float64 reference within the module
    docstring's tolerance, and the numbers (or what disagrees)."""
    want_l, want_g, z, m_a, m_b, mt, s_b, lam_term, mag_pair = _truth(
        pred, target, ref, swap, weight, go, beta, lam
    )
    n = pred.shape[1]
    depth = 2.0 * math.log2(max(n, 2))
    hb = 0.5 * beta
    dz = hb * (depth * EPS32 * mag_pair + C * EPS32 * (m_a.abs() + mt.abs() + m_b.abs() + lam_term))
    dz = dz + C * EPS32 * z.abs()
    bound_l = (torch.sigmoid(-z) * dz).mean() + C * EPS32 * want_l.abs()
    loss64 = loss.detach().to(torch.float64).cpu()
    if not torch.isfinite(loss64).all() or not torch.isfinite(grad).all():
        return False, f"non-finite loss {loss64.item()} or gradient"
    err_l = (loss64 - want_l).abs().item()
    if err_l > bound_l.item():
        return False, (
            f"loss {loss64.item():.9g} vs float64 {want_l.item():.9g}: "
            f"|Δ| {err_l:.2e} > {bound_l.item():.2e}"
        )
    eps_out = torch.finfo(grad.dtype).eps  # one ulp: Triton's interpreter truncates to bf16
    p = z.shape[0]
    rel_k = eps_out + C * EPS32 + torch.sigmoid(z) * dz
    if lam < 1:  # rounding of u − v = log λ − m_b − log(1 − λ), through s_b = σ(u − v)
        rel_b = rel_k + (1 - s_b) * C * EPS32 * (-math.log(lam) + m_b.abs() - math.log1p(-lam))
    else:
        rel_b = rel_k
    rows_a = torch.where(swap.cpu(), torch.arange(p) + p, torch.arange(p))
    rows_b = torch.where(swap.cpu(), torch.arange(p), torch.arange(p) + p)
    rel = torch.empty(2 * p, dtype=torch.float64)
    rel[rows_a] = rel_k
    rel[rows_b] = rel_b
    g64 = grad.detach().to(torch.float64).cpu()
    bound_g = rel[:, None] * want_g.abs() + torch.finfo(grad.dtype).tiny
    bad = (g64 - want_g).abs() > bound_g
    if bool(bad.any()):
        worst = ((g64 - want_g).abs() / bound_g).max().item()
        return False, (
            f"gradient off at {int(bad.sum())} of {bad.numel()} elements ({worst:.1f}× the bound)"
        )
    worst = ((g64 - want_g).abs() / bound_g).max().item()
    return True, (
        f"loss {loss64.item():.7f} |Δ| {err_l:.1e} (bound {bound_l.item():.1e}), "
        f"gradient within {worst:.2f}× its bound"
    )


def check(backend: str, dtype_name: str, device: torch.device, pairs: int, n: int, run=None):
    """One forward + backward of ``backend`` in ``dtype_name`` against the reference."""
    from snpo_kernels.dispatch import backend_availability

    t0 = time.perf_counter()
    dtype = DTYPES[dtype_name]
    try:
        why = backend_availability(backend, device, dtype)
    except Exception as err:
        why = f"availability raised {type(err).__name__}: {err}"
    if why is not None:
        return Result(backend, dtype_name, "UNAVAILABLE", why, time.perf_counter() - t0)
    run = run or default_run(backend)
    pred, target, ref, swap, weight, go = make_inputs(device, dtype, pairs, n)
    try:
        leaf = pred.detach().clone().requires_grad_(True)
        loss = run(leaf, target, ref, swap, weight, BETA, LAM)
        (grad,) = torch.autograd.grad(loss, leaf, go.to(loss.dtype))
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        ok, detail = compare(pred, target, ref, swap, weight, go, loss, grad)
    except Exception as err:
        msg = " ".join(str(err).split())[:300]
        detail = f"raised {type(err).__name__}: {msg}"
        return Result(backend, dtype_name, "FAIL", detail, time.perf_counter() - t0)
    return Result(backend, dtype_name, "OK" if ok else "FAIL", detail, time.perf_counter() - t0)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    cuda = torch.cuda.is_available()
    ap.add_argument("--device", default="cuda" if cuda else "cpu")
    ap.add_argument("--backends", default="torch,triton,cuda" if cuda else "torch,triton")
    ap.add_argument("--dtypes", default="bf16,fp32")
    ap.add_argument("--pairs", type=int, default=8)
    ap.add_argument("--n", type=int, default=4096 if cuda else 256)
    args = ap.parse_args(argv)
    device = torch.device(args.device)
    print(
        f"smoke: torch {torch.__version__}, device {device}"
        + (f" ({torch.cuda.get_device_name(device)})" if device.type == "cuda" else "")
        + f", TRITON_INTERPRET={os.environ.get('TRITON_INTERPRET', '')!r}, β={BETA}, λ={LAM}, "
        f"{args.pairs} pairs × {args.n} elements",
        flush=True,
    )
    results = []
    for backend in [b for b in args.backends.split(",") if b]:
        for dt in [d for d in args.dtypes.split(",") if d]:
            res = check(backend, dt, device, args.pairs, args.n)
            print(res.line(), flush=True)
            results.append(res)
    failed = [r for r in results if r.status == "FAIL"]
    missing = [r for r in results if r.status == "UNAVAILABLE"]
    if failed:
        print(f"SMOKE FAIL: {', '.join(f'{r.backend}/{r.dtype}' for r in failed)}")
        return 1
    if missing:
        print(
            f"SMOKE OK for what ran; unavailable: {', '.join(f'{r.backend}/{r.dtype}' for r in missing)}"
        )
        return 2
    print("SMOKE OK")
    return 0


if __name__ == "__main__":
    sys.exit(main())
