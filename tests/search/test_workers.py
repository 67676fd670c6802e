"""Several workers on one study, and a worker killed mid-study: trials add up, nothing is lost but the one in flight.

The PostgreSQL tests start a throw-away local server (``initdb`` + ``pg_ctl`` from PATH, from
``/usr/lib/postgresql/*/bin`` or, not as root, from a ``pip install pgserver`` wheel; as root they run it as the
``postgres`` user) and skip, saying why, when the server binaries, a PostgreSQL driver (psycopg / psycopg2)
or (as root) a ``postgres`` user are missing. Each test runs on its own database.
"""

from __future__ import annotations

import contextlib
import glob
import importlib.util
import os
import shutil
import signal
import socket
import subprocess
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from sqlalchemy.exc import SQLAlchemyError

from kvtune.errors import KVTuneError
from kvtune.search import search
from tests.search.synthetic import make_tables, worker_command

ROOT = Path(__file__).resolve().parents[2]


def _trials(url: str, study: str = "kvtune-search") -> list:
    import optuna

    from kvtune.search.storage import open_storage

    optuna.logging.set_verbosity(optuna.logging.WARNING)
    return optuna.load_study(study_name=study, storage=open_storage(url)).get_trials(deepcopy=False)


def _states(url: str, study: str = "kvtune-search") -> list[tuple[int, str]]:
    return [(t.number, t.state.name) for t in _trials(url, study)]


def _pg_bin() -> Path | None:
    """Server binaries: on PATH, from the OS packages, or (not as root) from a ``pip install pgserver`` wheel."""
    found = [shutil.which("initdb"), shutil.which("pg_ctl")]
    if all(found):
        return Path(found[0]).parent
    candidates = sorted(glob.glob("/usr/lib/postgresql/*/bin/initdb"), key=lambda p: int(p.split("/")[4]))
    if candidates:
        return Path(candidates[-1]).parent
    spec = importlib.util.find_spec("pgserver")
    if spec is not None and spec.origin is not None and os.geteuid() != 0:  # as root its binaries are unreachable
        wheel = Path(spec.origin).parent / "pginstall" / "bin"
        return wheel if (wheel / "initdb").is_file() else None
    return None


@pytest.fixture(scope="module")
def postgres_url() -> Iterator[str]:
    """A fresh local PostgreSQL server for this module, on a free TCP port, stopped at the end."""
    bindir = _pg_bin()
    if bindir is None:
        pytest.skip("PostgreSQL server binaries (initdb, pg_ctl) not found: install the OS package 'postgresql' "
                    "(or, not as root, pip install pgserver)")
    if importlib.util.find_spec("psycopg2") is None and importlib.util.find_spec("psycopg") is None:
        pytest.skip("no PostgreSQL driver: pip install psycopg2-binary")
    prefix: list[str] = []
    root = tempfile.mkdtemp(prefix="kvtune-pg-")
    if os.geteuid() == 0:  # the server refuses to run as root
        import pwd

        try:
            user = pwd.getpwnam("postgres")
        except KeyError:
            pytest.skip("running as root and there is no 'postgres' user to run the server as")
        os.chown(root, user.pw_uid, user.pw_gid)
        prefix = ["runuser", "-u", "postgres", "--"]
    data, log = os.path.join(root, "data"), os.path.join(root, "log")
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    run = lambda *args: subprocess.run(prefix + list(args), check=True, capture_output=True, timeout=120)
    try:
        run(str(bindir / "initdb"), "-D", data, "-U", "kvtune", "--auth=trust", "-E", "UTF8", "--no-sync")
        run(str(bindir / "pg_ctl"), "-D", data, "-l", log, "-w", "-o",
            f"-p {port} -k {root} -c listen_addresses=127.0.0.1 -c fsync=off", "start")
    except subprocess.CalledProcessError as exc:
        shutil.rmtree(root, ignore_errors=True)
        pytest.fail(f"could not start PostgreSQL: {exc.stderr.decode(errors='replace')[-500:]}")
    try:
        yield f"postgresql://kvtune@127.0.0.1:{port}/postgres"
    finally:
        subprocess.run(prefix + [str(bindir / "pg_ctl"), "-D", data, "-m", "immediate", "stop"],
                       check=False, capture_output=True, timeout=60)
        shutil.rmtree(root, ignore_errors=True)


@pytest.fixture(params=["sqlite", "postgresql"])
def storage_url(request: pytest.FixtureRequest, tmp_path: Path) -> str:
    """A fresh study storage: a SQLite file, or a database on the module's PostgreSQL server."""
    if request.param == "sqlite":
        return f"sqlite:///{tmp_path / 'study.db'}"
    base = request.getfixturevalue("postgres_url")
    name = f"kill_{os.getpid()}_{time.monotonic_ns()}"
    _create_db(base, name)
    return base.rsplit("/", 1)[0] + f"/{name}"


def _create_db(base: str, name: str) -> None:
    import sqlalchemy

    from kvtune.search.storage import driver_url

    engine = sqlalchemy.create_engine(driver_url(base), isolation_level="AUTOCOMMIT")
    with engine.connect() as conn:
        conn.execute(sqlalchemy.text(f"CREATE DATABASE {name}"))
    engine.dispose()


def test_killed_worker_then_resume(storage_url: str) -> None:
    """SIGKILL a worker mid-study: every stored trial is complete; a rerun continues the numbering."""
    proc = subprocess.Popen(worker_command(storage_url, 100000), cwd=ROOT)
    try:
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline:
            time.sleep(0.3)
            with contextlib.suppress(KeyError, OSError, SQLAlchemyError, KVTuneError):  # not created yet
                if len(_states(storage_url)) >= 25:
                    break
        else:
            pytest.fail("the worker did not get going within 60 s")
        proc.send_signal(signal.SIGKILL)
        proc.wait(timeout=30)
    finally:
        if proc.poll() is None:
            proc.kill()
    states = _states(storage_url)
    assert states and all(state == "COMPLETE" for _, state in states)  # nothing half-written or left RUNNING
    done = len(states)
    r = search(make_tables(), "3bit", out=None, storage=storage_url, trials=10, validate=0, groups=3)
    after = _states(storage_url)
    assert r.trials_total == done + 10 and [n for n, _ in after] == list(range(done + 10))
    assert r.effective_bits <= 3.0


def test_two_workers_share_a_postgres_study(postgres_url: str) -> None:
    """Two worker processes on one study: 40 trials numbered 0..39, all complete, no point run twice."""
    start = time.perf_counter()
    procs = [subprocess.Popen(worker_command(postgres_url, 20, study="shared"), cwd=ROOT,
                              stderr=subprocess.PIPE) for _ in range(2)]
    for p in procs:
        _, err = p.communicate(timeout=240)
        assert p.returncode == 0, err.decode(errors="replace")[-2000:]
    wall = time.perf_counter() - start
    trials = _trials(postgres_url, "shared")
    assert sorted(t.number for t in trials) == list(range(40))  # every trial counted once, none lost
    assert all(t.state.name == "COMPLETE" for t in trials)
    distinct = {tuple(sorted(t.params.items())) for t in trials}
    print(f"2 workers x 20 trials on PostgreSQL: {wall:.1f} s wall, {len(distinct)} distinct points of 40")
    assert len(distinct) >= 38  # different sampler seeds; NSGA-II may still breed a child equal to a parent
    r = search(make_tables(), "3bit", out=None, storage=postgres_url, study="shared", trials=5, validate=0, groups=3)
    assert r.trials_total == 45 and r.effective_bits <= 3.0
