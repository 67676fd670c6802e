"""Export a plan to a serving engine: checkpoints with KV scales, launch profiles, and the engine's own plan.

One module per target, registered in :data:`TARGETS` (name -> module defining ``TARGET``); each says what its
engine expresses (:class:`~kvtune.export.target.Target`) and writes/reads the engine's files. :func:`export` is
the one verb; :func:`read_back` rebuilds the deployed configuration from the engine files.
"""

from __future__ import annotations

import importlib

from kvtune.errors import KVTuneError
from kvtune.export.run import ExportResult, export, read_back
from kvtune.export.target import Target

TARGETS: dict[str, str] = {
    "compressed-tensors": "kvtune.export.compressed_tensors",
    "modelopt": "kvtune.export.modelopt",
    "vllm": "kvtune.export.vllm",
    "sglang": "kvtune.export.sglang",
    "llama.cpp": "kvtune.export.llamacpp",
}


def get_target(name: str) -> Target:
    """The target registered as ``name``."""
    if name not in TARGETS:
        raise KVTuneError(f"unknown export target {name!r}", f"use one of {', '.join(TARGETS)}")
    return importlib.import_module(TARGETS[name]).TARGET


__all__ = ["TARGETS", "ExportResult", "export", "get_target", "read_back"]
