"""``kvtune export PLAN --to TARGET --out DIR``: what a serving engine loads, and the plan of what it will store.

Prints the engine configuration, what had to be rounded up, the effective bits of the plan and of what the engine
really stores (at the plan's reference length), the files written, and the ``kvtune eval`` line that scores the
deployed configuration.
"""

from __future__ import annotations

from typing import Any

import click

from kvtune.commands import DEFAULT_MODEL, console


def export_table(result: Any) -> Any:
    """A rich table of an :class:`~kvtune.export.ExportResult`."""
    from rich.table import Table

    table = Table(title=f"kvtune export -> {result.target}", show_header=False,
                  caption=f"effective bits at {result.engine_plan.reference_length} tokens, everything stored")
    table.add_column("what", style="bold")
    table.add_column("value")
    table.add_row("engine configuration", result.description)
    table.add_row("stores the plan", "exactly" if result.exact else "rounded up (--round-up)")
    table.add_row("effective bits", f"plan {result.plan_bits:.4f} -> engine {result.engine_bits:.4f}")
    for line in result.changes:
        table.add_row("rounded up", line)
    for note in result.notes:
        table.add_row("note", note)
    return table


def register(cli: click.Group) -> None:
    from kvtune.export import TARGETS

    @cli.command()
    @click.argument("plan")
    @click.option("--to", "target", required=True, type=click.Choice(list(TARGETS)), help="Serving engine.")
    @click.option("--out", required=True, help="New (or empty) output directory.")
    @click.option("--model", default=DEFAULT_MODEL, show_default=True,
                  help="Model name or local HF directory (its weights are linked, never modified).")
    @click.option("--calib", default=None, help="Calibration directory (for fp8 scales).")
    @click.option("--round-up", is_flag=True,
                  help="Accept the nearest configuration the engine expresses when it cannot store the plan exactly.")
    @click.option("--copy", is_flag=True, help="Copy the model's files instead of symlinking them.")
    def export(plan: str, target: str, out: str, model: str, calib: str | None, round_up: bool, copy: bool) -> None:
        """Export PLAN (a plan directory or preset) for a serving engine.

        Writes the checkpoint (config.json quantization block + calibrated KV scales, weights linked) and/or a
        launch profile (launch.yaml: flags and the ready shell line), and OUT/kvtune-plan: the kvtune plan of
        exactly what the engine stores, for kvtune eval.
        """
        from kvtune.export import export as run

        result = run(plan, target, out, model=model, calib=calib, round_up=round_up, copy=copy)
        con = console()
        con.print(export_table(result))
        for path in result.files:
            con.print(f"wrote {path}")
        con.print(f"score what will be deployed: kvtune eval --plan {out}/kvtune-plan")
