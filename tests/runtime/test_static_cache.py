"""StaticKVTuneCache (fixed buffers, device-side lengths) decodes what the dynamic KVTuneCache decodes.

Eager steps run everywhere (the kernels under ``TRITON_INTERPRET=1`` without a GPU); on a GPU the same steps are
also replayed as CUDA graphs (:mod:`kvtune.runtime.graphs`) and ``torch.compile`` traces the custom op.
"""

from __future__ import annotations

from dataclasses import replace
from typing import Any

import pytest
import torch

from kvtune.errors import KVTuneError
from kvtune.models import cache_kwargs, tiny_model
from kvtune.plan import Plan, load_plan
from kvtune.plan_types import LayerPlan, MergePolicy, SalientPolicy
from kvtune.quant.families.normq import normq
from kvtune.quant.formats import affine
from kvtune.runtime import KVTuneCache
from kvtune.runtime.graphs import GraphDecoder

from .kernel_env import DEV  # sets up the kernels (or skips this module)


def _sinks(lp: LayerPlan, sinks: int, fp16: int) -> LayerPlan:
    """``lp`` with ``sinks`` fp16 sink tokens taken out of an ``fp16``-token window (as ``kvtune search`` writes it)."""
    return replace(lp, residual=fp16 - sinks, salient=SalientPolicy(sink_tokens=sinks))


def _k2g16(sinks: tuple[int, int] = (3, 8)) -> Plan:
    """2-bit keys per channel (g16) / 2-bit values per token, an 11-token fp16 length with 3 and 8 sinks: the
    left-padded row's 5 padding tokens are more than layer 0's sinks and fewer than layer 1's."""
    lp = LayerPlan(key=affine(bits=2, axis="channel", group=16), value=affine(bits=2, axis="token", group=0))
    return Plan(layers=tuple(_sinks(lp, s, 11) for s in sinks), name="t")


def _centered(means: bool = True, ranges: bool = True) -> Plan:
    """Two layers of centered 4-bit keys / 2-bit values in norm codes, the values' scales in one byte (log8);
    ``means`` / ``ranges``: the plan carries each layer's calibrated means / log2 value-scale ranges. Layer 0: an
    8-token window, no sinks; layer 1: 8 sinks and a 4-token window, so a 7-token prompt leaves a sink row to the
    first step, and the layers flush at different steps (one graph per pattern)."""
    gen = torch.Generator().manual_seed(7)
    lp = LayerPlan(key=normq(4, codebook="uniform", center=True),
                   value=normq(2, codebook="uniform", scale_dtype="log8", center=True), block=16)
    tensors = {f"layers.{i}.{r}.center": (0.5 * torch.randn(2, 64, generator=gen)).half()
               for i in range(2) for r in ("key", "value")} if means else {}
    if ranges:  # per KV head (lo, hi) of log2(scale), wide around the tiny model's value scales
        tensors |= {f"layers.{i}.value.scale_range": torch.tensor([[-9.0, 3.0], [-8.0, 2.5]]).half() for i in range(2)}
    return Plan(layers=(_sinks(lp, 0, 8), _sinks(lp, 8, 12)), name="t", tensors=tensors)


PLANS = {  # name: (plan, prompt length)
    "k2g16-v2-sinks": (_k2g16, 37),  # the prompt fills both layers' sinks and quantizes a block
    "centered-normq-k4v2-sinks": (_centered, 7),  # norm codes, log8 scales, centering (sinks too), prompt < sinks
}


@pytest.fixture(scope="module")
def model() -> Any:
    m = tiny_model("llama", layers=2, heads=4, kv_heads=2, head_dim=64, vocab=160)
    return m.to(DEV).to(torch.float16 if DEV == "cuda" else torch.float32)


def _inputs(length: int = 37) -> tuple[torch.Tensor, torch.Tensor]:
    ids = torch.randint(1, 160, (2, length), generator=torch.Generator().manual_seed(0)).to(DEV)
    mask = torch.ones_like(ids)
    mask[1, :5] = 0  # row 1 is left-padded
    return ids, mask


