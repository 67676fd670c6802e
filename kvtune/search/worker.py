"""One search worker: runs trials of a shared Optuna study (SQLite file, journal, PostgreSQL) through a mirror.

The sampler works on an in-memory mirror of the study (fast: no database round trip per parameter); each
finished trial is then added to the shared storage in **one transaction** (``create_new_trial`` with the
complete trial as template: values, parameters, constraint, NSGA-II generation). So a killed worker leaves
nothing half-written and no stale RUNNING trial behind -- it loses at most the trial it was scoring, which
Optuna's heartbeat + ``RetryFailedTrialCallback`` would otherwise have to detect and re-queue. Before each
trial the mirror pulls the trials other workers finished, so every worker's sampler sees the whole study.

**Seeds.** A worker's sampler starts from ``seed + n`` where ``n`` is the number of trials the study holds
when it starts; if its first trial is then stored under another number ``n0`` (another worker stored one
meanwhile), it continues from ``seed + n0``. A single worker is thus deterministic (fresh or resumed), and
workers sharing a study draw different points. Seed points (uniform presets, greedy points) are run only if
no worker has stored them yet; the worker that created the study takes them in order, the others in reverse
order, so that workers starting together meet in the middle instead of racing through the same list.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from kvtune.errors import KVTuneError
from kvtune.search.objective import Evaluator
from kvtune.search.storage import ATTR

Seeds = list[tuple[str, dict[str, int]]]


def constrain(trial: Any, value: float) -> None:
    """Record ``bits - budget`` as the trial's constraint (feasible when <= 0)."""
    if hasattr(trial, "set_constraint"):  # optuna >= 5
        trial.set_constraint("bits_over_budget", value)
    else:
        trial.set_user_attr(f"{ATTR}constraint", value)


def add_point(study: Any, choices: dict[str, list[int]], params: dict[str, int], proxy: float, bits: float,
              budget: float, label: str) -> Any:
    """Add an already scored point to ``study`` as a completed trial (as a worker would have told it); returns
    the stored trial, numbered."""
    import inspect

    import optuna

    dists = {name: optuna.distributions.CategoricalDistribution(tuple(c)) for name, c in choices.items()}
    attrs: dict[str, Any] = {f"{ATTR}seed": label}
    extra: dict[str, Any] = {}
    if "constraints" in inspect.signature(optuna.trial.create_trial).parameters:  # optuna >= 5
        extra["constraints"] = {"bits_over_budget": bits - budget}
    else:
        attrs[f"{ATTR}constraint"] = bits - budget
    study.add_trial(optuna.trial.create_trial(params=params, distributions=dists, values=[proxy, bits],
                                              user_attrs=attrs, **extra))
    return next(t for t in reversed(study.get_trials(deepcopy=False)) if t.params == params)


class Worker:
    """Runs trials of ``shared`` (an Optuna study on ``storage``) with samplers from ``make_sampler(seed)``."""

    def __init__(self, shared: Any, storage: Any, make_sampler: Callable[[int], Any], seed: int) -> None:
        import optuna

        self.shared, self.storage = shared, storage
        self.make_sampler, self.seed = make_sampler, seed
        self.study_id = storage.get_study_id_from_name(shared.study_name)
        self.local = optuna.create_study(directions=["minimize", "minimize"])
        self.seen: set[int] = set()
        self.pending: Seeds = []
        self.pull()
        self.start = len(self.seen)
        self.local.sampler = make_sampler(seed + self.start)
        self.first: int | None = None

    def pull(self) -> None:
        """Mirror the shared study's completed trials not seen yet (in trial-number order)."""
        import optuna

        for t in self.shared.get_trials(deepcopy=False, states=(optuna.trial.TrialState.COMPLETE,)):
            if t.number not in self.seen:
                self.seen.add(t.number)
                self.local.add_trial(t)

    def enqueue(self, seeds: Seeds) -> None:
        """Seed points to run first, each only if the study does not hold it by then."""
        self.pending = list(seeds)

    def _next_seed(self) -> None:
        """Queue the first pending seed point that no trial of the (freshly pulled) mirror has."""
        have = {tuple(sorted(t.params.items())) for t in self.local.get_trials(deepcopy=False) if t.params}
        while self.pending:
            label, params = self.pending.pop(0)
            if tuple(sorted(params.items())) not in have:
                self.local.enqueue_trial(params, user_attrs={f"{ATTR}seed": label})
                return

    def _stored(self, frozen: Any) -> None:
        """Add a finished trial to the shared study (one transaction); reseed after the first one."""
        trial_id = self.storage.create_new_trial(self.study_id, template_trial=frozen)
        number = self.storage.get_trial_number_from_id(trial_id)
        self.seen.add(number)
        if self.first is None:
            self.first = number
            if number != self.start:
                self.local.sampler = self.make_sampler(self.seed + number)

    def run(self, ev: Evaluator, budget: float, n: int, on_trial: Callable[[Any], None]) -> None:
        """``n`` trials: objectives (proxy, bits), constraint ``bits - budget <= 0``."""
        choices = {name: list(c) for name, c in ev.space.params().items()}
        for _ in range(n):
            self.pull()
            self._next_seed()
            trial = self.local.ask()
            s = ev({name: trial.suggest_categorical(name, c) for name, c in choices.items()})
            constrain(trial, s.bits - budget)
            frozen = self.local.tell(trial, [s.proxy, s.bits])
            self._stored(frozen)
            on_trial(frozen)


def run_trials(worker: Worker, ev: Evaluator, budget: float, n: int,
               report: Callable[[int, float | None, float | None], None] | None) -> None:
    """Run ``n`` trials; after each, ``report(done, best proxy within the budget, its bits)``."""
    worker.pull()
    fits = [t.values for t in worker.local.get_trials(deepcopy=False) if t.values and t.values[1] <= budget]
    best = list(min(fits)) if fits else [None, None]
    count = [0]

    def on_trial(frozen: Any) -> None:
        count[0] += 1
        if frozen.values[1] <= budget and (best[0] is None or frozen.values[0] < best[0]):
            best[:] = list(frozen.values)
        if report is not None:
            report(count[0], best[0], best[1])

    from sqlalchemy.exc import SQLAlchemyError

    try:
        worker.run(ev, budget, n, on_trial)
    except SQLAlchemyError as exc:
        first = (str(exc).strip().splitlines() or [type(exc).__name__])[0]
        raise KVTuneError(f"lost the study storage after {count[0]} trials: {first}",
                          "rerun the same command to resume; finished trials are kept") from None
