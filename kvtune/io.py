"""Atomic file writes and checksums: nothing a crash leaves behind is half-written."""

from __future__ import annotations

import hashlib
import os
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import yaml

from kvtune.errors import KVTuneError


@contextmanager
def atomic_path(path: str | Path) -> Iterator[Path]:
    """Yield a temporary path beside ``path``; rename it onto ``path`` only if the block succeeds."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    os.close(fd)
    try:
        yield Path(tmp)
        os.chmod(tmp, _mode_for(path))
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)


def _mode_for(path: Path) -> int:
    """The permission bits a write of ``path`` leaves: the replaced file's, else what ``open`` would create under
    the process umask (``mkstemp`` makes its files owner-only: a plan written so could not be read by a serving
    engine running as another user)."""
    try:
        return path.stat().st_mode & 0o7777
    except FileNotFoundError:
        mask = os.umask(0o022)
        os.umask(mask)
        return 0o666 & ~mask


def write_text_atomic(path: str | Path, text: str) -> None:
    """Write ``text`` to ``path`` atomically (temp file + rename)."""
    with atomic_path(path) as tmp:
        tmp.write_text(text, encoding="utf-8")


def write_yaml_atomic(path: str | Path, data: dict) -> None:
    """Dump ``data`` as block-style YAML, atomically."""
    write_text_atomic(path, yaml.safe_dump(data, sort_keys=False, default_flow_style=None))


def read_yaml(path: str | Path, what: str) -> dict:
    """Read a YAML mapping, turning every failure into a one-line :class:`KVTuneError`."""
    path = Path(path)
    if not path.is_file():
        raise KVTuneError(f"{what} not found: {path}", "check the path")
    try:
        data = yaml.safe_load(path.read_text(encoding="utf-8"))
    except (yaml.YAMLError, UnicodeDecodeError) as exc:
        first = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
        raise KVTuneError(f"{what} {path} is not valid YAML: {first}", "re-create it") from None
    if not isinstance(data, dict):
        raise KVTuneError(f"{what} {path} is not a YAML mapping", "re-create it")
    return data


def sha256_file(path: str | Path) -> str:
    """Hex SHA-256 of a file's bytes."""
    digest = hashlib.sha256()
    with open(path, "rb") as fh:
        for block in iter(lambda: fh.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()
