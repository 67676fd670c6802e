"""Evidence for two format choices, on a real model's keys and values (held-out half of each sequence).

* **Centering** (``center: true``): relative squared error of per-token formats on keys/values with and without
  the per-head mean taken off first (mean fitted on the first half, error on the second).
* **Per-layer codebooks** (KVQuant's non-uniform k-means, here without sensitivity weights): on rotated, centered,
  norm-scaled coordinates, the squared error of uniform, Lloyd-Max (Gaussian-optimal) and a k-means codebook fitted
  per layer and role on the first half.

    python benchmarks/format_choices.py --model smollm2-135m --data pydoc:calib \
        --out benchmarks/results/format_choices_cpu.json
"""

from __future__ import annotations

import argparse
import importlib.metadata as md
import json
import math
import platform
import sys
from pathlib import Path
from typing import Any

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))


def kv_cache(model: Any, ids: torch.Tensor) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """Post-RoPE ``(keys, values)`` float32 ``[h, T, D]`` of every layer after one forward over ``ids [1, T]``."""
    from transformers import DynamicCache

    cache = DynamicCache()
    with torch.no_grad():
        model(ids, past_key_values=cache, use_cache=True)
    return [(layer.keys.float()[0], layer.values.float()[0]) for layer in cache.layers]


def centering_rows(layers: list[tuple[torch.Tensor, torch.Tensor]]) -> list[dict[str, Any]]:
    from kvtune.quant import codec
    from kvtune.quant.centering import CENTER_FIELD
    from kvtune.quant.families.normq import normq
    from kvtune.quant.formats import QuantSpec, affine

    specs = {"key": [normq(2, "uniform"), normq(3, "uniform"), affine(2, "token", 32), affine(2, "channel", 128)],
             "value": [normq(1), normq(1.58), normq(2, "uniform"), affine(2, "token", 32)]}
    rows = []
    for r, role in enumerate(("key", "value")):
        for spec in specs[role]:
            err = {False: [], True: []}
            for kv in layers:
                x = kv[r]
                half = x.shape[1] // 2
                fit, test = x[:, :half], x[:, half:]
                for c in (False, True):
                    s = QuantSpec(**{**spec.__dict__, "center": c})
                    state = {CENTER_FIELD: fit.mean(1).half()} if c else None
                    y = codec.fake_quantize(test, s, state=state)
                    err[c].append(float((y - test).square().sum() / test.square().sum()))
            plain, centered = (sum(v) / len(v) for v in (err[False], err[True]))
            rows.append({"role": role, "spec": spec.label(), "rel_err": plain, "rel_err_centered": centered,
                         "reduction_pct": round(100 * (1 - centered / plain), 1)})
    return rows


def _nearest_mse(z: torch.Tensor, levels: torch.Tensor) -> float:
    idx = (z[:, None] - levels[None]).abs().argmin(1)
    return float((z - levels[idx]).square().mean())


def _kmeans(z: torch.Tensor, init: torch.Tensor, iters: int = 50) -> torch.Tensor:
    c = init.clone()
    for _ in range(iters):
        idx = (z[:, None] - c[None]).abs().argmin(1)
        c = torch.stack([z[idx == j].mean() if bool((idx == j).any()) else c[j] for j in range(len(c))])
    return c


def codebook_rows(layers: list[tuple[torch.Tensor, torch.Tensor]]) -> list[dict[str, Any]]:
    from kvtune.quant.families.normq import codebook
    from kvtune.quant.transforms import hadamard

    rows = []
    for r, role in enumerate(("key", "value")):
        for bits, n in ((2, 4), (3, 8)):
            acc = torch.zeros(3)
            for kv in layers:
                x = kv[r]
                half = x.shape[1] // 2
                y = hadamard(x - x[:, :half].mean(1, keepdim=True))
                z = y / (y.norm(dim=-1, keepdim=True) / math.sqrt(y.shape[-1])).clamp_min(1e-30)
                fit, test = z[:, :half].reshape(-1), z[:, half:].reshape(-1)
                lloyd = torch.tensor(codebook(n, "lloyd"))
                books = (torch.tensor(codebook(n, "uniform")), lloyd, _kmeans(fit[::7], lloyd))
                acc += torch.tensor([_nearest_mse(test, b) for b in books])
            u, lm, km = (acc / len(layers)).tolist()
            rows.append({"role": role, "bits": bits, "mse_uniform": u, "mse_lloyd": lm, "mse_kmeans_per_layer": km,
                         "kmeans_gain_over_lloyd_pct": round(100 * (1 - km / lm), 2)})
    return rows


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="smollm2-135m")
    ap.add_argument("--data", default="pydoc:calib")
    ap.add_argument("--tokens", type=int, default=2048)
    ap.add_argument("--out", default="benchmarks/results/format_choices_cpu.json")
    a = ap.parse_args()
    from kvtune.data import load_text
    from kvtune.io import write_text_atomic
    from kvtune.models import load_model

    model, tok = load_model(a.model)
    ids = torch.tensor(tok(load_text(a.data), add_special_tokens=False)["input_ids"][: a.tokens])[None]
    layers = kv_cache(model, ids)
    data = {"device": {"cpu": platform.processor() or platform.machine(), "python": platform.python_version(),
                       **{p: md.version(p) for p in ("torch", "transformers")}},
            "model": a.model, "data": a.data, "tokens": int(ids.shape[1]), "layers": len(layers),
            "centering": centering_rows(layers), "codebooks": codebook_rows(layers)}
    write_text_atomic(Path(a.out), json.dumps(data, indent=1))
    for row in data["centering"] + data["codebooks"]:
        print(row)


if __name__ == "__main__":
    main()
