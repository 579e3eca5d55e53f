"""The one table of floating-point dtypes by name, shared by the config, trainer, cache and tools.

Short names (``fp32``, ``bf16``, ``fp16``) are what configs and ``--dtype`` flags take; the long
names (``float32``, ``bfloat16``, ``float16``) are accepted too and are what caches and exports
record (``dtype_name``).
"""

from __future__ import annotations

import torch

DTYPES: dict[str, torch.dtype] = {
    "fp32": torch.float32,
    "float32": torch.float32,
    "bf16": torch.bfloat16,
    "bfloat16": torch.bfloat16,
    "fp16": torch.float16,
    "float16": torch.float16,
}
SHORT_NAMES = ("fp32", "bf16", "fp16")


def dtype_of(name: str) -> torch.dtype:
    """The torch dtype called ``name``; a ValueError naming the accepted names otherwise."""
    try:
        return DTYPES[name]
    except KeyError:
        raise ValueError(f"unknown dtype {name!r}: one of {', '.join(DTYPES)}") from None


def dtype_name(dtype: torch.dtype) -> str:
    """The long name of a floating dtype (``torch.bfloat16`` → ``"bfloat16"``)."""
    return str(dtype).removeprefix("torch.")
