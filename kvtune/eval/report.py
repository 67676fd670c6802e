"""Results of ``kvtune eval``: rows, the JSON schema, table cells and the quality-vs-bits plot.

Rendering with rich happens in :mod:`kvtune.commands.eval`; this module only turns results into plain data
(dicts, strings) and a PNG (matplotlib with the Agg backend, imported lazily).
"""

from __future__ import annotations

import json
import math
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from kvtune.io import atomic_path, write_text_atomic

SCHEMA_VERSION = 1

# name -> accepted JSON types of every row (None allowed where a row could not run)
ROW_SCHEMA: dict[str, tuple[type, ...]] = {
    "name": (str,), "is_plan": (bool,), "effective_bits": (float, int), "effective_bits_ref": (float, int),
    "ppl": (float, int), "delta_ppl": (float, int), "kl": (float, int), "top1": (float, int),
    "passkey": (float, int), "cache_bytes": (int,), "error": (str,),
}
REPORT_KEYS = ("schema_version", "kvtune_version", "model", "data", "settings", "reference", "rows")


@dataclass
class EvalRow:
    """One method's results; metrics stay None when the row could not run (``error`` says why)."""

    name: str
    description: str = ""
    is_plan: bool = False
    effective_bits: float | None = None      # bit accountant at --ctx tokens
    effective_bits_ref: float | None = None  # bit accountant at the plan's reference length (4096)
    cache_bytes: int | None = None           # measured on the live cache after ctx tokens
    cache_tokens: int | None = None
    measured_bits: float | None = None       # cache_bytes * 8 / (K and V elements held)
    ppl: float | None = None
    delta_ppl: float | None = None           # ppl - fp16 reference ppl
    delta_ppl_pct: float | None = None
    kl: float | None = None
    top1: float | None = None
    ppl_tail: float | None = None
    kl_tail: float | None = None
    top1_tail: float | None = None
    passkey: float | None = None
    passkey_by_length: dict[str, float] = field(default_factory=dict)
    passkey_cases: list[dict[str, Any]] = field(default_factory=list)
    gen_agree_prefix: float | None = None
    gen_agree: float | None = None
    seconds: dict[str, float] = field(default_factory=dict)
    error: str | None = None

    def to_dict(self) -> dict[str, Any]:
        return {k: _json_number(v) for k, v in asdict(self).items()}


@dataclass
class EvalReport:
    """Everything ``kvtune eval`` measured, JSON round-trippable via :meth:`to_dict`."""

    model: dict[str, Any]
    data: dict[str, Any]
    settings: dict[str, Any]
    reference: dict[str, Any]
    rows: list[EvalRow]

    def to_dict(self) -> dict[str, Any]:
        from kvtune import __version__

        return {"schema_version": SCHEMA_VERSION, "kvtune_version": __version__, "model": self.model,
                "data": self.data, "settings": self.settings,
                "reference": {k: _json_number(v) for k, v in self.reference.items()},
                "rows": [r.to_dict() for r in self.rows]}


def _json_number(v: Any) -> Any:
    """NaN/inf become None (strict JSON)."""
    return None if isinstance(v, float) and not math.isfinite(v) else v


def validate_report(data: dict[str, Any]) -> None:
    """Raise ``ValueError`` naming the first key or row field that does not follow the schema."""
    missing = [k for k in REPORT_KEYS if k not in data]
    if missing:
        raise ValueError(f"report lacks {missing}")
    if data["schema_version"] != SCHEMA_VERSION:
        raise ValueError(f"schema_version {data['schema_version']} != {SCHEMA_VERSION}")
    for i, row in enumerate(data["rows"]):
        for key, types in ROW_SCHEMA.items():
            if key not in row:
                raise ValueError(f"row {i} lacks {key!r}")
            value = row[key]
            if value is not None and (not isinstance(value, types) or (isinstance(value, bool) and bool not in types)):
                raise ValueError(f"row {i} field {key!r} has type {type(value).__name__}")


