"""Triton kernels over the bit-packed KV layout (the only place in kvtune that imports triton).

Nothing here imports triton, torch.cuda or the kernel modules on import: :func:`available` probes,
and the public names below resolve lazily on first attribute access::

    from kvtune import kernels
    if kernels.available():
        out = kernels.decode_attention(q, kq, vq, extra_k, extra_v, extra_len, start, scaling)

Codes are packed by :mod:`kvtune.quant.codes` (PyTorch, on any device: the one packing implementation).
Modules: :mod:`kvtune.kernels.packed` (the packed K/V containers and the PyTorch reference of decode
attention, no triton),
:mod:`kvtune.kernels.decode_attention` (fused split-K decode attention over packed K/V plus a
full-precision extra segment) with its device functions in :mod:`kvtune.kernels.unpack_tl` and
:mod:`kvtune.kernels.decode_tiles` (per-token scales, fp16 or one-byte log8: :mod:`kvtune.kernels.scales_tl`)
and its launch choice in :mod:`kvtune.kernels.decode_config`.
"""

from __future__ import annotations

import importlib
import importlib.util
import os
from typing import Any

_EXPORTS = {
    "PackedKeys": "kvtune.kernels.packed",
    "PackedValues": "kvtune.kernels.packed",
    "decode_attention": "kvtune.kernels.decode_attention",
    "decode_attention_reference": "kvtune.kernels.packed",
}

__all__ = [
    "PackedKeys", "PackedValues", "available", "decode_attention", "decode_attention_reference",
]


def available() -> bool:
    """True when triton imports and can run: a CUDA device is present or ``TRITON_INTERPRET=1``."""
    if importlib.util.find_spec("triton") is None:
        return False
    try:
        importlib.import_module("triton")
    except (ImportError, OSError, RuntimeError):  # a broken install counts as unavailable
        return False
    if os.environ.get("TRITON_INTERPRET") == "1":
        return True
    import torch

    return torch.cuda.is_available()


def __getattr__(name: str) -> Any:
    if name in _EXPORTS:
        return getattr(importlib.import_module(_EXPORTS[name]), name)
    raise AttributeError(f"module 'kvtune.kernels' has no attribute {name!r}")


def __dir__() -> list[str]:
    return __all__
