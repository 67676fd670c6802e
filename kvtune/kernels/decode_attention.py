"""Fused decode attention over bit-packed K/V plus a full-precision extra segment (Triton).

One query token per sequence attends over, per KV head, ``T`` quantized tokens (layout of
:mod:`kvtune.quant.codes`) and ``R`` full-precision "extra" tokens (residual window, sinks, salient
tokens; unordered). Flash-decoding: the grid is ``(n_splits + 1, B * Hkv)``; program ``(s, b*Hkv+h)``
walks its chunk of the quantized sequence in tiles of ``BLOCK_T`` tokens, the last split program
walks the extra segment instead. Each program serves *all* ``n_rep`` query heads of its KV head
(padded to 8 rows, :meth:`DecodeConfig.rows`, so that both products run on tensor cores: at n_rep = 4 a broadcast
multiply-sum would cost 4 CUDA-core FMAs per K and per V element, more than the unpacking itself),
unpacks one channel slice at a time (the strided layout makes slot ``s`` of every byte the
contiguous channel slice ``[s*W, (s+1)*W)``, so q and the output accumulator are split the same
way), dequantizes in registers, keeps an online softmax in base 2, and writes a partial
``(max, sum, out)``. A second tiny kernel merges the partials with log-sum-exp.

The extra segment runs as one more split of the same launch (not in torch): it costs no extra launch,
no Python-side softmax, and its partial merges like any other.

Per-token scales are read as fp16 or as one-byte log8 positions over a per-head log2 range (``normq``'s
``scale_dtype: log8``; :mod:`kvtune.kernels.scales_tl`), chosen by the constexprs ``LOG_K`` / ``LOG_V``.

This kernel serves every format. (A swapped kernel with tokens in the MMA's M dimension, 0.31 ms vs 0.19 at
Llama-3-8B B=8 32k in the previous benchmarks/results/decode_kernel_fast_h200.json, and the variants of
decode_kernel_variants_h200.json measured slower on an H200 and were removed.) Lengths may come from device
memory (``t_dev``, ``extra_count``/``extra_start``) so that one fixed launch serves every step of a CUDA graph.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from functools import lru_cache
from typing import Any

import torch
import triton
import triton.language as tl

from kvtune.kernels.decode_config import DecodeConfig, _p2, default_config
from kvtune.kernels.decode_tiles import _softmax_step, _tile
from kvtune.kernels.launch_args import extra_args, kernel_arg, use_asm
from kvtune.kernels.merge_tl import _merge_kernel
from kvtune.kernels.packed import PackedKeys, PackedValues, decode_attention_reference
from kvtune.kernels.scales_tl import _log_range
from kvtune.kernels.unpack_tl import _raw_shift
from kvtune.quant.codes import TERNARY, slicing

__all__ = ["DecodeConfig", "PackedKeys", "PackedValues", "decode_attention", "decode_attention_reference",
           "default_config"]

LOG2E = 1.4426950408889634


# ints that change from step to step are not specialized (divisibility / == 1 would recompile mid-decode);
# strides keep their divisibility specialization, which the vectorized loads need
@triton.jit(do_not_specialize=["T", "R", "n_qsplits", "NS"])
def _decode_split_kernel(
    q_ptr, stride_qb, stride_qh,
    kp_ptr, stride_kpb, stride_kph, stride_kpt,
    ks_ptr, kz_ptr, stride_ksb, stride_ksh, stride_ksg,
    vp_ptr, stride_vpb, stride_vph, stride_vpt,
    vs_ptr, vz_ptr, stride_vsb, stride_vsh, stride_vst,
    kr_ptr, stride_krh, vr_ptr, stride_vrh,
    ek_ptr, stride_ekb, stride_ekh, stride_ekt,
    ev_ptr, stride_evb, stride_evh, stride_evt,
    emask_ptr, stride_emb, start_ptr, t_ptr, estart_ptr,
    m_ptr, l_ptr, o_ptr,
    T, R, chunk, n_qsplits, NS, Hkv, qk_scale, k_alpha, k_beta, v_alpha, v_beta,
    D: tl.constexpr, NREP: tl.constexpr, QH: tl.constexpr,
    FMT_K: tl.constexpr, SK: tl.constexpr, WK: tl.constexpr, WKP: tl.constexpr, G: tl.constexpr,
    FMT_V: tl.constexpr, SV: tl.constexpr, WV: tl.constexpr, WVP: tl.constexpr, GC: tl.constexpr,
    BT: tl.constexpr, BTE: tl.constexpr, EXTRA: tl.constexpr, HAS_START: tl.constexpr,
    USE_ASM: tl.constexpr, FAST: tl.constexpr, KAX: tl.constexpr, HAS_KZ: tl.constexpr, AFF_K: tl.constexpr,
    HAS_VZ: tl.constexpr, AFF_V: tl.constexpr, T_DEV: tl.constexpr, LOG_K: tl.constexpr, LOG_V: tl.constexpr,
    BEND_K: tl.constexpr, BEND_V: tl.constexpr,
):
    """Partial attention of one (split, batch * kv head).

    q [B, Hq, 1, D]; packed K/V [B, Hkv, T, bytes]; key scale/zero [B, Hkv, T/G, D] (KAX 0) or [B, Hkv, T, 1]
    (KAX 1: per token, G = BT); value scale/zero [B, Hkv, T, D/GC]; every code dequantizes as
    ``scale * (alpha * c + beta) + zero`` (AFF_*: alpha 1, beta 0; HAS_*Z: a zero-point tensor is read); LOG_K /
    LOG_V: per-token scales are uint8 log8 positions over the head's range ``(lo, hi)`` at ``kr_ptr``/``vr_ptr``
    ``[Hkv, 2]`` (KAX 1 keys, GC >= D values); BEND_K / BEND_V: 2-bit codes of a symmetric codebook, ``c`` read as
    ``c + bend * (c >= 2)`` (the fp16 bits of ``bend``; 0: none; bent values enter the MMA as codes, not RAW);
    extra K/V [B, Hkv, R, D]; EXTRA: 0 none, 1 lengths [B] (valid prefix),
    2 mask [B, R], 3 all valid, 4 tokens ``estart[b] <= r < emask[0]`` (device counts); start [B] (tokens
    t < start are padding); T_DEV: the quantized tokens in use are read from ``t_ptr`` [1] (``T`` on the host is
    then the capacity the splits were sized for: one fixed launch for every CUDA-graph step). Writes m, l [B*Hq, NS]
    (base 2) and unnormalised o [B*Hq, NS, D] (fp32) at split ``pid_s``. FAST (2/4/8-bit, full-width
    slices; ternary, whose padded slice lanes keep a column mask): BT tokens a tile as BT/G key-group sub-tiles and
    a hot loop without token masks; otherwise BT == G.
    """
    KG: tl.constexpr = min(BT, G)
    NG: tl.constexpr = BT // KG
    pid_s = tl.program_id(0)
    pid_bh = tl.program_id(1)
    b = pid_bh // Hkv
    h = pid_bh % Hkv
    k_lo, k_step = _log_range(kr_ptr + h * stride_krh, LOG_K)  # log8 scales: once per program
    v_lo, v_step = _log_range(vr_ptr + h * stride_vrh, LOG_V)
    rows = tl.arange(0, QH)
    rmask = rows < NREP
    q_row = q_ptr + b.to(tl.int64) * stride_qb + (h * NREP + rows[:, None]) * stride_qh
    jk = tl.arange(0, WKP)[None, :]
    jv = tl.arange(0, WVP)[None, :]

    # per-token key scales, no bend: key codes enter the MMA raw (1024 + c * 2^shift, no conversion), against query
    # slices scaled by 2^-shift; the products exceed q . c by qoff, 1024 times the row sums of those slices
    RAW_K: tl.constexpr = KAX == 1 and BEND_K == 0
    qs = ()
    qsum = tl.zeros([QH], tl.float32)  # row sums of the scaled query: per-token key zero-points and offsets
    qoff = tl.zeros([QH], tl.float32)
    for s in tl.static_range(SK):
        qe = s * WK + jk
        qv = tl.load(q_row + qe, mask=rmask[:, None] & (jk < WK) & (qe < D), other=0.0)
        qf = qv.to(tl.float32) * qk_scale
        if KAX == 1:
            qsum += tl.sum(qf.to(tl.float16).to(tl.float32), 1)
        if RAW_K:
            qf = qf * (1.0 / (1 << _raw_shift(s, FMT_K)))
            qoff += 1024.0 * tl.sum(qf.to(tl.float16).to(tl.float32), 1)
        qs = qs + (qf.to(tl.float16),)
    kc = k_beta * qsum - k_alpha * qoff  # per-token keys: s_t * (alpha * product + kc) + z_t * qsum
    accs = ()
    for _s in tl.static_range(SV):
        accs = accs + (tl.zeros([QH, WVP], tl.float32),)
    m_i = tl.full([QH], -1.0e30, tl.float32)
    l_acc = tl.zeros([QH, KG], tl.float32)
    z_acc = tl.zeros([QH, KG], tl.float32)
    o_acc = tl.zeros([QH, KG], tl.float32)

    # ---- quantized part: tokens [lo, hi) of this split; tokens t < start are padding
    if T_DEV:
        T = tl.load(t_ptr)
    lo = pid_s * chunk
    hi = tl.minimum(lo + chunk, T)
    hi = tl.where(pid_s < n_qsplits, hi, lo)
    st = 0
    if HAS_START:
        st = tl.load(start_ptr + b)
    skip = tl.maximum(st - lo, 0)
    first = lo + (skip // BT) * BT                  # first tile with a valid token
    full_lo = lo + ((skip + BT - 1) // BT) * BT     # first tile with only valid tokens
    full_hi = lo + ((hi - lo) // BT) * BT           # end of the tiles that end before hi
    kp_row = kp_ptr + b.to(tl.int64) * stride_kpb + h.to(tl.int64) * stride_kph
    vp_row = vp_ptr + b.to(tl.int64) * stride_vpb + h.to(tl.int64) * stride_vph
    ks_row = ks_ptr + b.to(tl.int64) * stride_ksb + h.to(tl.int64) * stride_ksh
    kz_row = kz_ptr + b.to(tl.int64) * stride_ksb + h.to(tl.int64) * stride_ksh
    vs_row = vs_ptr + b.to(tl.int64) * stride_vsb + h.to(tl.int64) * stride_vsh
    vz_row = vz_ptr + b.to(tl.int64) * stride_vsb + h.to(tl.int64) * stride_vsh
    if FAST:
        # at most two partial tiles (head: contains start, tail: contains hi) with masks, then the hot
        # loop over whole tiles without predicates
        tail = tl.maximum(full_hi, full_lo)
        n_head = (first < tl.minimum(full_lo, hi)).to(tl.int32)
        n_masked = n_head + (tail < hi).to(tl.int32)
        for i in tl.range(0, n_masked, num_stages=1):
            t0 = tl.where(i < n_head, first, tail)
            m_i, l_acc, z_acc, o_acc, accs = _tile(t0, hi, st, m_i, l_acc, z_acc, o_acc, accs, qs, qsum, kc, kp_row,
                                                   ks_row, kz_row, vp_row, vs_row, vz_row, stride_kpt, stride_ksg,
                                                   stride_vpt, stride_vst, k_alpha, k_beta, v_alpha, v_beta, k_lo,
                                                   k_step, v_lo, v_step, D, QH, FMT_K, SK, WK, WKP, G, FMT_V, SV, WV,
                                                   WVP, GC, KG, NG, True, USE_ASM, KAX, HAS_KZ, AFF_K, HAS_VZ, AFF_V,
                                                   LOG_K, LOG_V, BEND_K, BEND_V)
        for t0 in range(full_lo, full_hi, BT):
            m_i, l_acc, z_acc, o_acc, accs = _tile(t0, hi, st, m_i, l_acc, z_acc, o_acc, accs, qs, qsum, kc, kp_row,
                                                   ks_row, kz_row, vp_row, vs_row, vz_row, stride_kpt, stride_ksg,
                                                   stride_vpt, stride_vst, k_alpha, k_beta, v_alpha, v_beta, k_lo,
                                                   k_step, v_lo, v_step, D, QH, FMT_K, SK, WK, WKP, G, FMT_V, SV, WV,
                                                   WVP, GC, KG, NG, False, USE_ASM, KAX, HAS_KZ, AFF_K, HAS_VZ, AFF_V,
                                                   LOG_K, LOG_V, BEND_K, BEND_V)
    else:  # other formats: one masked loop (keeps the unrolled code, and the compile time, small)
        for t0 in range(first, hi, BT):
            m_i, l_acc, z_acc, o_acc, accs = _tile(t0, hi, st, m_i, l_acc, z_acc, o_acc, accs, qs, qsum, kc, kp_row,
                                                   ks_row, kz_row, vp_row, vs_row, vz_row, stride_kpt, stride_ksg,
                                                   stride_vpt, stride_vst, k_alpha, k_beta, v_alpha, v_beta, k_lo,
                                                   k_step, v_lo, v_step, D, QH, FMT_K, SK, WK, WKP, G, FMT_V, SV, WV,
                                                   WVP, GC, KG, NG, True, USE_ASM, KAX, HAS_KZ, AFF_K, HAS_VZ, AFF_V,
                                                   LOG_K, LOG_V, BEND_K, BEND_V)
    l_i = tl.sum(l_acc, 1)
    if GC >= D:  # value zero-points, the RAW codes' offset (1024 * sum pv) and scale (2^shift), code affine map
        # (bent codes enter the MMA as codes: no offset, no scale)
        pvsum = tl.sum(o_acc, 1)[:, None]
        zt = tl.sum(z_acc, 1)[:, None]
        added = ()
        for s in tl.static_range(SV):
            a = accs[s]
            if BEND_V == 0:  # RAW codes
                a = (a - 1024.0 * pvsum) * (1.0 / (1 << _raw_shift(s, FMT_V)))
            if not AFF_V:
                a = a * v_alpha + v_beta * pvsum
            added = added + (a + zt,)
        accs = added

    # ---- extra segment (last split only): full-precision K/V, validity by lengths or mask
    if EXTRA != 0:
        r_end = tl.where(pid_s == n_qsplits, R, 0)
        n_valid = R
        r_lo = 0
        if EXTRA == 1:
            n_valid = tl.load(emask_ptr + b)
        if EXTRA == 4:
            n_valid = tl.load(emask_ptr)
            r_lo = tl.load(estart_ptr + b)
        ek_row = ek_ptr + b.to(tl.int64) * stride_ekb + h.to(tl.int64) * stride_ekh
        ev_row = ev_ptr + b.to(tl.int64) * stride_evb + h.to(tl.int64) * stride_evh
        qx = qs  # fp16 keys: the query slices as they were before the 2^-shift of raw codes (a power of two: exact)
        if RAW_K:
            qx = ()
            for s in tl.static_range(SK):
                qx = qx + ((qs[s].to(tl.float32) * (1 << _raw_shift(s, FMT_K))).to(tl.float16),)
        for r0 in tl.range(0, r_end, BTE, num_stages=1):  # short loop: no smem pipeline
            offs_r = r0 + tl.arange(0, BTE)
            valid = (offs_r < R) & (offs_r < n_valid) & (offs_r >= r_lo)
            if EXTRA == 2:
                mk = tl.load(emask_ptr + b.to(tl.int64) * stride_emb + offs_r, mask=offs_r < R, other=0)
                valid = valid & (mk != 0)
            scores = tl.zeros([QH, BTE], tl.float32)
            for s in tl.static_range(SK):
                ke = s * WK + jk
                kcm = valid[:, None] & (jk < WK) & (ke < D)
                kd = tl.load(ek_row + offs_r[:, None] * stride_ekt + ke, mask=kcm, other=0.0).to(tl.float16)
                scores = tl.dot(qx[s], tl.trans(kd), scores)
            p, alpha, m_i, l_i = _softmax_step(scores, valid, m_i, l_i)
            p16 = p.to(tl.float16)
            new = ()
            for s in tl.static_range(SV):
                ve = s * WV + jv
                vcm = valid[:, None] & (jv < WV) & (ve < D)
                vd = tl.load(ev_row + offs_r[:, None] * stride_evt + ve, mask=vcm, other=0.0).to(tl.float16)
                new = new + (tl.dot(p16, vd, accs[s] * alpha[:, None]),)
            accs = new

    # ---- partial results of the n_rep real rows
    hq = (b * Hkv + h) * NREP + rows
    tl.store(m_ptr + hq * NS + pid_s, m_i, mask=rmask)
    tl.store(l_ptr + hq * NS + pid_s, l_i, mask=rmask)
    o_row = o_ptr + (hq[:, None].to(tl.int64) * NS + pid_s) * D
    for s in tl.static_range(SV):
        oe = s * WV + jv
        tl.store(o_row + oe, accs[s], mask=rmask[:, None] & (jv < WV) & (oe < D))


@lru_cache(maxsize=256)
def _static_args(kq: tuple, vq: tuple, d: int, n_rep: int,
                 use_asm: bool) -> tuple[Any, Any, int, bool, dict[str, Any]]:
    """What a launch derives from the operands' formats alone (``_format`` tuples), once per format: the key and
    value slicing, the value channel group, the fast-path flag and the constexpr arguments. Raises ValueError for
    formats the kernel lacks."""
    (kbits, kgroup, kaxis, kzero, kaff, klog, kbend), (vbits, vgroup, _, vzero, vaff, vlog, vbend) = kq, vq
    if kaxis == "channel" and (kgroup < 16 or kgroup & (kgroup - 1)):
        raise ValueError(f"key group must be a power of two >= 16, got {kgroup}")
    lk, lv = slicing(kbits, d), slicing(vbits, d)
    gc = min(vgroup or d, d)
    if (klog and kaxis != "token") or (vlog and gc < d):
        raise ValueError("log8 scales need per-token scales: keys axis='token', values one channel group")
    fast = _fast_path(lk, d) and _fast_path(lv, d)
    consts = {"D": d, "NREP": n_rep, "G": kgroup, "GC": gc, "USE_ASM": use_asm,
              "FMT_K": lk.fmt, "SK": lk.slices, "WK": lk.width, "WKP": max(16, _p2(lk.width)),
              "FMT_V": lv.fmt, "SV": lv.slices, "WV": lv.width, "WVP": max(16, _p2(lv.width)), "FAST": fast,
              "KAX": int(kaxis == "token"), "HAS_KZ": kzero, "AFF_K": kaff, "HAS_VZ": vzero, "AFF_V": vaff,
              "LOG_K": klog, "LOG_V": vlog, "BEND_K": kbend, "BEND_V": vbend}
    return lk, lv, gc, fast, consts


def _format(x: Any) -> tuple:
    """The launch-relevant format of a :class:`PackedKeys` / :class:`PackedValues` (hashable)."""
    return (x.bits, x.group, getattr(x, "axis", "token"), x.zero is not None, x.affine, x.scale_range is not None,
            _half_bits(x.code_bend))


@lru_cache(maxsize=64)
def _half_bits(x: float) -> int:
    """The fp16 bit pattern of ``x`` (0 for 0.0): a code bend as the kernel's constexpr."""
    return int(torch.tensor(x, dtype=torch.float16).view(torch.int16)) & 0xFFFF if x else 0


