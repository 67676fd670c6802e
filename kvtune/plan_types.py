"""Frozen dataclasses of a plan: per layer (and optionally per KV head) what K and V become.

Everything here is pure data with validation; YAML/safetensors I/O lives in :mod:`kvtune.plan`.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import asdict, dataclass, field, fields, replace
from typing import Any

from kvtune.errors import KVTuneError, strict_mapping
from kvtune.layout import AttentionLayout, LayerSpan, spans_of
from kvtune.quant.codes import code_format
from kvtune.quant.formats import QuantSpec

SCORES = ("normalized_attention",)  # what the runtime scores salient tokens by (kvtune.runtime.policies)
MERGES = ("none", "elastic")


def _build(cls: type, kwargs: dict[str, Any], where: str) -> Any:
    try:
        return cls(**kwargs)
    except (TypeError, ValueError) as exc:
        if isinstance(exc, KVTuneError):
            raise
        raise KVTuneError(f"{where}: {exc}") from None


@dataclass(frozen=True)
class SalientPolicy:
    """Tokens kept at higher precision than the rest (ZipCache, AKVQ-VL, VidKV).

    ``ratio`` of the quantized tokens, chosen by ``score`` (a registry name), are *additionally* stored
    at ``bits`` (per-token, whole head_dim group); their low-bit copies are masked out at attention.
    ``sink_tokens`` first tokens are kept in fp16 and never quantized. ``probe_recent``/``probe_random``
    are the shares of queries used as probes for the score (ZipCache: 5% + 5%). ``token_types`` weights
    the score of each token type (:data:`kvtune.token_types.TOKEN_TYPES`, unlisted types 1.0): e.g.
    ``{image: 4, video: 4}`` makes visual tokens the first candidates (VidKV, AKVQ-VL). The number of
    salient tokens (and so the stored bits) does not depend on the types. YAML: a mapping; in memory a
    sorted tuple of ``(type, weight)`` pairs (hashable).
    """

    ratio: float = 0.0
    bits: float = 16
    score: str = "normalized_attention"
    sink_tokens: int = 0
    probe_recent: float = 0.05
    probe_random: float = 0.05
    token_types: tuple[tuple[str, float], ...] = ()

    def __post_init__(self) -> None:
        object.__setattr__(self, "token_types", _type_weights(self.token_types))
        if not 0.0 <= self.ratio < 1.0:
            raise ValueError(f"salient ratio must be in [0, 1), got {self.ratio}")
        code_format(self.bits)
        if self.score not in SCORES:
            raise ValueError(f"salient score must be one of {SCORES}, got {self.score!r}")
        if self.sink_tokens < 0:
            raise ValueError(f"sink_tokens must be >= 0, got {self.sink_tokens}")
        for name in ("probe_recent", "probe_random"):
            if not 0.0 <= getattr(self, name) <= 1.0:
                raise ValueError(f"{name} must be in [0, 1]")

    def weight(self, name: str) -> float:
        """Score weight of token type ``name``."""
        return dict(self.token_types).get(name, 1.0)

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d["token_types"] = dict(self.token_types)
        if not self.token_types:
            del d["token_types"]
        return d


def _type_weights(raw: Any) -> tuple[tuple[str, float], ...]:
    """``{type: weight}`` (or pairs) -> sorted ``((type, weight), ...)``, validated."""
    from kvtune.token_types import TOKEN_TYPES

    items = raw.items() if isinstance(raw, Mapping) else raw
    try:
        pairs = {str(k): float(v) for k, v in items}
    except (TypeError, ValueError):
        raise ValueError(f"token_types must map token types to weights, got {raw!r}") from None
    for name, w in pairs.items():
        if name not in TOKEN_TYPES:
            raise ValueError(f"unknown token type {name!r} in token_types (use {', '.join(TOKEN_TYPES)})")
        if not (math.isfinite(w) and w >= 0):
            raise ValueError(f"token_types weight of {name!r} must be finite and >= 0, got {w}")
    return tuple(sorted(pairs.items()))


@dataclass(frozen=True)
class MergePolicy:
    """Elastic Cache: merge ``ratio`` of the non-anchor tokens into their nearest anchors."""

    ratio: float = 0.0
    method: str = "none"
    keep_recent: int = 32
    keep_initial: int = 4

    def __post_init__(self) -> None:
        if self.method not in MERGES:
            raise ValueError(f"merge method must be one of {MERGES}, got {self.method!r}")
        if not 0.0 <= self.ratio < 1.0:
            raise ValueError(f"merge ratio must be in [0, 1), got {self.ratio}")
        if self.ratio > 0 and self.method == "none":
            raise ValueError("merge ratio > 0 needs a merge method (e.g. 'elastic')")


@dataclass(frozen=True)
class HeadPlan:
    """Key and value quantizers of one KV head (or of every head of a layer)."""

    key: QuantSpec = QuantSpec()
    value: QuantSpec = QuantSpec()

    def to_dict(self) -> dict[str, Any]:
        return {"key": self.key.to_dict(), "value": self.value.to_dict()}

    @classmethod
    def from_dict(cls, data: Any, where: str) -> HeadPlan:
        d = strict_mapping(cls, data, where)
        return cls(key=QuantSpec.from_dict(d.get("key", {}), f"{where}.key"),
                   value=QuantSpec.from_dict(d.get("value", {}), f"{where}.value"))


@dataclass(frozen=True)
class LayerPlan:
    """One layer: default K/V specs, optional per-KV-head overrides, and token policies.

    ``residual``: most recent tokens kept fp16 (KIVI); a block of ``flush`` tokens leaves the window
    once ``residual + flush`` are buffered (``flush`` = lcm of the specs' token groups, see bits.py).
    ``block``: tokens quantized together when they leave the window (0 = lcm of the specs' token
    groups); channel-separable norms are computed per block.
    """

    key: QuantSpec = QuantSpec()
    value: QuantSpec = QuantSpec()
    heads: tuple[HeadPlan, ...] = ()
    residual: int = 0
    salient: SalientPolicy = SalientPolicy()
    merge: MergePolicy = MergePolicy()
    block: int = 0

    def __post_init__(self) -> None:
        if self.residual < 0:
            raise ValueError(f"residual must be >= 0, got {self.residual}")
        if self.block < 0:
            raise ValueError(f"block must be >= 0 (0 = automatic), got {self.block}")
        for spec in [self.key, self.value, *(s for h in self.heads for s in (h.key, h.value))]:
            if self.block and spec.token_group and self.block % spec.token_group:
                raise ValueError(f"block {self.block} is not a multiple of the token group {spec.token_group}")

    def windowed(self, span: LayerSpan) -> LayerPlan:
        """This plan for a sliding-window or chunked layer ``span``: no sink, salient or merged tokens (those
        policies act on the long history of global layers; a window forgets its first tokens anyway), and a
        residual window no longer than what a query can see before itself (``size - 1``): a token leaving it is
        never visible again, so the outputs are the same with fewer bytes."""
        if not span.windowed:
            return self
        return replace(self, salient=SalientPolicy(), merge=MergePolicy(), residual=min(self.residual, span.size - 1))

    @property
    def flush(self) -> int:
        """Tokens quantized together when they leave the fp16 window."""
        if self.block:
            return self.block
        specs = [self.key, self.value, *(s for h in self.heads for s in (h.key, h.value))]
        return math.lcm(*(s.token_group or 1 for s in specs))  # channel-axis group 0: one group per block

    def head(self, h: int) -> HeadPlan:
        """The specs of KV head ``h``."""
        return self.heads[h] if self.heads else HeadPlan(self.key, self.value)

    def head_plans(self, num_kv_heads: int) -> tuple[HeadPlan, ...]:
        if self.heads and len(self.heads) != num_kv_heads:
            raise KVTuneError(f"layer has {len(self.heads)} per-head specs but the model has "
                              f"{num_kv_heads} KV heads", "re-run the search for this model")
        return tuple(self.head(h) for h in range(num_kv_heads))

    def with_heads(self, heads: tuple[HeadPlan, ...]) -> LayerPlan:
        return replace(self, heads=heads)

    def to_dict(self) -> dict[str, Any]:
        d: dict[str, Any] = {"key": self.key.to_dict(), "value": self.value.to_dict()}
        if self.heads:
            d["heads"] = [h.to_dict() for h in self.heads]
        if self.residual:
            d["residual"] = self.residual
        if self.salient != SalientPolicy():
            d["salient"] = self.salient.to_dict()
        if self.merge != MergePolicy():
            d["merge"] = asdict(self.merge)
        if self.block:
            d["block"] = self.block
        return d

    @classmethod
    def from_dict(cls, data: Any, where: str) -> LayerPlan:
        d = strict_mapping(cls, data, where)
        kw: dict[str, Any] = {
            "key": QuantSpec.from_dict(d.get("key", {}), f"{where}.key"),
            "value": QuantSpec.from_dict(d.get("value", {}), f"{where}.value"),
            "heads": tuple(HeadPlan.from_dict(h, f"{where}.heads[{i}]") for i, h in enumerate(d.get("heads", []))),
            "residual": d.get("residual", 0),
            "salient": _build(SalientPolicy, strict_mapping(SalientPolicy, d.get("salient", {}), f"{where}.salient"),
                              f"{where}.salient"),
            "merge": _build(MergePolicy, strict_mapping(MergePolicy, d.get("merge", {}), f"{where}.merge"),
                            f"{where}.merge"),
            "block": d.get("block", 0),
        }
        return _build(cls, kw, where)


EDGES = ("first", "last")


@dataclass(frozen=True)
class EdgeLayers:
    """A template's override of its ``first`` or ``last`` ``count`` layers (e.g. vLLM's TurboQuant keeps the first
    and last 2 layers at the model dtype). Bound to a model of ``L`` layers it covers ``min(count, L // 2)`` layers,
    vLLM's cap, so the two edges never overlap. YAML: ``first: {count: 2, layer: {key: ..., value: ...}}``."""

    edge: str
    count: int
    layer: LayerPlan

    def __post_init__(self) -> None:
        if self.edge not in EDGES:
            raise ValueError(f"edge must be one of {EDGES}, got {self.edge!r}")
        if not isinstance(self.count, int) or isinstance(self.count, bool) or self.count < 1:
            raise ValueError(f"{self.edge}.count must be an integer >= 1, got {self.count!r}")

    def indices(self, num_layers: int) -> range:
        """The layers it overrides in a model of ``num_layers`` layers."""
        n = min(self.count, num_layers // 2)
        return range(n) if self.edge == "first" else range(num_layers - n, num_layers)

    def to_dict(self) -> dict[str, Any]:
        return {"count": self.count, "layer": self.layer.to_dict()}

    @classmethod
    def from_dict(cls, edge: str, data: Any, where: str) -> EdgeLayers:
        if not isinstance(data, Mapping) or set(data) != {"count", "layer"}:
            raise KVTuneError(f"{where}: expected a mapping with 'count' and 'layer'",
                              "e.g. first: {count: 2, layer: {key: {bits: 16}, value: {bits: 16}}}")
        return _build(cls, {"edge": edge, "count": data["count"],
                            "layer": LayerPlan.from_dict(data["layer"], f"{where}.layer")}, where)


@dataclass(frozen=True)
class ModelIdentity:
    """What a plan was made for; a plan refuses to bind to a model with another identity.

    ``layout``: what each layer attends (:class:`~kvtune.layout.AttentionLayout`), read from the model's config;
    None when unknown (plans written before it was recorded). Only a layout with a sliding or chunked layer is
    written to YAML, so the identity of an all-global model reads as before.
    """

    architecture: str
    num_layers: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    fingerprint: str = ""
    layout: AttentionLayout | None = None

    def __post_init__(self) -> None:
        if self.layout is not None and len(self.layout) != self.num_layers:
            raise ValueError(f"layout has {len(self.layout)} layers but the model has {self.num_layers}")

    @property
    def spans(self) -> tuple[LayerSpan, ...]:
        """One span per layer (all global when the layout is unknown)."""
        return tuple(spans_of(self.layout, self.num_layers))

    def to_dict(self) -> dict[str, Any]:
        d = {f.name: getattr(self, f.name) for f in fields(self) if f.name != "layout"}
        if self.layout is not None and self.layout.windowed:
            d["layout"] = self.layout.to_list()
        return d

    @classmethod
    def from_dict(cls, data: Any, where: str = "model") -> ModelIdentity:
        d = dict(strict_mapping(cls, data, where))
        if "layout" in d:
            raw = d["layout"]
            if not isinstance(raw, (list, tuple)):
                raise KVTuneError(f"{where}.layout must be a list of spans (global, sliding:W, chunked:C)")
            d["layout"] = AttentionLayout.from_list(raw)
        return _build(cls, d, where)

    def mismatch(self, other: ModelIdentity) -> str | None:
        """First field where ``other`` differs, as ``"field: mine != theirs"``, or None (a layout, like a
        fingerprint, is compared only when both sides know it; an all-global layout equals an unknown one)."""
        for f in fields(self):
            mine, theirs = getattr(self, f.name), getattr(other, f.name)
            if f.name == "fingerprint" and (not mine or not theirs):
                continue
            if f.name == "layout":
                mine, theirs = self.spans, other.spans
                if self.layout is None or other.layout is None:
                    continue
                if mine != theirs:
                    return (f"layout: plan has {AttentionLayout(mine).describe()}, model has "
                            f"{AttentionLayout(theirs).describe()}")
                continue
            if mine != theirs:
                return f"{f.name}: plan has {mine!r}, model has {theirs!r}"
        return None


@dataclass(frozen=True)
class Provenance:
    """Where a plan came from."""

    kvtune_version: str = ""
    source: str = ""
    calibration_hash: str = ""
    study: str = ""
    trial: int = -1
    extra: tuple[tuple[str, str], ...] = field(default=())
