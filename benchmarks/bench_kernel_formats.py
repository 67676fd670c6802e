"""The fused decode kernel on the formats plans really use, side by side with fp16 SDPA in one run.

``bench_decode_kernel.py`` times hand-made KIVI-layout caches. This script builds each cache the way the runtime
does -- random keys/values encoded by :mod:`kvtune.quant.codec` (calibrated state fitted on the first block),
:func:`~kvtune.quant.codec.kernel_operands` over the stored fields -- so every format a plan can hold is timed
exactly as a plan decodes it (rotations are applied to the query outside the kernel and are not timed). For each
format: CUDA-graph milliseconds of one ``decode_attention`` call over ``ctx - window`` packed tokens plus a
``window``-token fp16 segment, the bytes it must read (stored fields + window), GB/s, the share of the measured
device-to-device copy bandwidth, the ratio to fp16 SDPA with GQA over ``ctx`` tokens (same run), and the max error
against :func:`~kvtune.kernels.packed.decode_attention_reference` on two sequences.

    PYTHONPATH=. python benchmarks/bench_kernel_formats.py --shape llama3-8b --batch 8 --ctx 32768
    PYTHONPATH=. python benchmarks/bench_kernel_formats.py --quick      # CPU smoke run (Triton interpreter)
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

SHAPES = {"llama3-8b": (32, 8, 128), "smollm2-135m": (9, 3, 64)}  # (Hq, Hkv, D)
WINDOW = 64


def formats() -> dict[str, tuple[Any, Any]]:
    """Name -> (key spec, value spec): KIVI's layout, the norm codes searched plans pick (fp16 and one-byte scales,
    evenly spaced and Lloyd-Max levels), ternary keys, 4-bit."""
    from kvtune.quant.families.normq import normq
    from kvtune.quant.formats import affine

    return {
        "kivi2-g128": (affine(bits=2, axis="channel", group=128), affine(bits=2, axis="token", group=0)),
        "normq2": (normq(2, "uniform"), normq(2, "uniform")),
        "normq2-log8": (normq(2, "uniform", scale_dtype="log8"), normq(2, "uniform", scale_dtype="log8")),
        "tern-g128+normq1-log8": (affine(bits=1.58, axis="channel", group=128),
                                  normq(1, "uniform", scale_dtype="log8")),
        "lloyd2+normq1.58-log8": (normq(2), normq(1.58, "uniform", scale_dtype="log8")),
        "lloyd2-log8 (K and V)": (normq(2, scale_dtype="log8"), normq(2, scale_dtype="log8")),
        "kivi4-g128": (affine(bits=4, axis="channel", group=128), affine(bits=4, axis="token", group=0)),
    }


def _flush(spec: Any) -> int:
    return max(spec.token_group or 1, 1)


def build(spec: Any, role: str, x: torch.Tensor) -> tuple[Any, dict[str, torch.Tensor], dict[str, torch.Tensor]]:
    """Encode ``x [B, Hkv, T, D]`` (fp32) as the runtime stores it: (kernel operand, stored fields, state)."""
    from kvtune.quant import codec

    flush = _flush(spec)
    state = codec.fit(spec, x[:, :, :max(flush, 256)])
    fields = {}
    for s in range(0, x.shape[2], 8192):  # chunks keep the fp32 temporaries small
        part = codec.encode(x[:, :, s:s + 8192], spec, flush, state)
        for n, t in part.items():
            fields.setdefault(n, []).append(t)
    stored = {n: torch.cat(ts, 2) for n, ts in fields.items()}
    return codec.kernel_operands(spec, role, stored, state), stored, state


def _nbytes(*tensors: torch.Tensor) -> int:
    return sum(t.numel() * t.element_size() for t in tensors)


def _graph_ms(fn: Callable[[], Any], calls: int = 20) -> float:
    """Median ms of one call when ``calls`` calls are replayed as a CUDA graph (triton's do_bench)."""
    import triton.testing

    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):
        fn()
    torch.cuda.current_stream().wait_stream(stream)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        for _ in range(calls):
            fn()
    return float(triton.testing.do_bench(graph.replay, warmup=25, rep=100, return_mode="median")) / calls


def copy_gbs() -> float:
    """Device-to-device copy of 1 GiB: (bytes read + written) / time."""
    import triton.testing

    a = torch.empty(1 << 29, dtype=torch.float16, device="cuda").normal_()
    b = torch.empty_like(a)
    ms = float(triton.testing.do_bench(lambda: b.copy_(a), return_mode="median"))
    return 2 * a.numel() * 2 / ms / 1e6


