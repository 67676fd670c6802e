"""``normq``: one scale per token vector and Gaussian-optimal scalar codes (TurboQuant's MSE variant, no QJL).

Applied after a rotation (the spec's ``rotation`` wrapper: Hadamard, or a random orthogonal matrix for head
dims that are not a power of two), the coordinates of a token vector ``x`` (``D`` channels) are close to
``N(0, |x|^2 / D)``. Each is coded against a fixed codebook of ``L`` levels for ``N(0, 1)`` -- ``lloyd``: the
Lloyd-Max centroids; ``uniform``: evenly spaced levels with the MSE-optimal step -- after dividing by the
vector's RMS. One scale per token is stored: the least-squares ``s = <x, u> / <u, u>`` of the chosen levels
``u`` (never worse than the norm itself, same cost), so ``x^ = s * u``.

Stored per head: ``codes`` uint8 ``[T, packed_width(D, bits)]`` and ``scale`` ``[T, 1]`` at ``scale_dtype``
(16 bits a token: 0.25 bit an element at D = 64), or with ``scale_dtype: log8`` one byte a token: ``log2(s)``
on 256 steps between a per-head range ``scale_range`` ``[2]`` (fp16, calibrated state fitted on a sample with an
octave of margin each side; values outside clamp). 1 and 1.58 bits: the Lloyd-Max and uniform codebooks are the
same (``±0.798``; ``0, ±1.224``). The decode kernel reads uniform codebooks with fp16 or log8 scales (the range
passed as the operands' ``scale_range``): ``x^ = s * step * (c - (L-1)/2)``, and the 2-bit Lloyd-Max codebook: a
symmetric 4-level codebook ``l0 < l1 < l2 = -l1 < l3 = -l0`` is affine in the code's two bits (``l3 - l2 - l1 + l0 =
0``), ``l_c = l0 + w * (c + bend * (c >= 2))`` with ``w = l1 - l0``, ``bend = (l2 - l0) / w - 2`` (-0.1438 for
Lloyd-Max), passed as the operands' ``code_scale``, ``code_offset``, ``code_bend``. 3- and 4-bit Lloyd-Max levels are
not affine in the bits: PyTorch path.

``scale_fit: norm`` stores the vector's L2 norm instead and decodes ``x^ = |x| * u / |u|`` (the chosen levels
renormalised to unit length, then scaled by the norm): vLLM's TurboQuant keys with norm correction (the ``_nc``
cache dtypes, ``vllm/model_executor/layers/quantization/turboquant/config.py``); PyTorch path only.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass, replace
from functools import lru_cache
from typing import Any

import torch

from kvtune.errors import KVTuneError
from kvtune.quant import grid
from kvtune.quant.codes import code_format, pack, packed_width, unpack
from kvtune.quant.family import FieldDecl, Fields, QuantFamily
from kvtune.quant.formats import QuantSpec

CODEBOOKS = ("lloyd", "uniform")
SCALE_FITS = ("lsq", "norm")  # least-squares scale, or the vector norm with norm-corrected levels (TurboQuant)
BITS = (1, 1.58, 2, 3, 4)
KERNEL_BITS = (1, 1.58, 2, 3, 4)
LOG8 = "log8"  # one byte a token: log2 of the scale over a calibrated per-head range
RANGE = "scale_range"
MARGIN = 1.0  # octaves added on each side of the fitted log2 range


def _phi(x: torch.Tensor) -> torch.Tensor:
    return torch.exp(-x * x / 2) / math.sqrt(2 * math.pi)


def _cdf(x: torch.Tensor) -> torch.Tensor:
    return 0.5 * (1 + torch.erf(x / math.sqrt(2)))


def _cells(levels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Decision intervals ``(lo, hi)`` of sorted ``levels`` (midpoints; the outer ones open)."""
    mid = (levels[1:] + levels[:-1]) / 2
    inf = torch.tensor([math.inf], dtype=levels.dtype)
    return torch.cat([-inf, mid]), torch.cat([mid, inf])


