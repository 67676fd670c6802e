"""``ggml``: llama.cpp's KV-cache block formats (``-ctk`` / ``-ctv``), bit for bit.

Each token's head vector is cut into blocks of 32 channels; a block stores an fp16 scale ``d`` (and an fp16 minimum
``m`` for the ``_1`` types) and 32 codes. Definitions (``ggml/src/ggml-common.h`` block structs; the KV-cache store
is ``ggml_cpy`` F32 -> type, ``ggml/src/ggml-cuda/cpy-utils.cuh`` ``quantize_f32_*_block``, same arithmetic as the
CPU reference ``quantize_row_*_ref``); codes are computed with the fp32 scale, the scale is then stored as fp16:

=========  =====================================================  ===================  ==============
type       encode (per block of 32, ``id = 1/d`` or 0)            decode               bytes / 32
=========  =====================================================  ===================  ==============
q8_0       ``d = amax/127``, ``q = roundf(x*id)`` int8            ``q*d``              34 (8.5 bits)
q4_0       ``d = max/-8`` (signed max), ``q = min(15, (int)(x*id + 8.5))``  ``(q-8)*d``  18 (4.5 bits)
q4_1       ``d = (max-min)/15``, ``q = min(15, (int)((x-min)*id + 0.5))``   ``q*d + m``  20 (5.0 bits)
q5_0       ``d = max/-16``, ``q = min(31, (int)(x*id + 16.5))``   ``(q-16)*d``         22 (5.5 bits)
q5_1       ``d = (max-min)/31``, ``q = min(31, (int)((x-min)*id + 0.5))``   ``q*d + m``  24 (6.0 bits)
iq4_nl     nearest of 16 non-linear levels to ``x / (max/-127)``, then ``d`` = the x²-weighted least-squares
           scale of the chosen levels                             ``kvalues[q]*d``     18 (4.5 bits)
=========  =====================================================  ===================  ==============

Stored per head (``D`` channels, ``nb = D/32`` blocks), fields in ggml's byte order: ``d`` float16 ``[T, nb]``;
``m`` float16 ``[T, nb]`` (``_1`` types); ``qs`` uint8 ``[T, nb*16]`` (4-bit: byte ``j`` of a block holds code ``j``
in its low nibble and code ``j+16`` in its high nibble) or ``[T, D]`` (q8_0: int8 two's complement); ``qh`` uint8
``[T, nb*4]`` (5-bit types: bit ``j`` of a block's little-endian uint32 is code ``j``'s fifth bit). Concatenating
``d | m | qh | qs`` per block gives the exact ``block_*`` bytes llama.cpp holds. llama.cpp also rotates K and V
with a Walsh-Hadamard transform before a quantized cache: that is the spec's ``rotation: hadamard`` wrapper.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import torch

from kvtune.errors import KVTuneError
from kvtune.quant.family import FieldDecl, Fields, QuantFamily
from kvtune.quant.formats import QuantSpec

BLOCK = 32
# type -> (code bits, stores a min, symmetric divisor of the signed max (0: min/max grid))
TYPES: dict[str, tuple[int, bool, float]] = {
    "q8_0": (8, False, 127.0), "q4_0": (4, False, -8.0), "q4_1": (4, True, 0.0), "q5_0": (5, False, -16.0),
    "q5_1": (5, True, 0.0), "iq4_nl": (4, False, -127.0)}
IQ4NL = (-127, -104, -83, -65, -49, -35, -22, -10, 1, 13, 25, 38, 53, 69, 89, 113)  # ggml-common.h kvalues_iq4nl


@dataclass(frozen=True)
class GGMLParams:
    """``type``: one of :data:`TYPES`."""

    type: str = "q8_0"

    def __post_init__(self) -> None:
        if self.type not in TYPES:
            raise ValueError(f"ggml type must be one of {tuple(TYPES)}, got {self.type!r}")

    @property
    def code_bits(self) -> int:
        return TYPES[self.type][0]

    @property
    def has_min(self) -> bool:
        return TYPES[self.type][1]


def _blocks(d: int) -> int:
    if d % BLOCK:
        raise KVTuneError(f"llama.cpp block formats need a head dim that is a multiple of {BLOCK}, got {d}",
                          "use another quantizer for this model")
    return d // BLOCK


class GGML(QuantFamily):
    name = "ggml"
    Params = GGMLParams

    def bits(self, p: GGMLParams) -> float:
        return p.code_bits

    def label(self, p: GGMLParams, short: bool = False) -> str:
        return p.type if short else f"ggml/{p.type}"

    def fields(self, p: GGMLParams, d: int, flush: int) -> tuple[FieldDecl, ...]:
        nb = _blocks(d)
        out = [FieldDecl("d", "token", nb, "float16", "scales")]
        if p.has_min:
            out.append(FieldDecl("m", "token", nb, "float16", "zeros"))
        if p.code_bits == 5:
            out.append(FieldDecl("qh", "token", nb * 4, "uint8", "codes"))
        out.append(FieldDecl("qs", "token", d if p.code_bits == 8 else nb * 16, "uint8", "codes"))
        return tuple(out)

    def encode(self, p: GGMLParams, x: torch.Tensor, flush: int, state: Mapping[str, torch.Tensor]) -> Fields:
        if not torch.isfinite(x).all():
            raise KVTuneError("non-finite values (NaN/inf) in a tensor to quantize", "check the model's activations")
        xb = x.float().reshape(*x.shape[:-1], _blocks(x.shape[-1]), BLOCK)  # [..., T, nb, 32]
        q, d, m = _ENCODERS[p.type](xb)
        out: Fields = {"d": d.to(torch.float16)}
        if p.has_min:
            out["m"] = m.to(torch.float16)
        if p.code_bits == 8:
            out["qs"] = q.to(torch.int8).view(torch.uint8).reshape(x.shape)
            return out
        q = q.to(torch.int32)
        nib = q & 0xF
        out["qs"] = (nib[..., :16] | (nib[..., 16:] << 4)).to(torch.uint8).flatten(-2)
        if p.code_bits == 5:
            high = ((q >> 4) & 1).reshape(*q.shape[:-1], 4, 8)  # bit j of the block's uint32 = code j's 5th bit
            weights = 1 << torch.arange(8, dtype=torch.int32, device=x.device)
            out["qh"] = (high * weights).sum(-1).to(torch.uint8).flatten(-2)
        return out

    def decode(self, p: GGMLParams, fields: Mapping[str, torch.Tensor], flush: int, d: int,
               state: Mapping[str, torch.Tensor]) -> torch.Tensor:
        nb = _blocks(d)
        scale = fields["d"].float().unsqueeze(-1)  # [..., T, nb, 1]
        qs = fields["qs"]
        if p.code_bits == 8:
            q = qs.contiguous().view(torch.int8).float().reshape(*qs.shape[:-1], nb, BLOCK)
            return (q * scale).flatten(-2)
        b = qs.to(torch.int32).reshape(*qs.shape[:-1], nb, 16)
        q = torch.cat([b & 0xF, b >> 4], -1)  # [..., T, nb, 32]
        if p.code_bits == 5:
            h = fields["qh"].to(torch.int32).reshape(*qs.shape[:-1], nb, 4, 1)
            bits = (h >> torch.arange(8, dtype=torch.int32, device=qs.device)) & 1
            q = q | (bits.reshape(*qs.shape[:-1], nb, BLOCK) << 4)
        if p.type == "iq4_nl":
            y = torch.tensor(IQ4NL, dtype=torch.float32, device=qs.device)[q.long()] * scale
        elif p.has_min:
            y = q.float() * scale + fields["m"].float().unsqueeze(-1)
        else:
            y = (q.float() - (1 << (p.code_bits - 1))) * scale
        return y.flatten(-2)


def _inv(d: torch.Tensor) -> torch.Tensor:
    """``d ? 1/d : 0`` in float32."""
    return torch.where(d != 0, 1.0 / torch.where(d != 0, d, torch.ones_like(d)), torch.zeros_like(d))


def _signed_max(xb: torch.Tensor) -> torch.Tensor:
    """The value of largest magnitude in each block (the first one on ties), ``[..., nb]``."""
    return xb.gather(-1, xb.abs().argmax(-1, keepdim=True)).squeeze(-1)


def _q8_0(xb: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, None]:
    d = xb.abs().amax(-1) / 127
    v = xb * _inv(d).unsqueeze(-1)
    return torch.sign(v) * torch.floor(v.abs() + 0.5), d, None  # roundf: half away from zero


def _sym(levels: int) -> Any:
    def enc(xb: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, None]:
        d = _signed_max(xb) / -(levels // 2)
        q = torch.floor(xb * _inv(d).unsqueeze(-1) + (levels // 2 + 0.5)).clamp(0, levels - 1)
        return q, d, None
    return enc


def _minmax(levels: int) -> Any:
    def enc(xb: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        lo = xb.amin(-1)
        d = (xb.amax(-1) - lo) / (levels - 1)
        q = torch.floor((xb - lo.unsqueeze(-1)) * _inv(d).unsqueeze(-1) + 0.5).clamp(0, levels - 1)
        return q, d, lo
    return enc


def _iq4_nl(xb: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, None]:
    kv = torch.tensor(IQ4NL, dtype=torch.float32, device=xb.device)
    d0 = _signed_max(xb) / kv[0]
    q = torch.bucketize(xb * _inv(d0).unsqueeze(-1), (kv[1:] + kv[:-1]) / 2, right=True)  # ties: upper level
    v, w = kv[q], xb * xb
    sumqx, sumq2 = (w * v * xb).sum(-1), (w * v * v).sum(-1)
    d = torch.where(sumq2 > 0, sumqx / torch.where(sumq2 > 0, sumq2, torch.ones_like(sumq2)), d0)
    return q, d, None


_ENCODERS = {"q8_0": _q8_0, "q4_0": _sym(16), "q5_0": _sym(32), "q4_1": _minmax(16), "q5_1": _minmax(32),
             "iq4_nl": _iq4_nl}


def ggml(type_: str, rotation: str = "hadamard", **wrappers: Any) -> QuantSpec:
    """A ``ggml`` spec as llama.cpp stores it (rotated by default): ``ggml("q8_0")``, ``ggml("q4_0")``."""
    return QuantSpec("ggml", GGMLParams(type=type_), rotation, **wrappers)


FAMILY = GGML()
