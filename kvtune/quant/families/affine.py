"""``affine``: integer codes on a per-group grid, ``x^ = c * scale + zero`` (KIVI, KVTuner, ZipCache, VidKV).

Parameters: code width ``bits`` (1, 1.58 = ternary, 2, 3, 4, 8), grouping ``axis`` (``channel``: per channel
over ``group`` tokens, KIVI keys; ``token``: per token over ``group`` channels, KIVI values; ``group = 0``: the
whole axis, which for a channel-axis spec in a streaming cache means one group per flushed block),
``symmetric`` grid, ``scale_dtype``, and two variants of the same grid:

* ``channel_separable`` (ZipCache, token axis): each channel divided by ``sqrt(absmax)`` over the flushed
  block first; the divisors are stored fp16 per block (``norm``);
* ``fft`` (VidKV, channel axis): an orthonormal real Fourier transform along the tokens of each group first.

Stored per head (``D`` channels): ``codes`` uint8 ``[T, packed_width(D, bits)]``; ``scale`` (and ``zero``
unless symmetric or ternary) ``[T/G, D]`` (channel axis) or ``[T, ceil(D/G)]`` (token axis) at the scale
dtype; ``norm`` fp16 ``[blocks, D]`` when channel-separable. Grid maths: :mod:`kvtune.quant.grid`.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass, replace
from typing import Any

import torch

from kvtune.quant import grid
from kvtune.quant.codes import code_format, pack, packed_width, unpack
from kvtune.quant.family import FieldDecl, Fields, QuantFamily
from kvtune.quant.formats import affine
from kvtune.quant.transforms import channel_norm, fft_tokens, ifft_tokens

AXES = ("channel", "token")
KERNEL_BITS = (1, 1.58, 2, 3, 4, 8)


@dataclass(frozen=True)
class AffineParams:
    """See the module docstring."""

    bits: float = 2
    axis: str = "token"
    group: int = 0
    symmetric: bool = False
    scale_dtype: str = "float16"
    channel_separable: bool = False
    fft: bool = False

    def __post_init__(self) -> None:
        fmt = code_format(self.bits)
        if fmt.passthrough:
            raise ValueError("16 bits is the fp16 family, not an integer grid")
        object.__setattr__(self, "bits", fmt.bits)
        if self.axis not in AXES:
            raise ValueError(f"axis must be one of {AXES}, got {self.axis!r}")
        if not isinstance(self.group, int) or self.group < 0:
            raise ValueError(f"group must be an int >= 0 (0 = whole axis), got {self.group!r}")
        if self.scale_dtype not in grid.SCALE_DTYPES:
            raise ValueError(f"scale_dtype must be one of {tuple(grid.SCALE_DTYPES)}, got {self.scale_dtype!r}")
        if self.symmetric and fmt.bits == 1:
            raise ValueError("symmetric 1-bit has no zero level: use symmetric=False at 1 bit")
        if self.channel_separable and self.axis != "token":
            raise ValueError("channel_separable needs axis='token' (ZipCache: per-channel norm, then per-token)")
        if self.fft and (self.axis != "channel" or self.group < 2):
            raise ValueError("fft needs axis='channel' with a token group >= 2 (the FFT runs inside a group)")


def streaming(p: AffineParams, flush: int) -> AffineParams:
    """``p`` with a channel-axis ``group = 0`` resolved to the flushed block length."""
    return replace(p, group=flush) if p.axis == "channel" and p.group == 0 else p


class Affine(QuantFamily):
    name = "affine"
    Params = AffineParams

    def bits(self, p: AffineParams) -> float:
        return p.bits

    def token_group(self, p: AffineParams) -> int:
        return 1 if p.axis == "token" else p.group

    def label(self, p: AffineParams, short: bool = False) -> str:
        if short:
            return (f"{p.bits:g}" + (f"g{p.group}" if p.group != 32 else "") + ("cs" if p.channel_separable else "")
                    + ("f" if p.fft else ""))
        text = f"{p.bits:g}b/{'ch' if p.axis == 'channel' else 'tok'}/g{p.group or 'all'}"
        return text + "".join(f"+{flag}" for flag, on in (("sym", p.symmetric), ("cs", p.channel_separable),
                                                           ("fft", p.fft)) if on)

    def fields(self, p: AffineParams, d: int, flush: int) -> tuple[FieldDecl, ...]:
        if p.axis == "channel":
            scale = FieldDecl("scale", "group", d, p.scale_dtype, "scales", every=p.group)
        else:
            scale = FieldDecl("scale", "token", math.ceil(d / min(p.group or d, d)), p.scale_dtype, "scales")
        out = [FieldDecl("codes", "token", packed_width(d, p.bits), "uint8", "codes"), scale]
        if grid.stores_zero(p):
            out.append(replace(scale, name="zero", kind="zeros"))
        if p.channel_separable:
            out.append(FieldDecl("norm", "block", d, "float16", "scales"))
        return tuple(out)

    def encode(self, p: AffineParams, x: torch.Tensor, flush: int, state: Mapping[str, torch.Tensor]) -> Fields:
        p = streaming(p, flush)
        fields: Fields = {}
        y = fft_tokens(x, p.group) if p.fft else x
        if p.channel_separable:
            *lead, t, d = y.shape
            blocks = y.reshape(*lead, t // flush, flush, d)
            norm = channel_norm(blocks).to(torch.float16)  # [..., nb, 1, D]
            fields["norm"] = norm.squeeze(-2)
            y = (blocks / norm.float()).reshape(y.shape)
        q = grid.quantize(y, p)
        fields.update(codes=pack(q.codes, p.bits), scale=q.scale)
        if grid.stores_zero(p):
            fields["zero"] = q.zero
        return fields

    def decode(self, p: AffineParams, fields: Mapping[str, torch.Tensor], flush: int, d: int,
               state: Mapping[str, torch.Tensor]) -> torch.Tensor:
        p = streaming(p, flush)
        zero = fields["zero"] if "zero" in fields else grid.derived_zero(fields["scale"], p)
        y = grid.dequantize(grid.Quantized(unpack(fields["codes"], p.bits, d), fields["scale"], zero), p)
        if p.channel_separable:
            y = y * fields["norm"].float().repeat_interleave(flush, dim=-2)
        return ifft_tokens(y, p.group) if p.fft else y

    def candidates(self, role: str, head_dim: int | None = None) -> tuple[Any, ...]:
        return key_candidates() if role == "key" else value_candidates()

    # -- kernel hooks: plain grids (a stored zero-point, or the derived one of symmetric and ternary grids as a code
    #    offset), fp16 scales; keys per channel in power-of-two groups >= 16, values per token
    def kernel_ok(self, p: AffineParams, role: str) -> bool:
        plain = not (p.channel_separable or p.fft) and p.scale_dtype == "float16"
        if not plain or p.bits not in KERNEL_BITS:
            return False
        if role == "key":
            return p.axis == "channel" and p.group >= 16 and p.group & (p.group - 1) == 0
        return p.axis == "token"

    def kernel_operands(self, p: AffineParams, role: str, fields: Mapping[str, torch.Tensor],
                        state: Mapping[str, torch.Tensor]) -> Any:
        from kvtune.kernels.packed import PackedKeys, PackedValues

        cls = PackedKeys if role == "key" else PackedValues
        if grid.stores_zero(p):
            return cls(fields["codes"], fields["scale"], fields["zero"], p.bits, p.group)
        offset = float(grid.derived_zero(torch.ones(()), p))  # zero = offset * scale: x = scale * (c + offset)
        return cls(fields["codes"], fields["scale"], None, p.bits, p.group, 1.0, offset)


def key_candidates() -> tuple[Any, ...]:
    """Calibration's key quantizers (the order is part of the calibration artifact).

    Per-channel g32 (KIVI) at 1/1.58/2/3/4/8 bits; + Hadamard at 1..4 bits; + 1/2/4 fp16 outlier channels at 2
    and 3 bits, 4 at 1 and 1.58 bits; VidKV-style (FFT, 1 bit + 4 channels at 2 bits; FFT 1.58 bits); groups
    64/128 at 2 bits and 128 at 4 bits; the sub-2.5-bit end: g128 at 1/1.58/3 bits, 2-bit g128 with Hadamard
    or 2 outlier channels, 2-bit g256.
    """
    ch = "channel"
    keys = [affine(b, ch, 32) for b in (1, 1.58, 2, 3, 4, 8)]
    keys += [affine(b, ch, 32, hadamard=True) for b in (1, 1.58, 2, 3, 4)]
    keys += [affine(b, ch, 32, outliers=o) for b in (2, 3) for o in (1, 2, 4)]
    keys += [affine(b, ch, 32, outliers=4) for b in (1, 1.58)]
    keys += [affine(1, ch, 32, fft=True, outliers=4, outlier_bits=2), affine(1.58, ch, 32, fft=True)]
    keys += [affine(2, ch, 64), affine(2, ch, 128), affine(4, ch, 128)]
    keys += [affine(b, ch, 128) for b in (1, 1.58, 3)]
    keys += [affine(2, ch, 128, hadamard=True), affine(2, ch, 128, outliers=2), affine(2, ch, 256)]
    return tuple(keys)


def value_candidates() -> tuple[Any, ...]:
    """Calibration's value quantizers (the order is part of the calibration artifact).

    Per-token g32 (KIVI) at 1/1.58/2/3/4/8 bits; + Hadamard at 1..4; channel-separable (ZipCache) at 1.58..4;
    + 1/2/4 fp16 outlier channels at 2 and 3 bits; groups 64/128 at 2 bits, 64 at 4 bits; per-channel g32
    (VidKV values) at 1.58 and 2 bits; the sub-2.5-bit end: whole-head groups (g64) at 1/1.58 bits, 2 bits
    symmetric, with Hadamard, channel-separable, and 3 bits.
    """
    ch, tok = "channel", "token"
    values = [affine(b, tok, 32) for b in (1, 1.58, 2, 3, 4, 8)]
    values += [affine(b, tok, 32, hadamard=True) for b in (1, 1.58, 2, 3, 4)]
    values += [affine(b, tok, 32, channel_separable=True) for b in (1.58, 2, 3, 4)]
    values += [affine(b, tok, 32, outliers=o) for b in (2, 3) for o in (1, 2, 4)]
    values += [affine(2, tok, 64), affine(2, tok, 128), affine(4, tok, 64)]
    values += [affine(b, ch, 32) for b in (1.58, 2)]
    values += [affine(b, tok, 64) for b in (1, 1.58, 3)]
    values += [affine(2, tok, 64, symmetric=True), affine(2, tok, 64, hadamard=True),
               affine(2, tok, 64, channel_separable=True)]
    return tuple(values)


FAMILY = Affine()
