"""Test-wide settings: one intra-op thread (2-core CI machines), the Triton mode of the
process (set before any kernel module is imported), and the `gpu` marker skip.

One Triton mode per process. ``TRITON_INTERPRET`` is read when a kernel is decorated, so a
process runs either every Triton kernel in the interpreter (CPU tensors) or every one
compiled (CUDA tensors). The CPU tests put their tensors on the CPU and need the interpreter;
the ``gpu`` tests need compiled kernels. So (:func:`triton_mode`):

- no CUDA device: the interpreter is on; ``gpu`` tests are skipped ("needs a CUDA device");
- a CUDA device and a GPU-only selection (``pytest -m gpu``, as scripts/gpu_suite.sh runs
  it): compiled Triton, the GPU tests run;
- a CUDA device and any other selection (``pytest tests``, scripts/test.sh): the interpreter
  is on, so the CPU tests pass exactly as on a CPU machine, and the ``gpu`` tests are skipped
  with the command that runs them (``pytest -m gpu``);
- ``TRITON_INTERPRET`` set by the caller is respected (``1``: interpreted, ``gpu`` tests
  skipped; ``0``: compiled).
"""

from __future__ import annotations

import os
from collections.abc import Mapping

os.environ.setdefault("OMP_NUM_THREADS", "1")

import pytest  # noqa: E402
import torch  # noqa: E402

torch.set_num_threads(1)
HAS_CUDA = torch.cuda.is_available()
INTERPRET_ENV = "TRITON_INTERPRET"
_NO_CUDA = "needs a CUDA device"
_INTERPRETED = (
    "Triton runs in the interpreter in this process (one Triton mode per process, for the CPU "
    "tests); run the GPU tests on their own: `pytest tests -m gpu` (TRITON_INTERPRET unset)"
)


def selects_only_gpu(markexpr: str) -> bool:
    """Whether a ``-m`` expression deselects every test that is not marked ``gpu``."""
    if not markexpr.strip():
        return False
    try:
        from _pytest.mark.expression import Expression

        expr = Expression.compile(markexpr)
    except Exception:  # pytest internals moved, or a bad expression (pytest reports it)
        return markexpr.strip() == "gpu"

    def has(marks):
        return lambda name, **kwargs: name in marks

    if not any(expr.evaluate(has(m)) for m in ({"gpu"}, {"gpu", "slow"})):
        return False
    return not any(expr.evaluate(has(m)) for m in (set(), {"slow"}))


def triton_mode(has_cuda: bool, env: Mapping[str, str], markexpr: str) -> tuple[bool, str | None]:
    """(run Triton in the interpreter?, why the ``gpu`` tests are skipped, or None); see the
    module docstring."""
    forced = env.get(INTERPRET_ENV)
    if not has_cuda:
        return (forced is None or forced == "1"), _NO_CUDA
    if forced is not None:
        interpret = forced == "1"
        return interpret, (f"{INTERPRET_ENV}=1: " + _INTERPRETED) if interpret else None
    if selects_only_gpu(markexpr):
        return False, None
    return True, _INTERPRETED


_GPU_SKIP: list[str | None] = [_NO_CUDA]


def pytest_configure(config):
    interpret, why = triton_mode(HAS_CUDA, os.environ, config.getoption("markexpr") or "")
    if interpret:
        os.environ[INTERPRET_ENV] = "1"
    _GPU_SKIP[0] = why


def pytest_collection_modifyitems(config, items):
    why = _GPU_SKIP[0]
    if why is None:
        return
    skip = pytest.mark.skip(reason=why)
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)


@pytest.fixture(autouse=True)
def _restore_environment():
    """In-process training runs (any test folder) set RANK/WORLD_SIZE/MASTER_PORT/
    DS_ACCELERATOR defaults; keep them from leaking into later tests and their subprocesses
    (two trainers launched later would otherwise share one MASTER_PORT)."""
    saved = dict(os.environ)
    yield
    os.environ.clear()
    os.environ.update(saved)
