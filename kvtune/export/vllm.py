"""vLLM: one ``--kv-cache-dtype`` for every layer, ``--kv-cache-dtype-skip-layers`` keeps some at the model dtype.

Choices emulated bit for bit where vLLM defines them: ``fp8`` (E4M3 with the checkpoint's per-layer scales,
``quantization/kv_cache.py``; kvtune writes a compressed-tensors checkpoint with calibrated scales), ``fp8_e5m2``
(a plain cast), ``int8_per_token_head`` (symmetric absmax / 127 per token and head, fp32 scale), and the TurboQuant
dtypes (``quantization/turboquant/config.py``: keys FP8 or Hadamard + Lloyd-Max codes of the unit vector with an
fp16 norm and norm correction, values per-token min/max grids with fp16 scale and zero; the first and last 2 layers
always stay at the model dtype). Not offered (their definitions are not emulated here): ``int4_per_token_head``,
``fp8_per_token_head``, ``nvfp4``.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from kvtune.export.compressed_tensors import read_fp8_checkpoint, write_fp8_checkpoint
from kvtune.export.profile import read_flags, write_profile
from kvtune.export.target import AUTO, Choice, EngineConfig, Target
from kvtune.plan_types import ModelIdentity
from kvtune.quant.families.fp8 import fp8
from kvtune.quant.families.normq import normq
from kvtune.quant.formats import affine

TQ_BOUNDARY = 2  # TurboQuantConfig.get_boundary_skip_layers(n=2), capped at num_layers // 2


def _tq(name: str, key_bits: int, value_bits: int) -> Choice:
    key = fp8("e4m3", "none") if key_bits == 8 else normq(key_bits, "lloyd", "hadamard", scale_fit="norm")
    return Choice(name, key, affine(value_bits, "token", 0), "TurboQuant (first/last 2 layers at the model dtype)")


CHOICES = (
    Choice("fp8", fp8("e4m3", "tensor"), fp8("e4m3", "tensor"), "E4M3 with calibrated per-layer scales"),
    Choice("fp8_e5m2", fp8("e5m2", "none"), fp8("e5m2", "none"), "E5M2, no scale"),
    Choice("int8_per_token_head", affine(8, "token", 0, symmetric=True, scale_dtype="float32"),
           affine(8, "token", 0, symmetric=True, scale_dtype="float32"), "int8, fp32 scale per token and head"),
    _tq("turboquant_k8v4", 8, 4), _tq("turboquant_4bit_nc", 4, 4), _tq("turboquant_k3v4_nc", 3, 4),
    _tq("turboquant_3bit_nc", 3, 3),
)


class VLLM(Target):
    name = "vllm"
    layout = "skip"
    choices = CHOICES
    description = "launch profile (--kv-cache-dtype, --kv-cache-dtype-skip-layers), fp8: checkpoint with scales"

    def forced_skips(self, choice: Choice, identity: ModelIdentity) -> set[int]:
        if not choice.name.startswith("turboquant"):
            return set()
        n = min(TQ_BOUNDARY, identity.num_layers // 2)
        return set(range(n)) | set(range(identity.num_layers - n, identity.num_layers))

    def write(self, job: Any) -> list[Path]:
        dtypes = job.config.quantized()
        dtype = dtypes[0] if dtypes else AUTO
        files, model = [], str(job.model_dir)
        if dtype == "fp8":
            files, model = write_fp8_checkpoint(job, "tensor"), str(job.out)
        flags = ["--kv-cache-dtype", dtype]
        skipped = job.config.skipped()
        if skipped and dtype != AUTO:
            flags += ["--kv-cache-dtype-skip-layers", *(str(i) for i in skipped)]
        files.append(write_profile(job.out, "vllm", ["vllm", "serve", model], flags, target=self.name))
        return files

    def read(self, out: Path, identity: ModelIdentity) -> tuple[EngineConfig, dict]:
        flags = read_flags(out)
        dtype = flags.get("--kv-cache-dtype", [AUTO])[0]
        skip = {int(i) for i in flags.get("--kv-cache-dtype-skip-layers", [])}
        if dtype != AUTO:
            skip |= self.forced_skips(self.choice(dtype), identity)
        names = tuple(AUTO if i in skip else dtype for i in range(identity.num_layers))
        tensors = read_fp8_checkpoint(out, identity)[1] if dtype == "fp8" else {}
        return EngineConfig(self.name, names, names), tensors


TARGET = VLLM()
