"""``search()``: calibration tables -> Optuna study -> validated plan under a bit budget; ``resolve()``.

1. Load the tables, build the pruned, grouped space (:mod:`~kvtune.search.space`), score the uniform presets.
2. Open (create or resume) the study; a new one is seeded with the cheapest point, the presets within the
   budget and greedy points (:func:`~kvtune.search.objective.seed_points`).
3. Run ``trials`` more trials: objectives (proxy, effective bits), ``bits - budget <= 0`` as a constraint.
4. The ``validate`` distinct lowest-proxy points within the budget and the baselines within it are judged
   end to end on held-out text up to the reference length (:mod:`~kvtune.search.decide`); the least KL wins,
   a baseline when no searched plan beats it (without validation: the lowest proxy). The plan is checked
   against the budget by bits.py, saved, and ``pareto.json`` / ``pareto.png`` / ``bits.png`` are written.

``resolve()`` repeats step 4 for another budget from the trials already in a study (with the calibration
when its directory, recorded in the study, is still there; with the presets as the only baselines when not).
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Mapping
from dataclasses import replace
from pathlib import Path
from typing import Any

from kvtune.errors import KVTuneError
from kvtune.search.budget import MAX_BUDGET, check_minimum, parse_budget
from kvtune.search.halving import Schedule
from kvtune.search.objective import Evaluator, seed_points
from kvtune.search.results import SearchProgress, SearchResult
from kvtune.search.space import DEFAULT_TOKENS, SearchSpace, build_space, pruning_summary
from kvtune.search.state import fitted_attrs
from kvtune.search.storage import (
    ATTR,
    DEFAULT_STUDY,
    STUDY_DB,
    close_storage,
    default_storage,
    load_existing,
    mask_url,
    open_storage,
    open_study,
    quiet_optuna,
)
from kvtune.search.tables import CalibrationTables, check_model, load_tables
from kvtune.search.worker import Worker, run_trials

log = logging.getLogger(__name__)

POPULATION = 24
__all__ = ["MAX_BUDGET", "SAMPLERS", "SearchProgress", "SearchResult", "parse_budget", "resolve", "search"]


def _constraints() -> dict[str, Any]:
    """Optuna >= 5 reads constraints set in the trial; older versions need a ``constraints_func``."""
    import optuna

    if hasattr(optuna.trial.Trial, "set_constraint"):
        return {}
    return {"constraints_func": lambda t: [t.user_attrs.get(f"{ATTR}constraint", 0.0)]}


def _nsga2(seed: int) -> Any:
    import optuna

    return optuna.samplers.NSGAIISampler(seed=seed, population_size=POPULATION, **_constraints())


def _tpe(seed: int) -> Any:
    import optuna

    return optuna.samplers.TPESampler(seed=seed, n_startup_trials=POPULATION, multivariate=True, **_constraints())


SAMPLERS: dict[str, Callable[[int], Any]] = {"nsga2": _nsga2, "tpe": _tpe}


def _check_args(trials: int, sampler: str, validate: int, seed: int) -> None:
    if not isinstance(trials, int) or trials < 0:
        raise KVTuneError(f"trials must be an integer >= 0, got {trials!r}")
    if sampler not in SAMPLERS:
        raise KVTuneError(f"unknown sampler {sampler!r}", f"use one of {', '.join(SAMPLERS)}")
    if not isinstance(validate, int) or validate < 0:
        raise KVTuneError(f"validate must be an integer >= 0, got {validate!r}")
    if not isinstance(seed, int):
        raise KVTuneError(f"seed must be an integer, got {seed!r}")


def _preset_points(ev: Evaluator) -> list[dict[str, Any]]:
    """Uniform presets bound to the model (those it can take): name, exact effective bits, proxy (None if not
    expressible)."""
    from kvtune.search.baselines import bound_presets

    return [{"name": name, "bits": plan.effective_bits(), "proxy": ev.plan_proxy(plan.layers), "layers": plan.layers}
            for name, plan in bound_presets(ev.space.identity).items()]


def _outliers(tables: CalibrationTables, space: SearchSpace) -> dict[str, list]:
    """Calibrated outlier channels (most outlying first) per layer and head, as many as any candidate keeps."""
    out: dict[str, list] = {}
    for kind, rank, cands in (("key", tables.key_outlier_rank, space.key_candidates),
                              ("value", tables.value_outlier_rank, space.value_candidates)):
        width = max(s.outliers for s in cands)
        if rank is not None and width:
            out[kind] = rank[:, :, :width].tolist()
    return out


def _study_attrs(space: SearchSpace, tables: CalibrationTables, ev: Evaluator,
                 presets: list[dict[str, Any]], calib_dir: str | None) -> dict[str, Any]:
    from kvtune import __version__

    return {f"{ATTR}space_hash": space.hash(), f"{ATTR}space": space.to_dict(),
            f"{ATTR}calib_dir": calib_dir, f"{ATTR}data_tokens": tables.data_tokens,
            f"{ATTR}max_positions": tables.max_positions,
            f"{ATTR}calibration_hash": tables.calibration_hash, f"{ATTR}data_sha256": tables.data_hash,
            f"{ATTR}data_source": tables.data_source, f"{ATTR}min_bits": ev(ev.min_params()).bits,
            f"{ATTR}presets": [{k: p[k] for k in ("name", "bits", "proxy")} for p in presets],
            f"{ATTR}outliers": _outliers(tables, space), f"{ATTR}fitted": fitted_attrs(tables.fitted),
            f"{ATTR}kvtune_version": __version__,
            f"{ATTR}pruning": pruning_summary(tables, space)}


def search(calib_dir: str | Path | CalibrationTables, budget: str | float, out: str | Path | None = "kvtune-plan",
           trials: int = 300, granularity: str = "layer", sampler: str = "nsga2", storage: str | None = None,
           study: str | None = None, seed: int = 0, validate: int = 8, groups: int | None = None,
           progress: Callable[[SearchProgress], None] | None = None, model: str | None = None,
           validation: Schedule | None = None, tokens: str = DEFAULT_TOKENS) -> SearchResult:
    """Find a per-layer (or per-head) K/V plan within ``budget`` effective bits; see the module doc.

    ``calib_dir``: a calibration directory (or tables). ``budget``: ``"2.0bit"``, ``"2bit"``, ``"2.0"`` or a
    number. ``out``: where the plan, ``pareto.json``, the plots and (by default) ``study.db`` go.
    ``trials``: trials to add in this run (a rerun resumes the study and adds as many). ``storage``: an
    Optuna storage URL (default ``sqlite:///<out>/study.db``); ``study``: its name (default
    ``kvtune-search``). ``validate``: Pareto points checked end to end (0: choose by proxy). ``groups``:
    clusters sharing choices (default 8). ``tokens``: token policies searched (``"sinks"``: the first token in
    fp16 or not; ``"salient"``: also salient tokens; ``"all"``: also Elastic merging and visual-token weights;
    see :mod:`kvtune.search.token_policies`). ``model``: the model
    (name or directory) for validation, checked against the calibration; default: the embedded model if it
    is the calibrated one.
    """
    t0 = time.perf_counter()
    budget = parse_budget(budget)  # the one parse: a float from here on
    _check_args(trials, sampler, validate, seed)
    if out is None and storage is None:
        raise KVTuneError("search needs an output directory or a storage URL", "pass --out or --storage")
    tables = calib_dir if isinstance(calib_dir, CalibrationTables) else load_tables(calib_dir)
    calib_path = None if isinstance(calib_dir, CalibrationTables) else str(Path(calib_dir).resolve())
    if model is not None:
        check_model(tables, model)
    space = build_space(tables, granularity, groups, tokens=tokens)
    ev = Evaluator(space, tables)
    check_minimum(budget, ev(ev.min_params()).bits)
    presets = _preset_points(ev)
    url = storage or default_storage(out)
    store = open_storage(url)
    seeds = seed_points(ev, budget, {p["name"]: p["layers"] for p in presets})
    name = study or DEFAULT_STUDY
    try:
        with quiet_optuna():
            opened, created = open_study(store, name, None, _study_attrs(space, tables, ev, presets, calib_path))
            worker = Worker(opened, store, SAMPLERS[sampler], seed)
            worker.enqueue(seeds if created else seeds[::-1])  # only the points the study lacks when their turn comes
            t1 = time.perf_counter()
            report = None if progress is None else (
                lambda done, proxy, bits: progress(SearchProgress("trials", done, trials, proxy, bits)))
            run_trials(worker, ev, budget, trials, report)
        t2 = time.perf_counter()
        result = finish(opened, budget, out, validate=validate, model=model, validation=validation,
                        storage_url=url, trials_run=trials, progress=progress, ev=ev)
    finally:
        close_storage(store)
    seconds = {"prepare": t1 - t0, "trials": t2 - t1, **result.seconds, "total": time.perf_counter() - t0}
    return replace(result, seconds={k: round(v, 2) for k, v in seconds.items()})


def resolve(storage: str, study: str, budget: str | float, out: str | Path | None = None, validate: int = 0,
            model: str | None = None, progress: Callable[[SearchProgress], None] | None = None,
            validation: Schedule | None = None) -> SearchResult:
    """Choose a plan for another ``budget`` from the trials already in ``study`` (no new trials).

    ``storage`` is the study's storage URL (e.g. ``sqlite:///kvtune-plan/study.db``) or the output directory
    of the search that holds ``study.db``. With ``out`` the plan and reports are written there; ``validate`` > 0
    checks that many Pareto points end to end (needs the model).
    """
    budget = parse_budget(budget)
    if not isinstance(validate, int) or validate < 0:
        raise KVTuneError(f"validate must be an integer >= 0, got {validate!r}")
    if "://" not in storage and Path(storage).is_dir():
        if not (Path(storage) / STUDY_DB).is_file():
            raise KVTuneError(f"no {STUDY_DB} in {storage}", "pass the storage URL of the study")
        storage = default_storage(storage)
    store = open_storage(storage)
    try:
        loaded = load_existing(store, study)
        return finish(loaded, budget, out, validate=validate, model=model, validation=validation,
                      storage_url=storage, trials_run=0, progress=progress, ev=_evaluator(loaded.user_attrs))
    finally:
        close_storage(store)


def _evaluator(attrs: Mapping[str, Any]) -> Evaluator | None:
    """The study's evaluator, from the calibration it recorded when that directory is still there (same tables)."""
    path = attrs.get(f"{ATTR}calib_dir")
    if not path or not Path(path).exists():
        return None
    try:
        tables = load_tables(path)
    except KVTuneError:
        return None
    if tables.calibration_hash != attrs.get(f"{ATTR}calibration_hash"):
        return None
    space = SearchSpace.from_dict(attrs[f"{ATTR}space"])
    return Evaluator(space, tables)


def finish(study: Any, budget: float, out: str | Path | None, validate: int, model: str | None,
           validation: Schedule | None, storage_url: str, trials_run: int,
           progress: Callable[[SearchProgress], None] | None, ev: Evaluator | None = None) -> SearchResult:
    """Step 4 of the module doc, from the study (and the calibration's evaluator when at hand)."""
    from kvtune.search.decide import choose

    attrs: Mapping[str, Any] = study.user_attrs
    check_minimum(budget, float(attrs[f"{ATTR}min_bits"]))
    return choose(study, attrs, budget, out, validate, model, validation or Schedule(), mask_url(storage_url),
                  trials_run, progress, ev)
