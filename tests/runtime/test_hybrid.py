"""Every architecture of :mod:`kvtune.tiny`, windows of 16 tokens, context 4x the window.

For each: the fp16 plan reproduces the plain model's logits (fp16 rounding of K/V only) through chunked prefill
(non-stepwise multi-token calls), stepwise teacher forcing and token-by-token decoding; kv8 greedy tokens equal
fp16's; windowed layers hold only their window (bytes vs transformers' ``DynamicCache``, which keeps the windows).
"""

from __future__ import annotations

from functools import cache
from typing import Any

import pytest
import torch
from transformers import DynamicCache

from kvtune.models import cache_kwargs, identity, model_identity
from kvtune.plan import load_plan
from kvtune.runtime import teacher_forced_logits
from kvtune.tiny import tiny_model

W = 16
T = 4 * W
ARCHS: dict[str, dict[str, Any]] = {  # tiny_model arguments beyond arch and window
    "llama": {}, "mistral": {}, "qwen2": {"layers": 4}, "qwen3": {"layers": 4}, "phi3": {},
    "gemma2": {"layers": 4}, "gemma3": {"layers": 6, "heads": 2, "kv_heads": 1, "head_dim": 256},
    "gpt_oss": {"layers": 4}, "llama4": {"layers": 4},
}
ATOL = 2e-3  # fp16 rounding of K and V


@cache
def _model(arch: str) -> Any:
    kw = {"layers": 2, **ARCHS[arch]}
    return tiny_model(arch, window=None if arch == "llama" else W, **kw)


@cache
def _plain(arch: str, batch: int = 1) -> torch.Tensor:
    """The model's own logits ``[B, T, V]`` (no cache), computed before any kvtune cache switches it."""
    with torch.no_grad():
        return _model(arch)(_ids(batch), use_cache=False).logits.float()


def _ids(batch: int = 1, length: int = T, seed: int = 0) -> torch.Tensor:
    return torch.randint(1, 128, (batch, length), generator=torch.Generator().manual_seed(seed))


def _kl(ref: torch.Tensor, out: torch.Tensor) -> float:
    lp, lq = ref.log_softmax(-1), out.log_softmax(-1)
    return float((lp.exp() * (lp - lq)).sum(-1).max())


@torch.no_grad()
def _chunked_prefill(model: Any, ids: torch.Tensor, chunk: int) -> torch.Tensor:
    cache = load_plan("fp16").cache(model)
    return torch.cat([model(ids[:, s:s + chunk], **cache_kwargs(model, cache)).logits.float()
                      for s in range(0, ids.shape[1], chunk)], 1)


@pytest.mark.parametrize("arch", sorted(ARCHS))
def test_fp16_plan_equals_the_model(arch: str) -> None:
    model, ref = _model(arch), _plain(arch)
    ids = _ids()
    runs = {"chunked prefill": _chunked_prefill(model, ids, 23),
            "stepwise": teacher_forced_logits(model, load_plan("fp16"), ids, chunk=7, prefill=20),
            "decode": teacher_forced_logits(model, load_plan("fp16"), ids, chunk=1, prefill=T - W - 4)}
    for name, out in runs.items():
        torch.testing.assert_close(out, ref, atol=ATOL, rtol=0, msg=lambda m, n=name: f"{arch} {n}: {m}")
        assert _kl(ref, out) < 1e-4


@pytest.mark.parametrize("arch", sorted(ARCHS))
def test_kv8_greedy_equals_fp16(arch: str) -> None:
    model, ids = _model(arch), _ids(length=T - W)
    gen = {name: model.generate(ids, max_new_tokens=12, do_sample=False, pad_token_id=0,
                                **cache_kwargs(model, load_plan(name).cache(model))) for name in ("fp16", "kv8")}
    assert torch.equal(gen["kv8"], gen["fp16"])


def _dynamic_fp16_bytes(model: Any, ids: torch.Tensor) -> int:
    """Bytes transformers' ``DynamicCache`` holds after ``ids``, at 2 bytes an element (an fp16 model's)."""
    dc = DynamicCache(config=model.config)
    with torch.no_grad():
        model(ids, **cache_kwargs(model, dc))
    return sum(2 * (layer.keys.numel() + layer.values.numel()) for layer in dc.layers)


