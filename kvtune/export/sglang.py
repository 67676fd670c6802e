"""SGLang: one ``--kv-cache-dtype`` for every layer; per-tensor fp8 scales from the checkpoint.

``fp8_e4m3`` reads ``k_scale`` / ``v_scale`` per layer from a compressed-tensors checkpoint (SGLang's
``srt/layers/quantization/kv_cache.py``, adapted from vLLM's), ``fp8_e5m2`` is a plain cast. ``fp4_e2m1`` is not
offered (not emulated here).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from kvtune.export.compressed_tensors import read_fp8_checkpoint, write_fp8_checkpoint
from kvtune.export.profile import read_flags, write_profile
from kvtune.export.target import Choice, EngineConfig, Target
from kvtune.plan_types import ModelIdentity
from kvtune.quant.families.fp8 import fp8


class SGLang(Target):
    name = "sglang"
    layout = "uniform"
    choices = (Choice("fp8_e4m3", fp8("e4m3", "tensor"), fp8("e4m3", "tensor"), "E4M3, per-layer scales"),
               Choice("fp8_e5m2", fp8("e5m2", "none"), fp8("e5m2", "none"), "E5M2, no scale"))
    description = "launch profile (--kv-cache-dtype) + checkpoint with per-tensor scales"

    def write(self, job: Any) -> list[Path]:
        dtype = job.config.key[0]
        files, model = [], str(job.model_dir)
        if dtype == "fp8_e4m3":
            files, model = write_fp8_checkpoint(job, "tensor"), str(job.out)
        program = ["python", "-m", "sglang.launch_server", "--model-path", model]
        files.append(write_profile(job.out, "sglang", program, ["--kv-cache-dtype", dtype], target=self.name))
        return files

    def read(self, out: Path, identity: ModelIdentity) -> tuple[EngineConfig, dict]:
        dtype = read_flags(out)["--kv-cache-dtype"][0]
        tensors = read_fp8_checkpoint(out, identity)[1] if dtype == "fp8_e4m3" else {}
        names = (dtype,) * identity.num_layers
        return EngineConfig(self.name, names, names), tensors


TARGET = SGLang()
