"""NVIDIA ModelOpt / TensorRT-LLM: ``hf_quant_config.json`` with ``kv_cache_quant_algo``.

One algorithm for every layer (``FP8``), or the per-layer map ``kv_cache_quant_algo: MIXED_PRECISION`` +
``kv_cache_quantized_layers`` (``{"model.layers.i.self_attn": {"quant_algo": "FP8"}}``, ``kv_cache_schema_version:
1``; layers it does not list stay at the model dtype; the engines' readers of this map are still pending). Scales
``self_attn.k_proj.k_scale`` / ``v_proj.v_scale`` = amax / 448 (vLLM's ``modelopt.py`` loads them). NVFP4 is not
offered yet (no kvtune family emulates it).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from kvtune.export.checkpoint import read_json, read_scales, write_checkpoint
from kvtune.export.profile import write_profile
from kvtune.export.scales import from_checkpoint, to_checkpoint
from kvtune.export.target import AUTO, Choice, EngineConfig, Target
from kvtune.plan_types import ModelIdentity
from kvtune.quant.families.fp8 import fp8

HF_QUANT = "hf_quant_config.json"
MIXED = "MIXED_PRECISION"


def _layer(i: int) -> str:
    return f"model.layers.{i}.self_attn"


class ModelOpt(Target):
    name = "modelopt"
    layout = "per_layer"
    choices = (Choice("FP8", fp8("e4m3", "tensor"), fp8("e4m3", "tensor"), "E4M3, scale amax/448 per layer"),)
    description = "checkpoint with hf_quant_config.json (FP8, or a MIXED_PRECISION per-layer map)"

    def quantization(self, config: EngineConfig) -> dict[str, Any]:
        algos = set(config.key)
        q: dict[str, Any] = {"quant_algo": None, "exclude_modules": ["lm_head"]}
        if algos == {"FP8"}:
            q["kv_cache_quant_algo"] = "FP8"
        elif algos != {AUTO}:
            q.update(kv_cache_quant_algo=MIXED, kv_cache_schema_version=1, kv_cache_quantized_layers={
                _layer(i): {"quant_algo": a} for i, a in enumerate(config.key) if a != AUTO})
        return q

    def write(self, job: Any) -> list[Path]:
        from kvtune import __version__

        q = self.quantization(job.config)
        hf_quant = {"producer": {"name": "modelopt", "version": f"kvtune-{__version__}"}, "quantization": q}
        files = write_checkpoint(job.model_dir, job.out, {"quant_method": "modelopt", **q},
                                 to_checkpoint(job.plan.tensors, "modelopt"), {HF_QUANT: hf_quant}, job.copy)
        files.append(write_profile(job.out, "tensorrt-llm", ["trtllm-serve", str(job.out)], [], self.notes(job.config),
                                   target=self.name))
        return files

    def notes(self, config: EngineConfig) -> tuple[str, ...]:
        if self.quantization(config).get("kv_cache_quant_algo") == MIXED:
            return ("MIXED_PRECISION kv_cache_quantized_layers: engine readers are still pending",)
        return ()

    def read(self, out: Path, identity: ModelIdentity) -> tuple[EngineConfig, dict]:
        q = read_json(out / HF_QUANT, HF_QUANT)["quantization"]
        algo = q.get("kv_cache_quant_algo")
        if algo == MIXED:
            layers = q.get("kv_cache_quantized_layers", {})
            names = tuple(layers.get(_layer(i), {}).get("quant_algo", AUTO) for i in range(identity.num_layers))
        else:
            names = (algo or AUTO,) * identity.num_layers
        return EngineConfig(self.name, names, names), from_checkpoint(read_scales(out), "modelopt", identity)


TARGET = ModelOpt()
