"""Shared pieces of the GPU benchmarks: the random-weight SmolLM2-135M model, caches by method name,
cache bytes, device/version info. Not part of the kvtune package (benchmarks only)."""

from __future__ import annotations

import importlib.metadata as md
import sys
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from kvtune.eval.baselines import tensor_bytes

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

RESULTS = Path(__file__).resolve().parent / "results"
# SmolLM2-135M's architecture (the embedded model); weights are random: speed does not depend on them.
SMOLLM2 = {"hidden_size": 576, "intermediate_size": 1536, "num_hidden_layers": 30, "num_attention_heads": 9,
           "num_key_value_heads": 3, "head_dim": 64, "vocab_size": 49152, "rms_norm_eps": 1e-5,
           "tie_word_embeddings": True, "max_position_embeddings": 8192, "bos_token_id": 1, "eos_token_id": 2}
ROPE_THETA = 100000.0
# Llama-3-8B's architecture (32 layers, 32 q / 8 kv heads, d=128), random weights
LLAMA3_8B = {"hidden_size": 4096, "intermediate_size": 14336, "num_hidden_layers": 32, "num_attention_heads": 32,
             "num_key_value_heads": 8, "head_dim": 128, "vocab_size": 128256, "rms_norm_eps": 1e-5,
             "tie_word_embeddings": False, "max_position_embeddings": 8192, "bos_token_id": 1, "eos_token_id": 2}
SHAPES = {"smollm2-135m": (SMOLLM2, ROPE_THETA), "llama3-8b": (LLAMA3_8B, 500000.0)}


def build_model(layers: int | None = None, max_positions: int = 8192, device: str = "cuda",
                dtype: torch.dtype = torch.float16, shape: str = "smollm2-135m") -> Any:
    """``shape``'s architecture (SmolLM2-135M or Llama-3-8B) with random weights (seed 0), eval mode, SDPA
    attention; built on ``device`` in ``dtype`` directly (an 8B model initialised on the CPU takes minutes)."""
    from transformers import LlamaConfig, LlamaForCausalLM

    base, theta = SHAPES[shape]
    cfg = dict(base, num_hidden_layers=layers or base["num_hidden_layers"],
               max_position_embeddings=max(max_positions, 8192))
    try:  # transformers 5 keeps rope settings in rope_parameters
        config = LlamaConfig(**cfg, rope_parameters={"rope_type": "default", "rope_theta": theta})
    except TypeError:
        config = LlamaConfig(**cfg, rope_theta=theta)
    config.architectures = ["LlamaForCausalLM"]
    config._attn_implementation = "sdpa"
    config.kvtune_shape = shape
    with torch.random.fork_rng(devices=[torch.device(device)] if device != "cpu" else []):
        torch.manual_seed(0)
        old = torch.get_default_dtype()
        torch.set_default_dtype(dtype)
        try:
            with torch.device(device):
                model = LlamaForCausalLM(config)
        finally:
            torch.set_default_dtype(old)
    return model.to(device=device, dtype=dtype).eval()


def model_info(model: Any) -> dict[str, Any]:
    c = model.config
    shape = getattr(c, "kvtune_shape", "smollm2-135m")
    theta = SHAPES.get(shape, (None, ROPE_THETA))[1]
    return {"architecture": f"LlamaForCausalLM, {shape} shape, random weights (seed 0)", "shape": shape,
            "num_hidden_layers": c.num_hidden_layers, "hidden_size": c.hidden_size, "num_attention_heads":
            c.num_attention_heads, "num_key_value_heads": c.num_key_value_heads, "head_dim": c.head_dim,
            "vocab_size": c.vocab_size, "rope_theta": theta, "dtype": str(next(model.parameters()).dtype),
            "max_position_embeddings": c.max_position_embeddings}


@dataclass(frozen=True)
class Method:
    """One row: how to make a fresh cache for a model and how to count its bytes."""

    name: str
    description: str
    make: Callable[[Any], Any]
    nbytes: Callable[[Any], int]
    kind: str  # "fp16", "hf-quantized", "kvtune"
    plan: Any = None
    no_cudnn_sdpa: bool = False  # run with torch.backends.cuda.enable_cudnn_sdp(False)


