"""The one exact stored-bit accountant. Everyone who reports or budgets bits calls this.

At a logical sequence length ``L`` a layer stores, per KV head, for K and for V:

* ``N = L - merged`` tokens (Elastic Cache merges ``floor(ratio * (L - keep_initial - keep_recent))``);
* ``sink = min(sink_tokens, N)`` fp16 tokens, then of the ``rest = N - sink`` tokens the fp16 window
  holds ``rest`` if ``rest <= residual`` else ``residual + (rest - residual) % flush``; the other
  ``n_q`` tokens are quantized;
* for ``n_q`` quantized tokens of a spec: the sum of the fields its family and wrappers declare
  (:func:`kvtune.quant.codec.fields`), each ``rows(n_q) * width * dtype bits`` -- e.g. for the ``affine``
  family with ``o`` outlier channels and ``D' = D - o`` main channels: codes ``n_q * packed_width(D', bits)
  * 8``; scales (and zero-points unless symmetric/ternary) at the scale dtype, ``ceil(n_q / G) * D'`` of them
  on the channel axis (``G = 0``: one group per flushed block) or ``n_q * ceil(D' / G)`` on the token axis;
  channel-separable norms ``ceil(n_q / flush) * D'`` fp16; outliers ``o`` fp16 values a token (or their own
  per-channel quantizer) plus ``o`` int16 indices per head (a ``layer``-scope field). The runtime's stores
  hold exactly these fields, so bytes held and bits counted cannot disagree;
* salient tokens ``floor(ratio * n_q)``: an extra per-token copy at the salient bits (with an fp16
  scale and zero) plus an int32 index each (shared by K and V, counted half each);
* fp16 tokens (sinks + window): ``16 * D`` each.

Effective bits = total stored bits / (2 * L * D * heads): the logical K and V element count.
Rotations and the FFT store nothing.

**Sliding-window and chunked layers** (a :class:`~kvtune.layout.LayerSpan` per layer, from the model's config)
keep no sink, salient or merged tokens and a residual of at most ``W - 1`` (:meth:`LayerPlan.windowed`: a
longer one shows nothing more); their fp16 window and flushes follow the same rule, and the quantized tokens no
future query can see (before :meth:`~kvtune.layout.LayerSpan.keep_from` ``(L)``) are dropped in steps of
:func:`evict_step` tokens (1 when every stored field is per token, else whole flushed blocks). Their elements
are those of an fp16 cache keeping only the windows (:meth:`~kvtune.layout.LayerSpan.fp16_tokens`:
``min(L, W - 1)`` tokens a head for a sliding window, as transformers' ``DynamicCache`` holds; the current
chunk's tokens for a chunked layer). So **effective bits = stored bits / K and V elements of that windowed fp16
cache at the same length**: the fp16 plan is 16 bits on every model, and a global layer's long history weighs
what it really holds. Without windowed layers nothing changes.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass, fields

from kvtune.layout import GLOBAL, LayerSpan
from kvtune.plan_types import LayerPlan
from kvtune.quant import codec
from kvtune.quant.family import KINDS
from kvtune.quant.formats import QuantSpec, per_token

REFERENCE_LENGTH = 4096
FP_BITS = 16
SALIENT_INDEX_BITS = 32


@dataclass(frozen=True)
class BitBreakdown:
    """Stored bits by kind, and the logical element count they cover."""

    codes: float = 0.0
    scales: float = 0.0
    zeros: float = 0.0
    outliers: float = 0.0
    indices: float = 0.0
    salient: float = 0.0
    full_precision: float = 0.0
    elements: int = 0

    @property
    def total(self) -> float:
        return sum(getattr(self, f.name) for f in fields(self) if f.name != "elements")

    @property
    def effective(self) -> float:
        """Stored bits per logical K/V element."""
        return self.total / self.elements if self.elements else 0.0

    def __add__(self, other: BitBreakdown) -> BitBreakdown:
        return BitBreakdown(**{f.name: getattr(self, f.name) + getattr(other, f.name) for f in fields(self)})

    def as_dict(self) -> dict[str, float]:
        d = {f.name: getattr(self, f.name) for f in fields(self)}
        d.update(total=self.total, effective=self.effective)
        return d


def window_size(rest: int, residual: int, flush: int) -> int:
    """fp16 window of ``rest`` non-sink tokens: all up to ``residual``, then ``residual`` plus the unflushed
    remainder of a block."""
    return rest if rest <= residual else residual + (rest - residual) % flush


def evict_step(layer: LayerPlan, num_kv_heads: int, head_dim: int) -> int:
    """Granularity (tokens) in which a windowed layer drops quantized tokens: 1 when every field its specs store
    is per token (or per layer), else ``flush`` (whole blocks, whose shared scales stay valid)."""
    per_token = all(f.scope in ("token", "layer") for h in layer.head_plans(num_kv_heads) for spec in (h.key, h.value)
                    for f in codec.fields(spec, head_dim, layer.flush))
    return 1 if per_token else layer.flush


def token_counts(layer: LayerPlan, length: int, span: LayerSpan = GLOBAL, step: int = 1) -> dict[str, int]:
    """How the ``length`` logical tokens of one head are stored: merged / fp16 / quantized (held) / salient, and
    for a windowed ``span`` the quantized tokens ``evicted`` in steps of ``step`` (:func:`evict_step`)."""
    if span.windowed:
        window = window_size(length, layer.residual, layer.flush)
        flushed = length - window
        evicted = min(flushed, max(0, span.keep_from(length)) // step * step)
        return {"merged": 0, "fp16": window, "quantized": flushed - evicted, "salient": 0, "evicted": evicted}
    merge = layer.merge
    mergeable = max(0, length - merge.keep_initial - merge.keep_recent)
    merged = math.floor(merge.ratio * mergeable) if merge.method != "none" else 0
    stored = length - merged
    sink = min(layer.salient.sink_tokens, stored)
    rest = stored - sink
    window = window_size(rest, layer.residual, layer.flush)
    quantized = rest - window
    salient = math.floor(layer.salient.ratio * quantized)
    return {"merged": merged, "fp16": sink + window, "quantized": quantized, "salient": salient, "evicted": 0}


def spec_bits(spec: QuantSpec, n_q: int, d: int, flush: int) -> BitBreakdown:
    """Bits of ``n_q`` quantized tokens of one head under ``spec``: the sum of its declared fields
    (:func:`kvtune.quant.codec.fields`), each in its kind."""
    acc = dict.fromkeys(KINDS, 0)
    for f in codec.fields(spec, d, flush):
        acc[f.kind] += f.bits(n_q, flush)
    return BitBreakdown(**acc)


def layer_bits(layer: LayerPlan, num_kv_heads: int, head_dim: int, length: int = REFERENCE_LENGTH,
               span: LayerSpan = GLOBAL) -> BitBreakdown:
    """Stored bits of one layer's K and V, all KV heads, at ``length`` tokens (``span``: what the layer attends;
    its elements are those of an fp16 cache holding the layer's window, see the module doc)."""
    if span.windowed:
        layer = layer.windowed(span)
    counts = token_counts(layer, length, span, evict_step(layer, num_kv_heads, head_dim) if span.windowed else 1)
    n_q, n_sal, d = counts["quantized"], counts["salient"], head_dim
    salient_row = per_token(layer.salient.bits)
    total = BitBreakdown(elements=2 * span.fp16_tokens(length) * d * num_kv_heads)
    for head in layer.head_plans(num_kv_heads):
        for spec in (head.key, head.value):
            sal = spec_bits(salient_row, n_sal, d, layer.flush).total + n_sal * SALIENT_INDEX_BITS / 2
            total = total + spec_bits(spec, n_q, d, layer.flush) + BitBreakdown(
                salient=sal, full_precision=counts["fp16"] * d * FP_BITS)
    return total


def layers_bits(layers: Sequence[LayerPlan], num_kv_heads: int, head_dim: int, length: int = REFERENCE_LENGTH,
                spans: Sequence[LayerSpan] | None = None) -> BitBreakdown:
    """Sum of :func:`layer_bits` over a model's layers (``spans``: one per layer, default all global)."""
    total = BitBreakdown()
    for i, layer in enumerate(layers):
        total = total + layer_bits(layer, num_kv_heads, head_dim, length, spans[i] if spans is not None else GLOBAL)
    return total
