"""What a search reports: progress events and the result (shared by :mod:`~kvtune.search.study` and
:mod:`~kvtune.search.select`)."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any


@dataclass(frozen=True)
class SearchProgress:
    """One progress report: ``stage`` ``"trials"`` (``done``/``total`` trials of this run, best proxy and its
    bits within the budget so far), ``"validate"`` (plans checked end to end) or ``"done"``."""

    stage: str
    done: int
    total: int
    best_proxy: float | None = None
    best_bits: float | None = None


@dataclass(frozen=True)
class SearchResult:
    """The chosen plan and how it was found (``front``: Pareto points within the budget, plus the validated
    candidates off the front (``pareto: False``), lowest proxy first; ``trial`` -1: a baseline won)."""

    plan: Any
    budget: float
    effective_bits: float
    proxy: float
    kl: float | None
    trial: int
    study: str
    storage: str
    trials_total: int
    trials_run: int
    min_bits: float
    front: tuple[dict[str, Any], ...]
    presets: tuple[dict[str, Any], ...]
    validation: dict[str, Any] | None
    spearman: float | None
    out: Path | None = None
    judgement: dict[str, Any] | None = None  # validated entries (searched and baselines), stages, correction
    files: dict[str, Path] = field(default_factory=dict)
    seconds: dict[str, float] = field(default_factory=dict)
