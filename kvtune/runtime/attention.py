"""The ``"kvtune"`` attention function (registered with transformers' AttentionInterface) and its dispatch.

The model calls ``cache.update(k, v)`` and then this function with whatever ``update`` returned; a
:class:`~kvtune.runtime.layer.KVTuneLayer` registers a :class:`~kvtune.runtime.layer.Step` for the key
tensor it returns (:func:`~kvtune.runtime.layer.take_step`), and this function attends over the layer's
*stored* tokens directly:

* one query token on CUDA (or anywhere with ``backend="triton"``, e.g. under ``TRITON_INTERPRET=1``),
  with kernel-supported specs: the fused Triton decode kernel reads the packed
  codes (:func:`kvtune.kernels.decode_attention`), the fp16 sinks + window ride along as its extra
  segment, rotated specs rotate q (and the output) instead of the cache;
* a prompt's first forward (nothing stored yet, not stepwise): the model's own attention over the prompt as
  stored (fp16) with the model's mask (:func:`kvtune.runtime.scores.model_attention`: transformers' SDPA, the
  fastest exact path on CPU and GPU, or eager maths for soft-capped / sink models); the tokens are quantized
  after it, as for any call;
* everything else: :func:`kvtune.runtime.torch_attention.attend` (PyTorch, blockwise; the CPU path).

Without a step (no cache, or another cache class) it is the model's own attention, so switching a model to
``"kvtune"`` never changes what it computes without a :class:`KVTuneCache`. The mask function is
transformers' SDPA mask (boolean, True = attend).

**Windows.** A sliding-window or chunked layer (``layer.span``) attends exactly the keys the model's mask allows
in every path: the reference masks stored keys by cache position, the kernel starts each row's quantized part
at its window (``start``) and masks the fp16 segment. Left padding of such a layer cannot be read off its mask's
last row (the window hides it), so it is read off the diagonal (a real token always sees itself) and carried
from call to call. Soft-capping and sinks (:class:`~kvtune.runtime.scores.ScoreMods`) keep a layer off the kernel.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Callable
from typing import Any

import torch

from kvtune.errors import KVTuneError
from kvtune.quant import centering, codec
from kvtune.quant.rotation import rotation
from kvtune.runtime import policies, torch_attention
from kvtune.runtime.heads import ROLES, HeadGroup
from kvtune.runtime.layer import KVTuneLayer, Step, take_step
from kvtune.runtime.scores import PLAIN, ScoreMods, model_attention

log = logging.getLogger(__name__)
NAME = "kvtune"
_REGISTERED: set[str] = set()  # attention implementations this process registered with transformers
_NO_PADDING: dict[tuple[int, torch.device], torch.Tensor] = {}
_PAD_MEMO: tuple[torch.Tensor, torch.Tensor, bool] | None = None  # (mask, its left padding [B], any row padded)
_WINDOW_PAD_MEMO: tuple[torch.Tensor, torch.Tensor, bool] | None = None  # the same for windowed layers' masks


def kvtune_attention(module: Any, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor,
                     attention_mask: torch.Tensor | None, scaling: float | None = None,
                     dropout: float = 0.0, **kwargs: Any) -> tuple[torch.Tensor, None]:
    """``query [B, Hq, L, D]`` -> ``(out [B, L, Hq, D], None)`` over the cache's stored tokens."""
    step = take_step(key)
    if step is None:
        return model_attention(module, query, key, value, attention_mask, scaling=scaling, dropout=dropout,
                               **kwargs)
    if step.layer.owner is not None and id(module) != step.layer.owner:
        raise KVTuneError("this KVTuneCache was created for another model instance",
                          "create one cache per model: plan.cache(model)")
    _check_window(step.layer, kwargs.get("sliding_window"))
    scaling = 1.0 / math.sqrt(query.shape[-1]) if scaling is None else float(scaling)
    mods = ScoreMods.from_kwargs(kwargs)
    pad, padded = (_window_padding(attention_mask, query, step.layer) if step.layer.span.windowed
                   else _left_padding(attention_mask, query))
    if _fresh_prefill(step):  # nothing stored before this call: the model's attention over its own tokens
        out = _prefill_sdpa(module, step, query, attention_mask, scaling, dropout, **kwargs)
    else:
        out = _kernel_attend(step, query, pad, scaling, padded) if kernel_eligible(step, query, mods) else None
        if out is None:
            out = torch_attention.attend(step, query, pad, scaling, mods=mods)
        out = out.transpose(1, 2).contiguous()
    policies.after_attention(step, query, pad, scaling)  # probes, then merge + flush, then salient
    return out, None


