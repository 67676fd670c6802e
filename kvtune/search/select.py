"""A study's trials as plans: the Pareto front, the candidates to validate, a trial's plan with provenance and
calibrated tensors, and the report files. Everything here reads the study alone (its trials and user attributes),
so a study can be re-solved at another budget later, elsewhere; :mod:`kvtune.search.decide` chooses."""

from __future__ import annotations

import logging
import math
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import torch

from kvtune.errors import KVTuneError
from kvtune.plan import Plan, save_plan
from kvtune.plan_types import LayerPlan, ModelIdentity, Provenance
from kvtune.search.space import SearchSpace
from kvtune.search.state import state_tensors
from kvtune.search.storage import ATTR

log = logging.getLogger(__name__)

DEFAULT_MODEL = "smollm2-135m"


def pareto_front(trials: Sequence[Any], budget: float | None = None) -> list[Any]:
    """Non-dominated completed trials on (proxy, bits), within ``budget`` if given; lowest proxy first."""
    pts = sorted((t for t in trials if budget is None or t.values[1] <= budget),
                 key=lambda t: (t.values[0], t.values[1], t.number))
    front, least = [], math.inf
    for t in pts:
        if t.values[1] < least:
            front.append(t)
            least = t.values[1]
    return front


NEAR_BUDGET = 0.05  # validation candidates come first from trials within 5% of the budget
PROXY_SLACK = 2.0  # ... and none predicted more than twice as lossy as the best trial within the budget


def candidates(trials: Sequence[Any], budget: float, n: int) -> list[Any]:
    """The ``n`` distinct completed trials within ``budget`` to check end to end, lowest proxy first: first those
    within :data:`NEAR_BUDGET` of it (alternatives at about the same bits: where the proxy's ranking matters),
    then the rest (ties: more bits first, then the earlier trial); none whose proxy exceeds :data:`PROXY_SLACK`
    times the least (validation time goes to plans that can win). The first is the proxy's choice."""
    seen: set[tuple] = set()
    out: list[Any] = []
    near = budget * (1 - NEAR_BUDGET)
    fitting = [t for t in trials if t.values[1] <= budget]
    if not fitting:
        return out
    cap = PROXY_SLACK * min(t.values[0] for t in fitting)
    for t in sorted((t for t in fitting if t.values[0] <= cap),
                    key=lambda t: (t.values[1] < near, t.values[0], -t.values[1], t.number)):
        key = tuple(sorted(t.params.items()))
        if key not in seen:
            seen.add(key)
            out.append(t)
        if len(out) == n:
            break
    return out


def outlier_index_tensors(layers: Sequence[LayerPlan], outliers: Mapping[str, list],
                    num_kv_heads: int) -> dict[str, torch.Tensor]:
    """``layers.{i}.{key|value}.outlier_idx`` int16 ``[Hkv, o]``: each head's calibrated channels, most outlying
    first (a head whose spec keeps fewer uses the first ones), for layers with outlier specs."""
    tensors = {}
    for i, layer in enumerate(layers):
        for kind in ("key", "value"):
            specs = [getattr(h, kind) for h in layer.head_plans(num_kv_heads)]
            width = max(s.outliers for s in specs)
            if width and kind in outliers and any(s.outliers and not s.rotated for s in specs):
                rows = [row[:width] for row in outliers[kind][i]]
                tensors[f"layers.{i}.{kind}.outlier_idx"] = torch.tensor(rows, dtype=torch.int16)
    return tensors


