"""Choosing the plan from a study at a budget: Pareto front, end-to-end check, plan with provenance, outputs.

Everything here reads the study alone (its trials and user attributes), so a study can be re-solved at
another budget later, elsewhere, without the calibration.
"""

from __future__ import annotations

import logging
import math
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import replace
from pathlib import Path
from typing import Any

import torch

from kvtune.errors import KVTuneError
from kvtune.plan import Plan, load_plan, save_plan
from kvtune.plan_types import LayerPlan, ModelIdentity, Provenance
from kvtune.search.results import SearchProgress, SearchResult
from kvtune.search.space import SearchSpace
from kvtune.search.state import state_tensors
from kvtune.search.storage import ATTR
from kvtune.search.validate import ValidationSettings, spearman, validate_plans, validation_ids

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


def candidates(trials: Sequence[Any], budget: float, n: int) -> list[Any]:
    """The ``n`` distinct completed trials within ``budget`` to check end to end, lowest proxy first: first those
    within :data:`NEAR_BUDGET` of it (alternatives at about the same bits: where the proxy's ranking matters),
    then the rest (ties: more bits first, then the earlier trial). The first is the proxy's choice."""
    seen: set[tuple] = set()
    out = []
    near = budget * (1 - NEAR_BUDGET)
    for t in sorted((t for t in trials if t.values[1] <= budget),
                    key=lambda t: (t.values[1] < near, t.values[0], -t.values[1], t.number)):
        key = tuple(sorted(t.params.items()))
        if key not in seen:
            seen.add(key)
            out.append(t)
        if len(out) == n:
            break
    return out


