"""The split-K merge of the decode kernels: partial ``(max, sum, out)`` of every split -> the output (Triton)."""

from __future__ import annotations

import triton
import triton.language as tl


@triton.jit(do_not_specialize=["NS"])
def _merge_kernel(m_ptr, l_ptr, o_ptr, out_ptr, stride_ob, stride_oh, Hq, NS,
                  D: tl.constexpr, DP: tl.constexpr, BS: tl.constexpr):
    """out[b, hq, 0, :] = sum_s 2^(m_s - M) o_s / sum_s 2^(m_s - M) l_s over the NS partials."""
    pid = tl.program_id(0)
    sidx = tl.arange(0, BS)
    d = tl.arange(0, DP)
    mx = tl.full([BS], -1.0e30, tl.float32)
    for s0 in range(0, NS, BS):
        mx = tl.maximum(mx, tl.load(m_ptr + pid * NS + s0 + sidx, mask=s0 + sidx < NS, other=-1.0e30))
    big = tl.max(mx, 0)
    den = tl.zeros([BS], tl.float32)
    num = tl.zeros([BS, DP], tl.float32)
    for s0 in range(0, NS, BS):
        sm = s0 + sidx < NS
        w = tl.math.exp2(tl.load(m_ptr + pid * NS + s0 + sidx, mask=sm, other=-1.0e30) - big)
        w = tl.where(sm, w, 0.0)
        den += w * tl.load(l_ptr + pid * NS + s0 + sidx, mask=sm, other=0.0)
        o = tl.load(o_ptr + (pid.to(tl.int64) * NS + s0 + sidx[:, None]) * D + d[None, :],
                    mask=sm[:, None] & (d[None, :] < D), other=0.0)
        num += w[:, None] * o
    total = tl.sum(den, 0)
    out = tl.sum(num, 0) / tl.where(total > 0, total, 1.0)
    b = pid // Hq
    hq = pid % Hq
    tl.store(out_ptr + b.to(tl.int64) * stride_ob + hq * stride_oh + d, out.to(out_ptr.dtype.element_ty),
             mask=d < D)
