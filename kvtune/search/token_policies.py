"""Token policies the search chooses per group of layers: fp16 sinks, salient tokens at more bits, merging.

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

**Merging** (Elastic Cache, ``merge``: the plan's :class:`~kvtune.plan_types.MergePolicy` ``elastic`` at that
ratio) stores fewer tokens, which the bit accountant counts exactly; it is not free in the proxy
(:func:`merged_share`): a merged token's contribution is replaced by its anchor's, so, first order, the merged
share of the layer's tokens (``merged / L`` at the reference length ``L``, by
:func:`~kvtune.quant.bits.token_counts`) is charged as if quantized by the layer's most lossy key and value
candidates (the largest weighted error among the calibration's candidates), not reduced by :func:`kept_share`.

**Visual weight** (``visual``: the salient score weight of image and video tokens, the plan's
``SalientPolicy.token_types``) changes which tokens are salient, not how many: its bits are the same, and on
text-only calibration its proxy equals the same policy without it. Validation (and a VLM's token types at run
time) decides whether it helps.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import torch

from kvtune.plan_types import LayerPlan, MergePolicy, SalientPolicy
from kvtune.quant.bits import token_counts

VISUAL_TYPES = ("image", "video")  # token types a policy's ``visual`` weight applies to


@dataclass(frozen=True)
class TokenPolicy:
    """``sinks`` first tokens in fp16; ``ratio`` of the quantized tokens also stored at ``bits``, chosen with image and
    video tokens' scores weighted by ``visual``; ``merge`` of the mergeable tokens merged (Elastic Cache)."""

    sinks: int = 0
    ratio: float = 0.0
    bits: float = 16
    merge: float = 0.0
    visual: float = 1.0

    def __post_init__(self) -> None:
        self.salient()  # same validation as the plan's
        self.merge_policy()
        if self.visual != 1.0 and not self.ratio:
            raise ValueError(f"a visual weight ({self.visual:g}) needs salient tokens (ratio > 0)")

    def salient(self) -> SalientPolicy:
        """The plan's salient policy (sinks, salient share and bits, visual token-type weights)."""
        types = dict.fromkeys(VISUAL_TYPES, self.visual) if self.ratio and self.visual != 1.0 else {}
        return SalientPolicy(ratio=self.ratio, bits=self.bits if self.ratio else 16, sink_tokens=self.sinks,
                             token_types=types)

    def merge_policy(self) -> MergePolicy:
        """The plan's merge policy: Elastic Cache at ``merge`` (keep_initial / keep_recent at their defaults)."""
        return MergePolicy(ratio=self.merge, method="elastic") if self.merge else MergePolicy()

    def window(self, fp16_tokens: int) -> int:
        """The plan's ``residual`` when ``fp16_tokens`` recent tokens *including the sinks* stay fp16: the sinks come
        out of the window, so a layer with sinks stores exactly as many fp16 tokens, at every length, as one
        without them (its quantized blocks stay aligned the same way)."""
        return max(0, fp16_tokens - self.sinks)

    def label(self) -> str:
        parts = [f"sink{self.sinks}"] if self.sinks else []
        parts += [f"sal{self.ratio:g}@{self.bits:g}"] if self.ratio else []
        parts += [f"vis{self.visual:g}"] if self.visual != 1.0 else []
        parts += [f"merge{self.merge:g}"] if self.merge else []
        return "+".join(parts) or "none"

    def to_list(self) -> list[float]:
        return [int(self.sinks), float(self.ratio), float(self.bits), float(self.merge), float(self.visual)]

    @classmethod
    def from_list(cls, values: Sequence[float]) -> TokenPolicy:
        """Inverse of :meth:`to_list`."""
        sinks, ratio, bits, merge, visual = values
        return cls(int(sinks), float(ratio), float(bits), float(merge), float(visual))


_SALIENT = (TokenPolicy(), TokenPolicy(1), TokenPolicy(1, 0.02, 8), TokenPolicy(1, 0.05, 4), TokenPolicy(1, 0.05, 8),
            TokenPolicy(1, 0.1, 4))
