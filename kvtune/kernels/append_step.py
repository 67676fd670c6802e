"""One launch for what a static-cache decode step does before attention: store the new token and frame the query.

A single-token step of :class:`kvtune.runtime.static_cache.StaticLayer` writes the token's key and value at the
extra segment's next row (read from device memory: the row count ``n_extra`` ``[1]``), raw for the next flush and,
for a role with a code frame, centered and rotated as the kernel reads it (``(x - mean) @ R``), and rotates the
query into the keys' frame (``q @ R_k``). In PyTorch that is four row copies and up to three small matmuls (plus
the centering), each its own launch, and the rows the query sees (left padding; a sliding or chunked layer's window)
a few more; here it is one program per (sequence, KV head), grid ``(B * Hkv,)``, each rotation two
``[16, D] @ [D, D]`` tensor-core products.

Operands: ``q [B, Hq, 1, D]``, ``k, v [B, Hkv, 1, D]`` (any strides with a contiguous last dim), the extra buffers
``[B, Hkv, R_cap, D]`` (raw ``win_*``, framed ``ext_*``: one shape and strides), rotations as fp16 ``[2, D, D]``
pairs ``R = hi + lo`` (:meth:`kvtune.quant.rotation.Rotation.split_half`) and means ``[Hkv, D]`` fp16 (absent:
None). :func:`append_step` returns the query in the keys' frame (the input itself when keys have no rotation).
Compiled for sm_90 offline: 150-168 registers, no spills at D = 80-128 (a few bytes at 256).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from kvtune.kernels.decode_config import _p2
from kvtune.kernels.launch_args import kernel_arg
from kvtune.layout import GLOBAL, LayerSpan

SPAN_CODES = {"global": 0, "sliding": 1, "chunked": 2}  # kvtune.layout.SPAN_KINDS as the kernel's SPAN constexpr


@triton.jit
def _store_framed(x, dst, rmask, r_ptr, m_ptr, h, D: tl.constexpr, DP: tl.constexpr, ROT: tl.constexpr,
                  CEN: tl.constexpr):
    """Store fp16 rows ``x [RP, DP]`` at row pointers ``dst [RP, 1]`` (rows ``rmask``) in a role's frame: minus the
    head's mean (CEN; rounded to fp16, as the PyTorch path rounds the centered rows), times ``R`` (ROT: ``r_ptr``
    holds ``R`` as two fp16 matrices ``[2, D, D]``, ``hi + lo``; two tensor-core products with fp32 accumulation give
    the float32 product of the fp16 rows, ``CW`` output channels at a time)."""
    cols = tl.arange(0, DP)[None, :]
    if CEN:
        x = (x.to(tl.float32) - tl.load(m_ptr + h * D + cols, mask=cols < D, other=0.0).to(tl.float32)).to(tl.float16)
    if ROT:
        CW: tl.constexpr = min(DP, 64)
        ri = tl.arange(0, DP)[:, None]
        for c0 in tl.static_range(0, DP, CW):
            c = c0 + tl.arange(0, CW)[None, :]
            rm = (ri < D) & (c < D)
            y = tl.dot(x, tl.load(r_ptr + ri * D + c, mask=rm, other=0.0))  # [RP, CW] fp32
            y = tl.dot(x, tl.load(r_ptr + D * D + ri * D + c, mask=rm, other=0.0), y)
            tl.store(dst + c, y.to(dst.dtype.element_ty), mask=rmask & (c < D))
    else:
        tl.store(dst + cols, x.to(dst.dtype.element_ty), mask=rmask & (cols < D))


@triton.jit
def _first_visible(t, pad, size, SPAN: tl.constexpr):
    """The first position a query at ``t`` sees (``kvtune.layout.SPAN_KINDS``: 0 global, 1 sliding, 2 chunked),
    never before the row's left padding ``pad``."""
    first = pad
    if SPAN == 1:
        first = tl.maximum(pad, t - size + 1)
    if SPAN == 2:
        first = pad + tl.maximum(t - pad, 0) // size * size
    return first


