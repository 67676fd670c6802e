"""``kvtune calibrate``: run :func:`kvtune.calibrate.run.calibrate` with a progress bar and a short summary.

The progress bar has one row per stage (load, statistics pass, sensitivity, end-to-end KL, save) showing
chunks or layers done, the last layer, the model's tokens/s and the stage's ETA; it is driven by the
:class:`~kvtune.calibrate.settings.Progress` callback and drawn on stderr. The summary (stdout) is read
from the returned :class:`~kvtune.calibrate.artifact.Calibration`: the same numbers ``calib.yaml`` holds.
"""

from __future__ import annotations

import re
import time
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import click

from kvtune.calibrate.settings import ProgressEvent
from kvtune.commands import DEFAULT_MODEL, console
from kvtune.errors import KVTuneError

STAGES = {"load": "load model", "stats": "stats (chunks)", "sensitivity": "sensitivity (layers)",
          "kl": "KL (layers)", "save": "save"}
TOP = 5  # rows of the "top outlier channels" / "most sensitive layers" lines
_DEVICE = re.compile(r"^(auto|cpu|cuda(:\d+)?)$")


class StageBar:
    """A :class:`~kvtune.calibrate.settings.Progress` callback drawing one rich task per stage on stderr.

    The rich bar starts at the first event, so an error raised before any work prints nothing but its own
    line; with ``enabled`` False it only records which stages ran.
    """

    def __init__(self, enabled: bool = True) -> None:
        self.enabled = enabled
        self.bar: Any | None = None
        self.tasks: dict[str, Any] = {}  # stage -> rich task id
        self.totals: dict[str, int] = {}
        self.stages: list[str] = []

    def __call__(self, event: ProgressEvent) -> None:
        if event.stage not in self.stages:
            self.stages.append(event.stage)
        if not self.enabled or event.stage == "done":
            return
        if self.bar is None:
            self.bar = _rich_progress()
            self.bar.start()
        if event.stage not in self.tasks:
            self._finish()
            total = None if event.stage == "load" else event.total  # loading: an indeterminate bar
            self.tasks[event.stage] = self.bar.add_task(STAGES.get(event.stage, event.stage), total=total, info="")
        info = [f"layer {event.layer}"] if event.layer is not None else []
        if event.tokens_per_s:
            info.append(f"{event.tokens_per_s:,.0f} tok/s")
        self.totals[event.stage] = max(event.total, 1)
        self.bar.update(self.tasks[event.stage], completed=event.done, info="  ".join(info))

    def _finish(self) -> None:
        """Mark the stages seen so far as complete (the next stage started, or the run ended)."""
        for stage, task_id in self.tasks.items():
            self.bar.update(task_id, total=self.totals[stage], completed=self.totals[stage])

    def close(self, completed: bool) -> None:
        """Stop the rich bar (stages shown as complete if the run ``completed``)."""
        if self.bar is not None:
            if completed:
                self._finish()
            self.bar.stop()

    @property
    def reused(self) -> bool:
        """True when no model was loaded: an existing calibration with the same inputs was returned."""
        return "load" not in self.stages


def _rich_progress() -> Any:
    from rich.progress import (
        BarColumn,
        MofNCompleteColumn,
        Progress,
        TextColumn,
        TimeElapsedColumn,
        TimeRemainingColumn,
    )

    columns = (TextColumn("{task.description:<20}"), BarColumn(bar_width=30), MofNCompleteColumn(),
               TextColumn("{task.fields[info]:<24}"), TimeElapsedColumn(), TextColumn("ETA"), TimeRemainingColumn())
    return Progress(*columns, console=console(stderr=True), transient=False)


@contextmanager
def stage_bar(enabled: bool = True) -> Iterator[StageBar]:
    """A :class:`StageBar` for the ``with`` block; its rich bar (if it started) is always stopped."""
    callback, completed = StageBar(enabled), False
    try:
        yield callback
        completed = True
    finally:
        callback.close(completed)


def _top_channels(scores: Any, n: int = TOP) -> str:
    """``scores`` ``[L, H, D]`` outlier scores -> the ``n`` largest as ``"L3 h1 c37 24.1x, ..."``."""
    flat = scores.flatten()
    top = flat.topk(min(n, flat.numel()))
    _, h, d = scores.shape
    return ", ".join(f"L{i // (h * d)} h{i // d % h} c{i % d} {v:.1f}x" for v, i in zip(top.values.tolist(),
                                                                                   top.indices.tolist()))


def _top_layers(per_layer: Any, n: int = TOP) -> str:
    """``per_layer`` ``[L]`` -> the ``n`` largest as ``"L0 0.31, L5 0.12, ..."``."""
    top = per_layer.topk(min(n, per_layer.numel()))
    return ", ".join(f"L{i} {v:.3g}" for v, i in zip(top.values.tolist(), top.indices.tolist()))


def _sinks(summary: dict[str, Any], n_layers: int) -> str:
    """``summary["sink_tokens"]`` (layer -> positions) -> ``"token 0 in 28/30 layers, token 7 in 1/30"``."""
    counts: dict[int, int] = {}
    for positions in summary.get("sink_tokens", {}).values():
        for p in positions:
            counts[int(p)] = counts.get(int(p), 0) + 1
    if not counts:
        return "none"
    return ", ".join(f"token {p} in {c}/{n_layers} layers" for p, c in sorted(counts.items(), key=lambda x: -x[1]))


