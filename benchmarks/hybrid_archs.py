"""Architecture table for hybrid attention: every :mod:`kvtune.tiny` architecture, window W, context 4 W.

Per architecture: the fp16 plan's max |logit diff| and max KL to the plain model (no cache) over stepwise
teacher forcing and token-by-token decoding, whether kv8's greedy tokens equal fp16's, and the bytes the fp16
plan holds over transformers' ``DynamicCache`` (counted at 2 bytes an element). Writes JSON, prints a table.

    python benchmarks/hybrid_archs.py --out benchmarks/results/hybrid_archs_cpu.json
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Any

import torch
from transformers import DynamicCache

from kvtune.layout import layout_of
from kvtune.models import cache_kwargs
from kvtune.plan import load_plan
from kvtune.runtime import teacher_forced_logits
from kvtune.tiny import TINY_ARCHS, tiny_model

SHAPES: dict[str, dict[str, Any]] = {"gemma3": {"layers": 6, "heads": 2, "kv_heads": 1, "head_dim": 256}}


def _kl(ref: torch.Tensor, out: torch.Tensor) -> float:
    lp, lq = ref.log_softmax(-1), out.log_softmax(-1)
    return float((lp.exp() * (lp - lq)).sum(-1).max())


@torch.no_grad()
def row(arch: str, window: int, batch: int = 2) -> dict[str, Any]:
    model = tiny_model(arch, window=None if arch == "llama" else window, **{"layers": 4, **SHAPES.get(arch, {})})
    t = 4 * window
    ids = torch.randint(1, 128, (batch, t), generator=torch.Generator().manual_seed(0))
    ref = model(ids, use_cache=False).logits.float()
    diffs, kls = [], []
    for chunk, prefill in ((7, window + 4), (1, t - window - 4)):
        out = teacher_forced_logits(model, load_plan("fp16"), ids, chunk=chunk, prefill=prefill)
        diffs.append(float((out - ref).abs().max()))
        kls.append(_kl(ref, out))
    prompt = ids[:, : t - window]
    gen = {n: model.generate(prompt, max_new_tokens=window, do_sample=False, pad_token_id=0,
                             **cache_kwargs(model, load_plan(n).cache(model))) for n in ("fp16", "kv8")}
    cache, dc = load_plan("fp16").cache(model), DynamicCache(config=model.config)
    teacher_forced_logits(model, cache, ids, chunk=5, prefill=9)
    model(ids, **cache_kwargs(model, dc))
    theirs = sum(2 * (layer.keys.numel() + layer.values.numel()) for layer in dc.layers)
    return {"arch": arch, "model_type": model.config.model_type, "layout": layout_of(model.config).describe(),
            "ctx": t, "max_logit_diff": max(diffs), "max_kl": max(kls),
            "kv8_greedy_equal": bool(torch.equal(gen["kv8"], gen["fp16"])),
            "bytes_fp16_plan": cache.nbytes(), "bytes_dynamic_cache_fp16": theirs,
            "bytes_ratio": cache.nbytes() / theirs}


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--window", type=int, default=16)
    ap.add_argument("--archs", default=",".join(TINY_ARCHS))
    ap.add_argument("--out", type=Path)
    args = ap.parse_args(argv)
    rows = [row(a, args.window) for a in args.archs.split(",")]
    for r in rows:
        print(f"{r['arch']:8} {r['layout']:28} diff {r['max_logit_diff']:.1e}  KL {r['max_kl']:.1e}  "
              f"kv8==fp16 {r['kv8_greedy_equal']}  bytes {r['bytes_ratio']:.3f}x DynamicCache")
    if args.out:
        args.out.write_text(json.dumps({"window": args.window, "torch": torch.__version__, "rows": rows}, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
