"""Outlier channels: kept out of the main quantizer (KVQuant dense-and-sparse, VidKV anomalous keys).

A wrapper any family can use (:mod:`kvtune.quant.codec` applies it). Channels are chosen per head, either
from calibration (stored in the plan as ``outlier_idx``) or from the data at hand by :func:`rank_channels`.
The family sees the remaining ``D - o`` channels; the outlier channels are stored by their own quantizer
(:func:`outlier_spec`) with their ``o`` indices (int16 each, per head: a ``layer``-scope field).
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import torch

if TYPE_CHECKING:
    from kvtune.quant.formats import QuantSpec

INDEX_FIELD = "outlier_idx"
PREFIX = "out."


def outlier_spec(spec: QuantSpec) -> QuantSpec:
    """The quantizer of ``spec``'s outlier channels: fp16, or per channel at ``outlier_bits`` over the main
    spec's token group (one group per flushed block when the main spec groups single tokens)."""
    from kvtune.quant.formats import affine

    group = spec.token_group if spec.token_group != 1 else 0
    return affine(spec.outlier_bits, "channel", group)


def outlier_scores(x: torch.Tensor) -> torch.Tensor:
    """Channel magnitude relative to the head's median channel: ``[..., T, D] -> [..., D]``."""
    amax = x.float().abs().amax(dim=-2)
    median = amax.median(dim=-1, keepdim=True).values.clamp_min(1e-12)
    return amax / median


def rank_channels(x: torch.Tensor, count: int) -> torch.Tensor:
    """Indices of the ``count`` most outlying channels, sorted ascending: ``[..., T, D] -> [..., count]``."""
    if count == 0:
        return torch.zeros(*x.shape[:-2], 0, dtype=torch.long, device=x.device)
    top = outlier_scores(x).topk(count, dim=-1).indices
    return top.sort(dim=-1).values


def split_channels(x: torch.Tensor, idx: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Split ``x`` ``[..., T, D]`` into (main ``[..., T, D-o]``, outliers ``[..., T, o]``) by ``idx`` ``[..., o]``.

    ``idx`` broadcasts over the token axis; its leading dims must match ``x``'s.
    """
    d = x.shape[-1]
    keep = torch.ones(*idx.shape[:-1], d, dtype=torch.bool, device=x.device)
    keep.scatter_(-1, idx.long(), False)
    gather_out = idx.long().unsqueeze(-2).expand(*x.shape[:-1], idx.shape[-1])
    main_idx = keep.nonzero()[:, -1].reshape(*idx.shape[:-1], d - idx.shape[-1])
    gather_main = main_idx.unsqueeze(-2).expand(*x.shape[:-1], main_idx.shape[-1])
    return x.gather(-1, gather_main), x.gather(-1, gather_out)


def merge_channels(main: torch.Tensor, out: torch.Tensor, idx: torch.Tensor) -> torch.Tensor:
    """Inverse of :func:`split_channels`: ``[..., T, D-o]`` + ``[..., T, o]`` -> ``[..., T, D]``."""
    d = main.shape[-1] + out.shape[-1]
    full = torch.empty(*main.shape[:-1], d, dtype=main.dtype, device=main.device)
    keep = torch.ones(*idx.shape[:-1], d, dtype=torch.bool, device=main.device)
    keep.scatter_(-1, idx.long(), False)
    main_idx = keep.nonzero()[:, -1].reshape(*idx.shape[:-1], d - idx.shape[-1])
    full.scatter_(-1, main_idx.unsqueeze(-2).expand_as(main), main)
    full.scatter_(-1, idx.long().unsqueeze(-2).expand_as(out.to(main.dtype)), out.to(main.dtype))
    return full
