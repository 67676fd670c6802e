"""The fused decode kernel compiled for a GPU on any machine (no GPU needed): registers, spills, and what its hot
loop issues a token, per format and launch configuration, side by side.

A kernel that is latency-bound (``benchmarks/results/decode_kernel_variants_h200.json``: ~0.4 instructions issued a
cycle a scheduler, two 4-warp programs a multiprocessor) gets faster from two things this script measures exactly,
before any GPU is at hand: fewer registers a thread (more programs a multiprocessor; spills cost local-memory
traffic) and fewer instructions a token. Each case builds its cache the way the runtime does
(``bench_kernel_formats.build``), calls :func:`~kvtune.kernels.decode_attention.decode_attention` with a ``launch``
hook that records the split kernel's arguments instead of launching it, specializes them as Triton's launcher would
(16-divisible pointers and ints, ints equal to 1), and compiles for ``sm_<arch>`` with inline PTX on. From the
cubin: registers, stack (spill) bytes (``cuobjdump -res-usage``) and the SASS of the hot loop (``nvdisasm``; the
pipelined loop over whole tiles, :func:`hot_loop`): its instructions an iteration, the same a token (``x warps /
block_t``: warp instructions a token a KV head), its spill loads/stores and top opcodes. Nothing here is timed: GPU
time comes from ``bench_kernel_formats.py --rows/--caps/--configs``.

    PYTHONPATH=. python benchmarks/bench_sass.py                       # formats x {16, 8} query rows
    PYTHONPATH=. python benchmarks/bench_sass.py --formats normq2-log8 --rows 8 --caps 168 0

Compile with the Triton the GPU runs (the result depends on it; ``versions`` in the JSON).
"""

from __future__ import annotations

import argparse
import collections
import json
import os
import re
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))

SHAPES = {"llama3-8b": (32, 8, 128), "smollm2-135m": (9, 3, 64), "d256-gqa2": (8, 4, 256), "qwen-gqa7": (28, 4, 128)}
OPTIONS = ("num_warps", "num_stages", "maxnreg")


class _Record:
    """A ``launch`` hook: ``hook(kernel)[grid](*args, **kwargs)`` is recorded, not launched."""

    def __init__(self) -> None:
        self.calls: list[tuple[Any, Any, tuple, dict]] = []

    def __call__(self, kernel: Any) -> Any:
        record = self

        class _Grid:
            def __getitem__(self, grid: Any) -> Any:
                return lambda *args, **kwargs: record.calls.append((kernel, grid, args, kwargs))

        return _Grid()


def specialize(kernel: Any, args: tuple, kwargs: dict) -> tuple[dict, dict, dict, dict]:
    """(signature, constexprs, attrs, options) of a launch of JIT function ``kernel``, as Triton's launcher
    specializes it (``native_specialize_impl``: pointer and int divisibility by 16, ints equal to 1 as constants)."""
    from triton._C.libtriton import native_specialize_impl
    from triton.backends.compiler import BaseBackend

    values = dict(zip(kernel.arg_names, args)) | {k: v for k, v in kwargs.items() if k not in OPTIONS}
    signature, constexprs, attrs = {}, {}, {}
    for i, p in enumerate(kernel.params):
        v = values[p.name]
        if p.is_constexpr:
            signature[p.name], constexprs[(i,)] = "constexpr", v
            continue
        ty, key = native_specialize_impl(BaseBackend, v, False, not p.do_not_specialize, True)
        signature[p.name] = ty
        if ty == "constexpr":
            constexprs[(i,)] = key
        elif key and "D" in key:
            attrs[(i,)] = [["tt.divisibility", 16]]
    return signature, constexprs, attrs, {k: kwargs[k] for k in OPTIONS if kwargs.get(k)}


def _tool(name: str) -> str:
    from triton.backends import nvidia

    return os.path.join(os.path.dirname(nvidia.__file__), "bin", name)


