"""The baseline registry, transformers' QuantizedCache bits by hand, tensor byte counting."""

from __future__ import annotations

import pytest
import torch

from kvtune.errors import KVTuneError
from kvtune.eval.baselines import (
    BASELINES,
    HFQuantizedMethod,
    PlanMethod,
    get_baseline,
    plan_method,
    quantized_cache_bits,
    resolve_baselines,
    tensor_bytes,
)
from kvtune.plan_types import ModelIdentity


def test_registry_has_presets_and_transformers_caches() -> None:
    for name in ("fp16", "kivi-2bit", "kivi-4bit", "kv8", "k8v4", "kv4", "k4v2", "kv2", "hf-quanto-4bit",
                 "hf-hqq-4bit", "hf-dynamic"):
        assert name in BASELINES
    assert isinstance(get_baseline("kv4"), PlanMethod)
    assert isinstance(get_baseline("hf-hqq-4bit"), HFQuantizedMethod)
    assert [m.name for m in resolve_baselines(["kv4", " kv4", "fp16", ""])] == ["kv4", "fp16"]


def test_unknown_baseline_lists_valid_names() -> None:
    with pytest.raises(KVTuneError, match=r"unknown baseline 'kv5'.*kivi-2bit.*hf-quanto-4bit"):
        resolve_baselines(["kv4", "kv5"])


def test_plan_method_is_highlighted_and_binds() -> None:
    ident = ModelIdentity("LlamaForCausalLM", 2, 4, 2, 16)
    m = plan_method("kv4")
    assert m.is_plan and m.name == "kv4" and m.reference_length() == 4096
    assert 4.0 < m.effective_bits(ident, 4096) < 6.0
    assert get_baseline("fp16").effective_bits(ident, 100) == pytest.approx(16.0)


def test_quantized_cache_bits_by_hand() -> None:
    # 4-bit codes + fp16 scale and zero per 64 elements = 4.5 bits; residual (L-1) % 128 tokens at 16 bits
    assert quantized_cache_bits(4, 64, 128, 129) == pytest.approx(4.5)
    assert quantized_cache_bits(4, 64, 128, 4000) == pytest.approx((3969 * 4.5 + 31 * 16) / 4000)
    assert quantized_cache_bits(4, 64, 128, 4096) == pytest.approx((3969 * 4.5 + 127 * 16) / 4096)
    assert quantized_cache_bits(2, 64, 128, 1) == pytest.approx(2.5)
    assert get_baseline("hf-quanto-4bit").effective_bits(ModelIdentity("x", 1, 1, 1, 64), 129) == pytest.approx(4.5)


def test_tensor_bytes_walks_containers() -> None:
    t = torch.zeros(3, 4, dtype=torch.float16)
    assert tensor_bytes((t, [t, {"a": t}], None, 3)) == 3 * 24
    assert tensor_bytes(torch.zeros(5, dtype=torch.uint8)) == 5


def test_hf_backend_row_says_why_when_missing() -> None:
    m = HFQuantizedMethod(name="hf-nope-4bit", backend="nope", nbits=4)
    why = m.unavailable()
    assert why is not None and "nope" in why and "\n" not in why