def _timing(t: dict[str, Any]) -> str:
    """``calib.timing`` -> ``"114.0 s (stats 91.0 s at 675 tok/s, ...), peak RSS 2,091 MiB"``."""
    stages = (f"stats {t.get('stats_s', 0):.1f} s at {t.get('stats_tokens_per_s', 0):,.0f} tok/s, "
              f"sensitivity {t.get('sensitivity_s', 0):.1f} s, KL {t.get('kl_s', 0):.1f} s")
    return f"{t.get('total_s', 0):.1f} s ({stages}), peak RSS {t.get('peak_rss_mib', 0):,.0f} MiB"


def summary_rows(calib: Any) -> list[tuple[str, str]]:
    """``(label, text)`` rows of the end-of-run summary of a :class:`~kvtune.calibrate.artifact.Calibration`."""
    from kvtune.calibrate.sensitivity import default_kl_candidates

    s, m = calib.summary, calib.model
    k2, v2 = default_kl_candidates(calib.key_candidates, calib.value_candidates)
    key2, value2 = calib.key_candidates[k2[0]].label(), calib.value_candidates[v2[0]].label()
    model = (f"{m['architecture']} ({m['num_layers']} layers, {m['num_heads']} heads, "
             f"{m['num_kv_heads']} KV heads, d={m['head_dim']})")
    tokens = (f"{s.get('tokens_used', 0):,} ({s.get('sequences', 0)} x {calib.settings.seq_len}) "
              f"from {calib.data.get('source', '?')}")
    patterns = ", ".join(f"{label} {count}" for label, count in s.get("pattern_counts", {}).items())
    return [
        ("model", model), ("tokens", tokens), ("time", _timing(dict(calib.timing))),
        ("attention sinks", _sinks(dict(s), calib.num_layers)),
        ("outlier keys", _top_channels(calib.tensor("outliers.key_scores"))),
        ("outlier keys pre-RoPE", _top_channels(calib.tensor("outliers.key_pre_rope_scores"))),
        ("outlier values", _top_channels(calib.tensor("outliers.value_scores"))),
        ("head patterns", patterns),
        (f"sensitive: K {key2}", _top_layers(calib.tensor("sensitivity.key")[:, :, k2[0]].mean(dim=1))),
        (f"sensitive: V {value2}", _top_layers(calib.tensor("sensitivity.value")[:, :, v2[0]].mean(dim=1))),
        (f"KL: K {key2}", _top_layers(calib.tensor("kl.key")[:, 0])),
        (f"KL: V {value2}", _top_layers(calib.tensor("kl.value")[:, 0])),
    ]


def summary_table(calib: Any, out: str, wall_s: float, reused: bool) -> Any:
    """The rich table printed at the end of ``kvtune calibrate``."""
    from rich.table import Table

    state = "reused (same model, data and settings; --force recomputes)" if reused else f"written in {wall_s:.1f} s"
    table = Table(title=f"calibration in {out}: {state}", show_header=False,
                  caption="outliers: channel absmax / the head's median channel absmax; sensitivity: relative "
                          "attention-output error (mean over KV heads); KL: end-to-end, one layer quantized")
    table.add_column("what", style="bold")
    table.add_column("value", overflow="fold")
    for label, text in summary_rows(calib):
        table.add_row(label, text)
    return table


def _check_device(_ctx: Any, _param: Any, value: str) -> str:
    if not _DEVICE.match(value):
        raise KVTuneError(f"unknown device {value!r}", "use auto, cpu, cuda or cuda:N")
    return value


def register(cli: click.Group) -> None:
    @cli.command()
    @click.option("--model", default=DEFAULT_MODEL, show_default=True, help="Model name or local HF directory.")
    @click.option("--data", default="pydoc:calib", show_default=True, help="pydoc:calib, pydoc:eval or a text file.")
    @click.option("--tokens", type=click.IntRange(min=1), default=32768, show_default=True,
                  help="At most this many tokens (all the text has, if fewer).")
    @click.option("--seq-len", type=click.IntRange(min=1), default=2048, show_default=True,
                  help="Tokens per sequence.")
    @click.option("--out", default="kvtune-calib", show_default=True, help="Output directory.")
    @click.option("--device", default="auto", show_default=True, callback=_check_device,
                  help="auto (a GPU when there is one), cpu, cuda or cuda:N.")
    @click.option("--force", is_flag=True, help="Recompute even if --out holds a calibration of the same "
                                                "inputs; replace one of another model.")
    @click.option("--no-progress", is_flag=True, help="No progress bar.")
    def calibrate(model: str, data: str, tokens: int, seq_len: int, out: str, device: str, force: bool,
                  no_progress: bool) -> None:
        """Measure K/V statistics, attention sinks/patterns and per-layer quantization sensitivity.

        Writes OUT/calib.yaml + OUT/calib.safetensors, which 'kvtune search' reads.
        """
        from kvtune.calibrate.run import calibrate as run_calibrate

        start = time.perf_counter()
        with stage_bar(not no_progress) as progress:
            calib = run_calibrate(model, data=data, tokens=tokens, seq_len=seq_len, out=out, device=device,
                                  force=force, progress=progress)
        console().print(summary_table(calib, out, time.perf_counter() - start, progress.reused))
