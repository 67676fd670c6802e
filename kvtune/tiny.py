"""Tiny randomly initialised causal LMs of each supported architecture, built offline (for tests only).

Each :class:`TinyArch` names a transformers ``model_type`` and what makes it that architecture at a tiny
size; ``window`` sets its sliding window or attention chunk (``None``: the config's default). The
architectures cover every attention design kvtune handles: plain global attention (Llama), q/k norms (Qwen3),
a fused qkv projection (Phi-3), sliding windows on all layers (Mistral, Phi-3) or some (Qwen2/3 with
``max_window_layers``), logit softcapping and ``query_pre_attn_scalar`` with alternating windows (Gemma 2),
the 5:1 sliding pattern with one KV head (Gemma 3), learned attention sinks (gpt-oss) and chunked attention
with NoPE global layers (Llama 4).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch

Extra = Callable[[int | None, int, int], dict[str, Any]]  # (window, layers, head_dim) -> config kwargs


def _sliding(window: int | None, layers: int, head_dim: int) -> dict[str, Any]:
    return {"sliding_window": window} if window is not None else {}


def _qwen_window(window: int | None, layers: int, head_dim: int) -> dict[str, Any]:
    """Qwen2/3: the upper half of the layers slide (``max_window_layers`` counts the global ones)."""
    if window is None:
        return {}
    return {"use_sliding_window": True, "sliding_window": window, "max_window_layers": layers // 2}


def _chunk(window: int | None, layers: int, head_dim: int) -> dict[str, Any]:
    return {"attention_chunk_size": window} if window is not None else {}


@dataclass(frozen=True)
class TinyArch:
    """A transformers ``model_type`` with the config keys that make it this architecture at a tiny size."""

    model_type: str
    extra: dict[str, Any] = field(default_factory=dict)
    window: Extra | None = None  # None: the architecture has no window to set
    scalar: bool = False  # sets query_pre_attn_scalar (Gemma) to a value other than head_dim


_MOE = {"num_local_experts": 4, "num_experts_per_tok": 2}
TINY_ARCHS: dict[str, TinyArch] = {
    "llama": TinyArch("llama"),
    "mistral": TinyArch("mistral", window=_sliding),
    "qwen2": TinyArch("qwen2", window=_qwen_window),
    "qwen3": TinyArch("qwen3", window=_qwen_window),
    "phi3": TinyArch("phi3", {"pad_token_id": 0, "bos_token_id": 1, "eos_token_id": 2}, window=_sliding),
    "gemma2": TinyArch("gemma2", {"attn_logit_softcapping": 20.0, "final_logit_softcapping": 30.0}, _sliding, True),
    "gemma3": TinyArch("gemma3_text", {"sliding_window_pattern": 6}, _sliding, True),
    "gpt_oss": TinyArch("gpt_oss", {**_MOE, "rope_parameters": {"rope_type": "default", "rope_theta": 10000.0}},
                        _sliding),
    "llama4": TinyArch("llama4_text", {"num_local_experts": 2, "interleave_moe_layer_step": 2}, _chunk),
}


def tiny_model(arch: str = "llama", layers: int = 2, heads: int = 4, kv_heads: int = 2, head_dim: int = 16,
               vocab: int = 128, seed: int = 0, window: int | None = None) -> Any:
    """A tiny randomly initialised causal LM of :data:`TINY_ARCHS` ``arch``, in eval mode; global RNG left
    untouched. ``window``: its sliding window / attention chunk (None: the config's default)."""
    from transformers import AutoConfig, AutoModelForCausalLM

    spec = TINY_ARCHS.get(arch)
    if spec is None:
        raise ValueError(f"tiny_model: arch must be one of {', '.join(TINY_ARCHS)}, not {arch!r}")
    if window is not None and spec.window is None:
        raise ValueError(f"tiny_model: {arch} has no sliding window or chunk to set")
    hidden = heads * head_dim
    kw: dict[str, Any] = {"hidden_size": hidden, "intermediate_size": 2 * hidden, "num_hidden_layers": layers,
                          "num_attention_heads": heads, "num_key_value_heads": kv_heads, "head_dim": head_dim,
                          "vocab_size": vocab, "max_position_embeddings": 512, "tie_word_embeddings": False}
    if spec.model_type == "llama4_text":
        kw["intermediate_size_mlp"] = 2 * hidden
    if spec.scalar:
        kw["query_pre_attn_scalar"] = 2 * head_dim  # scaling (2 D)^-1/2, not D^-1/2
    kw.update(spec.extra)
    if spec.window is not None:
        kw.update(spec.window(window, layers, head_dim))
    config = AutoConfig.for_model(spec.model_type, **kw)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = AutoModelForCausalLM.from_config(config)
    return model.eval()
