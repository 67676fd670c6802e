"""One module per ``kvtune`` subcommand; each exposes ``register(cli)``. Rendering lives here."""

from __future__ import annotations

from typing import Any


def console(stderr: bool = False) -> Any:
    """A rich console (imported lazily)."""
    from rich.console import Console

    return Console(stderr=stderr, highlight=False)


DEFAULT_MODEL = "smollm2-135m"
