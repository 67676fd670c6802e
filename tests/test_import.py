"""`import kvtune` is lean: no triton, no optuna, no CUDA initialisation."""

from __future__ import annotations

import subprocess
import sys


def test_import_is_lean() -> None:
    code = ("import sys, kvtune, kvtune.plan, kvtune.quant.codec, kvtune.cli\n"
            "bad = [m for m in ('triton', 'optuna', 'transformers', 'matplotlib') if m in sys.modules]\n"
            "import torch\n"
            "assert not torch.cuda.is_initialized()\n"
            "print(','.join(bad))\n")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == ""


def test_public_api_resolves() -> None:
    import kvtune

    assert callable(kvtune.load_plan)
    assert kvtune.affine(2, "channel", 32).bits == 2
    assert kvtune.QuantSpec.from_dict({"bits": 2}) == kvtune.affine(2)
