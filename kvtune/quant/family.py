"""Quantizer families as plug-ins: what a family declares, and the registry that finds it by name.

A family (one module under :mod:`kvtune.quant.families`) is a :class:`QuantFamily` with

* ``Params``: a frozen dataclass, validated in ``__post_init__``: its YAML schema;
* :meth:`~QuantFamily.fields`: the tensors it stores for ``n`` quantized tokens of one head, each a
  :class:`FieldDecl` with its scope (a row per token, per group of tokens, per flushed block, or once per
  layer and head = calibrated state). The bit accountant (:mod:`kvtune.quant.bits`), the runtime stores and
  the plan's tensor checks read these declarations; nothing else branches on a family's name;
* :meth:`~QuantFamily.encode` / :meth:`~QuantFamily.decode`: whole flushed blocks ``[B, h, n*F, D]`` to
  fields and back (decode is the specification);
* :meth:`~QuantFamily.fit`: per-layer state (the ``layer``-scope fields) from a calibration sample;
* :meth:`~QuantFamily.candidates`: what calibration measures of this family;
* kernel hooks: :meth:`~QuantFamily.kernel_ok` (the fused decode kernel reads this format) and
  :meth:`~QuantFamily.kernel_operands` (what it passes the kernel).

Rotation and outlier channels wrap any family (:mod:`kvtune.quant.codec`). Registering a family is one
line in :data:`BUILTIN` (or :func:`register` for a family defined elsewhere).
"""

from __future__ import annotations

import importlib
import math
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any, ClassVar

import torch

from kvtune.errors import KVTuneError

Fields = dict[str, torch.Tensor]
SCOPES = ("token", "group", "block", "layer")
KINDS = ("codes", "scales", "zeros", "outliers", "indices")
DTYPES: dict[str, torch.dtype] = {"uint8": torch.uint8, "int16": torch.int16, "float16": torch.float16,
                                  "bfloat16": torch.bfloat16, "float32": torch.float32}
DTYPE_BITS = {"uint8": 8, "int16": 16, "float16": 16, "bfloat16": 16, "float32": 32}


@dataclass(frozen=True)
class FieldDecl:
    """One stored field: for ``n`` quantized tokens of one head, :meth:`rows` rows of ``width`` elements.

    ``scope``: ``token`` (a row per token), ``group`` (a row per ``every`` tokens; ``every = 0``: per flushed
    block), ``block`` (a row per flushed block), ``layer`` (one row per head, held once: calibrated or fitted
    state). ``kind``: the :class:`~kvtune.quant.bits.BitBreakdown` category it is counted in.
    Stored tensors are ``[B, h, rows, width]`` (``layer`` fields ``[h, width]``).
    """

    name: str
    scope: str
    width: int
    dtype: str
    kind: str
    every: int = 1

    def __post_init__(self) -> None:
        if self.scope not in SCOPES:
            raise ValueError(f"field scope must be one of {SCOPES}, got {self.scope!r}")
        if self.kind not in KINDS:
            raise ValueError(f"field kind must be one of {KINDS}, got {self.kind!r}")
        if self.dtype not in DTYPES:
            raise ValueError(f"field dtype must be one of {tuple(DTYPES)}, got {self.dtype!r}")

    def rows(self, n: int, flush: int) -> int:
        """Rows stored for ``n`` quantized tokens (whole blocks of ``flush``)."""
        if self.scope == "token":
            return n
        if self.scope == "layer":
            return 1 if n else 0
        every = self.every if self.scope == "group" and self.every else flush
        return math.ceil(n / every)

    def bits(self, n: int, flush: int) -> int:
        return self.rows(n, flush) * self.width * DTYPE_BITS[self.dtype]

    @property
    def torch_dtype(self) -> torch.dtype:
        return DTYPES[self.dtype]

    def prefixed(self, prefix: str, kind: str | None = None) -> FieldDecl:
        """This field under ``prefix + name`` (a wrapper's sub-quantizer), optionally re-counted as ``kind``."""
        return FieldDecl(prefix + self.name, self.scope, self.width, self.dtype, kind or self.kind, self.every)