def hot_loop(sass: str) -> collections.Counter:
    """Opcode counts of the hot loop of a SASS listing: of the loops (a backward branch to an earlier label), the
    largest that prefetches through ``cp.async`` (LDGSTS: the pipelined loop over whole tiles; the masked head/tail
    loop runs at most twice a program and loads plainly), else the largest."""
    lines = sass.splitlines()
    labels = {m.group(1): i for i, x in enumerate(lines) if (m := re.match(r"^(\.L_x_\d+):", x))}
    loops = []
    for i, x in enumerate(lines):
        m = re.search(r"BRA `\((\.L_x_\d+)\)", x)
        if m and labels.get(m.group(1), i) < i:
            ops: collections.Counter = collections.Counter()
            for y in lines[labels[m.group(1)]:i + 1]:
                if op := re.match(r"^\s+/\*[0-9a-f]+\*/\s+(?:@!?U?P\w+\s+)?([A-Z0-9_]+)", y):
                    ops[op.group(1)] += 1
            loops.append(ops)
    return max(loops, key=lambda o: (o["LDGSTS"] > 0, sum(o.values())), default=collections.Counter())


def compile_report(kernel: Any, args: tuple, kwargs: dict, arch: int, dump: Path | None = None) -> dict[str, Any]:
    """Registers, spill bytes and hot-loop instructions of ``kernel`` launched with ``args``/``kwargs``,
    compiled for ``sm_<arch>`` (``dump``: also write its TTGIR, PTX and SASS beside that stem)."""
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    signature, constexprs, attrs, options = specialize(kernel, args, kwargs)
    compiled = triton.compile(ASTSource(kernel, signature, constexprs, attrs), target=GPUTarget("cuda", arch, 32),
                              options=options)
    with tempfile.TemporaryDirectory() as tmp:
        cubin = Path(tmp) / "k.cubin"
        cubin.write_bytes(compiled.asm["cubin"])
        usage = subprocess.run([_tool("cuobjdump"), "-res-usage", str(cubin)], capture_output=True, text=True,
                               check=True).stdout
        sass = subprocess.run([_tool("nvdisasm"), "-c", str(cubin)], capture_output=True, text=True,
                              check=True).stdout
    if dump is not None:
        dump.parent.mkdir(parents=True, exist_ok=True)
        for ext, text in (("ttgir", compiled.asm["ttgir"]), ("ptx", compiled.asm["ptx"]), ("sass", sass)):
            dump.with_name(f"{dump.name}.{ext}").write_text(text)
    res = dict(re.findall(r"(REG|STACK|SHARED|LOCAL):(\d+)", usage))
    ops = hot_loop(sass)
    ttgir = compiled.asm["ttgir"]
    return {"registers": int(res.get("REG", 0)), "stack_bytes": int(res.get("STACK", 0)),
            "local_bytes": int(res.get("LOCAL", 0)), "shared_bytes": compiled.metadata.shared,
            "layout_conversions": len(re.findall(r"ttg\.convert_layout", ttgir)),
            "hot_loop_instructions": sum(ops.values()), "hot_loop_spill_ops": ops["LDL"] + ops["STL"],
            "hot_loop_top": dict(ops.most_common(12))}


# a multiprocessor's registers, shared memory (bytes) and warps, by compute capability
SM_LIMITS = {80: (65536, 164 * 1024, 64), 86: (65536, 100 * 1024, 48), 89: (65536, 100 * 1024, 48),
             90: (65536, 228 * 1024, 64)}


