"""Greedy decoding through the fused Triton kernel vs the PyTorch reference, on the random-weight SmolLM2.

Two caches of the same plan (``backend="triton"`` and ``backend="reference"``) decode side by side:

* lockstep (batch 1, no padding): both caches are fed the reference's greedy token every step, so the
  logits of every step are comparable; reported: whether the kernel's argmax equals the reference's at
  every step, and max |logit diff| per step (fp16 logits);
* generate (batch 4, left padding): ``model.generate(..., past_key_values=cache)`` runs independently on
  each backend; reported: token equality per row and max |logit diff| per step up to the first divergence.

    python benchmarks/kernel_vs_reference.py   # kv2 + kivi-2bit -> results/kernel_vs_reference_<device>.json
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path
from typing import Any

import torch

from kvtune.io import write_text_atomic

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import RESULTS, build_model, device_name, model_info, versions


@torch.no_grad()
def lockstep(model: Any, plan_name: str, prompt: torch.Tensor, steps: int) -> dict:
    from kvtune.plan import load_plan
    from kvtune.runtime import KVTuneCache

    plan = load_plan(plan_name)
    ref = KVTuneCache(plan, model, backend="reference")
    ker = KVTuneCache(plan, model, backend="triton")
    lr = model(prompt, past_key_values=ref).logits[:, -1:]
    lk = model(prompt, past_key_values=ker).logits[:, -1:]
    diffs, ref_tokens, ker_tokens = [], [], []
    for _ in range(steps):
        tok = lr.argmax(-1)  # [B, 1] the reference's choice drives both caches
        ref_tokens.append(int(tok[0, 0]))
        ker_tokens.append(int(lk.argmax(-1)[0, 0]))
        lr = model(tok, past_key_values=ref).logits
        lk = model(tok, past_key_values=ker).logits
        diffs.append(float((lr.float() - lk.float()).abs().max()))
    # the choice after the last step is not compared (no step consumes it)
    same = [a == b for a, b in zip(ref_tokens, ker_tokens)]
    return {"plan": plan_name, "mode": "lockstep", "batch": int(prompt.shape[0]), "prompt_tokens": int(prompt.shape[1]),
            "steps": steps, "tokens_equal": all(same), "steps_equal": sum(same),
            "first_divergence": next((i for i, s in enumerate(same) if not s), None),
            "max_logit_diff": max(diffs), "max_logit_diff_per_step": diffs,
            "reference_tokens": ref_tokens, "kernel_tokens": ker_tokens,
            "kernel_used": _kernel_calls(model, ker, tok)}


def _kernel_calls(model: Any, cache: Any, tok: torch.Tensor) -> int:
    """How many layers of one more decode step went through the fused kernel (counts decode_attention calls)."""
    import kvtune.kernels.decode_attention as kd

    fn, count = kd.decode_attention, [0]

    def counted(*a: Any, **k: Any) -> Any:
        count[0] += 1
        return fn(*a, **k)

    kd.decode_attention = counted
    try:
        model(tok, past_key_values=cache)
    finally:
        kd.decode_attention = fn
    return count[0]


@torch.no_grad()
def generate_padded(model: Any, plan_name: str, lengths: list[int], steps: int, seed: int = 1) -> dict:
    from kvtune.plan import load_plan
    from kvtune.runtime import KVTuneCache

    dev = next(model.parameters()).device
    t = max(lengths)
    gen = torch.Generator().manual_seed(seed)
    ids = torch.randint(3, model.config.vocab_size, (len(lengths), t), generator=gen)
    mask = torch.zeros(len(lengths), t, dtype=torch.long)
    for i, n in enumerate(lengths):
        ids[i, : t - n] = 0
        mask[i, t - n:] = 1
    ids, mask = ids.to(dev), mask.to(dev)
    outs = {}
    for backend in ("reference", "triton"):
        cache = KVTuneCache(load_plan(plan_name), model, backend=backend)
        o = model.generate(input_ids=ids, attention_mask=mask, past_key_values=cache, max_new_tokens=steps,
                           min_new_tokens=steps, do_sample=False, output_logits=True, return_dict_in_generate=True,
                           pad_token_id=0)
        outs[backend] = (o.sequences[:, t:], torch.stack(o.logits, 1))  # [B, S], [B, S, V]
    (rt, rl), (kt, kl) = outs["reference"], outs["triton"]
    rows = []
    for i in range(len(lengths)):
        eq = (rt[i] == kt[i]).tolist()
        first = next((j for j, e in enumerate(eq) if not e), None)
        upto = steps if first is None else first + 1  # logits up to and including the first divergent choice
        d = (rl[i, :upto].float() - kl[i, :upto].float()).abs().amax(-1).tolist()
        rows.append({"prompt_tokens": lengths[i], "tokens_equal": first is None, "first_divergence": first,
                     "max_logit_diff": max(d), "max_logit_diff_per_step": d})
    return {"plan": plan_name, "mode": "generate, left padding", "batch": len(lengths), "steps": steps,
            "tokens_equal": all(r["tokens_equal"] for r in rows), "rows": rows}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--plans", default="kv2,kivi-2bit")
    p.add_argument("--steps", type=int, default=64)
    p.add_argument("--prompt", type=int, default=1000)
    p.add_argument("--gen-steps", type=int, default=32, help="new tokens of the padded generate() case")
    p.add_argument("--layers", type=int, default=30)
    p.add_argument("--embedded", action="store_true",
                   help="the real embedded SmolLM2-135M on CPU under TRITON_INTERPRET=1, a pydoc:eval prompt, "
                        "lockstep only (slow: ~30 s a step)")
    p.add_argument("--control-only", action="store_true",
                   help="with --embedded: add the fp16-rounding controls to an existing result file")
    p.add_argument("--out", type=Path, default=None)
    a = p.parse_args(argv)
    if a.embedded:
        return _embedded(a)
    if torch.cuda.is_available():
        dev, dtype = "cuda", torch.float16
    elif os.environ.get("TRITON_INTERPRET") == "1":  # CPU smoke run of this script (interpreted kernels)
        dev, dtype = "cpu", torch.float32
    else:
        sys.exit("kernel_vs_reference: needs a CUDA GPU (or TRITON_INTERPRET=1 for a CPU smoke run)")
    model = build_model(a.layers, 8192, dev, dtype)
    gen = torch.Generator().manual_seed(0)
    prompt = torch.randint(3, model.config.vocab_size, (1, a.prompt), generator=gen).to(dev)
    slug = "".join(ch if ch.isalnum() else "_" for ch in device_name().lower()).strip("_")
    out = a.out or RESULTS / f"kernel_vs_reference_{slug}.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    result = {"device": device_name(), "versions": versions(), "model": model_info(model),
              "time": time.strftime("%Y-%m-%dT%H:%M:%S"), "cases": []}
    plans = a.plans.split(",")
    jobs = [(lockstep, (model, plan, prompt, a.steps)) for plan in plans]
    lengths = [a.prompt, a.prompt - 301, a.prompt - 37, 333]
    jobs.append((generate_padded, (model, plans[0], lengths, a.gen_steps)))
    for fn, args in jobs:
        t = time.perf_counter()
        case = fn(*args) | {"wall_s": time.perf_counter() - t}
        result["cases"].append(case)
        print({k: v for k, v in case.items() if not isinstance(v, list)}, flush=True)
        for r in case.get("rows", []):
            print("   row", {k: v for k, v in r.items() if not isinstance(v, list)}, flush=True)
        write_text_atomic(out, json.dumps(result, indent=1) + "\n")
    print(f"wrote {out}")
    return 0


@torch.no_grad()
def rounding_control(model: Any, plan_name: str, prompt: torch.Tensor, tokens: list[int]) -> dict:
    """The control for a lockstep case: the reference path against itself with every attention output rounded
    to fp16 (the kernel's output precision), fed the same tokens. Low-bit codes are discontinuous in their
    input, so an fp16-sized difference can flip codes of the next block flushed and grow; if this control
    shows the kernel's pattern, the kernel adds nothing beyond fp16 rounding."""
    from kvtune.plan import load_plan
    from kvtune.runtime import KVTuneCache
    from kvtune.runtime import torch_attention as reference

    exact = reference.attend

    def run(rounded: bool) -> torch.Tensor:
        reference.attend = (lambda step, q, *r, **k: exact(step, q, *r, **k).half().to(q.dtype)) if rounded \
            else exact
        try:
            cache = KVTuneCache(load_plan(plan_name), model, backend="reference")
            logits = [model(prompt, past_key_values=cache).logits[:, -1:]]
            for t in tokens:
                logits.append(model(torch.tensor([[t]], device=prompt.device), past_key_values=cache).logits)
        finally:
            reference.attend = exact
        return torch.cat(logits, 1)[0].float()  # [steps + 1, V]

    a, b = run(False), run(True)
    diffs = (a - b).abs().amax(-1)[1:].tolist()
    same = (a.argmax(-1) == b.argmax(-1))[:-1].tolist()  # the choice after the last token is not compared
    return {"mode": "control: reference vs reference with fp16-rounded attention output", "steps": len(tokens),
            "steps_equal": sum(same), "first_divergence": next((i for i, e in enumerate(same) if not e), None),
            "max_logit_diff": max(diffs), "max_logit_diff_per_step": diffs}


def _embedded(a: argparse.Namespace) -> int:
    """Lockstep kernel-vs-reference on the real weights (CPU, interpreted kernels), each case with its
    :func:`rounding_control`; ``--control-only`` adds the controls to an existing result file."""
    if os.environ.get("TRITON_INTERPRET") != "1" and not a.control_only:
        sys.exit("kernel_vs_reference --embedded: set TRITON_INTERPRET=1 (CPU run of the kernels)")
    import kvtune
    from kvtune.data import load_text, token_chunks

    model, tokenizer = kvtune.load_model("smollm2-135m")
    prompt = token_chunks(tokenizer, load_text("pydoc:eval"), a.prompt)[:1]
    out = a.out or RESULTS / "kernel_vs_reference_cpu_embedded.json"
    if a.control_only:
        result = json.loads(out.read_text())
        cases = result["cases"]
    else:
        result = {"device": "cpu (TRITON_INTERPRET=1)", "versions": versions(),
                  "model": "SmolLM2-135M-Instruct (embedded GGUF, real weights), fp32", "prompt": "pydoc:eval",
                  "time": time.strftime("%Y-%m-%dT%H:%M:%S"), "cases": []}
        cases = []
        for plan in a.plans.split(","):
            t = time.perf_counter()
            case = lockstep(model, plan, prompt, a.steps) | {"wall_s": time.perf_counter() - t}
            case["reference_text"] = tokenizer.decode(case["reference_tokens"])
            cases.append(case)
    result["cases"] = []
    for case in cases:
        if case.get("prompt_tokens") != prompt.shape[1]:
            sys.exit(f"kernel_vs_reference: {out} was made with a {case.get('prompt_tokens')}-token prompt; "
                     f"pass --prompt {case.get('prompt_tokens')}")
        case["control"] = rounding_control(model, case["plan"], prompt, case["reference_tokens"])
        result["cases"].append(case)
        print({k: v for k, v in case.items() if not isinstance(v, (list, dict))}, flush=True)
        print("   control", {k: v for k, v in case["control"].items() if not isinstance(v, list)}, flush=True)
        write_text_atomic(out, json.dumps(result, indent=1) + "\n")
    print(f"wrote {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
