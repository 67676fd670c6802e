"""Decode attention over a bit-packed KV cache (kvtune Triton kernel) vs fp16 SDPA vs dequantize-then-SDPA.

Run from the repository root on a CUDA GPU::

    PYTHONPATH=. python3 benchmarks/bench_decode_kernel.py            # full table + JSON
    PYTHONPATH=. python3 benchmarks/bench_decode_kernel.py --quick    # tiny smoke run
    PYTHONPATH=. python3 benchmarks/bench_decode_kernel.py --sweep    # launch-config sweep on one shape

Shapes: Llama-3-8B (32 q / 8 kv heads, d=128) and SmolLM2-135M (9 / 3, d=64); batch {1, 8, 32}; context
{4k, 32k, 128k} (combos that do not fit in memory are skipped). kvtune caches: keys per-channel g32,
values per-token (group D, or 32 with --value-group 32), asymmetric, fp16 scale+zero, plus a 128-token
fp16 residual window (the extra segment; context = quantized tokens + residual). Baselines: fp16
``scaled_dot_product_attention`` on the whole context (GQA folded into the query length, and
``enable_gqa=True``), and "dequantize the whole cache to fp16, then SDPA" (what transformers'
QuantizedCache does every step). Bytes = what each method must read from memory (packed codes, scales,
zero-points and the extra segment for kvtune; fp16 K/V for SDPA); GB/s = bytes / median time, and the
percentage is against a measured device-to-device copy (bytes read + written). Each kvtune case is
checked against the PyTorch reference (on up to 2 sequences) before it is timed.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import math
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F

from kvtune.io import write_text_atomic

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

SHAPES = {"llama3-8b": (32, 8, 128), "smollm2-135m": (9, 3, 64)}  # (Hq, Hkv, D)
RESIDUAL = 128
KEY_GROUP = 32  # default; --key-group 128 is the grouping the search picks on the embedded model


def _bench(fn, rep_ms: int = 100) -> float:
    """Median milliseconds of ``fn`` (triton's do_bench: L2 flushed before every call)."""
    import triton.testing

    return float(triton.testing.do_bench(fn, warmup=25, rep=rep_ms, return_mode="median"))


def _bench_graph(fn, rep_ms: int = 100, calls: int = 20) -> float:
    """Median milliseconds of one call when ``calls`` calls are replayed as a CUDA graph (no launch overhead)."""
    import triton.testing

    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):
        fn()  # warm up (compile) outside the capture
    torch.cuda.current_stream().wait_stream(stream)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        for _ in range(calls):
            fn()
    return float(triton.testing.do_bench(graph.replay, warmup=25, rep=rep_ms, return_mode="median")) / calls


def copy_bandwidth_gbs(dev: torch.device) -> float:
    """Device-to-device copy of 1 GiB: (bytes read + bytes written) / time."""
    n = 1 << 29  # fp16 elements = 1 GiB
    bufs = [torch.randn(n, device=dev, dtype=torch.float16), torch.empty(n, device=dev, dtype=torch.float16)]
    ms = _bench(lambda: bufs[1].copy_(bufs[0]))
    bufs.clear()
    torch.cuda.empty_cache()
    return 2 * n * 2 / ms / 1e6


