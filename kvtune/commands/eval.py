"""``kvtune eval``: a plan next to baselines on the same text: bits, bytes, perplexity, KL, top-1, passkey."""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import click

from kvtune.commands import DEFAULT_MODEL, console
from kvtune.errors import KVTuneError

DEFAULT_BASELINES = "fp16,kivi-2bit,kivi-4bit,kv4,k4v2,hf-quanto-4bit"


def split_list(value: str, cast: type, what: str) -> tuple[Any, ...]:
    """``"a,b"`` -> ``(cast(a), cast(b))``; a bad item is a :class:`KVTuneError`."""
    try:
        return tuple(cast(v.strip()) for v in value.split(",") if v.strip())
    except ValueError:
        raise KVTuneError(f"{what}: cannot read {value!r}", "pass comma-separated values") from None


def set_threads(threads: int | None) -> None:
    """Apply ``--threads`` (torch intra-op threads) when given."""
    if threads:
        import torch

        torch.set_num_threads(threads)


@contextmanager
def progress_bar(enabled: bool = True) -> Iterator[Any]:
    """A rich progress bar on stderr, yielded as a ``progress(label, done, total)`` callback; it appears at the
    first update, so an input error raised before any work prints nothing but its own line."""
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

    if not enabled:
        yield None
        return
    bar = Progress(TextColumn("{task.description:<18}"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn(),
                   console=console(stderr=True), transient=False)
    task: list[Any] = []

    def update(label: str, done: int, total: int) -> None:
        if not task:
            bar.start()
            task.append(bar.add_task(label, total=total))
        bar.update(task[0], description=label, completed=done, total=total)

    try:
        yield update
    finally:
        if task:
            bar.stop()


def eval_table(report: Any) -> Any:
    """The rich table of an :class:`~kvtune.eval.report.EvalReport`."""
    from rich.table import Table

    from kvtune.eval.report import COLUMNS, table_cells

    s, ref = report.settings, report.reference
    table = Table(title=f"kvtune eval: {report.model.get('architecture', '')} on {report.data.get('source', '')} "
                        f"(ctx {s['ctx']}, {ref['positions']} positions, chunk {s['chunk']})",
                  caption=f"reference = the model's dense forward without a cache (ppl {ref['ppl']:.3f}); the fp16 "
                          f"row is kvtune's fp16 cache; bits@ctx / bits@ref = bit accountant at {s['ctx']} / "
                          f"{s.get('reference_length', 4096)} tokens; cache MiB measured after {s['ctx']} tokens; "
                          f"KL in nats vs reference, tail = positions >= {s['tail_start']}; gen agree = prefix / "
                          f"overall over {s['gen_tokens']} greedy tokens; passkey at depths "
                          f"{', '.join(map(str, s['passkey_depths']))}")
    for col in COLUMNS:
        table.add_column(col, justify="left" if col in ("method", "passkey") else "right")
    for row in report.rows:
        cells = table_cells(row)
        style = "bold" if row.is_plan else ("dim" if row.error else None)
        table.add_row(*cells, *([""] * (len(COLUMNS) - len(cells))), style=style)
    return table


def method_rows(plan: str | None, baselines: str) -> list[Any]:
    """The plan's row (if any) then the baselines, the plan's own preset not twice."""
    from kvtune.eval.baselines import plan_method, resolve_baselines

    rows = [plan_method(plan)] if plan else []
    return rows + [b for b in resolve_baselines(split_list(baselines, str, "--baselines"))
                   if not rows or not (b.name == rows[0].name
                                       and getattr(b, "plan", None) == getattr(rows[0], "plan", None))]


def _methods(plan: str, baselines: str, model: str) -> list[Any]:
    """:func:`method_rows`, checked against the model's config before any weights load."""
    from kvtune.models import load_identity

    rows = method_rows(plan, baselines)
    rows[0].effective_bits(load_identity(model), 1)  # a plan for another model fails here
    return rows


def _settings(passkey_lengths: str | None, passkey_depths: str, **kwargs: Any) -> Any:
    """:class:`~kvtune.eval.EvalSettings` from the options; a bad value is a one-line error."""
    from kvtune.eval import EvalSettings

    lengths = None if passkey_lengths is None else split_list(passkey_lengths, int, "--passkey-lengths")
    try:
        return EvalSettings(passkey_lengths=lengths, **kwargs,
                            passkey_depths=split_list(passkey_depths, float, "--passkey-depths"))
    except ValueError as exc:
        raise KVTuneError(str(exc)) from None


def _render(report: Any, wall_s: float, json_path: str | None, plot_path: str | None) -> None:
    from kvtune.eval.report import plot, write_json

    report.settings["wall_s"] = round(wall_s, 1)
    out = console()
    out.print(eval_table(report))
    for row in report.rows:
        if row.error:
            out.print(f"note: {row.name} not run: {row.error}")
    jobs = report.settings.get("jobs", 1)
    out.print(f"eval took {wall_s:.0f} s ({report.settings['threads']} thread(s)"
              + (f", {jobs} rows at a time)" if jobs > 1 else ")"))
    for path, write in ((json_path, write_json), (plot_path, plot)):
        if path:
            write(report, path)
            console(stderr=True).print(f"wrote {path}")


def register(cli: click.Group) -> None:
    @cli.command(name="eval")
    @click.option("--plan", "plan", required=True, help="Plan directory or preset name (kivi-2bit, kv4, ...).")
    @click.option("--baselines", default=DEFAULT_BASELINES, show_default=True,
                  help="Comma-separated baselines (presets, hf-quanto-4bit, hf-hqq-4bit, ...); '' for none.")
    @click.option("--model", default=DEFAULT_MODEL, show_default=True, help="Model name or local HF directory.")
    @click.option("--data", default="pydoc:eval", show_default=True, help="pydoc:eval or a UTF-8 text file.")
    @click.option("--ctx", type=click.IntRange(min=2), default=2048, show_default=True,
                  help="Tokens per sequence (perplexity, KL, generation prompt).")
    @click.option("--sequences", type=click.IntRange(min=1), default=2, show_default=True,
                  help="Sequences of --ctx tokens for perplexity/KL/top-1.")
    @click.option("--chunk", type=click.IntRange(min=1), default=64, show_default=True,
                  help="Tokens per forward of the teacher-forced pass (same numbers as token by token).")
    @click.option("--prefill", type=click.IntRange(min=0), default=0, show_default=True,
                  help="First tokens of each sequence fed in one forward (attending in full precision).")
    @click.option("--gen-tokens", type=click.IntRange(min=0), default=64, show_default=True,
                  help="Greedy tokens compared with fp16 (0: skip).")
    @click.option("--gen-prompts", type=click.IntRange(min=0), default=1, show_default=True,
                  help="Prompts (the first --ctx - --gen-tokens + 1 tokens of each sequence) for generation.")
    @click.option("--passkey-lengths", default=None, help="Comma-separated passkey context lengths, up to the "
                  "model's limit (default: 512, 1024, ... up to --ctx); '' to skip passkey.")
    @click.option("--passkey-depths", default="0.5,0.9", show_default=True, help="Needle depths (0..1).")
    @click.option("--seed", type=int, default=0, show_default=True, help="Seed of the passkeys.")
    @click.option("--json", "json_path", type=click.Path(dir_okay=False), default=None, help="Write rows as JSON.")
    @click.option("--plot", "plot_path", type=click.Path(dir_okay=False), default=None,
                  help="Write a PNG of quality vs effective bits.")
    @click.option("--threads", type=click.IntRange(min=1), default=1, show_default=True,
                  help="torch intra-op CPU threads (1 is robust: on a busy 2-core machine 2 threads ran 2-10x "
                       "slower).")
    @click.option("--jobs", type=click.IntRange(min=0), default=0, show_default=True,
                  help="Rows evaluated at a time in forked CPU worker processes, one thread each (0: one per core; "
                       "1 with CUDA). The numbers do not depend on it.")
    @click.option("--no-progress", is_flag=True, help="No progress bar.")
    def eval_cmd(plan: str, baselines: str, model: str, data: str, json_path: str | None, plot_path: str | None,
                 threads: int, jobs: int, no_progress: bool, **options: Any) -> None:
        """Compare PLAN with baselines on the same text: effective bits, cache bytes, perplexity, KL and
        top-1 vs fp16, greedy agreement and passkey retrieval, all through each method's own cache.

        Defaults take about 2 minutes per row for SmolLM2-135M on one CPU core, rows running one per core
        (about 7 minutes for a plan and four baselines on 2 cores).
        """
        import time

        from kvtune.data import load_text
        from kvtune.eval import evaluate
        from kvtune.models import load_model

        start = time.perf_counter()
        rows = _methods(plan, baselines, model)
        settings = _settings(**options)
        text = load_text(data)
        set_threads(threads)
        loaded, tok = load_model(model)
        with progress_bar(not no_progress) as progress:
            report = evaluate(loaded, tok, rows, text, settings, progress=progress, data_name=data, jobs=jobs)
        report.settings.update(reference_length=rows[0].reference_length(), threads=threads)
        _render(report, time.perf_counter() - start, json_path, plot_path)