def _mse(levels: torch.Tensor) -> float:
    """E[(x - Q(x))^2] for x ~ N(0, 1) quantized to the nearest of ``levels``."""
    lo, hi = _cells(levels)
    mass = _cdf(hi) - _cdf(lo)
    first = _phi(lo) - _phi(hi)  # int x phi
    second = mass - (torch.nan_to_num(hi * _phi(hi)) - torch.nan_to_num(lo * _phi(lo)))  # int x^2 phi
    return float((second - 2 * levels * first + levels * levels * mass).sum())


@lru_cache(maxsize=32)
def codebook(levels: int, kind: str) -> tuple[float, ...]:
    """The ``levels`` sorted code values for ``N(0, 1)`` (``lloyd``: Lloyd-Max; ``uniform``: optimal step)."""
    if kind == "uniform" or levels <= 3:
        lo_step, hi_step = 0.01, 4.0  # golden-section search of the step (the MSE is unimodal in it)
        offsets = torch.arange(levels, dtype=torch.float64) - (levels - 1) / 2
        g = (math.sqrt(5) - 1) / 2
        for _ in range(100):
            a, b = hi_step - g * (hi_step - lo_step), lo_step + g * (hi_step - lo_step)
            if _mse(a * offsets) < _mse(b * offsets):
                hi_step = b
            else:
                lo_step = a
        return tuple((offsets * (lo_step + hi_step) / 2).tolist())
    c = torch.linspace(-2.0, 2.0, levels, dtype=torch.float64)
    for _ in range(500):  # Lloyd iterations: centroids = conditional means of their cells
        lo, hi = _cells(c)
        c = (_phi(lo) - _phi(hi)) / (_cdf(hi) - _cdf(lo))
    return tuple(c.tolist())


@dataclass(frozen=True)
class NormQParams:
    """See the module docstring."""

    bits: float = 2
    codebook: str = "lloyd"
    scale_dtype: str = "float16"
    scale_fit: str = "lsq"

    def __post_init__(self) -> None:
        fmt = code_format(self.bits)
        if fmt.bits not in BITS:
            raise ValueError(f"normq bits must be one of {BITS}, got {self.bits}")
        object.__setattr__(self, "bits", fmt.bits)
        if self.codebook not in CODEBOOKS:
            raise ValueError(f"codebook must be one of {CODEBOOKS}, got {self.codebook!r}")
        if self.scale_dtype not in (*grid.SCALE_DTYPES, LOG8):
            raise ValueError(f"scale_dtype must be one of {(*grid.SCALE_DTYPES, LOG8)}, got {self.scale_dtype!r}")
        if self.scale_fit not in SCALE_FITS:
            raise ValueError(f"scale_fit must be one of {SCALE_FITS}, got {self.scale_fit!r}")

    @property
    def levels(self) -> int:
        return code_format(self.bits).levels

    @property
    def uniform(self) -> bool:
        """The codebook is evenly spaced (the decode kernel reads these, and the symmetric 2-bit Lloyd-Max one)."""
        return self.codebook == "uniform" or self.levels <= 3


