"""Probe attention equals the full softmax; planted sinks, pivot and text-salient heads are recognised."""

from __future__ import annotations

import torch

from kvtune.calibrate.attention import (
    PATTERN_LABELS,
    AttentionStats,
    pattern_labels,
    probe_attention,
    probe_positions,
    sequence_stats,
    sink_tokens,
)
from kvtune.layout import LayerSpan

T, D = 128, 32


def _full_attention(q: torch.Tensor, k: torch.Tensor, scaling: float) -> torch.Tensor:
    g = q.shape[1] // k.shape[1]
    kk = k.repeat_interleave(g, dim=1)
    scores = (q @ kk.transpose(-1, -2)) * scaling
    mask = torch.ones(q.shape[2], k.shape[2], dtype=torch.bool).tril()
    return scores.masked_fill(~mask, float("-inf")).softmax(-1)


def test_probe_positions() -> None:
    pos = probe_positions(1000, 0.05, 0.05, seed=0)
    assert pos.tolist() == sorted(set(pos.tolist()))
    assert pos[-50:].tolist() == list(range(950, 1000)) and len(pos) == 100
    assert probe_positions(1, 0.05, 0.05).tolist() == [0]


def test_probe_rows_equal_full_attention_gqa_and_window() -> None:
    gen = torch.Generator().manual_seed(0)
    q, k = torch.randn(2, 4, 300, D, generator=gen), torch.randn(2, 2, 300, D, generator=gen)
    pos = torch.arange(300)  # every row, processed in blocks
    full = _full_attention(q, k, D ** -0.5)
    torch.testing.assert_close(probe_attention(q, k, pos, D ** -0.5), full, rtol=1e-5, atol=1e-6)
    some = probe_positions(300)
    torch.testing.assert_close(probe_attention(q, k, some, D ** -0.5), full[:, :, some])
    windowed = probe_attention(q, k, pos, D ** -0.5, LayerSpan("sliding", 16))
    assert (windowed[:, :, 100, :85] == 0).all() and windowed[:, :, 100, 85:101].sum(-1).allclose(torch.ones(2, 4))
    chunked = probe_attention(q, k, pos, D ** -0.5, LayerSpan("chunked", 16))
    assert (chunked[:, :, 100, :96] == 0).all() and chunked[:, :, 100, 96:101].sum(-1).allclose(torch.ones(2, 4))


def _planted(kind: str) -> tuple[torch.Tensor, torch.Tensor]:
    """q [1, 2, T, D], k [1, 1, T, D]: 'sink' = every query drawn to token 0; 'local' = to its previous token."""
    gen = torch.Generator().manual_seed(1)
    k = torch.nn.functional.normalize(torch.randn(1, 1, T, D, generator=gen), dim=-1)
    q = torch.randn(1, 2, T, D, generator=gen) * 0.1
    if kind == "sink":
        q = q + 12 * k[:, :, :1]
    elif kind == "local":
        q[:, :, 1:] += 12 * k[:, :, :-1]
    return q, k


def _stats(kind: str) -> dict[str, torch.Tensor]:
    q, k = _planted(kind)
    pos = probe_positions(T)
    acc = AttentionStats()
    acc.update(q, k, pos, 1.0, margin=7)
    return acc.finalize(margin=7)


def test_planted_sink_is_found_and_pivot_salient() -> None:
    out = _stats("sink")
    assert sink_tokens(out["sink"]) == [0]
    assert out["pivot_position"].tolist() == [0, 0]
    assert (out["sink_score"] > 0.9).all()
    labels = pattern_labels(out["sink_score"], out["nonpivot_topk_mass"])
    assert [PATTERN_LABELS[i] for i in labels] == ["pivot-token-salient"] * 2


def test_previous_token_head_is_text_salient_without_sink() -> None:
    out = _stats("local")
    assert sink_tokens(out["sink"]) == []
    assert (out["nonpivot_topk_mass"] > 0.9).all() and (out["entropy"] < 0.3).all()
    labels = pattern_labels(out["sink_score"], out["nonpivot_topk_mass"])
    assert [PATTERN_LABELS[i] for i in labels] == ["text-salient"] * 2


def test_random_head_is_dispersed() -> None:
    out = _stats("random")
    assert sink_tokens(out["sink"]) == []
    assert (out["entropy"] > 0.9).all()
    labels = pattern_labels(out["sink_score"], out["nonpivot_topk_mass"])
    assert [PATTERN_LABELS[i] for i in labels] == ["dispersed"] * 2


def test_normalized_score_definition() -> None:
    """Column sum over the probes that see a key / their number (ZipCache)."""
    q, k = _planted("random")
    pos = probe_positions(T)
    probs = probe_attention(q, k, pos, 1.0)
    got = sequence_stats(probs, pos, margin=7)["normalized_score"]
    j = 5
    seers = (pos >= j).nonzero().flatten()
    torch.testing.assert_close(got[0, :, j], probs[0, :, seers, j].sum(-1) / len(seers))


def test_pattern_thresholds() -> None:
    """pivot: sink >= 0.3 and >= non-pivot top-k; text: non-pivot top-k >= 0.5; else dispersed."""
    sink = torch.tensor([0.5, 0.2, 0.2, 0.35, 0.55, 0.3])
    nonpivot = torch.tensor([0.3, 0.6, 0.3, 0.4, 0.6, 0.3])
    assert pattern_labels(sink, nonpivot).tolist() == [2, 1, 0, 0, 1, 2]
