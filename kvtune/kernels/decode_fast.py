"""Swapped split-K decode attention for 2/4/8-bit codes: tokens fill the MMA's M, codes go to it raw.

With ``KVTUNE_DECODE_KERNEL=fast`` (the split kernel measured faster on an H200 and is the default), the
formats of the hot path (``bits`` in 2, 4, 8, the head dim a power of two; keys per channel in groups of ``G >= 32``
tokens (any, for one scale row broadcast over the groups) or per token, values per token with one scale (and
optional zero-point) for the whole head; any evenly spaced code map ``scale * (code_scale * c + code_offset) +
zero``) run here instead of :mod:`kvtune.kernels.decode_attention`'s general kernel. Per program (one split of
one sequence's KV head):

* scores ``[BT, N]`` = unpacked key codes ``[BT, D]`` @ ``(q ⊙ s_g)^T [D, N]``: the per-channel key scales
  (and ``code_scale``) are folded into the query once per key group, zero-points and the codes' offset into
  one bias per query row (per-token key scales multiply the scores instead); ``N`` = the KV head's query heads
  padded to 8, so the padding costs 2x at n_rep = 4, not 4x;
* ``accT [D, N] += V^T @ (p ⊙ s_v)`` (the value tile is loaded transposed, so the codes unpack straight into
  the MMA's A operand): value scales are folded into the probabilities, the codes' offset,
  code map and zero-points leave once at the end;
* lengths may be read from device memory (``T_DEV``: the quantized token count; the extra segment's valid
  count and per-row start), so one fixed launch serves every step of a CUDA graph.

Partials ``(m, l, o)`` are merged by :func:`kvtune.kernels.merge_tl._merge_kernel` (a fixed pair of
launches). The PyTorch reference is :func:`kvtune.kernels.packed.decode_attention_reference`.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any

import torch
import triton
import triton.language as tl

from kvtune.kernels.decode_config import DecodeConfig, _p2, default_config
from kvtune.kernels.fast_tiles import _key_group_query, _offset, _tile
from kvtune.kernels.launch_args import extra_args, kernel_arg, use_asm
from kvtune.kernels.merge_tl import _merge_kernel
from kvtune.kernels.packed import PackedKeys, PackedValues

FAST_BITS = (2, 4, 8)
LOG2E = 1.4426950408889634


@triton.jit(do_not_specialize=["T", "R", "NQS"])
def _fast_split_kernel(
    q_ptr, stride_qb, stride_qh,
    kp_ptr, stride_kpb, stride_kph, stride_kpt,
    ks_ptr, kz_ptr, stride_ksb, stride_ksh, stride_ksg,
    vp_ptr, stride_vpb, stride_vph, stride_vpt,
    vs_ptr, vz_ptr, stride_vsb, stride_vsh, stride_vst,
    ek_ptr, ev_ptr, stride_eb, stride_eh, stride_et,
    elen_ptr, stride_emb, estart_ptr, start_ptr, t_ptr,
    m_ptr, l_ptr, o_ptr,
    T, R, NQS, Hkv, qk_scale, k_alpha, k_beta, v_alpha, v_beta,
    D: tl.constexpr, NREP: tl.constexpr, N: tl.constexpr, BITS_K: tl.constexpr, BITS_V: tl.constexpr,
    G: tl.constexpr, KAX: tl.constexpr, BT: tl.constexpr, BTE: tl.constexpr, EXTRA: tl.constexpr,
    HAS_START: tl.constexpr, T_DEV: tl.constexpr, USE_ASM: tl.constexpr, HAS_KZ: tl.constexpr,
    AFF_K: tl.constexpr, HAS_VZ: tl.constexpr,
):
    """Partial attention of split ``pid_s`` of sequence-head ``pid_bh``.

    q [B, Hq, 1, D]; packed K/V [B, Hkv, T, D*bits/8]; key scale/zero [B, Hkv, T/G, D] (KAX 0) or [B, Hkv, T, 1]
    (KAX 1); value scale/zero [B, Hkv, T, 1]; extra K/V [B, Hkv, R, D] (same strides). T_DEV: T is read from
    ``t_ptr`` [1]. EXTRA: 0 none; 1 the first elen[b] valid (lengths [B]); 2 mask elen [B, R] (nonzero =
    valid); 3 all R valid; 4 tokens
    ``estart[b] <= r < elen[0]`` valid (device counts). start [B]: quantized tokens t < start[b] are padding.
    Grid (NQS + (EXTRA != 0), B * Hkv); split NQS (when EXTRA) walks the extra segment. Writes m, l
    [B*Hq, NS] (base 2) and o [B*Hq, NS, D] unnormalised, in channel order.
    """
    pid_s = tl.program_id(0)
    pid_bh = tl.program_id(1)
    NS = NQS
    if EXTRA != 0:
        NS = NQS + 1
    b = pid_bh // Hkv
    h = pid_bh % Hkv
    n = tl.arange(0, N)
    rmask = n < NREP
    e = tl.arange(0, D)
    q_rows = q_ptr + b.to(tl.int64) * stride_qb + (h * NREP + n[None, :]) * stride_qh
    qT = tl.load(q_rows + e[:, None], mask=rmask[None, :], other=0.0).to(tl.float32) * qk_scale  # [D, N]
    offk = _offset(e, D * BITS_K // 8, BITS_K)
    qg = qT.to(tl.float16)
    qsum = tl.sum(qg.to(tl.float32), 0)
    offsum = tl.sum(qg.to(tl.float32) * offk[:, None], 0)
    bias = tl.zeros([N], tl.float32)
    m_i = tl.full([N], -1.0e30, tl.float32)
    l_acc = tl.zeros([BT, N], tl.float32)
    o_acc = tl.zeros([BT, N], tl.float32)
    z_acc = tl.zeros([BT, N], tl.float32)
    accT = tl.zeros([D, N], tl.float32)

    # ---- quantized tokens [lo, hi) of this split (tiles of BT, chunks a multiple of BT)
    if T_DEV:
        T = tl.load(t_ptr)
    chunk = tl.cdiv(tl.cdiv(T, NQS), BT) * BT
    lo = pid_s * chunk
    hi = tl.where(pid_s < NQS, tl.minimum(lo + chunk, T), lo)
    st = 0
    if HAS_START:
        st = tl.load(start_ptr + b)
    skip = tl.maximum(st - lo, 0)
    first = lo + (skip // BT) * BT
    full_lo = lo + ((skip + BT - 1) // BT) * BT
    full_hi = lo + ((hi - lo) // BT) * BT
    tail = tl.maximum(full_hi, full_lo)
    n_head = (first < tl.minimum(full_lo, hi)).to(tl.int32)
    n_masked = n_head + (tail < hi).to(tl.int32)
    kp_row = kp_ptr + b.to(tl.int64) * stride_kpb + h.to(tl.int64) * stride_kph
    vp_row = vp_ptr + b.to(tl.int64) * stride_vpb + h.to(tl.int64) * stride_vph
    ks_row = ks_ptr + b.to(tl.int64) * stride_ksb + h.to(tl.int64) * stride_ksh
    kz_row = kz_ptr + b.to(tl.int64) * stride_ksb + h.to(tl.int64) * stride_ksh
    vs_row = vs_ptr + b.to(tl.int64) * stride_vsb + h.to(tl.int64) * stride_vsh
    vz_row = vz_ptr + b.to(tl.int64) * stride_vsb + h.to(tl.int64) * stride_vsh
    for i in tl.range(0, n_masked, num_stages=1):  # head (holds start) and tail (holds hi) tiles, masked
        t0 = tl.where(i < n_head, first, tail)
        if KAX == 0:
            qg, bias = _key_group_query(qT, ks_row, kz_row, (t0 // G) * stride_ksg, e, offk, k_alpha, k_beta,
                                        HAS_KZ, AFF_K)
        m_i, l_acc, o_acc, z_acc, accT = _tile(t0, hi, st, m_i, l_acc, o_acc, z_acc, accT, qg, bias, offsum, qsum,
                                               kp_row, ks_row, kz_row, vp_row, vs_row, vz_row, stride_kpt,
                                               stride_ksg, stride_vpt, stride_vst, k_alpha, k_beta, D, BT, BITS_K,
                                               BITS_V, KAX, HAS_KZ, HAS_VZ, True, USE_ASM)
    for t0 in range(full_lo, full_hi, BT):  # whole tiles: no predicates
        if KAX == 0:
            qg, bias = _key_group_query(qT, ks_row, kz_row, (t0 // G) * stride_ksg, e, offk, k_alpha, k_beta,
                                        HAS_KZ, AFF_K)
        m_i, l_acc, o_acc, z_acc, accT = _tile(t0, hi, st, m_i, l_acc, o_acc, z_acc, accT, qg, bias, offsum, qsum,
                                               kp_row, ks_row, kz_row, vp_row, vs_row, vz_row, stride_kpt,
                                               stride_ksg, stride_vpt, stride_vst, k_alpha, k_beta, D, BT, BITS_K,
                                               BITS_V, KAX, HAS_KZ, HAS_VZ, False, USE_ASM)
    l_i = tl.sum(l_acc, 0)                                                       # [N]
    pvsum = tl.sum(o_acc, 0)
    outT = (accT - _offset(e, D * BITS_V // 8, BITS_V)[:, None] * pvsum[None, :]) * v_alpha + v_beta * pvsum[None, :]
    if HAS_VZ:
        outT += tl.sum(z_acc, 0)[None, :]

    # ---- extra segment (split NQS): full-precision K/V, columns gathered in the codes' order
    if EXTRA != 0:
        r_end = tl.where(pid_s == NQS, R, 0)
        r_lo = 0
        n_valid = R
        if EXTRA == 1:
            n_valid = tl.load(elen_ptr + b)
        if EXTRA == 4:
            n_valid = tl.load(elen_ptr)
            r_lo = tl.load(estart_ptr + b)
        e_row = b.to(tl.int64) * stride_eb + h.to(tl.int64) * stride_eh
        q16 = qT.to(tl.float16)
        for r0 in tl.range(0, r_end, BTE, num_stages=1):
            offs_r = r0 + tl.arange(0, BTE)
            valid = (offs_r < R) & (offs_r < n_valid) & (offs_r >= r_lo)
            if EXTRA == 2:
                mk = tl.load(elen_ptr + b.to(tl.int64) * stride_emb + offs_r, mask=offs_r < R, other=0)
                valid = valid & (mk != 0)
            kd = tl.load(ek_ptr + e_row + offs_r[:, None] * stride_et + e[None, :], mask=valid[:, None], other=0.0)
            s = tl.dot(kd.to(tl.float16), q16)                                    # [BTE, N]
            s = tl.where(valid[:, None], s, float("-inf"))
            m_new = tl.maximum(m_i, tl.max(s, 0))
            alpha = tl.math.exp2(m_i - m_new)
            pe = tl.math.exp2(s - m_new[None, :])
            l_i = l_i * alpha + tl.sum(pe, 0)
            vd = tl.load(ev_ptr + e_row + offs_r[:, None] * stride_et + e[None, :], mask=valid[:, None], other=0.0)
            outT = tl.dot(tl.trans(vd.to(tl.float16)), pe.to(tl.float16), outT * alpha[None, :])
            m_i = m_new

    # ---- partials of the NREP real rows, output back in channel order
    hq = (b * Hkv + h) * NREP + n
    tl.store(m_ptr + hq * NS + pid_s, m_i, mask=rmask)
    tl.store(l_ptr + hq * NS + pid_s, l_i, mask=rmask)
    o_cols = o_ptr + (hq[None, :].to(tl.int64) * NS + pid_s) * D + e[:, None]
    tl.store(o_cols, outT, mask=rmask[None, :])


def fast_eligible(kq: PackedKeys, vq: PackedValues, d: int) -> bool:
    """True when :func:`decode_fast` reads these operands (2/4/8-bit codes, power-of-two head dim 32..256, keys in
    per-channel groups of >= 32 tokens or per token, one value scale per token; 16-token tiles failed compiled on an
    H200). Keys whose scale rows are one row
    broadcast over the groups (stride 0, the ``static`` family) run in tiles of any size."""
    return (kq.bits in FAST_BITS and vq.bits in FAST_BITS and d == _p2(d) and 32 <= d <= 256
            and (kq.axis == "token" or kq.group >= 32 or (kq.group >= 16 and kq.scale.stride(2) == 0))
            and (vq.group == 0 or vq.group >= d)
            and tuple(vq.scale.shape[3:]) == (1,))


def fast_config(batch: int, hkv: int, capacity: int, d: int, device: torch.device, key_group: int) -> DecodeConfig:
    """Launch choice: 128-token tiles (64 at d = 256; never more than a key group), 4 warps, about 8 programs a
    multiprocessor as :func:`~kvtune.kernels.decode_config.default_config` (splits from the capacity)."""
    base = default_config(batch, hkv, capacity, d, device)
    block_t = min(64 if d > 128 else 128, key_group or 128)
    return DecodeConfig(block_t, base.num_splits, 4 if block_t >= 64 else max(1, block_t // 16), base.num_stages)


def decode_fast(q: torch.Tensor, kq: PackedKeys, vq: PackedValues, extra_k: torch.Tensor | None = None,
                extra_v: torch.Tensor | None = None, extra_len: torch.Tensor | None = None,
                start: torch.Tensor | None = None, scaling: float | None = None, config: DecodeConfig | None = None,
                *, t_dev: torch.Tensor | None = None, extra_count: torch.Tensor | None = None,
                extra_start: torch.Tensor | None = None, launch: Callable[[Any], Any] | None = None) -> torch.Tensor:
    """:func:`~kvtune.kernels.decode_attention.decode_attention` for :func:`fast_eligible` operands; same arguments,
    plus device-side lengths for a fixed launch: ``t_dev`` int32 ``[1]`` quantized tokens in use (the packed
    tensors are then a capacity), ``extra_count`` int32 ``[1]`` and ``extra_start`` int32 ``[B]``: extra tokens
    ``extra_start[b] <= r < extra_count`` are valid. ``launch``: wraps each kernel before its grid is applied
    (``torch.library.wrap_triton`` inside a ``triton_op``). Returns ``[B, Hq, 1, D]`` in q's dtype."""
    # q: [B, Hq, 1, D]
    bsz, hq, _, d = q.shape
    _, hkv, cap, _ = kq.packed.shape
    n_rep = hq // hkv
    scaling = 1.0 / math.sqrt(d) if scaling is None else float(scaling)
    kax = int(kq.axis == "token")
    fixed = not kax and kq.scale.stride(2) == 0  # one key scale row for all groups (static): any tile size
    cfg = config or fast_config(bsz, hkv, cap, d, q.device, 0 if kax or fixed else kq.group)
    block_t = cfg.block_t if kax or fixed else min(cfg.block_t, kq.group)
    kgroup = block_t if fixed else max(kq.group, 1)
    nqs = max(1, min(cfg.num_splits, math.ceil(cap / block_t)))
    ek, ev, emask, stride_emb, r, mode = extra_args(extra_k, extra_v, extra_len, q, extra_count)
    ns = nqs + (1 if mode else 0)
    out = torch.empty_like(q)
    if cap == 0 and mode == 0:
        return out.zero_()
    kp, ks = kernel_arg(kq.packed), kernel_arg(kq.scale)
    kz = ks if kq.zero is None else kernel_arg(kq.zero)
    vp, vs = kernel_arg(vq.packed), kernel_arg(vq.scale)
    vz = vs if vq.zero is None else kernel_arg(vq.zero)
    if ks.stride() != kz.stride():
        ks, kz = ks.contiguous(), kz.contiguous()
    if vs.stride() != vz.stride():
        vs, vz = vs.contiguous(), vz.contiguous()
    if ek.stride() != ev.stride():
        ek, ev = ek.contiguous(), ev.contiguous()
    qc = kernel_arg(q)
    m = torch.empty(bsz * hq, ns, dtype=torch.float32, device=q.device)
    lse = torch.empty_like(m)
    o = torch.empty(bsz * hq, ns, d, dtype=torch.float32, device=q.device)
    st = start if start is not None else m
    wrap = launch or (lambda k: k)
    wrap(_fast_split_kernel)[(ns, bsz * hkv)](
        qc, qc.stride(0), qc.stride(1), kp, kp.stride(0), kp.stride(1), kp.stride(2),
        ks, kz, ks.stride(0), ks.stride(1), ks.stride(2), vp, vp.stride(0), vp.stride(1), vp.stride(2),
        vs, vz, vs.stride(0), vs.stride(1), vs.stride(2), ek, ev, ek.stride(0), ek.stride(1), ek.stride(2),
        emask, stride_emb, extra_start if extra_start is not None else m, st, t_dev if t_dev is not None else m,
        m, lse, o, cap, r, nqs, hkv, scaling * LOG2E, kq.code_scale, kq.code_offset, vq.code_scale, vq.code_offset,
        D=d, NREP=n_rep, N=max(8, _p2(n_rep)), BITS_K=int(kq.bits), BITS_V=int(vq.bits), G=kgroup,
        KAX=kax, BT=block_t, BTE=min(64, max(16, _p2(r))), EXTRA=mode, HAS_START=start is not None,
        T_DEV=t_dev is not None, USE_ASM=use_asm(q), HAS_KZ=kq.zero is not None, AFF_K=kq.affine,
        HAS_VZ=vq.zero is not None, num_warps=cfg.num_warps, num_stages=cfg.num_stages)
    wrap(_merge_kernel)[(bsz * hq,)](m, lse, o, out, out.stride(0), out.stride(1), hq, ns,
                                     D=d, DP=_p2(d), BS=min(16, _p2(ns)), num_warps=4)
    return out
