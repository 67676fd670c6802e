"""Calibrated state of an engine plan (fp8 scales, ...) from a calibration artifact.

Every ``layer``-scope field the engine layers declare is fitted by its family on the calibration's reservoir
sample of that layer (``samples.{key|value}`` ``[L, Hkv, n, D]``) plus one row of the per-channel absolute maxima
over all calibration tokens (``{keys|values}.absmax`` ``[L, Hkv, D]``, post-RoPE keys: what engines cache), so a
max-based scale (fp8's ``amax / 448``) sees the true maximum, not the sample's.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch

from kvtune.errors import KVTuneError
from kvtune.plan_types import LayerPlan
from kvtune.quant import codec

SOURCES = {"key": ("samples.key", "keys.absmax"), "value": ("samples.value", "values.absmax")}


def needs_state(layers: Sequence[LayerPlan], num_kv_heads: int, head_dim: int) -> bool:
    return any(codec.layer_fields(getattr(h, role), head_dim)
               for layer in layers for h in layer.head_plans(num_kv_heads) for role in SOURCES)


def fit_state(layers: Sequence[LayerPlan], calib: Any, num_kv_heads: int, head_dim: int) -> dict[str, torch.Tensor]:
    """Plan tensors ``layers.{i}.{role}.{field}`` ``[Hkv, width]`` (the declared dtype) for ``layers``."""
    out: dict[str, torch.Tensor] = {}
    for i, layer in enumerate(layers):
        for role, (samples, absmax) in SOURCES.items():
            specs = {getattr(h, role) for h in layer.head_plans(num_kv_heads)}
            if not any(codec.layer_fields(s, head_dim) for s in specs):
                continue
            if len(specs) > 1:
                raise KVTuneError(f"layer {i}: engine layers have one {role} format for all heads")
            if calib is None:
                raise KVTuneError(f"layer {i} {role}: this engine format needs calibrated scales",
                                  "pass --calib DIR (kvtune calibrate --tokens 8192 --out DIR is enough)")
            spec = specs.pop()
            x = torch.cat([calib.tensor(samples)[i].float(), calib.tensor(absmax)[i].float().unsqueeze(1)], 1)
            decl = codec.layer_fields(spec, head_dim)
            for name, t in codec.fit(spec, x).items():
                out[f"layers.{i}.{role}.{name}"] = t.to(decl[name].torch_dtype)
    return out
