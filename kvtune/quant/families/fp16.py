"""``fp16``: the tensor as it is, in half precision (the reference every other family is compared with)."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass

import torch

from kvtune.quant.family import FieldDecl, Fields, QuantFamily


@dataclass(frozen=True)
class FP16Params:
    """No parameters; ``bits: 16`` is accepted so that ``{bits: 16}`` reads as fp16."""

    bits: float = 16

    def __post_init__(self) -> None:
        if self.bits != 16:
            raise ValueError(f"fp16 stores 16 bits, got bits={self.bits}")


class FP16(QuantFamily):
    name = "fp16"
    Params = FP16Params
    passthrough = True

    def bits(self, p: FP16Params) -> float:
        return 16

    def label(self, p: FP16Params, short: bool = False) -> str:
        return "16" if short else "fp16"

    def fields(self, p: FP16Params, d: int, flush: int) -> tuple[FieldDecl, ...]:
        return (FieldDecl("raw", "token", d, "float16", "codes"),)

    def encode(self, p: FP16Params, x: torch.Tensor, flush: int, state: Mapping[str, torch.Tensor]) -> Fields:
        return {"raw": x.to(torch.float16)}

    def decode(self, p: FP16Params, fields: Mapping[str, torch.Tensor], flush: int, d: int,
               state: Mapping[str, torch.Tensor]) -> torch.Tensor:
        return fields["raw"].float()


FAMILY = FP16()
