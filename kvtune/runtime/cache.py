"""``KVTuneCache``: a transformers ``Cache`` built from a :class:`~kvtune.plan.Plan`.

    plan = kvtune.load_plan("kvtune-plan")            # or a preset name, e.g. "kivi-2bit"
    cache = plan.cache(model)                        # == KVTuneCache(plan, model)
    model.generate(**inputs, past_key_values=cache)

Creating the cache binds the plan to the model (a plan made for another model is a
:class:`~kvtune.errors.KVTuneError` before anything runs) and switches the model's attention
implementation to ``"kvtune"`` (:func:`kvtune.runtime.attention.install`), which is plain SDPA for any
call that does not carry a kvtune cache. One :class:`~kvtune.runtime.layer.KVTuneLayer` per model layer.
"""

from __future__ import annotations

import logging
from typing import TYPE_CHECKING, Any

import torch
from transformers.cache_utils import Cache

from kvtune.errors import KVTuneError
from kvtune.plan_types import ModelIdentity
from kvtune.runtime.layer import KVTuneLayer

if TYPE_CHECKING:
    from kvtune.plan import Plan

log = logging.getLogger(__name__)
BACKENDS = ("auto", "reference", "triton")


def identity_of(model: Any) -> ModelIdentity:
    """The :class:`ModelIdentity` of a loaded model."""
    from kvtune.models import identity, model_identity

    return identity(model_identity(model))


class KVTuneCache(Cache):
    """Bit-packed KV cache following ``plan`` for ``model`` (see module docstring).

    Args:
        plan: a bound plan or a template (preset).
        model: the transformers causal LM the cache is used with.
        headroom: extra capacity when stores grow (default 0 on CPU, 12.5% on CUDA).
        backend: decode attention: ``"auto"`` (Triton kernel on CUDA where the specs allow, else
            PyTorch), ``"reference"`` (always PyTorch), ``"triton"`` (kernel wherever the specs allow,
            also on CPU under ``TRITON_INTERPRET=1``).
    """

    def __init__(self, plan: Plan, model: Any, headroom: float | None = None, backend: str = "auto") -> None:
        from kvtune.models import check_supported, decoder_layers
        from kvtune.runtime.attention import install

        check_supported(model)
        ident = identity_of(model)
        self.plan = plan.bind(ident)
        self.identity = ident
        layers = [KVTuneLayer(lp, ident.num_kv_heads, ident.head_dim, self.plan.layer_state(i), headroom, span)
                  for i, (lp, span) in enumerate(zip(self.plan.layers, ident.spans))]
        dropped = [i for i, (lp, span) in enumerate(zip(self.plan.layers, ident.spans))
                   if lp != lp.windowed(span)]
        if dropped:
            log.info("layers %s attend a window: their sink/salient/merge policies are off (global layers only)",
                     dropped)
        super().__init__(layers=layers)
        if backend not in BACKENDS:
            raise KVTuneError(f"unknown attention backend {backend!r}", f"use one of {', '.join(BACKENDS)}")
        if backend == "triton":
            from kvtune import kernels

            if not kernels.available():
                raise KVTuneError("backend 'triton' needs a CUDA GPU (or TRITON_INTERPRET=1) and triton",
                                  "use backend='auto' or 'reference'")
        from kvtune.token_types import TokenTypeFeed

        self.token_types = TokenTypeFeed()
        for layer in layers:
            layer.backend = backend
            layer.type_feed = self.token_types
        install(model)
        attn = [getattr(d, "self_attn", None) for d in (decoder_layers(model) or ())]
        if len(attn) == len(layers) and all(a is not None for a in attn):
            for layer, module in zip(layers, attn):
                layer.owner = id(module)

    @property
    def stepwise(self) -> bool:
        """Multi-token calls emulate token-by-token decoding (teacher-forced evaluation)."""
        return bool(self.layers) and self.layers[0].stepwise

    @stepwise.setter
    def stepwise(self, on: bool) -> None:
        for layer in self.layers:
            layer.stepwise = on

    def set_token_types(self, mask: Any, input_ids: torch.Tensor | None = None) -> None:
        """Token types (:mod:`kvtune.token_types`) of the tokens this cache receives next, from its current length on:
        ``mask`` int8 ``[B, T]`` (or names/codes, ``[T]`` or ``[B, T]``), checked against ``input_ids [B, T]``
        when given; later tokens are ``text``. ``None`` clears it. Only plans with ``salient.token_types`` use it."""
        from kvtune.token_types import as_mask

        self.token_types.set(None if mask is None else as_mask(mask, input_ids), self.get_seq_length())

    def nbytes(self, used: bool = False) -> int:
        """Bytes held by the cache's tensors (codes, scales, zeros, outliers, salient copies, fp16 tokens)."""
        return sum(layer.nbytes(used) for layer in self.layers)

    def token_counts(self, layer_idx: int = 0) -> dict[str, int]:
        """Stored tokens of one layer by kind (per head): sinks, quantized (held), window, merged, evicted
        (windowed layers), logical length."""
        layer = self.layers[layer_idx]
        if not layer.is_initialized:
            return {"sink": 0, "quantized": 0, "window": 0, "merged": 0, "evicted": 0, "length": 0}
        return {"sink": layer.sink_k.n, "quantized": layer.n_quant, "window": layer.win_k.shape[2],
                "merged": layer.merged, "evicted": layer.evicted, "length": layer.length}

    def get_seq_length(self, layer_idx: int = 0) -> int:
        return self.layers[layer_idx].get_seq_length() if self.layers else 0
