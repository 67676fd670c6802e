"""kvtune.search: per-layer/per-head K/V quantization plans under a bit budget, from calibration tables.

``search(calib_dir, budget, out, ...)`` runs (or resumes) an Optuna study over a pruned, grouped space,
validates the best Pareto points end to end and saves the plan; ``resolve(storage, study, budget)``
re-chooses from an existing study. Optuna and matplotlib are imported only when used.
"""

from __future__ import annotations

import importlib
from typing import Any

_EXPORTS = {
    "search": "kvtune.search.study",
    "resolve": "kvtune.search.study",
    "SearchResult": "kvtune.search.study",
    "SearchProgress": "kvtune.search.study",
    "SAMPLERS": "kvtune.search.study",
    "parse_budget": "kvtune.search.budget",
    "CalibrationTables": "kvtune.search.tables",
    "load_tables": "kvtune.search.tables",
    "Schedule": "kvtune.search.halving",
    "Fidelity": "kvtune.search.halving",
    "GRANULARITIES": "kvtune.search.space",
    "DEFAULT_GROUPS": "kvtune.search.space",
    "DEFAULT_STUDY": "kvtune.search.storage",
}

__all__ = ["DEFAULT_GROUPS", "DEFAULT_STUDY", "GRANULARITIES", "SAMPLERS", "CalibrationTables", "Fidelity",
           "Schedule", "SearchProgress", "SearchResult", "load_tables", "parse_budget", "resolve", "search"]


def __getattr__(name: str) -> Any:
    if name in _EXPORTS:
        return getattr(importlib.import_module(_EXPORTS[name]), name)
    raise AttributeError(f"module 'kvtune.search' has no attribute {name!r}")
