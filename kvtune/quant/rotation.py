"""Rotations applied to channels before any quantizer (a wrapper every family can use), by name.

A rotation ``R`` is orthonormal, so rotating both the query and the key leaves ``q·k`` unchanged: a rotated
key cache is attended by rotating the query (and a rotated value cache by rotating the output back). It
stores nothing. ``none`` is the identity (no computation).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch

from kvtune.quant.transforms import hadamard


@dataclass(frozen=True)
class Rotation:
    """``forward`` maps ``[..., D]`` into the rotated basis, ``inverse`` back; ``check(d)`` raises for a head dim
    the rotation cannot handle."""

    name: str
    forward: Callable[[torch.Tensor], torch.Tensor]
    inverse: Callable[[torch.Tensor], torch.Tensor]
    check: Callable[[int], None]

    @property
    def identity(self) -> bool:
        return self.name == "none"


def _power_of_two(d: int) -> None:
    from kvtune.errors import KVTuneError

    if d <= 0 or d & (d - 1):
        raise KVTuneError(f"Walsh-Hadamard rotation needs a power-of-two head_dim, got {d}",
                          "use rotation: none for this model")


def _same(x: torch.Tensor) -> torch.Tensor:
    return x


ROTATIONS: dict[str, Rotation] = {
    "none": Rotation("none", _same, _same, lambda d: None),
    "hadamard": Rotation("hadamard", hadamard, hadamard, _power_of_two),  # self-inverse
}


def rotation(name: str) -> Rotation:
    """The rotation registered as ``name``."""
    return ROTATIONS[name]
