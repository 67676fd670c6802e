"""A static-capacity packed KV cache: every decode step is the same launches on the same buffers (CUDA graphs).

    cache = plan.cache(model, static=True, batch=8, max_length=33_000)
    dec = kvtune.runtime.graphs.GraphDecoder(model, cache)       # prefill eagerly, then replay captured steps

Per layer the packed fields (codes, scales, zero-points) are allocated once for ``max_length`` tokens (rounded up to
a flushed block), one fp16 extra segment for ``S + residual + flush`` tokens laid out ``[sinks | window]`` (``S =
salient.sink_tokens``: the stored stream is ``[sinks][quantized blocks][window]`` as in the dynamic cache, sinks in
padded coordinates, so a left-padded row's first ``S`` positions may be padding); the quantized count, the extra
rows in use and each row's first valid extra row and quantized-part padding live in device tensors that the fused
kernel (:func:`kvtune.kernels.decode_static.decode_static`, a ``torch.library.triton_op``) reads, so a step's
launches never change. A step writes its token at the extra count (a sink row while the sinks fill, as after a
prompt shorter than ``S``, then the window's next row). A flush (the window's oldest ``flush`` tokens quantized into
the packed buffers, the window shifted, the sinks left alone) is a fixed-shape sequence of ops too; the host knows
which layers a step flushes (:meth:`StaticKVTuneCache.next_flush`, counting window tokens only) and a graph decoder
replays one graph per flush pattern: two (none, all) when every layer has the same window and block, a few more
when layers differ, as in searched plans. Host-side counters mirror the device ones for ``get_seq_length`` and that
schedule.

Restrictions (checked when the cache is made, :func:`check_static`): one spec pair per layer, no salient-ratio
tokens, no merging, formats the fused kernel reads (:func:`kvtune.quant.codec.kernel_ok`), one prompt (prefill)
then single tokens. Attention runs through
the ``"kvtune-static"`` implementation (:mod:`kvtune.runtime.static_attention`).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

import torch
from transformers.cache_utils import Cache, CacheLayerMixin

from kvtune.errors import KVTuneError
from kvtune.layout import GLOBAL, LayerSpan
from kvtune.quant import centering, codec
from kvtune.quant.centering import CENTER_FIELD
from kvtune.quant.rotation import rotation
from kvtune.runtime.heads import ROLES
from kvtune.runtime.scores import model_score_mods

if TYPE_CHECKING:
    from kvtune.plan import Plan
    from kvtune.plan_types import LayerPlan

FP = torch.float16


def check_static(plan: Plan, head_dim: int, spans: Sequence[LayerSpan] | None = None) -> None:
    """Raise :class:`KVTuneError` naming the first layer the static (CUDA-graph) path cannot serve, and why (each
    layer as it runs under its attention span: a windowed layer drops its token policies)."""
    for i, lp in enumerate(plan.layers):
        lp = lp.windowed(spans[i]) if spans is not None else lp
        why = []
        if lp.heads and len(set(lp.heads)) > 1:
            why.append("per-head specs")
        if lp.salient.ratio > 0:
            why.append("salient tokens")
        if lp.merge.method != "none":
            why.append(f"merge policy {lp.merge.method!r}")
        state = plan.layer_state(i)
        for role in ROLES:
            spec = lp.key if role == "key" else lp.value
            if not codec.kernel_ok(spec, role):
                why.append(f"{role} spec {spec.label()} is not read by the fused kernel")
            elif spec.center and CENTER_FIELD not in state.get(role, {}):
                # a captured step shifts the window by the mean: it must be known before the first capture
                why.append(f"{role} spec {spec.label()} is centered but the plan has no calibrated mean for it")
            elif missing := sorted(codec.layer_fields(spec, head_dim).keys() - state.get(role, {}).keys()):
                # e.g. log8 scales' range: the kernel operands are made once, before the first block is stored
                why.append(f"{role} spec {spec.label()} needs calibrated {', '.join(missing)} the plan lacks")
        if why:
            raise KVTuneError(f"layer {i} cannot use the static (CUDA-graph) cache: {'; '.join(why)}",
                              "use plan.cache(model) (dynamic cache) or a plan whose every layer the kernel reads")


class StaticLayer(CacheLayerMixin):
    """One layer: packed fields ``[B, Hkv, rows(capacity), width]``; the fp16 extra segment ``win_k``/``win_v``
    ``[B, Hkv, S + residual + flush, D]`` laid out ``[sinks (S = sink_tokens rows) | window]``; device counters
    ``nq`` (quantized tokens) and ``nw`` (extra rows in use: sinks filled + window) int32 ``[1]``; per row int32
    ``[B]``: left padding ``pad`` and, written by each step's append kernel before attention, what the query sees:
    quantized tokens from ``qvis = max(e - S, 0)`` and extra rows from ``wvis = min(e, S) + max(e - S - nq, 0)``
    (``e``: the first visible position, after the padding and, in a sliding or chunked layer (``span``), inside its
    window; valid extra rows ``wvis <= r < nw`` are contiguous: the window fills only once the sinks are full). A
    windowed layer keeps its old tokens (static capacity) and masks them. ``ext_k``/``ext_v``: the same extra rows
    in each role's code frame (centered, rotated) as the kernel reads them (the raw rows themselves when a role has
    no frame); the flush quantizes the raw rows. Host mirrors: ``n_quant``, ``n_win`` (window tokens only),
    ``length``; the sinks filled are ``min(length, S)``."""

    is_sliding = False
    is_compileable = False

    def __init__(self, plan: LayerPlan, num_kv_heads: int, head_dim: int, state: dict[str, dict[str, torch.Tensor]],
                 batch: int, capacity: int, device: torch.device, span: LayerSpan = GLOBAL) -> None:
        super().__init__()
        self.plan, self.head_dim, self.batch, self.span = plan, head_dim, batch, span
        self.specs = {"key": plan.key, "value": plan.value}
        self.flush, self.residual, self.capacity = plan.flush, plan.residual, capacity
        self.sinks = plan.salient.sink_tokens
        self.wcap = self.sinks + plan.residual + plan.flush  # rows of the fp16 extra buffer [sinks | window]
        self.state = {r: {n: t.to(device) for n, t in state.get(r, {}).items()} for r in ROLES}
        self.bufs = {r: {f.name: torch.zeros(batch, num_kv_heads, f.rows(capacity, self.flush), f.width,
                                             dtype=f.torch_dtype, device=device)
                         for f in codec.stored_fields(self.specs[r], head_dim, self.flush)} for r in ROLES}
        self.operands = tuple(codec.kernel_operands(self.specs[r], r, self.bufs[r], self.state[r]) for r in ROLES)
        self.win_k = torch.zeros(batch, num_kv_heads, self.wcap, head_dim, dtype=FP, device=device)
        self.win_v = torch.zeros_like(self.win_k)
        # each role's code frame: its rotation R as an fp16 (hi, lo) pair for the append kernel (query, new token) and
        # its mean (None: none); the values' float32 R.T for the attention's merge (the output back)
        self.rsplit = {r: rotation(self.specs[r].rotation).split_half(head_dim, device) for r in ROLES}
        self.means = {r: self.state[r][CENTER_FIELD] if centering.active(self.specs[r], self.state[r]) else None
                      for r in ROLES}
        self.vback = rotation(self.specs["value"].rotation).inverse_on(head_dim, device)
        # the kernel's extra segment: the same rows in each role's code frame when it has one, made once per token as
        # it is written instead of every step; the raw rows stay for the flush
        self.framed = {r: self.rsplit[r] is not None or self.means[r] is not None for r in ROLES}
        self.ext_k = torch.zeros_like(self.win_k) if self.framed["key"] else self.win_k
        self.ext_v = torch.zeros_like(self.win_v) if self.framed["value"] else self.win_v
        i32 = {"dtype": torch.int32, "device": device}
        self.nq, self.nw = torch.zeros(1, **i32), torch.zeros(1, **i32)
        self.pad, self.qvis, self.wvis = (torch.zeros(batch, **i32) for _ in range(3))
        self.ar = torch.arange(self.flush, device=device)
        self.n_quant = self.n_win = self.length = 0  # host mirrors
        self.flush_due: bool | None = None  # None: from the host mirrors; set by a graph decoder while capturing
        self.due = False
        self.pending: tuple[torch.Tensor, torch.Tensor] | None = None  # this step's key and value, until attend()
        self.device, self.is_initialized = device, True

    # -- transformers CacheLayerMixin ------------------------------------------------------------------------------
    def lazy_initialization(self, key_states: torch.Tensor, value_states: torch.Tensor) -> None:
        pass

    def update(self, key_states: torch.Tensor, value_states: torch.Tensor, *args: Any,
               **kwargs: Any) -> tuple[torch.Tensor, torch.Tensor]:
        """``[B, Hkv, m, D]``: a prompt (first call) is stored whole; later calls take one token each."""
        from kvtune.runtime.static_attention import register

        m = key_states.shape[2]
        if self.length == 0:  # the prompt is stored (and attended, as in the dynamic cache) at fp16
            k16, v16 = key_states.to(FP), value_states.to(FP)
            self._prefill(k16, v16)
            return k16.to(key_states.dtype), v16.to(value_states.dtype)
        elif m != 1:
            raise KVTuneError("a static kvtune cache takes one prompt, then one token per sequence a step",
                              "prefill the whole prompt in one call, or use plan.cache(model) (dynamic)")
        else:  # attend() writes the token at the extra count: a sink row while the sinks fill, then the window's next
            self.pending = (key_states, value_states)
            self.n_win, self.length = self.n_win + self.to_window(), self.length + 1
            self.due = self.n_win == self.residual + self.flush if self.flush_due is None else self.flush_due
            register(key_states, self)
        return key_states, value_states

    def get_mask_sizes(self, query: Any, *args: Any) -> tuple[int, int]:
        q = query if isinstance(query, int) else query.shape[0]
        return self.length + q, 0

    def get_seq_length(self, *args: Any) -> int:
        return self.length

    def get_max_length(self) -> int:
        return self.sinks + self.capacity + self.residual

    def next_flush(self) -> bool:
        """Whether the next single-token step flushes a block of this layer."""
        return self.to_window() and self.n_win + 1 == self.residual + self.flush

    def to_window(self) -> bool:
        """Whether the next token joins the window (the sinks are full; before, it fills the next sink row)."""
        return self.length >= self.sinks

    def reset(self) -> None:
        for t in (self.nq, self.nw):
            t.zero_()
        self.n_quant = self.n_win = self.length = 0

    # -- attention and flush ----------------------------------------------------------------------------------------
    def _frame(self, role: str, x: torch.Tensor) -> torch.Tensor:
        """fp16 rows ``x [B, Hkv, n, D]`` in ``role``'s code frame (mean removed, rotated), as the kernel reads them."""
        spec = self.specs[role]
        return rotation(spec.rotation).forward(centering.shift(spec, self.state[role], x.to(FP)))

    def _write(self, rows: Any, k: torch.Tensor, v: torch.Tensor) -> None:
        """Write fp16 tokens ``k, v [B, Hkv, n, D]`` at extra rows ``rows`` (an index tensor or a slice), raw and (for
        a role with a code frame) framed."""
        def put(buf: torch.Tensor, x: torch.Tensor) -> None:
            if isinstance(rows, slice):
                buf[:, :, rows] = x
            else:
                buf.index_copy_(2, rows, x)

        for role, raw, ext, x in (("key", self.win_k, self.ext_k, k), ("value", self.win_v, self.ext_v, v)):
            put(raw, x)
            if self.framed[role]:
                put(ext, self._frame(role, x))

    def attend(self, q: torch.Tensor, scaling: float) -> torch.Tensor:
        """``q [B, Hq, 1, D]`` -> ``[B, Hq, 1, D]`` over the stored tokens and this step's (from :meth:`update`), then
        the flush when one is due. One launch (:func:`kvtune.kernels.append_step.append_step`) writes the token's
        raw and framed (centered, rotated) rows and rotates the query; the merge of the attention kernel takes the
        output back out of the values' frame (inverse rotation, mean)."""
        from kvtune.kernels.append_step import append_step
        from kvtune.kernels.decode_static import decode_static

        (k, v), self.pending = self.pending, None
        qf = append_step(q, k, v, self.win_k, self.win_v, self.ext_k, self.ext_v, self.nw, self.rsplit["key"],
                         self.rsplit["value"], self.means["key"], self.means["value"],
                         (self.pad, self.nq, self.qvis, self.wvis), self.sinks, self.span)
        self.nw += 1
        kq, vq = self.operands
        out = decode_static(qf.to(FP), kq, vq, self.ext_k, self.ext_v, self.nq, self.nw, self.wvis, self.qvis,
                            scaling, self.vback, self.means["value"])
        if self.due:
            self._flush()
        return out.to(q.dtype)

    def _padded(self, x: torch.Tensor, first: torch.Tensor | int) -> torch.Tensor:
        """``x [B, Hkv, n, D]`` (quantized tokens ``first..``, stored after the sinks) with left-padding rows replaced
        by the block's first real token (zeros for an all-padding row): :meth:`KVTuneLayer.padded_block` without its
        host-side shortcut."""
        stored = self.sinks + first + torch.arange(x.shape[2], device=x.device)
        is_pad = stored[None, :] < self.pad[:, None]  # [B, n]
        real = ~is_pad
        idx = real.float().argmax(-1).view(-1, 1, 1, 1).expand(x.shape[0], x.shape[1], 1, x.shape[3])
        fill = torch.where(real.any(-1).view(-1, 1, 1, 1), x.gather(2, idx), torch.zeros_like(x[:, :, :1]))
        return torch.where(is_pad[:, None, :, None], fill, x)

    def _store(self, k: torch.Tensor, v: torch.Tensor, row_index: Any) -> None:
        """Encode whole blocks ``k, v [B, Hkv, n*F, D]`` and write their rows at ``row_index(rows, every)``."""
        for role, x in zip(ROLES, (k, v)):
            spec = self.specs[role]
            if codec.layer_fields(spec, self.head_dim).keys() - self.state[role].keys():
                self.state[role] = {**codec.fit(spec, x[:, :, : self.flush]), **self.state[role]}
            for name, t in codec.encode(x.float(), spec, self.flush, self.state[role]).items():
                buf = self.bufs[role][name]
                every = x.shape[2] // t.shape[2]
                buf.index_copy_(2, row_index(t.shape[2], every), t.to(buf.dtype))

    def _prefill(self, k: torch.Tensor, v: torch.Tensor) -> None:
        """Store a prompt ``k, v`` fp16 ``[B, Hkv, L, D]``: its first ``S`` tokens in the sink rows (a shorter prompt
        leaves the rest for the next steps), of the others whole blocks beyond ``residual`` quantized and the rest
        in the window (the dynamic cache's flush rule)."""
        length, f, s = k.shape[2], self.flush, min(self.sinks, k.shape[2])
        n = max(0, length - s - self.residual) // f * f
        if n > self.capacity or length - n > self.wcap:
            raise KVTuneError(f"a {length}-token prompt does not fit a static cache of {self.capacity} tokens",
                              "make the cache with a larger max_length")
        if n:
            self._store(self._padded(k[:, :, s : s + n], 0), self._padded(v[:, :, s : s + n], 0),
                        lambda rows, every: torch.arange(rows, device=self.device))
        self._write(slice(0, s), k[:, :, :s], v[:, :, :s])
        self._write(slice(s, length - n), k[:, :, s + n :], v[:, :, s + n :])
        self.nq.fill_(n)
        self.nw.fill_(length - n)
        self.n_quant, self.n_win, self.length = n, length - s - n, length

    def _flush(self) -> None:
        """Quantize the window's oldest ``flush`` tokens (extra rows ``S..S+flush``) into rows from ``nq``, shift the
        window (the sinks stay), move the counters."""
        f, s, r = self.flush, self.sinks, self.residual
        self._store(self._padded(self.win_k[:, :, s : s + f], self.nq),
                    self._padded(self.win_v[:, :, s : s + f], self.nq),
                    lambda rows, every: self.nq.long() // every + self.ar[:rows])
        if r:
            for buf in {id(b): b for b in (self.win_k, self.win_v, self.ext_k, self.ext_v)}.values():
                buf[:, :, s : s + r] = buf[:, :, s + f :].clone()
        self.nq += f
        self.nw -= f
        self.n_quant, self.n_win = self.n_quant + f, self.n_win - f

    def nbytes(self) -> int:
        """Bytes allocated: packed fields, the fp16 extra segment (sinks + window), the layer's plan tensors."""
        ext = [t for t, r in ((self.ext_k, "key"), (self.ext_v, "value")) if self.framed[r]]
        tensors = [self.win_k, self.win_v, *ext, *(t for b in self.bufs.values() for t in b.values()),
                   *(t for s in self.state.values() for t in s.values())]
        return sum(t.numel() * t.element_size() for t in tensors)


class StaticKVTuneCache(Cache):
    """Static-capacity kvtune cache for ``batch`` sequences of up to ``max_length`` tokens (see module docstring)."""

    def __init__(self, plan: Plan, model: Any, batch: int, max_length: int, device: Any = None) -> None:
        from kvtune.models import check_supported
        from kvtune.runtime.cache import identity_of
        from kvtune.runtime.static_attention import install

        check_supported(model)
        if mods := model_score_mods(model):
            raise KVTuneError(f"the static (CUDA-graph) cache's kernel has no attention {' or '.join(mods)}, which "
                              f"{type(model).__name__} uses", "use plan.cache(model) (dynamic cache)")
        ident = identity_of(model)
        self.plan = plan.bind(ident)
        check_static(self.plan, ident.head_dim, ident.spans)
        dev = torch.device(device) if device is not None else next(model.parameters()).device
        layers = [StaticLayer(lp.windowed(span), ident.num_kv_heads, ident.head_dim, self.plan.layer_state(i), batch,
                              math.ceil(max_length / lp.flush) * lp.flush, dev, span)
                  for i, (lp, span) in enumerate(zip(self.plan.layers, ident.spans))]
        super().__init__(layers=layers)
        self.max_length = max_length
        install(model)

    def set_padding(self, attention_mask: torch.Tensor | None) -> None:
        """Left padding of each row from a prompt's ``attention_mask [B, L]`` (1 = token); call before the prefill."""
        for layer in self.layers:
            if attention_mask is None:
                layer.pad.zero_()
            else:
                layer.pad.copy_((attention_mask.to(layer.device).cumsum(-1) == 0).sum(-1))

    def next_flush(self) -> tuple[bool, ...]:
        """Which layers the next single-token step flushes a block in (one bool a layer; only window tokens count).
        Layers with the same window and block flush together; a graph decoder keeps one graph per pattern."""
        return tuple(layer.next_flush() for layer in self.layers)

    def advance(self, flushed: tuple[bool, ...] | bool) -> None:
        """Host mirrors after a replayed step with the flush pattern ``flushed`` (:meth:`next_flush`; one bool: every
        layer) -- what :meth:`StaticLayer.update` / ``_flush`` do when run eagerly."""
        for i, layer in enumerate(self.layers):
            layer.n_win, layer.length = layer.n_win + layer.to_window(), layer.length + 1
            if flushed[i] if isinstance(flushed, tuple) else flushed:
                layer.n_quant, layer.n_win = layer.n_quant + layer.flush, layer.n_win - layer.flush

    def get_seq_length(self, layer_idx: int = 0) -> int:
        return self.layers[layer_idx].length

    def nbytes(self, used: bool = False) -> int:
        """Bytes the cache holds (allocated for ``max_length``; ``used`` is ignored: everything is preallocated)."""
        return sum(layer.nbytes() for layer in self.layers)