def write_json(report: EvalReport | dict[str, Any], path: str | Path) -> Path:
    """Write a report (validated) as indented JSON, atomically."""
    data = report.to_dict() if isinstance(report, EvalReport) else report
    validate_report(data)
    write_text_atomic(path, json.dumps(data, indent=2, allow_nan=False) + "\n")
    return Path(path)


COLUMNS = ("method", "bits@ctx", "bits@ref", "cache MiB", "ppl", "Δppl", "KL", "top-1", "tail KL", "gen agree",
           "passkey", "time s")


def _fmt(v: float | None, spec: str) -> str:
    return "–" if v is None or (isinstance(v, float) and not math.isfinite(v)) else format(v, spec)


def table_cells(row: EvalRow) -> list[str]:
    """Cells of one row for :data:`COLUMNS` (an unavailable row: name then its reason)."""
    name = f"{row.name} (plan)" if row.is_plan else row.name
    if row.error:
        return [name, _fmt(row.effective_bits, ".3f"), _fmt(row.effective_bits_ref, ".3f"), "not run (see note)"]
    by_len = " ".join(f"{k}:{v:.0%}" for k, v in row.passkey_by_length.items())
    gen = f"{_fmt(row.gen_agree_prefix, '.0%')} / {_fmt(row.gen_agree, '.0%')}"
    return [name, _fmt(row.effective_bits, ".3f"), _fmt(row.effective_bits_ref, ".3f"),
            _fmt(None if row.cache_bytes is None else row.cache_bytes / 2**20, ".2f"), _fmt(row.ppl, ".3f"),
            (_fmt(row.delta_ppl, "+.3f") + f" ({_fmt(row.delta_ppl_pct, '+.1f')}%)"), _fmt(row.kl, ".4f"),
            _fmt(row.top1, ".1%"), _fmt(row.kl_tail, ".4f"), gen,
            f"{_fmt(row.passkey, '.0%')} ({by_len})" if by_len else _fmt(row.passkey, ".0%"),
            _fmt(sum(row.seconds.values()) if row.seconds else None, ".0f")]


def plot(report: EvalReport, path: str | Path) -> Path:
    """Quality vs effective bits (at --ctx): perplexity, KL and passkey panels; the plan highlighted."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    rows = [r for r in report.rows if r.error is None and r.effective_bits is not None]
    panels = (("ppl", "perplexity (lower is better)"), ("kl", "KL to the reference, nats (lower is better)"),
              ("passkey", "passkey accuracy"))
    fig = Figure(figsize=(5 * len(panels), 4), layout="constrained")
    FigureCanvasAgg(fig)  # no pyplot: the caller's backend and global state stay untouched
    axes = fig.subplots(1, len(panels))
    for ax, (key, label) in zip(axes, panels):
        for r in rows:
            y = getattr(r, key)
            if y is None:
                continue
            style = ({"marker": "*", "s": 220, "color": "crimson", "zorder": 3} if r.is_plan
                     else {"marker": "o", "s": 50})
            ax.scatter([r.effective_bits], [y], **style)
            ax.annotate(r.name, (r.effective_bits, y), textcoords="offset points", xytext=(5, 5), fontsize=8)
        ref = report.reference.get(key)
        if ref is not None:
            ax.axhline(ref, color="gray", linestyle="--", linewidth=1, label="reference (dense, no cache)")
            ax.legend(loc="best", fontsize=8)
        ax.set_xlabel(f"effective bits at {report.settings.get('ctx')} tokens")
        ax.set_ylabel(label)
        ax.grid(alpha=0.3)
    fig.suptitle(f"{report.model.get('architecture', '')}: {report.data.get('source', '')}, "
                 f"ctx {report.settings.get('ctx')}")
    with atomic_path(path) as tmp:
        fig.savefig(tmp, dpi=120, format="png")
    return Path(path)
