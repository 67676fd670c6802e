"""KVTuneCache on a tiny random Llama: equivalences, exact byte counts, generate / beam / padding / reset."""

from __future__ import annotations

from typing import Any

import pytest
import torch
from transformers import DynamicCache

from kvtune.errors import KVTuneError
from kvtune.plan import Plan, load_plan
from kvtune.plan_types import LayerPlan, MergePolicy, ModelIdentity, SalientPolicy
from kvtune.quant.families.normq import normq
from kvtune.quant.families.static import STATE, static
from kvtune.quant.formats import affine, kivi_key, kivi_value
from kvtune.runtime import KVTuneCache, teacher_forced_logits
from kvtune.runtime.cache import identity_of


def _plan(**kw: Any) -> Plan:
    return Plan(layers=(LayerPlan(**kw),), name="test")


PLANS = {
    "kv2": lambda: load_plan("kv2"),
    "k4v2-residual": lambda: _plan(key=kivi_key(4), value=kivi_value(2), residual=24),
    "kivi-sinks": lambda: _plan(key=kivi_key(2, 16), value=kivi_value(2, 16), residual=16,
                                salient=SalientPolicy(sink_tokens=3)),
    "hadamard-outliers-3bit": lambda: _plan(key=affine(bits=3, axis="channel", group=32, hadamard=True, outliers=2),
                                            value=affine(bits=2, axis="token", group=8, outliers=1, outlier_bits=8)),
    "vidkv-like": lambda: _plan(key=affine(bits=1, axis="channel", group=16, fft=True, outliers=2, outlier_bits=2),
                                value=affine(bits=1.58, axis="channel", group=16)),
    "zipcache-like": lambda: _plan(key=kivi_key(2), value=affine(bits=2, axis="token", channel_separable=True),
                                   residual=8),
    "normq": lambda: _plan(key=normq(2, "uniform"), value=normq(1.58), residual=8,
                           salient=SalientPolicy(sink_tokens=1)),
    "static-keys": lambda: _plan(key=static(3, pairs=False), value=normq(2, rotation="orthogonal"), residual=8),
}


def _ids(batch: int, length: int, seed: int = 0) -> torch.Tensor:
    gen = torch.Generator().manual_seed(seed)
    return torch.randint(1, 128, (batch, length), generator=gen)


def test_fp16_plan_matches_dynamic_cache(tiny_llama: tuple[Any, Any]) -> None:
    model, _ = tiny_llama
    ids = _ids(2, 90)
    dense = model(ids, use_cache=False).logits
    ours = teacher_forced_logits(model, load_plan("fp16"), ids, chunk=7, prefill=30)
    torch.testing.assert_close(ours, dense, atol=2e-3, rtol=0)  # only fp16 rounding of K/V


@pytest.mark.parametrize("name", sorted(PLANS))
def test_chunked_teacher_forcing_equals_token_by_token(tiny_llama: tuple[Any, Any], name: str) -> None:
    model, _ = tiny_llama
    plan, ids = PLANS[name](), _ids(2, 150, seed=1)
    one = teacher_forced_logits(model, plan, ids, chunk=1)
    for chunk in (13, 64):
        torch.testing.assert_close(teacher_forced_logits(model, plan, ids, chunk=chunk), one, atol=2e-4, rtol=0)
    dense = model(ids, use_cache=False).logits
    assert (one - dense).abs().max() > 1e-3  # the quantizer really acts


@pytest.mark.parametrize("name", [*sorted(PLANS), "salient", "elastic"])
def test_bytes_held_equal_the_bit_accountant(tiny_llama: tuple[Any, Any], name: str) -> None:
    model, _ = tiny_llama
    extra = {"salient": lambda: _plan(key=kivi_key(2), value=kivi_value(2), residual=32,
                                      salient=SalientPolicy(ratio=0.1, bits=8, sink_tokens=4)),
             "elastic": lambda: _plan(key=kivi_key(2), value=kivi_value(2), residual=16,
                                      merge=MergePolicy(ratio=0.3, method="elastic", keep_recent=8, keep_initial=4))}
    plan = {**PLANS, **extra}[name]()
    cache, ids = plan.cache(model), _ids(2, 200, seed=2)
    model(ids, past_key_values=cache)
    for t in range(37):
        model(ids[:, t:t + 1], past_key_values=cache)
    expected = plan.bits(237, identity_of(model)).total / 8 * ids.shape[0]
    assert cache.nbytes() == pytest.approx(expected, rel=0.01)
    assert cache.get_seq_length() == 237


