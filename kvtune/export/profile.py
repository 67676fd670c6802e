"""Launch profiles: ``launch.yaml`` with the engine, its KV-cache flags and the ready shell line."""

from __future__ import annotations

import shlex
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from kvtune.io import read_yaml, write_yaml_atomic

PROFILE = "launch.yaml"
PROFILE_VERSION = 1


def write_profile(out: Path, engine: str, program: Sequence[str], flags: Sequence[str],
                  notes: Sequence[str] = (), **extra: Any) -> Path:
    """``out/launch.yaml``: ``program`` (argv before the flags), ``flags`` (argv), the joined shell ``command``."""
    data: dict[str, Any] = {"schema_version": PROFILE_VERSION, "engine": engine, "program": list(program),
                            "flags": list(flags), "command": shlex.join([*program, *flags])}
    data.update(extra)
    if notes:
        data["notes"] = list(notes)
    write_yaml_atomic(out / PROFILE, data)
    return out / PROFILE


def read_flags(out: Path) -> dict[str, list[str]]:
    """The profile's flags as ``{--flag: [values...]}`` (values up to the next flag)."""
    data = read_yaml(out / PROFILE, "launch profile")
    flags: dict[str, list[str]] = {}
    current = None
    for token in data.get("flags", []):
        if str(token).startswith("-"):
            current = str(token)
            flags[current] = []
        elif current is not None:
            flags[current].append(str(token))
    return flags
