"""Methods compared by ``kvtune eval`` / ``kvtune bench``: a plan, preset plans, transformers' QuantizedCache.

Every row of a comparison is a :class:`Method`: it makes a fresh cache for a model, says how many bits it
stores per K/V element, how many bytes a live cache holds, and produces teacher-forced logits through its
own cache. Methods are looked up by name in :data:`BASELINES` (a registry, no if/elif):

* every preset plan in ``kvtune/configs`` (``fp16``, ``kivi-2bit``, ``kivi-4bit``, ``kv8``, ``k8v4``, ``kv4``,
  ``k4v2``, ``kv2``): run through kvtune's own runtime (``KVTuneCache``), bits from the bit accountant;
* ``hf-dynamic``: transformers' uncompressed ``DynamicCache`` (the speed reference);
* ``hf-quanto-{2,4}bit`` / ``hf-hqq-{2,4}bit``: transformers' ``QuantizedCache`` with its default layout
  (``axis_key = axis_value = 0``, ``q_group_size=64``, ``residual_length=128``), its own update path (it
  dequantizes the whole history on every step and re-quantizes it on each residual flush).

Effective bits of a ``QuantizedCache`` are computed by hand (:func:`quantized_cache_bits`), with the same
conventions as kvtune's accountant (scales, zero-points and full-precision tokens counted at 16 bits, as
deployed in fp16; the live cache on a float32 CPU model holds them at 32 bits, which ``cache_bytes`` shows).
With axis 0 both backends form groups of ``q_group_size`` consecutive elements of the flattened
``[B, H, T, D]`` state (quanto; hqq strides them), i.e. per token when ``D == q_group_size`` (SmolLM2:
D = 64): one scale and one zero-point per 64 elements -> ``nbits + 32/64`` bits per quantized element.
The fp16 residual holds ``(L - 1) % residual_length`` tokens after ``L`` single-token updates (the first
update quantizes everything; a flush moves the whole residual into the quantized store). Teacher-forced logits
of a ``QuantizedCache`` are exact token-by-token numbers (:meth:`HFQuantizedMethod.teacher_forced`).
"""

from __future__ import annotations

import logging
from abc import ABC, abstractmethod
from collections.abc import Callable
from dataclasses import dataclass
from functools import cache, partial
from typing import Any

import torch

from kvtune.errors import KVTuneError
from kvtune.plan import Plan, load_plan, preset_names
from kvtune.plan_types import ModelIdentity
from kvtune.quant.bits import REFERENCE_LENGTH

log = logging.getLogger(__name__)

FP_BITS = 16


@dataclass
class Method(ABC):
    """One row of a comparison."""

    name: str
    description: str = ""
    is_plan: bool = False

    def unavailable(self) -> str | None:
        """Why this method cannot run here (one line), or None."""
        return None

    def reference_length(self) -> int:
        """The length at which this method's effective bits are quoted."""
        return REFERENCE_LENGTH

    @abstractmethod
    def new_cache(self, model: Any) -> Any:
        """A fresh, empty transformers ``Cache`` for ``model``."""

    @abstractmethod
    def effective_bits(self, identity: ModelIdentity, length: int) -> float:
        """Stored bits per logical K/V element at ``length`` tokens."""

    @abstractmethod
    def cache_bytes(self, cache: Any) -> int:
        """Bytes of K/V state a live cache holds (measured on the tensors)."""

    @abstractmethod
    def teacher_forced(self, model: Any, input_ids: torch.Tensor, chunk: int, prefill: int) -> torch.Tensor:
        """Logits ``[B, T, V]`` float32 of ``input_ids [B, T]`` fed ``chunk`` tokens at a time through the cache."""