class NormQ(QuantFamily):
    name = "normq"
    Params = NormQParams

    def bits(self, p: NormQParams) -> float:
        return p.bits

    def label(self, p: NormQParams, short: bool = False) -> str:
        kind = "" if p.uniform and p.levels <= 3 else ("L" if p.codebook == "lloyd" else "U")
        log8, nc = p.scale_dtype == LOG8, p.scale_fit == "norm"
        if short:
            return f"{p.bits:g}n{kind}" + ("8" if log8 else "") + ("c" if nc else "")
        text = f"{p.bits:g}b/norm/{'uniform' if p.uniform else 'lloyd'}"
        return text + ("/s8" if log8 else "") + ("/nc" if nc else "")

    def fields(self, p: NormQParams, d: int, flush: int) -> tuple[FieldDecl, ...]:
        codes = FieldDecl("codes", "token", packed_width(d, p.bits), "uint8", "codes")
        if p.scale_dtype == LOG8:
            return (FieldDecl(RANGE, "layer", 2, "float16", "scales"), codes,
                    FieldDecl("scale", "token", 1, "uint8", "scales"))
        return (codes, FieldDecl("scale", "token", 1, p.scale_dtype, "scales"))

    def fit(self, p: NormQParams, sample: torch.Tensor) -> Fields:
        """``log8`` scales: the per-head log2 range of the sample's scales ``[h, 2]`` (an octave of margin)."""
        if p.scale_dtype != LOG8:
            return {}
        log = _codes_and_scale(p, sample.float())[1].clamp_min(1e-30).log2().squeeze(-1)  # [h, N]
        return {RANGE: torch.stack([log.amin(-1) - MARGIN, log.amax(-1) + MARGIN], -1).half()}

    def encode(self, p: NormQParams, x: torch.Tensor, flush: int, state: Mapping[str, torch.Tensor]) -> Fields:
        if not grid.capturing(x) and not torch.isfinite(x).all():  # the check syncs: skipped inside a CUDA graph
            raise KVTuneError("non-finite values (NaN/inf) in a tensor to quantize", "check the model's activations")
        codes, scale = _codes_and_scale(p, x)
        if p.scale_dtype == LOG8:
            lo, span = _range(state, x)
            pos = ((scale.clamp_min(1e-30).log2() - lo) / span * 255).round().clamp_(0, 255)
            return {"codes": pack(codes, p.bits), "scale": pos.to(torch.uint8)}
        return {"codes": pack(codes, p.bits), "scale": scale.to(grid.SCALE_DTYPES[p.scale_dtype])}

    def decode(self, p: NormQParams, fields: Mapping[str, torch.Tensor], flush: int, d: int,
               state: Mapping[str, torch.Tensor]) -> torch.Tensor:
        levels = torch.tensor(codebook(p.levels, p.codebook), dtype=torch.float32, device=fields["codes"].device)
        scale = fields["scale"].float()
        if p.scale_dtype == LOG8:
            lo, span = _range(state, scale)
            scale = torch.exp2(lo + scale * span / 255)
        u = levels[unpack(fields["codes"], p.bits, d).long()]
        if p.scale_fit == "norm":  # the stored norm over the levels' own norm
            scale = scale / u.norm(dim=-1, keepdim=True).clamp_min(1e-30)
        return u * scale

    def candidates(self, role: str, head_dim: int | None = None) -> tuple[Any, ...]:
        """Rotated uniform codes -- keys at 2/3/4 bits, values at 1/1.58/2/3 bits --, Lloyd-Max at 2 bits, and the
        cheapest ones with one-byte (log8) scales, each also centered (:mod:`kvtune.quant.centering`); the rotation
        is Hadamard, or a random orthogonal one where the head dim is not a power of two."""
        rot = "hadamard" if head_dim is None or head_dim & (head_dim - 1) == 0 else "orthogonal"
        bits = (2, 3, 4) if role == "key" else (1, 1.58, 2, 3)
        small = (2,) if role == "key" else (1, 1.58)  # one-byte scales where metadata weighs most
        plain = ([normq(b, "uniform", rot) for b in bits] + [normq(2, "lloyd", rot)]
                 + [normq(b, "uniform", rot, scale_dtype=LOG8) for b in small])
        return tuple(plain + [replace(s, center=True) for s in plain])

    # -- kernel hooks: evenly spaced codes, fp16 or log8 scales; x^ = scale * (step * c - step * (L - 1) / 2); 2-bit
    # symmetric codebooks (Lloyd-Max) with the upper codes bent: x^ = scale * (w * (c + bend * (c >= 2)) + l0)
    def kernel_ok(self, p: NormQParams, role: str) -> bool:
        read = p.scale_dtype in ("float16", LOG8) and p.scale_fit == "lsq"  # norm-corrected: PyTorch path
        return (p.uniform or _code_map(p) is not None) and p.bits in KERNEL_BITS and read

    def kernel_operands(self, p: NormQParams, role: str, fields: Mapping[str, torch.Tensor],
                        state: Mapping[str, torch.Tensor]) -> Any:
        from kvtune.kernels.packed import PackedKeys, PackedValues

        code_map = _code_map(p)
        if code_map is None:
            raise ValueError(f"the decode kernel does not read {p.bits:g}-bit {p.codebook} codebooks")
        step, first, bend = code_map
        affine = {"code_scale": step, "code_offset": first, "code_bend": bend,
                  "scale_range": _kernel_range(p, fields, state)}
        if role == "key":
            return PackedKeys(fields["codes"], fields["scale"], None, p.bits, 0, axis="token", **affine)
        return PackedValues(fields["codes"], fields["scale"], None, p.bits, 0, **affine)