def plan_for(space: SearchSpace, trial: Any, attrs: Mapping[str, Any], budget: float, study: str,
             extra: Mapping[str, str] = {}) -> Plan:
    """The bound plan of one trial, with provenance and calibrated outlier channels."""
    from kvtune import __version__

    layers = space.layers(trial.params)
    prov = Provenance(kvtune_version=__version__, source="kvtune search",
                      calibration_hash=str(attrs.get(f"{ATTR}calibration_hash", "")), study=study, trial=trial.number,
                      extra=tuple((k, str(v)) for k, v in {
                          "proxy": f"{trial.values[0]:.6g}", "space_hash": attrs[f"{ATTR}space_hash"],
                          "data_sha256": attrs.get(f"{ATTR}data_sha256", ""), "granularity": space.granularity,
                          **extra}.items()))
    return Plan(layers=layers, model=space.identity, name=f"search-{budget:g}bit",
                description=f"kvtune search: {space.granularity} plan within {budget:g} effective bits "
                            f"at {space.reference_length} tokens (study {study}, trial {trial.number})",
                budget=budget, reference_length=space.reference_length, provenance=prov,
                tensors={**outlier_index_tensors(layers, attrs.get(f"{ATTR}outliers", {}), space.identity.num_kv_heads),
                         **state_tensors(layers, {"key": space.key_candidates, "value": space.value_candidates},
                                         attrs.get(f"{ATTR}fitted", {}), space.identity.num_kv_heads,
                                         space.identity.head_dim)})


def validation_model(model: str | None, identity: ModelIdentity) -> tuple[str | None, str | None]:
    """``(model, None)`` to validate with, or ``(None, reason)``; a given model of another identity is an error."""
    from kvtune.models import load_identity

    name = model or DEFAULT_MODEL
    try:
        ident = load_identity(name)
    except KVTuneError as exc:
        if model is not None:
            raise
        return None, f"the embedded model {DEFAULT_MODEL} is not available ({exc})"
    problem = identity.mismatch(ident)
    if problem is None:
        return name, None
    if model is not None:
        raise KVTuneError(f"the study was made for another model than {model} ({problem.replace('plan', 'study')})",
                          "pass the calibrated model")
    return None, f"the calibrated model is not the embedded {DEFAULT_MODEL}: pass model= to validate"


def points_of(whole: list[Any], cands: list[Any], best: Any, budget: float,
            checked: Mapping[int, Mapping[str, float]]) -> tuple[list[dict[str, Any]], dict[str, Any]]:
    """Report points: the Pareto front and the validated candidates off it; and the winner's point."""
    on_front = {t.number for t in whole}
    points = [_point(t, budget, checked.get(t.number), t.number in on_front)
              for t in whole + [c for c in cands if c.number not in on_front]]
    return points, _point(best, budget, checked.get(best.number), best.number in on_front)


def _nan_last(x: float | None) -> float:
    return math.inf if x is None or not math.isfinite(x) else x


def _point(t: Any, budget: float, checked: Mapping[str, float] | None, pareto: bool) -> dict[str, Any]:
    p = {"trial": t.number, "proxy": t.values[0], "bits": t.values[1], "within_budget": t.values[1] <= budget,
         "pareto": pareto, "seed": t.user_attrs.get(f"{ATTR}seed")}
    if checked is not None:
        p.update(kl=checked["kl"], ppl=checked["ppl"], top1=checked["top1"], kl_tail=checked["kl_tail"])
    return p


def write_outputs(result: Any, out: str | Path, trials: list[tuple[float, float]], points: list[dict[str, Any]],
           winner: dict[str, Any], space: SearchSpace) -> dict[str, Path]:
    from kvtune.search.report import plot_bits, plot_pareto, write_pareto_json

    out = Path(out)
    save_plan(result.plan, out)
    data = {"budget": result.budget, "reference_length": space.reference_length, "study": result.study,
            "storage": result.storage, "min_bits": result.min_bits,
            "trials": {"total": result.trials_total, "complete": len(trials), "this_run": result.trials_run},
            "winner": winner, "front": points, "presets": list(result.presets), "validation": result.validation,
            "judgement": result.judgement,
            "spearman_proxy_vs_kl": result.spearman,
            "chosen_by": "validated KL" if result.kl is not None else "proxy"}
    files = {"plan": out / "plan.yaml", "pareto_json": write_pareto_json(out, data)}
    files["pareto_png"] = plot_pareto(out, trials, points, result.presets, winner, result.budget,
                                      space.reference_length)
    files["bits_png"] = plot_bits(out, result.plan)
    return files
