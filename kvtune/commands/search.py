"""``kvtune search``: run :func:`kvtune.search.search` with a rich progress bar and a summary table.

The bar shows the trials of this run (done / total, best proxy within the budget and its bits, ETA), then
the end-to-end validation of the best candidates. The summary (stdout) names the chosen plan's effective
bits, proxy, validated KL and perplexity, the Spearman rank correlation of proxy vs validated KL, and the
files written. ``--trials 0`` re-solves an existing study at ``--budget`` without reading the calibration.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import click

from kvtune.commands import console
from kvtune.errors import KVTuneError


class TrialBar:
    """A :class:`~kvtune.search.SearchProgress` callback drawing one rich task per stage (or nothing)."""

    def __init__(self, bar: Any | None) -> None:
        self.bar = bar
        self.tasks: dict[str, Any] = {}

    def __call__(self, event: Any) -> None:
        if self.bar is None or event.stage == "done":
            return
        if event.stage not in self.tasks:
            label = "trials" if event.stage == "trials" else "validate (model)"
            self.tasks[event.stage] = self.bar.add_task(label, total=event.total, best="")
        best = ""
        if event.best_proxy is not None:
            best = f"best proxy {event.best_proxy:.4g} at {event.best_bits:.3f} bits"
        self.bar.update(self.tasks[event.stage], completed=event.done, total=event.total, best=best)


@contextmanager
def trial_bar(enabled: bool = True) -> Iterator[TrialBar]:
    """A :class:`TrialBar` on a rich progress bar on stderr (a silent one when not ``enabled``)."""
    from rich.progress import (
        BarColumn,
        MofNCompleteColumn,
        Progress,
        TextColumn,
        TimeElapsedColumn,
        TimeRemainingColumn,
    )

    if not enabled:
        yield TrialBar(None)
        return
    columns = (TextColumn("{task.description:<16}"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn(),
               TextColumn("eta"), TimeRemainingColumn(), TextColumn("{task.fields[best]}"))
    with Progress(*columns, console=console(stderr=True), transient=False) as bar:
        yield TrialBar(bar)


POOR_KL = 1.0  # nats/token: above this the plan's next-token distributions differ grossly from fp16's


def _fmt(value: float | None, spec: str) -> str:
    return "-" if value is None else format(value, spec)


def summary_table(result: Any) -> Any:
    """The rich table of a :class:`~kvtune.search.SearchResult`: chosen plan, its check, the presets."""
    from rich.table import Table

    v = result.validation or {}
    picked = next((p for p in result.front if p["trial"] == result.trial), {})
    caption = (f"effective bits at {result.plan.reference_length} tokens, everything stored; proxy = predicted KL "
               f"from calibration tables; KL (nats/token) and ppl vs fp16 on {v.get('text', '-')}, each plan at "
               f"the longest fidelity it reached (tokens; successive halving over {v.get('fidelities', '-')}), "
               f"{v.get('path', 'not validated')}")
    if not v:
        caption = "not validated (--validate 0): chosen by the proxy (predicted KL from calibration tables)"
    elif "skipped" in v:
        caption = f"not validated: {v['skipped']}"
    table = Table(title=f"kvtune search: {result.budget:g}-bit budget, study {result.study!r} "
                        f"({result.trials_run} trials run, {result.trials_total} in the study)", caption=caption)
    for col in ("plan", "kind", "bits", "proxy", "KL", "ppl", "tokens"):
        table.add_column(col, justify="left" if col in ("plan", "kind") else "right")
    j = result.judgement
    if not j:
        table.add_row(f"trial {result.trial}", "searched", f"{result.effective_bits:.4f}", _fmt(result.proxy, ".4g"),
                      _fmt(result.kl, ".4f"), _fmt(picked.get("ppl"), ".3f"), "-", style="bold")
        return table
    rows = sorted(enumerate(j["entries"]), key=lambda r: (-r[1].get("length", 0), _key(r[1].get("kl"))))
    for i, e in rows:
        style = "bold" if i == j["winner"] else "cyan" if i == j["best_baseline"] else "dim"
        name = e["name"] + (" (chosen)" if i == j["winner"] else " (best baseline)" if i == j["best_baseline"] else "")
        table.add_row(name, e["kind"], f"{e['bits']:.4f}", _fmt(e.get("proxy"), ".4g"), _fmt(e.get("kl"), ".4f"),
                      _fmt(e.get("ppl"), ".3f"), str(e.get("length", "-")), style=style)
    return table


def _key(kl: float | None) -> float:
    return float("inf") if kl is None or kl != kl else kl


def _notes(result: Any) -> list[str]:
    """Lines printed under the table: proxy quality, reference, timing, files."""
    lines = []
    if result.kl is not None and result.kl > POOR_KL:
        lines.append(f"[bold yellow]warning:[/] at {result.budget:g} bits the best plan found has validated KL "
                     f"{result.kl:.2f} nats/token to fp16: expect a large loss of quality (try a larger --budget)")
    j = result.judgement
    if j:
        won = j["entries"][j["winner"]]
        if won["kind"] != "searched":
            lines.append(f"[bold]no searched plan beat the baseline {won['name']}: wrote it[/] (a baseline within the "
                         "budget validated best)")
        held = j.get("spearman_heldout")
        raw = j.get("spearman_raw")
        lines.append(f"Spearman(proxy, KL at the first fidelity): {_fmt(raw, '.3f')}; corrected proxy on held-out "
                     f"plans (leave one out): {_fmt(held, '.3f')}; correction: keys x{j['correction']['key']:.3g}, "
                     f"values x{j['correction']['value']:.3g}")
    secs = result.seconds
    if secs:
        lines.append("seconds: " + ", ".join(f"{k} {v:.1f}" for k, v in secs.items()))
    lines += [f"wrote {path}" for path in result.files.values()]
    lines.append(f"study: {result.storage} (study {result.study!r}; watch it with optuna-dashboard)")
    return lines


def _set_threads(threads: int | None) -> None:
    """``threads`` torch threads; by default 1 on a machine whose load average already fills its CPUs."""
    import os

    import torch

    busy = hasattr(os, "getloadavg") and os.getloadavg()[0] >= (os.cpu_count() or 1)
    if threads or busy:
        torch.set_num_threads(threads or 1)


def register(cli: click.Group) -> None:
    @cli.command()
    @click.option("--budget", required=True, help="Effective bits per K/V element: 2.0bit, 2bit or 2.0.")
    @click.option("--calib", default="kvtune-calib", show_default=True, help="Calibration directory.")
    @click.option("--out", default="kvtune-plan", show_default=True,
                  help="Output directory: plan.yaml/.safetensors, pareto.json/.png, bits.png, study.db.")
    @click.option("--trials", type=click.IntRange(min=0), default=300, show_default=True,
                  help="Trials to add in this run (a rerun continues the study; 0 = re-solve it at --budget).")
    @click.option("--granularity", type=click.Choice(["layer", "head"]), default="layer", show_default=True,
                  help="Choose K/V quantizers per layer or per KV head.")
    @click.option("--sampler", type=click.Choice(["nsga2", "tpe"]), default="nsga2", show_default=True,
                  help="Optuna sampler (multi-objective: proxy and bits, the budget as a constraint).")
    @click.option("--storage", default=None, help="Optuna storage URL (default sqlite:///OUT/study.db; "
                  "postgresql://user:pass@host/db to share one study between machines).")
    @click.option("--study", default=None, help="Study name (default kvtune-search).")
    @click.option("--seed", type=int, default=0, show_default=True, help="Sampler seed (same seed, same trials).")
    @click.option("--validate", type=click.IntRange(min=0), default=8, show_default=True,
                  help="Best Pareto candidates checked end to end with the model (0 = choose by proxy).")
    @click.option("--groups", type=click.IntRange(min=1), default=None,
                  help="Clusters of layers (or heads) sharing one choice (default 8).")
    @click.option("--tokens", type=click.Choice(["sinks", "salient", "all"]), default="sinks", show_default=True,
                  help="Token policies searched: first token in fp16 or not; 'salient' adds salient tokens "
                       "at more bits (their predicted gain is overrated; validation judges); 'all' also adds "
                       "Elastic Cache merging (25% or 50% of the mergeable tokens; fewer bits, charged in the "
                       "proxy) and salient tokens with image/video tokens weighted 4x (for VLMs).")
    @click.option("--model", default=None, help="Model for validation (default: the embedded model, "
                  "when it is the calibrated one).")
    @click.option("--threads", type=click.IntRange(min=1), default=None,
                  help="torch intra-op CPU threads for validation (default: torch's choice, or 1 when the load "
                       "average is already at the CPU count: oversubscribed threads made it 5x slower).")
    @click.option("--no-progress", is_flag=True, help="No progress bar.")
    @click.option("--target", type=click.Choice(_targets()), default=None,
                  help="Only what this serving engine expresses (vllm: one cache dtype + skipped layers; llama.cpp: "
                       "one K and one V type; modelopt: a format per layer); export the plan with kvtune export.")
    def search(budget: str, calib: str, out: str, trials: int, granularity: str, sampler: str,
               storage: str | None, study: str | None, seed: int, validate: int, groups: int | None,
               tokens: str, model: str | None, threads: int | None, no_progress: bool, target: str | None) -> None:
        """Find a per-layer (or per-head) K/V quantization plan within --budget effective bits.

        Scores trials from the calibration tables (no model forward), validates the best candidates end
        to end, and writes the plan plus the Pareto report. Defaults take under 3 minutes on 2 CPU cores
        for the embedded model.
        """
        from kvtune import search as api

        _set_threads(threads)
        if Path(out).exists() and not Path(out).is_dir():
            raise KVTuneError(f"--out {out} is a file, not a directory", "pass a new or existing directory")
        if target is not None:
            _engine_search(calib, budget, target, out)
            return
        with trial_bar(not no_progress) as bar:
            if trials == 0:
                result = api.resolve(storage or out, study or api.DEFAULT_STUDY, budget, out=out,
                                     validate=validate, model=model, progress=bar)
            else:
                if not Path(calib).exists():
                    raise KVTuneError(f"calibration not found: {calib}",
                                      "run kvtune calibrate first or pass --calib DIR")
                result = api.search(calib, budget, out=out, trials=trials, granularity=granularity,
                                    sampler=sampler, storage=storage, study=study, seed=seed, validate=validate,
                                    groups=groups, progress=bar, model=model, tokens=tokens)
        con = console()
        con.print(summary_table(result))
        for line in _notes(result):
            con.print(line)


def _targets() -> list[str]:
    from kvtune.export import TARGETS

    return list(TARGETS)


def _engine_search(calib: str, budget: str, target: str, out: str) -> None:
    """``--target``: the engine-constrained search (:mod:`kvtune.search.engine`) and its summary."""
    from rich.table import Table

    from kvtune.search.budget import parse_budget
    from kvtune.search.engine import engine_search

    if not Path(calib).exists():
        raise KVTuneError(f"calibration not found: {calib}", "run kvtune calibrate first or pass --calib DIR")
    result = engine_search(calib, parse_budget(budget), target, out)
    table = Table(title=f"kvtune search --target {target}: {parse_budget(budget):g}-bit budget",
                  caption="predicted KL (nats/token) from the calibration's reservoir attention error x layer KL "
                          "weights; effective bits at 4096 tokens, everything stored")
    for col in ("engine configuration", "bits", "predicted KL"):
        table.add_column(col, justify="left" if col.startswith("engine") else "right")
    for t in sorted(result.tried, key=lambda t: t["bits"]):
        chosen = t["engine"] == result.description and abs(t["bits"] - result.effective_bits) < 1e-9
        table.add_row(t["engine"], f"{t['bits']:.4f}", f"{t['predicted_kl']:.4g}",
                      style="bold" if chosen else ("dim" if t["bits"] > parse_budget(budget) else None))
    con = console()
    con.print(table)
    con.print(f"wrote {out}/plan.yaml ({result.description}); deploy it: kvtune export {out} --to {target} "
              f"--out DIR --calib {calib}")
