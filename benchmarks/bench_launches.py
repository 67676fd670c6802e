"""Device work items of one static-cache decode step, counted on any machine: the launches a CUDA graph replays.

A graph-captured decode step at batch 8 is bound by its launches as much as by bandwidth: every small kernel costs
~2-3 us of GPU time and a ~1 us gap (``benchmarks/results/e2e_graphs_llama3-8b_compiled_h200.json``: 10.5 ms of
GPU time, 11.1 ms wall, about 30 kernels a layer). This counts them without a GPU: every PyTorch operator that
would launch a kernel (``TorchDispatchMode``; views and allocations excluded) and every Triton kernel launch (the
kernels run under ``TRITON_INTERPRET=1`` here), per eager decode step of kvtune's :class:`StaticKVTuneCache`, split
into the cache and attention part (``StaticLayer.update`` + ``attend``) and the rest of the model. Flush steps are
reported apart from plain steps. The model is the benchmark architecture (``--shape``, random weights, ``--layers``
of them: the count per layer does not depend on the size).

    python benchmarks/bench_launches.py                          # -> results/launches_cpu.json
    PYTHONPATH=/path/to/other/tree python benchmarks/bench_launches.py --label before --out X.json

Counts are not times: a fused launch can cost more than one of those it replaces (measure that on a GPU with
``bench_e2e.py``).
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from collections import Counter
from pathlib import Path
from typing import Any

os.environ.setdefault("TRITON_INTERPRET", "1")

import torch
from torch.utils._python_dispatch import TorchDispatchMode

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import RESULTS, build_model, model_info, versions
from bench_e2e import GRAPH_METHODS, get_method

from kvtune.io import write_text_atomic

NO_KERNEL = {"empty", "empty_strided", "empty_like", "lift_fresh", "detach", "alias", "_unsafe_view", "sym_size",
             "sym_stride", "sym_numel", "sym_storage_offset", "is_same_size"}  # metadata only: no launch


class Launches(TorchDispatchMode):
    """Counts operators that launch device work, by operator name, under the label set in :attr:`part`."""

    def __init__(self) -> None:
        super().__init__()
        self.counts: Counter[tuple[str, str]] = Counter()
        self.part = "model"
        self.inside_triton = False  # the interpreter's own tensor work is not the kernel's launches

    def __torch_dispatch__(self, func: Any, types: Any, args: tuple = (), kwargs: dict | None = None) -> Any:
        name = func.overloadpacket.__name__
        kernel = not func.is_view and name not in NO_KERNEL and not _noop_copy(name, args, kwargs or {})
        if kernel and not self.inside_triton:
            self.counts[(self.part, f"aten.{name}")] += 1
        return func(*args, **(kwargs or {}))


def _noop_copy(name: str, args: tuple, kwargs: dict) -> bool:
    """``x.to(dtype)`` with x already of that dtype launches nothing (PyTorch returns x itself)."""
    return name == "_to_copy" and isinstance(args[0], torch.Tensor) and kwargs.get("dtype") in (None, args[0].dtype)


def _patch(mode: Launches) -> list[tuple[Any, str, Any]]:
    """Count Triton launches (the interpreter's ``run``) and label what runs inside the cache layer's methods."""
    from triton.runtime.interpreter import InterpretedFunction

    from kvtune.runtime.static_cache import StaticLayer

    undo = [(InterpretedFunction, "run", InterpretedFunction.run)]
    orig_run = InterpretedFunction.run

    def run(self: Any, *args: Any, **kwargs: Any) -> Any:
        mode.counts[(mode.part, f"triton.{self.fn.__name__}")] += 1
        mode.inside_triton = True
        try:
            return orig_run(self, *args, **kwargs)
        finally:
            mode.inside_triton = False

    InterpretedFunction.run = run
    for attr in ("update", "attend"):
        fn = getattr(StaticLayer, attr)
        undo.append((StaticLayer, attr, fn))

        def wrapped(self: Any, *a: Any, _fn: Any = fn, **k: Any) -> Any:
            before, mode.part = mode.part, "cache+attention"
            try:
                return _fn(self, *a, **k)
            finally:
                mode.part = before

        setattr(StaticLayer, attr, wrapped)
    return undo


@torch.no_grad()
def count(model: Any, name: str, prompt: int, batch: int, steps: int) -> dict[str, Any]:
    """Per-step launch counts of ``steps`` eager static-cache decode steps after a ``prompt``-token prefill."""
    from kvtune.runtime.graphs import GraphDecoder

    meth = get_method(name, model)
    cache = meth.plan.cache(model, static=True, batch=batch, max_length=prompt + steps + 8)
    dec = GraphDecoder(model, cache, graphs=False)
    gen = torch.Generator().manual_seed(0)
    ids = torch.randint(0, model.config.vocab_size, (batch, prompt), generator=gen)
    tok = dec.prefill(ids).argmax(-1)
    mode = Launches()
    undo = _patch(mode)
    per_step = []
    try:
        for _ in range(steps):
            flushes = any(cache.next_flush())
            mode.counts.clear()
            with mode:
                tok = dec.step(tok).argmax(-1)
            per_step.append((flushes, Counter(mode.counts)))
    finally:
        for owner, attr, fn in undo:
            setattr(owner, attr, fn)
    model.set_attn_implementation("sdpa")
    layers = model.config.num_hidden_layers
    out: dict[str, Any] = {"method": name, "layers": layers, "prompt_tokens": prompt, "batch": batch, "steps": steps}
    for kind, flag in (("plain", False), ("flush", True)):
        rows = [c for f, c in per_step if f == flag]
        if not rows:
            continue
        c = rows[-1]
        attn = {k[1]: v for k, v in c.items() if k[0] == "cache+attention"}
        out[kind] = {"steps_seen": len(rows),
                     "launches_per_step": sum(c.values()),
                     "cache_attention_per_layer": sum(attn.values()) / layers,
                     "model_rest_per_step": sum(v for k, v in c.items() if k[0] == "model"),
                     "cache_attention_ops_per_layer": {k: v / layers for k, v in sorted(attn.items())}}
    return out


def _git_rev() -> str | None:
    import kvtune

    root = Path(kvtune.__file__).resolve().parent.parent
    if not (root / ".git").exists():  # a copied tree: its --label names it
        return None
    try:
        return subprocess.run(["git", "-C", str(root), "rev-parse", "--short", "HEAD"], capture_output=True,
                              text=True, check=True).stdout.strip() or None
    except (OSError, subprocess.CalledProcessError):
        return None


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--methods", type=lambda s: s.split(","), default=["kv2-g128-static-graph", "normq2-static-graph"])
    p.add_argument("--shape", choices=["smollm2-135m", "llama3-8b"], default="smollm2-135m")
    p.add_argument("--layers", type=int, default=2)
    p.add_argument("--prompt", type=int, default=40)
    p.add_argument("--batch", type=int, default=2)
    p.add_argument("--steps", type=int, default=None, help="decode steps counted (default: past one flush)")
    p.add_argument("--label", default="HEAD", help="names the tree counted (rows of other labels are kept)")
    p.add_argument("--out", type=Path, default=RESULTS / "launches_cpu.json")
    a = p.parse_args(argv)
    model = build_model(a.layers, 8192, "cpu", torch.float16, a.shape)  # fp16 as on a GPU: no dtype casts
    result = json.loads(a.out.read_text()) if a.out.exists() else {}
    result.update({"schema_version": 1, "benchmark": "decode_step_launches", "device": "cpu (TRITON_INTERPRET=1)",
                   "versions": versions(), "model": model_info(model), "time": time.strftime("%Y-%m-%dT%H:%M:%S")})
    rows = result.setdefault("rows", [])
    for name in a.methods:
        if name not in GRAPH_METHODS or GRAPH_METHODS[name][1] is None:
            raise SystemExit(f"bench_launches: {name!r} is not a kvtune static-graph method "
                             f"(use one of {', '.join(k for k, v in GRAPH_METHODS.items() if v[1])})")
        plan = get_method(name, model).plan
        steps = a.steps or max(lp.residual + lp.flush for lp in plan.layers) + 2
        row = {"label": a.label, "git": _git_rev(), **count(model, name, a.prompt, a.batch, steps)}
        rows[:] = [r for r in rows if (r.get("label"), r.get("method")) != (a.label, name)]
        rows.append(row)
        print(json.dumps({k: v for k, v in row.items() if not isinstance(v, dict)} |
                         {k: {kk: vv for kk, vv in v.items() if not isinstance(vv, dict)}
                          for k, v in row.items() if isinstance(v, dict)}), flush=True)
    a.out.parent.mkdir(parents=True, exist_ok=True)
    write_text_atomic(a.out, json.dumps(result, indent=1) + "\n")
    print(f"wrote {a.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
