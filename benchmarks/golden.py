"""Golden numbers: a fingerprint of what kvtune computes, to prove a refactor changed no number.

For every preset on the embedded model: the bit accountant at 2048 and 4096 tokens, a sha256 of the
teacher-forced logits (stepwise, chunk 64) on a ``pydoc:eval`` sequence with their perplexity, and the greedy
tokens of a short generation (reference path, and the Triton kernel path under the interpreter for kernel
plans). Then a small calibration (sha256 of every tensor) and a search on it (the plan it writes).

    python benchmarks/golden.py --out benchmarks/results/golden_cpu.json
    python benchmarks/golden.py --compare benchmarks/results/golden_cpu.json   # exit 1 on any difference

Runs in about 6 minutes on 2 CPU cores.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import sys
import tempfile
from pathlib import Path
from typing import Any

os.environ.setdefault("TRITON_INTERPRET", "1")

import torch


def _sha(t: torch.Tensor) -> str:
    return hashlib.sha256(t.detach().cpu().contiguous().numpy().tobytes()).hexdigest()[:16]


def preset_rows(model: Any, tok: Any, ids: torch.Tensor) -> dict[str, Any]:
    import kvtune
    from kvtune.plan import preset_names
    from kvtune.runtime.cache import identity_of
    from kvtune.runtime.teacher import teacher_forced_logits

    ident = identity_of(model)
    rows = {}
    for name in sorted(preset_names()):
        plan = kvtune.load_plan(name)
        logits = teacher_forced_logits(model, plan, ids, chunk=64)
        nll = torch.nn.functional.cross_entropy(logits[0, :-1], ids[0, 1:])
        prompt = ids[:, :200]
        gen = model.generate(prompt, past_key_values=plan.cache(model), max_new_tokens=20, do_sample=False)
        row = {"bits2048": plan.bits(2048, ident).as_dict(), "bits4096": plan.bits(4096, ident).as_dict(),
               "logits": _sha(logits), "ppl": float(nll.exp()), "greedy": gen[0, 200:].tolist()}
        try:
            cache = plan.cache(model, backend="triton")
            gen_k = model.generate(prompt, past_key_values=cache, max_new_tokens=8, do_sample=False)
            row["greedy_kernel"] = gen_k[0, 200:].tolist()
        except Exception as exc:  # a plan the kernel cannot run
            row["greedy_kernel"] = f"n/a: {type(exc).__name__}"
        rows[name] = row
        print(name, row["logits"], f"{row['ppl']:.4f}", flush=True)
    return rows


def calib_and_search(workdir: Path) -> dict[str, Any]:
    from safetensors.torch import load_file

    from kvtune.cli import main

    calib, plan = workdir / "calib", workdir / "plan"
    if main(["calibrate", "--tokens", "4096", "--seq-len", "1024", "--out", str(calib), "--no-progress"]):
        raise SystemExit("calibrate failed")
    tensors = load_file(str(calib / "calib.safetensors"))
    if main(["search", "--budget", "2.5bit", "--calib", str(calib), "--out", str(plan), "--trials", "60",
             "--validate", "2", "--no-progress"]):
        raise SystemExit("search failed")
    import yaml

    data = yaml.safe_load((plan / "plan.yaml").read_text())
    for key in ("provenance", "tensors"):
        data.pop(key, None)
    return {"calib": {k: _sha(v) for k, v in sorted(tensors.items())}, "plan": data}


def collect() -> dict[str, Any]:
    torch.manual_seed(0)
    torch.set_num_threads(2)
    import kvtune
    from kvtune.data import load_text, token_chunks

    model, tok = kvtune.load_model("smollm2-135m")
    ids = token_chunks(tok, load_text("pydoc:eval"), 512, 512)[:1]
    out = {"presets": preset_rows(model, tok, ids)}
    with tempfile.TemporaryDirectory() as tmp:
        out.update(calib_and_search(Path(tmp)))
    return out


def _diff(a: Any, b: Any, path: str = "") -> list[str]:
    """Differences between two golden documents; quantizer specs compare by meaning (YAML spellings differ)."""
    from kvtune.quant.formats import QuantSpec

    if path.endswith((".key", ".value")) and isinstance(a, dict) and isinstance(b, dict):
        same = QuantSpec.from_dict(a) == QuantSpec.from_dict(b)
        return [] if same else [f"{path}: {a!r} != {b!r}"]
    if isinstance(a, dict) and isinstance(b, dict):
        return [d for k in sorted(set(a) | set(b), key=str) for d in _diff(a.get(k), b.get(k), f"{path}.{k}")]
    return [] if a == b else [f"{path}: {a!r} != {b!r}"]


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", type=Path)
    ap.add_argument("--compare", type=Path)
    args = ap.parse_args(argv)
    got = collect()
    if args.out:
        args.out.write_text(json.dumps(got, indent=1, sort_keys=True))
    if args.compare:
        diffs = _diff(json.loads(args.compare.read_text()), got)
        print("\n".join(diffs) if diffs else "golden: every number identical")
        return 1 if diffs else 0
    return 0


if __name__ == "__main__":
    sys.exit(main())
