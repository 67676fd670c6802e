"""Which models kvtune can run, checked before any work: from the config alone, then on the loaded model.

kvtune needs a decoder-only transformer (or a VLM's language model) whose every layer is softmax attention
with a per-head K/V cache of its own: global, sliding-window or chunked (:mod:`kvtune.layout`). Designs that
store something else are refused with one line naming the design (:data:`UNSUPPORTED`): encoder-decoder
models, multi-head latent attention (K/V compressed jointly into one latent), and layer types without such a
cache (linear attention, convolutions, shared KV). On the loaded model, each ``self_attn`` must expose its
projections in one of the :data:`PROJECTIONS` forms and dispatch through transformers' attention interface.
"""

from __future__ import annotations

import sys
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch

from kvtune.errors import KVTuneError

UNSUPPORTED: dict[str, tuple[Callable[[Any], bool], str]] = {
    "encoder-decoder": (lambda c: bool(getattr(c, "is_encoder_decoder", False)),
                        "its decoder cross-attends to an encoder; kvtune caches decoder-only self-attention"),
    "multi-head latent attention (MLA)": (lambda c: getattr(c, "kv_lora_rank", None) is not None,
                                          "K and V are one compressed latent, not per-head keys and values"),
    "cross-attention layers": (lambda c: bool(getattr(c, "cross_attention_layers", None)),
                               "some layers attend to image or encoder states, not a self-attention cache"),
}
"""Design name -> (detector on the text config, why kvtune cannot cache it)."""


@dataclass(frozen=True)
class Projections:
    """How a ``self_attn`` exposes its projections: ``names`` it must have, ``key`` the module whose output
    holds the keys before RoPE, at ``[key_offset(Hq, Hkv, D), + Hkv * D)`` of its last dimension."""

    names: tuple[str, ...]
    key: str
    key_offset: Callable[[int, int, int], int]


PROJECTIONS: dict[str, Projections] = {
    "separate": Projections(("q_proj", "k_proj", "v_proj"), "k_proj", lambda hq, hkv, d: 0),
    "fused": Projections(("qkv_proj",), "qkv_proj", lambda hq, hkv, d: hq * d),  # Phi-3: [q | k | v]
}


def text_config(config: Any) -> Any:
    """The language model's config: ``config`` itself, or a VLM's ``text_config``."""
    getter = getattr(config, "get_text_config", None)
    return getter() if callable(getter) else config


def check_config(config: Any) -> None:
    """Raise :class:`KVTuneError` (one line) if the config describes a design kvtune cannot cache."""
    from kvtune.layout import layout_of

    name = getattr(config, "model_type", None) or type(config).__name__
    text = text_config(config)
    for design, (detect, why) in UNSUPPORTED.items():
        if detect(config) or detect(text):
            raise KVTuneError(f"{name} uses {design}: {why}",
                              "use a decoder-only model with per-head K/V (Llama, Mistral, Qwen, Gemma, ...)")
    layout_of(config)  # layer types without a per-token KV cache raise here


def decoder_layers(model: Any) -> Any:
    """The decoder layers of a causal LM (``model.model.layers``) or of a VLM's language model
    (``model.model.language_model.layers``), or None."""
    inner = getattr(model, "model", None)
    return getattr(inner, "layers", None) or getattr(getattr(inner, "language_model", None), "layers", None)


def projections_of(attn: Any) -> Projections | None:
    """The :data:`PROJECTIONS` form of a ``self_attn`` module, or None."""
    return next((p for p in PROJECTIONS.values() if all(hasattr(attn, n) for n in p.names)), None)


def pre_rope_keys(attn: Any, output: torch.Tensor, heads: int, kv_heads: int, head_dim: int) -> torch.Tensor:
    """Keys before RoPE ``[B, Hkv, T, D]`` from the output ``[B, T, *]`` of ``attn``'s key projection module."""
    proj = projections_of(attn)
    assert proj is not None
    start = proj.key_offset(heads, kv_heads, head_dim)
    b, t, _ = output.shape
    return output[..., start:start + kv_heads * head_dim].reshape(b, t, kv_heads, head_dim).transpose(1, 2)


def check_supported(model: Any) -> None:
    """Raise :class:`KVTuneError` naming what is missing unless kvtune can hook ``model``'s attention.

    kvtune needs a decoder-only model (or a VLM's language model) in eval mode that passes
    :func:`check_config`, whose layers are ``model.model.layers[i].self_attn`` (VLM:
    ``model.model.language_model.layers[i].self_attn``) with projections in a :data:`PROJECTIONS` form and
    which dispatches attention through transformers' attention interface (``config._attn_implementation`` +
    ``ALL_ATTENTION_FUNCTIONS``), and a ``generation_config``.
    """
    name = type(model).__name__
    config = getattr(model, "config", None)
    if config is None or getattr(config, "is_encoder_decoder", False):
        raise KVTuneError(f"{name} is not a decoder-only transformers model", "use a causal LM (Llama, Qwen2, ...)")
    check_config(config)
    layers = decoder_layers(model)
    if not layers:
        raise KVTuneError(f"{name} has no model.model.layers", "use a Llama-style causal LM (Llama, Mistral, Qwen2)")
    for i, layer in enumerate(layers):
        attn = getattr(layer, "self_attn", None)
        if attn is None:
            raise KVTuneError(f"{name}: model.model.layers[{i}] has no self_attn", "use a Llama-style causal LM")
        if projections_of(attn) is None:
            missing = [p for p in PROJECTIONS["separate"].names if not hasattr(attn, p)]
            raise KVTuneError(f"{name}: layers[{i}].self_attn has no {'/'.join(missing)} (nor a fused qkv_proj)",
                              "use a model with q/k/v projections")
        if not hasattr(sys.modules.get(type(attn).__module__), "ALL_ATTENTION_FUNCTIONS"):
            raise KVTuneError(f"{name}: {type(attn).__name__} does not dispatch through the transformers "
                              "attention interface", "use a model whose attention reads config._attn_implementation")
    if getattr(config, "_attn_implementation", None) is None:
        raise KVTuneError(f"{name}: config._attn_implementation is not set", "load the model with from_pretrained")
    if model.training:
        raise KVTuneError(f"{name} is in training mode", "call model.eval() first")
    if getattr(model, "generation_config", None) is None:
        raise KVTuneError(f"{name} has no generation_config", "load it with AutoModelForCausalLM")
