"""Markdown tables from the JSON files in benchmarks/results/ (what README.md and closing notes quote).

    python benchmarks/summarize.py                 # the h200 files
    python benchmarks/summarize.py --device h100   # the earlier H100 files
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

RESULTS = Path(__file__).resolve().parent / "results"


def _load(name: str) -> dict | None:
    path = RESULTS / name
    return json.loads(path.read_text()) if path.exists() else None


L2_BYTES = {"NVIDIA H200": 60_000_000}  # for result files written before bench_decode_kernel recorded it


def kernel_table(doc: dict, cases: list[tuple[str, int, int]]) -> list[str]:
    """Decode-attention rows (CUDA-graph ms, % of copy bandwidth, speed-up vs fp16 SDPA with enable_gqa).

    A method whose bytes fit in the L2 cache is marked "(L2)": repeated calls on one cache read it from L2,
    so its time is a lower bound for a real decode step (where 30 layers' caches do not fit together)."""
    l2 = doc.get("l2_bytes") or L2_BYTES.get(doc["device"], 0)
    out = [f"Decode attention, {doc['device']}, torch {doc['torch']}, triton {doc['triton']}, copy bandwidth "
           f"{doc['copy_gbs']:.0f} GB/s, key group {doc['key_group']}, value group {doc['value_group']}, "
           f"{doc['residual']} fp16 window tokens:", "",
           "| shape | B | context | method | ms | GB/s | % copy bw | vs fp16 |",
           "| --- | ---: | ---: | --- | ---: | ---: | ---: | ---: |"]
    for shape, bsz, ctx in cases:
        rows = [r for r in doc["rows"] if (r["shape"], r["batch"], r["ctx"]) == (shape, bsz, ctx)]
        base = next((r for r in rows if r["method"] == "sdpa-fp16-enable_gqa"), None)
        for r in rows:
            ms = r.get("ms_graph") or r["ms"]
            ref = (base.get("ms_graph") or base["ms"]) if base else None
            sp = f"{ref / ms:.2f}x" if ref else "-"
            name = r["method"] + (" (L2)" if r["bytes"] < l2 else "")
            out.append(f"| {shape} | {bsz} | {ctx // 1024}k | {name} | {ms:.4f} | {r['gbs']:.0f} | "
                       f"{r['pct_copy_bw']:.0f}% | {sp} |")
    return out


def e2e_table(doc: dict) -> list[str]:
    """End-to-end rows: decode ms/step, tokens/s, prefill s, peak decode memory, cache compression."""
    out = [f"End to end, {doc['device']}, {doc['model']['architecture']}, {doc['settings']['new_tokens']} new "
           "tokens:", "",
           "| prompt | B | method | ms/step | tok/s | prefill s | peak decode GB | cache x smaller | bits held |",
           "| ---: | ---: | --- | ---: | ---: | ---: | ---: | ---: | ---: |"]
    for r in sorted(doc["rows"], key=lambda r: (r["prompt_tokens"], r["batch"])):
        if "ms_per_step" not in r:
            out.append(f"| {r['prompt_tokens']} | {r['batch']} | {r['method']} | {r.get('error', 'not run')} |")
            continue
        peak = r.get("peak_decode_bytes")
        out.append(f"| {r['prompt_tokens']} | {r['batch']} | {r['method']} | {r['ms_per_step']:.1f} | "
                   f"{r['tokens_per_s']:.0f} | {r['prefill_s']:.2f} | {peak / 1e9 if peak else 0:.2f} | "
                   f"{r['compression_vs_fp16']:.2f} | {r['bits_per_element_held']:.2f} |")
    return out


def sass_table(doc: dict) -> list[str]:
    """The offline sm_90 builds of ``bench_sass.py``: registers, spill stack, programs a multiprocessor and warp
    instructions a token of the hot loop, per shape, format, query rows and register cap."""
    out = [f"kernel_sass (Triton {doc['versions']['triton']}, {doc['device']}):",
           "| shape | format | rows | cap | registers | stack B | programs/SM | warp instr/token |",
           "| --- | --- | ---: | ---: | ---: | ---: | ---: | ---: |"]
    for r in doc["rows"]:
        out.append(f"| {r['shape']} | {r['format']} | {r['query_rows']} | {r['max_registers'] or '-'} | "
                   f"{r['registers']} | {r['stack_bytes']} | {r['programs_per_sm']} | "
                   f"{r['warp_instructions_per_token']:.2f} |")
    return out


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--device", default="h200")
    a = ap.parse_args(argv)
    lines: list[str] = []
    if doc := _load(f"decode_kernel_{a.device}.json"):
        cases = [(s, b, c) for s in ("llama3-8b", "smollm2-135m") for b, c in ((8, 32768), (32, 131072))]
        lines += kernel_table(doc, cases) + [""]
        for h in doc.get("host", []):
            lines.append(f"- host {h['shape']} {h['method']}: {h['us_per_call']:.1f} us/call")
        lines.append("")
    for name in (f"e2e_{a.device}.json", f"e2e_{a.device}_repeat.json"):
        if doc := _load(name):
            lines += [f"{name}:"] + e2e_table(doc) + [""]
    if doc := _load(f"host_{a.device}.json"):
        lines += [f"- host (host_{a.device}.json) {h['shape']} {h['method']}: {h['us_per_call']:.1f} us/call"
                  for h in doc.get("host", [])] + [""]
    for name in (f"kernel_vs_reference_{a.device}.json", "kernel_vs_reference_cpu_embedded.json"):
        doc = _load(name) or {}
        for r in doc.get("cases", []):
            diff = r.get("max_logit_diff", max((x["max_logit_diff"] for x in r.get("rows", [])), default=None))
            lines.append(f"- {name}: {r['plan']} {r['mode']} B={r['batch']} {r['steps']} steps: tokens equal "
                         f"{r['tokens_equal']} ({r.get('steps_equal', '-')} of {r['steps']}), max |logit diff| {diff}")
            if ctl := r.get("control"):
                lines.append(f"  - control, reference vs fp16-rounded reference: {ctl['steps_equal']} of "
                             f"{ctl['steps']} steps equal, max |logit diff| {ctl['max_logit_diff']:.3f}")
    if doc := _load("kernel_sass_sm90.json"):
        lines += [""] + sass_table(doc)
    print("\n".join(lines))


if __name__ == "__main__":
    main()
