"""Teacher-forced logits through a cache: the one chunked loop of evaluation and search validation.

The first ``prefill`` tokens go through one forward (full-precision attention among them, then stored in the
cache, as in deployment); the rest go ``chunk`` tokens per forward, so earlier tokens are read back from the
cache. A :class:`~kvtune.runtime.cache.KVTuneCache` runs those chunks in *stepwise* mode, where each query
reads exactly what token-by-token decoding would have shown it (older tokens quantized, the fp16 window as it
was then); ``chunk=1`` is token-by-token decoding itself. Any other transformers ``Cache`` is used as it is.
"""

from __future__ import annotations

import itertools
from typing import Any

import torch

from kvtune.models import cache_kwargs
from kvtune.plan import Plan


@torch.no_grad()
def teacher_forced_logits(model: Any, cache: Plan | Any, input_ids: torch.Tensor, chunk: int = 64,
                          prefill: int = 0, token_types: Any = None) -> torch.Tensor:
    """``input_ids [B, T]`` int64 -> logits ``[B, T, V]`` float32 through ``cache``: a :class:`Plan` (a fresh
    cache of it is made) or a transformers ``Cache`` (fresh, used as is). ``token_types``: an int8 ``[B, T]`` mask
    of :mod:`kvtune.token_types`, for plans with per-type policies."""
    if chunk < 1:
        raise ValueError("chunk must be >= 1")
    if isinstance(cache, Plan):
        cache = cache.cache(model)
    if token_types is not None:
        cache.set_token_types(token_types, input_ids)
    t = input_ids.shape[1]
    bounds = sorted({0, *([min(prefill, t)] if prefill > 0 else []), *range(max(prefill, 0) + chunk, t, chunk), t})
    pieces = []
    for s, e in itertools.pairwise(bounds):
        if hasattr(cache, "stepwise"):
            cache.stepwise = s >= prefill
        out = model(input_ids[:, s:e], **cache_kwargs(model, cache))
        pieces.append(out.logits.float())
    return torch.cat(pieces, dim=1)
