"""Calibrated quantizer state from a calibration into a plan: the chosen candidates' fitted ``layer`` fields.

Calibration fits every candidate's own ``layer``-scope state on its sample (``fitted.{role}.{c}.{field}``
``[L, Hkv, width]``, e.g. a ``static`` spec's per-channel steps). A study keeps them in its user attributes
(JSON, so that a plan can be written again later without the calibration), and a plan gets, for each layer and
role, the rows of the candidate each head chose: ``layers.{i}.{role}.{field}`` ``[Hkv, width]`` (heads whose
spec has no such field get zeros, which the runtime never reads).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import torch

from kvtune.plan_types import LayerPlan
from kvtune.quant import codec
from kvtune.quant.formats import QuantSpec
from kvtune.quant.outliers import INDEX_FIELD

PREFIX = "fitted."


def fitted_from_tensors(tensors: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """``{role.c.field: [L, Hkv, width]}`` from a calibration's tensors."""
    return {name[len(PREFIX):]: t for name, t in tensors.items() if name.startswith(PREFIX)}


def fitted_attrs(fitted: Mapping[str, torch.Tensor]) -> dict[str, Any]:
    """The fitted state as JSON-able nested lists (for a study's user attributes)."""
    return {name: t.float().tolist() for name, t in fitted.items()}


def state_tensors(layers: Sequence[LayerPlan], candidates: Mapping[str, Sequence[QuantSpec]],
                  fitted: Mapping[str, Any], num_kv_heads: int, head_dim: int) -> dict[str, torch.Tensor]:
    """Plan tensors ``layers.{i}.{role}.{field}`` ``[Hkv, width]`` float16 for every chosen spec with fitted state."""
    out: dict[str, torch.Tensor] = {}
    for i, layer in enumerate(layers):
        heads = layer.head_plans(num_kv_heads)
        for role in ("key", "value"):
            rows: dict[str, dict[int, Any]] = {}
            for h, hp in enumerate(heads):
                spec = getattr(hp, role)
                names = codec.layer_fields(spec, head_dim).keys() - {INDEX_FIELD}
                if names and spec in candidates[role]:
                    c = list(candidates[role]).index(spec)
                    for name in names:
                        rows.setdefault(name, {})[h] = fitted[f"{role}.{c}.{name}"][i][h]
            for name, by_head in rows.items():
                width = max(len(r) for r in by_head.values())
                t = torch.zeros(num_kv_heads, width)
                for h, r in by_head.items():
                    t[h, : len(r)] = torch.as_tensor(r)
                out[f"layers.{i}.{role}.{name}"] = t.half()
    return out
