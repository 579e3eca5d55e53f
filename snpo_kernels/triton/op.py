"""Launch wrappers, the ``snpo::triton_preference_loss`` custom op and its hand-written autograd.

Shapes: pred, target, ref_pred (2P, ...) are flattened to (2P, N) *views* (row and column
strides go to the kernels; only a per-sample part that no single stride can describe is
copied, once). Outputs of the forward op: loss float32 (scalar, or (P,) for "none"),
e_theta, e_ref, coef: (2P,) float32, detached.

Forward, three small steps and two launches, no host synchronisation (CUDA-graph safe):
  1. ``squared_error_partials_kernel`` on a 1-D grid of 2P·S programs (S splits per row,
     see :func:`launch_config`) writes (2P, S) float32 partial sums of squared errors (and of
     the reference's when ref_pred is given). No atomics.
  2. ``pair_tail_kernel``, one program: sums the partials in a fixed order, then e, margins,
     bounded margin, loss, reduction and the per-sample coefficients c_i (see
     :mod:`.pair_kernel`). Two runs on the same inputs are bit-identical.
Backward: ``preference_grad_kernel``, one elementwise pass
``grad = c_i·grad_output_k·2(pred − target)/N`` in pred's dtype; grad_output is read on the
device (a scalar, or (P,) for "none"). No autograd through Triton.

Where the gradient is computed — in the BACKWARD (decided). Let B = 2P·N elements and b the
bytes per element (same dtype for pred, target, ref_pred, for brevity):
  * backward (chosen): forward reads pred, target, ref_pred once (3·B·b) plus O(P·S) for the
    tail; backward reads pred, target and writes grad (3·B·b). Total 6·B·b. Held between the
    passes: the (2P,) coefficients and *references* to pred and target (no copies; autograd
    keeps those tensors alive, the caller usually holds them anyway). Extra memory: none.
  * forward: c_i depends on the whole pair reduction, so the gradient cannot be written in
    the error pass. Either a second forward pass reads pred, target and writes
    c_i·2(pred − target)/N (3·B·b more), and the backward must still apply grad_output (never
    assumable to be 1: DeepSpeed scales the loss; checking it would be a host sync): read +
    write of grad (2·B·b) — total 8·B·b and one pred-sized buffer held; or the error pass also
    writes d = pred − target in pred's dtype (B·b) and the backward reads d and writes grad
    (2·B·b) — total 6·B·b, still one pred-sized buffer held, and d is rounded twice in
    bf16/fp16.
  So computing it in the backward moves fewer or equal bytes and holds no buffer.
  With ref_err instead of ref_pred: 2·B·b forward + 3·B·b backward = 5·B·b.
  Example, SD1.5 latents 16×4×64×64 (B = 262,144): bf16 6·B·2 = 3.1 MB per step (4.2 MB for
  the 8·B·b variant); SDXL 16×4×128×128 (B = 1,048,576): 12.6 MB bf16, 25.2 MB fp32.
  Timings on H100/H200 are pending (no GPU was available when this was written): see the
  benchmarks.
Non-viewable inputs (rare: a per-sample part no single stride describes) are copied once in
the forward and again in the backward rather than holding a pred-sized copy between passes.

The op is a ``torch.library.custom_op`` with a fake implementation and ``register_autograd``
(the backward is itself a custom op), so ``torch.compile(fullgraph=True)`` traces it without
a graph break; Inductor calls it as an opaque kernel. Double backward is not supported.

Test hooks: ``DEBUG_POISON = True`` fills every output and scratch buffer with NaN before the
launches (so an element a kernel fails to write shows up); :func:`launch_overrides` forces
the block size and the split count.
"""

import contextlib
import functools
import math
from collections.abc import Iterator
from dataclasses import dataclass

import torch
import triton

from .error_kernel import squared_error_partials_kernel
from .grad_kernel import preference_grad_kernel
from .pair_kernel import (
    LOSS_HINGE,
    LOSS_IPO,
    LOSS_SIGMOID,
    REDUCE_MEAN,
    REDUCE_NONE,
    REDUCE_SUM,
    pair_tail_kernel,
)

# Fill outputs and partials with NaN before launching (tests): every element must be written.
DEBUG_POISON = False
# Forced launch parameters for tests, set through launch_overrides().
_OVERRIDES: dict[str, int] = {}

PROGRAMS_PER_SM = 4  # error/grad passes aim at ~4 programs per SM so a small batch fills the GPU
MAX_SPLITS = 256  # cap on S (the pair tail sums S partials per row)
CPU_SPLITS = 4  # interpreter: a few splits per row keep the split path exercised, cost is flat
CUDA_BLOCK = 1024  # elements per block and per loop step on the GPU (4 warps, 8 per thread)
CPU_BLOCK = 4096  # the interpreter pays per block step: large blocks
_REDUCE = {"none": REDUCE_NONE, "sum": REDUCE_SUM, "mean": REDUCE_MEAN}
_LOSS_TYPE = {"sigmoid": LOSS_SIGMOID, "hinge": LOSS_HINGE, "ipo": LOSS_IPO}


