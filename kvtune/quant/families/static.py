"""``static``: per-channel scales calibrated offline, no per-token metadata (KVQuant's per-channel keys).

Each channel ``e`` of a head has a fixed step ``s_e`` (calibrated state, ``layer`` scope: stored in the plan's
tensors as ``layers.{i}.key.channel_scale``, or fitted on the first block); a value codes as the nearest of
``L = 2^bits`` evenly spaced levels ``s_e * (c - (L-1)/2)``, clamped at the outer ones. With ``pairs`` the two
channels of a RoPE pair (``e`` and ``e + D/2``, transformers' rotate-half layout) share one step: RoPE rotates
each pair by a position-dependent angle and keeps its norm, so one step per pair fits post-RoPE keys at every
position. The step is fitted per channel (pair) to the least squared error on the sample, searching the clipping
range. Stored per head: ``codes`` uint8 ``[T, packed_width(D, bits)]`` only (plus ``D`` fp16 steps once).
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import torch

from kvtune.errors import KVTuneError
from kvtune.quant import grid
from kvtune.quant.codes import code_format, pack, packed_width, unpack
from kvtune.quant.family import FieldDecl, Fields, QuantFamily
from kvtune.quant.formats import QuantSpec

BITS = (2, 3, 4, 8)
STATE = "channel_scale"
KERNEL_GROUP = 16  # the kernel reads the one step row as a key group of this many tokens
CLIPS = torch.linspace(0.2, 1.0, 33)  # clipping ranges tried by fit, as shares of the channel's absmax


@dataclass(frozen=True)
class StaticParams:
    """See the module docstring."""

    bits: float = 3
    pairs: bool = True

    def __post_init__(self) -> None:
        if code_format(self.bits).bits not in BITS:
            raise ValueError(f"static bits must be one of {BITS}, got {self.bits}")

    @property
    def levels(self) -> int:
        return code_format(self.bits).levels


def _pair_view(x: torch.Tensor, pairs: bool) -> torch.Tensor:
    """``[..., N, D]`` -> ``[..., N * 2, D/2]`` when steps are shared by RoPE pairs (else unchanged)."""
    if not pairs:
        return x
    d = x.shape[-1]
    return torch.cat([x[..., : d // 2], x[..., d // 2:]], dim=-2)


def _codes(x: torch.Tensor, step: torch.Tensor, levels: int) -> torch.Tensor:
    """Nearest level index of ``x [..., T, D]`` with steps ``step [..., 1, D]``."""
    return torch.round(x / step + (levels - 1) / 2).clamp_(0, levels - 1)


class Static(QuantFamily):
    name = "static"
    Params = StaticParams

    def bits(self, p: StaticParams) -> float:
        return p.bits

    def token_group(self, p: StaticParams) -> int:
        return KERNEL_GROUP

    def label(self, p: StaticParams, short: bool = False) -> str:
        return f"{p.bits:g}s" + ("p" if p.pairs else "") if short else \
            f"{p.bits:g}b/static" + ("/pairs" if p.pairs else "")

    def fields(self, p: StaticParams, d: int, flush: int) -> tuple[FieldDecl, ...]:
        return (FieldDecl(STATE, "layer", d, "float16", "scales"),
                FieldDecl("codes", "token", packed_width(d, p.bits), "uint8", "codes"))

    def fit(self, p: StaticParams, sample: torch.Tensor) -> Fields:
        """Per channel (pair) the step with the least squared error over ``sample [h, N, D]``, fp16 ``[h, D]``."""
        d = sample.shape[-1]
        if p.pairs and d % 2:
            raise KVTuneError(f"static pairs need an even head dim, got {d}", "use pairs: false")
        x = _pair_view(sample.float(), p.pairs)  # [h, N', D']
        amax = x.abs().amax(dim=-2, keepdim=True).clamp_min(1e-8)  # [h, 1, D']
        best, best_err = None, None
        for clip in CLIPS.tolist():
            step = (amax * clip / ((p.levels - 1) / 2)).half().float()
            err = (x - (_codes(x, step, p.levels) - (p.levels - 1) / 2) * step).square().sum(dim=-2, keepdim=True)
            if best is None:
                best, best_err = step, err
            else:
                better = err < best_err
                best, best_err = torch.where(better, step, best), torch.where(better, err, best_err)
        step = best.squeeze(-2)  # [h, D']
        return {STATE: (torch.cat([step, step], -1) if p.pairs else step).half()}

    def encode(self, p: StaticParams, x: torch.Tensor, flush: int, state: Mapping[str, torch.Tensor]) -> Fields:
        if not grid.capturing(x) and not torch.isfinite(x).all():
            raise KVTuneError("non-finite values (NaN/inf) in a tensor to quantize", "check the model's activations")
        step = _step(state, x)
        return {"codes": pack(_codes(x, step, p.levels).to(torch.uint8), p.bits)}

    def decode(self, p: StaticParams, fields: Mapping[str, torch.Tensor], flush: int, d: int,
               state: Mapping[str, torch.Tensor]) -> torch.Tensor:
        codes = unpack(fields["codes"], p.bits, d).float()
        return (codes - (p.levels - 1) / 2) * _step(state, codes)

    def candidates(self, role: str, head_dim: int | None = None) -> tuple[Any, ...]:
        """Keys only (values vary too much from token to token for a fixed step): a step per channel at 2, 3 and 4
        bits (on SmolLM2-135M's post-RoPE keys per-channel steps fit better than per-pair ones: relative MSE
        0.022 vs 0.027 at 3 bits), and per RoPE pair at 2 bits."""
        if role != "key":
            return ()
        return tuple([static(b, pairs=False) for b in (2, 3, 4)] + [static(2)])

    # -- kernel hooks: a per-channel key group of KERNEL_GROUP tokens whose step row never changes
    def kernel_ok(self, p: StaticParams, role: str) -> bool:
        return role == "key" and p.bits in (2, 3, 4, 8)

    def kernel_operands(self, p: StaticParams, role: str, fields: Mapping[str, torch.Tensor],
                        state: Mapping[str, torch.Tensor]) -> Any:
        from kvtune.kernels.packed import PackedKeys

        codes = fields["codes"]
        b, h, t, _ = codes.shape
        step = state[STATE].to(codes.device)  # [h, D]
        rows = step.view(1, h, 1, -1).expand(b, h, t // KERNEL_GROUP, step.shape[-1])  # stride 0 over tokens
        return PackedKeys(codes, rows, None, p.bits, KERNEL_GROUP, 1.0, -(p.levels - 1) / 2)


def _step(state: Mapping[str, torch.Tensor], like: torch.Tensor) -> torch.Tensor:
    """The steps ``[..., 1, D]`` broadcast over the tokens of ``like [..., T, D]``."""
    step = state.get(STATE)
    if step is None:
        raise ValueError("a static spec needs its calibrated steps (state['channel_scale'])")
    return step.to(device=like.device, dtype=torch.float32).unsqueeze(-2)


def static(bits: float, pairs: bool = True, **wrappers: Any) -> QuantSpec:
    """A ``static`` spec: ``static(3)``, ``static(2, outliers=4)``."""
    return QuantSpec("static", StaticParams(bits=bits, pairs=pairs), **wrappers)


FAMILY = Static()
