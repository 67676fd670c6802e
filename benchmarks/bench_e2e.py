"""End-to-end decode on a GPU: fp16 DynamicCache vs transformers' QuantizedCache vs kvtune plans.

Model: SmolLM2-135M's architecture (30 layers, 9 q / 3 kv heads, d=64) with random weights in fp16
(``benchmarks/_common.py``; speed does not depend on the weights), ``max_position_embeddings`` raised
to fit the longest prompt. For each prompt length (8k, 32k) x batch (1, 8) x method: a random prompt is
prefilled through a fresh cache in chunks of ``--prefill-chunk`` tokens (timed separately), then
``--warmup`` untimed steps (40: a whole residual/flush cycle, so every Triton specialization is compiled)
and ``--new-tokens`` (256) timed greedy steps of one token per sequence (the loop ``model.generate`` runs,
without its logits processors). Reported per row: decode ms per step and
tokens/s (``batch * steps / time``), prefill seconds, peak GPU memory of prefill and of decode
(``torch.cuda.max_memory_allocated``, reset before each phase, weights included), the bytes the cache
holds at the end (``cache.nbytes()`` for kvtune: capacity included; ``used``: without the growth
headroom) and their ratio to an fp16 cache of the same tokens.

Methods: ``hf-dynamic`` (fp16; PyTorch 2.11 picks cuDNN SDPA on an H100), ``hf-dynamic-flash`` (fp16, cuDNN
SDPA disabled: flash attention, far less host time per call), ``hf-quanto-4bit`` / ``hf-hqq-4bit``
(QuantizedCache, group 64, residual 128; a row states why when the backend does not import), kvtune presets
by name (``kivi-4bit``, ``k4v2``, ``kivi-2bit``, ``kv2``, ...), ``kivi-3bit`` (3-bit KIVI layout built in
code) and ``kv2-g128`` (2-bit, keys g128, values one group per head: 2.4 bits, built in code).

    python benchmarks/bench_e2e.py                                   # full run -> results/e2e_<device>.json
    python benchmarks/bench_e2e.py --lengths 8192 --out X.json       # a subset (rows merge into X.json)
    python benchmarks/bench_e2e.py --profile --lengths 8192 --batches 1 --methods hf-dynamic,kv2
    python benchmarks/bench_e2e.py --quick                           # CPU smoke run (2 layers, 256 tokens)
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path
from typing import Any

import torch

from kvtune.io import write_text_atomic

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import RESULTS, build_model, device_name, method, model_info, probe_hf_backend, versions

from kvtune.runtime.fuse import compile_pointwise

DEFAULT_METHODS = ("hf-dynamic", "hf-dynamic-flash", "hf-quanto-4bit", "hf-hqq-4bit", "kivi-4bit", "k4v2",
                   "kivi-2bit", "kv2-g128")


def kv2_g128_plan() -> Any:
    from kvtune.plan import Plan
    from kvtune.plan_types import LayerPlan
    from kvtune.quant.formats import affine

    layer = LayerPlan(key=affine(bits=2, axis="channel", group=128), value=affine(bits=2, axis="token", group=0))
    return Plan(layers=(layer,), name="kv2-g128", description="2-bit: K per-channel g128, V per-token one group per "
                "head, asymmetric, fp16 scale+zero, no residual window (flushes of 128 tokens)")


PLANS = Path(__file__).resolve().parent / "plans"
SEARCHED = {"searched-static-graph": PLANS / "searched_2.5bit_smollm2.json",
            "searched2-static-graph": PLANS / "searched_2bit_smollm2.json"}


@torch.no_grad()
def fitted_plan(model: Any, layers: tuple[Any, ...], name: str, description: str, tokens: int = 512) -> Any:
    """A plan of ``layers`` (one :class:`LayerPlan` a model layer) whose calibrated state (means, scale ranges) is
    fitted on the keys/values of a random ``tokens``-token prompt through ``model``."""
    from transformers import DynamicCache

    from kvtune.plan import Plan
    from kvtune.quant import codec

    dev = next(model.parameters()).device
    ids = torch.randint(0, model.config.vocab_size, (1, tokens), generator=torch.Generator().manual_seed(3)).to(dev)
    cache = DynamicCache()
    model(ids, past_key_values=cache, use_cache=True, logits_to_keep=1)
    tensors = {}
    for i, lp in enumerate(layers):
        kv = (cache.layers[i].keys, cache.layers[i].values)
        for role, spec, x in zip(("key", "value"), (lp.key, lp.value), kv):
            for field, t in codec.fit(spec, x.float()).items():
                tensors[f"layers.{i}.{role}.{field}"] = t.cpu()
    return Plan(layers=layers, name=name, tensors=tensors, description=description)


def searched_plan(path: Path) -> Any:
    """A maker (model -> Plan) of the layer specs of a real searched plan (``path``, one of :data:`SEARCHED`:
    SmolLM2's 2.5- and 2.0-bit plans: norm codes with one-byte scales, Lloyd-Max and ternary codes, centering, sinks,
    per-layer windows and flush blocks) cycled over the model's layers, state fitted on that model."""
    from kvtune.plan_types import LayerPlan

    def make(model: Any) -> Any:
        doc = json.loads(path.read_text())
        specs = [LayerPlan.from_dict(d, f"{path.name} layer {i}") for i, d in enumerate(doc["layers"])]
        layers = tuple(specs[i % len(specs)] for i in range(model.config.num_hidden_layers))
        return fitted_plan(model, layers, doc["source"]["name"],
                           f"the layer specs of {doc['source']['name']} ({path.name}) on this shape")

    return make


