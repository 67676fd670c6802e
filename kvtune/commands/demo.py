"""``kvtune demo``: README command (1) in one process: calibrate -> search -> eval on the embedded model.

Each step is the real subcommand, invoked in-process with the arguments a user would type (its progress bar
and table included), so the demo shows exactly what the three commands do. A step whose command is not
installed fails with its one-line error and the step's name. Outputs go under ``--dir``: ``kvtune-calib/``,
``kvtune-plan/``, ``eval.json`` and ``eval.png``; a rerun reuses the calibration when its inputs match.

Measured (2 cores of an AMD EPYC, SmolLM2-135M, defaults, other jobs running): calibrate 248 s, search 169 s, eval
of the plan and four baselines 402 s (two rows at a time): 13.6 minutes in all.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import click

from kvtune.commands import DEFAULT_MODEL, console
from kvtune.errors import KVTuneError

DEMO_BASELINES = "fp16,kivi-2bit,kv4,k4v2"


@dataclass(frozen=True)
class DemoArgs:
    """What the demo was asked for; each step turns it into its command's argument list."""

    out: Path
    model: str
    budget: str
    baselines: str
    progress: bool

    @property
    def calib(self) -> Path:
        return self.out / "kvtune-calib"

    @property
    def plan(self) -> Path:
        return self.out / "kvtune-plan"

    def common(self) -> list[str]:
        return [] if self.progress else ["--no-progress"]


def _calibrate(a: DemoArgs) -> list[str]:
    return ["--model", a.model, "--out", str(a.calib), *a.common()]


def _search(a: DemoArgs) -> list[str]:
    return ["--budget", a.budget, "--calib", str(a.calib), "--out", str(a.plan), *a.common()]


def _eval(a: DemoArgs) -> list[str]:
    return ["--plan", str(a.plan), "--baselines", a.baselines, "--model", a.model,
            "--json", str(a.out / "eval.json"), "--plot", str(a.out / "eval.png"), *a.common()]


# step name -> command-line arguments of that subcommand (run in this order)
STEPS: dict[str, Callable[[DemoArgs], list[str]]] = {"calibrate": _calibrate, "search": _search, "eval": _eval}


def run_step(cli: click.Group, name: str, args: list[str]) -> None:
    """Run ``kvtune NAME ARGS`` in this process; its errors are re-raised naming the step."""
    command = cli.commands.get(name)
    if command is None:
        raise KVTuneError(f"demo step '{name}': 'kvtune {name}' is not installed in this version",
                          f"run the steps by hand once 'kvtune {name}' exists")
    try:
        command.main(args=args, prog_name=f"kvtune {name}", standalone_mode=False)
    except KVTuneError as exc:
        raise KVTuneError(f"demo step '{name}' failed: {exc}") from None


def register(cli: click.Group) -> None:
    @cli.command()
    @click.option("--dir", "out", type=click.Path(file_okay=False, path_type=Path), default=Path("kvtune-demo"),
                  show_default=True, help="Working directory for the calibration, plan and results.")
    @click.option("--model", default=DEFAULT_MODEL, show_default=True, help="Model name or local HF directory.")
    @click.option("--budget", default="2.0bit", show_default=True, help="Search budget in effective bits.")
    @click.option("--baselines", default=DEMO_BASELINES, show_default=True, help="Baselines of the eval table.")
    @click.option("--no-progress", is_flag=True, help="No progress bars.")
    def demo(out: Path, model: str, budget: str, baselines: str, no_progress: bool) -> None:
        """calibrate -> search --budget -> eval on the embedded model, printing each step's table
        (about 12 minutes on 2 CPU cores)."""
        args = DemoArgs(out=out, model=model, budget=budget, baselines=baselines, progress=not no_progress)
        out.mkdir(parents=True, exist_ok=True)
        con, times = console(), {}
        for name, build in STEPS.items():
            con.rule(f"kvtune {name} {' '.join(build(args))}")
            start = time.perf_counter()
            run_step(cli, name, build(args))
            times[name] = time.perf_counter() - start
        con.print("demo done in " + ", ".join(f"{k} {v:.0f} s" for k, v in times.items())
                  + f" ({sum(times.values()) / 60:.1f} min); results in {out}/eval.json and {out}/eval.png")
