"""Triton helpers that unpack bit-packed codes in registers (layout of :mod:`kvtune.quant.codes`).

A byte row holds ``slices`` channel slices of width ``W``: slot ``s`` of every byte is the contiguous
channel slice ``[s*W, (s+1)*W)``, so one shift + mask yields a slice as fp16 codes. 3-bit codes are a
2-bit and a 1-bit plane; ternary (1.58-bit) packs 5 trits a byte (walked digit by digit with
:func:`_trit_carry` / :func:`_trit_f16`). :func:`_bend_f16` maps 2-bit codes onto a symmetric non-uniform codebook
(Lloyd-Max) in code units.
"""

from __future__ import annotations

import triton
import triton.language as tl


@triton.jit
def _bytes_f16(x, RAW: tl.constexpr, USE_ASM: tl.constexpr):
    """uint8 -> fp16 ``x`` (``1024 + x`` when RAW). PTX: bytes under a 0x64 high byte are 1024 + x, no I2F."""
    if USE_ASM:
        if RAW:
            return tl.inline_asm_elementwise(
                asm="""{
                .reg .b32 m;
                mov.b32 m, 0x64646464;
                prmt.b32 $0, $2, m, 0x4140;
                prmt.b32 $1, $2, m, 0x4342;
                }""",
                constraints="=r,=r,r", args=[x], dtype=tl.float16, is_pure=True, pack=4)
        return tl.inline_asm_elementwise(
            asm="""{
            .reg .b32 m, k;
            mov.b32 m, 0x64646464;
            mov.b32 k, 0x64006400;
            prmt.b32 $0, $2, m, 0x4140;
            prmt.b32 $1, $2, m, 0x4342;
            sub.f16x2 $0, $0, k;
            sub.f16x2 $1, $1, k;
            }""",
            constraints="=r,=r,r", args=[x], dtype=tl.float16, is_pure=True, pack=4)
    if RAW:
        return x.to(tl.float16) + 1024.0
    return x.to(tl.float16)


@triton.jit
def _slot_f16(x, SHIFT: tl.constexpr, BITS: tl.constexpr, RAW: tl.constexpr, USE_ASM: tl.constexpr):
    """fp16 value of bits [SHIFT, SHIFT + BITS) of every byte of uint8 ``x``: the code ``c``, or when RAW
    ``1024 + c * 2^SHIFT`` (the caller removes offset and scale once per program).

    PTX per 32-bit word of 4 bytes: two PRMTs spread the bytes under zero high bytes (shared by all
    slots of the word); per slot, LOP3 ``(w & mask << SHIFT) | 0x6400`` makes ``1024 + c * 2^SHIFT``
    halves, and (unless RAW) one fma ``* 2^-SHIFT - 2^(10 - SHIFT)`` gives ``c`` exactly: ~1.1
    instructions a code, no I2F conversion.
    """
    if USE_ASM:
        if RAW:
            return tl.inline_asm_elementwise(
                asm=f"""{{
                .reg .b32 z, p0, p1;
                mov.b32 z, 0;
                prmt.b32 p0, $2, z, 0x4140;
                prmt.b32 p1, $2, z, 0x4342;
                lop3.b32 $0, p0, {((1 << BITS) - 1) * (1 << SHIFT) * 0x10001}, 0x64006400, 0xEA;
                lop3.b32 $1, p1, {((1 << BITS) - 1) * (1 << SHIFT) * 0x10001}, 0x64006400, 0xEA;
                }}""",
                constraints="=r,=r,r", args=[x], dtype=tl.float16, is_pure=True, pack=4)
        return tl.inline_asm_elementwise(
            asm=f"""{{
            .reg .b32 z, p0, p1, m, a;
            mov.b32 z, 0;
            prmt.b32 p0, $2, z, 0x4140;
            prmt.b32 p1, $2, z, 0x4342;
            lop3.b32 $0, p0, {((1 << BITS) - 1) * (1 << SHIFT) * 0x10001}, 0x64006400, 0xEA;
            lop3.b32 $1, p1, {((1 << BITS) - 1) * (1 << SHIFT) * 0x10001}, 0x64006400, 0xEA;
            mov.b32 m, {((15 - SHIFT) << 10) * 0x10001};
            mov.b32 a, {(0x8000 | ((25 - SHIFT) << 10)) * 0x10001};
            fma.rn.f16x2 $0, $0, m, a;
            fma.rn.f16x2 $1, $1, m, a;
            }}""",
            constraints="=r,=r,r", args=[x], dtype=tl.float16, is_pure=True, pack=4)
    c = ((x >> SHIFT) & ((1 << BITS) - 1)).to(tl.float16)
    if RAW:
        c = c * (1 << SHIFT) + 1024.0
    return c


