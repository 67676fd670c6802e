"""Capture (and optionally replace) what each attention layer sees, inside a context manager.

``with capture(model, on_attention=..., on_key_pre_rope=...):`` installs, for the duration of the block:

* a forward hook on every ``self_attn.k_proj`` (or a fused ``qkv_proj``, its key slice):
  ``on_key_pre_rope(layer, key)`` with the keys *before* RoPE, ``key`` ``[B, Hkv, T, D]``
  (KVQuant quantizes keys there);
* the attention implementation ``"kvtune_capture"`` (registered with transformers' ``AttentionInterface``
  and, with the SDPA mask builder, ``AttentionMaskInterface``): before running SDPA it calls
  ``on_attention(call)`` with an :class:`AttentionCall` holding the layer's post-RoPE query/key/value
  exactly as the attention function receives them (after any cache update) and what the layer attends (its
  :class:`~kvtune.layout.LayerSpan`). If the observer returns a
  ``(key, value)`` pair, SDPA runs on those instead: that is how a layer's K or V is fake-quantized.

On exit -- normal or by exception -- every hook handle is removed and the model's previous attention
implementation is restored (``model.set_attn_implementation``). While capturing, attention runs through
the model's own maths (:func:`kvtune.runtime.scores.model_attention`: transformers' SDPA, or eager float32 where
the model soft-caps scores or has sinks) whatever the model used before (within rounding).
The registrations in transformers' global interfaces happen on first use, never on import, and are
inert for models that do not select ``"kvtune_capture"``.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any

import torch

from kvtune.layout import GLOBAL, LayerSpan, layout_of
from kvtune.models import check_supported, text_config
from kvtune.support import pre_rope_keys, projections_of

log = logging.getLogger(__name__)

CAPTURE_IMPL = "kvtune_capture"


@dataclass(frozen=True)
class AttentionCall:
    """One call of one attention layer: ``query`` ``[B, Hq, T, D]``, ``key``/``value`` ``[B, Hkv, S, D]``.

    ``scaling`` is the softmax scale (``1/sqrt(D)`` for Llama); ``span`` what the layer attends (global, a sliding
    window, a chunk: :mod:`kvtune.layout`, from the config).
    """

    layer: int
    query: torch.Tensor
    key: torch.Tensor
    value: torch.Tensor
    scaling: float
    span: LayerSpan = GLOBAL


AttentionObserver = Callable[[AttentionCall], "tuple[torch.Tensor, torch.Tensor] | None"]
KeyObserver = Callable[[int, torch.Tensor], None]

_ROUTES: dict[int, tuple[int, AttentionObserver, LayerSpan]] = {}  # id(attention module) -> (layer, observer, span)
_REGISTERED = False


def _capture_attention(module: torch.nn.Module, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor,
                       attention_mask: torch.Tensor | None, **kwargs: Any) -> tuple[torch.Tensor, Any]:
    """The registered attention function: route to the observer, then the model's own attention maths (SDPA, or
    eager float32 where it soft-caps scores or has sinks: :func:`kvtune.runtime.scores.model_attention`)."""
    from kvtune.runtime.scores import model_attention

    route = _ROUTES.get(id(module))
    if route is not None:
        layer, observer, span = route
        scaling = kwargs.get("scaling")
        call = AttentionCall(layer, query, key, value,
                             float(scaling if scaling is not None else query.shape[-1] ** -0.5), span)
        replaced = observer(call)
        if replaced is not None:
            key, value = replaced
    return model_attention(module, query, key, value, attention_mask, **kwargs)


def _register() -> None:
    global _REGISTERED
    if _REGISTERED:
        return
    from transformers import AttentionInterface
    from transformers.masking_utils import AttentionMaskInterface, sdpa_mask

    AttentionInterface.register(CAPTURE_IMPL, _capture_attention)
    AttentionMaskInterface.register(CAPTURE_IMPL, sdpa_mask)
    _REGISTERED = True


def attention_modules(model: Any) -> list[tuple[int, torch.nn.Module]]:
    """``(layer index, self_attn module)`` for every decoder layer of a supported model."""
    from kvtune.models import decoder_layers

    return [(int(getattr(layer.self_attn, "layer_idx", i)), layer.self_attn)
            for i, layer in enumerate(decoder_layers(model))]


def _pre_rope_hook(layer: int, attn: Any, shape: tuple[int, int, int], observer: KeyObserver) -> Callable[..., None]:
    """Hook on ``attn``'s key projection module; ``shape``: (query heads, KV heads, head dim)."""
    def hook(_module: torch.nn.Module, _inputs: Any, output: torch.Tensor) -> None:
        observer(layer, pre_rope_keys(attn, output, *shape))  # [B, Hkv, T, D]

    return hook


@contextmanager
def capture(model: Any, on_attention: AttentionObserver | None = None,
            on_key_pre_rope: KeyObserver | None = None) -> Iterator[None]:
    """Install capture hooks on ``model`` for the ``with`` block; always removed in ``finally``.

    ``on_attention(call: AttentionCall) -> (key, value) | None`` sees every attention call (post-RoPE);
    ``on_key_pre_rope(layer, key [B, Hkv, T, D])`` sees the k_proj output of every layer.
    """
    check_supported(model)
    modules = attention_modules(model)
    original = model.config._attn_implementation
    handles: list[Any] = []
    previous: dict[int, tuple[int, AttentionObserver] | None] = {}  # nested captures restore the outer routes
    try:
        if on_key_pre_rope is not None:
            text = text_config(model.config)
            hq = int(text.num_attention_heads)
            hkv = int(getattr(text, "num_key_value_heads", None) or hq)
            for layer, attn in modules:
                head_dim = int(getattr(attn, "head_dim", None) or text.hidden_size // hq)
                module = getattr(attn, projections_of(attn).key)
                hook = _pre_rope_hook(layer, attn, (hq, hkv, head_dim), on_key_pre_rope)
                handles.append(module.register_forward_hook(hook))
        if on_attention is not None:
            _register()
            spans = layout_of(model.config).spans
            for layer, attn in modules:
                previous[id(attn)] = _ROUTES.get(id(attn))
                _ROUTES[id(attn)] = (layer, on_attention, spans[layer])
            model.set_attn_implementation(CAPTURE_IMPL)
        yield
    finally:
        for handle in handles:
            handle.remove()
        for key, route in previous.items():
            if route is None:
                _ROUTES.pop(key, None)
            else:
                _ROUTES[key] = route
        if model.config._attn_implementation != original:
            model.set_attn_implementation(original)