def programs_per_sm(registers: int, shared: int, warps: int, arch: int) -> int | None:
    """Programs of ``warps`` warps that fit on one multiprocessor (registers a warp allocated in 256s)."""
    if arch not in SM_LIMITS:
        return None
    regs, smem, max_warps = SM_LIMITS[arch]
    per_warp = -(-max(registers, 1) * 32 // 256) * 256
    return min(regs // (per_warp * warps), smem // max(shared, 1), max_warps // warps)


def case(fmt: str, shape: str, rows: int, cap: int | None, arch: int, t: int = 2048,
         dump: Path | None = None) -> dict[str, Any]:
    """One format on one shape: the default tiles of :func:`~kvtune.kernels.decode_config.tile_choice` with
    ``rows`` query rows and register cap ``cap`` (None: the default rule; 0: none)."""
    import bench_kernel_formats as bkf

    from kvtune.kernels.decode_attention import decode_attention
    from kvtune.kernels.decode_config import DecodeConfig, tile_choice
    from kvtune.quant.codes import slicing

    hq, hkv, d = SHAPES[shape]
    kspec, vspec = bkf.formats()[fmt]
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(1, hkv, t, d, generator=gen)
    kq, _, _ = bkf.build(kspec, "key", x)
    vq, _, _ = bkf.build(vspec, "value", x)
    block_t, warps, stages, auto_cap = tile_choice(d, slicing(vq.bits, d).width, vq.bits)
    regs = auto_cap if cap is None else (cap or None)
    cfg = DecodeConfig(block_t, 4, warps, stages, regs, rows)
    q = torch.randn(1, hq, 1, d, generator=gen).half()
    ek = torch.randn(1, hkv, 64, d, generator=gen).half()
    rec = _Record()
    decode_attention(q, kq, vq, ek, ek, config=cfg, launch=rec)
    kernel, _, args, kwargs = rec.calls[0]
    stem = None if dump is None else dump / re.sub(r"[^\w.-]+", "_", f"{shape}_{fmt}_r{rows}_c{regs or 0}")
    report = compile_report(kernel, args, kwargs | {"USE_ASM": True}, arch, stem)
    per_token = report["hot_loop_instructions"] * warps / block_t
    return {"format": fmt, "shape": shape, "hq": hq, "hkv": hkv, "d": d, "query_rows": cfg.rows(hq // hkv),
            "block_t": block_t, "num_warps": warps, "num_stages": stages, "max_registers": regs,
            "programs_per_sm": programs_per_sm(report["registers"], report["shared_bytes"], warps, arch),
            "warp_instructions_per_token": round(per_token, 2)} | report


def tree_label() -> str:
    """The checkout's short commit, ``+`` when ``kvtune/`` differs from it (``?`` outside git)."""
    root = Path(__file__).resolve().parents[1]
    head = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=root, capture_output=True, text=True)
    if head.returncode:
        return "?"
    dirty = subprocess.run(["git", "diff", "--quiet", "HEAD", "--", "kvtune"], cwd=root).returncode
    return head.stdout.strip() + ("+" if dirty else "")


def main(argv: list[str] | None = None) -> int:
    import bench_kernel_formats as bkf

    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--shapes", nargs="+", default=["llama3-8b", "smollm2-135m"], choices=list(SHAPES))
    ap.add_argument("--formats", nargs="+", default=None, help=f"subset of {list(bkf.formats())}")
    ap.add_argument("--rows", type=int, nargs="+", default=[16, 8], help="query rows a program (DecodeConfig)")
    ap.add_argument("--caps", type=int, nargs="+", default=None,
                    help="register caps to compile with (0: none; default: the launch rule's choice)")
    ap.add_argument("--arch", type=int, default=90, help="compute capability, e.g. 90 (H100/H200), 80 (A100)")
    ap.add_argument("--label", default=None,
                    help="name of this tree's rows (default: the commit, + when kvtune/ has changes); rows of other "
                         "labels in --out stay when they were built with the same Triton")
    ap.add_argument("--dump", type=Path, default=None, help="folder for each build's TTGIR, PTX and SASS")
    ap.add_argument("--out", type=Path, default=None)
    a = ap.parse_args(argv)
    if os.environ.get("TRITON_INTERPRET") == "1":
        sys.exit("bench_sass: compiles real kernels; unset TRITON_INTERPRET")
    import triton

    from kvtune.io import write_text_atomic

    label = a.label or tree_label()
    rows = []
    for shape in a.shapes:
        for fmt in a.formats or list(bkf.formats()):
            for r in a.rows:
                for cap in a.caps or [None]:
                    row = {"tree": label} | case(fmt, shape, r, cap, a.arch, dump=a.dump)
                    rows.append(row)
                    print(json.dumps({k: v for k, v in row.items() if k != "hot_loop_top"}), flush=True)
    out = a.out or Path(__file__).resolve().parent / "results" / f"kernel_sass_sm{a.arch}.json"
    kept = []  # rows of other trees built with the same Triton stay: trees compare side by side
    if out.exists() and (old := json.loads(out.read_text())).get("versions", {}).get("triton") == triton.__version__:
        kept = [r for r in old.get("rows", []) if r.get("tree") != label]
    result = {"benchmark": "kernel_sass", "device": f"none (compiled offline for sm_{a.arch})",
              "versions": {"torch": torch.__version__, "triton": triton.__version__},
              "time": time.strftime("%Y-%m-%dT%H:%M:%S"), "rows": kept + rows}
    write_text_atomic(out, json.dumps(result, indent=1) + "\n")
    print(f"wrote {out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
