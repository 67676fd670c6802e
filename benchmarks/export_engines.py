"""What deploying a searched plan to each serving engine costs in quality, on the embedded model (CPU).

One command re-runs all of it (the calibration is reused when its inputs are unchanged; the unconstrained search
is always re-run, so a changed ``kvtune search`` shows up)::

    nice -n 10 python benchmarks/export_engines.py --budget 3.0

Each step is a kvtune command (recorded in the JSON under ``commands``):

1. ``kvtune calibrate --tokens N --out WORK/calib``;
2. ``kvtune search --budget B --calib WORK/calib --out WORK/plan``: the unconstrained plan;
3. per target: ``kvtune export WORK/plan --to T --round-up --calib WORK/calib --out WORK/export-T`` (what that
   engine stores of the plan: the cheapest configuration keeping every layer at least the plan's code bits);
4. with ``--engine-search``, per target also ``kvtune search --target T --budget E`` at the bits E that the
   round-up stores, exported exactly (does the engine's own best configuration at that cost do better?);
5. ``kvtune eval`` (quality only: ``pydoc:eval``, ``--ctx`` x ``--sequences``, no generation or passkey) of fp16,
   the unconstrained plan and every exported ``OUT/kvtune-plan``, one row per process, ``--jobs`` at a time.

Writes ``--json`` atomically (device, versions, model shape, settings, rows) and prints a markdown table;
``--table JSON`` prints the table of an existing result. ``--reuse`` keeps whatever WORK already holds (plans,
exports, eval rows) instead of redoing it: for resuming an interrupted run only.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shlex
import shutil
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
TARGETS = ("compressed-tensors", "modelopt", "vllm", "sglang", "llama.cpp")
QUALITY = ("ppl", "delta_ppl_pct", "kl", "top1", "effective_bits", "effective_bits_ref", "cache_bytes")


def cli(args: list[str], log: list[str], run: bool = True) -> str:
    """Run ``kvtune ARGS`` (this checkout, at the caller's nice level); its stdout; a failure is one line.
    ``run=False`` only records the command, marked as reused from an earlier run (``--reuse``)."""
    log.append(shlex.join(["kvtune", *args]) + ("" if run else "  # output reused (--reuse)"))
    if not run:
        return ""
    env = {**os.environ, "PYTHONPATH": str(ROOT), "COLUMNS": "160"}
    r = subprocess.run([sys.executable, "-m", "kvtune.cli", *args], capture_output=True, text=True, env=env,
                       cwd=ROOT)
    if r.returncode:
        raise RuntimeError(f"kvtune {args[0]} failed ({r.returncode}): {(r.stderr or r.stdout).strip()[-2000:]}")
    return r.stdout


def eval_row(plan: str, json_path: Path, a: argparse.Namespace, log: list[str]) -> dict[str, Any]:
    """``kvtune eval`` of one plan (quality only); its row (reused from ``json_path`` with ``--reuse``)."""
    cli(["eval", "--plan", plan, "--baselines", "", "--ctx", str(a.ctx), "--sequences", str(a.sequences),
         "--gen-tokens", "0", "--passkey-lengths", "", "--threads", "1", "--jobs", "1", "--no-progress",
         "--json", str(json_path)], log, run=not (a.reuse and json_path.is_file()))
    (row,) = json.loads(json_path.read_text())["rows"]
    if row.get("error"):
        raise RuntimeError(f"eval of {plan}: {row['error']}")
    return {"eval_name": row["name"], **{k: row.get(k) for k in QUALITY},
            "eval_seconds": round(sum(row.get("seconds", {}).values()), 1)}


def files_of(out: Path) -> list[str]:
    """Files of an export folder, symlinks (the source model's weights) marked ``-> source``."""
    return sorted(f"{p.relative_to(out)}" + (" -> source" if p.is_symlink() else "")
                  for p in out.rglob("*") if p.is_file() or p.is_symlink())


def export_one(plan: Path, target: str, out: Path, a: argparse.Namespace, round_up: bool,
               log: list[str]) -> dict[str, Any]:
    """``kvtune export`` (the library call the CLI makes), checked by reading the engine files back."""
    from kvtune.export import export, read_back

    args = [str(plan), "--to", target, "--calib", str(a.work / "calib"), "--out", str(out)]
    if out.exists() and not a.reuse:
        shutil.rmtree(out)
    log.append(shlex.join(["kvtune", "export", *args, *(["--round-up"] if round_up else [])])
               + ("  # output reused (--reuse)" if out.exists() else ""))
    if not out.exists():
        res = export(plan, target, out, calib=a.work / "calib", round_up=round_up)
        info = {"engine": res.description, "exact": res.exact, "rounded_up": list(res.changes),
                "notes": list(res.notes), "plan_bits": res.plan_bits, "engine_bits": res.engine_bits,
                "reads_back": read_back(out).layers == res.engine_plan.layers}
        (a.work / f"{out.name}.json").write_text(json.dumps(info, indent=1) + "\n")
    return {**json.loads((a.work / f"{out.name}.json").read_text()), "files": files_of(out)}


def engine_search(target: str, budget: float, a: argparse.Namespace, log: list[str]) -> Path:
    """``kvtune search --target`` at ``budget`` bits (rounded up to 4 decimals) into WORK/search-T."""
    out = a.work / f"search-{target}"
    if out.exists() and not a.reuse:
        shutil.rmtree(out)
    cli(["search", "--target", target, "--budget", f"{budget:.4f}", "--calib", str(a.work / "calib"),
         "--out", str(out), "--no-progress"], log, run=not (out / "plan.yaml").is_file())
    return out


def calibrate_and_search(a: argparse.Namespace, log: list[str]) -> dict[str, Any]:
    """Steps 1-2: the calibration (kvtune reuses one of the same inputs) and the unconstrained plan."""
    from kvtune.io import read_yaml

    t0 = time.perf_counter()
    said = cli(["calibrate", "--tokens", str(a.tokens), "--out", str(a.work / "calib"), "--no-progress"], log)
    t1 = time.perf_counter()
    plan = a.work / "plan"
    if plan.exists() and not a.reuse:
        shutil.rmtree(plan)  # a rerun would continue the old study
    cli(["search", "--budget", f"{a.budget}bit", "--calib", str(a.work / "calib"), "--out", str(plan),
         "--seed", "0", "--no-progress"], log, run=not (plan / "plan.yaml").is_file())
    calib = read_yaml(a.work / "calib" / "calib.yaml", "calibration")
    return {"calibrate_s": round(t1 - t0, 1), "calibration_reused": "reused" in said,
            "search_s": round(time.perf_counter() - t1, 1),
            "calibration": {k: calib.get(k) for k in ("settings", "data", "timing") if k in calib}}


def plans_to_score(a: argparse.Namespace, log: list[str]) -> list[dict[str, Any]]:
    """Steps 3-4: one row per exported configuration (``plan``: the folder ``kvtune eval`` scores)."""
    import math

    rows = []
    for target in a.targets:
        out = a.work / f"export-{target}"
        row = {"target": target, "how": "round-up of the plan", "plan": str(out / "kvtune-plan"),
               **export_one(a.work / "plan", target, out, a, True, log)}
        rows.append(row)
        if a.engine_search:
            budget = math.ceil(row["engine_bits"] * 1e4) / 1e4
            searched = engine_search(target, budget, a, log)
            out = a.work / f"export-search-{target}"
            found = export_one(searched, target, out, a, False, log)
            same = found["engine"] == row["engine"]  # the same configuration: scored once
            rows.append({"target": target, "how": f"search --target at {budget:.4f} bits",
                         "plan": str(out / "kvtune-plan"), **found, **({"same_as": row["how"]} if same else {})})
    return rows


def environment() -> dict[str, Any]:
    """Device, versions, and the commit this ran from."""
    import importlib.metadata as md

    cpu = next((line.split(":", 1)[1].strip() for line in Path("/proc/cpuinfo").read_text().splitlines()
                if line.startswith("model name")), platform.processor()) if Path("/proc/cpuinfo").is_file() else ""
    versions = {"python": platform.python_version()}
    for pkg in ("torch", "transformers", "optuna", "safetensors", "compressed-tensors", "kvtune"):
        try:
            versions[pkg] = md.version(pkg)
        except md.PackageNotFoundError:
            versions[pkg] = None
    git = subprocess.run(["git", "rev-parse", "HEAD"], capture_output=True, text=True, cwd=ROOT).stdout.strip()
    dirty = bool(subprocess.run(["git", "status", "--porcelain", "--", "kvtune"], capture_output=True, text=True,
                                cwd=ROOT).stdout.strip())
    return {"device": {"kind": "cpu", "cpu": cpu, "cores": os.cpu_count(), "load_avg_at_start": os.getloadavg()},
            "versions": versions, "git_commit": git, "kvtune_tree_dirty": dirty}


def model_shape(model: str) -> dict[str, Any]:
    from kvtune.models import load_identity

    ident = load_identity(model)
    return {"name": model, "architecture": ident.architecture, "num_layers": ident.num_layers,
            "num_kv_heads": ident.num_kv_heads, "head_dim": ident.head_dim, "fingerprint": ident.fingerprint}


def score(rows: list[dict[str, Any]], a: argparse.Namespace, log: list[str]) -> None:
    """Step 5: ``kvtune eval`` of every row's plan, ``--jobs`` processes at a time; rows gain the metrics."""
    def one(row: dict[str, Any]) -> None:
        row.update(eval_row(row["plan"], a.work / f"eval-{row['key']}.json", a, log))

    with ThreadPoolExecutor(max_workers=a.jobs) as pool:
        list(pool.map(one, [r for r in rows if "same_as" not in r]))
    for r in rows:
        if "same_as" in r:
            twin = next(t for t in rows if t["target"] == r["target"] and t["how"] == r["same_as"])
            r.update({k: twin[k] for k in (*QUALITY, "eval_name")})
    base = next(r for r in rows if r["target"] == "kvtune")
    for r in rows:
        r["ppl_vs_plan_pct"] = 100 * (r["ppl"] / base["ppl"] - 1)
        r["kl_minus_plan"] = r["kl"] - base["kl"]


def markdown(data: dict[str, Any]) -> str:
    """The results as a markdown table (Δppl against the dense model; the last two columns against the plan)."""
    head = ("| target | how | engine configuration | files written (+ source files linked) | bits @4096 | "
            f"bits @{data['settings']['ctx']} | ppl | Δppl | KL | top-1 | ppl vs plan | KL − plan's |")
    lines = [head, "|" + "---|" * 3 + "---|" + "---:|" * 8]
    for r in data["rows"]:
        files = [f for f in r.get("files", []) if not f.endswith("-> source")]
        linked = len(r.get("files", [])) - len(files)
        shown = (", ".join(files) + (f" (+{linked})" if linked else "")) or "–"
        engine = r.get("engine", "–") + (f" (= {r['same_as']})" if "same_as" in r else "")
        lines.append(f"| {r['target']} | {r['how']} | {engine} | {shown} | "
                     f"{r['effective_bits_ref']:.3f} | {r['effective_bits']:.3f} | {r['ppl']:.3f} | "
                     f"{r['delta_ppl_pct']:+.1f}% | {r['kl']:.4f} | {r['top1']:.1%} | {r['ppl_vs_plan_pct']:+.1f}% | "
                     f"{r['kl_minus_plan']:+.4f} |")
    return "\n".join(lines)


def parse(argv: list[str] | None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--budget", type=float, default=3.0, help="budget of the unconstrained kvtune search (bits)")
    ap.add_argument("--tokens", type=int, default=32768, help="calibration tokens (kvtune calibrate --tokens)")
    ap.add_argument("--ctx", type=int, default=2048, help="kvtune eval --ctx")
    ap.add_argument("--sequences", type=int, default=2, help="kvtune eval --sequences")
    ap.add_argument("--targets", default=",".join(TARGETS), help="comma-separated export targets")
    ap.add_argument("--engine-search", action="store_true",
                    help="also kvtune search --target T at the bits each round-up stores, exported exactly")
    ap.add_argument("--jobs", type=int, default=2, help="kvtune eval processes at a time (one thread each)")
    ap.add_argument("--work", type=Path, default=Path("kvtune-export-bench"),
                    help="working folder (relative paths: to the repository root)")
    ap.add_argument("--reuse", action="store_true", help="keep what --work holds (resume an interrupted run)")
    ap.add_argument("--json", type=Path, default=Path("benchmarks/results/export_engines_cpu.json"))
    ap.add_argument("--table", type=Path, help="only print the markdown table of this result JSON")
    a = ap.parse_args(argv)
    a.targets = [t for t in a.targets.split(",") if t]
    return a


def main(argv: list[str] | None = None) -> int:
    a = parse(argv)
    os.chdir(ROOT)  # every path in the commands and the JSON is relative to the repository root
    if a.table:
        print(markdown(json.loads(a.table.read_text())))
        return 0
    from kvtune.io import write_text_atomic

    start, log = time.perf_counter(), []
    a.work.mkdir(parents=True, exist_ok=True)
    meta = {"environment": environment(), "model": model_shape("smollm2-135m")}
    steps = calibrate_and_search(a, log)
    rows = [{"key": "fp16", "target": "fp16", "how": "kvtune cache, fp16 preset", "plan": "fp16"},
            {"key": "plan", "target": "kvtune", "how": f"search --budget {a.budget}bit (unconstrained)",
             "plan": str(a.work / "plan")}]
    for r in plans_to_score(a, log):
        r["key"] = Path(r["plan"]).parent.name
        rows.append(r)
    score(rows, a, log)
    data = {"what": "kvtune export of one searched plan to every engine target, scored by kvtune eval",
            **meta, "settings": {"budget": a.budget, "calib_tokens": a.tokens, "ctx": a.ctx,
                                 "sequences": a.sequences, "data": "pydoc:eval", "eval": "quality only (no "
                                 "generation, no passkey), stepwise teacher forcing, chunk 64, 1 thread a row",
                                 "engine_search": a.engine_search, "jobs": a.jobs, "reuse": a.reuse},
            "steps": {**steps, "total_s": round(time.perf_counter() - start, 1)}, "commands": log,
            "rows": [{k: v for k, v in r.items() if k not in ("key",)} for r in rows]}
    write_text_atomic(a.json, json.dumps(data, indent=1) + "\n")
    print(markdown(data))
    print(f"\nwrote {a.json}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