def _dynamic(model: Any, plan: Plan, ids: torch.Tensor, mask: torch.Tensor, steps: int) -> tuple[Any, Any]:
    cache = KVTuneCache(plan, model, backend="triton")
    pos = (mask.cumsum(-1) - 1).masked_fill(mask == 0, 1)  # generate()'s padding-aware positions
    logits = model(ids, attention_mask=mask, position_ids=pos, logits_to_keep=1,
                   **cache_kwargs(model, cache)).logits[:, -1]
    toks, seen = [], [logits]
    for _ in range(steps):
        tok = logits.argmax(-1)
        toks.append(tok)
        mask = torch.cat([mask, torch.ones_like(mask[:, :1])], 1)
        logits = model(tok[:, None], attention_mask=mask, position_ids=mask.sum(-1, keepdim=True) - 1,
                       **cache_kwargs(model, cache)).logits[:, -1]
        seen.append(logits)
    return torch.stack(toks, 1), torch.stack(seen, 1), cache


def _static(model: Any, plan: Plan, ids: torch.Tensor, mask: torch.Tensor, steps: int, graphs: bool) -> Any:
    cache = plan.cache(model, static=True, batch=ids.shape[0], max_length=ids.shape[1] + steps + 8)
    dec = GraphDecoder(model, cache, graphs=graphs)
    logits = dec.prefill(ids, mask)
    toks, seen = [], [logits.clone()]
    for _ in range(steps):
        tok = logits.argmax(-1)
        toks.append(tok)
        logits = dec.step(tok)
        seen.append(logits.clone())
    return torch.stack(toks, 1), torch.stack(seen, 1), cache


@pytest.mark.parametrize("name", list(PLANS))
def test_static_equals_dynamic(model: Any, name: str) -> None:
    """Same greedy tokens and logits as the dynamic cache through the kernel, across flushes, with a left-padded row
    and sink tokens; every layer's counters end where the dynamic cache's do."""
    plan, length = PLANS[name]
    ids, mask = _inputs(length)
    ref_tok, ref_logits, ref = _dynamic(model, plan(), ids, mask, 24)
    tok, logits, cache = _static(model, plan(), ids, mask, 24, graphs=False)
    torch.testing.assert_close(logits.float(), ref_logits.float(), atol=3e-3, rtol=0)
    assert torch.equal(tok, ref_tok)
    assert cache.get_seq_length() == length + 24
    for layer, dyn in zip(cache.layers, ref.layers, strict=True):
        sinks = min(layer.length, layer.sinks)
        assert (layer.n_quant, sinks, layer.n_win) == (dyn.n_quant, dyn.n_sinks, dyn.win_k.shape[2])
        assert (layer.n_quant, sinks + layer.n_win, layer.length) == (int(layer.nq), int(layer.nw), length + 24)
        assert layer.n_quant > 0  # a flush happened in every case
    model.set_attn_implementation("sdpa")


@pytest.mark.skipif(DEV != "cuda", reason="CUDA graphs need a GPU")
@pytest.mark.parametrize("name", list(PLANS))
def test_graph_replay_equals_eager(model: Any, name: str) -> None:
    plan, length = PLANS[name]
    ids, mask = _inputs(length)
    tok_e, logits_e, _ = _static(model, plan(), ids, mask, 40, graphs=False)
    tok_g, logits_g, _ = _static(model, plan(), ids, mask, 40, graphs=True)
    assert torch.equal(tok_g, tok_e)
    torch.testing.assert_close(logits_g, logits_e, atol=1e-3, rtol=0)
    model.set_attn_implementation("sdpa")


@pytest.mark.skipif(DEV != "cuda", reason="torch.compile of the triton_op is checked on a GPU")
def test_custom_op_compiles(model: Any) -> None:
    """``torch.compile(fullgraph=True)`` traces one layer's attention through the ``kvtune::decode_static`` op."""
    ids, mask = _inputs()
    cache = _k2g16().cache(model, static=True, batch=2, max_length=64)
    GraphDecoder(model, cache, graphs=False).prefill(ids, mask)
    layer = cache.layers[0]
    q = torch.randn(2, 4, 1, 64, device=DEV, dtype=torch.float16)

    def attend(q: torch.Tensor) -> torch.Tensor:
        from kvtune.kernels.decode_static import decode_static

        return decode_static(q, *layer.operands, layer.win_k, layer.win_v, layer.nq, layer.nw, layer.wvis,
                             layer.qvis, 0.125)

    torch.testing.assert_close(torch.compile(attend, fullgraph=True)(q), attend(q), atol=1e-3, rtol=0)
    model.set_attn_implementation("sdpa")