def _fresh_prefill(step: Step) -> bool:
    """True when the layer holds only this call's tokens, all in fp16 (a prompt's first forward, not in
    stepwise mode): attention over them is ordinary causal attention, which SDPA does fastest."""
    layer = step.layer
    return (step.bounds is None and step.q_len > 1 and step.nq_before == 0
            and step.sink_k.shape[2] + layer.win_k.shape[2] == step.q_len)


def _prefill_sdpa(module: Any, step: Step, query: torch.Tensor, attention_mask: torch.Tensor | None,
                  scaling: float, dropout: float, **kwargs: Any) -> torch.Tensor:
    """The model's attention over ``[sinks][window]`` (= this call's tokens as stored, fp16, in order);
    returns ``[B, L, Hq, D]``. The model's mask (causal + window + left padding) already has the right size."""
    layer = step.layer
    keys = torch.cat([step.sink_k, layer.win_k], 2).to(query.dtype)
    vals = torch.cat([step.sink_v, layer.win_v], 2).to(query.dtype)
    return model_attention(module, query, keys, vals, attention_mask, scaling=scaling, dropout=dropout,
                           **kwargs)[0]


def _check_window(layer: KVTuneLayer, sliding_window: int | None) -> None:
    """A ``sliding_window`` the model attends with must be the window the layer was built with (from the config)."""
    if sliding_window is not None and layer.span.kind == "sliding" and layer.span.size != int(sliding_window):
        raise KVTuneError(f"the model attends with sliding_window={sliding_window} but its config gave this "
                          f"layer {layer.span.to_str()}", "make a new cache after changing the model's config")


def _left_padding(mask: torch.Tensor | None, query: torch.Tensor) -> tuple[torch.Tensor, bool]:
    """Left padding per row ``[B]`` and whether any row has some. Every layer of one forward gets the same
    mask tensor, so both are computed once per forward (memoized on the mask): one device sync per step,
    not one per layer."""
    if mask is None or mask.dtype != torch.bool:
        key = (query.shape[0], query.device)
        if key not in _NO_PADDING:  # read-only zeros, one tensor per (batch, device): no launch per layer
            _NO_PADDING[key] = torch_attention.left_padding(None, query.shape[0], query.device)
        return _NO_PADDING[key], False
    global _PAD_MEMO
    if _PAD_MEMO is None or _PAD_MEMO[0] is not mask:
        pad = torch_attention.left_padding(mask, query.shape[0], query.device)
        _PAD_MEMO = (mask, pad, bool((pad > 0).any()))
    return _PAD_MEMO[1], _PAD_MEMO[2]


def _window_padding(mask: torch.Tensor | None, query: torch.Tensor,
                    layer: KVTuneLayer) -> tuple[torch.Tensor, bool]:
    """Left padding ``[B]`` (and whether any) for a windowed layer: this call's padded queries are the leading
    ones that do not see their own key (the diagonal of ``mask [B, 1, q, K]``, queries at cache positions
    ``K - q ..``); when every earlier token was padding too they extend it. Memoized on the mask."""
    if mask is None or mask.dtype != torch.bool:
        return _left_padding(None, query)
    global _WINDOW_PAD_MEMO
    if _WINDOW_PAD_MEMO is None or _WINDOW_PAD_MEMO[0] is not mask:
        q, k = mask.shape[2], mask.shape[3]
        rows = torch.arange(q, device=mask.device)
        diag = mask[:, 0, rows, k - q + rows]  # [B, q]
        lead = (~diag).long().cumprod(-1).sum(-1)  # leading padded queries
        prev = layer.pad if layer.pad is not None else torch.zeros_like(lead)
        pad = torch.where(prev >= k - q, k - q + lead, prev)
        _WINDOW_PAD_MEMO = (mask, pad, bool((pad > 0).any()))
    return _WINDOW_PAD_MEMO[1], _WINDOW_PAD_MEMO[2]


def use_attention(model: Any, name: str, attention: Callable[..., Any], mask: Callable[..., Any]) -> None:
    """Register ``name`` with transformers (attention and mask functions) once per process and switch
    ``model`` to it (idempotent)."""
    if name not in _REGISTERED:
        from transformers import AttentionInterface
        from transformers.masking_utils import AttentionMaskInterface

        AttentionInterface.register(name, attention)
        AttentionMaskInterface.register(name, mask)
        _REGISTERED.add(name)
    if getattr(model.config, "_attn_implementation", None) != name:
        log.info("switching the model's attention implementation to %r", name)
        model.set_attn_implementation(name)


def install(model: Any) -> None:
    """Register ``"kvtune"`` (attention + transformers' SDPA mask) once and switch ``model`` to it."""
    from transformers.masking_utils import sdpa_mask

    use_attention(model, NAME, kvtune_attention, sdpa_mask)


