"""Hadamard and FFT transforms are exact inverses; outlier split/merge is lossless."""

from __future__ import annotations

import pytest
import torch

from kvtune.errors import KVTuneError
from kvtune.quant.outliers import merge_channels, rank_channels, split_channels
from kvtune.quant.transforms import fft_tokens, hadamard, ifft_tokens


@pytest.mark.parametrize("d", [1, 2, 16, 64, 128])
def test_hadamard_is_orthonormal_involution(d: int) -> None:
    x = torch.randn(3, 5, d)
    y = hadamard(x)
    assert torch.allclose(hadamard(y), x, atol=1e-5)
    assert torch.allclose(y.norm(dim=-1), x.norm(dim=-1), atol=1e-4)


def test_hadamard_keeps_scores() -> None:
    q, k = torch.randn(4, 64), torch.randn(10, 64)
    assert torch.allclose(hadamard(q) @ hadamard(k).T, q @ k.T, atol=1e-4)


def test_hadamard_rejects_non_power_of_two() -> None:
    with pytest.raises(KVTuneError, match="power-of-two"):
        hadamard(torch.randn(2, 96))


@pytest.mark.parametrize("group", [2, 7, 8, 32])
def test_fft_tokens_is_exact_orthonormal(group: int) -> None:
    x = torch.randn(2, 3, group * 3, 16)
    c = fft_tokens(x, group)
    assert c.shape == x.shape
    assert torch.allclose(ifft_tokens(c, group), x, atol=1e-5)
    assert torch.allclose(c.pow(2).sum(), x.pow(2).sum(), rtol=1e-5)


def test_fft_first_coefficient_is_scaled_mean() -> None:
    x = torch.randn(1, 8, 4)
    assert torch.allclose(fft_tokens(x, 8)[:, 0], x.mean(dim=1) * 8 ** 0.5, atol=1e-5)


def test_outlier_split_merge_roundtrip_and_ranking() -> None:
    x = torch.randn(2, 3, 20, 16)
    x[..., 5] *= 50
    x[..., 11] *= 20
    idx = rank_channels(x, 2)
    assert idx[0, 0].tolist() == [5, 11]
    main, out = split_channels(x, idx)
    assert main.shape[-1] == 14 and out.shape[-1] == 2
    assert torch.equal(merge_channels(main, out, idx), x)
