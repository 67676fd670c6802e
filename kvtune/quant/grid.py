"""The integer grid: codes ``c`` in ``[0, levels)`` that dequantize as ``c * scale + zero``, per group.

Tensors are ``[..., T, D]``. Two grouping axes: ``axis="channel"`` (KIVI keys) has statistics per channel
over ``group`` consecutive tokens, scales ``[..., T/G, D]``; ``axis="token"`` (KIVI values) per token over
``group`` consecutive channels, scales ``[..., T, ceil(D/G)]``. ``group = 0`` is the whole axis.

Grids:

* asymmetric b-bit: ``scale = (max - min) / (2^b - 1)``, ``zero = min`` (both stored);
* symmetric b-bit: ``o = 2^(b-1) - 1``, ``scale = absmax / o``, ``zero = -o * scale`` (not stored);
* ternary (1.58): ``scale = absmax``, codes ``{0, 1, 2}`` = ``{-1, 0, +1}``, ``zero = -scale`` (not stored).

A zero-range group gets ``scale = 1`` so it reconstructs exactly; scales and zeros are rounded to the stored
dtype *before* codes are computed, so ``|x - x^| <= scale / 2`` holds with the stored values. Non-finite
input is an error, never a silent NaN.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Protocol

import torch

from kvtune.errors import KVTuneError
from kvtune.quant.codes import code_format

SCALE_DTYPES: dict[str, torch.dtype] = {"float16": torch.float16, "bfloat16": torch.bfloat16,
                                        "float32": torch.float32}
LOG_SPAN_FLOOR = 1e-3  # smallest log2 span of a one-byte (log8) scale range: normq's encode/decode and the kernel's


class Grid(Protocol):
    """What the grid reads of a spec (the affine family's parameters have these)."""

    bits: float
    axis: str
    group: int
    symmetric: bool
    scale_dtype: str


@dataclass
class Quantized:
    """Unpacked codes and parameters of one quantized tensor (shapes in the module doc)."""

    codes: torch.Tensor  # uint8 [..., T, D]
    scale: torch.Tensor  # scale dtype, [..., T/G, D] or [..., T, D/G]
    zero: torch.Tensor  # same shape as scale (derived from scale when not stored)


def stores_zero(g: Grid) -> bool:
    """Asymmetric binary grids store a zero-point; symmetric and ternary derive it from the scale."""
    return not (g.symmetric or code_format(g.bits).base == 3)


def derived_zero(scale: torch.Tensor, g: Grid) -> torch.Tensor:
    """The zero-point of a grid that does not store one, float32."""
    half = 1 if code_format(g.bits).base == 3 else 2 ** (int(g.bits) - 1) - 1
    return -half * scale.float()


def grouped(x: torch.Tensor, g: Grid) -> torch.Tensor:
    """View ``[..., T, D]`` so that dim -2 (channel axis) or -1 (token axis) runs inside a group."""
    t, d = x.shape[-2:]
    if g.axis == "channel":
        n = g.group or t
        if t % n:
            raise KVTuneError(f"{t} tokens is not a multiple of the key group {n}", "quantize whole groups")
        return x.reshape(*x.shape[:-2], t // n, n, d)
    n = min(g.group or d, d)
    if d % n:  # ragged last group (e.g. after outlier channels left): repeat the edge, min/max unchanged
        x = torch.cat([x, x[..., -1:].expand(*x.shape[:-1], n - d % n)], dim=-1)
    return x.reshape(*x.shape[:-1], x.shape[-1] // n, n)


def _ungroup(xg: torch.Tensor, shape: torch.Size, g: Grid) -> torch.Tensor:
    """Undo :func:`grouped` (dropping channel padding) back to ``shape`` ``[..., T, D]``."""
    if g.axis == "token":
        return xg.reshape(*xg.shape[:-2], xg.shape[-2] * xg.shape[-1])[..., : shape[-1]]
    return xg.reshape(shape)


def _reduce_dim(g: Grid) -> int:
    return -2 if g.axis == "channel" else -1


def _params(xg: torch.Tensor, g: Grid) -> tuple[torch.Tensor, torch.Tensor]:
    """Scale and zero with a kept group dim, rounded to the stored dtype, returned as float32."""
    fmt, dim, sdt = code_format(g.bits), _reduce_dim(g), SCALE_DTYPES[g.scale_dtype]
    if fmt.base == 3 or g.symmetric:
        half = 1 if fmt.base == 3 else 2 ** (int(fmt.bits) - 1) - 1
        scale = xg.abs().amax(dim=dim, keepdim=True) / half
        scale = torch.where(scale > 0, scale, torch.ones_like(scale)).to(sdt).float()
        return scale, -half * scale
    lo, hi = xg.amin(dim=dim, keepdim=True), xg.amax(dim=dim, keepdim=True)
    zero = lo.to(sdt).float()
    scale = ((hi - zero) / (fmt.levels - 1)).to(sdt).float()
    return torch.where(scale > 0, scale, torch.ones_like(scale)), zero


def capturing(x: torch.Tensor) -> bool:
    """Whether ``x``'s device is recording a CUDA graph (host syncs such as finiteness checks are not allowed)."""
    return x.is_cuda and torch.cuda.is_current_stream_capturing()


def quantize(x: torch.Tensor, g: Grid) -> Quantized:
    """Quantize ``x`` ``[..., T, D]`` on grid ``g``. Codes are uint8 ``[..., T, D]`` (the finiteness check, a
    host sync, is skipped while a CUDA graph is captured)."""
    if not capturing(x) and not torch.isfinite(x).all():
        raise KVTuneError("non-finite values (NaN/inf) in a tensor to quantize", "check the model's activations")
    xg = grouped(x.float(), g)
    scale, zero = _params(xg, g)
    codes = torch.round((xg - zero) / scale).clamp_(0, code_format(g.bits).levels - 1).to(torch.uint8)
    dim, sdt = _reduce_dim(g), SCALE_DTYPES[g.scale_dtype]
    return Quantized(_ungroup(codes, x.shape, g), scale.squeeze(dim).to(sdt), zero.squeeze(dim).to(sdt))


def dequantize(q: Quantized, g: Grid, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """``codes * scale + zero`` broadcast per group: ``[..., T, D]`` in ``dtype``."""
    dim = _reduce_dim(g)
    cg = grouped(q.codes.float(), g)
    out = cg * q.scale.float().unsqueeze(dim) + q.zero.float().unsqueeze(dim)
    return _ungroup(out, q.codes.shape, g).to(dtype)