@triton.jit
def _slice_f16(x0, x1, x2, S_IDX: tl.constexpr, FMT: tl.constexpr, RAW: tl.constexpr, USE_ASM: tl.constexpr):
    """fp16 codes of channel slice ``S_IDX`` from uint8 byte tiles (same shape as ``x0``).

    b-bit: slot ``S_IDX`` of ``x0``; 3-bit: low 2 bits from ``x0``/``x1`` (even/odd slice), high bit from
    ``x2``. RAW: ``1024 + c * 2^_raw_shift``. (Ternary digits come from :func:`_trit_f16`.)
    """
    if FMT == 3:
        if S_IDX % 2 == 0:
            lo = x0
        else:
            lo = x1
        c = ((lo >> (2 * (S_IDX // 2))) & 3) | (((x2 >> S_IDX) & 1) << 2)
        return _bytes_f16(c.to(tl.uint8), RAW, USE_ASM)
    else:
        return _slot_f16(x0, S_IDX * FMT, FMT, RAW, USE_ASM)


# ternary digits in fp16x2 (PTX): Q = 1024 + q holds the remaining quotient q = x // 3^s of a byte x <= 242.
# fma.rn(Q, fp16(1/3) = 0x3555, 682.5 = 0x6155) rounds to 1024 + q // 3 exactly for every q <= 242 (checked
# exhaustively: the rounded value is never within 1/16 of a tie), fma(Q', -3, 2048) = -1024 - 3 * (q // 3) and
# Q + that = q % 3 (RAW: fma(Q', -3, 3072) = -3 * (q // 3), Q + that = 1024 + q % 3): 3 f16x2 instructions a
# pair of codes, no integer division. (fp16 bit patterns of the multiplier and addend, for the tests.)
TRIT_DIV: tl.constexpr = tl.constexpr(0x3555)
TRIT_ADD: tl.constexpr = tl.constexpr(0x6155)


@triton.jit
def _trit_carry(x, USE_ASM: tl.constexpr):
    """The state :func:`_trit_f16` walks from uint8 base-3 bytes ``x``: fp16 ``1024 + x`` (PTX) or int32 ``x``."""
    if USE_ASM:
        q = _bytes_f16(x, True, True)
    else:
        q = x.to(tl.int32)
    return q


@triton.jit
def _trit_f16(q, S_IDX: tl.constexpr, RAW: tl.constexpr, USE_ASM: tl.constexpr):
    """(fp16 codes of ternary slice ``S_IDX``, the carry for slice ``S_IDX + 1``) from the carry ``q`` of
    :func:`_trit_carry` (advanced once per slice; slices are walked in order 0..4). RAW: ``1024 + c``.

    Same codes as base-3 digit ``S_IDX`` of the byte (:func:`kvtune.quant.codes.unpack`), exactly.
    """
    if USE_ASM:
        if S_IDX == 4:  # the last digit is the quotient itself
            qn = q
            if RAW:
                c = q
            else:
                c = tl.inline_asm_elementwise(
                    asm="""{
                    .reg .b32 k;
                    mov.b32 k, 0x64006400;
                    sub.f16x2 $0, $1, k;
                    }""",
                    constraints="=r,r", args=[q], dtype=tl.float16, is_pure=True, pack=2)
        else:
            OFF: tl.constexpr = 0x6A006A00 if RAW else 0x68006800  # 3072 : 2048 (fp16) in both halves
            c, qn = tl.inline_asm_elementwise(
                asm=f"""{{
                .reg .b32 m, a, t, b, g;
                mov.b32 m, {TRIT_DIV * 0x10001};
                mov.b32 a, {TRIT_ADD * 0x10001};
                mov.b32 t, 0xC200C200;
                mov.b32 b, {OFF};
                fma.rn.f16x2 $1, $2, m, a;
                fma.rn.f16x2 g, $1, t, b;
                add.f16x2 $0, $2, g;
                }}""",
                constraints="=r,=r,r", args=[q], dtype=(tl.float16, tl.float16), is_pure=True, pack=2)
    else:
        c = (q % 3).to(tl.float16)
        if RAW:
            c = c + 1024.0
        qn = q // 3
    return c, qn


@triton.jit
def _bend_f16(c, BEND: tl.constexpr, USE_ASM: tl.constexpr):
    """fp16 codes ``c`` (0..3) of a symmetric 2-bit codebook, affine in the code's bits: ``c + bend * (c >= 2)``, the
    bend given by its fp16 bit pattern ``BEND`` (0: no bend, ``c`` unchanged). PTX per 2 codes: HSET2 gives 1.0/0.0
    halves, one HFMA2 adds the bend (an immediate: a splatted runtime scalar, hoisted out of the loop, keeps the
    codes out of the MMA operand layout and costs a shared-memory round trip a slice)."""
    if BEND == 0:
        return c
    if USE_ASM:
        return tl.inline_asm_elementwise(
            asm=f"""{{
            .reg .b32 m, k;
            mov.b32 k, 0x40004000;
            set.ge.f16x2.f16x2 m, $1, k;
            mov.b32 k, {BEND * 0x10001};
            fma.rn.f16x2 $0, m, k, $1;
            }}""",
            constraints="=r,r", args=[c], dtype=tl.float16, is_pure=True, pack=2)
    b = tl.full(c.shape, BEND, tl.uint16).to(tl.float16, bitcast=True)
    return tl.where(c >= 2.0, c + b, c)


@triton.jit
def _raw_shift(S_IDX: tl.constexpr, FMT: tl.constexpr):
    """log2 of the factor a RAW code of slice S_IDX carries (b-bit slots keep their bit position)."""
    if FMT == 0 or FMT == 3:
        return 0
    return S_IDX * FMT


@triton.jit
def _load_packed(ptrs, mask, FMT: tl.constexpr, W: tl.constexpr, HAS_MASK: tl.constexpr = True):
    """The uint8 byte tiles one tile of tokens needs: (x0, x1, x2) (x1, x2 differ only for 3-bit)."""
    if HAS_MASK:
        x0 = tl.load(ptrs, mask=mask, other=0)
    else:
        x0 = tl.load(ptrs)
    x1 = x0
    x2 = x0
    if FMT == 3:
        if HAS_MASK:
            x1 = tl.load(ptrs + W, mask=mask, other=0)
            x2 = tl.load(ptrs + 2 * W, mask=mask, other=0)
        else:
            x1 = tl.load(ptrs + W)
            x2 = tl.load(ptrs + 2 * W)
    return x0, x1, x2
