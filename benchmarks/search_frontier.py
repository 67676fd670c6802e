"""The search against every preset, budget by budget, on two real texts: is the searched plan ever worse?

For each budget the default ``kvtune search`` runs on one calibration (its summary: chosen plan, best baseline,
validated KL, Spearman of the proxy); then ``kvtune eval`` scores every searched plan and every preset at or
under the largest budget on each text (same settings, one report per text). The tables put each searched plan
beside every preset at or under its budget: bits, delta ppl, KL, passkey.

    python benchmarks/search_frontier.py --calib kvtune-calib --texts pydoc:eval,/usr/share/common-licenses/GPL-3 \
        --out benchmarks/results/search_frontier_cpu.json
    python benchmarks/search_frontier.py --render benchmarks/results/search_frontier_cpu.json

The second text defaults to the licence texts every Debian/Ubuntu ships (legal English prose, not Python
documentation): GPL-3, GFDL-1.3, MPL-2.0, Apache-2.0, CC0-1.0, Artistic, joined.
"""

from __future__ import annotations

import argparse
import importlib.metadata as md
import json
import platform
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

LICENSES = ("GPL-3", "GFDL-1.3", "MPL-2.0", "Apache-2.0", "CC0-1.0", "Artistic")
LICENSE_DIR = Path("/usr/share/common-licenses")


def licenses_text(work: Path) -> str | None:
    """A file joining the licence texts of :data:`LICENSES` (None where the system has none of them)."""
    parts = [(LICENSE_DIR / n).read_text(encoding="utf-8") for n in LICENSES if (LICENSE_DIR / n).is_file()]
    if not parts:
        return None
    path = work / "licenses.txt"
    path.write_text("\n\n".join(parts), encoding="utf-8")
    return str(path)


def run_searches(calib: str, budgets: list[float], work: Path, model: str) -> list[dict[str, Any]]:
    from kvtune.search import search

    out: list[dict[str, Any]] = []
    for b in budgets:
        where = work / f"search-{b:g}"
        seconds: dict[str, Any] = {}
        t0 = time.perf_counter()
        if not (where / "pareto.json").is_file():  # else a finished search of an earlier run: kept
            seconds = dict(search(calib, b, out=where, model=model).seconds)
            seconds["wall"] = round(time.perf_counter() - t0, 1)
            (where / "seconds.json").write_text(json.dumps(seconds))
        elif (where / "seconds.json").is_file():
            seconds = json.loads((where / "seconds.json").read_text())
        out.append(_summary(b, where, seconds))
        s = out[-1]
        print(f"search {b:g}: {s['effective_bits']:.4f} bits, {s['chosen']} ({s['chosen_kind']}), KL "
              f"{s['validated_kl']}, best baseline {s['best_baseline']} KL {s['best_baseline_kl']}, "
              f"{seconds.get('wall')} s", flush=True)
    return out


def _summary(budget: float, where: Path, seconds: dict[str, Any]) -> dict[str, Any]:
    """One search's row, from the ``pareto.json`` it wrote."""
    d = json.loads((where / "pareto.json").read_text())
    j = d.get("judgement") or {}
    entries = j.get("entries", [])
    best = entries[j["best_baseline"]] if j.get("best_baseline") is not None else {}
    won = entries[j["winner"]] if entries else {}
    return {"budget": budget, "plan_dir": str(where), "effective_bits": d["winner"]["bits"],
            "chosen": won.get("name"), "chosen_kind": won.get("kind"), "validated_kl": won.get("kl"),
            "best_baseline": best.get("name"), "best_baseline_kl": best.get("kl"),
            "best_baseline_length": best.get("length"), "spearman_raw": j.get("spearman_raw"),
            "spearman_heldout": j.get("spearman_heldout"), "correction": j.get("correction"),
            "validation": d.get("validation"), "stages": j.get("stages"), "seconds": seconds,
            "wall_s": seconds.get("wall")}


def run_evals(searches: list[dict[str, Any]], texts: list[str], model_name: str, settings: Any, top: float,
              presets: list[str] | None) -> dict[str, Any]:
    from kvtune.eval import evaluate
    from kvtune.eval.baselines import get_baseline, identity_of, plan_method
    from kvtune.models import load_model
    from kvtune.plan import load_plan, preset_names

    model, tok = load_model(model_name)
    ident = identity_of(model)
    names = list(presets) if presets else [n for n in sorted(preset_names())
                                           if load_plan(n).bind(ident).effective_bits() <= top + 1e-9]
    reports = {}
    for text in texts:
        methods = [get_baseline("fp16"), *(get_baseline(n) for n in names if n != "fp16")]
        for s in searches:
            m = plan_method(s["plan_dir"])
            m.name = f"search-{s['budget']:g}bit"
            methods.append(m)
        from kvtune.data import load_text

        t0 = time.perf_counter()
        rep = evaluate(model, tok, methods, load_text(text), settings, data_name=text, jobs=0)
        reports[text] = rep.to_dict()
        print(f"eval {text}: {len(methods)} rows, {time.perf_counter() - t0:.0f} s", flush=True)
    return reports