@dataclass
class PlanMethod(Method):
    """A kvtune plan (or preset) run through ``KVTuneCache``."""

    plan: Plan | None = None

    def reference_length(self) -> int:
        assert self.plan is not None
        return self.plan.reference_length

    def bound(self, identity: ModelIdentity) -> Plan:
        assert self.plan is not None
        return self.plan.bind(identity)

    def new_cache(self, model: Any) -> Any:
        return self.bound(identity_of(model)).cache(model)

    def effective_bits(self, identity: ModelIdentity, length: int) -> float:
        return self.bound(identity).effective_bits(length)

    def cache_bytes(self, cache: Any) -> int:
        return int(cache.nbytes())

    def teacher_forced(self, model: Any, input_ids: torch.Tensor, chunk: int, prefill: int) -> torch.Tensor:
        from kvtune.runtime import teacher_forced_logits

        plan = self.bound(identity_of(model))
        return teacher_forced_logits(model, plan, input_ids, chunk=chunk, prefill=prefill).float()


@dataclass
class HFQuantizedMethod(Method):
    """transformers' ``QuantizedCache`` with a quantization backend (``quanto`` or ``hqq``)."""

    backend: str = "quanto"
    nbits: int = 4
    group: int = 64
    residual: int = 128

    def unavailable(self) -> str | None:
        return _probe_backend(self.backend, self.nbits, self.group, self.residual)

    def new_cache(self, model: Any) -> Any:
        from transformers import QuantizedCache

        return QuantizedCache(backend=self.backend, config=model.config, nbits=self.nbits,
                              q_group_size=self.group, residual_length=self.residual)

    def effective_bits(self, identity: ModelIdentity, length: int) -> float:
        return quantized_cache_bits(self.nbits, self.group, self.residual, length)

    def cache_bytes(self, cache: Any) -> int:
        return sum(tensor_bytes((layer.keys, layer.values, layer._quantized_keys, layer._quantized_values))
                   for layer in cache.layers)

    def teacher_forced(self, model: Any, input_ids: torch.Tensor, chunk: int, prefill: int) -> torch.Tensor:
        """Token-by-token semantics, whatever ``chunk``: the first update (``prefill`` tokens, or one) is
        quantized; each later forward of ``residual`` tokens ends exactly where decoding one token at a time
        flushes the fp residual, and inside it every query sees the same tensors as in decoding."""
        from kvtune.runtime import teacher_forced_logits

        return teacher_forced_logits(model, self.new_cache(model), input_ids, chunk=self.residual,
                                     prefill=max(prefill, 1))


@dataclass
class DynamicMethod(Method):
    """transformers' ``DynamicCache``: the uncompressed baseline of speed runs (16 bits by the fp16 convention)."""

    def new_cache(self, model: Any) -> Any:
        from transformers import DynamicCache

        return DynamicCache(config=model.config)

    def effective_bits(self, identity: ModelIdentity, length: int) -> float:
        return float(FP_BITS)

    def cache_bytes(self, cache: Any) -> int:
        return sum(tensor_bytes((layer.keys, layer.values)) for layer in cache.layers)

    def teacher_forced(self, model: Any, input_ids: torch.Tensor, chunk: int, prefill: int) -> torch.Tensor:
        from kvtune.runtime import teacher_forced_logits

        return teacher_forced_logits(model, self.new_cache(model), input_ids, chunk=chunk, prefill=prefill)


def quantized_cache_bits(nbits: int, group: int, residual: int, length: int, param_bits: int = FP_BITS) -> float:
    """Effective bits of transformers' ``QuantizedCache`` after ``length`` single-token updates.

    Quantized elements cost ``nbits`` plus a scale and a zero-point (``param_bits`` each) per ``group``
    elements; the ``(length - 1) % residual`` residual tokens cost 16 bits an element.
    """
    if length < 1:
        raise ValueError("length must be >= 1")
    window = (length - 1) % residual
    quantized = length - window
    per_q = nbits + 2 * param_bits / group
    return (quantized * per_q + window * FP_BITS) / length