def _range_arg(x: PackedKeys | PackedValues, stand_in: torch.Tensor) -> tuple[torch.Tensor, int]:
    """(range, head stride) of log8 scales (``scale_range`` float ``[Hkv, 2]``, checked by the operand), or a
    stand-in (never read)."""
    if x.scale_range is None:
        return stand_in, 0
    r = kernel_arg(x.scale_range)
    return r, r.stride(0)


def decode_attention(q: torch.Tensor, kq: PackedKeys, vq: PackedValues,
                     extra_k: torch.Tensor | None = None, extra_v: torch.Tensor | None = None,
                     extra_len: torch.Tensor | None = None, start: torch.Tensor | None = None,
                     scaling: float | None = None, config: DecodeConfig | None = None, *,
                     t_dev: torch.Tensor | None = None, extra_count: torch.Tensor | None = None,
                     extra_start: torch.Tensor | None = None, out_rot: torch.Tensor | None = None,
                     out_mean: torch.Tensor | None = None,
                     launch: Callable[[Any], Any] | None = None) -> torch.Tensor:
    """Decode attention of one query token over packed K/V plus a full-precision extra segment.

    q: ``[B, Hq, 1, D]`` fp16/bf16 (Hq = Hkv * n_rep, query heads ``h*n_rep..`` share KV head ``h``);
    kq/vq: :class:`PackedKeys` / :class:`PackedValues` with ``T`` tokens (T may be 0); per-token scales may be
    one-byte log8 positions (``scale_range`` float ``[Hkv, 2]`` set, on the scales' device);
    extra_k/extra_v: ``[B, Hkv, R, D]`` or None; extra_len: int ``[B]`` (first extra_len[b] extra tokens
    valid), bool ``[B, R]`` validity mask, or None (all valid); start: int ``[B]`` (quantized tokens
    ``t < start[b]`` are left padding) or None; scaling: softmax scale (default ``1/sqrt(D)``).
    Device-side lengths for one fixed launch (CUDA graphs): ``t_dev`` int32 ``[1]`` quantized tokens in use (the
    packed tensors are then a capacity), ``extra_count`` int32 ``[1]`` and ``extra_start`` int32 ``[B]``: extra
    tokens ``extra_start[b] <= r < extra_count`` are valid. The output leaves the values' code frame in the merge:
    ``out @ out_rot + out_mean[h]`` (``out_rot`` ``[D, D]`` float, the inverse rotation; ``out_mean`` ``[Hkv, D]``,
    the value mean; None: not applied). ``launch`` wraps each kernel before its grid is applied
    (``torch.library.wrap_triton`` inside a ``triton_op``). Returns ``[B, Hq, 1, D]`` in q's dtype.
    """
    # q: [B, Hq, 1, D]
    bsz, hq, one, d = q.shape
    _, hkv, t, _ = kq.packed.shape
    per_token = kq.axis == "token"
    if one != 1 or hq % hkv or kq.scale.shape[-1] != (1 if per_token else d):
        raise ValueError(f"q must be [B, Hkv*n_rep, 1, D] matching keys; got q {tuple(q.shape)}, "
                         f"keys {tuple(kq.scale.shape)}")
    lk, lv, gc, fast, consts = _static_args(_format(kq), _format(vq), d, hq // hkv, use_asm(q))
    if kq.packed.shape[-1] != lk.row_bytes:
        raise ValueError(f"packed keys have {kq.packed.shape[-1]} bytes a row, expected {lk.row_bytes}")
    if vq.packed.shape[-1] != lv.row_bytes:
        raise ValueError(f"packed values have {vq.packed.shape[-1]} bytes a row, expected {lv.row_bytes}")
    if vq.scale.shape[-1] != math.ceil(d / gc):
        raise ValueError(f"value scale has {vq.scale.shape[-1]} groups, expected {math.ceil(d / gc)}")
    scaling = 1.0 / math.sqrt(d) if scaling is None else float(scaling)
    cfg = config or default_config(bsz, hkv, t, d, q.device, lv.width, vq.bits)
    block_t = cfg.block_t if fast or per_token else min(cfg.block_t, kq.group)
    if per_token:  # per-token key scales: a tile is one "group"
        consts = {**consts, "G": block_t}
    chunk = math.ceil(math.ceil(max(t, 1) / cfg.num_splits) / block_t) * block_t
    n_q = math.ceil(t / chunk) if t else 0
    ek, ev, emask, stride_emb, r, mode = extra_args(extra_k, extra_v, extra_len, q, extra_count)
    ns = n_q + (1 if mode else 0)
    out = torch.empty_like(q)
    if ns == 0:  # nothing to attend: the empty sum, out of the value frame
        out.zero_()
        return out if out_mean is None else out + out_mean.to(out.dtype).repeat_interleave(hq // hkv, 0)[:, None]
    kp, ks, kz = (kernel_arg(x) for x in (kq.packed, kq.scale, kq.scale if kq.zero is None else kq.zero))
    vp, vs, vz = (kernel_arg(x) for x in (vq.packed, vq.scale, vq.scale if vq.zero is None else vq.zero))
    if ks.stride() != kz.stride():
        ks, kz = ks.contiguous(), kz.contiguous()
    if vs.stride() != vz.stride():
        vs, vz = vs.contiguous(), vz.contiguous()
    ek, ev, qc = kernel_arg(ek), kernel_arg(ev), kernel_arg(q)
    m = torch.empty(bsz * hq, ns, dtype=torch.float32, device=q.device)
    lse = torch.empty_like(m)
    o = torch.empty(bsz * hq, ns, d, dtype=torch.float32, device=q.device)
    st = start.to(device=q.device, dtype=torch.int32) if start is not None else m
    (kr, skr), (vr, svr) = _range_arg(kq, m), _range_arg(vq, m)
    wrap = launch or (lambda k: k)
    wrap(_decode_split_kernel)[(ns, bsz * hkv)](
        qc, *qc.stride()[:2], kp, *kp.stride()[:3], ks, kz, *ks.stride()[:3],
        vp, *vp.stride()[:3], vs, vz, *vs.stride()[:3], kr, skr, vr, svr, ek, *ek.stride()[:3], ev, *ev.stride()[:3],
        emask, stride_emb, st, t_dev if t_dev is not None else m, extra_start if extra_start is not None else m,
        m, lse, o,
        t, r, chunk, n_q, ns, hkv, scaling * LOG2E, kq.code_scale, kq.code_offset, vq.code_scale, vq.code_offset,
        BT=block_t, BTE=min(64, max(16, _p2(r))), EXTRA=mode, HAS_START=start is not None, T_DEV=t_dev is not None,
        QH=cfg.rows(hq // hkv), **cfg.launch_options(), **consts,
    )
    rot = out_rot.contiguous() if out_rot is not None else o
    mean = out_mean.contiguous() if out_mean is not None else o
    wrap(_merge_kernel)[(bsz * hq,)](m, lse, o, out, out.stride(0), out.stride(1), hq, ns, rot, mean, hq // hkv,
                                     D=d, DP=_p2(d), BS=min(16, _p2(ns)), ROT=out_rot is not None,
                                     CEN=out_mean is not None, num_warps=4)
    return out


def _fast_path(lay: Any, d: int) -> bool:
    """2/4/8-bit codes whose slices are full power-of-two widths >= 16 (e.g. D = 64, 128 at 2/4 bits), and
    ternary codes at any D: their slices (ceil(D / 5) channels, padded to WKP / WVP lanes) keep a column mask
    in the hot loop, not a token mask."""
    if lay.fmt == TERNARY:
        return True
    return lay.fmt in (2, 4, 8) and lay.width >= 16 and lay.width == _p2(lay.width) and lay.slices * lay.width == d

