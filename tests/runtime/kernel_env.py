"""The fused kernels for the runtime tests: compiled on a CUDA GPU, elsewhere under the Triton interpreter
(``TRITON_INTERPRET=1`` set before the kernel modules are imported). Importing this module skips the importing
test module where neither can run (no triton; or the kernels were already imported compiled without a GPU)."""

from __future__ import annotations

import os

import pytest
import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")
triton = pytest.importorskip("triton", reason="triton is not installed")

from kvtune.kernels import decode_attention as da  # after TRITON_INTERPRET is set

DEV = "cuda" if torch.cuda.is_available() else "cpu"
if DEV == "cpu" and not isinstance(da._decode_split_kernel, triton.runtime.interpreter.InterpretedFunction):
    pytest.skip("kvtune.kernels was imported compiled before TRITON_INTERPRET=1 and there is no GPU",
                allow_module_level=True)