@triton.jit
def _append_kernel(q_ptr, sqb, sqh, k_ptr, skb, skh, v_ptr, svb, svh, wk_ptr, wv_ptr, ek_ptr, ev_ptr, swb, swh, swr,
                   qo_ptr, row_ptr, rk_ptr, rv_ptr, mk_ptr, mv_ptr, pad_ptr, nq_ptr, qvis_ptr, wvis_ptr, Hkv, S, size,
                   D: tl.constexpr, DP: tl.constexpr, NREP: tl.constexpr, QP: tl.constexpr,
                   ROT_K: tl.constexpr, ROT_V: tl.constexpr, CEN_K: tl.constexpr, CEN_V: tl.constexpr,
                   SPAN: tl.constexpr):
    """Program ``b * Hkv + h``: key/value row at ``row_ptr[0]`` of the raw and (ROT or CEN) framed buffers; the
    NREP query heads of KV head ``h`` rotated into ``qo`` (ROT_K); program ``h == 0`` also writes row ``b``'s
    visible range (see :func:`append_step`)."""
    pid = tl.program_id(0)
    b = pid // Hkv
    h = pid % Hkv
    row = tl.load(row_ptr)
    if h == 0:  # stream [S sinks][nq quantized][window]: extra row r >= S holds position nq + r; the query is at t
        nq = tl.load(nq_ptr)
        e = _first_visible(nq + row, tl.load(pad_ptr + b), size, SPAN)
        tl.store(qvis_ptr + b, tl.maximum(e - S, 0))
        tl.store(wvis_ptr + b, tl.minimum(e, S) + tl.maximum(e - S - nq, 0))
    rows = tl.arange(0, 16)[:, None]
    cols = tl.arange(0, DP)[None, :]
    one = (rows == 0) & (cols < D)
    dst = b.to(tl.int64) * swb + h * swh + row.to(tl.int64) * swr + rows * 0  # [16, 1]: row 0 is the token
    k = tl.load(k_ptr + b.to(tl.int64) * skb + h * skh + rows * 0 + cols, mask=one, other=0.0).to(tl.float16)
    v = tl.load(v_ptr + b.to(tl.int64) * svb + h * svh + rows * 0 + cols, mask=one, other=0.0).to(tl.float16)
    tl.store(wk_ptr + dst + cols, k, mask=one)
    tl.store(wv_ptr + dst + cols, v, mask=one)
    if ROT_K or CEN_K:
        _store_framed(k, ek_ptr + dst, rows == 0, rk_ptr, mk_ptr, h, D, DP, ROT_K, CEN_K)
    if ROT_V or CEN_V:
        _store_framed(v, ev_ptr + dst, rows == 0, rv_ptr, mv_ptr, h, D, DP, ROT_V, CEN_V)
    if ROT_K:
        qr = tl.arange(0, QP)[:, None]
        heads = h * NREP + qr
        q = tl.load(q_ptr + b.to(tl.int64) * sqb + heads * sqh + cols, mask=(qr < NREP) & (cols < D), other=0.0)
        _store_framed(q.to(tl.float16), qo_ptr + (b.to(tl.int64) * Hkv * NREP + heads) * D,
                      qr < NREP, rk_ptr, mk_ptr, h, D, DP, True, False)


def append_step(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, win_k: torch.Tensor, win_v: torch.Tensor,
                ext_k: torch.Tensor, ext_v: torch.Tensor, n_extra: torch.Tensor, rot_k: torch.Tensor | None,
                rot_v: torch.Tensor | None, mean_k: torch.Tensor | None, mean_v: torch.Tensor | None,
                visible: tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor], sinks: int,
                span: LayerSpan = GLOBAL) -> torch.Tensor:
    """Write ``k, v [B, Hkv, 1, D]`` at row ``n_extra[0]`` of ``win_*`` and, framed (``(x - mean) @ R``; a role
    with neither passes ``ext_*`` as its ``win_*``), of ``ext_*`` ``[B, Hkv, R_cap, D]``; return ``q [B, Hq, 1, D]``
    in the keys' frame (``q @ R_k`` in fp16; ``q`` itself without a key rotation). ``rot_k``/``rot_v``: each role's
    ``R`` as fp16 ``[2, D, D]`` (hi, lo) or None; ``mean_*`` ``[Hkv, D]`` or None. Does not advance ``n_extra``.

    ``visible = (pad, n_quant, qvis, wvis)``: from each row's left padding ``pad`` int32 ``[B]`` and the quantized
    count ``n_quant`` int32 ``[1]`` of the stream ``[sinks][quantized][extra rows from sinks on]``, writes what the
    query at position ``n_quant + n_extra`` sees in the attention kernel's terms: quantized tokens from ``qvis[b]``
    and extra rows from ``wvis[b]`` (contiguous up to the row count), after the padding and, for a sliding or
    chunked ``span``, inside its window."""
    bsz, hq, one, d = q.shape
    hkv = k.shape[1]
    if one != 1 or k.shape[2] != 1 or hq % hkv or win_k.stride() != ext_k.stride() or win_k.shape != win_v.shape:
        raise ValueError(f"append_step takes one token: q {tuple(q.shape)}, k {tuple(k.shape)}, window "
                         f"{tuple(win_k.shape)}")
    q, k, v = (kernel_arg(x) for x in (q, k, v))
    qo = torch.empty(bsz, hq, 1, d, dtype=torch.float16, device=q.device) if rot_k is not None else q
    dummy = win_k
    _append_kernel[(bsz * hkv,)](
        q, q.stride(0), q.stride(1), k, k.stride(0), k.stride(1), v, v.stride(0), v.stride(1),
        win_k, win_v, ext_k, ext_v, *win_k.stride()[:3], qo, n_extra,
        rot_k if rot_k is not None else dummy, rot_v if rot_v is not None else dummy,
        mean_k if mean_k is not None else dummy, mean_v if mean_v is not None else dummy,
        *visible, hkv, sinks, span.size, D=d, DP=max(16, _p2(d)), NREP=hq // hkv, QP=max(16, _p2(hq // hkv)),
        ROT_K=rot_k is not None, ROT_V=rot_v is not None, CEN_K=mean_k is not None, CEN_V=mean_v is not None,
        SPAN=SPAN_CODES[span.kind], num_warps=4,
    )
    return qo
