"""The Collector on synthetic attention calls: planted outlier channels and a planted sink are found, and
streaming chunk by chunk gives the statistics of one batch pass over the same tokens."""

from __future__ import annotations

import torch

from kvtune.calibrate.attention import PATTERN_LABELS
from kvtune.calibrate.collect import Collector
from kvtune.calibrate.hooks import AttentionCall
from kvtune.calibrate.pipeline import _sink_tensor, _stat_tensors
from kvtune.calibrate.settings import CalibSettings

L, HQ, HKV, T, D = 2, 4, 2, 128, 16
SETTINGS = CalibSettings(tokens=4 * T, seq_len=T, held_len=64, attention_seqs=4, samples=32)


def _chunk(i: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Chunk ``i``: q ``[1, HQ, T, D]``, k/v ``[1, HKV, T, D]`` with planted structure.

    Keys: channel 11 of KV head 1 is a 25x outlier; values: channel 3 of KV head 0 is a 40x outlier.
    Every query points at key 0 (an attention sink at token 0 in every head).
    """
    gen = torch.Generator().manual_seed(100 + i)
    k = torch.nn.functional.normalize(torch.randn(1, HKV, T, D, generator=gen), dim=-1)
    v = torch.randn(1, HKV, T, D, generator=gen)
    q = torch.randn(1, HQ, T, D, generator=gen) * 0.1 + 64 * k[:, :, :1].repeat_interleave(HQ // HKV, dim=1)
    q[:, 2:, :, 11] = 0  # query heads 2, 3 read KV head 1: keep its outlier channel out of their logits
    k[:, 1, :, 11] *= 25
    v[:, 0, :, 3] *= 40
    return q, k, v


def _feed(collector: Collector, chunks: list[tuple[torch.Tensor, ...]], start: int = 0) -> None:
    for i, (q, k, v) in enumerate(chunks, start=start):
        collector.begin_chunk(i, batch=q.shape[0])
        for layer in range(L):
            collector.on_key_pre_rope(layer, k * 2)  # stands in for the pre-RoPE keys
            collector.on_attention(AttentionCall(layer, q, k, v, D ** -0.5))


def _tensors(chunks: list[tuple[torch.Tensor, ...]]) -> dict[str, torch.Tensor]:
    collector = Collector(L, HKV, D, SETTINGS)
    _feed(collector, chunks)
    tensors = _stat_tensors(collector.finalize())
    tensors["attention.sink_tokens"] = _sink_tensor(tensors["attention.sink_rate"])
    return tensors


def test_planted_outliers_and_sink_are_found() -> None:
    t = _tensors([_chunk(i) for i in range(4)])
    assert (t["outliers.key_rank"][:, 1, 0] == 11).all() and (t["outliers.key_pre_rope_rank"][:, 1, 0] == 11).all()
    assert (t["outliers.value_rank"][:, 0, 0] == 3).all()
    assert (t["outliers.key_scores"][:, 1, 11] > 10).all() and (t["outliers.key_scores"][:, 0].max() < 3)
    assert t["attention.sink_tokens"].tolist() == [[0, -1, -1, -1]] * L
    assert (t["attention.pivot_position"] == 0).all() and (t["attention.sink_score"] > 0.5).all()
    assert (t["attention.pattern"] == PATTERN_LABELS.index("pivot-token-salient")).all()
    assert t["samples.key"].shape == (L, HKV, 32, D) and t["samples.query"].shape == (L, HQ, 32, D)


def test_streaming_equals_one_batch_pass() -> None:
    chunks = [_chunk(i) for i in range(4)]
    streamed = _tensors(chunks)
    batched = _tensors([tuple(torch.cat(parts) for parts in zip(*chunks))])  # one call, batch of 4
    for name in ("keys.mean", "keys.var", "keys.absmax", "values.min", "values.max", "keys_pre_rope.var",
                 "keys.token_norm_mean", "keys.token_norm_max", "attention.normalized_score_mean",
                 "attention.entropy", "attention.sink_rate", "samples.key"):
        torch.testing.assert_close(streamed[name], batched[name], rtol=1e-5, atol=1e-6, msg=name)
    k = torch.cat([c[1] for c in chunks])  # [4, HKV, T, D]
    torch.testing.assert_close(streamed["keys.mean"][0], k.double().mean(dim=(0, 2)).float(), rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(streamed["keys.var"][0], k.double().var(dim=(0, 2), unbiased=False).float(),
                               rtol=1e-5, atol=1e-6)
    flat = k.permute(1, 3, 0, 2).reshape(HKV, D, -1)  # [HKV, D, all tokens]
    bin_width = (flat.amax(dim=-1) - flat.amin(dim=-1)) / SETTINGS.hist_bins
    err = (streamed["keys.quantiles"][0, :, :, 2] - flat.median(dim=-1).values).abs()  # level 0.5
    assert (err <= 4 * bin_width + 1e-6).all()  # the sketch widens bins by powers of two
