"""Host-side launch operands shared by the decode kernels (split and swapped): tensors as kernel arguments,
the extra fp16 segment's mode, and whether inline PTX may be used. No Triton here."""

from __future__ import annotations

import os

import torch


def extra_args(extra_k: torch.Tensor | None, extra_v: torch.Tensor | None, extra_len: torch.Tensor | None,
               q: torch.Tensor, extra_count: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor,
                                                                               torch.Tensor, int, int, int]:
    """(ek, ev, emask, stride_emb, R, mode): mode 0 none, 1 lengths [B], 2 mask [B, R], 3 all valid, 4 device
    range (``extra_count`` [1]). ``q`` stands in for absent operands."""
    if extra_k is None or extra_k.shape[2] == 0:
        return q, q, q, 0, 0, 0
    assert extra_v is not None
    r = extra_k.shape[2]
    if extra_count is not None:
        return extra_k, extra_v, extra_count, 0, r, 4
    if extra_len is None:
        return extra_k, extra_v, q, 0, r, 3
    if extra_len.dtype == torch.bool:
        mask = extra_len.to(torch.uint8)
        return extra_k, extra_v, mask, mask.stride(0), r, 2
    return extra_k, extra_v, extra_len.to(torch.int32), 0, r, 1


def use_asm(q: torch.Tensor) -> bool:
    """Inline PTX only on NVIDIA GPUs outside the interpreter."""
    return q.is_cuda and torch.version.hip is None and os.environ.get("TRITON_INTERPRET") != "1"


def kernel_arg(x: torch.Tensor) -> torch.Tensor:
    """A kernel argument: last dim contiguous; an empty tensor (T = 0) becomes a 1-element stand-in, since
    triton refuses null pointers (the kernel never reads it)."""
    if x.numel() == 0:
        return torch.zeros((1,) * x.dim(), dtype=x.dtype, device=x.device)
    return x if x.stride(-1) == 1 else x.contiguous()
