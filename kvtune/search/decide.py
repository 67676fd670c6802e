"""Choosing the plan a study writes at a budget: searched candidates against baselines, measured on held-out text.

The ``validate`` lowest-proxy trials within the budget and the baselines within it (:mod:`kvtune.search.baselines`)
are judged end to end (:mod:`kvtune.search.judge`: successive halving up to the reference length, proxy
correction refitted on what was measured); the plan with the least KL at the longest fidelity is written -- a
baseline when no searched plan beats it, and the summary says so. Without validation (``validate=0``) the
lowest proxy wins and nothing is compared.
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
from kvtune.plan import Plan
from kvtune.plan_types import ModelIdentity, Provenance
from kvtune.search import correction
from kvtune.search.baselines import all_baselines, bound_presets
from kvtune.search.halving import Schedule, held_out_ids, widest_window
from kvtune.search.judge import EXTRA, Entry, Judgement, judge
from kvtune.search.objective import Evaluator, greedy_descent, greedy_path
from kvtune.search.results import SearchProgress, SearchResult
from kvtune.search.select import candidates, pareto_front, plan_for, points_of, validation_model, write_outputs
from kvtune.search.space import SearchSpace
from kvtune.search.storage import ATTR
from kvtune.search.worker import add_point

log = logging.getLogger(__name__)

POOL = 40  # completed trials within the budget the corrected proxy may pick from


def choose(study: Any, attrs: Mapping[str, Any], budget: float, out: str | Path | None, validate: int,
           model: str | None, schedule: Schedule, storage: str, trials_run: int,
           progress: Callable[[Any], None] | None, ev: Evaluator | None = None) -> SearchResult:
    """Pick, check, save and report the plan of ``study`` at ``budget`` (see the module doc). ``ev``: the
    calibration's evaluator (baselines beyond the presets, proxy parts); None when the calibration is absent."""
    import optuna

    t0 = time.perf_counter()
    space = SearchSpace.from_dict(attrs[f"{ATTR}space"])
    done = study.get_trials(deepcopy=False, states=(optuna.trial.TrialState.COMPLETE,))
    cands = candidates(done, budget, max(validate, 1))
    if not cands:
        raise KVTuneError(f"no completed trial of study {study.study_name!r} is within {budget:g} bits",
                          "run kvtune search with this --budget (and --trials > 0) to add trials")
    searched = _entries(space, cands, attrs, budget, study.study_name, ev)
    j, info = None, None
    if validate:
        pool = _entries(space, candidates(done, budget, POOL), attrs, budget, study.study_name, ev) if ev else []
        baselines = _baseline_entries(ev, budget, space.identity)
        propose = None if ev is None else (lambda coef: _corrected(study, space, attrs, budget, ev, coef))
        j, info = _judge(searched, pool, baselines, attrs, model, schedule, space.identity, progress, propose)
        done = study.get_trials(deepcopy=False, states=(optuna.trial.TrialState.COMPLETE,))  # with proposals
    entry = searched[0] if j is None else j.entries[j.winner]
    kl = None if j is None else j.latest[j.winner].get("kl")
    plan = _final_plan(entry, space, attrs, budget, study.study_name, kl)
    bits = plan.effective_bits()  # the bit accountant, everything counted
    if bits > budget:
        raise RuntimeError(f"internal error: chosen plan has {bits} bits > budget {budget}")
    trial = entry.trial if entry.searched else cands[0]
    points, winner = points_of(pareto_front(done), cands, trial, budget, _checked(j))
    winner.update(bits=bits, kind=entry.kind, name=entry.name)
    presets = tuple(dict(p) for p in attrs.get(f"{ATTR}presets", []))
    result = SearchResult(
        plan=plan, budget=budget, effective_bits=bits, proxy=entry.proxy if entry.proxy is not None else math.nan,
        kl=kl, trial=trial.number if entry.searched else -1, study=study.study_name, storage=storage,
        trials_total=len(study.get_trials(deepcopy=False)), trials_run=trials_run,
        min_bits=float(attrs[f"{ATTR}min_bits"]),
        front=tuple(sorted((p for p in points if p["within_budget"]), key=lambda p: (p["proxy"], -p["bits"]))),
        presets=presets, validation=info, spearman=None if j is None else j.spearman_raw,
        out=Path(out) if out is not None else None, judgement=_report(j))
    files = write_outputs(result, out, [tuple(t.values) for t in done], points, winner, space) if out else {}
    if progress is not None:
        progress(SearchProgress("done", 1, 1, result.proxy, bits))
    secs = {"validate": (info or {}).get("seconds", 0.0), "select": time.perf_counter() - t0}
    return replace(result, files=files, seconds=secs)


def _entries(space: SearchSpace, trials: Sequence[Any], attrs: Mapping[str, Any], budget: float, study: str,
             ev: Evaluator | None) -> list[Entry]:
    """Searched entries of ``trials`` (proxy parts where the calibration is at hand)."""
    out = []
    for t in trials:
        plan = plan_for(space, t, attrs, budget, study)
        parts = ev.plan_parts(plan.layers) if ev is not None else None
        out.append(Entry(f"trial {t.number}", "searched", plan, t.values[1], t.values[0], parts, t))
    return out


