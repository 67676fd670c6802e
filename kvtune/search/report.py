"""What a search leaves besides the plan: ``pareto.json``, ``pareto.png``, ``bits.png``.

Plots use matplotlib's Agg canvas directly (no pyplot, no global backend switch), imported lazily.
"""

from __future__ import annotations

import json
import math
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from kvtune.io import write_text_atomic
from kvtune.plan import Plan

PARETO_JSON, PARETO_PNG, BITS_PNG = "pareto.json", "pareto.png", "bits.png"
REPORT_VERSION = 1


def _clean(value: Any) -> Any:
    """JSON-safe: NaN/inf become None, tuples lists."""
    if isinstance(value, float):
        return value if math.isfinite(value) else None
    if isinstance(value, Mapping):
        return {str(k): _clean(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_clean(v) for v in value]
    return value


def write_pareto_json(out: Path, data: Mapping[str, Any]) -> Path:
    path = Path(out) / PARETO_JSON
    write_text_atomic(path, json.dumps(_clean({"version": REPORT_VERSION, **data}), indent=1) + "\n")
    return path


def _figure(width: float, height: float) -> Any:
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=(width, height), dpi=110)
    FigureCanvasAgg(fig)
    return fig


def _save(fig: Any, path: Path) -> Path:
    from kvtune.io import atomic_path

    with atomic_path(path) as tmp:
        fig.savefig(str(tmp), format="png", bbox_inches="tight")
    return path


def _floor(values: Sequence[float]) -> float:
    """Where zeros are drawn on a log axis: a decade below the smallest positive value."""
    pos = [v for v in values if v is not None and v > 0]
    return min(pos) / 10 if pos else 1e-6


def plot_pareto(out: Path, trials: Sequence[tuple[float, float]], front: Sequence[Mapping[str, Any]],
                presets: Sequence[Mapping[str, Any]], winner: Mapping[str, Any], budget: float,
                reference_length: int) -> Path:
    """Proxy (left) and validated KL (right) against effective bits (log-log); presets marked, budget dashed."""
    fig = _figure(11, 4.3)
    ax_p, ax_k = fig.subplots(1, 2)
    floor = _floor([p for p, _ in trials] + [p["proxy"] for p in presets if p.get("proxy") is not None])
    lift = lambda v: max(v, floor)
    if trials:
        ax_p.scatter([b for _, b in trials], [lift(p) for p, _ in trials], s=6, c="0.75", label="trials")
    pts = sorted((f["bits"], lift(f["proxy"])) for f in front if f.get("pareto", True))
    ax_p.plot([b for b, _ in pts], [p for _, p in pts], "-o", ms=3, c="tab:blue", label="Pareto front")
    checked = [f for f in front if f.get("kl") is not None]
    ax_k.scatter([f["bits"] for f in checked], [f["kl"] for f in checked], c="tab:blue", s=18, label="validated")
    for ax, key in ((ax_p, "proxy"), (ax_k, "kl")):
        shown = [p for p in presets if p.get(key) is not None]
        ys = [lift(p[key]) if key == "proxy" else p[key] for p in shown]
        ax.scatter([p["bits"] for p in shown], ys, marker="s", c="tab:red", label="uniform presets")
        for p, y in zip(shown, ys):
            ax.annotate(p["name"], (p["bits"], y), fontsize=7, xytext=(3, 3), textcoords="offset points")
        if winner.get(key) is not None:
            ax.scatter([winner["bits"]], [lift(winner[key]) if key == "proxy" else winner[key]], marker="*", s=160,
                       c="gold", edgecolors="k", label="chosen", zorder=5)
        ax.axvline(budget, ls="--", c="k", lw=0.8, label=f"budget {budget:g}")
        ax.set_xlabel(f"effective bits at {reference_length} tokens (everything stored)")
        ys = [float(y) for c in ax.collections for y in c.get_offsets()[:, 1]]
        if ys and min(ys) > 0:
            ax.set_yscale("log")
            ax.yaxis.set_major_formatter(_plain())
            ax.yaxis.set_minor_formatter(_plain(minor=True))
        ax.grid(alpha=0.3, which="both")
        ax.legend(fontsize=7)
    _log_bits_axis(ax_p, [b for _, b in trials] + [p["bits"] for p in presets] + [budget])
    ax_p.set_ylabel("proxy (predicted KL, nats; 0 drawn at the floor)")
    ax_k.set_ylabel("validated KL to fp16 (nats/token)")
    ax_p.set_title("search: proxy vs bits")
    ax_k.set_title("end-to-end check" if checked else "end-to-end check (not run)")
    return _save(fig, Path(out) / PARETO_PNG)


