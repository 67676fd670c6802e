"""Token policies the search chooses per group of layers: fp16 sink tokens and salient tokens at more bits.

A :class:`TokenPolicy` becomes the plan's :class:`~kvtune.plan_types.SalientPolicy` (sinks = the first tokens
kept in fp16, KVQuant / StreamingLLM; salient = ZipCache / AKVQ-VL: a ``ratio`` of the quantized tokens, by
normalized attention score, additionally stored at ``bits``). Its stored bits come from the bit accountant.

**What a policy is predicted to save** (:func:`kept_share`), from the calibration's attention statistics
(:func:`attention_masses`), first order: a quantized token's error reaches the attention output in proportion
to the attention it receives, so keeping tokens that receive a share ``m`` of the attention removes a share
``m`` of the layer's error. Both shares are measured with the *distant* probe queries
(``attention.far_score_mean``: mean attention weight a key gets from probes at least ``M`` tokens away), so
local attention to the most recent tokens -- which no fixed set of kept tokens captures -- is not counted:
``sink_mass[l]`` = the first token's share, ``salient_mass[l, r]`` = the share of the top ``r`` of the other
positions that distant probes see (the last ``5%`` excluded), both averaged over query heads. Salient tokens at
``b`` bits keep ``1 - 4^(2-b)`` of their share (the error of ``b`` bits relative to 2). Measured on SmolLM2-135M
(3-bit plan, 2 x 512 tokens): the first token in fp16 cut the validated KL by 33% (predicted: 31%); salient
tokens are overrated (see :data:`TOKEN_POLICIES`). Validation end to end checks every search's predictions.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from kvtune.plan_types import SalientPolicy


@dataclass(frozen=True)
class TokenPolicy:
    """``sinks`` first tokens in fp16; ``ratio`` of the quantized tokens also stored at ``bits``."""

    sinks: int = 0
    ratio: float = 0.0
    bits: float = 16

    def __post_init__(self) -> None:
        SalientPolicy(ratio=self.ratio, bits=self.bits, sink_tokens=self.sinks)  # same validation

    def salient(self) -> SalientPolicy:
        return SalientPolicy(ratio=self.ratio, bits=self.bits if self.ratio else 16, sink_tokens=self.sinks)

    def label(self) -> str:
        parts = [f"sink{self.sinks}"] if self.sinks else []
        parts += [f"sal{self.ratio:g}@{self.bits:g}"] if self.ratio else []
        return "+".join(parts) or "none"

    def to_list(self) -> list[float]:
        return [int(self.sinks), float(self.ratio), float(self.bits)]


TOKEN_POLICIES: dict[str, tuple[TokenPolicy, ...]] = {
    "sinks": (TokenPolicy(), TokenPolicy(1)),
    "salient": (TokenPolicy(), TokenPolicy(1), TokenPolicy(1, 0.02, 8), TokenPolicy(1, 0.05, 4),
                TokenPolicy(1, 0.05, 8), TokenPolicy(1, 0.1, 4)),
}
"""Token-policy sets the search can explore. ``"sinks"`` (default): none or the first token in fp16.
``"salient"`` adds salient tokens; measured on SmolLM2-135M (3-bit plan, 2 x 512 tokens), +0.13 bits of
salient tokens cut the validated KL by 8% where the proxy predicted 31%: the first-order model overrates
them, so they are opt-in (``--tokens salient``) and left to validation to judge."""
SALIENT_RATIOS: tuple[float, ...] = tuple(sorted({p.ratio for ps in TOKEN_POLICIES.values() for p in ps if p.ratio}))
RECENT_SHARE = 0.05  # the last positions' normalized score is inflated by the recent probes: not ranked


def policy_of(salient: SalientPolicy) -> TokenPolicy | None:
    """The token policy a plan's salient policy is (None if it is not one of :data:`TOKEN_POLICIES`' form)."""
    if salient != TokenPolicy(salient.sink_tokens, salient.ratio, salient.bits if salient.ratio else 16).salient():
        return None
    return TokenPolicy(salient.sink_tokens, salient.ratio, salient.bits if salient.ratio else 16)


def attention_masses(far_score: torch.Tensor, ratios: tuple[float, ...] = SALIENT_RATIOS) -> tuple[torch.Tensor, torch.Tensor]:
    """``(sink_mass [L], salient_mass [L, R])`` float32 from ``far_score`` ``[L, Hq, T]`` (see the module doc)."""
    t = far_score.shape[-1]
    scores = far_score.float().clamp(0, 1)
    sink = scores[:, :, 0].mean(dim=1)  # [L]
    stop = max(2, t - math.ceil(RECENT_SHARE * t))
    rest = scores[:, :, 1:stop].sort(dim=-1, descending=True).values  # [L, Hq, T']
    cols = [rest[..., : max(1, round(r * rest.shape[-1]))].sum(dim=-1).clamp(max=1) for r in ratios]
    return sink, torch.stack(cols, dim=-1).mean(dim=1) if cols else torch.zeros(sink.shape[0], 0)


def kept_share(policy: TokenPolicy, sink_mass: float, salient_mass: dict[float, float]) -> float:
    """Share of a layer's quantization error that ``policy`` is predicted to remove (see the module doc)."""
    kept = sink_mass if policy.sinks else 0.0
    if policy.ratio:
        kept += salient_mass[policy.ratio] * (1.0 - 4.0 ** (2.0 - policy.bits))
    return min(max(kept, 0.0), 1.0)
