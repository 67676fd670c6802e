"""Triton device functions of one decode tile: key scores, online softmax, value accumulation.

Called by :func:`kvtune.kernels.decode_attention._decode_split_kernel`; each works on ``QH`` query rows
(the query heads of one KV head, padded to 8 or more: :meth:`DecodeConfig.rows`) against ``BT`` packed tokens, one
channel slice at a time.
"""

from __future__ import annotations

import triton
import triton.language as tl

from kvtune.kernels.scales_tl import _token_scales
from kvtune.kernels.unpack_tl import _bend_f16, _load_packed, _slice_f16, _trit_carry, _trit_f16


@triton.jit
def _key_scores(qs, qsum, kc, kp_row, ks_row, kz_row, tg, hi, st, stride_kpt, stride_ksg, k_alpha, k_beta, k_lo,
                k_step, D: tl.constexpr, QH: tl.constexpr, FMT_K: tl.constexpr, SK: tl.constexpr, WK: tl.constexpr,
                WKP: tl.constexpr, G: tl.constexpr, KG: tl.constexpr, MASKED: tl.constexpr,
                USE_ASM: tl.constexpr, KAX: tl.constexpr, HAS_KZ: tl.constexpr, AFF_K: tl.constexpr,
                LOG_K: tl.constexpr, BEND_K: tl.constexpr):
    """Scores ``[QH, KG]`` of the KG tokens from ``tg``.

    KAX 0 (per-channel groups): the tokens are one key group, one scale row per slice, dequantized in registers.
    KAX 1 (per-token scale): raw code products, then ``s_t * (alpha * (q . c) + beta * sum(q)) + z_t * sum(q)``
    (``qsum`` ``[QH]``: the row sums of the scaled query; codes without a bend enter the MMA as they come out of
    the unpack, ``1024 + c * 2^shift``, against query slices scaled by ``2^-shift``, so that ``q . c`` is the
    product less ``qoff``, ``1024`` times the row sums of those slices; ``kc`` ``[QH]`` is
    ``beta * qsum - alpha * qoff``, or ``beta * qsum`` for converted codes); LOG_K: ``s_t`` from uint8 log8
    positions over the head's ``(k_lo, k_step)``; BEND_K: the fp16 bits of the bend of 2-bit codes of a symmetric
    codebook, read as ``c + bend * (c >= 2)``). MASKED: tokens outside ``[st, hi)`` get -inf (head/tail tiles);
    unmasked tiles load without predicates.
    """
    offs = tg + tl.arange(0, KG)
    j = tl.arange(0, WKP)[None, :]
    cmask = j < WK
    tm = (offs < hi) & (offs >= st)
    if MASKED:
        x0, x1, x2 = _load_packed(kp_row + offs[:, None] * stride_kpt + j, tm[:, None] & cmask, FMT_K, WK)
        grow = (tl.minimum(tg, hi - 1) // G) * stride_ksg
    elif WKP == WK:
        x0, x1, x2 = _load_packed(kp_row + offs[:, None] * stride_kpt + j, None, FMT_K, WK, False)
        grow = (tg // G) * stride_ksg
    else:
        x0, x1, x2 = _load_packed(kp_row + offs[:, None] * stride_kpt + j, cmask, FMT_K, WK)
        grow = (tg // G) * stride_ksg
    RAW: tl.constexpr = KAX == 1 and BEND_K == 0  # as the kernel's RAW_K
    scores = tl.zeros([QH, KG], tl.float32)
    if FMT_K == 0:  # ternary: digits in slice order, each from the previous one's quotient
        tq = _trit_carry(x0, USE_ASM)
    for s in tl.static_range(SK):
        if FMT_K == 0:
            c, tq = _trit_f16(tq, s, RAW, USE_ASM)
        else:
            c = _bend_f16(_slice_f16(x0, x1, x2, s, FMT_K, RAW, USE_ASM), BEND_K, USE_ASM)  # [KG, WKP] fp16
        if KAX == 1:
            scores = tl.dot(qs[s], tl.trans(c), scores)
        else:
            e = s * WK + j
            zr = tl.zeros([1, WKP], tl.float16)
            if WKP == WK and SK * WK == D:
                sc = tl.load(ks_row + grow + e)                                  # [1, WKP] fp16
                if HAS_KZ:
                    zr = tl.load(kz_row + grow + e)
            else:
                sc = tl.load(ks_row + grow + e, mask=cmask & (e < D), other=0.0)
                if HAS_KZ:
                    zr = tl.load(kz_row + grow + e, mask=cmask & (e < D), other=0.0)
            if not AFF_K:  # scale * (alpha * c + beta) + zero == c * (alpha * scale) + (beta * scale + zero)
                zr = (zr.to(tl.float32) + k_beta * sc.to(tl.float32)).to(tl.float16)
                sc = (sc.to(tl.float32) * k_alpha).to(tl.float16)
            kd = c * sc + zr                                                    # [KG, WKP] fp16
            scores = tl.dot(qs[s], tl.trans(kd), scores)
    if KAX == 1:  # s_t * (alpha * raw + kc), kc = beta * sum(q) - alpha * qoff a row: an FMA and a product a score
        sk = _token_scales(ks_row + offs * stride_ksg, tm, k_lo, k_step, LOG_K, MASKED)
        scores = (scores * k_alpha + kc[:, None]) * sk[None, :]
        if HAS_KZ:
            if MASKED:
                zk = tl.load(kz_row + offs * stride_ksg, mask=tm, other=0.0).to(tl.float32)
            else:
                zk = tl.load(kz_row + offs * stride_ksg).to(tl.float32)
            scores += zk[None, :] * qsum[:, None]
    if MASKED:
        scores = tl.where(tm[None, :], scores, float("-inf"))
    return scores


@triton.jit
def _value_update(accs, z_acc, o_acc, p, vp_row, vs_row, vz_row, tg, hi, st, stride_vpt, stride_vst, v_alpha, v_beta,
                  v_lo, v_step, D: tl.constexpr, FMT_V: tl.constexpr, SV: tl.constexpr, WV: tl.constexpr,
                  WVP: tl.constexpr, GC: tl.constexpr, KG: tl.constexpr, MASKED: tl.constexpr,
                  USE_ASM: tl.constexpr, HAS_VZ: tl.constexpr, AFF_V: tl.constexpr, LOG_V: tl.constexpr,
                  BEND_V: tl.constexpr):
    """acc_s += P @ V_s over the KG tokens from ``tg``, for every value slice.

    One channel group (GC >= D): the per-token scale is folded into P and the zero-point term
    ``P * zero`` goes to ``z_acc`` ``[QH, KG]`` (reduced once at the end), so the codes go to the
    tensor cores as they come out of the unpack (``1024 + c``, the offset also leaves through ``o_acc``, and
    ``code_scale``/``code_offset`` apply once at the end; LOG_V: the scale from a uint8 log8 position over the
    head's ``(v_lo, v_step)``; BEND_V: the fp16 bits of a bend, codes read as ``c + bend * (c >= 2)`` enter the MMA
    as they are, not RAW). Otherwise V is dequantized in registers (per-token
    column of scales when a slice lies in one channel group, else a gathered tile).
    """
    RAW: tl.constexpr = GC >= D and BEND_V == 0
    offs_t = tg + tl.arange(0, KG)
    jv = tl.arange(0, WVP)[None, :]
    cmask = jv < WV
    ptrs = vp_row + offs_t[:, None] * stride_vpt + jv
    tmask = (offs_t < hi) & (offs_t >= st)
    if MASKED:
        x0, x1, x2 = _load_packed(ptrs, tmask[:, None] & cmask, FMT_V, WV)
    elif WVP == WV:
        x0, x1, x2 = _load_packed(ptrs, None, FMT_V, WV, False)
    else:
        x0, x1, x2 = _load_packed(ptrs, cmask, FMT_V, WV)
    if GC >= D:
        vs = _token_scales(vs_row + offs_t * stride_vst, tmask, v_lo, v_step, LOG_V, MASKED)
        if HAS_VZ:
            if MASKED:
                vz = tl.load(vz_row + offs_t * stride_vst, mask=tmask, other=0.0).to(tl.float32)
            else:
                vz = tl.load(vz_row + offs_t * stride_vst).to(tl.float32)
            z_acc += p * vz[None, :]
        pv = (p * vs[None, :]).to(tl.float16)
        o_acc += pv.to(tl.float32)  # RAW codes enter the MMA as 1024 + c * 2^shift: 1024 * sum(pv) leaves later
    else:
        p16 = p.to(tl.float16)
    new = ()
    if FMT_V == 0:
        tq = _trit_carry(x0, USE_ASM)
    for s in tl.static_range(SV):
        if FMT_V == 0:
            c, tq = _trit_f16(tq, s, RAW, USE_ASM)
        else:
            c = _bend_f16(_slice_f16(x0, x1, x2, s, FMT_V, RAW, USE_ASM), BEND_V, USE_ASM)  # [KG, WVP] fp16
        if GC >= D:
            acc = tl.dot(pv, c, accs[s])
        else:
            if GC % WV == 0:  # the slice lies in one channel group: a per-token column
                col = offs_t[:, None] * stride_vst + (s * WV) // GC
                cm = tmask[:, None]
            else:
                col = offs_t[:, None] * stride_vst + (s * WV + jv) // GC
                cm = cmask & (s * WV + jv < D)
                if MASKED:
                    cm = cm & tmask[:, None]
            if MASKED or GC % WV != 0:
                sc = tl.load(vs_row + col, mask=cm, other=0.0)
            else:
                sc = tl.load(vs_row + col)
            zr = tl.zeros_like(sc)
            if HAS_VZ:
                if MASKED or GC % WV != 0:
                    zr = tl.load(vz_row + col, mask=cm, other=0.0)
                else:
                    zr = tl.load(vz_row + col)
            if not AFF_V:
                zr = (zr.to(tl.float32) + v_beta * sc.to(tl.float32)).to(tl.float16)
                sc = (sc.to(tl.float32) * v_alpha).to(tl.float16)
            acc = tl.dot(p16, c * sc + zr, accs[s])
        new = new + (acc,)
    return new, z_acc, o_acc


@triton.jit
def _tile(t0, hi, st, m_i, l_acc, z_acc, o_acc, accs, qs, qsum, kc, kp_row, ks_row, kz_row, vp_row, vs_row, vz_row,
          stride_kpt, stride_ksg, stride_vpt, stride_vst, k_alpha, k_beta, v_alpha, v_beta, k_lo, k_step, v_lo, v_step,
          D: tl.constexpr, QH: tl.constexpr, FMT_K: tl.constexpr, SK: tl.constexpr, WK: tl.constexpr,
          WKP: tl.constexpr, G: tl.constexpr, FMT_V: tl.constexpr, SV: tl.constexpr, WV: tl.constexpr,
          WVP: tl.constexpr, GC: tl.constexpr, KG: tl.constexpr, NG: tl.constexpr, MASKED: tl.constexpr,
          USE_ASM: tl.constexpr, KAX: tl.constexpr, HAS_KZ: tl.constexpr, AFF_K: tl.constexpr,
          HAS_VZ: tl.constexpr, AFF_V: tl.constexpr, LOG_K: tl.constexpr, LOG_V: tl.constexpr,
          BEND_K: tl.constexpr, BEND_V: tl.constexpr):
    """One tile of NG * KG tokens: NG key-group sub-tiles, a single online-softmax rescale.

    Row sums (``l_acc``) and zero-point terms (``z_acc``) stay elementwise ``[QH, KG]`` tiles, so the
    only cross-thread reduction per tile is the row max.
    """
    scores = ()
    for g in tl.static_range(NG):
        scores = scores + (_key_scores(qs, qsum, kc, kp_row, ks_row, kz_row, t0 + g * KG, hi, st, stride_kpt,
                                       stride_ksg, k_alpha, k_beta, k_lo, k_step, D, QH, FMT_K, SK, WK, WKP, G, KG,
                                       MASKED, USE_ASM, KAX, HAS_KZ, AFF_K, LOG_K, BEND_K),)
    smax = scores[0]
    for g in tl.static_range(1, NG):
        smax = tl.maximum(smax, scores[g])
    m_new = tl.maximum(m_i, tl.max(smax, 1))
    alpha = tl.math.exp2(m_i - m_new)
    l_acc = l_acc * alpha[:, None]
    z_acc = z_acc * alpha[:, None]
    o_acc = o_acc * alpha[:, None]
    scaled = ()
    for s in tl.static_range(SV):
        scaled = scaled + (accs[s] * alpha[:, None],)
    accs = scaled
    for g in tl.static_range(NG):
        p = tl.math.exp2(scores[g] - m_new[:, None])
        l_acc += p
        accs, z_acc, o_acc = _value_update(accs, z_acc, o_acc, p, vp_row, vs_row, vz_row, t0 + g * KG, hi, st,
                                           stride_vpt, stride_vst, v_alpha, v_beta, v_lo, v_step, D, FMT_V, SV, WV,
                                           WVP, GC, KG, MASKED, USE_ASM, HAS_VZ, AFF_V, LOG_V, BEND_V)
    return m_new, l_acc, z_acc, o_acc, accs


@triton.jit
def _softmax_step(scores, valid, m_i, l_i):
    """Online softmax (base 2) over one tile: returns (p, alpha, m_new, l_new)."""
    scores = tl.where(valid[None, :], scores, float("-inf"))
    m_new = tl.maximum(m_i, tl.max(scores, 1))
    alpha = tl.math.exp2(m_i - m_new)
    p = tl.math.exp2(scores - m_new[:, None])
    return p, alpha, m_new, l_i * alpha + tl.sum(p, 1)

