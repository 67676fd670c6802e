"""compressed-tensors (llm-compressor's checkpoint format): one fp8 ``kv_cache_scheme`` for the whole model.

``config.json`` -> ``quantization_config`` (``quant_method: compressed-tensors``) -> ``kv_cache_scheme``: one
``QuantizationArgs`` (``num_bits: 8, type: float, strategy: tensor | attn_head, symmetric: true, dynamic: false``)
and per-layer scale tensors (:mod:`kvtune.export.scales`). Loaded by vLLM
(``vllm/model_executor/layers/quantization/compressed_tensors/compressed_tensors.py``, scales through
``quantization/kv_cache.py``), SGLang (per-tensor only) and TensorRT-LLM; per-head scales need vLLM's
FlashAttention backend. Validated against compressed-tensors' own pydantic models in the tests.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from kvtune.export.checkpoint import read_json, read_scales, write_checkpoint
from kvtune.export.profile import write_profile
from kvtune.export.scales import from_checkpoint, to_checkpoint
from kvtune.export.target import Choice, EngineConfig, Target
from kvtune.plan_types import ModelIdentity
from kvtune.quant.families.fp8 import fp8

STRATEGIES = ("tensor", "attn_head")


def kv_cache_scheme(strategy: str) -> dict[str, Any]:
    return {"num_bits": 8, "type": "float", "symmetric": True, "dynamic": False, "strategy": strategy}


def quantization_config(strategy: str) -> dict[str, Any]:
    """The ``quantization_config`` block of a checkpoint whose weights stay dense and whose KV cache is fp8."""
    return {"quant_method": "compressed-tensors", "format": "dense", "quantization_status": "compressed",
            "config_groups": {}, "ignore": [], "kv_cache_scheme": kv_cache_scheme(strategy)}


def write_fp8_checkpoint(job: Any, strategy: str) -> list[Path]:
    """The source weights linked, ``config.json`` with an fp8 ``kv_cache_scheme`` and the calibrated scales."""
    scales = to_checkpoint(job.plan.tensors, "compressed-tensors", per_head=strategy == "attn_head")
    return write_checkpoint(job.model_dir, job.out, quantization_config(strategy), scales, copy=job.copy)


def read_fp8_checkpoint(out: Path, identity: ModelIdentity) -> tuple[str, dict]:
    """``(strategy, plan tensors)`` of a checkpoint written by :func:`write_fp8_checkpoint`."""
    scheme = read_json(out / "config.json", "config.json").get("quantization_config", {}).get("kv_cache_scheme")
    if not scheme:
        raise ValueError(f"{out}/config.json has no quantization_config.kv_cache_scheme")
    return scheme["strategy"], from_checkpoint(read_scales(out), "compressed-tensors", identity)


class CompressedTensors(Target):
    name = "compressed-tensors"
    layout = "uniform"
    choices = (Choice("tensor", fp8("e4m3", "tensor"), fp8("e4m3", "tensor"), "one scale per layer and tensor"),
               Choice("attn_head", fp8("e4m3", "head"), fp8("e4m3", "head"), "one scale per KV head"))
    description = "checkpoint with an fp8 kv_cache_scheme (vLLM, SGLang, TensorRT-LLM load it)"

    def write(self, job: Any) -> list[Path]:
        strategy = job.config.key[0]
        files = write_fp8_checkpoint(job, strategy)
        files.append(write_profile(job.out, "vllm", ["vllm", "serve", str(job.out)], ["--kv-cache-dtype", "fp8"],
                                   target=self.name, notes=self.notes(job.config)))
        return files

    def notes(self, config: EngineConfig) -> tuple[str, ...]:
        if config.key[0] == "attn_head":
            return ("per-head scales: vLLM reads them with the FlashAttention backend only; SGLang reads per-tensor",)
        return ()

    def read(self, out: Path, identity: ModelIdentity) -> tuple[EngineConfig, dict]:
        strategy, tensors = read_fp8_checkpoint(out, identity)
        names = (strategy,) * identity.num_layers
        return EngineConfig(self.name, names, names), tensors


TARGET = CompressedTensors()
