"""Opt-in fusion of the model's elementwise work around the matmuls (norms, dense MLPs, rotary embedding) with
``torch.compile``.

A graph-captured kvtune decode step (:mod:`kvtune.runtime.graphs`) still runs the model's RMSNorms (about seven small
kernels each in transformers' fp32 form), the MLP's activation and product and the rotary embedding of the query
and the key (about ten kernels a layer: products, ``rotate_half``'s slices, negation and concatenation, sums) as
separate kernels; compiling those fuses them (norms and MLPs: about 1 ms a step at Llama-3-8B, batch 8, on an
H200: ``benchmarks/results/e2e_graphs_llama3-8b_compiled_h200.json``). The cache and the attention stay eager
Python, so any cache works and CUDA graphs capture the compiled kernels like any others.

    from kvtune.runtime.fuse import compile_pointwise
    compile_pointwise(model)        # before the first step; compiles lazily on the first call of each module class
"""

from __future__ import annotations

import sys
from typing import Any

import torch

SUFFIXES = ("RMSNorm", "MLP")  # module classes whose forward is pure tensor maths (norms, dense MLPs)
FUNCTIONS = ("apply_rotary_pos_emb",)  # module-level functions of transformers' modeling files, called by name


def compile_pointwise(model: Any, suffixes: tuple[str, ...] = SUFFIXES, functions: tuple[str, ...] = FUNCTIONS) -> int:
    """Replace the forward of every module of ``model`` whose class name ends with one of ``suffixes`` by its
    ``torch.compile``d version (one compiled function a class, shared by every layer), and each of ``functions``
    found in the Python module that defines one of ``model``'s module classes (transformers' attention calls
    ``apply_rotary_pos_emb`` by its global name) by its compiled version. Changes ``model`` in place (its modules'
    ``forward`` attribute) and those modeling modules' globals (every model of that architecture in the process
    then runs the compiled function: same maths); returns how many modules and functions were compiled."""
    compiled: dict[type, Any] = {}
    n = 0
    patched: set[str] = set()
    for mod in model.modules():
        cls = type(mod)
        if cls.__name__.endswith(suffixes):
            if cls not in compiled:
                compiled[cls] = torch.compile(cls.forward, dynamic=False)
            mod.forward = compiled[cls].__get__(mod, cls)
            n += 1
        n += _compile_functions(sys.modules.get(cls.__module__), functions, patched)
    return n


def _compile_functions(module: Any, names: tuple[str, ...], done: set[str]) -> int:
    """Swap each of ``names`` in the Python ``module`` for its compiled version, once (``done``: module names)."""
    if module is None or module.__name__ in done:
        return 0
    done.add(module.__name__)
    n = 0
    for name in names:
        fn = getattr(module, name, None)
        if fn is not None and not getattr(fn, "_kvtune_compiled", False):
            fast = torch.compile(fn, dynamic=False)
            fast._kvtune_compiled = True
            setattr(module, name, fast)
            n += 1
    return n
