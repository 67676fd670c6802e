"""Reference quantize / dequantize / pack / unpack in PyTorch: this file is the specification.

Layout: tensors are ``[..., T, D]``. Scales and zero-points of an ``axis="channel"`` spec are
``[..., T/G, D]``; of an ``axis="token"`` spec ``[..., T, D/G]`` (G = ``spec.group``, 0 = whole axis).

Grids (``c`` = integer code in ``[0, levels)``, dequantized ``x^ = c * scale + zero``):

* asymmetric b-bit: ``scale = (max - min) / (2^b - 1)``, ``zero = min`` (both stored);
* symmetric b-bit: ``o = 2^(b-1) - 1``, ``scale = absmax / o``, ``zero = -o * scale`` (not stored);
* ternary (1.58): ``scale = absmax``, codes ``{0, 1, 2}`` = ``{-1, 0, +1}``, ``zero = -scale`` (not stored).

A zero-range group gets ``scale = 1`` so it reconstructs exactly (``x^ = zero``); scales and zeros are
rounded to the stored dtype *before* codes are computed, so ``|x - x^| <= scale / 2`` holds with the
stored values. Non-finite input is an error, never a silent NaN.

Packing runs along the last dim in a strided layout: for b in {1, 2, 4, 8}, ``per = 8 // b`` codes a
byte, ``nbytes = ceil(D / per)``; channel ``e`` lives in byte ``e % nbytes`` at slot ``e // nbytes``
(bits ``[slot*b, slot*b + b)``), so unpacking one slot yields a contiguous channel slice. 3-bit codes
are a 2-bit plane followed by a 1-bit plane; ternary packs 5 trits a byte in base 3.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from kvtune.errors import KVTuneError
from kvtune.quant.formats import CodeFormat, QuantSpec
from kvtune.quant.outliers import merge_channels, split_channels
from kvtune.quant.transforms import channel_norm, fft_tokens, hadamard, ifft_tokens

_DTYPES = {"float16": torch.float16, "bfloat16": torch.bfloat16, "float32": torch.float32}


@dataclass
class Quantized:
    """Codes and parameters of one quantized tensor (unpacked codes, see module doc for shapes)."""

    codes: torch.Tensor  # uint8 [..., T, D]
    scale: torch.Tensor  # scale dtype, [..., T/G, D] or [..., T, D/G]
    zero: torch.Tensor  # same shape as scale (derived from scale for symmetric/ternary)


def _grouped(x: torch.Tensor, spec: QuantSpec) -> torch.Tensor:
    """View ``[..., T, D]`` so that dim -2 (channel axis) or -1 (token axis) runs inside a group."""
    t, d = x.shape[-2:]
    if spec.axis == "channel":
        g = spec.group or t
        if t % g:
            raise KVTuneError(f"{t} tokens is not a multiple of the key group {g}", "quantize whole groups")
        return x.reshape(*x.shape[:-2], t // g, g, d)
    g = min(spec.group or d, d)
    if d % g:  # ragged last group (e.g. after outlier channels left): repeat the edge, min/max unchanged
        x = torch.cat([x, x[..., -1:].expand(*x.shape[:-1], g - d % g)], dim=-1)
    return x.reshape(*x.shape[:-1], x.shape[-1] // g, g)


def _reduce_dim(spec: QuantSpec) -> int:
    return -2 if spec.axis == "channel" else -1


def _params(xg: torch.Tensor, spec: QuantSpec) -> tuple[torch.Tensor, torch.Tensor]:
    """Scale and zero with a kept group dim, rounded to the stored dtype, returned as float32."""
    fmt, dim, sdt = spec.format, _reduce_dim(spec), _DTYPES[spec.scale_dtype]
    if fmt.base == 3 or spec.symmetric:
        half = 1 if fmt.base == 3 else 2 ** (int(fmt.bits) - 1) - 1
        scale = xg.abs().amax(dim=dim, keepdim=True) / half
        scale = torch.where(scale > 0, scale, torch.ones_like(scale)).to(sdt).float()
        return scale, -half * scale
    lo, hi = xg.amin(dim=dim, keepdim=True), xg.amax(dim=dim, keepdim=True)
    zero = lo.to(sdt).float()
    scale = ((hi - zero) / (fmt.levels - 1)).to(sdt).float()
    return torch.where(scale > 0, scale, torch.ones_like(scale)), zero


def quantize(x: torch.Tensor, spec: QuantSpec) -> Quantized:
    """Quantize ``x`` ``[..., T, D]`` with ``spec``'s grid (no transforms). Codes are uint8 ``[..., T, D]``."""
    if spec.passthrough:
        raise KVTuneError("an fp16 spec is not quantized", "store the tensor as is")
    if not torch.isfinite(x).all():
        raise KVTuneError("non-finite values (NaN/inf) in a tensor to quantize", "check the model's activations")
    xg = _grouped(x.float(), spec)
    scale, zero = _params(xg, spec)
    codes = torch.round((xg - zero) / scale).clamp_(0, spec.format.levels - 1).to(torch.uint8)
    dim = _reduce_dim(spec)
    return Quantized(_ungroup(codes, x.shape, spec), scale.squeeze(dim).to(_DTYPES[spec.scale_dtype]),
                     zero.squeeze(dim).to(_DTYPES[spec.scale_dtype]))


