"""The one exception type users see.

Every problem a user can fix (bad path, wrong model, impossible budget, corrupt file) is raised as
:class:`KVTuneError` with a one-line message that names the problem *and* the fix. The CLI prints
``error: <message>`` to stderr and exits with code 2; library callers can catch it like a
``ValueError``.
"""

from __future__ import annotations


class KVTuneError(ValueError):
    """A user-facing error: one line, says what is wrong and how to fix it."""

    def __init__(self, problem: str, fix: str | None = None) -> None:
        message = problem if fix is None else f"{problem} ({fix})"
        super().__init__(message.replace("\n", " "))
