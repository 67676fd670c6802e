"""Streaming accumulators equal the batch computation."""

from __future__ import annotations

import math

import pytest
import torch

from kvtune.calibrate.collect import TensorStats
from kvtune.calibrate.stats import HistogramSketch, MomentStats, ReservoirSampler, RowReservoir

LEVELS = (0.0, 0.001, 0.01, 0.5, 0.99, 0.999, 1.0)


def _stream() -> torch.Tensor:
    """[5000, 6]: normal, wide, narrow+offset, constant, range growing late, heavy tail."""
    gen = torch.Generator().manual_seed(0)
    x = (torch.randn(5000, 6, generator=gen) * torch.tensor([1, 10, 0.01, 1, 1, 1.0])
         + torch.tensor([0, 0, 5, 0, 0, 0.0]))
    x[:, 3] = 2.0
    x[4000:, 4] *= 50
    x[:, 5] = x[:, 5].exp()
    return x


def test_moments_streaming_equals_batch() -> None:
    x = _stream()
    m = MomentStats(6)
    for block in x.split(333):
        m.update(block)
    got = m.finalize()
    torch.testing.assert_close(got["mean"], x.double().mean(0).float(), rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(got["var"], x.double().var(0, unbiased=False).float(), rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(got["min"], x.amin(0))
    torch.testing.assert_close(got["max"], x.amax(0))
    torch.testing.assert_close(got["absmax"], x.abs().amax(0))


def test_moments_chan_merge_is_exact() -> None:
    x = _stream()
    a, b, whole = MomentStats(6), MomentStats(6), MomentStats(6)
    a.update(x[:1234])
    b.update(x[1234:])
    whole.update(x)
    a.merge(b)
    for name, value in whole.finalize().items():
        torch.testing.assert_close(a.finalize()[name], value, rtol=1e-6, atol=1e-6)


def test_moments_reject_bad_shapes() -> None:
    with pytest.raises(ValueError):
        MomentStats(3).update(torch.zeros(4, 2))
    with pytest.raises(ValueError):
        MomentStats(3).finalize()


def test_histogram_quantiles_within_one_bin() -> None:
    """Quantile q vs the order statistic x_(ceil(qN)): at most one bin width apart, min/max exact."""
    x = _stream()
    sketch = HistogramSketch(6, bins=256)
    for block in x.split(333):
        sketch.update(block)
    got = sketch.quantiles(LEVELS)
    s = x.sort(0).values
    ref = torch.stack([s[max(math.ceil(q * len(x)) - 1, 0)] for q in LEVELS], dim=1)
    assert ((got - ref).abs() <= sketch.resolution[:, None] * 1.0001 + 1e-6).all()
    torch.testing.assert_close(got[:, 0], x.amin(0))
    torch.testing.assert_close(got[:, -1], x.amax(0))


def test_histogram_growth_keeps_counts() -> None:
    sketch = HistogramSketch(2, bins=64)
    sketch.update(torch.rand(100, 2))
    sketch.update(torch.rand(100, 2) * 1000 - 500)
    assert int(sketch.counts.sum()) == 400
    assert sketch.quantiles([0.5]).shape == (2, 1)


def test_reservoir_fills_then_samples_uniformly() -> None:
    sampler = ReservoirSampler(capacity=50, seed=1)
    src, dst = sampler.plan(30)
    assert src.tolist() == list(range(30)) and dst.tolist() == list(range(30))
    hits = torch.zeros(1000)
    res = RowReservoir(50)
    stream = torch.arange(1000.0)[None, 30:, None]  # [1, 970, 1]: row value = its stream index
    res.update(torch.arange(30.0)[None, :, None], src, dst)
    src, dst = sampler.plan(970)
    res.update(stream, src, dst)
    kept = res.finalize(sampler.filled)[0, :, 0].long()
    hits[kept] = 1
    assert sampler.filled == 50 and kept.unique().numel() == 50
    assert 10 < int(hits[:500].sum()) < 40  # about half of the sample from each half of the stream


def test_tensor_stats_shapes_and_values() -> None:
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(2, 3, 40, 8, generator=gen)
    ts = TensorStats(heads=3, head_dim=8, bins=128, samples=16)
    sampler = ReservoirSampler(16)
    for part in x.split(20, dim=2):
        ts.update(part, sampler.plan(2 * 20))
    out = ts.finalize((0.5,), sampler.filled)
    torch.testing.assert_close(out["absmax"], x.abs().amax(dim=(0, 2)))
    torch.testing.assert_close(out["mean"], x.mean(dim=(0, 2)), rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(out["token_norm_max"], x.norm(dim=-1).amax(dim=(0, 2)))
    assert out["quantiles"].shape == (3, 8, 1) and out["token_norm_quantiles"].shape == (3, 1)
    assert out["samples"].shape == (3, 16, 8)
