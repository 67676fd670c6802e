"""Triton helpers that read per-token scales: fp16 as stored, or one-byte log-scale positions (``log8``).

A ``log8`` scale is a uint8 ``pos`` over a per-KV-head log2 range: ``s = exp2(lo + pos * step)`` with
``step = max(hi - lo, 1e-3) / 255`` (the spec: :meth:`kvtune.quant.families.normq.NormQ.decode`, and
:func:`kvtune.kernels.packed.dequantize_keys_reference`). A decode program loads ``(lo, step)`` once
(:func:`_log_range`) and every per-token scale load goes through :func:`_token_scales`.
"""

from __future__ import annotations

import triton
import triton.language as tl

from kvtune.quant.grid import LOG_SPAN_FLOOR

MIN_SPAN: tl.constexpr = tl.constexpr(LOG_SPAN_FLOOR)


@triton.jit
def _log_range(r_ptr, LOG: tl.constexpr):
    """``(lo, step)`` fp32 of one head's range ``r_ptr[0:2]`` = ``(lo, hi)`` (LOG), else ``(0, 0)`` (unused)."""
    lo = 0.0
    step = 0.0
    if LOG:
        lo = tl.load(r_ptr).to(tl.float32)
        step = tl.maximum(tl.load(r_ptr + 1).to(tl.float32) - lo, MIN_SPAN) / 255.0
    return lo, step


@triton.jit
def _token_scales(ptrs, mask, lo, step, LOG: tl.constexpr, HAS_MASK: tl.constexpr):
    """fp32 scales at ``ptrs``: fp16 values, or (LOG) uint8 positions ``exp2(lo + pos * step)``. HAS_MASK: lanes
    outside ``mask`` read 0 (a LOG lane then holds ``exp2(lo)``: finite, and its token is masked by the caller)."""
    if HAS_MASK:
        s = tl.load(ptrs, mask=mask, other=0.0).to(tl.float32)
    else:
        s = tl.load(ptrs).to(tl.float32)
    if LOG:
        s = tl.math.exp2(lo + s * step)
    return s
