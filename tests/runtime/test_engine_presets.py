"""Presets of what serving engines store (llama.cpp q8_0/q4_0, vLLM fp8 and TurboQuant) run in kvtune's runtime.

A 6-layer tiny model (head_dim 64) so that TurboQuant's first/last-2-layer boundary protection leaves 2 layers
quantized; the cache holds exactly the bytes the accountant counts. Template edges round-trip and bind.
"""

from __future__ import annotations

from typing import Any

import pytest
import torch

from kvtune.errors import KVTuneError
from kvtune.models import tiny_model
from kvtune.plan import Plan, load_plan
from kvtune.plan_types import ModelIdentity
from kvtune.runtime import teacher_forced_logits
from kvtune.runtime.cache import identity_of

ENGINE_PRESETS = {"llamacpp-q8_0": 8.5, "llamacpp-q4_0": 4.5, "fp8_e4m3": 8.0, "turboquant_k8v4": 7.55,
                  "turboquant_4bit_nc": 5.925, "turboquant_k3v4_nc": 5.4917, "turboquant_3bit_nc": 5.0583}
SMOL = ModelIdentity("LlamaForCausalLM", 30, 9, 3, 64)  # SmolLM2-135M's shape


@pytest.fixture(scope="module")
def tiny6() -> Any:
    return tiny_model(layers=6, heads=2, kv_heads=1, head_dim=64)


@pytest.mark.parametrize("name", sorted(ENGINE_PRESETS))
def test_engine_preset_bits(name: str) -> None:
    plan = load_plan(name)
    assert plan.is_template and plan.description and Plan.from_dict(plan.to_dict()) == plan
    assert plan.effective_bits(4096, SMOL) == pytest.approx(ENGINE_PRESETS[name], abs=1e-4)


@pytest.mark.parametrize("name", sorted(ENGINE_PRESETS))
def test_engine_preset_runs_and_holds_the_accounted_bytes(tiny6: Any, name: str) -> None:
    plan = load_plan(name)
    ids = torch.randint(1, 128, (2, 200), generator=torch.Generator().manual_seed(1))
    logits = teacher_forced_logits(tiny6, plan, ids, chunk=64)
    assert torch.isfinite(logits).all() and (logits - tiny6(ids, use_cache=False).logits).abs().max() > 1e-4
    cache = plan.cache(tiny6)
    tiny6(ids, past_key_values=cache)
    for t in range(10):
        tiny6(ids[:, t:t + 1], past_key_values=cache)
    assert cache.nbytes() == pytest.approx(plan.bits(210, identity_of(tiny6)).total / 8 * 2, rel=0.01)


def test_edges_cover_first_and_last_layers_capped_at_half() -> None:
    plan = load_plan("turboquant_4bit_nc")
    bound = plan.bind(SMOL)
    fp16 = [i for i, layer in enumerate(bound.layers) if layer.key.passthrough]
    assert fp16 == [0, 1, 28, 29] and not bound.edges
    three = plan.bind(ModelIdentity("LlamaForCausalLM", 3, 2, 1, 64))
    assert [layer.key.passthrough for layer in three.layers] == [True, False, True]  # min(2, 3 // 2) = 1 a side


@pytest.mark.parametrize(("layers", "match"), [
    ({"all": {}, "middle": {"count": 1, "layer": {}}}, "take 'all', 'first' and 'last'"),
    ({"all": {}, "first": {"count": 0, "layer": {}}}, "count must be an integer >= 1"),
    ({"all": {}, "last": {"layer": {}}}, "'count' and 'layer'"),
])
def test_bad_edges_are_one_line_errors(layers: dict, match: str) -> None:
    with pytest.raises(KVTuneError, match=match):
        Plan.from_dict({"schema_version": 1, "layers": layers})