class QuantFamily:
    """Base class of a quantizer family (see the module docstring). Subclasses set ``name`` and ``Params``."""

    name: ClassVar[str] = ""
    Params: ClassVar[type] = object
    passthrough: ClassVar[bool] = False  # stores the tensor as it is (fp16)

    # -- description ---------------------------------------------------------------------------------
    def bits(self, p: Any) -> float:
        """Nominal code width (bits per element before metadata), for labels and search heuristics."""
        raise NotImplementedError(f"family {self.name!r} does not define bits()")

    def token_group(self, p: Any) -> int:
        """Tokens a flushed block must be a multiple of (1: any; 0: the whole block is one group)."""
        return 1

    def label(self, p: Any, short: bool = False) -> str:
        raise NotImplementedError(f"family {self.name!r} does not define label()")

    def fields(self, p: Any, d: int, flush: int) -> tuple[FieldDecl, ...]:
        """Stored fields for one head of ``d`` channels in a layer flushing blocks of ``flush`` tokens."""
        raise NotImplementedError(f"family {self.name!r} does not define fields()")

    # -- maths -----------------------------------------------------------------------------------------
    def encode(self, p: Any, x: torch.Tensor, flush: int, state: Mapping[str, torch.Tensor]) -> Fields:
        """Whole blocks ``x`` float32 ``[B, h, n*F, D]`` -> the non-``layer`` fields (``[B, h, rows, width]``)."""
        raise NotImplementedError(f"family {self.name!r} does not define encode()")

    def decode(self, p: Any, fields: Mapping[str, torch.Tensor], flush: int, d: int,
               state: Mapping[str, torch.Tensor]) -> torch.Tensor:
        """Inverse of :meth:`encode`: float32 ``[B, h, T, d]`` (the specification of the format)."""
        raise NotImplementedError(f"family {self.name!r} does not define decode()")

    def fit(self, p: Any, sample: torch.Tensor) -> Fields:
        """Per-layer state (``layer``-scope fields, ``[h, width]``) from a sample ``[h, N, D]`` float32."""
        return {}

    def candidates(self, role: str, head_dim: int | None = None) -> tuple[Any, ...]:
        """Quantizers (:class:`~kvtune.quant.formats.QuantSpec`) calibration measures for ``role`` (key/value) of
        heads of ``head_dim`` channels (None: any)."""
        return ()

    # -- kernel hooks ------------------------------------------------------------------------------------
    def kernel_ok(self, p: Any, role: str) -> bool:
        """True when the fused decode kernel reads this format for ``role`` (``key``/``value``)."""
        return False

    def kernel_operands(self, p: Any, role: str, fields: Mapping[str, torch.Tensor],
                        state: Mapping[str, torch.Tensor]) -> Any:
        """The decode kernel's operand (:class:`~kvtune.kernels.packed.PackedKeys` / ``PackedValues``) over stored
        ``fields`` ``[B, h, rows, width]`` and ``layer`` state ``[h, width]``; only called when :meth:`kernel_ok`."""
        raise NotImplementedError(f"family {self.name!r} has no kernel operands")


BUILTIN: dict[str, str] = {
    "fp16": "kvtune.quant.families.fp16",
    "affine": "kvtune.quant.families.affine",
    "normq": "kvtune.quant.families.normq",
    "static": "kvtune.quant.families.static",
    "fp8": "kvtune.quant.families.fp8",
    "ggml": "kvtune.quant.families.ggml",
}
_REGISTRY: dict[str, QuantFamily] = {}


def register(family: QuantFamily) -> QuantFamily:
    """Add ``family`` to the registry (its ``name`` must be new)."""
    if not family.name:
        raise ValueError("a family needs a name")
    if family.name in _REGISTRY and _REGISTRY[family.name] is not family:
        raise ValueError(f"family {family.name!r} is already registered")
    _REGISTRY[family.name] = family
    return family


def get(name: str) -> QuantFamily:
    """The family registered as ``name`` (built-ins load on first use)."""
    fam = _REGISTRY.get(name)
    if fam is None and name in BUILTIN:
        module = importlib.import_module(BUILTIN[name])
        fam = _REGISTRY.get(name) or register(module.FAMILY)
    if fam is None:
        raise KVTuneError(f"unknown quantizer family {name!r}", f"use one of {', '.join(names())}")
    return fam


def names() -> tuple[str, ...]:
    """Every family name: built-ins first, in registration order, then others."""
    return tuple(dict.fromkeys([*BUILTIN, *_REGISTRY]))


def all_families() -> tuple[QuantFamily, ...]:
    return tuple(get(n) for n in names())