def test_kv8_greedy_equals_fp16_and_beams_run(tiny_llama: tuple[Any, Any]) -> None:
    model, _ = tiny_llama
    ids = _ids(1, 60)
    ref = model.generate(ids, max_new_tokens=40, do_sample=False, past_key_values=DynamicCache(config=model.config))
    ours = model.generate(ids, max_new_tokens=40, do_sample=False, past_key_values=load_plan("kv8").cache(model))
    assert torch.equal(ours, ref)
    beam_ref = model.generate(ids, max_new_tokens=12, num_beams=3, do_sample=False,
                              past_key_values=DynamicCache(config=model.config))
    beam = model.generate(ids, max_new_tokens=12, num_beams=3, do_sample=False,
                          past_key_values=load_plan("fp16").cache(model))
    assert torch.equal(beam, beam_ref)
    low = model.generate(ids, max_new_tokens=12, num_beams=3, do_sample=False,
                         past_key_values=load_plan("kv2").cache(model))
    assert low.shape == beam.shape


def test_left_padding_is_ignored(tiny_llama: tuple[Any, Any]) -> None:
    """A padded row's result does not depend on what the padding tokens are (they never enter a range)."""
    model, _ = tiny_llama
    a, b = _ids(1, 70, seed=3), _ids(1, 50, seed=4)
    outs = []
    for pad_id in (0, 77):
        batch = torch.cat([a, torch.cat([torch.full((1, 20), pad_id), b], 1)])
        mask = torch.ones_like(batch)
        mask[1, :20] = 0
        outs.append(model.generate(batch, attention_mask=mask, max_new_tokens=30, do_sample=False,
                                   pad_token_id=0, past_key_values=load_plan("kv2").cache(model)))
    assert torch.equal(outs[0][:, 70:], outs[1][:, 70:])
    single = model.generate(a, max_new_tokens=30, do_sample=False, past_key_values=load_plan("kv2").cache(model))
    assert torch.equal(outs[0][0, 70:], single[0, 70:])


def test_reset_and_reuse(tiny_llama: tuple[Any, Any]) -> None:
    model, _ = tiny_llama
    plan, ids = load_plan("kv2"), _ids(1, 100)
    cache = plan.cache(model)
    first = model(ids, past_key_values=cache).logits
    cache.reset()
    assert cache.get_seq_length() == 0 and cache.nbytes() == 0
    torch.testing.assert_close(model(ids, past_key_values=cache).logits, first)


def test_plan_for_another_model_is_refused(tiny_llama: tuple[Any, Any]) -> None:
    model, _ = tiny_llama
    other = ModelIdentity("LlamaForCausalLM", 30, 9, 3, 64, "0123456789abcdef")
    plan = load_plan("kv4").bind(other)
    with pytest.raises(KVTuneError, match="another model"):
        KVTuneCache(plan, model)
    with pytest.raises(KVTuneError, match="backend"):
        KVTuneCache(load_plan("kv4"), model, backend="cuda-magic")


def test_cache_reused_by_another_model_is_refused(tiny_llama: tuple[Any, Any]) -> None:
    from kvtune.models import tiny_model

    model, _ = tiny_llama
    twin = tiny_model("llama")  # same architecture and weights, another instance
    cache = load_plan("kv2").cache(model)
    load_plan("kv2").cache(twin)  # the twin attends with kvtune too
    with pytest.raises(KVTuneError, match="another model instance"):
        twin(_ids(1, 20), past_key_values=cache)
    other = load_plan("kv2").cache(model)
    twin.set_attn_implementation("sdpa")  # a model that does not attend through kvtune at all
    twin(_ids(1, 20), past_key_values=other)  # its prompt pass sees only its own tokens: still right
    with pytest.raises(KVTuneError, match="without kvtune's attention"):
        twin(_ids(1, 1), past_key_values=other)
    other.reset()  # a reset cache works again with the model it was made for
    torch.testing.assert_close(model(_ids(1, 20), past_key_values=other).logits,
                               model(_ids(1, 20), past_key_values=load_plan("kv2").cache(model)).logits)


def test_triton_backend_without_kernels_is_refused(tiny_llama: tuple[Any, Any],
                                                   monkeypatch: pytest.MonkeyPatch) -> None:
    from kvtune import kernels

    monkeypatch.setattr(kernels, "available", lambda: False)
    with pytest.raises(KVTuneError, match="needs a CUDA GPU"):
        KVTuneCache(load_plan("kv2"), tiny_llama[0], backend="triton")


