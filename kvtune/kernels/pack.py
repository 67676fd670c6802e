"""Quantize + bit-pack a block of new tokens on the GPU (Triton), with a PyTorch reference.

Layout (the contract of :mod:`kvtune.quant.ops`): codes ``c`` in ``[0, levels)`` dequantize as
``c * scale + zero``. Keys (``axis="channel"``) have per-channel statistics over groups of ``G`` tokens,
scale/zero ``[..., T/G, D]``; values (``axis="token"``) per-token statistics over groups of ``Gc``
channels, scale/zero ``[..., T, ceil(D/Gc)]``. Binary widths are asymmetric min/max
(``scale = (max-min)/(levels-1)``, ``zero = min``, both rounded to fp16 before coding, a zero scale
becomes 1); ternary (1.58) is ``scale = absmax``, ``zero = -scale``, codes {0,1,2} = {-1,0,+1}.

Packing along channels is *strided*: a plane of width ``b`` holds ``per = 8 // b`` codes a byte,
``nbytes = ceil(D / per)``, channel ``e`` in byte ``e % nbytes`` at slot ``e // nbytes``. 3-bit codes
are a 2-bit plane followed by a 1-bit plane; ternary packs 5 trits a byte in base 3. A
:class:`Slicing` describes the same layout as ``slices`` contiguous channel slices of ``width``
channels each, which is how both kernels walk it.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from functools import lru_cache

import torch
import triton
import triton.language as tl

TERNARY = 0  # format id of 1.58-bit codes inside the kernels; binary widths use their bit count
_FORMATS = {1.0: 1, 1.58: TERNARY, 2.0: 2, 3.0: 3, 4.0: 4, 8.0: 8}


@dataclass(frozen=True)
class Slicing:
    """How ``D`` channels of one row are packed: channel ``e = s * width + j`` for slice ``s``, column ``j``.

    ``fmt``: kernel format id (bits, or :data:`TERNARY`); ``levels``: number of codes;
    ``row_bytes``: bytes of one packed row. For 3-bit, slice ``s`` takes its low 2 bits from byte
    ``(s % 2) * width + j`` (shift ``2 * (s // 2)``) and its high bit from byte ``2 * width + j``
    (shift ``s``).
    """

    fmt: int
    levels: int
    slices: int
    width: int
    row_bytes: int


@lru_cache(maxsize=64)
def slicing(bits: float, d: int) -> Slicing:
    """The :class:`Slicing` of ``d`` channels at ``bits`` (1, 1.58, 2, 3, 4 or 8)."""
    key = round(float(bits), 2)
    if key not in _FORMATS:
        raise ValueError(f"bits must be one of {sorted(_FORMATS)}, got {bits!r}")
    fmt = _FORMATS[key]
    if fmt == TERNARY:
        width = math.ceil(d / 5)
        return Slicing(fmt, 3, 5, width, width)
    if fmt == 3:
        if d % 8:
            raise ValueError(f"3-bit packing needs head_dim % 8 == 0, got {d}")
        return Slicing(fmt, 8, 8, d // 8, 3 * (d // 8))
    per = 8 // fmt
    width = math.ceil(d / per)
    return Slicing(fmt, 2**fmt, per, width, width)


def _p2(n: int) -> int:
    """Smallest power of two >= max(n, 1), in plain Python (``triton.next_power_of_2`` costs ~10 us a call
    on the decode launch path)."""
    return 1 << (max(int(n), 1) - 1).bit_length()


@triton.jit
def _round_half_even(x):
    # fp32 rint for |x| < 2**22 (codes are <= 255): adding 1.5 * 2**23 leaves no fraction bits
    return (x + 12582912.0) - 12582912.0


@triton.jit
def _group_params(lo, hi, LEVELS: tl.constexpr, FMT: tl.constexpr):
    """fp32 (scale, zero) from group min/max, rounded through fp16 like the reference."""
    empty = lo > hi  # a fully masked (padding) group: keep it finite
    lo = tl.where(empty, 0.0, lo)
    hi = tl.where(empty, 0.0, hi)
    if FMT == 0:
        amax = tl.maximum(tl.abs(lo), tl.abs(hi))
        scale = amax.to(tl.float16).to(tl.float32)
        scale = tl.where(scale > 0, scale, 1.0)
        zero = -scale
    else:
        zero = lo.to(tl.float16).to(tl.float32)
        scale = tl.math.div_rn(hi - zero, LEVELS - 1.0).to(tl.float16).to(tl.float32)
        scale = tl.where(scale > 0, scale, 1.0)
    return scale, zero


@triton.jit
def _view_codes(x_ptr, sc_ptr, zr_ptr, t0, T, D: tl.constexpr, stride_xt, stride_st,
                S: tl.constexpr, W: tl.constexpr, SP: tl.constexpr, WP: tl.constexpr, TB: tl.constexpr,
                AXIS: tl.constexpr, GC: tl.constexpr, LEVELS: tl.constexpr, FMT: tl.constexpr,
                STORE: tl.constexpr):
    """Codes ``[TB, SP, WP]`` (int32) of tokens ``t0..t0+TB`` seen as slices: channel ``s * W + j``.

    AXIS 0 (keys): one group = the TB tokens, stats per channel, scale/zero row ``[D]`` at ``sc_ptr``.
    AXIS 1 (values): stats per token over channel groups of GC, scale/zero ``[TB, D/GC]`` rows.
    ``STORE``: also write the scale/zero (done by one view only).
    """
    t = t0 + tl.arange(0, TB)[:, None, None]
    s = tl.arange(0, SP)[None, :, None]
    j = tl.arange(0, WP)[None, None, :]
    e = s * W + j
    valid = (t < T) & (s < S) & (j < W) & (e < D)
    x = tl.load(x_ptr + t * stride_xt + e, mask=valid, other=0.0).to(tl.float32)
    if AXIS == 0:
        lo = tl.min(tl.where(valid, x, float("inf")), axis=0)[None, :, :]
        hi = tl.max(tl.where(valid, x, float("-inf")), axis=0)[None, :, :]
        scale, zero = _group_params(lo, hi, LEVELS, FMT)
        if STORE:
            cmask = (s < S) & (j < W) & (e < D)
            tl.store(sc_ptr + e, scale.to(tl.float16), mask=cmask)
            tl.store(zr_ptr + e, zero.to(tl.float16), mask=cmask)
    else:
        scale = tl.full([TB, SP, WP], 1.0, tl.float32)
        zero = tl.zeros([TB, SP, WP], tl.float32)
        tt = t0 + tl.arange(0, TB)
        for g in tl.static_range((D + GC - 1) // GC):
            gm = valid & (e // GC == g)
            lo = tl.min(tl.min(tl.where(gm, x, float("inf")), axis=2), axis=1)
            hi = tl.max(tl.max(tl.where(gm, x, float("-inf")), axis=2), axis=1)
            sg, zg = _group_params(lo, hi, LEVELS, FMT)
            scale = tl.where(gm, sg[:, None, None], scale)
            zero = tl.where(gm, zg[:, None, None], zero)
            if STORE:
                tl.store(sc_ptr + tt * stride_st + g, sg.to(tl.float16), mask=tt < T)
                tl.store(zr_ptr + tt * stride_st + g, zg.to(tl.float16), mask=tt < T)
    c = _round_half_even(tl.math.div_rn(x - zero, scale))  # IEEE division, like torch
    c = tl.minimum(tl.maximum(c, 0.0), LEVELS - 1).to(tl.int32)
    return tl.where(valid, c, 0)


@triton.jit
def _store_plane(out_ptr, c, t0, T, stride_ot, COL0: tl.constexpr, BITS: tl.constexpr,
                 W: tl.constexpr, SP: tl.constexpr, WP: tl.constexpr, TB: tl.constexpr):
    """Sum the slices of codes ``c`` ``[TB, SP, WP]`` into bytes ``[TB, WP]`` at columns COL0 + j."""
    s = tl.arange(0, SP)[None, :, None]
    if BITS == 0:  # base 3
        w = tl.where(s == 0, 1, tl.where(s == 1, 3, tl.where(s == 2, 9, tl.where(s == 3, 27, 81))))
    else:
        w = 1 << (s * BITS)
    byte = tl.sum(c * w, axis=1)
    t = t0 + tl.arange(0, TB)[:, None]
    j = tl.arange(0, WP)[None, :]
    tl.store(out_ptr + t * stride_ot + COL0 + j, byte.to(tl.uint8), mask=(t < T) & (j < W))


@triton.jit
def _pack_kernel(x_ptr, out_ptr, sc_ptr, zr_ptr, T, stride_xn, stride_xt, stride_on, stride_ot,
                 stride_sn, stride_st, D: tl.constexpr, TB: tl.constexpr, AXIS: tl.constexpr,
                 GC: tl.constexpr, FMT: tl.constexpr, LEVELS: tl.constexpr, S: tl.constexpr,
                 W: tl.constexpr, SP: tl.constexpr, WP: tl.constexpr):
    """One program packs tokens ``[t0, t0+TB)`` of row ``n`` (a key group when AXIS == 0)."""
    n = tl.program_id(1).to(tl.int64)
    blk = tl.program_id(0)
    t0 = blk * TB
    x_ptr += n * stride_xn
    out_ptr += n * stride_on
    if AXIS == 0:
        sc_ptr += n * stride_sn + blk * stride_st
        zr_ptr += n * stride_sn + blk * stride_st
    else:
        sc_ptr += n * stride_sn
        zr_ptr += n * stride_sn
    if FMT == 3:
        c = _view_codes(x_ptr, sc_ptr, zr_ptr, t0, T, D, stride_xt, stride_st, 4, 2 * W, 4, 2 * WP, TB,
                        AXIS, GC, LEVELS, FMT, True)
        _store_plane(out_ptr, c & 3, t0, T, stride_ot, 0, 2, 2 * W, 4, 2 * WP, TB)
        c = _view_codes(x_ptr, sc_ptr, zr_ptr, t0, T, D, stride_xt, stride_st, 8, W, 8, WP, TB,
                        AXIS, GC, LEVELS, FMT, False)
        _store_plane(out_ptr, (c >> 2) & 1, t0, T, stride_ot, 2 * W, 1, W, 8, WP, TB)
    else:
        c = _view_codes(x_ptr, sc_ptr, zr_ptr, t0, T, D, stride_xt, stride_st, S, W, SP, WP, TB,
                        AXIS, GC, LEVELS, FMT, True)
        _store_plane(out_ptr, c, t0, T, stride_ot, 0, FMT, W, SP, WP, TB)


def _pack(x: torch.Tensor, bits: float, group: int, axis: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    # x: [..., T, D] -> packed uint8 [..., T, row_bytes], scale/zero fp16
    *lead, t, d = x.shape
    lay = slicing(bits, d)
    x3 = x.reshape(math.prod(lead), t, d)
    if x3.stride(-1) != 1:
        x3 = x3.contiguous()
    n = x3.shape[0]
    out = torch.empty(n, t, lay.row_bytes, dtype=torch.uint8, device=x.device)
    if axis == 0:
        g = group or t
        if t % g:
            raise ValueError(f"{t} tokens is not a multiple of the key group {g}")
        if g != _p2(g):
            raise ValueError(f"key group must be a power of two, got {g}")
        scale = torch.empty(n, t // g, d, dtype=torch.float16, device=x.device)
        tb, gc, grid = g, 1, (t // g, n)
    else:
        gc = min(group or d, d)
        scale = torch.empty(n, t, math.ceil(d / gc), dtype=torch.float16, device=x.device)
        tb = min(16, _p2(t))
        grid = (triton.cdiv(t, tb), n)
    zero = torch.empty_like(scale)
    if n and t:
        _pack_kernel[grid](x3, out, scale, zero, t, x3.stride(0), x3.stride(1), out.stride(0), out.stride(1),
                           scale.stride(0), scale.stride(1), D=d, TB=tb, AXIS=axis, GC=gc, FMT=lay.fmt,
                           LEVELS=lay.levels, S=lay.slices, W=lay.width, SP=_p2(lay.slices), WP=_p2(lay.width))
    return (out.reshape(*lead, t, lay.row_bytes), scale.reshape(*lead, *scale.shape[1:]),
            zero.reshape(*lead, *zero.shape[1:]))


def pack_keys(k: torch.Tensor, bits: float, group: int = 32) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Quantize + pack keys per channel over groups of ``group`` tokens (KIVI keys).

    ``k``: ``[..., T, D]`` fp16/bf16/fp32 with ``T % group == 0`` (group a power of two, 0 = all T).
    Returns ``(packed uint8 [..., T, row_bytes], scale fp16 [..., T/group, D], zero fp16 [..., T/group, D])``.
    """
    return _pack(k, bits, group, 0)


def pack_values(v: torch.Tensor, bits: float, group: int = 32) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Quantize + pack values per token over groups of ``group`` channels (KIVI values; 0 = all D).

    ``v``: ``[..., T, D]``. Returns ``(packed uint8 [..., T, row_bytes], scale fp16 [..., T, ceil(D/group)],
    zero fp16 [..., T, ceil(D/group)])``.
    """
    return _pack(v, bits, group, 1)


# ---------------------------------------------------------------------------------------- reference
def _params_ref(lo: torch.Tensor, hi: torch.Tensor, lay: Slicing) -> tuple[torch.Tensor, torch.Tensor]:
    if lay.fmt == TERNARY:
        scale = torch.maximum(lo.abs(), hi.abs()).half().float()
        scale = torch.where(scale > 0, scale, torch.ones_like(scale))
        return scale, -scale
    zero = lo.half().float()
    scale = ((hi - zero) / (lay.levels - 1)).half().float()
    return torch.where(scale > 0, scale, torch.ones_like(scale)), zero


def pack_codes_reference(codes: torch.Tensor, bits: float) -> torch.Tensor:
    """Pack integer codes ``[..., D]`` into bytes ``[..., row_bytes]`` (strided layout, PyTorch)."""
    d = codes.shape[-1]
    lay = slicing(bits, d)
    c = codes.to(torch.int32)
    planes = [(c, 5, 3, 0)] if lay.fmt == TERNARY else \
        [(c & 3, 4, 2, 2), (c >> 2, 8, 2, 1)] if lay.fmt == 3 else [(c, lay.slices, 2, lay.fmt)]
    out = []
    for plane, per, base, width in planes:
        nb = math.ceil(d / per)
        p = torch.nn.functional.pad(plane, (0, nb * per - d)).reshape(*c.shape[:-1], per, nb)
        w = torch.tensor([base**i if base == 3 else 1 << (i * width) for i in range(per)], device=c.device)
        out.append((p * w.view(per, 1)).sum(-2))
    return torch.cat(out, -1).to(torch.uint8)


def _codes_ref(xg: torch.Tensor, dim: int, lay: Slicing) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    scale, zero = _params_ref(xg.amin(dim, keepdim=True), xg.amax(dim, keepdim=True), lay)
    codes = torch.round((xg - zero) / scale).clamp(0, lay.levels - 1)
    return codes, scale.squeeze(dim).half(), zero.squeeze(dim).half()


def pack_keys_reference(k: torch.Tensor, bits: float,
                        group: int = 32) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """PyTorch twin of :func:`pack_keys` (same outputs)."""
    *lead, t, d = k.shape
    g = group or t
    codes, scale, zero = _codes_ref(k.float().reshape(*lead, t // g, g, d), -2, slicing(bits, d))
    return pack_codes_reference(codes.reshape(*lead, t, d), bits), scale, zero


def pack_values_reference(v: torch.Tensor, bits: float,
                          group: int = 32) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """PyTorch twin of :func:`pack_values` (same outputs; a ragged last group repeats the edge channel)."""
    *lead, t, d = v.shape
    g = min(group or d, d)
    x = v.float()
    if d % g:
        x = torch.cat([x, x[..., -1:].expand(*x.shape[:-1], g - d % g)], -1)
    codes, scale, zero = _codes_ref(x.reshape(*lead, t, -1, g), -1, slicing(bits, d))
    return pack_codes_reference(codes.reshape(*lead, t, -1)[..., :d], bits), scale, zero


def unpack_codes_reference(packed: torch.Tensor, bits: float, d: int) -> torch.Tensor:
    """Inverse of :func:`pack_codes_reference`: bytes ``[..., row_bytes]`` -> int64 codes ``[..., d]``."""
    lay = slicing(bits, d)
    p = packed.to(torch.int64)
    if lay.fmt == TERNARY:
        pw = torch.tensor([3**i for i in range(5)], device=p.device).view(5, 1)
        return ((p.unsqueeze(-2) // pw) % 3).flatten(-2)[..., :d]
    if lay.fmt == 3:
        nb = d // 4
        return unpack_codes_reference(p[..., :nb], 2, d) | (unpack_codes_reference(p[..., nb:], 1, d) << 2)
    sh = torch.arange(lay.slices, device=p.device).view(-1, 1) * lay.fmt
    return ((p.unsqueeze(-2) >> sh) & (lay.levels - 1)).flatten(-2)[..., :d]
