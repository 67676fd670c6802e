"""Where studies live: storages (SQLite file by default, PostgreSQL for many workers), and opening a study.

* ``storage=None``: ``sqlite:///<out>/study.db`` (one host). Any SQLAlchemy URL works
  (``postgresql://user:pass@host/db`` for several machines: run the same command on each, with the same
  ``--study``); a path ending in ``.log`` is an Optuna journal file.
* Workers never leave a trial half-written: each finished trial is added in one transaction (see
  :class:`kvtune.search.study.Worker`), so killing a worker loses at most the trial it was scoring, and
  there is no stale RUNNING trial to detect (no heartbeat needed).
* SQLite files run in WAL mode with ``synchronous=NORMAL``: a commit does not wait for the disk (trials are
  written one per transaction; a killed process loses nothing committed).
* A study records its search space (and its hash), the calibration hash, the minimum achievable bits and
  the uniform presets' scores in its user attributes. Opening an existing study with another space or
  calibration is a one-line :class:`KVTuneError`, raised before anything is written to it.
"""

from __future__ import annotations

import logging
import re
import time
import warnings
from collections.abc import Callable, Iterator, Mapping
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from kvtune.errors import KVTuneError

log = logging.getLogger(__name__)

DEFAULT_STUDY = "kvtune-search"
STUDY_DB = "study.db"
ATTR = "kvtune."  # prefix of our study user attributes
ATTR_WAIT_S = 15.0  # how long a worker waits for another worker that is creating the study


@contextmanager
def quiet_optuna() -> Iterator[None]:
    """Optuna's per-trial INFO lines and experimental-feature warnings off (library code never prints)."""
    import optuna

    old = optuna.logging.get_verbosity()
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
            warnings.simplefilter("ignore", FutureWarning)
            yield
    finally:
        optuna.logging.set_verbosity(old)


def default_storage(out: str | Path) -> str:
    """The default storage URL: a SQLite file in the output directory."""
    path = Path(out).expanduser().resolve() / STUDY_DB
    path.parent.mkdir(parents=True, exist_ok=True)
    return f"sqlite:///{path}"


def mask_url(url: str) -> str:
    """``url`` with any password replaced by ``***`` (for messages and pareto.json)."""
    return re.sub(r"(://[^:/@]+:)[^@]*@", r"\1***@", url)


def _sqlite_creator(url: str) -> Callable[[], Any]:
    """Connections in WAL mode with ``synchronous=NORMAL``: a commit no longer waits for the disk (a killed
    process loses nothing committed; only a power cut can lose the last few trials)."""
    import sqlite3

    from sqlalchemy.engine import make_url

    database = make_url(url).database or ":memory:"

    def connect() -> Any:
        conn = sqlite3.connect(database, timeout=60, check_same_thread=False)
        conn.execute("PRAGMA journal_mode=WAL")
        conn.execute("PRAGMA synchronous=NORMAL")
        return conn

    return connect


def _rdb(url: str) -> Any:
    from optuna.storages import RDBStorage

    engine: dict[str, Any] = {}
    if url.startswith("sqlite"):
        engine["creator"] = _sqlite_creator(url)
    elif url.startswith(("postgresql", "mysql")):
        engine["connect_args"] = {"connect_timeout": 10}
        engine["pool_pre_ping"] = True
    return RDBStorage(url, engine_kwargs=engine)


def driver_url(url: str) -> str:
    """``postgresql://`` with whichever PostgreSQL driver is installed (SQLAlchemy 2.1 defaults to psycopg 3)."""
    import importlib.util

    for scheme in ("postgresql://", "postgres://"):
        if url.startswith(scheme) and importlib.util.find_spec("psycopg") is None \
                and importlib.util.find_spec("psycopg2") is not None:
            return "postgresql+psycopg2://" + url[len(scheme):]
    return url


def _journal(path: str) -> Any:
    from optuna.storages import JournalStorage
    from optuna.storages.journal import JournalFileBackend

    Path(path).expanduser().parent.mkdir(parents=True, exist_ok=True)
    return JournalStorage(JournalFileBackend(str(Path(path).expanduser())))


def _rdb_retrying(url: str, attempts: int = 5) -> Any:
    """Workers starting together on an empty database race to create Optuna's tables: the losers retry."""
    from sqlalchemy.exc import IntegrityError, OperationalError, ProgrammingError

    for attempt in range(attempts):
        try:
            return _rdb(url)
        except (IntegrityError, ProgrammingError, OperationalError) as exc:
            racing = not isinstance(exc, OperationalError) or "already exists" in str(exc)  # SQLite's form
            if not racing or attempt == attempts - 1:
                raise
            time.sleep(0.5 * (attempt + 1))
    raise AssertionError("unreachable")


