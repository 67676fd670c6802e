"""Choosing between searched plans and baselines by measurement: never worse than a baseline.

1. Every candidate (the searched plans and the baselines within the budget) runs at the first fidelity of the
   schedule (:mod:`kvtune.search.halving`) on held-out text.
2. The proxy's correction (:mod:`kvtune.search.correction`) is fitted on those points; the completed trials the
   corrected proxy now ranks best, not yet run, and the points a search with the corrected proxy finds (added
   to the study), join the first fidelity (the proxy refitted as points arrive).
3. Successive halving up to the reference length; the best baseline and the best searched plan always reach
   the last fidelity. The plan with the least KL there wins, whichever kind it is.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch

from kvtune.plan import Plan
from kvtune.search import correction
from kvtune.search.halving import Schedule, reference_logits, successive_halving
from kvtune.search.validate import spearman, validate_plans

EXTRA = 3  # trials the corrected proxy adds to the first fidelity


@dataclass(frozen=True)
class Entry:
    """One candidate: ``kind`` ``searched`` (``trial``: its Optuna trial) or a baseline kind."""

    name: str
    kind: str
    plan: Plan
    bits: float
    proxy: float | None
    parts: tuple[float, float, float] | None
    trial: Any = None

    @property
    def searched(self) -> bool:
        return self.kind == "searched"


@dataclass
class Judgement:
    """What validation measured and decided (``winner``/``best_baseline``: indices into ``entries``)."""

    entries: list[Entry]
    stages: list[dict[str, Any]] = field(default_factory=list)
    latest: list[dict[str, float]] = field(default_factory=list)  # per entry: its longest run
    winner: int = 0
    best_baseline: int | None = None
    coef: tuple[float, float] = (1.0, 1.0)
    spearman_raw: float | None = None
    spearman_heldout: float | None = None


def _kl(r: dict[str, float]) -> float:
    return r["kl"] if math.isfinite(r.get("kl", math.nan)) else math.inf


def _best(entries: Sequence[Entry], latest: Sequence[dict[str, float]], searched: bool) -> int | None:
    """The entry of that kind with the least KL at its longest run (longer runs first)."""
    pool = [i for i, e in enumerate(entries) if e.searched == searched and latest[i]]
    return min(pool, key=lambda i: (-latest[i].get("length", 0), _kl(latest[i]), i)) if pool else None


def judge(model: Any, entries: list[Entry], pool: Sequence[Entry], ids: torch.Tensor, schedule: Schedule,
          on_plan: Callable[[], None] | None = None,
          propose: Callable[[tuple[float, float]], list[Entry]] | None = None) -> Judgement:
    """Steps 1-3 of the module doc; ``pool``: more searched entries the corrected proxy may add; ``propose``:
    new searched entries from the corrected proxy (its coefficients in, entries out)."""
    tick = (lambda *_: on_plan()) if on_plan is not None else None
    first = schedule.fidelities[0]
    x = ids[: first.sequences, : first.length]
    j = Judgement(list(entries))
    reference = reference_logits(model, ids, schedule)
    info, res = validate_plans(model, [e.plan for e in j.entries], x, first.chunk, tick, reference)
    seconds = info["seconds"]
    j.latest = [{**r, "length": first.length} for r in res]
    fit_on = [i for i, e in enumerate(j.entries) if e.parts is not None]
    j.coef = correction.choose([j.entries[i].parts for i in fit_on], [_kl(j.latest[i]) for i in fit_on])
    taken = {e.name for e in j.entries}
    extra = sorted((e for e in pool if e.parts is not None and e.name not in taken),
                   key=lambda e: correction.predict(e.parts, j.coef))[:EXTRA]
    if propose is not None:
        extra += [e for e in propose(j.coef) if e.name not in taken and all(e.name != x.name for x in extra)]
    if extra:
        info, res = validate_plans(model, [e.plan for e in extra], x, first.chunk, tick, reference)
        seconds += info["seconds"]
        j.entries += extra
        j.latest += [{**r, "length": first.length} for r in res]
    fit_on = [i for i, e in enumerate(j.entries) if e.parts is not None]
    parts, kls = [j.entries[i].parts for i in fit_on], [_kl(j.latest[i]) for i in fit_on]
    j.spearman_raw = spearman([sum(p) for p in parts], kls)
    j.spearman_heldout = correction.held_out_spearman(parts, kls)
    j.stages.append({"fidelity": first.length, "entries": list(range(len(j.entries))),
                     "kl": [_kl(r) for r in j.latest], "seconds": round(seconds, 2)})
    if len(schedule.fidelities) > 1:
        _halve(model, j, ids, schedule, tick, reference)
    j.best_baseline = _best(j.entries, j.latest, searched=False)
    finalists = [i for i, r in enumerate(j.latest) if r.get("length") == max(r.get("length", 0) for r in j.latest)]
    j.winner = min(finalists, key=lambda i: (_kl(j.latest[i]), not j.entries[i].searched, i))
    return j


def _halve(model: Any, j: Judgement, ids: torch.Tensor, schedule: Schedule, tick: Any,
           reference: torch.Tensor) -> None:
    """The rest of the schedule over the first fidelity's best, protecting the best of each kind."""
    ranked = sorted(range(len(j.entries)), key=lambda i: (_kl(j.latest[i]), i))
    keep = set(ranked[: schedule.keep[0]])
    keep |= {i for i in (_best(j.entries, j.latest, True), _best(j.entries, j.latest, False)) if i is not None}
    alive = sorted(keep)

    def protect(latest: list[dict[str, float]]) -> set[int]:
        sub = [j.entries[i] for i in alive]
        return {i for i in (_best(sub, latest, True), _best(sub, latest, False)) if i is not None}

    rest = Schedule(schedule.fidelities[1:], schedule.keep[1:])
    stages, _ = successive_halving(model, [j.entries[i].plan for i in alive], ids, rest, protect, tick, reference)
    for stage in stages:
        for local, r in zip(stage["plans"], stage["results"]):
            j.latest[alive[local]] = {**r, "length": stage["fidelity"]["length"]}
        j.stages.append({"fidelity": stage["fidelity"]["length"], "entries": [alive[p] for p in stage["plans"]],
                         "kl": [_kl(r) for r in stage["results"]], "seconds": round(stage["seconds"], 2)})
