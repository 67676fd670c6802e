"""llama.cpp: one ``-ctk`` type for K and one ``-ctv`` type for V in every layer, Hadamard-rotated when quantized.

Block formats from ``ggml/src/ggml-common.h`` (emulated byte for byte by the ``ggml`` family); a quantized V cache
needs flash attention (``-fa on``). llama.cpp runs GGUF files: the profile points at the embedded model's GGUF, or
at ``MODEL.gguf`` for a Hugging Face directory (convert it with llama.cpp's ``convert_hf_to_gguf.py``).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from kvtune.export.profile import read_flags, write_profile
from kvtune.export.target import Choice, EngineConfig, Target
from kvtune.plan_types import ModelIdentity
from kvtune.quant.families.ggml import ggml
from kvtune.quant.formats import FP16

TYPES = ("q4_0", "iq4_nl", "q4_1", "q5_0", "q5_1", "q8_0")  # cheapest first: the round-up's tie order


class LlamaCpp(Target):
    name = "llama.cpp"
    layout = "uniform"
    split = True
    choices = (*(Choice(t, ggml(t), ggml(t)) for t in TYPES), Choice("f16", FP16, FP16))
    description = "launch profile (-ctk / -ctv)"

    def write(self, job: Any) -> list[Path]:
        from kvtune.models import REGISTRY, find_gguf

        ktype, vtype = job.config.key[0], job.config.value[0]
        gguf = str(find_gguf(REGISTRY[job.model])) if job.model in REGISTRY else "MODEL.gguf"
        flags = ["-ctk", ktype, "-ctv", vtype] + (["-fa", "on"] if vtype != "f16" else [])
        notes = () if gguf != "MODEL.gguf" else ("convert the model to GGUF first (convert_hf_to_gguf.py)",)
        return [write_profile(job.out, "llama.cpp", ["llama-server", "-m", gguf], flags, notes, target=self.name)]

    def read(self, out: Path, identity: ModelIdentity) -> tuple[EngineConfig, dict]:
        flags = read_flags(out)
        n = identity.num_layers
        return EngineConfig(self.name, (flags["-ctk"][0],) * n, (flags["-ctv"][0],) * n), {}


TARGET = LlamaCpp()