def _plain(minor: bool = False) -> Any:
    """Tick labels as plain numbers (minor ticks: only 2x and 5x of a decade)."""
    from matplotlib.ticker import FuncFormatter

    def fmt(v: float, _pos: Any) -> str:
        lead = round(v / 10 ** math.floor(math.log10(v)), 6) if v > 0 else 0
        return f"{v:g}" if not minor or lead in (2, 5) else ""

    return FuncFormatter(fmt)


def _log_bits_axis(ax: Any, bits: Sequence[float]) -> None:
    """Log-scaled bits axis with ticks at familiar widths."""
    from matplotlib.ticker import FixedLocator, NullLocator

    ax.set_xscale("log")
    lo, hi = min(bits), max(bits)
    ticks = [t for t in (1, 1.5, 2, 2.5, 3, 4, 5, 6, 8, 10, 12, 16) if lo * 0.9 <= t <= hi * 1.1]
    ax.xaxis.set_major_locator(FixedLocator(ticks))
    ax.xaxis.set_minor_locator(NullLocator())
    ax.xaxis.set_major_formatter(_plain())


def plot_bits(out: Path, plan: Plan) -> Path:
    """Heat map of code bits: rows K head 0..H-1 then V head 0..H-1, one column per layer."""
    import numpy as np

    ident = plan.model
    n_h = ident.num_kv_heads
    grid = np.zeros((2 * n_h, len(plan.layers)))
    text = [["" for _ in plan.layers] for _ in range(2 * n_h)]
    for i, layer in enumerate(plan.layers):
        for h, head in enumerate(layer.head_plans(n_h)):
            grid[h, i], grid[n_h + h, i] = head.key.bits, head.value.bits
            text[h][i], text[n_h + h][i] = head.key.label(short=True), head.value.label(short=True)
    fig = _figure(max(6.0, 0.32 * len(plan.layers) + 2), 1.2 + 0.35 * 2 * n_h)
    ax = fig.subplots()
    im = ax.imshow(grid, aspect="auto", cmap="viridis", vmin=1, vmax=max(8.0, float(grid.max())))
    for (r, c), v in np.ndenumerate(grid):
        ax.text(c, r, text[r][c], ha="center", va="center", fontsize=5.5, color="w" if v < 6 else "k")
    ax.set_yticks(range(2 * n_h), [f"K h{h}" for h in range(n_h)] + [f"V h{h}" for h in range(n_h)], fontsize=7)
    labels = [f"{i}" + (f"\nr{lay.residual}" if lay.residual else "")
              + (f"\ns{lay.salient.sink_tokens}" if lay.salient.sink_tokens else "")
              + (f"\n{lay.salient.ratio:g}@{lay.salient.bits:g}" if lay.salient.ratio else "")
              for i, lay in enumerate(plan.layers)]
    ax.set_xticks(range(len(plan.layers)), labels, fontsize=6)
    ax.set_xlabel("layer (rN: fp16 window of N tokens; sN: N sink tokens in fp16; r@b: salient share at b bits; "
                  "cell: bits, h Hadamard, oN outliers, gN group, cs channel-separable, f FFT)", fontsize=7)
    ax.set_title(f"{plan.name}: code bits per layer/head, {plan.effective_bits():.3f} effective bits "
                 f"at {plan.reference_length} tokens", fontsize=9)
    fig.colorbar(im, ax=ax, label="code bits")
    return _save(fig, Path(out) / BITS_PNG)
