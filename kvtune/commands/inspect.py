"""``kvtune inspect PLAN|PRESET``: per-layer K/V specs and exact effective bits."""

from __future__ import annotations

import json
from typing import Any

import click

from kvtune.commands import DEFAULT_MODEL, console
from kvtune.errors import KVTuneError
from kvtune.plan import Plan
from kvtune.quant.bits import layer_bits

LONG_LENGTH = 32768


def inspect_data(plan: Plan, length: int | None = None) -> dict[str, Any]:
    """JSON-able summary of a bound plan: effective bits at the reference length and 32k, per layer."""
    if plan.model is None:
        raise KVTuneError("inspect needs a plan bound to a model", "pass --model")
    ref = length or plan.reference_length
    ident = plan.model
    layers = []
    for i, layer in enumerate(plan.layers):
        heads = layer.head_plans(ident.num_kv_heads)
        layers.append({
            "layer": i,
            "key": [h.key.label() for h in heads] if layer.heads else layer.key.label(),
            "value": [h.value.label() for h in heads] if layer.heads else layer.value.label(),
            "residual": layer.residual,
            "salient": layer.salient.ratio,
            "sink_tokens": layer.salient.sink_tokens,
            "effective_bits": layer_bits(layer, ident.num_kv_heads, ident.head_dim, ref).effective,
        })
    breakdown = plan.bits(ref)
    return {"name": plan.name, "model": ident.to_dict(), "length": ref,
            "effective_bits": breakdown.effective,
            "effective_bits_32k": plan.effective_bits(LONG_LENGTH),
            "breakdown_bits": breakdown.as_dict(), "layers": layers}


def inspect_table(plan: Plan, data: dict[str, Any]) -> Any:
    """A rich table of :func:`inspect_data` (identical layers are folded into one row)."""
    from rich.table import Table

    table = Table(title=f"{plan.name or 'plan'} on {plan.model.architecture} "
                        f"({plan.model.num_layers} layers, {plan.model.num_kv_heads} KV heads, "
                        f"d={plan.model.head_dim})",
                  caption=f"effective bits: {data['effective_bits']:.4f} at {data['length']} tokens, "
                          f"{data['effective_bits_32k']:.4f} at {LONG_LENGTH} tokens (codes, scales, zeros, "
                          "outliers, fp16 tokens: everything stored)")
    for col in ("layers", "key", "value", "residual", "salient", "sinks", "bits"):
        table.add_column(col, justify="right" if col in ("residual", "salient", "sinks", "bits") else "left")
    rows: list[tuple[list[int], dict[str, Any]]] = []
    for row in data["layers"]:
        sig = {k: v for k, v in row.items() if k != "layer"}
        if rows and rows[-1][1] == sig:
            rows[-1][0].append(row["layer"])
        else:
            rows.append(([row["layer"]], sig))
    for idx, sig in rows:
        span = str(idx[0]) if len(idx) == 1 else f"{idx[0]}-{idx[-1]}"
        fmt = (lambda v: ", ".join(v) if isinstance(v, list) else v)
        table.add_row(span, fmt(sig["key"]), fmt(sig["value"]), str(sig["residual"]), f"{sig['salient']:g}",
                      str(sig["sink_tokens"]), f"{sig['effective_bits']:.3f}")
    return table


def register(cli: click.Group) -> None:
    @cli.command()
    @click.argument("plan")
    @click.option("--model", default=DEFAULT_MODEL, show_default=True, help="Model name or local HF directory.")
    @click.option("--length", type=click.IntRange(min=1), default=None,
                  help="Sequence length for the bits (default: the plan's reference length, 4096).")
    @click.option("--json", "as_json", is_flag=True, help="Print a JSON object instead of a table.")
    def inspect(plan: str, model: str, length: int | None, as_json: bool) -> None:
        """Show a plan's per-layer K/V specs and its exact effective bits.

        PLAN is a plan directory or a preset name (fp16, kivi-2bit, kv4, ...).
        """
        from kvtune.models import load_identity
        from kvtune.plan import load_plan

        bound = load_plan(plan).bind(load_identity(model))
        data = inspect_data(bound, length)
        if as_json:
            click.echo(json.dumps(data, indent=2))
        else:
            console().print(inspect_table(bound, data))