def outlier_tensors(layers: Sequence[LayerPlan], outliers: Mapping[str, list],
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
                tensors={**outlier_tensors(layers, attrs.get(f"{ATTR}outliers", {}), space.identity.num_kv_heads),
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


def _validate(plans: list[Plan], presets: list[Plan], attrs: Mapping[str, Any], model: str | None,
              settings: ValidationSettings, identity: ModelIdentity,
              progress: Callable[[Any], None] | None) -> tuple[dict[str, Any], list[dict[str, float]]]:
    from kvtune.models import load_model

    name, reason = validation_model(model, identity)
    if name is None:
        log.warning("end-to-end validation skipped: %s", reason)
        return {"skipped": reason}, []
    net, tokenizer = load_model(name)
    source = str(attrs.get(f"{ATTR}data_source") or "pydoc:calib")
    try:
        ids = validation_ids(tokenizer, source, settings)
    except KVTuneError as exc:
        log.warning("calibration text %s unavailable (%s): validating on pydoc:calib", source, exc)
        source, ids = "pydoc:calib", validation_ids(tokenizer, "pydoc:calib", settings)
    total = len(plans) + len(presets)

    def on_plan(i: int) -> None:
        if progress is not None:
            progress(SearchProgress("validate", i + 1, total))

    with torch.inference_mode():
        info, results = validate_plans(net, plans + presets, ids, settings.chunk, on_plan)
    return {**info, "model": name, "text": source}, results


def _end_to_end(cands: list[Any], plans: list[Plan], presets: list[dict[str, Any]], budget: float,
                attrs: Mapping[str, Any], model: str | None, settings: ValidationSettings, space: SearchSpace,
                progress: Callable[[Any], None] | None) -> tuple[dict[str, Any], dict[int, dict], float | None]:
    """Validate the candidates (and the presets within the budget, whose dicts get ``kl``/``ppl``).

    Returns ``(info, trial number -> metrics, Spearman of proxy vs KL)``.
    """
    fitting = [p for p in presets if p["bits"] <= budget]
    preset_plans = [load_plan(p["name"]).bind(space.identity) for p in fitting]
    info, results = _validate(plans, preset_plans, attrs, model, settings, space.identity, progress)
    if not results:
        return info, {}, None
    for p, r in zip(fitting, results[len(plans):]):
        p.update(kl=r["kl"], ppl=r["ppl"])
    checked = {t.number: r for t, r in zip(cands, results)}
    with_proxy = [p for p in fitting if p.get("proxy") is not None]
    pairs = [(t.values[0], r["kl"]) for t, r in zip(cands, results)] + [(p["proxy"], p["kl"]) for p in with_proxy]
    pairs = [(x, y) for x, y in pairs if math.isfinite(y)]  # a plan the runtime could not run has NaN
    rho = spearman([x for x, _ in pairs], [y for _, y in pairs])
    info.update(spearman=rho, spearman_points=len(pairs), results=results[: len(plans)])
    return info, checked, rho


def choose(study: Any, attrs: Mapping[str, Any], budget: float, out: str | Path | None, validate: int,
           model: str | None, settings: ValidationSettings, storage: str, trials_run: int,
           progress: Callable[[Any], None] | None) -> Any:
    """Pick, check, save and report the plan of ``study`` at ``budget`` (see :mod:`kvtune.search.study`)."""
    import optuna


    t0 = time.perf_counter()
    space = SearchSpace.from_dict(attrs[f"{ATTR}space"])
    done = study.get_trials(deepcopy=False, states=(optuna.trial.TrialState.COMPLETE,))
    whole = pareto_front(done)
    cands = candidates(done, budget, max(validate, 1))
    if not cands:
        raise KVTuneError(f"no completed trial of study {study.study_name!r} is within {budget:g} bits",
                          "run kvtune search with this --budget (and --trials > 0) to add trials")
    presets = [dict(p) for p in attrs.get(f"{ATTR}presets", [])]
    info, checked, rho = None, {}, None
    if validate:
        plans = [plan_for(space, t, attrs, budget, study.study_name) for t in cands]
        info, checked, rho = _end_to_end(cands, plans, presets, budget, attrs, model, settings, space, progress)
    kls = [checked[t.number]["kl"] if t.number in checked else None for t in cands]
    best = min(range(len(cands)), key=lambda i: (_nan_last(kls[i]), cands[i].values[0], cands[i].number))
    extra = {"validated_kl": f"{kls[best]:.6g}"} if kls[best] is not None else {}
    plan = plan_for(space, cands[best], attrs, budget, study.study_name, extra)
    bits = plan.effective_bits()  # the bit accountant, everything counted
    if bits > budget:
        raise RuntimeError(f"internal error: chosen plan has {bits} bits > budget {budget}")
    points, winner = _points(whole, cands, cands[best], budget, checked)
    winner["bits"] = bits
    result = SearchResult(
        plan=plan, budget=budget, effective_bits=bits, proxy=cands[best].values[0], kl=kls[best],
        trial=cands[best].number, study=study.study_name, storage=storage,
        trials_total=len(study.get_trials(deepcopy=False)), trials_run=trials_run,
        min_bits=float(attrs[f"{ATTR}min_bits"]),
        front=tuple(sorted((p for p in points if p["within_budget"]), key=lambda p: (p["proxy"], -p["bits"]))),
        presets=tuple(presets), validation=info, spearman=rho, out=Path(out) if out is not None else None)
    files = _write(result, out, [tuple(t.values) for t in done], points, winner, space) if out is not None else {}
    if progress is not None:
        progress(SearchProgress("done", 1, 1, result.proxy, bits))
    secs = {"validate": (info or {}).get("seconds", 0.0), "select": time.perf_counter() - t0}
    return replace(result, files=files, seconds=secs)


def _points(whole: list[Any], cands: list[Any], best: Any, budget: float,
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


def _write(result: Any, out: str | Path, trials: list[tuple[float, float]], points: list[dict[str, Any]],
           winner: dict[str, Any], space: SearchSpace) -> dict[str, Path]:
    from kvtune.search.report import plot_bits, plot_pareto, write_pareto_json

    out = Path(out)
    save_plan(result.plan, out)
    data = {"budget": result.budget, "reference_length": space.reference_length, "study": result.study,
            "storage": result.storage, "min_bits": result.min_bits,
            "trials": {"total": result.trials_total, "complete": len(trials), "this_run": result.trials_run},
            "winner": winner, "front": points, "presets": list(result.presets), "validation": result.validation,
            "spearman_proxy_vs_kl": result.spearman,
            "chosen_by": "validated KL" if result.kl is not None else "proxy"}
    files = {"plan": out / "plan.yaml", "pareto_json": write_pareto_json(out, data)}
    files["pareto_png"] = plot_pareto(out, trials, points, result.presets, winner, result.budget,
                                      space.reference_length)
    files["bits_png"] = plot_bits(out, result.plan)
    return files
