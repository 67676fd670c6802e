"""The method presets (AKVQ-VL, VidKV, ZipCache, Elastic Cache) through the runtime; token types steer salient tokens.

Tiny random models (head_dim 64, as VidKV's 32 anomalous channels need) and tiny random VLMs (LLaVA- and
Qwen2-VL-style, created locally) run fast; the embedded SmolLM2 run is marked slow.
"""

from __future__ import annotations

from dataclasses import replace
from typing import Any

import pytest
import torch

from kvtune.models import load_identity, tiny_model
from kvtune.plan import Plan, load_plan
from kvtune.plan_types import LayerPlan, MergePolicy, SalientPolicy
from kvtune.quant.formats import kivi_key, kivi_value
from kvtune.runtime import teacher_forced_logits
from kvtune.runtime.cache import identity_of
from kvtune.token_types import span_mask, token_type_mask

# effective bits of each preset on SmolLM2-135M (30 layers, 3 KV heads, d=64) at 4096 tokens
PRESET_BITS = {"akvq-vl-2bit": 3.6325, "vidkv-1.5bit": 3.4562, "vidkv-1.58bit": 3.2736, "zipcache": 5.2868,
               "elastic-cache": 8.0703}


@pytest.fixture(scope="module")
def tiny64() -> Any:
    return tiny_model(layers=2, heads=2, kv_heads=1, head_dim=64)


def _ids(batch: int, length: int, seed: int = 0) -> torch.Tensor:
    return torch.randint(1, 128, (batch, length), generator=torch.Generator().manual_seed(seed))


@pytest.mark.slow  # reads the embedded model's identity
@pytest.mark.parametrize("name", sorted(PRESET_BITS))
def test_preset_loads_and_reports_its_bits(name: str) -> None:
    plan = load_plan(name)
    assert plan.name == name and plan.is_template and plan.description
    assert plan.effective_bits(4096, load_identity("smollm2-135m")) == pytest.approx(PRESET_BITS[name], abs=1e-4)


@pytest.mark.slow  # inspect reports bits for the embedded model
def test_inspect_prints_bits_at_4096(capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch) -> None:
    from kvtune.cli import main

    monkeypatch.setenv("COLUMNS", "200")
    assert main(["inspect", "vidkv-1.58bit"]) == 0
    assert "effective bits: 3.2736 at 4096 tokens" in " ".join(capsys.readouterr().out.split())


@pytest.mark.parametrize("name", sorted(PRESET_BITS))
def test_preset_runs_and_holds_the_accounted_bytes(tiny64: Any, name: str) -> None:
    plan, ids = load_plan(name), _ids(2, 300, seed=3)
    logits = teacher_forced_logits(tiny64, plan, ids, chunk=64)
    dense = tiny64(ids, use_cache=False).logits
    assert torch.isfinite(logits).all() and (logits - dense).abs().max() > 1e-3  # the method really acts
    cache = plan.cache(tiny64)
    tiny64(ids, past_key_values=cache)
    for t in range(20):
        tiny64(ids[:, t:t + 1], past_key_values=cache)
    expected = plan.bits(320, identity_of(tiny64)).total / 8 * ids.shape[0]
    assert cache.nbytes() == pytest.approx(expected, rel=0.01)


def _typed_plan(weight: float, **merge: Any) -> Plan:
    sal = SalientPolicy(ratio=0.1, bits=8, token_types={"image": weight})
    return Plan(layers=(LayerPlan(key=kivi_key(2), value=kivi_value(2), residual=32, salient=sal,
                                  merge=MergePolicy(**merge) if merge else MergePolicy()),), name="typed")


def test_visual_span_becomes_the_salient_tokens(tiny64: Any) -> None:
    """A span marked visual on a text model: with a large image weight every salient token lies in it."""
    ids, span = _ids(1, 416, seed=4), (100, 200)
    mask = span_mask(416, {"image": [span]})
    for weight, inside in ((1e6, True), (1.0, False)):
        cache = _typed_plan(weight).cache(tiny64)
        cache.set_token_types(mask, ids)
        tiny64(ids, past_key_values=cache)
        for layer in cache.layers:
            idx = layer.groups[0].salient.idx  # [B, h, S] indices into the quantized tokens (no sinks)
            assert idx.shape[-1] == int(0.1 * layer.n_quant) == 38
            assert bool(((idx >= span[0]) & (idx < span[1])).all()) == inside
            assert layer.q_types.view().shape[2] == layer.n_quant