TOKEN_POLICIES: dict[str, tuple[TokenPolicy, ...]] = {
    "sinks": (TokenPolicy(), TokenPolicy(1)),
    "salient": _SALIENT,
    "all": (*_SALIENT, TokenPolicy(1, merge=0.25), TokenPolicy(1, merge=0.5), TokenPolicy(1, 0.05, 4, visual=4.0)),
}
"""Token-policy sets the search can explore. ``"sinks"`` (default): none or the first token in fp16.
``"salient"`` adds salient tokens; measured on SmolLM2-135M (3-bit plan, 2 x 512 tokens), +0.13 bits of
salient tokens cut the validated KL by 8% where the proxy predicted 31%: the first-order model overrates
them, so they are opt-in (``--tokens salient``) and left to validation to judge. ``"all"`` adds Elastic Cache
merging (a quarter or half of the mergeable tokens) and salient tokens with image/video scores weighted 4x
(VidKV, AKVQ-VL; on text-only calibration the same prediction as without the weight)."""
SALIENT_RATIOS: tuple[float, ...] = tuple(sorted({p.ratio for ps in TOKEN_POLICIES.values() for p in ps if p.ratio}))
RECENT_SHARE = 0.05  # the last positions' normalized score is inflated by the recent probes: not ranked


def policy_of(salient: SalientPolicy, merge: MergePolicy = MergePolicy()) -> TokenPolicy | None:
    """The token policy a plan layer's ``salient`` and ``merge`` policies are (None if not of a
    :class:`TokenPolicy`'s form: other scores, probes, token types or merge anchors)."""
    types = dict(salient.token_types)
    visual = types.get(VISUAL_TYPES[0], 1.0)
    merge_ratio = merge.ratio if merge.method == "elastic" else 0.0
    try:
        policy = TokenPolicy(salient.sink_tokens, salient.ratio, salient.bits if salient.ratio else 16,
                             merge_ratio, visual)
    except ValueError:
        return None
    if policy.salient() != salient or policy.merge_policy() != merge:
        return None
    return policy


def attention_masses(far_score: torch.Tensor,
                     ratios: tuple[float, ...] = SALIENT_RATIOS) -> tuple[torch.Tensor, torch.Tensor]:
    """``(sink_mass [L], salient_mass [L, R])`` float32 from ``far_score`` ``[L, Hq, T]`` (see the module doc)."""
    t = far_score.shape[-1]
    scores = far_score.float().clamp(0, 1)
    sink = scores[:, :, 0].mean(dim=1)  # [L]
    stop = max(2, t - math.ceil(RECENT_SHARE * t))
    rest = scores[:, :, 1:stop].sort(dim=-1, descending=True).values  # [L, Hq, T']
    cols = [rest[..., : max(1, round(r * rest.shape[-1]))].sum(dim=-1).clamp(max=1) for r in ratios]
    return sink, torch.stack(cols, dim=-1).mean(dim=1) if cols else torch.zeros(sink.shape[0], 0)


def kept_share(policy: TokenPolicy, sink_mass: float, salient_mass: dict[float, float]) -> float:
    """Share of a layer's quantization error that ``policy`` is predicted to remove (see the module doc; the
    visual weight and merging do not change it: merging is charged by :func:`merged_share`)."""
    kept = sink_mass if policy.sinks else 0.0
    if policy.ratio:
        kept += salient_mass[policy.ratio] * (1.0 - 4.0 ** (2.0 - policy.bits))
    return min(max(kept, 0.0), 1.0)


def merged_share(policy: TokenPolicy, length: int) -> float:
    """Share of a layer's ``length`` logical tokens that ``policy`` merges (by the bit accountant), each charged in
    the proxy as if quantized by the layer's most lossy candidates (see the module doc)."""
    return token_counts(LayerPlan(merge=policy.merge_policy()), length)["merged"] / length if policy.merge else 0.0
