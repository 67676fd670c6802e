"""Synthetic calibration tables for the search tests: small, deterministic, with a known dominated candidate."""

from __future__ import annotations

import torch

from kvtune.plan_types import ModelIdentity
from kvtune.quant.formats import QuantSpec, affine
from kvtune.search.tables import CalibrationTables
from kvtune.search.token_policies import SALIENT_RATIOS

CH, TOK = "channel", "token"
KEYS = (affine(1, CH, 32), affine(2, CH, 32), affine(3, CH, 32), affine(4, CH, 32), affine(8, CH, 32),
        affine(2, CH, 32, hadamard=True),  # same bits as 2b/g32 but made worse below: always dominated
        affine(2, CH, 64), affine(2, CH, 32, outliers=2))
VALUES = (affine(1, TOK, 32), affine(2, TOK, 32), affine(3, TOK, 32), affine(4, TOK, 32),
          affine(8, TOK, 32), affine(2, TOK, 32, hadamard=True), affine(2, TOK, 64))
DOMINATED_KEY = 5


def _errors(specs: tuple[QuantSpec, ...], layers: int, heads: int, gen: torch.Generator, scale: float) -> torch.Tensor:
    """``[L, H, C]``: error ~ 4^-bits, per-layer/per-head sensitivity factors, a little noise."""
    base = torch.tensor([4.0 ** -s.bits * (1.3 if s.params.group == 64 else 1.0) * (0.7 if s.outliers else 1.0)
                         * (0.8 if s.rotated else 1.0) for s in specs])
    layer = torch.logspace(0, 1.2, layers)[torch.randperm(layers, generator=gen)]
    head = 0.5 + torch.rand(layers, heads, generator=gen)
    noise = 1 + 0.1 * torch.rand(layers, heads, len(specs), generator=gen)
    return (scale * base * layer[:, None, None] * head[..., None] * noise).float()


def make_tables(layers: int = 6, heads: int = 2, head_dim: int = 32, seed: int = 0,
                fingerprint: str = "synthetic0", calibration_hash: str = "synth-hash") -> CalibrationTables:
    gen = torch.Generator().manual_seed(seed)
    ident = ModelIdentity("LlamaForCausalLM", layers, 2 * heads, heads, head_dim, fingerprint)
    sk, sv = _errors(KEYS, layers, heads, gen, 2.0), _errors(VALUES, layers, heads, gen, 3.0)
    sk[:, :, DOMINATED_KEY] = sk[:, :, 1] * 1.5  # Hadamard 2-bit keys: same bits, more error
    kl_k = (0.05 * sk[:, :, [1]].mean(1)) * (1 + torch.rand(layers, 1, generator=gen))
    kl_v = (0.03 * sv[:, :, [1]].mean(1)) * (1 + torch.rand(layers, 1, generator=gen))
    rank = torch.stack([torch.randperm(head_dim, generator=gen) for _ in range(layers * heads)]).view(layers, heads, -1)
    sink = 0.6 * torch.rand(layers, generator=gen)  # attention share of the first token
    salient = torch.tensor(SALIENT_RATIOS).sqrt().expand(layers, -1) * 0.4 * torch.rand(layers, 1, generator=gen)
    return CalibrationTables(identity=ident, key_candidates=KEYS, value_candidates=VALUES, sens_key=sk, sens_value=sv,
                             kl_key=kl_k, kl_value=kl_v, kl_key_candidates=(1,), kl_value_candidates=(1,),
                             key_outlier_rank=rank, value_outlier_rank=rank.flip(-1), sink_mass=sink,
                             salient_mass=salient.contiguous(), calibration_hash=calibration_hash,
                             data_hash="d" * 64, data_source="pydoc:calib")


def worker_command(storage: str, trials: int, study: str = "kvtune-search", budget: str = "3bit") -> list[str]:
    """A ``python -c`` command that runs one search worker on the synthetic tables (repository root as cwd)."""
    import sys

    code = ("from tests.search.synthetic import make_tables\n"
            "from kvtune.search import search\n"
            f"search(make_tables(), {budget!r}, out=None, storage={storage!r}, study={study!r}, trials={trials},"
            " validate=0, groups=3)\n")
    return [sys.executable, "-c", code]
