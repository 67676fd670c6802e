"""The ``"kvtune"`` attention function (registered with transformers' AttentionInterface) and its dispatch.

The model calls ``cache.update(k, v)`` and then this function with whatever ``update`` returned; a
:class:`~kvtune.runtime.layer.KVTuneLayer` attaches a :class:`~kvtune.runtime.layer.Step` to the key
tensor, and this function attends over the layer's *stored* tokens directly:

* one query token on CUDA (or anywhere with ``backend="triton"``, e.g. under ``TRITON_INTERPRET=1``),
  with kernel-supported specs: the fused Triton decode kernel reads the packed
  codes (:func:`kvtune.kernels.decode_attention`), the fp16 sinks + window ride along as its extra
  segment, Hadamard-rotated specs rotate q (and the output) instead of the cache;
* a prompt's first forward (nothing stored yet, not stepwise): transformers' SDPA over the prompt as stored
  (fp16), the fastest exact path on CPU and GPU; the tokens are quantized after it, as for any call;
* everything else: :func:`kvtune.runtime.reference.attend` (PyTorch, blockwise; the CPU path).

Without a step (no cache, or another cache class) it is plain SDPA, so switching a model to
``"kvtune"`` never changes what it computes without a :class:`KVTuneCache`. The mask function is
transformers' SDPA mask (boolean, True = attend).
"""

from __future__ import annotations

import logging
import math
from typing import Any

import torch

from kvtune.errors import KVTuneError
from kvtune.quant.formats import QuantSpec
from kvtune.quant.transforms import hadamard
from kvtune.runtime import policies, reference
from kvtune.runtime.heads import HeadGroup
from kvtune.runtime.layer import Step

log = logging.getLogger(__name__)
NAME = "kvtune"
KERNEL_BITS = (1, 2, 3, 4, 8)
_REGISTERED = False
_NO_PADDING: dict[tuple[int, torch.device], torch.Tensor] = {}


def kvtune_attention(module: Any, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor,
                     attention_mask: torch.Tensor | None, scaling: float | None = None,
                     dropout: float = 0.0, **kwargs: Any) -> tuple[torch.Tensor, None]:
    """``query [B, Hq, L, D]`` -> ``(out [B, L, Hq, D], None)`` over the cache's stored tokens."""
    step: Step | None = getattr(key, "_kvtune_step", None)
    if step is None:
        from transformers.integrations.sdpa_attention import sdpa_attention_forward

        return sdpa_attention_forward(module, query, key, value, attention_mask, scaling=scaling,
                                      dropout=dropout, **kwargs)
    if step.layer.owner is not None and id(module) != step.layer.owner:
        raise KVTuneError("this KVTuneCache was created for another model instance",
                          "create one cache per model: plan.cache(model)")
    scaling = 1.0 / math.sqrt(query.shape[-1]) if scaling is None else float(scaling)
    pad, padded = _left_padding(attention_mask, query)
    if _fresh_prefill(step):  # nothing stored before this call: plain SDPA over its own (fp16-stored) tokens
        out = _prefill_sdpa(module, step, query, attention_mask, scaling, dropout, **kwargs)
    else:
        out = _kernel_attend(step, query, pad, scaling, padded) if kernel_eligible(step, query) else None
        if out is None:
            out = reference.attend(step, query, pad, scaling)
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
    """transformers' SDPA over ``[sinks][window]`` (= this call's tokens as stored, fp16, in order);
    returns ``[B, L, Hq, D]``. The model's mask (causal + left padding) already has the right size."""
    from transformers.integrations.sdpa_attention import sdpa_attention_forward

    layer = step.layer
    keys = torch.cat([step.sink_k, layer.win_k], 2).to(query.dtype)
    vals = torch.cat([step.sink_v, layer.win_v], 2).to(query.dtype)
    return sdpa_attention_forward(module, query, keys, vals, attention_mask, scaling=scaling,
                                  dropout=dropout, **kwargs)[0]


def _left_padding(mask: torch.Tensor | None, query: torch.Tensor) -> tuple[torch.Tensor, bool]:
    """Left padding per row ``[B]`` and whether any row has some. Every layer of one forward gets the same
    mask tensor, so both are computed once per forward (memoized on the mask): one device sync per step,
    not one per layer."""
    if mask is None or mask.dtype != torch.bool:
        key = (query.shape[0], query.device)
        if key not in _NO_PADDING:  # read-only zeros, one tensor per (batch, device): no launch per layer
            _NO_PADDING[key] = reference.left_padding(None, query.shape[0], query.device)
        return _NO_PADDING[key], False
    memo = getattr(mask, "_kvtune_pad", None)
    if memo is None:
        pad = reference.left_padding(mask, query.shape[0], query.device)
        memo = (pad, bool((pad > 0).any()))
        mask._kvtune_pad = memo
    return memo


