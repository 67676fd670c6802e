"""``fp8``: 8-bit floats with a static scale, what vLLM, SGLang, TensorRT-LLM and compressed-tensors store.

A value is stored as ``fp8(clamp(x / s, -max, max))`` and read back as ``fp8 * s``: E4M3 (``e4m3``, the OCP
``float8_e4m3fn``, max 448) or E5M2 (``e5m2``, max 57344), rounded to nearest even, saturated at the largest
finite value. The scale ``s`` is calibrated state (``layer`` scope, stored in the plan's tensors as
``layers.{i}.{key|value}.fp8_scale``): ``amax / max`` per tensor (``scale: tensor``, one value for every head of
the layer, what vLLM's ``k_scale``/``v_scale`` of shape ``[1]`` hold), per KV head (``scale: head``,
compressed-tensors' ``attn_head`` strategy, ``[num_kv_heads, 1, 1]``), or 1 (``scale: none``: a plain cast, what
an engine does when the checkpoint carries no scales, e.g. vLLM's ``fp8_e5m2`` and TurboQuant's FP8 keys).

The engines' definition: vLLM ``vllm/model_executor/layers/quantization/kv_cache.py`` (scales loaded per layer)
and its ``scaled_fp8_conversion`` (divide, clamp to the format's max, cast). Stored per head: ``codes`` uint8
``[T, D]`` (the fp8 bit patterns) and, unless ``scale: none``, ``fp8_scale`` float32 ``[1]`` once per layer.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import torch

from kvtune.errors import KVTuneError
from kvtune.quant.family import FieldDecl, Fields, QuantFamily
from kvtune.quant.formats import QuantSpec

FORMATS: dict[str, tuple[torch.dtype, float]] = {"e4m3": (torch.float8_e4m3fn, 448.0),
                                                 "e5m2": (torch.float8_e5m2, 57344.0)}
SCALES = ("tensor", "head", "none")
STATE = "fp8_scale"


@dataclass(frozen=True)
class FP8Params:
    """See the module docstring. ``bits`` is fixed at 8 (accepted so that flat YAML reads naturally)."""

    format: str = "e4m3"
    scale: str = "tensor"
    bits: float = 8

    def __post_init__(self) -> None:
        if self.format not in FORMATS:
            raise ValueError(f"fp8 format must be one of {tuple(FORMATS)}, got {self.format!r}")
        if self.scale not in SCALES:
            raise ValueError(f"fp8 scale must be one of {SCALES}, got {self.scale!r}")
        if self.bits != 8:
            raise ValueError(f"fp8 stores 8 bits, got bits={self.bits}")

    @property
    def max(self) -> float:
        return FORMATS[self.format][1]

    @property
    def dtype(self) -> torch.dtype:
        return FORMATS[self.format][0]


class FP8(QuantFamily):
    name = "fp8"
    Params = FP8Params

    def bits(self, p: FP8Params) -> float:
        return 8

    def label(self, p: FP8Params, short: bool = False) -> str:
        if short:
            return f"f8{p.format[1]}" + {"tensor": "", "head": "h", "none": "u"}[p.scale]
        return f"fp8/{p.format}/" + {"tensor": "tensor", "head": "head", "none": "unscaled"}[p.scale]

    def fields(self, p: FP8Params, d: int, flush: int) -> tuple[FieldDecl, ...]:
        codes = FieldDecl("codes", "token", d, "uint8", "codes")
        return (codes,) if p.scale == "none" else (FieldDecl(STATE, "layer", 1, "float32", "scales"), codes)

    def fit(self, p: FP8Params, sample: torch.Tensor) -> Fields:
        """``amax / max`` of ``sample [h, N, D]`` per head, or the layer's largest for every head: float32 ``[h, 1]``.
        Only the absolute maximum matters, so a calibration's per-channel absmax ``[h, 1, D]`` fits the same."""
        if p.scale == "none":
            return {}
        amax = sample.float().abs().amax(dim=(-2, -1))  # [h]
        if p.scale == "tensor":
            amax = amax.amax().expand_as(amax)
        scale = amax / p.max
        return {STATE: torch.where(scale > 0, scale, torch.ones_like(scale)).reshape(-1, 1).float()}

    def encode(self, p: FP8Params, x: torch.Tensor, flush: int, state: Mapping[str, torch.Tensor]) -> Fields:
        if not torch.isfinite(x).all():
            raise KVTuneError("non-finite values (NaN/inf) in a tensor to quantize", "check the model's activations")
        y = (x.float() / _scale(p, state, x)).clamp(-p.max, p.max)
        return {"codes": y.to(p.dtype).view(torch.uint8)}

    def decode(self, p: FP8Params, fields: Mapping[str, torch.Tensor], flush: int, d: int,
               state: Mapping[str, torch.Tensor]) -> torch.Tensor:
        codes = fields["codes"]
        return codes.contiguous().view(p.dtype).float() * _scale(p, state, codes)


def _scale(p: FP8Params, state: Mapping[str, torch.Tensor], like: torch.Tensor) -> torch.Tensor:
    """The scale broadcast over ``like [..., h, T, D]``: ``[h, 1, 1]`` float32 (a scalar 1 when unscaled)."""
    if p.scale == "none":
        return torch.ones((), device=like.device)
    s = state.get(STATE)
    if s is None:
        raise ValueError("an fp8 spec with a static scale needs it (state['fp8_scale'])")
    return s.to(device=like.device, dtype=torch.float32)[..., None]


def fp8(fmt: str = "e4m3", scale: str = "tensor", **wrappers: Any) -> QuantSpec:
    """An ``fp8`` spec: ``fp8()``, ``fp8("e5m2", "none")``, ``fp8(scale="head")``."""
    return QuantSpec("fp8", FP8Params(format=fmt, scale=scale), **wrappers)


FAMILY = FP8()
