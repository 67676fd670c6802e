"""The split-K merge of the decode kernels: partial ``(max, sum, out)`` of every split -> the output (Triton).

It can also take the output out of the values' code frame (``out @ R.T + mean``: the inverse rotation and the
value mean of a rotated / centered value format), which would otherwise be a matmul and an add of their own a layer
and step.
"""

from __future__ import annotations

import triton
import triton.language as tl


@triton.jit(do_not_specialize=["NS"])
def _merge_kernel(m_ptr, l_ptr, o_ptr, out_ptr, stride_ob, stride_oh, Hq, NS, rt_ptr, mean_ptr, NREP,
                  D: tl.constexpr, DP: tl.constexpr, BS: tl.constexpr, ROT: tl.constexpr, CEN: tl.constexpr):
    """out[b, hq, 0, :] = sum_s 2^(m_s - M) o_s / sum_s 2^(m_s - M) l_s over the NS partials; ROT: times
    ``rt [D, D]`` (fp16, the inverse rotation ``R.T``); CEN: plus the KV head's mean ``mean [Hkv, D]``."""
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
    dst = out_ptr + b.to(tl.int64) * stride_ob + hq * stride_oh
    if ROT:
        CW: tl.constexpr = min(DP, 32)  # output channels a chunk: a [DP, CW] slice of R.T in registers
        for c0 in tl.static_range(0, DP, CW):
            c = c0 + tl.arange(0, CW)
            rt = tl.load(rt_ptr + d[:, None] * D + c[None, :], mask=(d[:, None] < D) & (c[None, :] < D), other=0.0)
            oc = tl.sum(out[:, None] * rt.to(tl.float32), 0)
            if CEN:
                oc += tl.load(mean_ptr + (hq // NREP) * D + c, mask=c < D, other=0.0).to(tl.float32)
            tl.store(dst + c, oc.to(out_ptr.dtype.element_ty), mask=c < D)
    else:
        if CEN:
            out += tl.load(mean_ptr + (hq // NREP) * D + d, mask=d < D, other=0.0).to(tl.float32)
        tl.store(dst + d, out.to(out_ptr.dtype.element_ty), mask=d < D)