# ------------------------------------------------------------------------------------------- kernels
def kernel_eligible(step: Step, query: torch.Tensor, mods: ScoreMods = PLAIN) -> bool:
    """True when this call can run on the fused Triton decode kernel (which has no soft-capping or sinks)."""
    layer = step.layer
    if layer.backend == "reference" or step.q_len != 1 or layer.plan.salient.ratio > 0 or not mods.plain:
        return False
    if not query.is_cuda and layer.backend != "triton":
        return False
    if layer.kernel_specs is None:  # the layer's specs never change: check them once
        from kvtune import kernels

        specs = all(codec.kernel_ok(g.spec(r), r) for g in layer.groups for r in ROLES)
        layer.kernel_specs = specs and kernels.available()
    return layer.kernel_specs


def _kernel_attend(step: Step, q: torch.Tensor, pad: torch.Tensor, scaling: float,
                   padded: bool) -> torch.Tensor:
    """Fused decode over each head group; ``q [B, Hq, 1, D]`` -> ``[B, Hq, 1, D]``. ``padded``: some row
    has left padding (False skips the padding bookkeeping)."""
    layer = step.layer
    if len(layer.groups) == 1:  # one spec for all heads (ascending): no gather/scatter of query heads
        return _group_decode(step, layer.groups[0], q, pad, scaling, padded).to(q.dtype)
    n_rep = q.shape[1] // layer.num_kv_heads
    out = torch.empty_like(q)
    for g in layer.groups:
        qh = [h * n_rep + r for h in g.heads for r in range(n_rep)]
        out[:, qh] = _group_decode(step, g, q[:, qh], pad, scaling, padded).to(q.dtype)
    return out


def _extra(g: HeadGroup, sink: torch.Tensor, win: torch.Tensor) -> torch.Tensor:
    """fp16 extra segment ``[B, h, s + w, D]``: sinks then window (the window itself without sinks)."""
    if sink.shape[2] == 0:
        return g.select(win)
    return torch.cat([g.select(sink), g.select(win)], 2)


def _group_decode(step: Step, g: HeadGroup, q: torch.Tensor, pad: torch.Tensor, scaling: float,
                  padded: bool) -> torch.Tensor:
    from kvtune.kernels.decode_attention import decode_attention

    layer = step.layer
    ek = _extra(g, step.sink_k, layer.win_k)  # [B, h, R, D] fp16
    ev = _extra(g, step.sink_v, layer.win_v)
    ks, vs = g.plan.key, g.plan.value
    ek, ev = centering.shift(ks, g.state["key"], ek), centering.shift(vs, g.state["value"], ev)
    krot, vrot = rotation(ks.rotation), rotation(vs.rotation)
    qk, ek, ev = krot.forward(q.to(torch.float16)), krot.forward(ek), vrot.forward(ev)
    kq, vq = _packed(g, layer)
    start = extra = None
    if padded or layer.span.windowed:
        s, nq, e = step.sink_k.shape[2], layer.n_quant, layer.evicted
        lo = _first_key(layer, pad)  # [B] first cache position the query sees
        start = (lo - s - e).clamp(0, nq)
        idx = torch.cat([torch.arange(s, device=q.device),
                         nq + s + e + torch.arange(layer.win_k.shape[2], device=q.device)])
        extra = idx[None, :] >= lo[:, None]  # [B, R] bool
    mean = g.state["value"][centering.CENTER_FIELD] if centering.active(vs, g.state["value"]) else None
    return decode_attention(qk, kq, vq, ek, ev, extra, start, scaling,  # the merge takes the output back
                            out_rot=vrot.inverse_on(q.shape[-1], q.device),
                            out_mean=mean.to(q.device) if mean is not None else None)


def _first_key(layer: KVTuneLayer, pad: torch.Tensor) -> torch.Tensor:
    """``[B]`` int64: the first cache position the decode query (at ``length - 1``) sees: after the row's left
    padding and, in a windowed layer, inside its window."""
    if not layer.span.windowed:
        return pad
    return torch.maximum(pad, torch.as_tensor(layer.span.first_visible(layer.length - 1, pad), device=pad.device))


def _packed(g: HeadGroup, layer: Any) -> tuple[Any, Any]:
    """The group's quantized part as the kernel's ``(PackedKeys, PackedValues)``, built (and validated) once
    per change of the stores: a flush, a regrowth or a batch reorder changes a buffer or its length."""
    key = tuple((id(b.data), b.n) for st in (g.keys, g.values) for b in st.buffers.values())
    if g.kernel_memo is not None and g.kernel_memo[0] == key and key:
        return g.kernel_memo[1]
    b, dev = layer.win_k.shape[0], layer.win_k.device
    packed = tuple(codec.kernel_operands(g.spec(r), r, g.stores[r].fields() if g.stores[r] else
                                         g.stores[r].empty(b, len(g.heads), dev), g.state[r]) for r in ROLES)
    g.kernel_memo = (key, packed)
    return packed
