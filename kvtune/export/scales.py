"""KV scale tensors as checkpoints name them, from and to the plan's ``fp8_scale`` state ``[Hkv, 1]`` float32.

compressed-tensors (loaded by vLLM's ``compressed_tensors.py`` + ``kv_cache.py`` ``BaseKVCacheMethod``, SGLang's
``kv_cache.py``): ``model.layers.{i}.self_attn.k_scale`` / ``v_scale``, float32 ``[1]`` (per tensor) or
``[num_kv_heads, 1, 1]`` (``attn_head``). ModelOpt (vLLM ``modelopt.py`` remaps them onto the attention layer):
``model.layers.{i}.self_attn.k_proj.k_scale`` / ``v_proj.v_scale``, float32 scalars ``[]`` (amax / 448).
"""

from __future__ import annotations

from collections.abc import Mapping

import torch

from kvtune.plan_types import ModelIdentity
from kvtune.quant.families.fp8 import STATE

LAYOUTS = {"compressed-tensors": ("model.layers.{i}.self_attn.k_scale", "model.layers.{i}.self_attn.v_scale"),
           "modelopt": ("model.layers.{i}.self_attn.k_proj.k_scale", "model.layers.{i}.self_attn.v_proj.v_scale")}
ROLES = ("key", "value")


def to_checkpoint(tensors: Mapping[str, torch.Tensor], layout: str, per_head: bool = False) -> dict[str, torch.Tensor]:
    """Plan tensors ``layers.{i}.{role}.fp8_scale`` -> checkpoint tensors of ``layout``."""
    out = {}
    for name, t in tensors.items():
        _, i, role, field = name.split(".")
        if field != STATE:
            continue
        key = LAYOUTS[layout][ROLES.index(role)].format(i=i)
        t = t.float()
        out[key] = t.reshape(-1, 1, 1) if per_head else t[0].reshape(() if layout == "modelopt" else (1,))
    return out


def from_checkpoint(scales: Mapping[str, torch.Tensor], layout: str,
                    identity: ModelIdentity) -> dict[str, torch.Tensor]:
    """Checkpoint tensors of ``layout`` -> plan tensors ``layers.{i}.{role}.fp8_scale`` ``[Hkv, 1]`` float32."""
    out = {}
    for i in range(identity.num_layers):
        for r, role in enumerate(ROLES):
            t = scales.get(LAYOUTS[layout][r].format(i=i))
            if t is not None:
                out[f"layers.{i}.{role}.{STATE}"] = t.float().reshape(-1, 1).expand(identity.num_kv_heads, 1).clone()
    return out
