"""One layer of a :class:`~kvtune.runtime.cache.KVTuneCache`: sinks, quantized blocks, fp16 window.

Stored order of a head's tokens (also the order attention sees them):
``[sink tokens (fp16)] [quantized blocks (packed, per head group)] [window (fp16)]``.

``update(k, v)`` (called by the model before its attention function):

1. new tokens fill the sinks first (``salient.sink_tokens``), the rest joins the fp16 window;
2. a :class:`Step` describing this call is registered for the returned key tensor (:func:`take_step` gives
   it to the registered attention function, which attends and then calls :meth:`KVTuneLayer.finish`):
3. ``finish`` (after :mod:`kvtune.runtime.policies` merged tokens, Elastic Cache) records each row's left
   padding, and while the window holds ``residual + flush`` tokens quantizes its oldest ``flush`` tokens into
   the groups' stores (KIVI: old tokens are never re-quantized). Between calls the counts equal
   :func:`kvtune.quant.bits.token_counts`.

When the plan weights token types (``salient.token_types``), each stored non-sink token's type (from the
cache's :class:`~kvtune.token_types.TokenTypeFeed`) follows it: ``win_types`` int8 ``[B, Hkv, w]`` beside the window,
``q_types`` ``[B, Hkv, Nq]`` for the quantized part (per head, since merging drops tokens per head).

Queries of a multi-token call see this call's tokens in full precision ("prefill" semantics, KIVI)
unless the cache is in ``stepwise`` mode, where query ``i`` sees exactly what it would have seen had
the tokens come one at a time (teacher-forced evaluation equal to token-by-token decoding).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
from transformers.cache_utils import CacheLayerMixin

from kvtune.errors import KVTuneError
from kvtune.layout import GLOBAL, LayerSpan
from kvtune.plan_types import HeadPlan, LayerPlan
from kvtune.quant import codec
from kvtune.quant.bits import evict_step, window_size
from kvtune.runtime.heads import HeadGroup
from kvtune.runtime.store import TokenBuffer

FP = torch.float16


@dataclass
class Step:
    """One forward call of one layer, as its attention needs it.

    nq_before: tokens (per head) flushed before this call (held quantized, or evicted from a windowed layer);
    sink_k/v: fp16 ``[B, Hkv, s, D]``; the window
    (``layer.win_k/v``, fp16 ``[B, Hkv, w, D]``) holds the older fp16 tokens and then this call's;
    new_sinks: how many of this call's tokens went to sinks; bounds: int64 ``[q_len]``, the quantized tokens
    query ``i`` sees in stepwise mode (the first ``bounds[i] - nq_before`` window tokens read back
    quantized), or None (all window tokens in fp16).
    """

    layer: KVTuneLayer
    q_len: int
    nq_before: int
    sink_k: torch.Tensor
    sink_v: torch.Tensor
    new_sinks: int
    bounds: torch.Tensor | None


_PENDING: dict[int, tuple[torch.Tensor, Step]] = {}  # id(key tensor handed to the model) -> (that tensor, step)


def take_step(key: torch.Tensor) -> Step | None:
    """The :class:`Step` a :class:`KVTuneLayer` registered for ``key`` (the tensor its ``update`` returned), once;
    None for any other tensor. The entry holds the tensor, so its id cannot be reused while registered."""
    entry = _PENDING.pop(id(key), None)
    return entry[1] if entry is not None and entry[0] is key else None


class KVTuneLayer(CacheLayerMixin):
    """Cache layer with per-head-group bit-packed storage (see module docstring)."""

    is_sliding = False
    is_compileable = False

    def __init__(self, plan: LayerPlan, num_kv_heads: int, head_dim: int,
                 state: dict[str, dict[str, torch.Tensor]] | None = None, headroom: float | None = None,
                 span: LayerSpan = GLOBAL) -> None:
        super().__init__()
        if span.windowed:  # token policies act on global layers only (kvtune.quant.bits)
            plan = plan.windowed(span)
        self.plan, self.num_kv_heads, self.head_dim, self.span = plan, num_kv_heads, head_dim, span
        self.evict_step = evict_step(plan, num_kv_heads, head_dim)
        self.state = {role: dict(fields) for role, fields in (state or {}).items()}  # plan tensors [Hkv, width]
        self.headroom_setting = headroom
        self.stepwise = False
        self.backend = "auto"
        self.flush = plan.flush
        self.type_feed: Any = None  # kvtune.token_types.TokenTypeFeed, set by the cache
        self.owner: int | None = None  # id() of the attention module this layer serves, set by the cache
        self.track_types = plan.salient.ratio > 0 and bool(plan.salient.token_types)
        self._clear()

    def _clear(self) -> None:
        self.groups: list[HeadGroup] = []
        self.length = 0  # logical tokens seen
        self.merged = 0
        self.n_quant = 0  # quantized tokens held per head
        self.evicted = 0  # quantized tokens dropped off the front (windowed layers: no query sees them again)
        self.pad: torch.Tensor | None = None  # int64 [B] left-padding tokens per row
        self.probes: torch.Tensor | None = None  # [B, Hq, P, D] recent queries (salient / merge scores)
        self.pending: list[tuple[int, torch.Tensor, torch.Tensor]] = []  # (first index, k, v) just quantized
        self.win_types: torch.Tensor | None = None  # int8 [B, Hkv, w] token types of the window (track_types)
        self.q_types = TokenBuffer()  # int8 [B, Hkv, Nq] token types of the quantized tokens (track_types)
        self.awaiting_attention = False  # update() ran and kvtune's attention has not finished it yet
        _PENDING.pop(getattr(self, "pending_key", -1), None)
        self.pending_key = -1  # id() of the key tensor whose Step waits in _PENDING
        self.scaling: float | None = None  # softmax scale of the last attention call (probe scores)
        self.kernel_specs: bool | None = None  # the fused decode kernel reads every group's specs (checked once)
        self.is_initialized = False

    # -- transformers CacheLayerMixin ------------------------------------------------------------------
    def lazy_initialization(self, key_states: torch.Tensor, value_states: torch.Tensor) -> None:
        self.dtype, self.device = key_states.dtype, key_states.device
        headroom = self.headroom_setting
        if headroom is None:
            headroom = 0.125 if key_states.is_cuda else 0.0
        self.groups = _build_groups(self.plan, self.num_kv_heads, self.head_dim, self.state, self.device, headroom)
        self.sink_k, self.sink_v = TokenBuffer(), TokenBuffer()
        b = key_states.shape[0]
        self.win_k = key_states.new_zeros(b, self.num_kv_heads, 0, self.head_dim, dtype=FP)
        self.win_v = self.win_k.clone()
        if self.track_types:
            self.win_types = torch.zeros(b, self.num_kv_heads, 0, dtype=torch.int8, device=self.device)
        self.is_initialized = True

    def update(self, key_states: torch.Tensor, value_states: torch.Tensor, *args: Any,
               **kwargs: Any) -> tuple[torch.Tensor, torch.Tensor]:
        """Append ``key_states, value_states [B, Hkv, m, D]``; returns them with the :class:`Step` attached.

        Nothing is quantized here: the attention function attends first (this call's tokens in fp16), then
        calls :meth:`finish`, which flushes whole blocks once the padding of each row is known.
        """
        if self.awaiting_attention:
            raise KVTuneError("a KVTuneCache layer was updated twice without kvtune's attention in between (the "
                              "model's attn_implementation was changed, the cache belongs to another model, or "
                              "an earlier forward failed)", "make a new cache with plan.cache(model) (or call "
                              "cache.reset()) and keep attn_implementation='kvtune'")
        if not self.is_initialized:
            self.lazy_initialization(key_states, value_states)
        m, nq0 = key_states.shape[2], self.n_quant
        take = max(0, min(m, self.plan.salient.sink_tokens - self.sink_k.n))
        if take:
            self.sink_k.append(key_states[:, :, :take].to(FP))
            self.sink_v.append(value_states[:, :, :take].to(FP))
        rest0 = self.evicted + nq0 + self.win_k.shape[2]
        self.win_k = torch.cat([self.win_k, key_states[:, :, take:].to(FP)], dim=2)
        self.win_v = torch.cat([self.win_v, value_states[:, :, take:].to(FP)], dim=2)
        if self.win_types is not None:
            b = key_states.shape[0]
            new = self.type_feed.take(self.length, m, b, self.device) if self.type_feed is not None else \
                torch.zeros(b, m, dtype=torch.int8, device=self.device)
            self.win_types = torch.cat([self.win_types, new[:, None, take:].expand(b, self.num_kv_heads, m - take)], 2)
        self.length += m
        step = Step(self, m, self.evicted + nq0, self._sinks(self.sink_k), self._sinks(self.sink_v), take,
                    self._bounds(m, take, rest0))
        _PENDING[id(key_states)] = (key_states, step)
        self.pending_key = id(key_states)
        self.awaiting_attention = True
        return key_states, value_states

    def finish(self, pad: torch.Tensor) -> None:
        """After attention (and any merging, :func:`kvtune.runtime.policies.after_attention`): remember the rows'
        left padding ``pad [B]``, flush whole blocks and, in a windowed layer, drop what no future query sees."""
        self.awaiting_attention = False
        self.pad = pad
        self._flush()
        if self.span.windowed:
            self._evict(pad)

    def get_mask_sizes(self, query_length: int) -> tuple[int, int]:
        return self.length + query_length, 0

    def get_seq_length(self) -> int:
        return self.length

    def get_max_length(self) -> int:
        return -1

    def reset(self) -> None:
        self._clear()

    def reorder_cache(self, beam_idx: torch.LongTensor) -> None:
        """Reorder batch rows (beam search)."""
        if not self.is_initialized:
            return
        idx = beam_idx.to(self.device)
        for buf in (self.sink_k, self.sink_v):
            buf.index_select(idx)
        self.win_k, self.win_v = self.win_k.index_select(0, idx), self.win_v.index_select(0, idx)
        for g in self.groups:
            g.index_select(idx)
        self.pad = self.pad.index_select(0, idx) if self.pad is not None else None
        self.probes = self.probes.index_select(0, idx) if self.probes is not None else None
        self.win_types = self.win_types.index_select(0, idx) if self.win_types is not None else None
        self.q_types.index_select(idx)
        self.pending = [(i, k.index_select(0, idx), v.index_select(0, idx)) for i, k, v in self.pending]

    def batch_select_indices(self, indices: torch.Tensor) -> None:
        self.reorder_cache(indices)

    def batch_repeat_interleave(self, repeats: int) -> None:
        if self.is_initialized:
            b = self.win_k.shape[0]
            self.reorder_cache(torch.arange(b, device=self.device).repeat_interleave(repeats))

    # -- state ---------------------------------------------------------------------------------------

    @property
    def n_sinks(self) -> int:
        return self.sink_k.n if self.is_initialized else 0

    def nbytes(self, used: bool = False) -> int:
        """Bytes held by this layer's tensors (``used``: without over-allocated capacity)."""
        if not self.is_initialized:
            return 0
        win = 2 * self.win_k.numel() * self.win_k.element_size()
        sinks = self.sink_k.nbytes(used) + self.sink_v.nbytes(used)
        return win + sinks + sum(g.nbytes(used) for g in self.groups)

    def _sinks(self, buf: TokenBuffer) -> torch.Tensor:
        if buf.n:
            return buf.view()
        return self.win_k[:, :, :0]

    def _flush(self) -> None:
        """Quantize all whole blocks off the front of the window beyond ``residual + flush - 1`` tokens."""
        f = self.flush
        n = (self.win_k.shape[2] - self.plan.residual) // f * f
        if n <= 0:
            return
        first = self.evicted + self.n_quant
        bk, bv = self.padded_block(self.win_k[:, :, :n], first), self.padded_block(self.win_v[:, :, :n], first)
        for g in self.groups:
            g.append(g.select(bk).float(), g.select(bv).float())
        if self.plan.salient.ratio > 0:
            self.pending.append((first, bk, bv))
        self.n_quant += n
        self.win_k, self.win_v = self.win_k[:, :, n:].contiguous(), self.win_v[:, :, n:].contiguous()
        if self.win_types is not None:
            self.q_types.append(self.win_types[:, :, :n])
            self.win_types = self.win_types[:, :, n:].contiguous()

    def _evict(self, pad: torch.Tensor) -> None:
        """Drop the quantized tokens (in steps of ``evict_step``) before the first position any future query of
        any row can see (:meth:`~kvtune.layout.LayerSpan.keep_from`); the bit accountant counts the same."""
        keep = int(torch.as_tensor(self.span.keep_from(self.length, pad)).min())
        drop = min(self.n_quant, max(0, keep) // self.evict_step * self.evict_step - self.evicted)
        if drop <= 0:
            return
        for g in self.groups:
            g.drop_front(drop)
        self.n_quant -= drop
        self.evicted += drop

    def key_positions(self, n: int, device: torch.device) -> torch.Tensor:
        """Cache positions ``[n]`` int64 of the first ``n`` stored keys ``[sinks][quantized][window]``."""
        pos = torch.arange(n, device=device)
        return pos if not self.evicted else torch.where(pos >= self.n_sinks, pos + self.evicted, pos)

    def padded_block(self, x: torch.Tensor, first: int) -> torch.Tensor:
        """``x [B, Hkv, F, D]`` (quantized tokens ``first..first+F``) with left-padding rows replaced by the
        block's first real token, so padding never widens a quantization range (an all-padding block: 0)."""
        if self.pad is None:
            return x
        stored = self.sink_k.n + first + torch.arange(x.shape[2], device=x.device)  # [F]
        is_pad = stored[None, :] < self.pad[:, None]  # [B, F]
        if not bool(is_pad.any()):
            return x
        first_real = (~is_pad).float().argmax(-1)  # [B]
        fill = x.gather(2, first_real.view(-1, 1, 1, 1).expand(x.shape[0], x.shape[1], 1, x.shape[3]))
        fill = torch.where((~is_pad).any(-1).view(-1, 1, 1, 1), fill, torch.zeros_like(fill))
        return torch.where(is_pad[:, None, :, None], fill, x)

    def _bounds(self, m: int, take: int, rest0: int) -> torch.Tensor | None:
        """Quantized tokens query ``i`` would see had this call's tokens come one at a time."""
        if not self.stepwise or m == 1 or self.plan.merge.method != "none":
            return None
        rest = rest0 + (torch.arange(m) - take).clamp_min(0)  # non-sink tokens before query i
        window = torch.tensor([window_size(int(r), self.plan.residual, self.flush) for r in rest])
        bounds = rest - window
        return bounds.to(self.device) if int(bounds.max()) > self.evicted + self.n_quant else None


def _build_groups(plan: LayerPlan, num_kv_heads: int, head_dim: int, state: dict[str, dict[str, torch.Tensor]],
                  device: torch.device, headroom: float) -> list[HeadGroup]:
    """One :class:`HeadGroup` per distinct head plan, heads in ascending order; each gets its heads' rows of the
    plan's ``layer``-scope tensors ``[Hkv, width]`` (cut to the width its spec declares)."""
    by_plan: dict[HeadPlan, list[int]] = {}
    for h, hp in enumerate(plan.head_plans(num_kv_heads)):
        by_plan.setdefault(hp, []).append(h)
    groups = []
    for hp, heads in by_plan.items():
        mine: dict[str, dict[str, torch.Tensor]] = {}
        for role, spec in (("key", hp.key), ("value", hp.value)):
            decls = codec.layer_fields(spec, head_dim)
            mine[role] = {name: t[heads, : decls[name].width].to(device)
                          for name, t in state.get(role, {}).items() if name in decls}
        groups.append(HeadGroup(tuple(heads), hp, plan.flush, head_dim, mine, headroom))
    return groups
