"""``torch.ops.kvtune.decode_static``: decode attention over static-capacity buffers, as a custom op.

Registered with ``torch.library.triton_op`` (kernels launched through ``wrap_triton``), so ``torch.compile`` traces
it into its graph and CUDA graphs capture it like any op. Its lengths are device tensors: the quantized tokens in
use ``n_quant`` int32 ``[1]`` (the packed tensors are a capacity), the extra (window) tokens
``extra_start[b] <= r < n_extra`` (int32 ``[B]`` and ``[1]``) and the quantized tokens' left padding ``start``
int32 ``[B]``; the grid depends on the capacity only. One-byte (log8) per-token scales pass their ranges
``[Hkv, 2]`` as optional tensors (``Tensor?``), symmetric 2-bit codebooks (Lloyd-Max) their ``code_bend`` floats.
The merge may apply the values' inverse rotation and mean (``out_rot``, ``out_mean``). The kernel is
:func:`kvtune.kernels.decode_attention.decode_attention`'s split kernel. Under ``TRITON_INTERPRET=1`` it calls the
kernel directly.
"""

from __future__ import annotations

import os

import torch

from kvtune.kernels.decode_attention import decode_attention
from kvtune.kernels.packed import PackedKeys, PackedValues

_INTERPRET = os.environ.get("TRITON_INTERPRET") == "1"


def _operands(k_codes, k_scale, k_zero, v_codes, v_scale, v_zero, bits_k, bits_v, key_group, value_group,
              k_code_scale, k_code_offset, v_code_scale, v_code_offset, k_range, v_range, k_code_bend, v_code_bend):
    """key_group 0: per-token key scales; ``k_range``/``v_range``: log8 scale ranges ``[Hkv, 2]`` or None;
    ``*_code_bend``: 2-bit symmetric codebooks (0.0: evenly spaced levels)."""
    kq = PackedKeys(k_codes, k_scale, k_zero, bits_k, key_group, k_code_scale, k_code_offset, k_range, k_code_bend,
                    axis="channel" if key_group else "token")
    return kq, PackedValues(v_codes, v_scale, v_zero, bits_v, value_group, v_code_scale, v_code_offset, v_range,
                            v_code_bend)


if not _INTERPRET:
    from torch.library import triton_op, wrap_triton

    @triton_op("kvtune::decode_static", mutates_args=())
    def _decode_static_op(q: torch.Tensor, k_codes: torch.Tensor, k_scale: torch.Tensor, k_zero: torch.Tensor | None,
                          v_codes: torch.Tensor, v_scale: torch.Tensor, v_zero: torch.Tensor | None,
                          extra_k: torch.Tensor, extra_v: torch.Tensor, n_quant: torch.Tensor,
                          n_extra: torch.Tensor, extra_start: torch.Tensor, start: torch.Tensor, bits_k: float,
                          bits_v: float, key_group: int, value_group: int, k_code_scale: float, k_code_offset: float,
                          v_code_scale: float, v_code_offset: float, scaling: float, k_range: torch.Tensor | None,
                          v_range: torch.Tensor | None, k_code_bend: float, v_code_bend: float,
                          out_rot: torch.Tensor | None, out_mean: torch.Tensor | None) -> torch.Tensor:
        kq, vq = _operands(k_codes, k_scale, k_zero, v_codes, v_scale, v_zero, bits_k, bits_v, key_group,
                           value_group, k_code_scale, k_code_offset, v_code_scale, v_code_offset, k_range, v_range,
                           k_code_bend, v_code_bend)
        return decode_attention(q, kq, vq, extra_k, extra_v, None, start, scaling, t_dev=n_quant,
                                extra_count=n_extra, extra_start=extra_start, out_rot=out_rot, out_mean=out_mean,
                                launch=wrap_triton)


def decode_static(q: torch.Tensor, kq: PackedKeys, vq: PackedValues, extra_k: torch.Tensor, extra_v: torch.Tensor,
                  n_quant: torch.Tensor, n_extra: torch.Tensor, extra_start: torch.Tensor, start: torch.Tensor,
                  scaling: float, out_rot: torch.Tensor | None = None,
                  out_mean: torch.Tensor | None = None) -> torch.Tensor:
    """``q [B, Hq, 1, D]`` over capacity operands ``kq``/``vq`` (``T_cap`` tokens, ``n_quant`` in use) and the extra
    segment ``[B, Hkv, R_cap, D]``; returns ``[B, Hq, 1, D]``, taken out of the values' frame by the merge when
    ``out_rot`` ``[D, D]`` / ``out_mean`` ``[Hkv, D]`` are given (see module docstring)."""
    if _INTERPRET:
        return decode_attention(q, kq, vq, extra_k, extra_v, None, start, scaling, t_dev=n_quant,
                                extra_count=n_extra, extra_start=extra_start, out_rot=out_rot, out_mean=out_mean)
    return torch.ops.kvtune.decode_static(
        q, kq.packed, kq.scale, kq.zero, vq.packed, vq.scale, vq.zero, extra_k, extra_v, n_quant, n_extra,
        extra_start, start, float(kq.bits), float(vq.bits), kq.group if kq.axis == "channel" else 0, vq.group,
        float(kq.code_scale), float(kq.code_offset), float(vq.code_scale), float(vq.code_offset), float(scaling),
        kq.scale_range, vq.scale_range, float(kq.code_bend), float(vq.code_bend), out_rot, out_mean)