def dequantize(q: Quantized, spec: QuantSpec, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """``codes * scale + zero`` broadcast per group: ``[..., T, D]`` in ``dtype``."""
    dim = _reduce_dim(spec)
    cg = _grouped(q.codes.float(), spec)
    out = cg * q.scale.float().unsqueeze(dim) + q.zero.float().unsqueeze(dim)
    return _ungroup(out, q.codes.shape, spec).to(dtype)


def _ungroup(xg: torch.Tensor, shape: torch.Size, spec: QuantSpec) -> torch.Tensor:
    """Undo :func:`_grouped` (dropping channel padding) back to ``shape`` ``[..., T, D]``."""
    if spec.axis == "token":
        return xg.reshape(*xg.shape[:-2], -1)[..., : shape[-1]]
    return xg.reshape(shape)


def packed_width(d: int, bits: float) -> int:
    """Bytes per row of ``d`` codes packed at ``bits`` (fp16 passthrough: ``2 * d``)."""
    fmt = QuantSpec(bits=bits).format
    if fmt.passthrough:
        return 2 * d
    return sum(math.ceil(d / _per_byte(fmt, plane)) for plane in fmt.planes)


def _per_byte(fmt: CodeFormat, plane: int) -> int:
    return 5 if fmt.base == 3 else 8 // plane


def _pack_plane(codes: torch.Tensor, per: int, base: int, width: int) -> torch.Tensor:
    d = codes.shape[-1]
    nbytes = math.ceil(d / per)
    padded = torch.nn.functional.pad(codes.to(torch.int32), (0, nbytes * per - d))
    slots = padded.reshape(*codes.shape[:-1], per, nbytes)
    weights = (base ** torch.arange(per, dtype=torch.int32, device=codes.device)) if base == 3 else \
        (1 << (torch.arange(per, dtype=torch.int32, device=codes.device) * width))
    return (slots * weights.view(per, 1)).sum(dim=-2).to(torch.uint8)


def _unpack_plane(packed: torch.Tensor, per: int, base: int, width: int, d: int) -> torch.Tensor:
    p = packed.to(torch.int32).unsqueeze(-2)  # [..., 1, nbytes]
    ar = torch.arange(per, dtype=torch.int32, device=packed.device).view(per, 1)
    slots = (p // base ** ar) % base if base == 3 else (p >> (ar * width)) & ((1 << width) - 1)
    return slots.reshape(*packed.shape[:-1], per * packed.shape[-1])[..., :d].to(torch.uint8)


def pack(codes: torch.Tensor, bits: float) -> torch.Tensor:
    """Pack uint8 codes ``[..., D]`` into bytes ``[..., packed_width(D, bits)]`` (strided layout)."""
    fmt = QuantSpec(bits=bits).format
    if fmt.base == 3:
        return _pack_plane(codes, 5, 3, 0)
    planes, shift = [], 0
    for width in fmt.planes:
        part = (codes.to(torch.int32) >> shift) & ((1 << width) - 1)
        planes.append(_pack_plane(part, 8 // width, 2, width))
        shift += width
    return torch.cat(planes, dim=-1)


def unpack(packed: torch.Tensor, bits: float, d: int) -> torch.Tensor:
    """Inverse of :func:`pack`: bytes ``[..., nbytes]`` -> uint8 codes ``[..., d]``."""
    fmt = QuantSpec(bits=bits).format
    if fmt.base == 3:
        return _unpack_plane(packed, 5, 3, 0, d)
    out, shift, start = torch.zeros(*packed.shape[:-1], d, dtype=torch.int32, device=packed.device), 0, 0
    for width in fmt.planes:
        nbytes = math.ceil(d / (8 // width))
        part = _unpack_plane(packed[..., start:start + nbytes], 8 // width, 2, width, d)
        out |= part.to(torch.int32) << shift
        shift, start = shift + width, start + nbytes
    return out.to(torch.uint8)


def fake_quantize(x: torch.Tensor, spec: QuantSpec, outlier_idx: torch.Tensor | None = None) -> torch.Tensor:
    """Quantize then dequantize ``x`` ``[..., T, D]`` through the whole pipeline of ``spec``.

    Order: Hadamard rotation -> outlier split (``outlier_idx`` ``[..., o]``, or the top ``spec.outliers``
    channels of ``x`` when None) -> FFT along tokens -> channel-separable normalisation -> grid
    quantization -> inverse of each step. Returns ``x``'s dtype and shape.
    """
    if spec.passthrough:
        return x.to(torch.float16).to(x.dtype)
    y = hadamard(x.float()) if spec.hadamard else x.float()
    if spec.outliers:
        from kvtune.quant.outliers import rank_channels

        idx = rank_channels(y, spec.outliers) if outlier_idx is None else outlier_idx
        main, out = split_channels(y, idx)
        out_spec = QuantSpec(bits=spec.outlier_bits, axis="channel", group=spec.group if spec.axis == "channel" else 0)
        out = fake_quantize(out, out_spec)
        y = merge_channels(_fake_main(main, spec), out, idx)
    else:
        y = _fake_main(y, spec)
    y = hadamard(y) if spec.hadamard else y
    return y.to(x.dtype)


def _fake_main(y: torch.Tensor, spec: QuantSpec) -> torch.Tensor:
    """Quantize-dequantize of the main channels: FFT / channel norm around the grid."""
    if spec.fft:
        y = fft_tokens(y, spec.group)
    norm = channel_norm(y).to(torch.float16).float() if spec.channel_separable else None
    y = y / norm if norm is not None else y
    y = dequantize(quantize(y, spec), spec)
    y = y * norm if norm is not None else y
    return ifft_tokens(y, spec.group) if spec.fft else y