def normq2_plan(model: Any) -> Any:
    """2-bit norm codes (Hadamard-rotated, evenly spaced levels, one-byte log2 scales: 2.06 bits at D = 128) for keys
    and values, a 64-token fp16 window, 64-token blocks, one sink: the format family searched plans pick."""
    from kvtune.plan_types import LayerPlan, SalientPolicy
    from kvtune.quant.families.normq import normq

    spec = normq(2, "uniform", scale_dtype="log8")
    lp = LayerPlan(key=spec, value=spec, residual=63, block=64, salient=SalientPolicy(sink_tokens=1))
    return fitted_plan(model, (lp,) * model.config.num_hidden_layers, "normq2-log8",
                       "2-bit norm codes, one-byte scales, 64-token window incl. 1 sink, 64-token blocks")


GRAPH_METHODS = {  # name -> (description, kvtune plan maker (model -> Plan) or None for fp16)
    "fp16-static-graph": ("transformers StaticCache (fp16) for prompt + steps; decode: GQA folded into the query "
                          "(no repeat_kv), SDPA with the length mask (cuDNN off: memory-efficient kernel); steps "
                          "replayed as CUDA graphs (kvtune.runtime.graphs)", None),
    "kv2-g128-static-graph": ("kv2-g128 in kvtune's StaticKVTuneCache (capacity prompt + steps, device-side "
                              "lengths, the split decode kernel as torch.ops.kvtune.decode_static), decode steps "
                              "replayed as CUDA graphs", lambda m: kv2_g128_plan()),
    "normq2-static-graph": ("normq2-log8 (2-bit rotated norm codes, one-byte scales, fitted ranges) in "
                            "StaticKVTuneCache, decode steps replayed as CUDA graphs", normq2_plan),
    **{name: (f"a searched plan's layer specs (benchmarks/plans/{path.name}, state fitted on this model) in "
              "StaticKVTuneCache, decode steps replayed as CUDA graphs", searched_plan(path))
       for name, path in SEARCHED.items()},
}


def get_method(name: str, model: Any = None) -> Any:
    if name in GRAPH_METHODS:
        from _common import Method

        desc, plan = GRAPH_METHODS[name]
        return Method(name, desc, lambda m: None, lambda c: int(c.nbytes()) if plan else _hf_bytes(c),
                      "kvtune-graph" if plan else "fp16-graph", plan(model) if plan else None, no_cudnn_sdpa=True)
    if name == "kv2-g128":
        from dataclasses import replace

        from kvtune.runtime import KVTuneCache

        plan = kv2_g128_plan()
        return replace(method("kv2"), name=name, description=plan.description, plan=plan,
                       make=lambda m: KVTuneCache(plan, m))
    return method(name)


def _sync() -> None:
    if torch.cuda.is_available():
        torch.cuda.synchronize()


