"""``kvtune demo``: the three steps in order with the arguments a user would type; a missing step is clear."""

from __future__ import annotations

from pathlib import Path

import click
import pytest

from kvtune.commands import demo
from kvtune.errors import KVTuneError


def _group(calls: list[tuple[str, tuple[str, ...]]], steps: tuple[str, ...]) -> click.Group:
    """A CLI with fake ``steps`` commands that record their arguments, plus the real ``demo``."""
    group = click.Group()
    for name in steps:
        def record(args: tuple[str, ...], name: str = name) -> None:
            calls.append((name, args))

        group.add_command(click.Command(name, callback=record, params=[click.Argument(["args"], nargs=-1)],
                                        context_settings={"ignore_unknown_options": True}))
    demo.register(group)
    return group


def test_demo_runs_calibrate_search_eval(tmp_path: Path) -> None:
    calls: list[tuple[str, tuple[str, ...]]] = []
    _group(calls, ("calibrate", "search", "eval")).main(
        ["demo", "--dir", str(tmp_path), "--no-progress"], standalone_mode=False)
    assert [name for name, _ in calls] == ["calibrate", "search", "eval"]
    calib, search, evaluate = (args for _, args in calls)
    assert "--out" in calib and str(tmp_path / "kvtune-calib") in calib
    assert search[:2] == ("--budget", "2.0bit") and str(tmp_path / "kvtune-plan") in search
    assert evaluate[:4] == ("--plan", str(tmp_path / "kvtune-plan"), "--baselines", demo.DEMO_BASELINES)
    assert str(tmp_path / "eval.json") in evaluate and "--no-progress" in evaluate


def test_demo_names_the_missing_step(tmp_path: Path) -> None:
    calls: list[tuple[str, tuple[str, ...]]] = []
    with pytest.raises(KVTuneError, match=r"demo step 'search'.*not installed"):
        _group(calls, ("calibrate", "eval")).main(["demo", "--dir", str(tmp_path), "--no-progress"],
                                                  standalone_mode=False)
    assert [name for name, _ in calls] == ["calibrate"]


def test_demo_step_error_is_one_line(tmp_path: Path) -> None:
    group = click.Group()

    @group.command(name="calibrate", context_settings={"ignore_unknown_options": True, "allow_extra_args": True})
    def failing() -> None:
        raise KVTuneError("calibration not found")

    with pytest.raises(KVTuneError, match="demo step 'calibrate' failed: calibration not found"):
        demo.run_step(group, "calibrate", ["--x"])
