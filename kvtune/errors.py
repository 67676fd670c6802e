"""The one exception type users see.

Every problem a user can fix (bad path, wrong model, impossible budget, corrupt file) is raised as
:class:`KVTuneError` with a one-line message that names the problem *and* the fix. The CLI prints
``error: <message>`` to stderr and exits with code 2; library callers can catch it like a
``ValueError``.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import fields
from typing import Any, TypeVar

T = TypeVar("T")


class KVTuneError(ValueError):
    """A user-facing error: one line, says what is wrong and how to fix it."""

    def __init__(self, problem: str, fix: str | None = None) -> None:
        message = problem if fix is None else f"{problem} ({fix})"
        super().__init__(message.replace("\n", " "))


def strict_mapping(cls: type, data: Any, where: str) -> dict[str, Any]:
    """Check ``data`` is a mapping with only dataclass ``cls``'s field names; return a plain dict copy."""
    if not isinstance(data, Mapping):
        raise KVTuneError(f"{where}: expected a mapping, got {type(data).__name__}", "see configs/ for examples")
    known = {f.name for f in fields(cls)}
    unknown = sorted(set(data) - known)
    if unknown:
        raise KVTuneError(f"{where}: unknown key(s) {unknown}", f"valid keys are {sorted(known)}")
    return dict(data)


def build_strict(cls: type[T], data: Any, where: str) -> T:
    """``cls(**data)`` for a dataclass; unknown keys and invalid values are :class:`KVTuneError` naming ``where``."""
    kwargs = strict_mapping(cls, data, where)
    try:
        return cls(**kwargs)
    except (TypeError, ValueError) as exc:
        raise KVTuneError(f"{where}: {exc}") from None
