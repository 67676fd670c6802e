"""One module per ``kvtune`` subcommand; each exposes ``register(cli)``. Rendering lives here."""

from __future__ import annotations

from typing import Any

LOG_WIDTH = 160  # columns when output goes to a file or pipe (rich would assume 80 and truncate the tables)


def console(stderr: bool = False) -> Any:
    """A rich console (imported lazily); wide enough for the eval table when not writing to a terminal."""
    import os
    import sys

    from rich.console import Console

    stream = sys.stderr if stderr else sys.stdout
    width = None if stream.isatty() or "COLUMNS" in os.environ else LOG_WIDTH
    return Console(stderr=stderr, highlight=False, width=width)


DEFAULT_MODEL = "smollm2-135m"