def test_static_refuses_plans_the_kernel_cannot_serve(model: Any) -> None:
    with pytest.raises(KVTuneError, match="cannot use the static"):
        load_plan("zipcache").cache(model, static=True, batch=1, max_length=64)
    with pytest.raises(KVTuneError, match="no calibrated mean"):  # a captured step needs the mean from the start
        _centered(means=False).cache(model, static=True, batch=1, max_length=64)
    lp = _k2g16().layers[0]
    refused = {"salient tokens": replace(lp, salient=SalientPolicy(ratio=0.05, bits=8, sink_tokens=3)),
               "merge policy": replace(lp, merge=MergePolicy(ratio=0.25, method="elastic"))}
    for why, bad in refused.items():  # sinks are served, salient-ratio tokens and merging are not
        with pytest.raises(KVTuneError, match=why):
            Plan(layers=(lp, bad), name="t").cache(model, static=True, batch=1, max_length=64)
    mixed = Plan(layers=(lp, replace(lp, residual=lp.residual + 1)), name="t")  # layers flush at different steps
    assert mixed.cache(model, static=True, batch=1, max_length=64).next_flush() == (False, False)
    with pytest.raises(KVTuneError, match=r"value spec .* needs calibrated scale_range") as err:  # log8 scales too
        _centered(ranges=False).cache(model, static=True, batch=1, max_length=64)
    assert "\n" not in str(err.value)
    model.set_attn_implementation("sdpa")


@pytest.mark.parametrize("arch", ["mistral", "gemma3", "llama4"])
def test_windowed_layers_see_what_the_dynamic_cache_sees(arch: str) -> None:
    """Sliding-window (Mistral; Gemma 3's 5:1 pattern with one KV head) and chunked (Llama 4) layers with an 8-token
    window under a 30-token prompt and a left-padded row: each step attends only what the window shows (the static
    cache keeps the older tokens and masks them), as the dynamic cache does; same logits on the same tokens."""
    kv = 1 if arch == "gemma3" else 2
    m = tiny_model(arch, layers=6 if arch == "gemma3" else 2, heads=2 * kv, kv_heads=kv, head_dim=32, vocab=160,
                   window=8).to(DEV).to(torch.float16 if DEV == "cuda" else torch.float32)
    lp = LayerPlan(key=affine(bits=2, axis="channel", group=16), value=affine(bits=2, axis="token", group=0),
                   residual=4)
    plan = Plan(layers=(lp,), name="t")
    ids, mask = _inputs(30)
    tok, logits, _ = _static(m, plan, ids, mask, 6, graphs=False)
    m.set_attn_implementation("sdpa")
    cache = KVTuneCache(plan, m, backend="triton")
    pos = (mask.cumsum(-1) - 1).masked_fill(mask == 0, 1)
    ref = [m(ids, attention_mask=mask, position_ids=pos, logits_to_keep=1, **cache_kwargs(m, cache)).logits[:, -1]]
    for i in range(tok.shape[1]):  # the static run's tokens, fed to the dynamic cache
        mask = torch.cat([mask, torch.ones_like(mask[:, :1])], 1)
        ref.append(m(tok[:, i : i + 1], attention_mask=mask, position_ids=mask.sum(-1, keepdim=True) - 1,
                     **cache_kwargs(m, cache)).logits[:, -1])
    torch.testing.assert_close(logits.float(), torch.stack(ref, 1).float(), atol=3e-3, rtol=0)


@pytest.mark.parametrize("arch, why", [("gemma2", "soft-capping"), ("gpt_oss", "learned sinks")])
def test_static_refuses_attention_the_kernel_lacks(arch: str, why: str) -> None:
    m = tiny_model(arch, layers=2, heads=4, kv_heads=2, head_dim=32, vocab=160)
    with pytest.raises(KVTuneError, match=why) as err:
        _k2g16().cache(m, static=True, batch=1, max_length=64)
    assert "\n" not in str(err.value)