@contextlib.contextmanager
def launch_overrides(block: int | None = None, splits: int | None = None) -> Iterator[None]:
    """Force the block size (a power of two) and/or the split count S (tests)."""
    old = dict(_OVERRIDES)
    if block is not None:
        _OVERRIDES["block"] = block
    if splits is not None:
        _OVERRIDES["splits"] = splits
    try:
        yield
    finally:
        _OVERRIDES.clear()
        _OVERRIDES.update(old)


@dataclass(frozen=True)
class LaunchConfig:
    """BLOCK elements per step; S splits per row, each CHUNK = k·BLOCK consecutive columns."""

    block: int
    splits: int
    chunk: int
    num_warps: int


@functools.cache
def _sm_count(index: int) -> int:
    return torch.cuda.get_device_properties(index).multi_processor_count


def launch_config(n: int, rows: int, device: torch.device) -> LaunchConfig:
    """Grid of the elementwise passes for ``rows`` rows of ``n`` elements.

    S = min(⌈PROGRAMS_PER_SM·SMs / rows⌉, ⌈n / BLOCK⌉, MAX_SPLITS), then shrunk so that no
    split is empty. SD1.5, 8 pairs (16 rows × 16,384) on an H100 (132 SMs): BLOCK 1024,
    S = 16 → 256 programs of one block each; SDXL (16 × 65,536): S = 32 → 512 programs of two.
    """
    cuda = device.type == "cuda"
    block = _OVERRIDES.get("block") or min(
        CUDA_BLOCK if cuda else CPU_BLOCK, max(16, triton.next_power_of_2(n))
    )
    n_blocks = triton.cdiv(n, block)
    if "splits" in _OVERRIDES:
        want = _OVERRIDES["splits"]
    elif cuda:
        index = device.index if device.index is not None else torch.cuda.current_device()
        want = triton.cdiv(PROGRAMS_PER_SM * _sm_count(index), rows)
    else:
        want = CPU_SPLITS
    splits = max(1, min(want, n_blocks, MAX_SPLITS))
    per_split = triton.cdiv(n_blocks, splits)
    splits = triton.cdiv(n_blocks, per_split)
    return LaunchConfig(block, splits, per_split * block, 4 if block <= 1024 else 8)


def _alloc(shape: tuple[int, ...], dtype: torch.dtype, device: torch.device) -> torch.Tensor:
    if DEBUG_POISON:
        return torch.full(shape, float("nan"), dtype=dtype, device=device)
    return torch.empty(shape, dtype=dtype, device=device)


def _as_rows(t: torch.Tensor) -> torch.Tensor:
    """(B, ...) → (B, N) as a view (strides passed to the kernels)."""
    rows = t.shape[0]
    n = t.numel() // rows
    try:
        return t.view(rows, n)
    except RuntimeError:
        # The per-sample part is not describable by one stride (e.g. a slice of the last
        # dimension of a 4-D tensor): one copy, the only one the op ever makes.
        return t.reshape(rows, n)


def _device_guard(device: torch.device):
    return torch.cuda.device(device) if device.type == "cuda" else contextlib.nullcontext()


def _block2(n: int, cap: int) -> int:
    return min(cap, max(2, triton.next_power_of_2(n)))


