"""kvtune: calibrate, search and run mixed-precision, bit-packed KV caches for transformer LLMs.

Public API (imported lazily so that ``import kvtune`` touches neither CUDA, Triton nor Optuna)::

    plan = kvtune.load_plan("kivi-2bit")          # a plan directory or a preset name
    cache = plan.cache(model)                      # == kvtune.KVTuneCache(plan, model)
    model.generate(**inputs, past_key_values=cache)
"""

from __future__ import annotations

import importlib
from typing import Any

__version__ = "0.1.0"

_EXPORTS = {
    "KVTuneError": "kvtune.errors",
    "QuantSpec": "kvtune.quant.formats",
    "affine": "kvtune.quant.formats",
    "Plan": "kvtune.plan",
    "load_plan": "kvtune.plan",
    "save_plan": "kvtune.plan",
    "LayerPlan": "kvtune.plan_types",
    "HeadPlan": "kvtune.plan_types",
    "ModelIdentity": "kvtune.plan_types",
    "KVTuneCache": "kvtune.runtime.cache",
    "load_model": "kvtune.models",
    "calibrate": "kvtune.calibrate.run",
    "search": "kvtune.search.study",
}

# Written out (not computed) so that linters and IDEs can read it: the keys of _EXPORTS plus __version__, sorted.
__all__ = [
    "HeadPlan",
    "KVTuneCache",
    "KVTuneError",
    "LayerPlan",
    "ModelIdentity",
    "Plan",
    "QuantSpec",
    "__version__",
    "affine",
    "calibrate",
    "load_model",
    "load_plan",
    "save_plan",
    "search",
]


def __getattr__(name: str) -> Any:
    if name in _EXPORTS:
        return getattr(importlib.import_module(_EXPORTS[name]), name)
    raise AttributeError(f"module 'kvtune' has no attribute {name!r}")


def __dir__() -> list[str]:
    return __all__
