"""Metric maths on known logits, and teacher-forced logits: chunked == token-by-token."""

from __future__ import annotations

import math
from typing import Any

import pytest
import torch

from kvtune.eval.quality import (
    MetricSums,
    SequenceScorer,
    dense_logits,
    greedy_agreement,
    perplexity,
    position_stats,
)
from kvtune.runtime import teacher_forced_logits


def test_identical_logits_have_zero_kl_and_full_agreement() -> None:
    g = torch.Generator().manual_seed(0)
    logits = torch.randn(40, 50, generator=g)
    targets = torch.randint(0, 50, (40,), generator=g)
    nll, kl, agree = position_stats(logits, logits.clone(), targets)
    assert kl.abs().max() < 1e-12 and agree.min() == 1.0
    assert torch.allclose(nll, -torch.log_softmax(logits.double(), -1)[torch.arange(40), targets])


def test_uniform_logits_have_perplexity_vocab() -> None:
    vocab = 37
    ids = torch.randint(0, vocab, (2, 9))
    assert perplexity(torch.zeros(2, 9, vocab), ids) == pytest.approx(vocab)
    sums = MetricSums()
    sums.add(*position_stats(torch.zeros(8, vocab), torch.zeros(8, vocab), ids[0, 1:]))
    assert sums.result()["ppl"] == pytest.approx(vocab) and sums.result()["positions"] == 8


def test_kl_of_known_distributions() -> None:
    p = torch.tensor([[0.5, 0.5]]).log()
    q = torch.tensor([[0.9, 0.1]]).log()
    _, kl, agree = position_stats(q, p, torch.tensor([0]))
    assert float(kl) == pytest.approx(0.5 * math.log(0.5 / 0.9) + 0.5 * math.log(0.5 / 0.1))
    assert MetricSums().result()["positions"] == 0 and math.isnan(MetricSums().result()["ppl"])
    assert agree.item() in (0.0, 1.0)


def test_sequence_scorer_tail() -> None:
    logits = torch.randn(1, 10, 5)
    ids = torch.randint(0, 5, (1, 10))
    scorer = SequenceScorer(tail_start=4)
    scorer.add(logits, logits, ids)
    r = scorer.result()
    assert r["positions"] == 9 and r["tail_positions"] == 5 and r["kl"] == pytest.approx(0.0, abs=1e-12)


def test_greedy_agreement() -> None:
    ref = torch.tensor([[1, 2, 3, 4], [1, 1, 1, 1]])
    out = torch.tensor([[1, 2, 9, 4], [1, 1, 1, 1]])
    prefix, overall = greedy_agreement(ref, out)
    assert prefix == pytest.approx((2 / 4 + 1) / 2) and overall == pytest.approx(7 / 8)


def test_cached_logits_dynamic_cache_matches_dense(tiny_llama: tuple[Any, Any]) -> None:
    from transformers import DynamicCache

    model, config = tiny_llama
    ids = torch.randint(0, config.vocab_size, (2, 40), generator=torch.Generator().manual_seed(1))
    dense = dense_logits(model, ids)
    for chunk, prefill in ((1, 0), (7, 0), (16, 10)):
        got = teacher_forced_logits(model, DynamicCache(config=config), ids, chunk=chunk, prefill=prefill)
        torch.testing.assert_close(got, dense, atol=1e-4, rtol=1e-4)


def _small_window(preset: str) -> Any:
    """A preset with the residual window cut to 8 tokens, so a 48-token sequence reads quantized tokens."""
    from dataclasses import replace

    from kvtune.plan import load_plan

    plan = load_plan(preset)
    return replace(plan, layers=tuple(replace(layer, residual=min(layer.residual, 8)) for layer in plan.layers))


@pytest.mark.parametrize("preset", ["kv4", "k4v2", "kivi-2bit"])
def test_teacher_forced_chunked_equals_token_by_token(tiny_llama: tuple[Any, Any], preset: str) -> None:
    from kvtune.eval.baselines import PlanMethod

    model, config = tiny_llama
    method = PlanMethod(name=preset, plan=_small_window(preset))
    ids = torch.randint(0, config.vocab_size, (1, 48), generator=torch.Generator().manual_seed(2))
    one = method.teacher_forced(model, ids, chunk=1, prefill=0)
    for chunk in (8, 16):
        torch.testing.assert_close(method.teacher_forced(model, ids, chunk=chunk, prefill=0), one,
                                   atol=1e-4, rtol=1e-4)
    # and the quantized cache is really in the loop: logits differ from the dense reference
    assert (one - dense_logits(model, ids)).abs().max() > 1e-5


def test_quantized_cache_teacher_forcing_equals_token_by_token(tiny_llama: tuple[Any, Any]) -> None:
    from kvtune.eval.baselines import HFQuantizedMethod

    model, config = tiny_llama
    method = HFQuantizedMethod(name="hf-quanto-2bit", backend="quanto", nbits=2, group=16, residual=8)
    if method.unavailable():
        pytest.skip(method.unavailable())
    ids = torch.randint(0, config.vocab_size, (1, 40), generator=torch.Generator().manual_seed(3))
    one = teacher_forced_logits(model, method.new_cache(model), ids, chunk=1)
    for prefill in (0, 5):
        got = method.teacher_forced(model, ids, chunk=64, prefill=prefill)
        want = one if prefill == 0 else teacher_forced_logits(model, method.new_cache(model), ids, chunk=1, prefill=5)
        torch.testing.assert_close(got, want, atol=1e-4, rtol=1e-4)
    assert (one - dense_logits(model, ids)).abs().max() > 1e-4  # the quantized store is really read
