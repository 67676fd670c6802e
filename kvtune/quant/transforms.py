"""Invertible transforms applied before quantization.

* :func:`hadamard` rotates channels with the orthonormal Walsh-Hadamard matrix (QuaRot, AKVQ-VL):
  ``x @ H / sqrt(D)``; it is its own inverse, and applying it to both Q and K leaves ``QK^T``
  unchanged. Stores nothing.
* :func:`fft_tokens` / :func:`ifft_tokens` (VidKV): inside each block of ``group`` consecutive
  tokens, an orthonormal *real* Fourier basis along the token axis. A block of G real values becomes
  exactly G real coefficients ``[Re X0, sqrt2*Re X1..Xm, sqrt2*Im X1..Xm, (Re X_{G/2} if G even)]``
  of the ortho-normalised ``rfft`` (m = ceil(G/2)-1). Imaginary parts of DC/Nyquist are identically
  zero and are not stored, so the transform stores the same number of values as its input.
* :func:`channel_norm` (ZipCache channel-separable): per-channel ``sqrt(absmax)`` divisor ``[..., 1, D]``.
"""

from __future__ import annotations

import math
from functools import lru_cache

import torch

from kvtune.errors import KVTuneError


@lru_cache(maxsize=16)
def _hadamard_matrix(d: int) -> torch.Tensor:
    """Orthonormal Sylvester Hadamard matrix ``[d, d]`` (float32, CPU). Built outside inference mode: it is
    cached, and an inference tensor (first call under ``torch.inference_mode``, e.g. calibration) would break
    later calls under autograd."""
    with torch.inference_mode(False):
        h = torch.ones(1, 1)
        while h.shape[0] < d:
            h = torch.cat([torch.cat([h, h], 1), torch.cat([h, -h], 1)], 0)
        return h / math.sqrt(d)


def hadamard(x: torch.Tensor) -> torch.Tensor:
    """Rotate the last dim of ``x`` ``[..., D]`` by the orthonormal Hadamard matrix (self-inverse)."""
    d = x.shape[-1]
    if d <= 0 or d & (d - 1):
        raise KVTuneError(f"Walsh-Hadamard rotation needs a power-of-two head_dim, got {d}",
                          "turn hadamard off for this model")
    return (x.float() @ hadamard_on(d, x.device)).to(x.dtype)


@lru_cache(maxsize=16)
def hadamard_on(d: int, device: torch.device) -> torch.Tensor:
    """:func:`_hadamard_matrix` on ``device``, copied once (a copy inside a CUDA-graph capture is not allowed)."""
    with torch.inference_mode(False):
        return _hadamard_matrix(d).to(device)


def _blocks(x: torch.Tensor, group: int) -> torch.Tensor:
    """``[..., T, D]`` -> ``[..., T/G, G, D]``; T must be a multiple of G."""
    t = x.shape[-2]
    if t % group:
        raise KVTuneError(f"{t} tokens is not a multiple of the FFT group {group}", "quantize whole groups")
    return x.reshape(*x.shape[:-2], t // group, group, x.shape[-1])


def fft_tokens(x: torch.Tensor, group: int) -> torch.Tensor:
    """Real orthonormal Fourier coefficients per token block: ``[..., T, D] -> [..., T, D]`` (float32)."""
    xb = _blocks(x.float(), group)
    spec = torch.fft.rfft(xb, dim=-2, norm="ortho")  # [..., T/G, G//2+1, D]
    m = (group + 1) // 2 - 1
    parts = [spec[..., :1, :].real, math.sqrt(2) * spec[..., 1:m + 1, :].real,
             math.sqrt(2) * spec[..., 1:m + 1, :].imag]
    if group % 2 == 0:
        parts.append(spec[..., group // 2:, :].real)
    return torch.cat(parts, dim=-2).reshape(x.shape)


def ifft_tokens(c: torch.Tensor, group: int) -> torch.Tensor:
    """Inverse of :func:`fft_tokens`: ``[..., T, D] -> [..., T, D]`` (float32)."""
    cb = _blocks(c.float(), group)
    m = (group + 1) // 2 - 1
    re = torch.cat([cb[..., :1, :], cb[..., 1:m + 1, :] / math.sqrt(2)], dim=-2)
    im = torch.cat([torch.zeros_like(cb[..., :1, :]), cb[..., m + 1:2 * m + 1, :] / math.sqrt(2)], dim=-2)
    if group % 2 == 0:
        re = torch.cat([re, cb[..., 2 * m + 1:, :]], dim=-2)
        im = torch.cat([im, torch.zeros_like(cb[..., :1, :])], dim=-2)
    xb = torch.fft.irfft(torch.complex(re, im), n=group, dim=-2, norm="ortho")
    return xb.reshape(c.shape)


def channel_norm(x: torch.Tensor) -> torch.Tensor:
    """ZipCache per-channel divisor ``sqrt(max_t |x|)`` of ``[..., T, D]`` -> ``[..., 1, D]`` (never 0)."""
    amax = x.float().abs().amax(dim=-2, keepdim=True)
    return torch.where(amax > 0, amax.sqrt(), torch.ones_like(amax))