def tensor_bytes(obj: Any) -> int:
    """Bytes of every tensor reachable in ``obj`` (tuples, lists, dicts, tensor subclasses via
    ``__tensor_flatten__``, e.g. quanto's packed tensors, and the attributes of hqq/optimum objects); other
    non-tensors count 0. Shared storage is not de-duplicated."""
    if isinstance(obj, torch.Tensor):
        flatten = getattr(obj, "__tensor_flatten__", None)
        if flatten is not None and type(obj) is not torch.Tensor and not isinstance(obj, torch.nn.Parameter):
            names, _ = flatten()
            return sum(tensor_bytes(getattr(obj, n)) for n in names)
        return obj.numel() * obj.element_size()
    if isinstance(obj, (tuple, list)):
        return sum(tensor_bytes(o) for o in obj)
    if isinstance(obj, dict):
        return sum(tensor_bytes(o) for o in obj.values())
    if hasattr(obj, "__dict__") and type(obj).__module__.split(".")[0] in ("hqq", "optimum"):
        return tensor_bytes(vars(obj))
    return 0


@cache
def _probe_backend(backend: str, nbits: int, group: int, residual: int) -> str | None:
    """Build one ``QuantizedCache`` layer and round-trip a small tensor; the failure as one line."""
    try:
        from transformers import QuantizedCache
        from transformers.models.llama import LlamaConfig

        config = LlamaConfig(hidden_size=128, num_attention_heads=2, num_key_value_heads=2, num_hidden_layers=1,
                             intermediate_size=64, vocab_size=16)
        cache = QuantizedCache(backend=backend, config=config, nbits=nbits, q_group_size=group,
                               residual_length=residual)
        x = torch.randn(1, 2, 4, 64)
        cache.update(x, x, 0)
        k, _ = cache.update(x[:, :, :1], x[:, :, :1], 0)
        if k.shape[-2] != 5:
            return f"QuantizedCache({backend}) returned {k.shape[-2]} tokens instead of 5"
    except Exception as exc:  # any failure of an optional backend becomes the row's reason
        first = (str(exc).strip().splitlines() or [type(exc).__name__])[0]
        return f"transformers QuantizedCache backend '{backend}' unavailable: {first[:160]}"
    return None


def identity_of(model: Any) -> ModelIdentity:
    """:class:`ModelIdentity` of a loaded model."""
    from kvtune.models import identity, model_identity

    return identity(model_identity(model))


def _preset(name: str) -> Method:
    plan = load_plan(name)
    return PlanMethod(name=name, description=plan.description, plan=plan)


def _hf(backend: str, nbits: int) -> Method:
    return HFQuantizedMethod(name=f"hf-{backend}-{nbits}bit", backend=backend, nbits=nbits,
                             description=f"transformers QuantizedCache({backend}), {nbits}-bit, axis 0, group 64, "
                                         "residual 128")


def _registry() -> dict[str, Callable[[], Method]]:
    reg: dict[str, Callable[[], Method]] = {name: partial(_preset, name) for name in sorted(preset_names())}
    reg["hf-dynamic"] = partial(DynamicMethod, name="hf-dynamic",
                                description="transformers DynamicCache (no compression)")
    for backend in ("quanto", "hqq"):
        for nbits in (4, 2):
            reg[f"hf-{backend}-{nbits}bit"] = partial(_hf, backend, nbits)
    return reg


BASELINES: dict[str, Callable[[], Method]] = _registry()
DEFAULT_BASELINES = ("fp16", "kivi-2bit", "kivi-4bit", "kv4", "k4v2", "hf-quanto-4bit")


def get_baseline(name: str) -> Method:
    """The baseline registered as ``name``; unknown names are a :class:`KVTuneError` listing valid ones."""
    factory = BASELINES.get(name.strip())
    if factory is None:
        raise KVTuneError(f"unknown baseline {name.strip()!r}", f"valid baselines: {', '.join(BASELINES)}")
    return factory()


def resolve_baselines(names: list[str] | tuple[str, ...]) -> list[Method]:
    """Baselines by name, in order, duplicates dropped."""
    seen: dict[str, Method] = {}
    for name in names:
        if name.strip() and name.strip() not in seen:
            seen[name.strip()] = get_baseline(name)
    return list(seen.values())


def plan_method(plan: str | Plan) -> Method:
    """The highlighted row: a plan directory, a preset name, or a :class:`Plan`."""
    loaded = plan if isinstance(plan, Plan) else load_plan(plan)
    name = loaded.name or (str(plan) if not isinstance(plan, Plan) else "plan")
    return PlanMethod(name=name, description=loaded.description, is_plan=True, plan=loaded)
