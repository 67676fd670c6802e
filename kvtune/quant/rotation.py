"""Rotations applied to channels before any quantizer (a wrapper every family can use), by name.

A rotation ``R`` is orthonormal, so rotating both the query and the key leaves ``q·k`` unchanged: a rotated
key cache is attended by rotating the query (and a rotated value cache by rotating the output back). It
stores nothing. ``none`` is the identity (no computation); ``hadamard`` the Walsh-Hadamard matrix (power-of-two
head dims; QuaRot, AKVQ-VL, llama.cpp); ``orthogonal`` a fixed random orthogonal matrix (any head dim;
TurboQuant's random rotation).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from functools import lru_cache

import torch

from kvtune.quant.transforms import hadamard, hadamard_on


@dataclass(frozen=True)
class Rotation:
    """``forward`` maps ``[..., D]`` into the rotated basis, ``inverse`` back; ``check(d)`` raises for a head dim
    the rotation cannot handle; ``on(d, device)`` is the float32 ``[D, D]`` matrix ``R`` (``forward(x) = x @ R``,
    ``inverse(y) = y @ R.T``) cached on ``device``, or None for the identity."""

    name: str
    forward: Callable[[torch.Tensor], torch.Tensor]
    inverse: Callable[[torch.Tensor], torch.Tensor]
    check: Callable[[int], None]
    on: Callable[[int, torch.device], torch.Tensor | None] = lambda d, device: None

    @property
    def identity(self) -> bool:
        return self.name == "none"

    def inverse_on(self, d: int, device: torch.device) -> torch.Tensor | None:
        """``R.T`` contiguous float32 ``[D, D]`` on ``device`` (what the decode kernels' merge multiplies the output
        by to take it back), or None for the identity. Cached per (rotation, d, device)."""
        return _inverse_on(self.name, d, device) if not self.identity else None

    def split_half(self, d: int, device: torch.device) -> torch.Tensor | None:
        """``R`` as two fp16 matrices ``[2, D, D]`` with ``hi + lo = R`` to about 2^-22: fp16 rows times both, summed
        in float32 (two tensor-core products), equal the float32 product to rounding. None for the identity."""
        return _split_half(self.name, d, device) if not self.identity else None


def _power_of_two(d: int) -> None:
    from kvtune.errors import KVTuneError

    if d <= 0 or d & (d - 1):
        raise KVTuneError(f"Walsh-Hadamard rotation needs a power-of-two head_dim, got {d}",
                          "use rotation: none for this model")


def _same(x: torch.Tensor) -> torch.Tensor:
    return x


@lru_cache(maxsize=16)
def _orthogonal_matrix(d: int) -> torch.Tensor:
    """A fixed random orthogonal ``[d, d]`` float32 (QR of a seeded Gaussian, signs fixed): the same on every
    machine, so it is stored nowhere. Built outside inference mode (it is cached)."""
    with torch.inference_mode(False):
        gen = torch.Generator().manual_seed(0x6B7674)
        q, r = torch.linalg.qr(torch.randn(d, d, generator=gen, dtype=torch.float64))
        return (q * torch.sign(torch.diagonal(r))).float()


@lru_cache(maxsize=16)
def _orthogonal_on(d: int, device: torch.device) -> torch.Tensor:
    """:func:`_orthogonal_matrix` on ``device``, copied once (a copy inside a CUDA-graph capture is not allowed)."""
    with torch.inference_mode(False):
        return _orthogonal_matrix(d).to(device)


def _orthogonal(x: torch.Tensor) -> torch.Tensor:
    return (x.float() @ _orthogonal_on(x.shape[-1], x.device)).to(x.dtype)


def _orthogonal_inverse(x: torch.Tensor) -> torch.Tensor:
    return (x.float() @ _orthogonal_on(x.shape[-1], x.device).T).to(x.dtype)


ROTATIONS: dict[str, Rotation] = {
    "none": Rotation("none", _same, _same, lambda d: None),
    "hadamard": Rotation("hadamard", hadamard, hadamard, _power_of_two, hadamard_on),  # self-inverse
    "orthogonal": Rotation("orthogonal", _orthogonal, _orthogonal_inverse, lambda d: None, _orthogonal_on),  # any d
}


@lru_cache(maxsize=32)
def _inverse_on(name: str, d: int, device: torch.device) -> torch.Tensor:
    with torch.inference_mode(False):
        return ROTATIONS[name].on(d, device).T.contiguous()


@lru_cache(maxsize=32)
def _split_half(name: str, d: int, device: torch.device) -> torch.Tensor:
    with torch.inference_mode(False):
        r = ROTATIONS[name].on(d, device)
        hi = r.half()
        return torch.stack([hi, (r - hi.float()).half()]).contiguous()


def rotation(name: str) -> Rotation:
    """The rotation registered as ``name``."""
    return ROTATIONS[name]
