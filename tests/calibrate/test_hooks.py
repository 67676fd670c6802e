"""capture() sees the right tensors, can replace K/V, and always leaves the model as it found it."""

from __future__ import annotations

from typing import Any

import pytest
import torch

from kvtune.calibrate.hooks import CAPTURE_IMPL, AttentionCall, capture
from kvtune.models import tiny_model


def _no_hooks(model: Any) -> bool:
    return all(not m._forward_hooks and not m._forward_pre_hooks for m in model.modules())


@pytest.mark.parametrize("arch", ["llama", "mistral", "qwen2"])
def test_capture_shapes_and_identity(arch: str) -> None:
    model = tiny_model(arch, layers=2, heads=4, kv_heads=2, head_dim=16)
    ids = torch.randint(0, 128, (2, 24), generator=torch.Generator().manual_seed(0))
    calls: list[AttentionCall] = []
    pre: dict[int, torch.Tensor] = {}
    with torch.inference_mode():
        ref = model(ids).logits
        with capture(model, on_attention=calls.append, on_key_pre_rope=lambda i, k: pre.__setitem__(i, k)):
            assert model.config._attn_implementation == CAPTURE_IMPL
            out = model(ids).logits
    torch.testing.assert_close(out, ref)
    assert [c.layer for c in calls] == [0, 1]
    assert calls[0].query.shape == (2, 4, 24, 16) and calls[0].key.shape == (2, 2, 24, 16)
    assert calls[0].scaling == pytest.approx(16 ** -0.5)
    assert pre[1].shape == (2, 2, 24, 16)
    assert not torch.allclose(pre[1][:, :, 1:], calls[1].key[:, :, 1:])  # RoPE rotates every position > 0
    torch.testing.assert_close(pre[1][:, :, 0], calls[1].key[:, :, 0])  # ... but not position 0
    assert model.config._attn_implementation == "sdpa" and _no_hooks(model)


def test_capture_replaces_key_and_value() -> None:
    model = tiny_model("llama")
    ids = torch.randint(0, 128, (1, 16), generator=torch.Generator().manual_seed(0))

    def zero_values(call: AttentionCall) -> tuple[torch.Tensor, torch.Tensor]:
        return call.key, torch.zeros_like(call.value)

    with torch.inference_mode():
        ref = model(ids).logits
        with capture(model, on_attention=zero_values):
            out = model(ids).logits
    assert not torch.allclose(out, ref)


def test_hooks_removed_and_implementation_restored_after_error() -> None:
    model = tiny_model("qwen2")
    model.set_attn_implementation("eager")

    def boom(call: AttentionCall) -> None:
        raise RuntimeError("observer failed")

    with (pytest.raises(RuntimeError, match="observer failed"), torch.inference_mode(),
          capture(model, on_attention=boom, on_key_pre_rope=lambda i, k: None)):
        model(torch.zeros(1, 4, dtype=torch.long))
    assert model.config._attn_implementation == "eager" and _no_hooks(model)


def test_nested_capture_restores_outer_routes() -> None:
    model = tiny_model("llama")
    outer: list[int] = []
    with torch.inference_mode(), capture(model, on_attention=lambda c: outer.append(c.layer)):
        with capture(model, on_attention=lambda c: None):
            model(torch.zeros(1, 4, dtype=torch.long))
        assert model.config._attn_implementation == CAPTURE_IMPL
        model(torch.zeros(1, 4, dtype=torch.long))
    assert outer == [0, 1] and model.config._attn_implementation == "sdpa"


@pytest.mark.parametrize("arch", ["gemma3", "llama4", "phi3"])
def test_capture_sees_each_layers_span_and_pre_rope_keys(arch: str) -> None:
    """Calls carry the layer's span from the config (chunked layers too); fused qkv_proj yields pre-RoPE keys."""
    from kvtune.layout import layout_of

    model = tiny_model(arch, layers=6, window=16)
    spans: dict[int, Any] = {}
    keys: dict[int, tuple[int, ...]] = {}
    def seen(call: AttentionCall) -> None:
        spans[call.layer] = call.span

    with torch.no_grad(), capture(model, on_attention=seen,
                                  on_key_pre_rope=lambda layer, k: keys.setdefault(layer, tuple(k.shape)) and None):
        model(torch.randint(1, 128, (1, 40)), use_cache=False)
    assert [spans[i] for i in range(6)] == list(layout_of(model.config).spans)
    assert all(shape == (1, 2, 40, 16) for shape in keys.values()) and len(keys) == 6