def open_storage(url: str) -> Any:
    """An Optuna storage for ``url``; an unreachable or unusable one is a one-line :class:`KVTuneError`."""
    from sqlalchemy.exc import SQLAlchemyError

    url = driver_url(url)
    with quiet_optuna():
        try:
            if url.endswith(".log") and "://" not in url:
                return _journal(url)
            return _rdb_retrying(url)
        except ImportError as exc:
            hint = ("pip install 'kvtune[postgres]' (psycopg2-binary)" if url.startswith("postgres")
                    else "install its database driver")
            raise KVTuneError(f"no database driver for storage {mask_url(url)} ({exc})", hint) from None
        except (SQLAlchemyError, RuntimeError, OSError, ValueError) as exc:  # bad URL, refused connection, ...
            first = (str(exc).strip().splitlines() or [type(exc).__name__])[0]
            raise KVTuneError(f"cannot open storage {mask_url(url)}: {first}",
                              "check the URL and that the database server is reachable") from None


def close_storage(storage: Any) -> None:
    """Close a storage's pooled database connections (RDB). On SQLite in WAL mode closing the last connection
    checkpoints the write-ahead log into the database file, so ``study.db`` alone holds every committed trial when a
    command returns (a copy of it then misses nothing)."""
    engine = getattr(storage, "engine", None)
    if engine is not None:
        engine.dispose()


def _difference(old: Mapping[str, Any], new: Mapping[str, Any]) -> str:
    """The first top-level field where two space dicts differ, in words."""
    names = {"identity": "model", "granularity": "granularity", "spec_group": "groups", "key_candidates":
             "key candidates", "value_candidates": "value candidates", "key_choices": "pruned key choices",
             "value_choices": "pruned value choices", "residuals": "residual windows",
             "token_policies": "token policies"}
    for field, words in names.items():
        if old.get(field) != new.get(field):
            return words
    return "search space"


def _wait_for_attrs(study: Any) -> dict[str, Any]:
    """User attrs of a study another worker may be creating right now (they are written just after it)."""
    deadline = time.monotonic() + ATTR_WAIT_S
    while True:
        attrs = study.user_attrs
        if f"{ATTR}space_hash" in attrs or time.monotonic() > deadline:
            return attrs
        time.sleep(0.5)


def check_study(study: Any, space: Mapping[str, Any], space_hash: str, calibration_hash: str) -> None:
    """Raise :class:`KVTuneError` unless ``study`` was made for this space and calibration."""
    attrs = _wait_for_attrs(study)
    name = study.study_name
    if f"{ATTR}space_hash" not in attrs:
        raise KVTuneError(f"study {name!r} exists but was not made by kvtune search",
                          "pass another --study name")
    if attrs[f"{ATTR}space_hash"] != space_hash:
        what = _difference(attrs.get(f"{ATTR}space", {}), space)
        raise KVTuneError(f"study {name!r} was made for another search space ({what} differ)",
                          "pass a new --study name or another --out; the existing study is left as it is")
    if calibration_hash and attrs.get(f"{ATTR}calibration_hash") not in ("", calibration_hash):
        raise KVTuneError(f"study {name!r} was made from another calibration",
                          "pass a new --study name, or the calibration it was made from")
    import optuna

    if list(study.directions) != [optuna.study.StudyDirection.MINIMIZE] * 2:
        raise KVTuneError(f"study {name!r} does not minimise (proxy, bits)", "pass another --study name")


def open_study(storage: Any, name: str, sampler: Any, attrs: Mapping[str, Any]) -> tuple[Any, bool]:
    """Create study ``name`` (recording ``attrs``) or load it and check it matches ``attrs``.

    Returns ``(study, created)``. Creation is atomic in the storage, so with several workers exactly one
    creates (and seeds) the study.
    """
    import optuna

    with quiet_optuna():
        try:
            study = optuna.create_study(storage=storage, study_name=name, sampler=sampler,
                                        directions=["minimize", "minimize"])
        except optuna.exceptions.DuplicatedStudyError:
            study = optuna.load_study(study_name=name, storage=storage, sampler=sampler)
            check_study(study, attrs[f"{ATTR}space"], attrs[f"{ATTR}space_hash"],
                        attrs.get(f"{ATTR}calibration_hash", ""))
            return study, False
        for key, value in attrs.items():
            study.set_user_attr(key, value)
        return study, True


def load_existing(storage: Any, name: str) -> Any:
    """Load study ``name`` for re-solving; a missing or non-kvtune study is a :class:`KVTuneError`."""
    import optuna

    with quiet_optuna():
        try:
            study = optuna.load_study(study_name=name, storage=storage)
        except KeyError:
            names = [s.study_name for s in optuna.get_all_study_summaries(storage, include_best_trial=False)]
            raise KVTuneError(f"no study named {name!r} in this storage",
                              f"studies there: {', '.join(names) or 'none'}") from None
    if f"{ATTR}space_hash" not in study.user_attrs:
        raise KVTuneError(f"study {name!r} was not made by kvtune search", "pass the study kvtune search made")
    return study
