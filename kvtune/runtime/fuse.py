"""Opt-in fusion of the model's elementwise work around the matmuls (norms, dense MLPs) with ``torch.compile``.

A graph-captured kvtune decode step (:mod:`kvtune.runtime.graphs`) still runs the model's RMSNorms (about seven small
kernels each in transformers' fp32 form) and the MLP's activation and product as separate kernels; compiling those
modules fuses them (about 1 ms a step at Llama-3-8B, batch 8, on an H200:
``benchmarks/results/e2e_graphs_llama3-8b_compiled_h200.json``). The cache and the attention stay eager Python, so
any cache works and CUDA graphs capture the compiled kernels like any others.

    from kvtune.runtime.fuse import compile_pointwise
    compile_pointwise(model)        # before the first step; compiles lazily on the first call of each module class
"""

from __future__ import annotations

from typing import Any

import torch

SUFFIXES = ("RMSNorm", "MLP")  # module classes whose forward is pure tensor maths (norms, dense MLPs)


def compile_pointwise(model: Any, suffixes: tuple[str, ...] = SUFFIXES) -> int:
    """Replace the forward of every module of ``model`` whose class name ends with one of ``suffixes`` by its
    ``torch.compile``d version (one compiled function a class, shared by every layer). Changes ``model`` in place
    (its modules' ``forward`` attribute); returns how many modules were compiled."""
    compiled: dict[type, Any] = {}
    n = 0
    for mod in model.modules():
        cls = type(mod)
        if cls.__name__.endswith(suffixes):
            if cls not in compiled:
                compiled[cls] = torch.compile(cls.forward, dynamic=False)
            mod.forward = compiled[cls].__get__(mod, cls)
            n += 1
    return n