def _reset_peak() -> None:
    if torch.cuda.is_available():
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()


def _peak() -> int | None:
    return int(torch.cuda.max_memory_allocated()) if torch.cuda.is_available() else None


def prepare(model: Any, meth: Any, length: int, batch: int, chunk: int,
            seed: int = 0) -> tuple[Any, torch.Tensor, dict]:
    """A fresh cache holding a random ``[batch, length]`` prompt; returns (cache, next tokens [B, 1], stats)."""
    dev = next(model.parameters()).device
    if meth.kind != "kvtune" and model.config._attn_implementation != "sdpa":
        model.set_attn_implementation("sdpa")
    gen = torch.Generator().manual_seed(seed)
    prompt = torch.randint(0, model.config.vocab_size, (batch, length), generator=gen).to(dev)  # [B, T]
    base = int(torch.cuda.memory_allocated()) if dev.type == "cuda" else None
    cache = meth.make(model)
    _reset_peak()
    t0 = time.perf_counter()
    for s in range(0, length, chunk):
        logits = model(prompt[:, s:s + chunk], past_key_values=cache, use_cache=True, logits_to_keep=1).logits
    _sync()
    stats = {"prefill_s": time.perf_counter() - t0, "peak_prefill_bytes": _peak(), "allocated_before_bytes": base}
    nxt = logits[:, -1:].argmax(-1)  # [B, 1]
    return cache, nxt, stats


@torch.no_grad()
def run_one(model: Any, meth: Any, length: int, batch: int, new_tokens: int, warmup: int, chunk: int,
            keep_tokens: int = 32) -> dict:
    cache, nxt, row = prepare(model, meth, length, batch, chunk)
    _reset_peak()
    toks = []
    for _ in range(warmup):
        toks.append(nxt)
        nxt = model(nxt, past_key_values=cache, use_cache=True).logits[:, -1:].argmax(-1)
    _sync()
    t1 = time.perf_counter()
    for _ in range(new_tokens):
        toks.append(nxt)
        nxt = model(nxt, past_key_values=cache, use_cache=True).logits[:, -1:].argmax(-1)
    _sync()
    decode = time.perf_counter() - t1
    c = model.config
    tokens = length + warmup + new_tokens
    fp16 = 2 * c.num_hidden_layers * batch * c.num_key_value_heads * tokens * c.head_dim * 2
    held = meth.nbytes(cache)
    if torch.cuda.is_available():
        row["gpu_ms_per_step"], row["top_gpu_kernels"], row["kernels_per_step"] = _gpu_ms_per_step(
            lambda c=cache, n=nxt: model(n, past_key_values=c, use_cache=True).logits[:, -1:].argmax(-1))
        row["host_bound"] = bool(row["gpu_ms_per_step"] is not None
                                 and row["gpu_ms_per_step"] < 0.8 * 1000 * decode / new_tokens)
    row["greedy_tokens"] = torch.cat(toks[:keep_tokens], 1)[:2].tolist()
    row.update({"decode_s": decode, "ms_per_step": 1000 * decode / new_tokens,
                "tokens_per_s": batch * new_tokens / decode, "prefill_tokens_per_s": batch * length / row["prefill_s"],
                "peak_decode_bytes": _peak(), "cache_tokens": tokens, "cache_bytes": held,
                "fp16_cache_bytes": fp16, "compression_vs_fp16": fp16 / held if held else None,
                "bits_per_element_held": 8 * held / (fp16 / 2)})
    if meth.kind == "kvtune":
        row["cache_bytes_used"] = int(cache.nbytes(used=True))
        row["effective_bits_accountant"] = float(cache.plan.effective_bits(tokens))
        row["kernel_path"] = _kernel_path(cache)
    del cache
    return row


def _kernel_path(cache: Any) -> bool:
    """Whether single-token decode of every layer of this cache goes through the fused Triton kernel."""
    from kvtune import kernels
    from kvtune.quant import codec

    ok = all(codec.kernel_ok(g.plan.key, "key") and codec.kernel_ok(g.plan.value, "value")
             for layer in cache.layers for g in layer.groups)
    sal = any(layer.plan.salient.ratio > 0 for layer in cache.layers)
    return bool(ok and not sal and torch.cuda.is_available() and kernels.available())