@pytest.mark.parametrize("stepwise", [False, True])
@pytest.mark.parametrize("name", ["kv2", "kivi-sinks", "hadamard-outliers-3bit", "zipcache-like"])
def test_chunked_prefill_sdpa_equals_blockwise(tiny_llama: tuple[Any, Any], name: str, stepwise: bool,
                                               monkeypatch: pytest.MonkeyPatch) -> None:
    """A later prompt chunk (quantized tokens already stored, left-padded row) attends through SDPA; the
    result equals the blockwise float32 specification, in stepwise mode too (read-back window copies)."""
    from kvtune.runtime import torch_attention as reference

    model, _ = tiny_llama
    ids = _ids(2, 120, seed=5)
    mask = torch.ones_like(ids)
    mask[1, :9] = 0
    seen: list[float] = []
    real = reference.attend

    def both(step: Any, q: torch.Tensor, pad: torch.Tensor, scaling: float, sdpa: bool | None = None,
             **kw: Any) -> torch.Tensor:
        out = real(step, q, pad, scaling, **kw)
        if q.shape[2] > 1 and step.nq_before > 0:
            slow = real(step, q, pad, scaling, sdpa=False, **kw)
            seen.append((out.float() - slow.float()).abs().max().item())
        return out

    monkeypatch.setattr(reference, "attend", both)
    cache = PLANS[name]().cache(model)
    cache.stepwise = stepwise
    for s in range(0, 120, 40):
        model(ids[:, s:s + 40], attention_mask=mask[:, : s + 40], past_key_values=cache)
    assert seen and max(seen) < 1e-5


def test_calibrated_state_comes_from_the_plan(tiny_llama: tuple[Any, Any]) -> None:
    """A plan's layer-scope tensors (static steps) are what the cache uses; without them the first block fits."""
    model, _ = tiny_llama
    ident = identity_of(model)
    steps = torch.full((ident.num_kv_heads, ident.head_dim), 0.05).half()
    layers = (LayerPlan(key=static(3, pairs=False), value=kivi_value(4)),) * ident.num_layers
    tensors = {f"layers.{i}.key.{STATE}": steps for i in range(ident.num_layers)}
    given = Plan(layers=layers, model=ident, name="given", tensors=tensors)
    cache = given.cache(model)
    model(_ids(1, 40), past_key_values=cache)
    assert all(torch.equal(g.state["key"][STATE].cpu(), steps) for layer in cache.layers for g in layer.groups)
    fitted = Plan(layers=layers, model=ident, name="fitted").cache(model)
    model(_ids(1, 40), past_key_values=fitted)
    assert all(not torch.equal(g.state["key"][STATE].cpu(), steps) for layer in fitted.layers for g in layer.groups)
    with pytest.raises(KVTuneError, match="store no 'bogus'"):
        Plan(layers=layers, model=ident, name="bad", tensors={"layers.0.key.bogus": steps})


@pytest.mark.parametrize("key,value,flush", [(kivi_key(2, 16), kivi_value(2, 16), 16),
                                             (affine(bits=1, axis="channel", group=16, fft=True), normq(2), 16),
                                             (normq(2, "uniform"), normq(1.58), 1)])
def test_kept_decoded_tokens_equal_a_fresh_decode(key: Any, value: Any, flush: int) -> None:
    """``dequantized(keep=True)`` decodes only new blocks; across appends and front drops (sliding windows) it
    returns exactly what decoding every stored block again returns."""
    from kvtune.plan_types import HeadPlan
    from kvtune.runtime.heads import HeadGroup

    g = HeadGroup((0, 1), HeadPlan(key=key, value=value), flush, 16)
    gen = torch.Generator().manual_seed(3)
    for step, (blocks, drop) in enumerate([(2, 0), (1, 0), (0, 0), (3, 16), (1, 32)]):
        if blocks:
            k, v = (torch.randn(2, 2, blocks * 16, 16, generator=gen) for _ in range(2))
            g.append(k, v)
        if drop:
            g.drop_front(drop)
        kept = g.dequantized(keep=True)
        assert g.decoded is not None and g.decoded[0] == g.tokens, step
        fresh = HeadGroup.dequantized(g)  # keep=False: every stored block decoded again
        for a, b in zip(kept, fresh):
            assert a.shape[2] == g.tokens
            torch.testing.assert_close(a, b, atol=0, rtol=0)
    assert g.decoded is None  # keep=False drops what was held