def _hf_layer_bytes(cache: Any) -> int:
    total = 0
    for layer in cache.layers:
        for attr in ("keys", "values", "_quantized_keys", "_quantized_values"):
            total += tensor_bytes(getattr(layer, attr, None))
    return total


def kv3_plan() -> Any:
    """A 3-bit uniform plan built in code (KIVI layout at 3 bits): K per-channel g32, V per-token g32, R=128."""
    from kvtune.plan import Plan
    from kvtune.plan_types import LayerPlan
    from kvtune.quant.formats import affine

    layer = LayerPlan(key=affine(bits=3, axis="channel", group=32), value=affine(bits=3, axis="token", group=32),
                      residual=128)
    return Plan(layers=(layer,), name="kivi-3bit",
                description="3-bit uniform: K per-channel g32, V per-token g32, R=128")


def method(name: str, backend: str = "auto") -> Method:
    """``hf-dynamic`` | ``hf-quanto-{2,4}bit`` | ``hf-hqq-{2,4}bit`` | ``kivi-3bit`` | any kvtune preset name."""
    if name in ("hf-dynamic", "hf-dynamic-flash"):
        from transformers import DynamicCache

        desc = "transformers DynamicCache (fp16, uncompressed), PyTorch's default SDPA backends"
        if name.endswith("flash"):
            desc = "transformers DynamicCache (fp16, uncompressed), cuDNN SDPA disabled (flash / efficient)"
        return Method(name, desc, lambda m: DynamicCache(config=m.config), _hf_layer_bytes, "fp16",
                      no_cudnn_sdpa=name.endswith("flash"))
    if name.startswith("hf-"):
        _, qbackend, bits = name.split("-")
        nbits = int(bits.removesuffix("bit"))

        def make(m: Any, qbackend: str = qbackend, nbits: int = nbits) -> Any:
            from transformers import QuantizedCache

            return QuantizedCache(backend=qbackend, config=m.config, nbits=nbits, q_group_size=64, residual_length=128)

        return Method(name, f"transformers QuantizedCache({qbackend}), {nbits}-bit, axis 0, group 64, residual 128",
                      make, _hf_layer_bytes, "hf-quantized")
    from kvtune.plan import load_plan
    from kvtune.runtime import KVTuneCache

    plan = kv3_plan() if name == "kivi-3bit" else load_plan(name)
    return Method(name, plan.description, lambda m: KVTuneCache(plan, m, backend=backend),
                  lambda c: int(c.nbytes()), "kvtune", plan)


def probe_hf_backend(backend: str) -> str | None:
    """None when transformers' QuantizedCache(``backend``) round-trips a small tensor here, else why not."""
    try:
        from transformers import LlamaConfig, QuantizedCache

        config = LlamaConfig(hidden_size=128, num_attention_heads=2, num_key_value_heads=2, num_hidden_layers=1,
                             intermediate_size=64, vocab_size=16)
        cache = QuantizedCache(backend=backend, config=config, nbits=4, q_group_size=64, residual_length=128)
        dev = "cuda" if torch.cuda.is_available() else "cpu"
        x = torch.randn(1, 2, 4, 64, device=dev, dtype=torch.float16 if dev == "cuda" else torch.float32)
        cache.update(x, x, 0)
        k, _ = cache.update(x[:, :, :1], x[:, :, :1], 0)
        if k.shape[-2] != 5:
            return f"QuantizedCache({backend}) returned {k.shape[-2]} tokens instead of 5"
    except Exception as exc:  # an optional backend's failure becomes the row's reason
        first = (str(exc).strip().splitlines() or [type(exc).__name__])[0]
        return f"QuantizedCache backend '{backend}' unavailable: {type(exc).__name__}: {first[:200]}"
    return None


def versions() -> dict[str, str | None]:
    out: dict[str, str | None] = {"python": sys.version.split()[0]}
    for pkg in ("torch", "transformers", "triton", "optimum-quanto", "hqq"):
        try:
            out[pkg] = md.version(pkg)
        except md.PackageNotFoundError:
            out[pkg] = None
    out["torch_cuda"] = torch.version.cuda
    return out


def device_name() -> str:
    return torch.cuda.get_device_name() if torch.cuda.is_available() else "cpu"