def _code_map(p: NormQParams) -> tuple[float, float, float] | None:
    """``(code_scale, code_offset, code_bend)`` of the kernel's code map ``level(c) = code_scale * (c + code_bend *
    (c >= 2)) + code_offset``: evenly spaced levels (bend 0), or a symmetric 2-bit codebook (affine in the code's two
    bits); None where the levels are neither (3- and 4-bit Lloyd-Max)."""
    levels = codebook(p.levels, p.codebook)
    if p.uniform:
        return (levels[-1] - levels[0]) / (p.levels - 1), levels[0], 0.0
    if p.levels != 4:
        return None
    l0, l1, l2, l3 = levels
    w = l1 - l0
    if abs(l3 - l2 - l1 + l0) > 1e-9 * w:
        return None
    return w, l0, (l2 - l0) / w - 2.0


def _codes_and_scale(p: NormQParams, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Nearest codebook levels of ``x [..., T, D]`` after dividing by its RMS (uint8 ``[..., T, D]``) and the
    least-squares scale (``scale_fit: norm``: the L2 norm) of each token float32 ``[..., T, 1]``."""
    levels = _levels_on(p.levels, p.codebook, x.device)
    rms = x.norm(dim=-1, keepdim=True) / math.sqrt(x.shape[-1])
    codes = torch.bucketize(x / rms.clamp_min(1e-30), (levels[1:] + levels[:-1]) / 2)  # nearest level
    y = levels[codes]
    if p.scale_fit == "norm":
        return codes.to(torch.uint8), x.norm(dim=-1, keepdim=True)
    scale = (x * y).sum(-1, keepdim=True) / (y * y).sum(-1, keepdim=True).clamp_min(1e-30)
    return codes.to(torch.uint8), scale


@lru_cache(maxsize=64)
def _levels_on(levels: int, kind: str, device: torch.device) -> torch.Tensor:
    """The codebook as float32 on ``device``, copied once (a host-to-device copy inside a CUDA-graph capture is not
    allowed)."""
    with torch.inference_mode(False):
        return torch.tensor(codebook(levels, kind), dtype=torch.float32, device=device)


def _range(state: Mapping[str, torch.Tensor], like: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """``(lo, span)`` of the log2 scale range, ``[h, 1, 1]`` float32, broadcasting over ``like [..., h, T, *]``."""
    r = state.get(RANGE)
    if r is None:
        raise ValueError("a log8 normq spec needs its calibrated scale range (state['scale_range'])")
    r = r.to(device=like.device, dtype=torch.float32)
    lo = r[..., 0, None, None]
    return lo, (r[..., 1, None, None] - lo).clamp_min(grid.LOG_SPAN_FLOOR)


def _kernel_range(p: NormQParams, fields: Mapping[str, torch.Tensor],
                  state: Mapping[str, torch.Tensor]) -> torch.Tensor | None:
    """The kernel's ``scale_range`` ``[h, 2]`` of log8 scales (None for fp16 ones). Absent from ``state`` it is
    refused, unless no token is stored yet (nothing fitted it; the kernel reads no scale: zeros stand in)."""
    if p.scale_dtype != LOG8:
        return None
    codes = fields["codes"]
    r = state.get(RANGE)
    if r is None and codes.shape[2]:
        raise KVTuneError("a log8 normq spec on the decode kernel needs its calibrated scale range "
                          "(state['scale_range'])", "calibrate the plan, or let the cache fit it on the first block")
    return torch.zeros(codes.shape[1], 2, device=codes.device) if r is None else r.to(codes.device)


def normq(bits: float, codebook: str = "lloyd", rotation: str = "hadamard", scale_dtype: str = "float16",
          scale_fit: str = "lsq", **wrappers: Any) -> QuantSpec:
    """A ``normq`` spec (rotated by default): ``normq(2)``, ``normq(1.58, rotation="orthogonal")``,
    ``normq(1.58, scale_dtype="log8")``."""
    params = NormQParams(bits=bits, codebook=codebook, scale_dtype=scale_dtype, scale_fit=scale_fit)
    return QuantSpec("normq", params, rotation, **wrappers)


FAMILY = NormQ()
