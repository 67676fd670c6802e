"""The ``"kvtune-static"`` attention implementation: single-token steps over a :class:`StaticKVTuneCache`.

:meth:`StaticLayer.update <kvtune.runtime.static_cache.StaticLayer.update>` registers itself for the key tensor it
returns; this function hands the query to that layer (fused kernel over the packed buffers and the window, then
the flush when due). A prompt (several query tokens) attends with the model's own attention over its own tokens
(:func:`kvtune.runtime.scores.model_attention`), as in the dynamic path. The mask function builds transformers'
SDPA mask for prompts and none for single tokens, so a decode step does no mask work (left padding and windows
live in the cache's device tensors).
"""

from __future__ import annotations

from typing import Any

import torch

from kvtune.errors import KVTuneError
from kvtune.runtime.scores import ScoreMods, model_attention

NAME = "kvtune-static"
_PENDING: dict[int, tuple[torch.Tensor, Any]] = {}  # id(key tensor) -> (that tensor, layer)


def register(key: torch.Tensor, layer: Any) -> None:
    """Called by a static layer's ``update`` for the key tensor the model passes on to attention."""
    _PENDING[id(key)] = (key, layer)


def _take(key: torch.Tensor) -> Any:
    entry = _PENDING.pop(id(key), None)
    return entry[1] if entry is not None and entry[0] is key else None


def static_attention(module: Any, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor,
                     attention_mask: torch.Tensor | None, scaling: float | None = None, dropout: float = 0.0,
                     **kwargs: Any) -> tuple[torch.Tensor, None]:
    """``query [B, Hq, L, D]`` -> ``(out [B, L, Hq, D], None)``."""
    layer = _take(key)
    if layer is None or query.shape[2] != 1:
        return model_attention(module, query, key, value, attention_mask, scaling=scaling, dropout=dropout, **kwargs)
    if not ScoreMods.from_kwargs(kwargs).plain:  # StaticKVTuneCache refuses such models; a backstop
        raise KVTuneError("the static cache's kernel has no attention soft-capping or sinks",
                          "use plan.cache(model) (dynamic cache)")
    scaling = query.shape[-1] ** -0.5 if scaling is None else float(scaling)
    return layer.attend(query, scaling).transpose(1, 2), None


def static_mask(*args: Any, **kwargs: Any) -> Any:
    """transformers' SDPA mask for a prompt; ``None`` for one query token (``q_length`` in recent transformers,
    ``cache_position`` before)."""
    from transformers.masking_utils import sdpa_mask

    q_len = kwargs.get("q_length")
    if q_len is None and kwargs.get("cache_position") is not None:
        q_len = kwargs["cache_position"].shape[0]
    if q_len == 1:
        return None
    return sdpa_mask(*args, **kwargs)


def install(model: Any) -> None:
    """Register ``"kvtune-static"`` once and switch ``model`` to it."""
    from kvtune.runtime.attention import use_attention

    use_attention(model, NAME, static_attention, static_mask)