def run(shape: str, batch: int, ctx: int, names: list[str], configs: list[dict[str, Any]], dev: str) -> dict:
    """Every format under every config: ``{}`` the default launch, else fields of
    :class:`~kvtune.kernels.decode_config.DecodeConfig` that replace the format's default ones."""
    from kvtune.kernels.decode_attention import decode_attention, decode_attention_reference
    from kvtune.kernels.decode_config import default_config
    from kvtune.quant import codec
    from kvtune.quant.codes import slicing

    hq, hkv, d = SHAPES[shape]
    gen = torch.Generator(device=dev).manual_seed(0)
    t = (ctx - WINDOW) // 256 * 256
    q = torch.randn(batch, hq, 1, d, device=dev, generator=gen).half()
    ek = torch.randn(batch, hkv, WINDOW, d, device=dev, generator=gen).half()
    ev = torch.randn_like(ek)
    rows: list[dict[str, Any]] = []
    fp16_ms = None
    if dev == "cuda":
        import torch.nn.functional as F

        k16 = torch.randn(batch, hkv, ctx, d, device=dev, dtype=torch.float16)
        v16 = torch.randn_like(k16)
        fp16_ms = _graph_ms(lambda: F.scaled_dot_product_attention(q, k16, v16, enable_gqa=True))
        rows.append({"format": "fp16 SDPA (enable_gqa)", "ms_graph": fp16_ms, "bytes": _nbytes(k16, v16),
                     "bits_per_element": 16.0})
        del k16, v16
        torch.cuda.empty_cache()
    specs = formats()
    for name in names:
        kspec, vspec = specs[name]
        if not (codec.kernel_ok(kspec, "key") and codec.kernel_ok(vspec, "value")):
            rows.append({"format": name, "error": "not read by the fused kernel"})
            continue
        x = torch.randn(batch, hkv, t, d, device=dev, generator=gen)
        kq, kf, _ = build(kspec, "key", x)
        x.normal_(generator=gen)
        vq, vf, _ = build(vspec, "value", x)
        del x
        held = _nbytes(*kf.values(), *vf.values(), ek, ev)
        n = min(2, batch)
        sub = [dataclasses.replace(o, packed=o.packed[:n], scale=o.scale[:n],
                                   zero=None if o.zero is None else o.zero[:n]) for o in (kq, vq)]
        ref = decode_attention_reference(q[:n], *sub, ek[:n], ev[:n]).float()
        base = {"format": name, "key": kspec.label(), "value": vspec.label(), "bytes": held,
                "bits_per_element": 8 * held / (2 * batch * hkv * ctx * d)}
        auto = default_config(batch, hkv, t, d, torch.device(dev), slicing(vq.bits, d).width, vq.bits)
        for cfg in configs:
            config = dataclasses.replace(auto, **cfg) if cfg else None
            out = decode_attention(q[:n], *sub, ek[:n], ev[:n], config=config)
            row = base | {"max_abs_err": float((out.float() - ref).abs().max())}
            if dev == "cuda":
                ms = _graph_ms(lambda c=config, ops=(q, kq, vq, ek, ev): decode_attention(*ops, config=c))
                row.update({"ms_graph": ms, "x_fp16_sdpa": fp16_ms / ms if fp16_ms else None})
            row["config"] = cfg or "default"
            rows.append(row)
            print(json.dumps({k: (round(v, 4) if isinstance(v, float) else v) for k, v in row.items()}), flush=True)
        del kq, vq, kf, vf
        if dev == "cuda":
            torch.cuda.empty_cache()
    return {"shape": shape, "hq": hq, "hkv": hkv, "d": d, "batch": batch, "ctx": ctx, "window": WINDOW,
            "quantized_tokens": t, "rows": rows}


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--shape", choices=list(SHAPES), default="llama3-8b")
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--ctx", type=int, default=32768)
    ap.add_argument("--formats", nargs="+", default=None, help=f"subset of {list(formats())}")
    ap.add_argument("--caps", type=int, nargs="*", default=[],
                    help="also time each format with its default launch under these register caps (0: none)")
    ap.add_argument("--rows", type=int, nargs="*", default=[],
                    help="also time each format with its default launch at these query rows a program (with "
                         "--caps: every pair)")
    ap.add_argument("--configs", nargs="*", default=[],
                    help="also time these launch configs: block_t,splits,warps,stages[,max_registers[,query_rows]]")
    ap.add_argument("--quick", action="store_true", help="tiny case on the CPU under the Triton interpreter")
    ap.add_argument("--out", type=Path, default=None)
    a = ap.parse_args(argv)
    names = a.formats or list(formats())
    if a.quick:
        os.environ.setdefault("TRITON_INTERPRET", "1")
        a.shape, a.batch, a.ctx = "smollm2-135m", 1, 576
    dev = "cuda" if torch.cuda.is_available() else "cpu"
    if dev == "cpu" and not a.quick:
        sys.exit("bench_kernel_formats: needs a CUDA GPU (or --quick)")
    import triton

    configs: list[dict[str, Any]] = [{}]
    for r in a.rows or [None]:
        for c in a.caps or [None]:
            over = ({} if r is None else {"query_rows": r}) | ({} if c is None else {"max_registers": c or None})
            configs += [over] if over else []
    for text in a.configs:
        vals = [int(v) for v in text.split(",")]
        configs.append(dict(zip(("block_t", "num_splits", "num_warps", "num_stages", "max_registers", "query_rows"),
                                vals)))
    result = {"benchmark": "kernel_formats", "device": torch.cuda.get_device_name() if dev == "cuda" else "cpu",
              "versions": {"torch": torch.__version__, "triton": triton.__version__},
              "time": time.strftime("%Y-%m-%dT%H:%M:%S"),
              "copy_gbs": copy_gbs() if dev == "cuda" else None}
    result.update(run(a.shape, a.batch, a.ctx, names, configs, dev))
    if result["copy_gbs"]:
        for r in result["rows"]:
            if "ms_graph" in r:
                r["gbs"] = r["bytes"] / r["ms_graph"] / 1e6
                r["pct_copy_bw"] = 100 * r["gbs"] / result["copy_gbs"]
    if a.out:
        from kvtune.io import write_text_atomic

        write_text_atomic(a.out, json.dumps(result, indent=1) + "\n")
        print(f"wrote {a.out}")
    return 0 if all("error" not in r or r["error"] == "not read by the fused kernel" for r in result["rows"]) \
        else 1


if __name__ == "__main__":
    sys.exit(main())
