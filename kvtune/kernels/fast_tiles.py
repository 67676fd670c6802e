"""Triton device functions of the swapped decode kernel (:mod:`kvtune.kernels.decode_fast`).

Codes of 2, 4 or 8 bits (``S = 8 / bits`` slots a byte, strided layout of :mod:`kvtune.quant.codes`) are unpacked
for a whole token row at once: every slot of a ``[BT, RB]`` byte tile becomes ``2^(10 - shift) + c`` in fp16
(one LOP3 per two codes: the code's bits stay where they are and an exponent is OR-ed above them, so the
mantissa unit is 1), and the slots are interleaved with ``tl.join`` into one ``[BT, D]`` tile whose column
``p`` holds channel ``perm(p)``. The query, the key scales and zero-points are gathered in the same order,
so the codes enter the tensor cores raw; only the output is put back in channel order (once per program).
"""

from __future__ import annotations

import triton
import triton.language as tl


@triton.jit
def _offset(e, RB: tl.constexpr, BITS: tl.constexpr):
    """``2^(10 - shift)`` (fp32): what the raw unpacked code of channel ``e`` (slot ``e // RB``) carries on top."""
    return tl.math.exp2((10 - (e // RB) * BITS).to(tl.float32))


@triton.jit
def _slot_raw(x, SHIFT: tl.constexpr, BITS: tl.constexpr, USE_ASM: tl.constexpr):
    """``2^(10 - SHIFT) + c`` (fp16, exact) for the code in bits ``[SHIFT, SHIFT + BITS)`` of each uint8 of ``x``.

    PTX per 4 bytes: two PRMTs spread the bytes under zero high bytes (shared by all slots of the word), one
    LOP3 per half2 keeps the slot's bits and ORs the exponent ``25 - SHIFT`` above them."""
    if USE_ASM:
        return tl.inline_asm_elementwise(
            asm=f"""{{
            .reg .b32 z, p0, p1;
            mov.b32 z, 0;
            prmt.b32 p0, $2, z, 0x4140;
            prmt.b32 p1, $2, z, 0x4342;
            lop3.b32 $0, p0, {((1 << BITS) - 1) * (1 << SHIFT) * 0x10001}, {((25 - SHIFT) << 10) * 0x10001}, 0xEA;
            lop3.b32 $1, p1, {((1 << BITS) - 1) * (1 << SHIFT) * 0x10001}, {((25 - SHIFT) << 10) * 0x10001}, 0xEA;
            }}""",
            constraints="=r,=r,r", args=[x], dtype=tl.float16, is_pure=True, pack=4)
    return ((x >> SHIFT) & ((1 << BITS) - 1)).to(tl.float16) + (1 << (10 - SHIFT))


@triton.jit
def _unpack_rows(x, BT: tl.constexpr, D: tl.constexpr, BITS: tl.constexpr, USE_ASM: tl.constexpr):
    """uint8 ``[BT, RB]`` (token rows) -> fp16 ``[BT, D]`` raw codes in channel order (``e = slot * RB + j``)."""
    if BITS == 8:
        return _slot_raw(x, 0, 8, USE_ASM)
    elif BITS == 4:
        c = tl.join(_slot_raw(x, 0, 4, USE_ASM), _slot_raw(x, 4, 4, USE_ASM))           # [BT, RB, s]
        return tl.reshape(tl.permute(c, (0, 2, 1)), (BT, D))
    else:
        c = tl.join(tl.join(_slot_raw(x, 0, 2, USE_ASM), _slot_raw(x, 2, 2, USE_ASM)),
                    tl.join(_slot_raw(x, 4, 2, USE_ASM), _slot_raw(x, 6, 2, USE_ASM)))  # [BT, RB, i, u]: s = 2u + i
        return tl.reshape(tl.permute(c, (0, 3, 2, 1)), (BT, D))


@triton.jit
def _unpack_cols(x, BT: tl.constexpr, D: tl.constexpr, BITS: tl.constexpr, USE_ASM: tl.constexpr):
    """uint8 ``[RB, BT]`` (a token tile loaded transposed) -> fp16 ``[D, BT]`` raw codes, rows in channel order."""
    if BITS == 8:
        return _slot_raw(x, 0, 8, USE_ASM)
    elif BITS == 4:
        c = tl.join(_slot_raw(x, 0, 4, USE_ASM), _slot_raw(x, 4, 4, USE_ASM))           # [RB, BT, s]
        return tl.reshape(tl.permute(c, (2, 0, 1)), (D, BT))
    else:
        c = tl.join(tl.join(_slot_raw(x, 0, 2, USE_ASM), _slot_raw(x, 2, 2, USE_ASM)),
                    tl.join(_slot_raw(x, 4, 2, USE_ASM), _slot_raw(x, 6, 2, USE_ASM)))  # [RB, BT, i, u]
        return tl.reshape(tl.permute(c, (3, 2, 0, 1)), (D, BT))


@triton.jit
def _key_group_query(qT, ks_row, kz_row, grow, e, offk, k_alpha, k_beta,
                     HAS_KZ: tl.constexpr, AFF_K: tl.constexpr):
    """Per-channel key group ``grow``: ``(q ⊙ s)^T`` fp16 ``[D, N]`` and the bias ``[N]`` every score of the group
    gets: ``q . z - sum_p (q ⊙ s)_p * offset_p`` (the raw codes' offset, taken off with the same fp16 operand)."""
    sc = tl.load(ks_row + grow + e).to(tl.float32)  # [D]
    zr = tl.zeros_like(sc)
    if HAS_KZ:
        zr = tl.load(kz_row + grow + e).to(tl.float32)
    if not AFF_K:  # scale * (alpha * c + beta) + zero == (alpha * scale) * c + (beta * scale + zero)
        zr = zr + k_beta * sc
        sc = sc * k_alpha
    qg = (qT * sc[:, None]).to(tl.float16)
    bias = tl.sum(qT * zr[:, None] - qg.to(tl.float32) * offk[:, None], 0)
    return qg, bias


@triton.jit
def _tile(t0, hi, st, m_i, l_acc, o_acc, z_acc, accT, qg, bias, offsum, qsum, kp_row, ks_row, kz_row, vp_row, vs_row,
          vz_row, stride_kpt, stride_ksg, stride_vpt, stride_vst, k_alpha, k_beta,
          D: tl.constexpr, BT: tl.constexpr, BITS_K: tl.constexpr, BITS_V: tl.constexpr, KAX: tl.constexpr,
          HAS_KZ: tl.constexpr, HAS_VZ: tl.constexpr, MASKED: tl.constexpr, USE_ASM: tl.constexpr):
    """One tile of ``BT`` quantized tokens from ``t0``: scores ``[BT, N]`` (tokens fill the MMA's M), online
    softmax per query column, ``accT [D, N] += V^T (p * s_v)``. Row sums, ``sum p * s_v`` (the value codes'
    offset and code map, applied once at the end) and ``sum p * z_v`` stay elementwise ``[BT, N]``."""
    offs = t0 + tl.arange(0, BT)
    valid = (offs < hi) & (offs >= st)
    jk = tl.arange(0, D * BITS_K // 8)[None, :]
    jv = tl.arange(0, D * BITS_V // 8)[:, None]
    if MASKED:
        kb = tl.load(kp_row + offs[:, None] * stride_kpt + jk, mask=valid[:, None], other=0)
    else:
        kb = tl.load(kp_row + offs[:, None] * stride_kpt + jk)
    kc = _unpack_rows(kb, BT, D, BITS_K, USE_ASM)                                # [BT, D] fp16
    s = tl.dot(kc, qg)                                                          # [BT, N] fp32
    if KAX == 1:  # per-token key scale (and zero): s_t * (alpha * (q . c) + beta * sum q) + z_t * sum q
        if MASKED:
            sk = tl.load(ks_row + offs * stride_ksg, mask=valid, other=0.0).to(tl.float32)
        else:
            sk = tl.load(ks_row + offs * stride_ksg).to(tl.float32)
        s = sk[:, None] * (k_alpha * (s - offsum[None, :]) + k_beta * qsum[None, :])
        if HAS_KZ:
            if MASKED:
                zk = tl.load(kz_row + offs * stride_ksg, mask=valid, other=0.0).to(tl.float32)
            else:
                zk = tl.load(kz_row + offs * stride_ksg).to(tl.float32)
            s += zk[:, None] * qsum[None, :]
    else:
        s = s + bias[None, :]
    if MASKED:
        s = tl.where(valid[:, None], s, float("-inf"))
    m_new = tl.maximum(m_i, tl.max(s, 0))
    alpha = tl.math.exp2(m_i - m_new)
    p = tl.math.exp2(s - m_new[None, :])                                       # [BT, N]
    if MASKED:
        vsc = tl.load(vs_row + offs * stride_vst, mask=valid, other=0.0).to(tl.float32)
        vb = tl.load(vp_row + offs[None, :] * stride_vpt + jv, mask=valid[None, :], other=0)  # [RB, BT]
    else:
        vsc = tl.load(vs_row + offs * stride_vst).to(tl.float32)
        vb = tl.load(vp_row + offs[None, :] * stride_vpt + jv)
    pv = (p * vsc[:, None]).to(tl.float16)
    l_acc = l_acc * alpha[None, :] + p
    o_acc = o_acc * alpha[None, :] + pv.to(tl.float32)
    if HAS_VZ:
        if MASKED:
            vzt = tl.load(vz_row + offs * stride_vst, mask=valid, other=0.0).to(tl.float32)
        else:
            vzt = tl.load(vz_row + offs * stride_vst).to(tl.float32)
        z_acc = z_acc * alpha[None, :] + p * vzt[:, None]
    vcT = _unpack_cols(vb, BT, D, BITS_V, USE_ASM)                              # [D, BT] fp16
    accT = tl.dot(vcT, pv, accT * alpha[None, :])                               # [D, N]
    return m_new, l_acc, o_acc, z_acc, accT
