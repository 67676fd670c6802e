"""Attention layouts read from configs: spans, what a query sees, what transformers' cache holds."""

from __future__ import annotations

import pytest
import torch

from kvtune.errors import KVTuneError
from kvtune.layout import GLOBAL, AttentionLayout, LayerSpan, layout_of
from kvtune.models import identity, model_identity
from kvtune.plan import load_plan
from kvtune.plan_types import ModelIdentity
from kvtune.tiny import tiny_model

LAYOUTS = {  # arch -> layout of a 6-layer tiny model with window 16
    "llama": "6 global", "mistral": "6 sliding:16", "qwen2": "3 global + 3 sliding:16",
    "gemma2": "3 sliding:16 + 3 global", "gemma3": "5 sliding:16 + 1 global", "llama4": "5 chunked:16 + 1 global",
}


@pytest.mark.parametrize("arch", sorted(LAYOUTS))
def test_layout_of_tiny_models(arch: str) -> None:
    model = tiny_model(arch, layers=6, window=None if arch == "llama" else 16)
    layout = layout_of(model.config)
    assert layout.describe() == LAYOUTS[arch]


def test_span_rules() -> None:
    sliding, chunked = LayerSpan("sliding", 4), LayerSpan("chunked", 4)
    assert sliding.first_visible(10) == 7 and sliding.keep_from(10) == 7 and sliding.fp16_tokens(10) == 3
    assert chunked.first_visible(10) == 8 and chunked.first_visible(10, pad=1) == 9 and chunked.fp16_tokens(10) == 2
    assert GLOBAL.first_visible(10) == 0 and GLOBAL.fp16_tokens(10) == 10
    pad = torch.tensor([0, 3])
    assert chunked.first_visible(10, pad).tolist() == [8, 7]
    assert LayerSpan.from_str("sliding:512") == LayerSpan("sliding", 512)
    for bad in ("sliding", "global:3", "diagonal:2", "sliding:x"):
        with pytest.raises(KVTuneError):
            LayerSpan.from_str(bad)


def test_identity_round_trips_its_layout_and_refuses_another() -> None:
    model = tiny_model("gemma3", layers=6, window=16)
    ident = identity(model_identity(model))
    assert ident.layout is not None and ident.layout.windowed
    assert ModelIdentity.from_dict(ident.to_dict()) == ident
    assert "layout" not in identity(model_identity(tiny_model("llama"))).to_dict()  # all-global YAML unchanged
    plan = load_plan("fp16").bind(ident)
    other = ModelIdentity(**{**ident.to_dict(), "layout": AttentionLayout.from_list(["global"] * 6)})
    with pytest.raises(KVTuneError, match="layout"):
        plan.bind(other)


@pytest.mark.parametrize("arch", sorted(LAYOUTS))
@pytest.mark.parametrize("release", ["per-layer kwargs", "one kwargs mapping", "no helper"])
def test_layout_is_the_same_under_every_transformers_5(arch: str, release: str,
                                                      monkeypatch: pytest.MonkeyPatch) -> None:
    """transformers 5.17 returned one kwargs mapping for all layers, earlier 5.x had no helper at all; the layout
    read through each is the one the installed transformers gives."""
    import transformers.cache_utils as cu

    config = tiny_model(arch, layers=6, window=None if arch == "llama" else 16).config
    expected = layout_of(config)
    assert expected.describe() == LAYOUTS[arch]
    current = cu.get_layer_types_and_kwargs
    if release == "one kwargs mapping":
        def shared(text: object) -> tuple[list[str], dict[str, object]]:  # the older helper's shape
            types, per_layer = current(text)
            merged = {k: v for kw in per_layer for k, v in kw.items()}
            return types, merged
        monkeypatch.setattr(cu, "get_layer_types_and_kwargs", shared)
    elif release == "no helper":
        monkeypatch.delattr(cu, "get_layer_types_and_kwargs")
    assert layout_of(config) == expected
