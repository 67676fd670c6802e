"""Integer codes and how they are bit-packed: the one packing implementation (PyTorch, any device).

A :class:`CodeFormat` says how codes of one width are stored; :data:`CODE_FORMATS` lists them (1, 1.58 =
ternary, 2, 3, 4, 8 bits, and 16 = fp16 passthrough, which stores no codes).

Packing runs along the last dim in a *strided* layout: a plane of width ``b`` in {1, 2, 4, 8} holds
``per = 8 // b`` codes a byte, ``nbytes = ceil(D / per)``; channel ``e`` lives in byte ``e % nbytes`` at slot
``e // nbytes`` (bits ``[slot*b, slot*b + b)``), so unpacking one slot yields the contiguous channel slice
``[slot*nbytes, (slot+1)*nbytes)``. 3-bit codes are a 2-bit plane followed by a 1-bit plane; ternary packs 5
trits a byte in base 3. :class:`Slicing` is the same layout as the decode kernels walk it.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from functools import lru_cache

import torch

from kvtune.errors import KVTuneError


@dataclass(frozen=True)
class CodeFormat:
    """How codes of one bit width are stored.

    ``levels``: number of distinct codes (0 = fp16 passthrough, not packed). ``planes``: bit widths of the
    planes a code is split into when a width does not divide 8 (3-bit = a 2-bit plane + a 1-bit plane).
    ``base``: radix of the packing (3 for ternary, 5 trits a byte).
    """

    name: str
    bits: float
    levels: int
    planes: tuple[int, ...]
    base: int = 2

    @property
    def passthrough(self) -> bool:
        return self.levels == 0

    def per_byte(self, plane: int) -> int:
        """Codes one byte of a plane of width ``plane`` holds."""
        return 5 if self.base == 3 else 8 // plane


CODE_FORMATS: dict[float, CodeFormat] = {
    1: CodeFormat("int1", 1, 2, (1,)),
    1.58: CodeFormat("ternary", 1.58, 3, (0,), base=3),
    2: CodeFormat("int2", 2, 4, (2,)),
    3: CodeFormat("int3", 3, 8, (2, 1)),
    4: CodeFormat("int4", 4, 16, (4,)),
    8: CodeFormat("int8", 8, 256, (8,)),
    16: CodeFormat("fp16", 16, 0, ()),
}


def code_format(bits: float) -> CodeFormat:
    """The code format of a bit width; unknown widths are a clear error."""
    try:
        return CODE_FORMATS[float(bits) if bits != int(bits) else int(bits)]
    except (KeyError, ValueError, TypeError):
        valid = ", ".join(str(b) for b in CODE_FORMATS)
        raise KVTuneError(f"unsupported bit width {bits!r}", f"use one of {valid}") from None


def packed_width(d: int, bits: float) -> int:
    """Bytes per row of ``d`` codes packed at ``bits`` (fp16 passthrough: ``2 * d``)."""
    fmt = code_format(bits)
    if fmt.passthrough:
        return 2 * d
    return sum(math.ceil(d / fmt.per_byte(p)) for p in fmt.planes)


def _pack_plane(codes: torch.Tensor, per: int, base: int, width: int) -> torch.Tensor:
    d = codes.shape[-1]
    nbytes = math.ceil(d / per)
    padded = torch.nn.functional.pad(codes.to(torch.int32), (0, nbytes * per - d))
    slots = padded.reshape(*codes.shape[:-1], per, nbytes)
    ar = torch.arange(per, dtype=torch.int32, device=codes.device)
    weights = base ** ar if base == 3 else 1 << (ar * width)
    return (slots * weights.view(per, 1)).sum(dim=-2).to(torch.uint8)


def _unpack_plane(packed: torch.Tensor, per: int, base: int, width: int, d: int) -> torch.Tensor:
    p = packed.to(torch.int32).unsqueeze(-2)  # [..., 1, nbytes]
    ar = torch.arange(per, dtype=torch.int32, device=packed.device).view(per, 1)
    slots = (p // base ** ar) % base if base == 3 else (p >> (ar * width)) & ((1 << width) - 1)
    return slots.reshape(*packed.shape[:-1], per * packed.shape[-1])[..., :d].to(torch.uint8)


def pack(codes: torch.Tensor, bits: float) -> torch.Tensor:
    """Pack uint8 codes ``[..., D]`` into bytes ``[..., packed_width(D, bits)]`` (strided layout)."""
    fmt = code_format(bits)
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
    fmt = code_format(bits)
    if fmt.base == 3:
        return _unpack_plane(packed, 5, 3, 0, d)
    out, shift, start = torch.zeros(*packed.shape[:-1], d, dtype=torch.int32, device=packed.device), 0, 0
    for width in fmt.planes:
        nbytes = math.ceil(d / (8 // width))
        part = _unpack_plane(packed[..., start:start + nbytes], 8 // width, 2, width, d)
        out |= part.to(torch.int32) << shift
        shift, start = shift + width, start + nbytes
    return out.to(torch.uint8)


TERNARY = 0  # format id of 1.58-bit codes inside the kernels; binary widths use their bit count


@dataclass(frozen=True)
class Slicing:
    """The packed layout of ``D`` channels as the decode kernels walk it: channel ``e = s * width + j`` for
    slice ``s``, column ``j``.

    ``fmt``: kernel format id (bits, or :data:`TERNARY`); ``levels``: number of codes; ``row_bytes``: bytes of
    one packed row (= :func:`packed_width`). For 3-bit, slice ``s`` takes its low 2 bits from byte
    ``(s % 2) * width + j`` (shift ``2 * (s // 2)``) and its high bit from byte ``2 * width + j`` (shift ``s``).
    """

    fmt: int
    levels: int
    slices: int
    width: int
    row_bytes: int


@lru_cache(maxsize=64)
def slicing(bits: float, d: int) -> Slicing:
    """The :class:`Slicing` of ``d`` channels at ``bits`` (1, 1.58, 2, 3, 4 or 8)."""
    fmt = code_format(bits)
    if fmt.passthrough:
        raise ValueError("fp16 rows are not packed codes")
    row = packed_width(d, bits)
    if fmt.base == 3:
        return Slicing(TERNARY, 3, 5, math.ceil(d / 5), row)
    if fmt.planes == (2, 1):
        if d % 8:
            raise ValueError(f"3-bit packing needs head_dim % 8 == 0, got {d}")
        return Slicing(3, 8, 8, d // 8, row)
    per = 8 // int(fmt.bits)
    return Slicing(int(fmt.bits), fmt.levels, per, math.ceil(d / per), row)
