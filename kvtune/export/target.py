"""What a serving engine can express, and the engine configuration nearest to a kvtune plan.

A :class:`Target` lists its :class:`Choice` s -- what the engine stores for K and V under one of its names (a cache
dtype, a ``-ctk`` type), each emulated by kvtune specs -- and how choices may vary over layers (:data:`LAYOUTS`):

* ``uniform``: one choice for every layer (compressed-tensors, SGLang); ``split`` targets choose K and V apart
  (llama.cpp ``-ctk`` / ``-ctv``);
* ``skip``: one choice, some layers left at the model dtype (vLLM ``--kv-cache-dtype-skip-layers``);
* ``per_layer``: any choice per layer (ModelOpt's per-layer map).

An :class:`EngineConfig` is per layer the choice name of K and of V (:data:`AUTO`: the model dtype).
:func:`nearest` finds the configuration that stores exactly the plan, or else the cheapest (by the bit
accountant) that keeps every layer's K and V at least as many code bits as the plan ("round up").
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, ClassVar

from kvtune.plan_types import LayerPlan, ModelIdentity
from kvtune.quant.bits import REFERENCE_LENGTH, layers_bits
from kvtune.quant.formats import FP16, QuantSpec

AUTO = "auto"
LAYOUTS = ("uniform", "skip", "per_layer")
ROLES = ("key", "value")


@dataclass(frozen=True)
class Choice:
    """One engine storage name and the kvtune specs that store bit for bit what the engine stores."""

    name: str
    key: QuantSpec
    value: QuantSpec
    note: str = ""

    def spec(self, role: str) -> QuantSpec:
        return self.key if role == "key" else self.value


MODEL_DTYPE = Choice(AUTO, FP16, FP16, "the model dtype (no KV quantization)")


@dataclass(frozen=True)
class EngineConfig:
    """Per layer the choice name of K and of V; ``options``: target settings (e.g. scale strategy)."""

    target: str
    key: tuple[str, ...]
    value: tuple[str, ...]
    options: tuple[tuple[str, str], ...] = field(default=())

    def __post_init__(self) -> None:
        if len(self.key) != len(self.value) or not self.key:
            raise ValueError("an engine configuration names K and V choices for every layer")

    def option(self, name: str, default: str = "") -> str:
        return dict(self.options).get(name, default)

    def quantized(self) -> tuple[str, ...]:
        """The distinct non-model-dtype choice names, in layer order."""
        return tuple(dict.fromkeys(n for n in (*self.key, *self.value) if n != AUTO))

    def skipped(self) -> tuple[int, ...]:
        return tuple(i for i, (k, v) in enumerate(zip(self.key, self.value)) if k == AUTO and v == AUTO)


class Target:
    """Base class of an export target (one module per engine under :mod:`kvtune.export`)."""

    name: ClassVar[str] = ""
    layout: ClassVar[str] = "uniform"
    split: ClassVar[bool] = False  # K and V chosen independently
    choices: ClassVar[tuple[Choice, ...]] = ()
    description: ClassVar[str] = ""

    # -- what it expresses ---------------------------------------------------------------------------
    def choice(self, name: str) -> Choice:
        for c in (MODEL_DTYPE, *self.choices):
            if c.name == name:
                return c
        raise KeyError(name)

    def forced_skips(self, choice: Choice, identity: ModelIdentity) -> set[int]:
        """Layers the engine keeps at the model dtype whatever the flags say (vLLM TurboQuant's boundary)."""
        return set()

    def layers(self, config: EngineConfig) -> tuple[LayerPlan, ...]:
        """The kvtune layers storing what the engine stores under ``config``."""
        return tuple(LayerPlan(key=self.choice(k).key, value=self.choice(v).value)
                     for k, v in zip(config.key, config.value))

    def options_for(self, layers: Sequence[LayerPlan]) -> tuple[tuple[str, str], ...]:
        """Target settings implied by the engine layers (e.g. per-head scales)."""
        return ()

    def candidates(self, identity: ModelIdentity, need: Sequence[tuple[float, float]]) -> list[EngineConfig]:
        """Configurations keeping layer ``i`` at >= ``need[i]`` (key, value) code bits, per :data:`LAYOUTS`."""
        n, out = identity.num_layers, []
        ok = lambda c, i, role: c.spec(role).bits >= need[i][ROLES.index(role)]
        if self.layout == "uniform":
            pairs = [(k, v) for k in self.choices for v in self.choices] if self.split else \
                [(c, c) for c in self.choices]
            for kc, vc in pairs:
                if all(ok(kc, i, "key") and ok(vc, i, "value") for i in range(n)):
                    out.append(self._config([kc.name] * n, [vc.name] * n))
        elif self.layout == "skip":
            for c in self.choices:
                forced = self.forced_skips(c, identity)
                names = [c.name if i not in forced and ok(c, i, "key") and ok(c, i, "value") else AUTO
                         for i in range(n)]
                out.append(self._config(names, names))
        else:
            names = []
            for i in range(n):
                fits = [c for c in self.choices if ok(c, i, "key") and ok(c, i, "value")]
                names.append(min(fits, key=lambda c: _pair_bits(c, identity)).name if fits else AUTO)
            out.append(self._config(names, names))
        return out

    def _config(self, key: Sequence[str], value: Sequence[str]) -> EngineConfig:
        return EngineConfig(self.name, tuple(key), tuple(value))

    # -- files ---------------------------------------------------------------------------------------
    def write(self, job: Any) -> list[Path]:
        """Write what the engine loads for ``job`` (:class:`kvtune.export.run.Job`); the files written."""
        raise NotImplementedError

    def read(self, out: Path, identity: ModelIdentity) -> tuple[EngineConfig, dict[str, Any]]:
        """The engine configuration in ``out`` and its scale state as plan tensors (what the engine would load)."""
        raise NotImplementedError


def _pair_bits(c: Choice, identity: ModelIdentity) -> float:
    return layers_bits([LayerPlan(key=c.key, value=c.value)], identity.num_kv_heads, identity.head_dim).total


def code_bits(layer: LayerPlan, role: str, num_kv_heads: int) -> float:
    """The most code bits any head of ``layer`` spends on ``role`` (fp16: 16)."""
    return max(getattr(h, role).bits for h in layer.head_plans(num_kv_heads))


def nearest(target: Target, layers: Sequence[LayerPlan], identity: ModelIdentity,
            length: int = REFERENCE_LENGTH) -> tuple[EngineConfig, bool]:
    """``(config, exact)``: the configuration storing exactly ``layers``, else the cheapest round-up (None-free:
    the model dtype everywhere is always a last resort for ``skip`` / ``per_layer`` targets)."""
    need = [(code_bits(layer, "key", identity.num_kv_heads), code_bits(layer, "value", identity.num_kv_heads))
            for layer in layers]
    cands = target.candidates(identity, need)
    for c in cands:
        if target.layers(c) == tuple(layers):
            return _with_options(target, c), True
    if not cands:
        from kvtune.errors import KVTuneError

        top = max(max(k, v) for k, v in need)  # only uniform targets without the model dtype get here
        raise KVTuneError(f"{target.name} cannot store this plan: it keeps {top:g}-bit K/V in some layer and "
                          f"{target.name} offers at most {max(c.key.bits for c in target.choices):g} bits; the "
                          f"nearest expressible configuration is no KV-cache quantization (the model dtype in "
                          f"every layer)", f"serve the model as it is, export to vllm, modelopt or llama.cpp "
                          f"(they keep layers at the model dtype), or search with --target {target.name}")
    bits = [layers_bits(target.layers(c), identity.num_kv_heads, identity.head_dim, length).effective for c in cands]
    best = cands[min(range(len(cands)), key=lambda j: (round(bits[j], 3), j))]  # calibrated state alone: a tie
    return _with_options(target, best), False


def _with_options(target: Target, config: EngineConfig) -> EngineConfig:
    return EngineConfig(config.target, config.key, config.value, target.options_for(target.layers(config)))


def describe(target: Target, config: EngineConfig) -> str:
    """One line: the choices and the layers they cover, e.g. ``turboquant_3bit_nc; layers 0-1, 28-29 auto``."""
    runs: dict[str, list[int]] = {}
    for i, (k, v) in enumerate(zip(config.key, config.value)):
        runs.setdefault(k if k == v else f"K {k} / V {v}", []).append(i)
    if len(runs) == 1:
        return next(iter(runs))
    main = max(runs, key=lambda name: len(runs[name]))
    rest = "; ".join(f"layers {_spans(ls)} {name}" for name, ls in runs.items() if name != main)
    return f"{main}; {rest}"


def _spans(indices: Sequence[int]) -> str:
    out, start = [], indices[0]
    for a, b in zip(indices, [*indices[1:], None]):
        if b != a + 1:
            out.append(str(start) if start == a else f"{start}-{a}")
            start = b
    return ",".join(out)