def make_cache(bsz: int, hkv: int, t: int, d: int, bits: int, vgroup: int, dev: torch.device, seed: int = 0,
               key_group: int = KEY_GROUP):
    """Random packed keys/values with plausible scales (codes are uniform bytes: valid at 2/4/8 bits)."""
    from kvtune.kernels.decode_attention import PackedKeys, PackedValues
    from kvtune.quant.codes import slicing

    g = torch.Generator(device=dev).manual_seed(seed)
    row = slicing(bits, d).row_bytes
    gc = vgroup or d

    def rnd(*shape, lo=0.0, hi=1.0):
        return (torch.rand(*shape, generator=g, device=dev) * (hi - lo) + lo).half()

    kp = torch.randint(0, 256, (bsz, hkv, t, row), generator=g, device=dev, dtype=torch.uint8)
    vp = torch.randint(0, 256, (bsz, hkv, t, row), generator=g, device=dev, dtype=torch.uint8)
    levels = 2**bits - 1
    kq = PackedKeys(kp, rnd(bsz, hkv, t // key_group, d, lo=0.5, hi=2.0) / levels,
                    rnd(bsz, hkv, t // key_group, d, lo=-1.5, hi=-0.5), bits, key_group)
    vq = PackedValues(vp, rnd(bsz, hkv, t, math.ceil(d / gc), lo=0.5, hi=2.0) / levels,
                      rnd(bsz, hkv, t, math.ceil(d / gc), lo=-1.5, hi=-0.5), bits, vgroup)
    return kq, vq


def quant_bytes(kq, vq, ek, ev) -> int:
    """Bytes the fused kernel must read: codes + scales + zero-points + the extra segment."""
    ts = [kq.packed, kq.scale, kq.zero, vq.packed, vq.scale, vq.zero, ek, ev]
    return sum(x.numel() * x.element_size() for x in ts)


def dequantize_fp16(kq, vq, d: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Whole-cache dequantization in PyTorch ops (the QuantizedCache way): fp16 ``[B, Hkv, T, D]`` each."""
    from kvtune.quant.codes import slicing

    def codes(packed, bits):
        lay = slicing(bits, d)
        sh = (torch.arange(lay.slices, device=packed.device, dtype=torch.uint8) * bits).view(-1, 1)
        c = (packed.unsqueeze(-2) >> sh) & (2**bits - 1)
        return c.flatten(-2)[..., :d].half()

    k = codes(kq.packed, kq.bits).unflatten(2, (-1, kq.group))
    k = (k * kq.scale.unsqueeze(3) + kq.zero.unsqueeze(3)).flatten(2, 3)
    gc = vq.group or d
    v = codes(vq.packed, vq.bits).unflatten(-1, (-1, gc))
    v = (v * vq.scale.unsqueeze(-1) + vq.zero.unsqueeze(-1)).flatten(-2)
    return k, v


def sdpa_folded(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    """Decode SDPA with GQA folded into the query length: q ``[B, Hq, 1, D]`` -> ``[B, Hkv, n_rep, D]``."""
    bsz, hq, _, d = q.shape
    hkv = k.shape[1]
    out = F.scaled_dot_product_attention(q.view(bsz, hkv, hq // hkv, d), k, v)
    return out.view(bsz, hq, 1, d)


def fits(bsz: int, hkv: int, ctx: int, d: int, free: int) -> dict[str, bool]:
    """Which methods fit in ``free`` bytes (fp16 K/V for SDPA; + fp16 copy and uint8 codes to dequantize)."""
    fp16_kv = 2 * bsz * hkv * ctx * d * 2
    return {"kvtune": fp16_kv // 3 < free, "sdpa": fp16_kv * 1.2 < free, "dequant": fp16_kv * 2.6 < free}


def check(q, kq, vq, ek, ev) -> float:
    """Max |kernel - reference| on up to 2 sequences."""
    from kvtune.kernels.decode_attention import (
        PackedKeys,
        PackedValues,
        decode_attention,
        decode_attention_reference,
    )

    n = min(2, q.shape[0])
    sub_k = PackedKeys(kq.packed[:n], kq.scale[:n], kq.zero[:n], kq.bits, kq.group)
    sub_v = PackedValues(vq.packed[:n], vq.scale[:n], vq.zero[:n], vq.bits, vq.group)
    out = decode_attention(q[:n], sub_k, sub_v, ek[:n], ev[:n])
    ref = decode_attention_reference(q[:n], sub_k, sub_v, ek[:n], ev[:n])
    return (out.float() - ref.float()).abs().max().item()


def run_case(name: str, bsz: int, ctx: int, bits_list: list[int], vgroup: int, dev, copy_gbs: float,
             rep_ms: int, key_group: int = KEY_GROUP) -> list[dict]:
    from kvtune.kernels.decode_attention import decode_attention, default_config
    from kvtune.quant.codes import slicing

    hq, hkv, d = SHAPES[name]
    free = torch.cuda.mem_get_info(dev)[0]
    ok = fits(bsz, hkv, ctx, d, free)
    rows: list[dict] = []
    base = {"shape": name, "batch": bsz, "ctx": ctx, "hq": hq, "hkv": hkv, "d": d}
    q = torch.randn(bsz, hq, 1, d, device=dev, dtype=torch.float16)
    sdpa_ms = None
    if ok["sdpa"]:
        k = torch.randn(bsz, hkv, ctx, d, device=dev, dtype=torch.float16)
        v = torch.randn_like(k)
        nbytes = 2 * k.numel() * 2
        sdpa_ms = _bench(lambda: sdpa_folded(q, k, v), rep_ms)
        rows.append(dict(base, method="sdpa-fp16", bits=16, ms=sdpa_ms, bytes=nbytes,
                         ms_graph=_bench_graph(lambda: sdpa_folded(q, k, v), rep_ms)))
        try:
            def gqa(k=k, v=v):
                return F.scaled_dot_product_attention(q, k, v, enable_gqa=True)

            rows.append(dict(base, method="sdpa-fp16-enable_gqa", bits=16, ms=_bench(gqa, rep_ms), bytes=nbytes,
                             ms_graph=_bench_graph(gqa, rep_ms)))
        except (TypeError, RuntimeError) as exc:  # older torch
            print(f"  enable_gqa SDPA unavailable: {exc}")
        del k, v
        torch.cuda.empty_cache()
    for bits in bits_list:
        if not ok["kvtune"]:
            continue
        t = (ctx - RESIDUAL) // key_group * key_group
        kq, vq = make_cache(bsz, hkv, t, d, bits, vgroup, dev, key_group=key_group)
        ek = torch.randn(bsz, hkv, RESIDUAL, d, device=dev, dtype=torch.float16)
        ev = torch.randn_like(ek)
        err = check(q, kq, vq, ek, ev)
        nbytes = quant_bytes(kq, vq, ek, ev)
        def fused(kq=kq, vq=vq, ek=ek, ev=ev):
            return decode_attention(q, kq, vq, ek, ev)

        cfg = default_config(bsz, hkv, t, d, dev, slicing(bits, d).width, bits)
        rows.append(dict(base, method=f"kvtune-k{bits}v{bits}", kernel="split", bits=bits, vgroup=vgroup or d,
                         kgroup=key_group, config=dataclasses.asdict(cfg),
                         bits_per_element=8 * nbytes / (2 * bsz * hkv * ctx * d),
                         ms=_bench(fused, rep_ms), ms_graph=_bench_graph(fused, rep_ms), bytes=nbytes, max_abs_err=err))
        if ok["dequant"]:
            def deq(kq=kq, vq=vq, ek=ek, ev=ev):
                k16, v16 = dequantize_fp16(kq, vq, d)
                return sdpa_folded(q, torch.cat([k16, ek], 2), torch.cat([v16, ev], 2))

            ms_d = _bench(deq, rep_ms)
            rows.append(dict(base, method=f"dequant+sdpa-k{bits}v{bits}", bits=bits, ms=ms_d, bytes=nbytes))
        del kq, vq, ek, ev
        torch.cuda.empty_cache()
    best_sdpa = min((r["ms_graph"] for r in rows if r["method"].startswith("sdpa")), default=None)
    for r in rows:
        t_gpu = r.get("ms_graph", r["ms"])
        r["gbs"] = r["bytes"] / t_gpu / 1e6
        r["pct_copy_bw"] = 100 * r["gbs"] / copy_gbs
        r["speedup_vs_sdpa"] = (best_sdpa / t_gpu) if best_sdpa else None
    return rows


def print_table(rows: list[dict]) -> None:
    head = (f"{'shape':<13}{'B':>3}{'ctx':>8} {'method':<24}{'ms eager':>9}{'ms graph':>9}{'GB/s':>8}{'%copy':>7}"
            f"{'x sdpa':>8}{'err':>10}")
    print(head)
    print("-" * len(head))
    for r in rows:
        sp = f"{r['speedup_vs_sdpa']:.2f}" if r.get("speedup_vs_sdpa") else "-"
        err = f"{r['max_abs_err']:.1e}" if "max_abs_err" in r else ""
        graph = f"{r['ms_graph']:.4f}" if "ms_graph" in r else "-"
        print(f"{r['shape']:<13}{r['batch']:>3}{r['ctx']:>8} {r['method']:<24}{r['ms']:>9.4f}{graph:>9}"
              f"{r['gbs']:>8.0f}{r['pct_copy_bw']:>6.0f}%{sp:>8}{err:>10}")


SWEEP_GRID = {  # (block_t, warps, stages, splits x default, register cap)
    "llama3-8b": [(128, 4, 3, 1, None), (128, 4, 3, 1, 168), (128, 4, 2, 1, 168), (128, 4, 3, 2, 168),
                  (128, 4, 3, 0.5, 168), (64, 4, 3, 1, 128), (128, 4, 3, 1, 144), (128, 8, 3, 1, None)],
    "smollm2-135m": [(64, 1, 3, 1, None), (64, 1, 2, 1, None), (64, 1, 3, 2, None), (64, 1, 3, 0.5, None),
                     (64, 1, 4, 1, None), (32, 1, 3, 1, None), (128, 4, 3, 0.25, None), (64, 2, 3, 1, None)],
}


def sweep(dev, copy_gbs: float, vgroup: int, rep_ms: int, shapes: list[str], key_group: int,
          bits: int = 2, bsz: int = 8, ctx: int = 32768) -> list[dict]:
    """Launch-config grid at B=8, 32k, 2-bit (the target case) for each shape; the default config first."""
    from kvtune.kernels.decode_attention import DecodeConfig, decode_attention, default_config
    from kvtune.quant.codes import slicing

    rows = []
    for shape in shapes:
        hq, hkv, d = SHAPES[shape]
        t = (ctx - RESIDUAL) // key_group * key_group
        kq, vq = make_cache(bsz, hkv, t, d, bits, vgroup, dev, key_group=key_group)
        ek = torch.randn(bsz, hkv, RESIDUAL, d, device=dev, dtype=torch.float16)
        ev = torch.randn_like(ek)
        q = torch.randn(bsz, hq, 1, d, device=dev, dtype=torch.float16)
        nbytes = quant_bytes(kq, vq, ek, ev)
        auto = default_config(bsz, hkv, t, d, dev, slicing(bits, d).width, bits)
        print(f"{shape}: default config {auto}")
        cfgs = [("default", auto)] + [
            ("grid", DecodeConfig(bt, max(1, round(auto.num_splits * mult)), warps, stages, regs))
            for bt, warps, stages, mult, regs in SWEEP_GRID[shape]]
        for kind, cfg in cfgs:
            try:
                ms = _bench_graph(lambda cfg=cfg, a=(q, kq, vq, ek, ev): decode_attention(*a, config=cfg), rep_ms)
            except Exception as exc:  # report and go on (e.g. out of resources)
                print(f"  {cfg}: failed ({type(exc).__name__}: {exc})")
                continue
            gbs = nbytes / ms / 1e6
            rows.append({"shape": shape, "kind": kind, "key_group": key_group, "bits": bits, "batch": bsz, "ctx": ctx,
                         "block_t": cfg.block_t, "num_splits": cfg.num_splits, "num_warps": cfg.num_warps,
                         "num_stages": cfg.num_stages, "max_registers": cfg.max_registers, "ms": ms, "gbs": gbs,
                         "pct_copy_bw": 100 * gbs / copy_gbs})
            print(f"  {kind:<8}{cfg}: {ms:.4f} ms {gbs:.0f} GB/s ({100 * gbs / copy_gbs:.0f}%)", flush=True)
        del kq, vq, ek, ev
        torch.cuda.empty_cache()
    return rows


def host_time(dev, shapes: list[str], calls: int = 400) -> list[dict]:
    """Wall microseconds per call of back-to-back launches on a short context (GPU time << host time), so the
    figure is the host's cost of one call: kvtune's wrapper + 2 launches vs one SDPA call."""
    from kvtune.kernels.decode_attention import decode_attention

    rows = []
    for shape in shapes:
        hq, hkv, d = SHAPES[shape]
        kq, vq = make_cache(1, hkv, 1024, d, 2, 0, dev)
        ek = torch.randn(1, hkv, RESIDUAL, d, device=dev, dtype=torch.float16)
        q = torch.randn(1, hq, 1, d, device=dev, dtype=torch.float16)
        k = torch.randn(1, hkv, 1024 + RESIDUAL, d, device=dev, dtype=torch.float16)
        fns = {"kvtune decode_attention": lambda a=(q, kq, vq, ek, ek): decode_attention(*a),
               "sdpa-fp16 (enable_gqa)": lambda a=(q, k, k): F.scaled_dot_product_attention(*a, enable_gqa=True)}
        for name, fn in fns.items():
            us = _us_per_call(fn, calls)
            rows.append({"shape": shape, "method": name, "us_per_call": us})
            print(f"  host {shape} {name}: {us:.1f} us/call", flush=True)
        rows.append(_host_breakdown(shape, fns["kvtune decode_attention"], calls))
    return rows


def _us_per_call(fn, calls: int, warmup: int = 20) -> float:
    """Wall microseconds per call of ``calls`` back-to-back calls (after ``warmup`` untimed ones)."""
    for _ in range(warmup):
        fn()
    torch.cuda.synchronize()
    t0 = time.perf_counter()
    for _ in range(calls):
        fn()
    torch.cuda.synchronize()
    return (time.perf_counter() - t0) / calls * 1e6


class _NoLaunch:
    """Stands in for a Triton kernel: ``kernel[grid](*args)`` does nothing (times the Python wrapper alone)."""

    def __getitem__(self, grid: object) -> object:
        return lambda *a, **k: None


def _host_breakdown(shape: str, fn, calls: int) -> dict:
    """Where one kvtune call's host time goes: the wrapper alone (launches stubbed) and cProfile's top entries."""
    import cProfile
    import pstats

    from kvtune.kernels import decode_attention as mod

    saved = mod._decode_split_kernel, mod._merge_kernel
    mod._decode_split_kernel = mod._merge_kernel = _NoLaunch()
    try:
        wrapper_us = _us_per_call(fn, calls)
    finally:
        mod._decode_split_kernel, mod._merge_kernel = saved
    prof = cProfile.Profile()
    prof.enable()
    for _ in range(calls):
        fn()
    prof.disable()
    torch.cuda.synchronize()
    stats = pstats.Stats(prof)
    top = [{"function": f"{Path(f).name}:{line}({name})", "calls_per_call": round(st[1] / calls, 2),
            "tottime_us_per_call": round(st[2] / calls * 1e6, 2)}
           for (f, line, name), st in sorted(stats.stats.items(), key=lambda kv: -kv[1][2])[:15]]
    print(f"  host {shape} kvtune wrapper without launches: {wrapper_us:.1f} us/call; top (cProfile):")
    for t in top:
        print(f"    {t['tottime_us_per_call']:8.2f} us  x{t['calls_per_call']:<5} {t['function']}")
    return {"shape": shape, "method": "kvtune wrapper only (launches stubbed)", "us_per_call": wrapper_us,
            "cprofile_top_tottime": top}


def profile(dev, vgroup: int) -> None:
    """A few plain calls of the target case, for a profiler to attach to."""
    from kvtune.kernels.decode_attention import decode_attention

    hq, hkv, d = SHAPES["llama3-8b"]
    kq, vq = make_cache(8, hkv, 32768 - RESIDUAL, d, 2, vgroup, dev)
    ek = torch.randn(8, hkv, RESIDUAL, d, device=dev, dtype=torch.float16)
    q = torch.randn(8, hq, 1, d, device=dev, dtype=torch.float16)
    for _ in range(5):
        decode_attention(q, kq, vq, ek, ek)
    torch.cuda.synchronize()


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true", help="tiny smoke run (one small case per shape)")
    ap.add_argument("--sweep", action="store_true", help="launch-config sweep at B=8 32k 2-bit, per shape")
    ap.add_argument("--profile", action="store_true", help="run Llama-3-8B B=8 32k 2-bit 5 times (for ncu/nsys)")
    ap.add_argument("--value-group", type=int, default=0, help="value channel group (0 = head dim)")
    ap.add_argument("--key-group", type=int, default=KEY_GROUP, help="key token group (32: KIVI; 128: searched plans)")
    ap.add_argument("--host", action="store_true", help="also measure host microseconds per call")
    ap.add_argument("--bits", type=int, nargs="+", default=[4, 2])
    ap.add_argument("--batch", type=int, nargs="+", default=[1, 8, 32])
    ap.add_argument("--ctx", type=int, nargs="+", default=[4096, 32768, 131072])
    ap.add_argument("--shapes", nargs="+", default=list(SHAPES), choices=list(SHAPES))
    ap.add_argument("--out", default=None, help="JSON path (default benchmarks/results/decode_kernel_<device>.json)")
    args = ap.parse_args()
    if not torch.cuda.is_available():
        sys.exit("bench_decode_kernel: needs a CUDA GPU")
    import triton

    dev = torch.device("cuda")
    name = torch.cuda.get_device_name(dev)
    copy_gbs = 0.0 if args.profile else copy_bandwidth_gbs(dev)
    print(f"device {name}, torch {torch.__version__}, triton {triton.__version__}, "
          f"copy bandwidth {copy_gbs:.0f} GB/s (read+write)")
    rep = 30 if args.quick else 100
    result = {"device": name, "torch": torch.__version__, "triton": triton.__version__, "copy_gbs": copy_gbs,
              "key_group": args.key_group, "value_group": args.value_group or "D", "residual": RESIDUAL,
              "shapes": {k: {"hq": v[0], "hkv": v[1], "d": v[2]} for k, v in SHAPES.items()},
              "time": time.strftime("%Y-%m-%dT%H:%M:%S"),
              "l2_bytes": int(getattr(torch.cuda.get_device_properties(dev), "L2_cache_size", 0))}
    t_start = time.time()
    slug = "".join(ch if ch.isalnum() else "_" for ch in name.lower()).strip("_")
    out = Path(args.out or Path(__file__).parent / "results" / f"decode_kernel_{slug}{'_sweep' if args.sweep else ''}"
               f"{'_quick' if args.quick else ''}.json")
    out.parent.mkdir(parents=True, exist_ok=True)

    def save() -> None:  # after every case, so that a run cut short keeps what it measured
        result["wall_s"] = round(time.time() - t_start, 1)
        write_text_atomic(out, json.dumps(result, indent=1))

    if args.profile:
        profile(dev, args.value_group)
        return
    if args.sweep:
        result["sweep"] = sweep(dev, copy_gbs, args.value_group, rep, args.shapes, args.key_group)
    else:
        batches, ctxs = ([1], [4096]) if args.quick else (args.batch, args.ctx)
        rows: list[dict] = []
        for shape in args.shapes:
            for bsz in batches:
                for ctx in ctxs:
                    rows += run_case(shape, bsz, ctx, args.bits, args.value_group, dev, copy_gbs, rep,
                                     args.key_group)
                    result["rows"] = rows
                    save()
                    print(f"  done {shape} B={bsz} ctx={ctx} ({time.time() - t_start:.0f}s)", flush=True)
        result["rows"] = rows
        print()
        print_table(rows)
    if args.host:
        result["host"] = host_time(dev, args.shapes)
    save()
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