@pytest.mark.parametrize("arch", ["gemma3", "gemma2", "llama4", "mistral"])
def test_windowed_layers_hold_only_their_window(arch: str) -> None:
    model, ids = _model(arch), _ids()
    plan = load_plan("fp16").bind(identity(model_identity(model)))
    cache = plan.cache(model)
    teacher_forced_logits(model, cache, ids, chunk=5, prefill=9)
    held, theirs = cache.nbytes(), _dynamic_fp16_bytes(model, ids)
    assert held <= 1.05 * theirs
    assert plan.effective_bits(T) == pytest.approx(16.0)
    assert held * 8 == plan.bits(T).total  # the accountant prices what the runtime holds
    kv8 = load_plan("kv8").bind(plan.model)
    cache8 = kv8.cache(model)
    teacher_forced_logits(model, cache8, ids, chunk=5, prefill=9)
    assert cache8.nbytes() * 8 == kv8.bits(T).total


@pytest.mark.parametrize("arch", ["gemma3", "llama4"])
def test_left_padding_and_beams_in_windowed_layers(arch: str) -> None:
    model = _model(arch)
    a, b = _ids(1, 40, seed=3), _ids(1, 29, seed=4)
    batch = torch.cat([a, torch.cat([torch.zeros(1, 11, dtype=torch.long), b], 1)])
    mask = torch.ones_like(batch)
    mask[1, :11] = 0
    padded = model.generate(batch, attention_mask=mask, max_new_tokens=8, do_sample=False, pad_token_id=0,
                            **cache_kwargs(model, load_plan("fp16").cache(model)))
    for row, alone in ((0, a), (1, b)):
        single = model.generate(alone, max_new_tokens=8, do_sample=False, pad_token_id=0,
                                **cache_kwargs(model, load_plan("fp16").cache(model)))
        assert torch.equal(padded[row, 40:], single[0, alone.shape[1]:])
    beams = {name: model.generate(a, max_new_tokens=8, num_beams=2, do_sample=False, pad_token_id=0,
                                  **cache_kwargs(model, cache)) for name, cache in
             (("dynamic", DynamicCache(config=model.config)), ("fp16", load_plan("fp16").cache(model)))}
    assert torch.equal(beams["fp16"], beams["dynamic"])


@pytest.mark.parametrize("arch", ["mistral", "llama4"])
def test_quantized_teacher_forcing_equals_token_by_token(arch: str) -> None:
    """Stepwise chunks see exactly what decoding showed, also while blocks leave the window (evicted). (The tiny
    Gemma 3's own forward differs by 1e-4 between chunk sizes, enough to flip 4-bit codes: not used here.)"""
    model, ids = _model(arch), _ids(length=T + W, seed=2)
    plan = load_plan("kv4")
    one = teacher_forced_logits(model, plan, ids, chunk=1, prefill=W)
    chunked = teacher_forced_logits(model, plan, ids, chunk=11, prefill=W)
    torch.testing.assert_close(chunked, one, atol=2e-4, rtol=0)
    with torch.no_grad():
        assert (one - model(ids, use_cache=False).logits).abs().max() > 1e-3  # the quantizer really acts


def test_residual_longer_than_the_window_is_capped() -> None:
    """KIVI's 128-token fp16 residual on 16-token sliding layers: every visible token is fp16 anyway, so the
    outputs are fp16's, and the layer holds at most its window plus a flush (capped residual W - 1)."""
    model, ids = _model("mistral"), _ids()
    plan = load_plan("kivi-2bit").bind(identity(model_identity(model)))
    cache = plan.cache(model)
    kivi = teacher_forced_logits(model, cache, ids, chunk=7, prefill=W)
    torch.testing.assert_close(kivi, teacher_forced_logits(model, load_plan("fp16"), ids, chunk=7, prefill=W),
                               atol=1e-5, rtol=0)
    assert cache.nbytes() * 8 == plan.bits(T).total
    layer = cache.layers[0]
    assert layer.plan.residual == W - 1 and layer.win_k.shape[2] < W - 1 + layer.flush