def install(model: Any) -> None:
    """Register ``"kvtune"`` (attention + mask) once and switch ``model`` to it (idempotent)."""
    global _REGISTERED
    if not _REGISTERED:
        from transformers import AttentionInterface
        from transformers.masking_utils import AttentionMaskInterface, sdpa_mask

        AttentionInterface.register(NAME, kvtune_attention)
        AttentionMaskInterface.register(NAME, sdpa_mask)
        _REGISTERED = True
    if getattr(model.config, "_attn_implementation", None) != NAME:
        log.info("switching the model's attention implementation to %r", NAME)
        model.set_attn_implementation(NAME)


# ------------------------------------------------------------------------------------------- kernels
def _key_ok(spec: QuantSpec) -> bool:
    g = spec.group
    return (not spec.passthrough and spec.axis == "channel" and g >= 16 and g & (g - 1) == 0
            and spec.bits in KERNEL_BITS and _plain(spec))


def _value_ok(spec: QuantSpec) -> bool:
    return not spec.passthrough and spec.axis == "token" and spec.bits in KERNEL_BITS and _plain(spec)


def _plain(spec: QuantSpec) -> bool:
    return (not (spec.outliers or spec.fft or spec.channel_separable or spec.symmetric)
            and spec.scale_dtype == "float16")


def kernel_eligible(step: Step, query: torch.Tensor) -> bool:
    """True when this call can run on the fused Triton decode kernel."""
    layer = step.layer
    if layer.backend == "reference" or step.q_len != 1 or layer.plan.salient.ratio > 0:
        return False
    if not query.is_cuda and layer.backend != "triton":
        return False
    ok = getattr(layer, "_kernel_specs_ok", None)  # the layer's specs never change: check them once
    if ok is None:
        from kvtune import kernels

        specs = all(_key_ok(g.plan.key) and _value_ok(g.plan.value) for g in layer.groups)
        ok = specs and kernels.available()
        layer._kernel_specs_ok = ok
    return ok


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
    kspec, vspec = g.plan.key, g.plan.value
    qk = q.to(torch.float16)
    if kspec.hadamard:
        qk, ek = hadamard(qk), hadamard(ek)
    if vspec.hadamard:
        ev = hadamard(ev)
    kq, vq = _packed(g, layer)
    start = extra = None
    if padded:
        s, nq = step.sink_k.shape[2], layer.n_quant
        start = (pad - s).clamp(0, nq)
        idx = torch.cat([torch.arange(s, device=q.device),
                         nq + s + torch.arange(layer.win_k.shape[2], device=q.device)])
        extra = idx[None, :] >= pad[:, None]  # [B, R] bool
    out = decode_attention(qk, kq, vq, ek, ev, extra, start, scaling)
    return hadamard(out) if vspec.hadamard else out


def _packed(g: HeadGroup, layer: Any) -> tuple[Any, Any]:
    """The group's quantized part as the kernel's ``(PackedKeys, PackedValues)``, built (and validated) once
    per change of the stores: a flush, a regrowth or a batch reorder changes a buffer or its length."""
    from kvtune.kernels.packed import PackedKeys, PackedValues

    key = tuple((id(b.data), b.n) for st in (g.keys, g.values) for b in st.buffers.values())
    memo = getattr(g, "_kernel_packed", None)
    if memo is not None and memo[0] == key and key:
        return memo[1]
    kspec, vspec = g.plan.key, g.plan.value
    kf, vf = _fields(g.keys, layer, g, "key"), _fields(g.values, layer, g, "value")
    packed = (PackedKeys(kf["codes"], kf["scale"], kf["zero"], kspec.bits, kspec.group),
              PackedValues(vf["codes"], vf["scale"], vf["zero"], vspec.bits, vspec.group))
    g._kernel_packed = (key, packed)
    return packed


def _fields(store: Any, layer: Any, g: HeadGroup, which: str) -> dict[str, torch.Tensor]:
    """The store's packed fields, or empty stand-ins with the right trailing shapes before any flush."""
    if store:
        return store.fields()
    from kvtune.quant.ops import packed_width

    spec, b, h, d = getattr(g.plan, which), layer.win_k.shape[0], len(g.heads), layer.head_dim
    dev = layer.win_k.device
    ng = d if which == "key" else math.ceil(d / min(spec.group or d, d))
    scale = torch.zeros(b, h, 0, ng, dtype=torch.float16, device=dev)
    return {"codes": torch.zeros(b, h, 0, packed_width(d, spec.bits), dtype=torch.uint8, device=dev),
            "scale": scale, "zero": scale.clone()}
