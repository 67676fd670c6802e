"""The ``kvtune`` command: parse arguments, call the public API, render with rich. Nothing else.

Every user-fixable problem is a :class:`~kvtune.errors.KVTuneError` (or a click usage error): it is
printed as one ``error: ...`` line on stderr with exit code 2, never a traceback.
"""

from __future__ import annotations

import logging
import sys

import click

from kvtune.errors import KVTuneError


@click.group(context_settings={"help_option_names": ["-h", "--help"]})
@click.option("-v", "--verbose", count=True, help="More logging (-v info, -vv debug).")
@click.version_option(package_name="kvtune", message="kvtune %(version)s")
def cli(verbose: int) -> None:
    """Make the KV cache of transformer LLMs small and fast: calibrate, search, eval, bench."""
    level = logging.WARNING - 10 * min(verbose, 2)
    logging.basicConfig(level=level, format="%(levelname)s %(name)s: %(message)s")
    if not verbose:  # transformers 5.2x renames generate's cache argument; kvtune passes it the documented way
        import warnings

        warnings.filterwarnings("ignore", message=r".*`past_key_values` is deprecated", category=FutureWarning)


def main(argv: list[str] | None = None) -> int:
    """Console entry point: one line and exit code 2 on user errors."""
    _register_commands()
    try:
        cli.main(args=argv, standalone_mode=False, prog_name="kvtune")
    except KVTuneError as exc:
        click.echo(f"error: {exc}", err=True)
        return 2
    except click.exceptions.Abort:
        click.echo("error: aborted", err=True)
        return 130
    except click.ClickException as exc:
        click.echo(f"error: {exc.format_message()} (see 'kvtune --help')", err=True)
        return 2
    except click.exceptions.Exit as exc:
        return exc.exit_code
    return 0


_REGISTERED = False


COMMANDS = ("inspect", "calibrate", "search", "export", "eval", "bench", "demo")


def _register_commands() -> None:
    """Attach the stage commands (each module of :mod:`kvtune.commands` adds its own)."""
    global _REGISTERED
    if _REGISTERED:
        return
    _REGISTERED = True
    import importlib

    for name in COMMANDS:
        importlib.import_module(f"kvtune.commands.{name}").register(cli)


if __name__ == "__main__":
    sys.exit(main())
