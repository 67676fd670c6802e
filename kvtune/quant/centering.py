"""Centering: a per-head mean vector taken off before quantizing and added back after (any family).

Keys and values of a head share a large common component (keys: a per-channel offset that RoPE's slow pairs
barely rotate; values: a mean direction). A per-token quantizer spends its range on it; removing it first leaves
smaller vectors to code (on SmolLM2's keys, 2-bit rotated norm codes lose a third less). The mean ``center``
``[h, D]`` (fp16, in the unrotated basis) is ``layer``-scope state: calibrated on the calibration sample and stored
in the plan (``layers.{i}.{role}.center``), else fitted on the first block stored. Adding it back is exact, so
attention sees ``x^ = mean + Q(x - mean)``. The fused decode kernel reads centered codes as they are and the fp16
tokens shifted into the same frame (:func:`shift`); its merge adds the value mean back to the output
(``decode_attention(out_mean=...)``, what :func:`unshift` states in PyTorch).
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import torch

from kvtune.quant.family import FieldDecl

CENTER_FIELD = "center"


def center_field(d: int) -> FieldDecl:
    """The stored mean: one fp16 row of ``d`` channels per head."""
    return FieldDecl(CENTER_FIELD, "layer", d, "float16", "zeros")


def fit_center(flat: torch.Tensor) -> torch.Tensor:
    """The per-head mean of a sample ``flat [h, N, D]``: fp16 ``[h, D]``."""
    return flat.float().mean(dim=1).half()


def _mean(state: Mapping[str, torch.Tensor], x: torch.Tensor) -> torch.Tensor:
    """The mean ``[h, 1, D]`` float32 on ``x``'s device, broadcasting over ``x [..., h, T, D]``."""
    mean = state.get(CENTER_FIELD)
    if mean is None:
        raise ValueError("a centered spec needs its mean (state['center'])")
    return mean.to(device=x.device, dtype=torch.float32)[..., None, :]


def remove(x: torch.Tensor, state: Mapping[str, torch.Tensor]) -> torch.Tensor:
    """``x [..., h, T, D] - mean`` (float32)."""
    return x.float() - _mean(state, x)


def restore(y: torch.Tensor, state: Mapping[str, torch.Tensor]) -> torch.Tensor:
    """``y [..., h, T, D] + mean`` (float32)."""
    return y + _mean(state, y)


def active(spec: Any, state: Mapping[str, torch.Tensor]) -> bool:
    """A centered spec with its mean: before the mean is fitted (no plan state, nothing stored yet) every token
    is fp16 and already in one frame."""
    return bool(spec.center) and CENTER_FIELD in state


def shift(spec: Any, state: Mapping[str, torch.Tensor], x: torch.Tensor) -> torch.Tensor:
    """What the fused decode kernel reads beside the codes of a centered ``spec``: the fp16 tokens ``x [B, h, R, D]``
    (sinks, window) minus the mean, so that every token of the head is in the same frame. Keys: each score then
    drops the same ``q . mean`` (softmax unchanged); values: the output drops ``mean`` (:func:`unshift`)."""
    return (x.float() - _mean(state, x)).to(x.dtype) if active(spec, state) else x


def unshift(spec: Any, state: Mapping[str, torch.Tensor], out: torch.Tensor) -> torch.Tensor:
    """The kernel's attention output ``out [B, h * n_rep, 1, D]`` over shifted values with the value mean added
    back (probabilities sum to one), each query head taking its KV head's mean."""
    if not active(spec, state):
        return out
    mean = _mean(state, out)  # [h, 1, D]
    return out + mean.repeat_interleave(out.shape[1] // mean.shape[0], dim=0).to(out.dtype)