def tables(data: dict[str, Any]) -> str:
    """Markdown: per text and budget, the searched plan and every preset at or under the budget."""
    lines = []
    for text, rep in data["evals"].items():
        rows = {r["name"]: r for r in rep["rows"]}
        lines.append(f"\n### {text} (fp16 ppl {rep['reference']['ppl']:.3f}, ctx {rep['settings']['ctx']} x "
                     f"{rep['settings']['sequences']})\n")
        lines.append("| budget | plan | bits@4096 | Δppl % | KL | passkey |")
        lines.append("| ---: | --- | ---: | ---: | ---: | ---: |")
        for s in data["searches"]:
            b = s["budget"]
            mine = rows.get(f"search-{b:g}bit")
            fits = sorted((r for r in rep["rows"] if not r["name"].startswith("search-") and r["name"] != "fp16"
                           and r["effective_bits_ref"] is not None and r["effective_bits_ref"] <= b + 1e-9),
                          key=lambda r: r["effective_bits_ref"])
            for r in ([mine] if mine else []) + fits:
                tag = f"**{r['name']}** ({s['chosen']})" if r is mine else r["name"]
                lines.append(f"| {b:g} | {tag} | {_f(r['effective_bits_ref'], '.3f')} | "
                             f"{_f(r['delta_ppl_pct'], '+.1f')} | {_f(r['kl'], '.4f')} | {_f(r['passkey'], '.2f')} |")
        top = max(x["budget"] for x in data["searches"])
        above = [r for r in rep["rows"] if r["effective_bits_ref"] is not None and r["effective_bits_ref"] > top]
        for r in sorted(above, key=lambda r: r["effective_bits_ref"]):
            lines.append(f"| above | {r['name']} | {_f(r['effective_bits_ref'], '.3f')} | "
                         f"{_f(r['delta_ppl_pct'], '+.1f')} | {_f(r['kl'], '.4f')} | {_f(r['passkey'], '.2f')} |")
    lines.append("\n| budget | chosen | kind | validated KL | best baseline | its KL | Spearman raw | held-out | "
                 "search s |")
    lines.append("| ---: | --- | --- | ---: | --- | ---: | ---: | ---: | ---: |")
    for s in data["searches"]:
        lines.append(f"| {s['budget']:g} | {s['chosen']} | {s['chosen_kind']} | {_f(s['validated_kl'], '.4f')} | "
                     f"{s['best_baseline']} | {_f(s['best_baseline_kl'], '.4f')} | {_f(s['spearman_raw'], '.3f')} | "
                     f"{_f(s['spearman_heldout'], '.3f')} | {s['wall_s']} |")
    return "\n".join(lines)


def _f(x: Any, fmt: str) -> str:
    return "-" if x is None else format(x, fmt)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--calib", default="kvtune-calib")
    ap.add_argument("--budgets", default="1.5,2,2.5,3,4")
    ap.add_argument("--texts", default=None, help="comma-separated (default: pydoc:eval and the licence texts)")
    ap.add_argument("--model", default="smollm2-135m")
    ap.add_argument("--ctx", type=int, default=2048)
    ap.add_argument("--sequences", type=int, default=2)
    ap.add_argument("--presets", default=None, help="comma-separated (default: every preset within the top budget)")
    ap.add_argument("--passkey-lengths", default="1024,2048")
    ap.add_argument("--gen-tokens", type=int, default=0)
    ap.add_argument("--work", default=None, help="where the searched plans go (default: a temporary directory); "
                    "a rerun with the same --work keeps the searches already finished there")
    ap.add_argument("--out", default="benchmarks/results/search_frontier_cpu.json")
    ap.add_argument("--render", default=None, help="print the tables of an existing JSON and exit")
    a = ap.parse_args()
    if a.render:
        print(tables(json.loads(Path(a.render).read_text())))
        return
    from kvtune.io import write_text_atomic

    work = Path(a.work or tempfile.mkdtemp(prefix="kvtune-frontier-"))
    work.mkdir(parents=True, exist_ok=True)
    texts = a.texts.split(",") if a.texts else ["pydoc:eval", *(t for t in [licenses_text(work)] if t)]
    budgets = [float(b) for b in a.budgets.split(",")]
    t0 = time.perf_counter()
    searches = run_searches(a.calib, budgets, work, a.model)  # resumes: searches with a pareto.json are kept
    from kvtune.eval import EvalSettings

    settings = EvalSettings(ctx=a.ctx, sequences=a.sequences, gen_tokens=a.gen_tokens,
                            passkey_lengths=tuple(int(x) for x in a.passkey_lengths.split(",") if x))
    evals = run_evals(searches, texts, a.model, settings, max(budgets), a.presets.split(",") if a.presets else None)
    data = {"device": {"cpu": platform.processor() or platform.machine(), "python": platform.python_version(),
                       **{p: md.version(p) for p in ("torch", "transformers", "optuna")}},
            "model": a.model, "calibration": str(Path(a.calib).resolve()), "budgets": budgets, "texts": texts,
            "searches": searches, "evals": evals, "seconds": round(time.perf_counter() - t0, 1)}
    write_text_atomic(Path(a.out), json.dumps(data, indent=1))
    print(tables(data))


if __name__ == "__main__":
    main()
