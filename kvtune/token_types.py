"""Token types (text, image, video, system) of a model's input, as an int8 mask ``[B, T]``.

A mask comes from one of three places:

* a VLM's ``input_ids`` and config (:func:`token_type_mask`): positions holding the image / video placeholder
  id are ``image`` / ``video`` (LLaVA-style ``config.image_token_index`` or ``image_token_id``, Qwen2-VL-style
  ``image_token_id`` and ``video_token_id``; the id may also sit on ``config.text_config``); the first
  ``system`` tokens (e.g. a system prompt) can be marked ``system``;
* spans of a text model's input (:func:`span_mask`), e.g. ``{"image": [(100, 356)]}`` to mark a span as visual;
* the user, as names or codes (:func:`as_mask`), checked against the input's shape.

Codes are looked up in :data:`TOKEN_TYPES` (never by position in a string). A plan's salient policy can weight
the salient score of each type (:class:`kvtune.plan_types.SalientPolicy` ``token_types``); the runtime
(:meth:`kvtune.runtime.cache.KVTuneCache.set_token_types`) follows each stored token's type through the cache.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import torch

from kvtune.errors import KVTuneError

TOKEN_TYPES: dict[str, int] = {"text": 0, "image": 1, "video": 2, "system": 3}
TEXT = TOKEN_TYPES["text"]
_ID_FIELDS = {"image": ("image_token_id", "image_token_index"), "video": ("video_token_id", "video_token_index")}


def type_code(name: str) -> int:
    """The code of token type ``name``; an unknown name is a :class:`KVTuneError`."""
    if name not in TOKEN_TYPES:
        raise KVTuneError(f"unknown token type {name!r}", f"use one of {', '.join(TOKEN_TYPES)}")
    return TOKEN_TYPES[name]


def placeholder_ids(config: Any) -> dict[str, int]:
    """``{"image": id, "video": id}`` placeholder token ids of a VLM config (video only where it has one)."""
    found: dict[str, int] = {}
    for cfg in (config, getattr(config, "text_config", None)):
        for kind, names in _ID_FIELDS.items():
            for name in names:
                value = getattr(cfg, name, None) if cfg is not None else None
                if isinstance(value, int) and value >= 0 and kind not in found:
                    found[kind] = value
    if "image" not in found:
        kind = type(config).__name__
        raise KVTuneError(f"{kind} has no image placeholder token id (config.image_token_id / image_token_index)",
                          "pass image_token_id=..., or an explicit token-type mask")
    return found


def token_type_mask(input_ids: torch.Tensor, config: Any = None, *, image_token_id: int | None = None,
                    video_token_id: int | None = None, system: int = 0) -> torch.Tensor:
    """Token types of a VLM's ``input_ids [B, T]`` int64 -> int8 ``[B, T]`` (codes of :data:`TOKEN_TYPES`).

    Placeholder ids come from ``config`` unless given; the first ``system`` tokens of each row are ``system``.
    """
    if input_ids.dim() != 2:
        raise KVTuneError(f"input_ids must be [batch, tokens], got shape {tuple(input_ids.shape)}")
    ids: dict[str, int] = {}
    if config is not None:
        try:
            ids = placeholder_ids(config)
        except KVTuneError:
            if image_token_id is None:
                raise
    if image_token_id is not None:
        ids["image"] = image_token_id
    if video_token_id is not None:
        ids["video"] = video_token_id
    if "image" not in ids:
        raise KVTuneError("no image placeholder token id: pass the model's config or image_token_id")
    mask = torch.full(input_ids.shape, TEXT, dtype=torch.int8)
    if not 0 <= system <= input_ids.shape[1]:
        raise KVTuneError(f"system prefix {system} is outside the input's {input_ids.shape[1]} tokens")
    mask[:, :system] = TOKEN_TYPES["system"]
    for kind, tid in ids.items():
        mask[input_ids.cpu() == tid] = TOKEN_TYPES[kind]
    return mask


def span_mask(length: int, spans: Mapping[str, Sequence[tuple[int, int]]], batch: int = 1) -> torch.Tensor:
    """int8 ``[batch, length]``: ``text`` except the half-open ``(start, end)`` spans of each named type."""
    mask = torch.full((batch, length), TEXT, dtype=torch.int8)
    for name, ranges in spans.items():
        code = type_code(name)
        for start, end in ranges:
            if not 0 <= start <= end <= length:
                raise KVTuneError(f"{name} span ({start}, {end}) is outside the input's {length} tokens")
            mask[:, start:end] = code
    return mask


def as_mask(mask: Any, input_ids: torch.Tensor | None = None, shape: tuple[int, int] | None = None) -> torch.Tensor:
    """A user's mask (names, codes, or a tensor; ``[T]`` or ``[B, T]``) as int8 ``[B, T]``, checked against
    ``input_ids [B, T]`` (or ``shape``): a length mismatch or an unknown type is a :class:`KVTuneError`."""
    if isinstance(mask, torch.Tensor):
        t = mask.to(torch.int64)
    else:
        rows = list(mask)
        nested = bool(rows) and not isinstance(rows[0], (str, int)) and hasattr(rows[0], "__len__")
        rows = rows if nested else [rows]
        t = torch.tensor([[type_code(x) if isinstance(x, str) else int(x) for x in row] for row in rows],
                         dtype=torch.int64)
    t = t.unsqueeze(0) if t.dim() == 1 else t
    bad = t[(t < 0) | (t >= len(TOKEN_TYPES))]
    if bad.numel():
        raise KVTuneError(f"unknown token type code {int(bad[0])} in the mask",
                          f"codes are {', '.join(f'{k}={v}' for k, v in TOKEN_TYPES.items())}")
    want = tuple(input_ids.shape) if input_ids is not None else shape
    if want is not None:
        b, n = want
        if t.shape[-1] != n:
            raise KVTuneError(f"token-type mask has {t.shape[-1]} tokens but the input has {n}",
                              "give one type per input token")
        if t.shape[0] not in (1, b):
            raise KVTuneError(f"token-type mask has {t.shape[0]} rows but the input has {b}", "one row per sequence")
        t = t.expand(b, n)
    return t.to(torch.int8).contiguous()


class TokenTypeFeed:
    """The token types of the tokens a cache will receive next (shared by a cache's layers).

    ``set(mask [B, T], start)``: the types of logical positions ``start .. start + T``; every other position
    is ``text``. ``take(start, m, batch)`` -> int8 ``[batch, m]``.
    """

    def __init__(self) -> None:
        self.mask: torch.Tensor | None = None
        self.start = 0

    def set(self, mask: torch.Tensor | None, start: int) -> None:
        self.mask, self.start = (None if mask is None else mask.to(torch.int8)), start

    def take(self, start: int, m: int, batch: int, device: torch.device) -> torch.Tensor:
        out = torch.full((batch, m), TEXT, dtype=torch.int8, device=device)
        if self.mask is None:
            return out
        lo, hi = max(start, self.start), min(start + m, self.start + self.mask.shape[1])
        if lo < hi:
            if self.mask.shape[0] not in (1, batch):
                raise KVTuneError(f"token-type mask has {self.mask.shape[0]} rows but the batch has {batch}",
                                  "one row per sequence")
            out[:, lo - start: hi - start] = self.mask[:, lo - self.start: hi - self.start].to(device)
        return out