def test_types_follow_merged_tokens(tiny64: Any) -> None:
    ids = _ids(2, 300, seed=5)
    cache = _typed_plan(10.0, ratio=0.3, method="elastic", keep_recent=8, keep_initial=4).cache(tiny64)
    cache.set_token_types(span_mask(300, {"video": [(50, 150)]}, batch=2), ids)
    tiny64(ids[:, :200], past_key_values=cache)
    for t in range(200, 300, 10):
        tiny64(ids[:, t:t + 10], past_key_values=cache)
    layer = cache.layers[0]
    assert layer.merged > 0 and layer.win_types.shape[2] == layer.win_k.shape[2]
    assert layer.q_types.view().shape[2] == layer.n_quant
    assert int((layer.q_types.view() == 2).sum(-1).min()) > 0  # video tokens survive merging with their type


def test_tiny_llava_image_tokens_are_kept(tiny_llava: Any) -> None:
    model, n_img = tiny_llava
    ids = torch.cat([_ids(1, 40), torch.full((1, n_img), 150), _ids(1, 220, seed=1)], 1)
    pixels = torch.randn(1, 3, 32, 32, generator=torch.Generator().manual_seed(0))
    plan = load_plan("vidkv-1.58bit")
    cache = plan.cache(model)
    cache.set_token_types(token_type_mask(ids, model.config), ids)
    out = model.generate(input_ids=ids, pixel_values=pixels, past_key_values=cache, max_new_tokens=4, do_sample=False)
    assert out.shape[1] == ids.shape[1] + 4
    salient = cache.layers[0].groups[0].salient.idx[0, 0]
    assert set(range(40, 40 + n_img)) <= set(salient.tolist())  # weight 4: every image token is salient here


def test_tiny_qwen2vl_runs_with_its_token_types() -> None:
    from transformers import Qwen2VLConfig, Qwen2VLForConditionalGeneration

    cfg = Qwen2VLConfig(text_config={"hidden_size": 128, "intermediate_size": 256, "num_hidden_layers": 2,
                                     "num_attention_heads": 2, "num_key_value_heads": 1, "vocab_size": 160,
                                     "rope_scaling": {"type": "mrope", "mrope_section": [8, 12, 12]}},
                        vision_config={"depth": 1, "embed_dim": 32, "hidden_size": 128, "num_heads": 2,
                                       "patch_size": 4},
                        image_token_id=151, video_token_id=152, vision_start_token_id=153)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        model = Qwen2VLForConditionalGeneration(cfg).eval()
    ids = torch.cat([_ids(1, 20), torch.tensor([[153]]), torch.full((1, 4), 151), _ids(1, 150, seed=1)], 1)
    mask = token_type_mask(ids, model.config)  # same codes as the processor's mm_token_type_ids
    cache = load_plan("zipcache").cache(model)
    cache.set_token_types(mask, ids)
    out = model.generate(input_ids=ids, pixel_values=torch.randn(16, 96), image_grid_thw=torch.tensor([[1, 4, 4]]),
                         mm_token_type_ids=mask.long(), past_key_values=cache, max_new_tokens=3, do_sample=False)
    assert out.shape[1] == ids.shape[1] + 3 and cache.get_seq_length() == ids.shape[1] + 2


@pytest.mark.slow
def test_presets_on_the_embedded_model(smollm: tuple[Any, Any]) -> None:
    from kvtune.data import load_text

    model, tok = smollm
    ids = tok(load_text("pydoc:eval")[:6000], return_tensors="pt").input_ids[:, :224]
    with torch.no_grad():
        ref = torch.log_softmax(model(ids, use_cache=False).logits.double(), -1)
    mask = span_mask(ids.shape[1], {"image": [(40, 140)]})  # plumbing only: the text model has no images
    for name in sorted(PRESET_BITS):
        lp = torch.log_softmax(teacher_forced_logits(model, load_plan(name), ids, chunk=48, prefill=128,
                                                 token_types=mask).double(), -1)
        kl = float((ref.exp() * (ref - lp)).sum(-1).mean())
        assert 0 < kl < 1.5, (name, kl)  # the 2048-token figures are in the closing note


def test_residual_override_keeps_presets_valid() -> None:
    """Presets stay ordinary plans: fields can be replaced and re-validated (the search edits them so)."""
    plan = load_plan("zipcache")
    layer = replace(plan.layers[0], salient=replace(plan.layers[0].salient, ratio=0.2))
    assert Plan.from_dict(replace(plan, layers=(layer,)).to_dict()).layers[0].salient.ratio == 0.2
