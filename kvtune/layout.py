"""What each attention layer of a model attends: global, a sliding window, or a chunk (plan-independent).

A :class:`LayerSpan` describes one layer, an :class:`AttentionLayout` the whole model; both come from the
model's config once (:func:`layout_of`, the same reading as transformers' own ``DynamicCache``:
``config.layer_types`` with ``sliding_window`` / ``attention_chunk_size``). Positions are cache positions
(left padding included), as in transformers' masks (``masking_utils``):

* ``global``: a query at position ``t`` sees every key ``j <= t``;
* ``sliding`` (size ``W``): keys ``t - W < j <= t`` (``W`` tokens, the query's own included; Mistral, Qwen2,
  Phi-3, Gemma 2/3, gpt-oss all use this one mask);
* ``chunked`` (size ``C``, Llama 4): keys ``j <= t`` of the same chunk, ``(j - pad) // C == (t - pad) // C``
  with ``pad`` the row's left padding (chunks start at the first real token).

A layer only ever needs the keys some *future* query can see: from :meth:`LayerSpan.keep_from` of the
current length on. An fp16 cache keeping exactly those (:meth:`LayerSpan.fp16_tokens`: ``L``, ``min(L, W - 1)``
for a sliding window, as transformers' ``DynamicCache`` holds, and the current chunk's tokens for a chunked
layer, at most the ``C - 1`` transformers holds) is the denominator of effective bits (:mod:`kvtune.quant.bits`).
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from kvtune.errors import KVTuneError

Position = Any  # an int, or an int64 tensor (broadcasting)


def _global_first(t: Position, size: int, pad: Position) -> Position:
    return t * 0


def _sliding_first(t: Position, size: int, pad: Position) -> Position:
    return t - size + 1


def _chunked_first(t: Position, size: int, pad: Position) -> Position:
    return pad + (t - pad) // size * size


SPAN_KINDS: dict[str, Callable[[Position, int, Position], Position]] = {
    "global": _global_first, "sliding": _sliding_first, "chunked": _chunked_first}
"""Span kind -> the first key position a query at position ``t`` sees (``size``, left padding ``pad``)."""

LAYER_TYPES: dict[str, tuple[str, str | None]] = {
    "full_attention": ("global", None),
    "sliding_attention": ("sliding", "sliding_window"),
    "chunked_attention": ("chunked", "sliding_window"),  # transformers passes attention_chunk_size as this kwarg
}
"""transformers layer type -> (span kind, the per-layer cache kwarg holding its size)."""


@dataclass(frozen=True)
class LayerSpan:
    """What one attention layer sees: ``kind`` in :data:`SPAN_KINDS`, ``size`` its window / chunk (0: global)."""

    kind: str = "global"
    size: int = 0

    def __post_init__(self) -> None:
        if self.kind not in SPAN_KINDS:
            raise ValueError(f"unknown attention span {self.kind!r} (use {', '.join(SPAN_KINDS)})")
        if (self.kind == "global") != (self.size == 0) or self.size < 0:
            raise ValueError(f"a {self.kind} span needs size {'0' if self.kind == 'global' else '>= 1'}, "
                             f"got {self.size}")

    @property
    def windowed(self) -> bool:
        """True for sliding and chunked layers (they hold only their window)."""
        return self.kind != "global"

    def first_visible(self, t: Position, pad: Position = 0) -> Position:
        """The first key position a query at position ``t`` may see (before left padding is excluded)."""
        return SPAN_KINDS[self.kind](t, self.size, pad)

    def keep_from(self, length: Position, pad: Position = 0) -> Position:
        """The first position any query from ``length`` on can see: older keys are never read again."""
        return self.first_visible(length, pad)

    def fp16_tokens(self, length: int) -> int:
        """Tokens an fp16 cache keeping only what future queries see holds after ``length`` tokens (no left
        padding): ``length - keep_from(length)`` (sliding: ``min(length, W - 1)``, as transformers' cache)."""
        return length - max(0, self.keep_from(length))

    def to_str(self) -> str:
        """``"global"``, ``"sliding:512"``, ``"chunked:8192"`` (the YAML form)."""
        return self.kind if not self.windowed else f"{self.kind}:{self.size}"

    @classmethod
    def from_str(cls, text: str) -> LayerSpan:
        kind, _, size = str(text).partition(":")
        try:
            return cls(kind, int(size) if size else 0)
        except ValueError as exc:
            raise KVTuneError(f"invalid attention span {text!r}: {exc}",
                              "write global, sliding:W or chunked:C") from None


GLOBAL = LayerSpan()


@dataclass(frozen=True)
class AttentionLayout:
    """One :class:`LayerSpan` per layer of a model."""

    spans: tuple[LayerSpan, ...]

    def __post_init__(self) -> None:
        object.__setattr__(self, "spans", tuple(self.spans))
        if not self.spans or not all(isinstance(s, LayerSpan) for s in self.spans):
            raise ValueError("a layout needs one LayerSpan per layer")

    @property
    def windowed(self) -> bool:
        """True when some layer holds only a window (the model is hybrid or all-sliding)."""
        return any(s.windowed for s in self.spans)

    def __len__(self) -> int:
        return len(self.spans)

    def __getitem__(self, i: int) -> LayerSpan:
        return self.spans[i]

    def to_list(self) -> list[str]:
        return [s.to_str() for s in self.spans]

    @classmethod
    def from_list(cls, items: Iterable[str]) -> AttentionLayout:
        return cls(tuple(LayerSpan.from_str(s) for s in items))

    @classmethod
    def all_global(cls, num_layers: int) -> AttentionLayout:
        return cls((GLOBAL,) * num_layers)

    def describe(self) -> str:
        """Short summary, e.g. ``"5 sliding:512 + 1 global"``."""
        counts: dict[str, int] = {}
        for s in self.spans:
            counts[s.to_str()] = counts.get(s.to_str(), 0) + 1
        return " + ".join(f"{n} {k}" for k, n in counts.items())


def spans_of(layout: AttentionLayout | None, num_layers: int) -> Sequence[LayerSpan]:
    """The spans of ``layout``, or ``num_layers`` global ones when it is unknown (None)."""
    if layout is None:
        return (GLOBAL,) * num_layers
    if len(layout) != num_layers:
        raise KVTuneError(f"the attention layout has {len(layout)} layers, the model {num_layers}",
                          "re-create the plan or calibration for this model")
    return layout.spans


def layer_types_and_kwargs(text: Any) -> tuple[list[str], list[Mapping[str, Any]]]:
    """transformers' layer types of a text config and each layer's cache kwargs, whatever the transformers 5.x:
    recent releases return one kwargs mapping per layer, earlier ones (5.17 and before) one mapping shared by every
    layer, and the earliest have no such function (types then come from ``layer_types`` or the window fields, as
    those releases' caches read them)."""
    try:
        from transformers.cache_utils import get_layer_types_and_kwargs
    except ImportError:
        get_layer_types_and_kwargs = None
    if get_layer_types_and_kwargs is not None:
        types, kwargs = get_layer_types_and_kwargs(text)
        types = list(types)
        return types, [kwargs] * len(types) if isinstance(kwargs, Mapping) else list(kwargs)
    n = int(text.num_hidden_layers)
    types = getattr(text, "layer_types", None)
    window, chunk = getattr(text, "sliding_window", None), getattr(text, "attention_chunk_size", None)
    if types is None:
        types = ["sliding_attention" if window is not None else
                 "chunked_attention" if chunk is not None else "full_attention"] * n
    kw = {"sliding_window": chunk if "chunked_attention" in types else window}
    return list(types), [kw] * len(types)


def layout_of(config: Any) -> AttentionLayout:
    """The layout of a transformers config (a VLM's: its language model's); unsupported layer types
    (linear attention, shared KV, MLA-style indexers) are a :class:`KVTuneError`."""
    text = config.get_text_config(decoder=True) if hasattr(config, "get_text_config") else config
    types, kwargs = layer_types_and_kwargs(text)
    spans = []
    for i, (kind, kw) in enumerate(zip(types, kwargs)):
        if kind not in LAYER_TYPES:
            name = getattr(config, "model_type", type(config).__name__)
            raise KVTuneError(f"{name}: layer {i} is a {kind!r} layer, which kvtune does not support (supported: "
                              f"{', '.join(LAYER_TYPES)})", "use a model whose layers are all softmax attention "
                              "with a per-token KV cache")
        span_kind, size_key = LAYER_TYPES[kind]
        size = kw.get(size_key) if size_key else 0
        if size_key and (size is None or int(size) < 1):
            raise KVTuneError(f"layer {i} is a {kind!r} layer without a window size in the config",
                              "set sliding_window (or attention_chunk_size) in config.json")
        spans.append(LayerSpan(span_kind, int(size)))
    return AttentionLayout(tuple(spans))