# --------------------------------------------------------------------------------------- CUDA-graph paths
def _hf_bytes(cache: Any) -> int:
    from _common import _hf_layer_bytes

    return _hf_layer_bytes(cache)


def _static_cache(model: Any, meth: Any, batch: int, capacity: int) -> Any:
    if meth.plan is not None:
        return meth.plan.cache(model, static=True, batch=batch, max_length=capacity)
    from transformers import AttentionInterface, StaticCache
    from transformers.masking_utils import AttentionMaskInterface, sdpa_mask

    AttentionInterface.register(GQA_STATIC, _gqa_static_attention)
    AttentionMaskInterface.register(GQA_STATIC, sdpa_mask)
    model.set_attn_implementation(GQA_STATIC)
    return StaticCache(config=model.config, max_cache_len=capacity)


GQA_STATIC = "fp16-static-gqa"


def _gqa_static_attention(module: Any, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor,
                          attention_mask: torch.Tensor | None, scaling: float | None = None, dropout: float = 0.0,
                          **kwargs: Any) -> tuple[torch.Tensor, None]:
    """fp16 StaticCache decode without transformers' ``repeat_kv`` copy of the whole cache (it repeats K/V when a
    mask is given): the query heads of a KV head are folded into the query length, ``q [B, Hkv, n_rep, D]``
    against ``k, v [B, Hkv, L_cap, D]`` with the length mask ``[B, 1, 1, L_cap]``; prompts use transformers' SDPA."""
    import torch.nn.functional as F
    from transformers.integrations.sdpa_attention import sdpa_attention_forward

    if query.shape[2] != 1:
        return sdpa_attention_forward(module, query, key, value, attention_mask, scaling=scaling, dropout=dropout,
                                      **kwargs)
    b, hq, _, d = query.shape
    hkv = key.shape[1]
    out = F.scaled_dot_product_attention(query.reshape(b, hkv, hq // hkv, d), key, value, attn_mask=attention_mask,
                                         scale=scaling)  # [B, Hkv, n_rep, D]
    return out.reshape(b, 1, hq, d), None


def _fill_synthetic(cache: Any, length: int, gen: torch.Generator) -> None:
    """Make a (prefilled-with-16-tokens) static cache hold ``length`` tokens of random content: fp16 K/V, or
    random codes, plausible scales and a random fp16 window with kvtune's counters moved; decode time does not
    depend on the values, and a real prefill of ~200 sequences of 32k tokens would cost minutes of device time."""
    for layer in cache.layers:
        if hasattr(layer, "bufs"):  # kvtune StaticLayer
            n = max(0, length - layer.residual) // layer.flush * layer.flush
            for bufs in layer.bufs.values():
                for buf in bufs.values():
                    if buf.dtype == torch.uint8:
                        buf.random_(0, 256, generator=gen)
                    else:
                        buf.uniform_(0.01, 0.1, generator=gen)
            layer.win_k.normal_(generator=gen)
            layer.win_v.normal_(generator=gen)
            layer.nq.fill_(n)
            layer.nw.fill_(length - n)
            layer.n_quant, layer.n_win, layer.length = n, length - n, length
        else:  # transformers StaticLayer
            layer.keys[:, :, :length].normal_(generator=gen)
            layer.values[:, :, :length].normal_(generator=gen)
            if hasattr(layer, "cumulative_length"):
                layer.cumulative_length.fill_(length)


def _gpu_ms_per_step(step: Any, steps: int = 8, top: int = 10) -> tuple[float | None, list[dict], float]:
    """Sum of the GPU kernels' durations (torch.profiler, CUDA graph replays included) per step, the ``top``
    kernels by time (name, calls and ms per step) and the kernel launches a step."""
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        for _ in range(steps):
            step()
        _sync()
    kernels = [e for e in prof.key_averages() if _dev_us(e) > 0]
    total = sum(_dev_us(e) for e in kernels)
    ranked = [{"kernel": e.key[:160], "calls_per_step": e.count / steps, "ms_per_step": _dev_us(e) / 1000 / steps}
              for e in sorted(kernels, key=lambda e: -_dev_us(e))[:top]]
    return (total / 1000 / steps if total else None), ranked, sum(e.count for e in kernels) / steps


@torch.no_grad()
def run_graph(model: Any, meth: Any, length: int, batch: int, new_tokens: int, warmup: int, chunk: int,
              synthetic: bool = False, keep_tokens: int = 32, top_kernels: int = 10) -> dict:
    """A static cache of ``length + warmup + new_tokens + 16`` tokens: prompt (one call for kvtune's static cache,
    ``chunk``-token pieces for fp16 StaticCache; ``synthetic``: 16 real tokens then random content), then decode
    steps replayed as CUDA graphs (:class:`kvtune.runtime.graphs.GraphDecoder`): wall ms per step, the GPU
    kernels' ms per step (profiler), capture seconds, the first ``keep_tokens`` greedy tokens."""
    from kvtune.runtime.graphs import GraphDecoder

    dev = next(model.parameters()).device
    if meth.plan is not None:  # both graphs (append, append + flush) captured before the timed steps
        warmup = max(warmup, max(lp.residual + lp.flush for lp in meth.plan.layers) + 1)
    gen = torch.Generator().manual_seed(0)
    real = 16 if synthetic else length
    prompt = torch.randint(0, model.config.vocab_size, (batch, real), generator=gen).to(dev)
    base = int(torch.cuda.memory_allocated()) if dev.type == "cuda" else None
    cache = _static_cache(model, meth, batch, length + warmup + new_tokens + 16)  # + 16: the profiled steps
    dec = GraphDecoder(model, cache)
    _reset_peak()
    t0 = time.perf_counter()
    if meth.plan is not None:
        logits = dec.prefill(prompt)
    else:
        for s in range(0, real, chunk):
            out = model(prompt[:, s:s + chunk], logits_to_keep=1, **dec.kw)
        logits = dec.start(out.logits[:, -1], real)
    if synthetic:
        _fill_synthetic(cache, length, torch.Generator(device=dev).manual_seed(1))
        dec.start(logits, length)
    _sync()
    row = {"prefill_s": time.perf_counter() - t0, "peak_prefill_bytes": _peak(), "allocated_before_bytes": base,
           "prefill": "synthetic (16 real tokens, then random cache content)" if synthetic else "real"}
    _reset_peak()
    tok = logits.argmax(-1)
    toks = []
    for _ in range(warmup):  # captures both graphs (append, append + flush) within one flush cycle
        toks.append(tok)
        tok = dec.step(tok).argmax(-1)
    _sync()
    t1 = time.perf_counter()
    for _ in range(new_tokens):
        toks.append(tok)
        tok = dec.step(tok).argmax(-1)
    _sync()
    decode = time.perf_counter() - t1
    gpu_ms, top, launches = (_gpu_ms_per_step(lambda d=dec: d.step(d.out.argmax(-1)), top=top_kernels)
                             if dev.type == "cuda" else (None, [], None))
    c = model.config
    tokens = length + warmup + new_tokens
    fp16 = 2 * c.num_hidden_layers * batch * c.num_key_value_heads * tokens * c.head_dim * 2
    held = meth.nbytes(cache)
    row.update({"decode_s": decode, "ms_per_step": 1000 * decode / new_tokens, "gpu_ms_per_step": gpu_ms,
                "host_bound": bool(gpu_ms is not None and gpu_ms < 0.8 * 1000 * decode / new_tokens),
                "tokens_per_s": batch * new_tokens / decode, "peak_decode_bytes": _peak(), "cache_tokens": tokens,
                "cache_bytes": held, "fp16_cache_bytes": fp16, "compression_vs_fp16": fp16 / held if held else None,
                "bits_per_element_held": 8 * held / (fp16 / 2), "capture_s": dec.capture_s,
                "graphs": len(dec.graphs), "top_gpu_kernels": top, "kernels_per_step": launches,
                "greedy_tokens": torch.stack(toks[:keep_tokens], 1)[:2].tolist() if keep_tokens else []})
    if meth.plan is not None:
        row["effective_bits_accountant"] = float(cache.plan.effective_bits(tokens))
    model.set_attn_implementation("sdpa")
    del dec, cache
    return row


def max_batch(model: Any, meth: Any, length: int, new_tokens: int, warmup: int) -> dict:
    """The largest batch whose static cache for ``length + warmup + new_tokens + 16`` tokens fits in the free
    memory (estimated from the cache's bytes per sequence, 8% and 4 GB kept for activations; lowered by 10% after
    an out-of-memory error), run with synthetic content: its ms per step and tokens/s."""
    c = model.config
    cap = length + warmup + new_tokens + 16
    if meth.plan is not None:
        probe = _static_cache(model, meth, 1, cap)
        per_seq = int(probe.nbytes())
        del probe
        model.set_attn_implementation("sdpa")
    else:
        per_seq = 2 * c.num_hidden_layers * c.num_key_value_heads * cap * c.head_dim * 2
    torch.cuda.empty_cache()
    free = torch.cuda.mem_get_info()[0]
    batch = int((free * 0.92 - 4e9) // per_seq)
    tries = []
    while batch > 0 and len(tries) < 4:
        try:
            row = run_graph(model, meth, length, batch, new_tokens, warmup, 4096, synthetic=True, keep_tokens=0)
            row.pop("greedy_tokens", None)
            return {"batch": batch, "cache_bytes_per_sequence": per_seq, "free_bytes_before": free,
                    "oom_tries": tries, **row}
        except torch.cuda.OutOfMemoryError:
            tries.append(batch)
            torch.cuda.empty_cache()
            batch = int(batch * 0.9)
    return {"error": f"out of memory at batches {tries}", "cache_bytes_per_sequence": per_seq}


# ---------------------------------------------------------------------------------------------- profile
class _Timers:
    """Cumulative CPU wall time inside some kvtune functions (no device sync: time the host spends)."""

    def __init__(self) -> None:
        self.acc: dict[str, list[float]] = {}
        self.undo: list[tuple[Any, str, Any]] = []

    def wrap(self, owner: Any, attr: str, label: str) -> Any:
        fn = getattr(owner, attr)
        acc = self.acc.setdefault(label, [0.0, 0])

        def timed(*a: Any, **k: Any) -> Any:
            t = time.perf_counter()
            try:
                return fn(*a, **k)
            finally:
                acc[0] += time.perf_counter() - t
                acc[1] += 1

        setattr(owner, attr, timed)
        self.undo.append((owner, attr, fn))
        return timed

    def install(self) -> None:
        from transformers import AttentionInterface

        import kvtune.kernels.decode_attention as kd
        from kvtune.runtime import attention, layer, policies, torch_attention

        att = self.wrap(attention, "kvtune_attention", "kvtune_attention (whole)")
        AttentionInterface.register(attention.NAME, att)
        self.wrap(layer.KVTuneLayer, "update", "KVTuneLayer.update")
        self.wrap(attention, "_kernel_attend", "_kernel_attend")
        self.wrap(kd, "decode_attention", "decode_attention (launch)")
        self.wrap(policies, "after_attention", "after_attention (flush)")
        self.wrap(torch_attention, "left_padding", "left_padding")

    def remove(self) -> None:
        from transformers import AttentionInterface

        from kvtune.runtime import attention

        for owner, attr, fn in reversed(self.undo):
            setattr(owner, attr, fn)
        AttentionInterface.register(attention.NAME, attention.kvtune_attention)

    def reset(self) -> None:
        for v in self.acc.values():
            v[0], v[1] = 0.0, 0


def _dev_us(e: Any) -> float:
    for attr in ("self_device_time_total", "self_cuda_time_total"):
        if hasattr(e, attr):
            return float(getattr(e, attr))
    return 0.0


@torch.no_grad()
def profile_one(model: Any, meth: Any, length: int, batch: int, chunk: int, steps: int = 16) -> dict:
    """Where one decode step's time goes: wall, GPU busy time, launches, CPU time in kvtune functions."""
    from torch.profiler import ProfilerActivity, profile

    cache, nxt, _ = prepare(model, meth, length, batch, chunk)
    for _ in range(40):
        nxt = model(nxt, past_key_values=cache, use_cache=True).logits[:, -1:].argmax(-1)
    timers = _Timers() if meth.kind == "kvtune" else None
    if timers:
        timers.install()
    _sync()
    t = time.perf_counter()
    for _ in range(steps):
        nxt = model(nxt, past_key_values=cache, use_cache=True).logits[:, -1:].argmax(-1)
    _sync()
    wall_ms = 1000 * (time.perf_counter() - t) / steps
    host = {k: {"ms_per_step": 1000 * v[0] / steps, "calls_per_step": v[1] / steps}
            for k, v in (timers.acc.items() if timers else [])}
    if timers:
        timers.remove()
    with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
        for _ in range(steps):
            nxt = model(nxt, past_key_values=cache, use_cache=True).logits[:, -1:].argmax(-1)
        _sync()
    ka = prof.key_averages()
    kernels = [e for e in ka if str(e.device_type).endswith("CUDA") and _dev_us(e) > 0]
    gpu_us = sum(_dev_us(e) for e in kernels)
    launches = sum(e.count for e in ka if e.key in ("cudaLaunchKernel", "cuLaunchKernel", "cudaLaunchKernelExC",
                                                       "cuLaunchKernelEx"))
    syncs = sum(e.count for e in ka if e.key in ("cudaStreamSynchronize", "cudaDeviceSynchronize",
                                                    "cudaMemcpyAsync"))
    top_cpu = sorted((e for e in ka if e.key.startswith("aten::") or e.key.startswith("cuda")),
                     key=lambda e: -e.self_cpu_time_total)[:15]
    top_gpu = sorted(kernels, key=lambda e: -_dev_us(e))[:12]
    out = {"method": meth.name, "prompt_tokens": length, "batch": batch, "steps": steps,
           "wall_ms_per_step_unprofiled": wall_ms,
           "gpu_kernel_ms_per_step": gpu_us / 1000 / steps,
           "kernel_launches_per_step": launches / steps,
           "sync_or_memcpy_calls_per_step": syncs / steps,
           "host_ms_per_step_in_kvtune_functions": host,
           "top_host_ops": [{"op": e.key, "calls_per_step": e.count / steps,
                             "self_cpu_ms_per_step": e.self_cpu_time_total / 1000 / steps} for e in top_cpu],
           "top_gpu_kernels": [{"kernel": e.key[:120], "calls_per_step": e.count / steps,
                                "ms_per_step": _dev_us(e) / 1000 / steps} for e in top_gpu]}
    del cache
    return out


# ------------------------------------------------------------------------------------------------- main
def parse(argv: list[str] | None = None) -> argparse.Namespace:
    ints = lambda s: [int(x) for x in s.split(",")]
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--quick", action="store_true", help="tiny CPU/GPU smoke run (2 layers, 256-token prompts)")
    p.add_argument("--lengths", type=ints, default=None, help="prompt lengths, comma separated (8192,32768)")
    p.add_argument("--batches", type=ints, default=None, help="batch sizes (1,8)")
    p.add_argument("--methods", type=lambda s: s.split(","), default=list(DEFAULT_METHODS))
    p.add_argument("--new-tokens", type=int, default=None, help="timed decode steps (256)")
    p.add_argument("--warmup", type=int, default=40,
                   help="untimed steps first (>= one residual/flush cycle, so every kernel variant is compiled)")
    p.add_argument("--prefill-chunk", type=int, default=4096)
    p.add_argument("--layers", type=int, default=None)
    p.add_argument("--profile", action="store_true", help="profile decode steps instead of the table")
    p.add_argument("--out", type=Path, default=None, help="JSON path; rows already there for other cases are kept")
    p.add_argument("--shape", choices=["smollm2-135m", "llama3-8b"], default="smollm2-135m",
                   help="model architecture (random weights)")
    p.add_argument("--top-kernels", type=int, default=10, help="GPU kernels listed a graph row (by time)")
    p.add_argument("--compile-pointwise", action="store_true",
                   help="torch.compile the norm and MLP modules of the model first (every method gets it)")
    p.add_argument("--max-batch", action="store_true",
                   help="for the *-static-graph methods: the largest batch whose static cache fits at each length "
                        "(synthetic cache content), and its tokens/s")
    a = p.parse_args(argv)
    a.lengths = a.lengths or ([256] if a.quick else [8192, 32768])
    a.batches = a.batches or ([1, 2] if a.quick else [1, 8])
    a.new_tokens = a.new_tokens or (8 if a.quick else 256)
    a.layers = a.layers or (2 if a.quick else None)
    if a.quick:
        a.warmup, a.prefill_chunk = min(a.warmup, 2), min(a.prefill_chunk, 128)
    return a


def _load(out: Path) -> dict:
    if out.exists():
        try:
            return json.loads(out.read_text())
        except json.JSONDecodeError:
            pass
    return {}


def main(argv: list[str] | None = None) -> int:
    args = parse(argv)
    dev = "cuda" if torch.cuda.is_available() else "cpu"
    dtype = torch.float16 if dev == "cuda" else torch.float32
    model = build_model(args.layers, max(args.lengths) + args.new_tokens + args.warmup + 64, dev, dtype, args.shape)
    if args.compile_pointwise:
        print(f"compiled {compile_pointwise(model)} norm/MLP modules", flush=True)
    slug = "".join(ch if ch.isalnum() else "_" for ch in device_name().lower()).strip("_")
    shape = "" if args.shape == "smollm2-135m" else f"_{args.shape}"
    out = args.out or RESULTS / f"e2e{shape}_{slug}{'_quick' if args.quick else ''}.json"
    result = _load(out)
    result.update({"schema_version": 1, "benchmark": "e2e_decode", "device": device_name(), "versions": versions(),
                   "model": model_info(model), "time": time.strftime("%Y-%m-%dT%H:%M:%S")})
    result.setdefault("settings", {}).update({"new_tokens": args.new_tokens, "warmup": args.warmup,
                                              "prefill_chunk": args.prefill_chunk,
                                              "compile_pointwise": args.compile_pointwise})
    key = ("method", "prompt_tokens", "batch")
    section = "max_batch" if args.max_batch else "profiles" if args.profile else "rows"
    if args.max_batch:
        key = ("method", "prompt_tokens")
    rows = result.setdefault(section, [])
    if args.max_batch:
        args.methods = [m for m in args.methods if m in GRAPH_METHODS]
    probes = {b: probe_hf_backend(b) for b in ("quanto", "hqq") if any(m.startswith(f"hf-{b}") for m in args.methods)}
    for length in args.lengths:
        for batch in ([0] if args.max_batch else args.batches):
            for name in args.methods:
                entry: dict[str, Any] = {"method": name, "prompt_tokens": length, "batch": batch,
                                         "new_tokens": args.new_tokens}
                meth = get_method(name, model)
                entry["description"] = meth.description
                why = next((probes[b] for b in probes if name.startswith(f"hf-{b}")), None)
                t = time.perf_counter()
                if why:
                    entry["error"] = why
                else:
                    cudnn = torch.backends.cuda.cudnn_sdp_enabled()
                    try:
                        torch.backends.cuda.enable_cudnn_sdp(cudnn and not meth.no_cudnn_sdpa)
                        entry["cudnn_sdpa"] = torch.backends.cuda.cudnn_sdp_enabled()
                        if args.max_batch:
                            entry.update(max_batch(model, meth, length, args.new_tokens, args.warmup))
                        elif args.profile:
                            entry.update(profile_one(model, meth, length, batch, args.prefill_chunk))
                        elif name in GRAPH_METHODS:
                            entry.update(run_graph(model, meth, length, batch, args.new_tokens, args.warmup,
                                                   args.prefill_chunk, top_kernels=args.top_kernels))
                        else:
                            entry.update(run_one(model, meth, length, batch, args.new_tokens, args.warmup,
                                                 args.prefill_chunk))
                    except Exception as exc:  # one failing method must not lose the others
                        entry["error"] = f"{type(exc).__name__}: {(str(exc).splitlines() or [''])[0][:300]}"
                    finally:
                        torch.backends.cuda.enable_cudnn_sdp(cudnn)
                entry["wall_s"] = time.perf_counter() - t
                if dev == "cuda":
                    torch.cuda.empty_cache()
                rows[:] = [r for r in rows if tuple(r.get(k) for k in key) != tuple(entry[k] for k in key)]
                rows.append(entry)
                print(json.dumps({k: (round(v, 4) if isinstance(v, float) else v) for k, v in entry.items()
                                  if not isinstance(v, (list, dict))}), flush=True)
                out.parent.mkdir(parents=True, exist_ok=True)
                write_text_atomic(out, json.dumps(result, indent=1) + "\n")
    print(f"wrote {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