def _corrected(study: Any, space: SearchSpace, attrs: Mapping[str, Any], budget: float, ev: Evaluator,
               coef: tuple[float, float]) -> list[Entry]:
    """The proxy refitted on what validation measured, searched again: the greedy points (descent and path) of
    the evaluator with corrected key/value errors, added to the study as trials (or found there), as entries.
    """
    import optuna

    if not max(coef) > 0:
        return []
    scaled = ev.scaled(*coef)
    have = {tuple(sorted(t.params.items())): t
            for t in study.get_trials(deepcopy=False, states=(optuna.trial.TrialState.COMPLETE,))}
    choices = {name: list(c) for name, c in space.params().items()}
    trials = []
    for params in (greedy_descent(scaled, budget)[0], greedy_path(scaled, budget)[-1][0]):
        score = ev(params)
        key = tuple(sorted(params.items()))
        if score.bits > budget:
            continue
        if key not in have:
            have[key] = add_point(study, choices, dict(params), score.proxy, score.bits, budget, "corrected greedy")
        if have[key] not in trials:
            trials.append(have[key])
    return _entries(space, trials, attrs, budget, study.study_name, ev)


def _baseline_entries(ev: Evaluator | None, budget: float, identity: ModelIdentity) -> list[Entry]:
    """Baselines within ``budget``: presets, the best KIVI and uniform pairs (presets only without the calibration)."""
    presets = bound_presets(identity)
    if ev is None:
        return [Entry(f"preset:{n}", "preset", p, p.effective_bits(), None, None)
                for n, p in presets.items() if p.effective_bits() <= budget]
    return [Entry(b.name, b.kind, Plan(layers=b.layers, model=identity, name=b.name), b.bits, b.proxy,
                  ev.plan_parts(b.layers)) for b in all_baselines(ev, budget, presets)]


def _judge(searched: list[Entry], pool: list[Entry], baselines: list[Entry], attrs: Mapping[str, Any],
           model: str | None, schedule: Schedule, identity: ModelIdentity, progress: Callable[[Any], None] | None,
           propose: Callable[[tuple[float, float]], list[Entry]] | None = None,
           ) -> tuple[Judgement | None, dict[str, Any]]:
    """Validate on held-out calibration text; ``(None, {"skipped": why})`` without a model."""
    from kvtune.models import load_model

    name, reason = validation_model(model, identity)
    if name is None:
        log.warning("end-to-end validation skipped: %s", reason)
        return None, {"skipped": reason}
    net, tokenizer = load_model(name)
    limit = int(attrs.get(f"{ATTR}max_positions") or getattr(net.config, "max_position_embeddings", 0) or 0)
    schedule = schedule.for_model(limit or None, widest_window(identity.spans))
    longest, seqs = schedule.fidelities[-1].length, max(f.sequences for f in schedule.fidelities)
    source = str(attrs.get(f"{ATTR}data_source") or "pydoc:calib")
    try:
        ids, where = held_out_ids(tokenizer, source, int(attrs.get(f"{ATTR}data_tokens", 0)), longest, seqs)
    except KVTuneError as exc:
        log.warning("calibration text %s unusable for validation (%s): using pydoc:calib", source, exc)
        ids, where = held_out_ids(tokenizer, "pydoc:calib", 32768, longest, seqs)
    done = [0]
    total = len(searched) + len(baselines) + EXTRA + 2 + sum(schedule.keep) + 2 * len(schedule.keep)

    def tick() -> None:
        done[0] += 1
        if progress is not None:
            progress(SearchProgress("validate", min(done[0], total), total))

    start = time.perf_counter()
    with torch.inference_mode():
        j = judge(net, searched + baselines, pool, ids, schedule, tick, propose)
    return j, {"model": name, "text": where, "path": "kvtune.runtime (bit-packed cache, stepwise)",
               "fidelities": [f.length for f in schedule.fidelities],
               "seconds": round(time.perf_counter() - start, 2)}


def _final_plan(entry: Entry, space: SearchSpace, attrs: Mapping[str, Any], budget: float, study: str,
                kl: float | None) -> Plan:
    """The plan to write: the trial's (with provenance) or the winning baseline's."""
    extra = {"validated_kl": f"{kl:.6g}"} if kl is not None and math.isfinite(kl) else {}
    if entry.searched:
        return plan_for(space, entry.trial, attrs, budget, study, extra)
    from kvtune import __version__

    prov = Provenance(kvtune_version=__version__, source="kvtune search (baseline)", study=study,
                      extra=tuple({"baseline": entry.name, **extra}.items()))
    return replace(entry.plan, name=f"search-{budget:g}bit", budget=budget, provenance=prov,
                   description=f"kvtune search: no searched plan beat the baseline {entry.name} within {budget:g} "
                               f"effective bits at {space.reference_length} tokens (study {study})")


def _checked(j: Judgement | None) -> dict[int, dict[str, float]]:
    """Trial number -> its longest validation run."""
    if j is None:
        return {}
    return {e.trial.number: {"top1": math.nan, "kl_tail": math.nan, "ppl": math.nan, **j.latest[i]}
            for i, e in enumerate(j.entries) if e.searched and j.latest[i]}


def _report(j: Judgement | None) -> dict[str, Any] | None:
    """The judgement as plain data (pareto.json, the summary)."""
    if j is None:
        return None
    rows = [{"name": e.name, "kind": e.kind, "bits": e.bits, "proxy": e.proxy,
             "corrected_proxy": None if e.parts is None else correction.predict(e.parts, j.coef),
             **{k: v for k, v in j.latest[i].items() if k in ("kl", "ppl", "top1", "kl_tail", "length")}}
            for i, e in enumerate(j.entries)]
    return {"entries": rows, "stages": j.stages, "winner": j.winner, "best_baseline": j.best_baseline,
            "correction": {"key": j.coef[0], "value": j.coef[1]}, "spearman_raw": j.spearman_raw,
            "spearman_heldout": j.spearman_heldout}