def preference_forward(
    pred: torch.Tensor,
    target: torch.Tensor,
    ref_pred: torch.Tensor | None,
    ref_err: torch.Tensor | None,
    swap: torch.Tensor | None,
    weight: torch.Tensor | None,
    beta: float,
    lam: float,
    reduction: str,
    loss_type: str = "sigmoid",
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """→ (loss, e_theta, e_ref, coef): two launches (split error sums, single-program tail)."""
    rows = pred.shape[0]
    p = rows // 2
    n = pred.numel() // rows
    dev = pred.device
    f32 = torch.float32
    pred2, target2 = _as_rows(pred), _as_rows(target)
    ref2 = _as_rows(ref_pred) if ref_pred is not None else None
    cfg = launch_config(n, rows, dev)
    s = cfg.splits

    part_theta = _alloc((rows, s), f32, dev)
    part_ref = _alloc((rows, s), f32, dev) if ref2 is not None else part_theta
    loss = _alloc((p,) if reduction == "none" else (), f32, dev)
    e_theta = _alloc((rows,), f32, dev)
    e_ref = _alloc((rows,), f32, dev)
    coef = _alloc((rows,), f32, dev)
    r = ref2 if ref2 is not None else pred2  # dummy pointer when HAS_REF is False
    swap_u8 = swap.view(torch.uint8) if swap is not None else e_theta
    weight_t = weight if weight is not None else e_theta
    ref_err_t = ref_err if ref_err is not None else e_theta
    bounded = lam < 1.0
    with _device_guard(dev):
        squared_error_partials_kernel[(rows * s,)](
            pred2,
            target2,
            r,
            part_theta,
            part_ref,
            n,
            cfg.chunk,
            s,
            pred2.stride(0),
            pred2.stride(1),
            target2.stride(0),
            target2.stride(1),
            r.stride(0),
            r.stride(1),
            HAS_REF=ref2 is not None,
            BLOCK=cfg.block,
            num_warps=cfg.num_warps,
        )
        pair_tail_kernel[(1,)](
            part_theta,
            part_ref,
            ref_err_t,
            swap_u8,
            weight_t,
            loss,
            e_theta,
            e_ref,
            coef,
            p,
            s,
            n,
            0.5 * beta,
            lam,
            math.log(lam) if bounded else 0.0,
            math.log1p(-lam) if bounded else 0.0,
            ref_err_t.stride(0),
            swap_u8.stride(0),
            weight_t.stride(0),
            HAS_REF_PRED=ref2 is not None,
            HAS_SWAP=swap is not None,
            HAS_WEIGHT=weight is not None,
            BOUNDED=bounded,
            REDUCE=_REDUCE[reduction],
            LOSS_TYPE=_LOSS_TYPE[loss_type],
            BLOCK_P=_block2(p, 128),
            BLOCK_S=_block2(s, 32),
            num_warps=4,
        )
    return loss, e_theta, e_ref, coef


def preference_backward(
    grad_loss: torch.Tensor, pred: torch.Tensor, target: torch.Tensor, coef: torch.Tensor
) -> torch.Tensor:
    """grad (pred's shape and dtype, contiguous) = c_i·grad_loss·2(pred − target)/N.

    grad_loss: a scalar (reductions "mean"/"sum") or (P,) ("none"), any strides.
    """
    rows = pred.shape[0]
    n = pred.numel() // rows
    dev = pred.device
    pred2, target2 = _as_rows(pred), _as_rows(target)
    cfg = launch_config(n, rows, dev)
    grad = _alloc((rows, n), pred.dtype, dev)
    per_pair = grad_loss.dim() == 1
    with _device_guard(dev):
        preference_grad_kernel[(rows * cfg.splits,)](
            pred2,
            target2,
            coef,
            grad_loss,
            grad,
            n,
            cfg.chunk,
            cfg.splits,
            rows // 2,
            2.0 / n,
            pred2.stride(0),
            pred2.stride(1),
            target2.stride(0),
            target2.stride(1),
            grad_loss.stride(0) if per_pair else 0,
            GO_PER_PAIR=per_pair,
            BLOCK=cfg.block,
            num_warps=cfg.num_warps,
        )
    return grad.view(pred.shape)


# ------------------------------------------------------------------ custom ops (torch.compile)
@torch.library.custom_op("snpo::triton_preference_loss", mutates_args=())
def triton_preference_loss(
    pred: torch.Tensor,
    target: torch.Tensor,
    ref_pred: torch.Tensor | None,
    ref_err: torch.Tensor | None,
    swap: torch.Tensor | None,
    weight: torch.Tensor | None,
    beta: float,
    lam: float,
    reduction: str,
    loss_type: str = "sigmoid",
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """Fused preference loss → (loss, e_theta, e_ref, coef); see the module docstring."""
    return preference_forward(
        pred, target, ref_pred, ref_err, swap, weight, beta, lam, reduction, loss_type
    )


@triton_preference_loss.register_fake
def _(pred, target, ref_pred, ref_err, swap, weight, beta, lam, reduction, loss_type="sigmoid"):
    rows = pred.shape[0]
    loss_shape = (rows // 2,) if reduction == "none" else ()
    f32 = torch.float32
    return (
        pred.new_empty(loss_shape, dtype=f32),
        pred.new_empty((rows,), dtype=f32),
        pred.new_empty((rows,), dtype=f32),
        pred.new_empty((rows,), dtype=f32),
    )


@torch.library.custom_op("snpo::triton_preference_loss_backward", mutates_args=())
def triton_preference_loss_backward(
    grad_loss: torch.Tensor, pred: torch.Tensor, target: torch.Tensor, coef: torch.Tensor
) -> torch.Tensor:
    """∂loss/∂pred·grad_loss, pred's shape and dtype (contiguous)."""
    return preference_backward(grad_loss, pred, target, coef)


@triton_preference_loss_backward.register_fake
def _(grad_loss, pred, target, coef):
    return pred.new_empty(pred.shape)


def _setup_context(ctx, inputs, output):
    pred, target = inputs[0], inputs[1]
    _, e_theta, e_ref, coef = output
    # Saved: references to pred and target (no copies) and the (2P,) coefficients.
    ctx.save_for_backward(pred, target, coef)
    ctx.mark_non_differentiable(e_theta, e_ref, coef)


def _backward(ctx, grad_loss, _grad_e_theta, _grad_e_ref, _grad_coef):
    pred, target, coef = ctx.saved_tensors
    grad = None
    if ctx.needs_input_grad[0] and grad_loss is not None:
        grad = triton_preference_loss_backward(grad_loss, pred, target, coef)
    # pred, target, ref_pred, ref_err, swap, weight, beta, lam, reduction, loss_type
    return grad, None, None, None, None, None, None, None, None, None


triton_preference_loss.register_autograd(_backward, setup_context=_setup_context)
