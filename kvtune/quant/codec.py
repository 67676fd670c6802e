"""A :class:`~kvtune.quant.formats.QuantSpec` as stored tensors: declared fields, encode, decode, fit.

The pipeline of every spec: centering (:mod:`kvtune.quant.centering`, field ``center``) -> rotation
(:mod:`kvtune.quant.rotation`) -> outlier split (:mod:`kvtune.quant.outliers`, its channels through their own
sub-quantizer, fields ``out.*``) -> the family's ``encode`` on the remaining channels. :func:`decode` runs it
backwards and is the specification; :func:`fake_quantize` is ``decode(encode(x))`` over a whole tensor. Tensors are
``[..., T, D]`` with ``T`` whole flushed blocks of ``flush`` tokens; ``state`` holds the spec's ``layer``-scope
fields (``outlier_idx`` int16 ``[..., o]``, ``center`` and any calibrated state of the family, ``[h, width]`` or with
the batch dims of ``x``).
"""

from __future__ import annotations

from collections.abc import Mapping

import torch

from kvtune.quant import centering
from kvtune.quant.centering import CENTER_FIELD
from kvtune.quant.family import FieldDecl, Fields
from kvtune.quant.formats import QuantSpec
from kvtune.quant.outliers import INDEX_FIELD, PREFIX, merge_channels, outlier_spec, rank_channels, split_channels
from kvtune.quant.rotation import rotation


def fields(spec: QuantSpec, d: int, flush: int) -> tuple[FieldDecl, ...]:
    """Every field ``spec`` stores for one head of ``d`` channels, wrappers included."""
    out: tuple[FieldDecl, ...] = (centering.center_field(d),) if spec.center else ()
    if spec.outliers:
        sub = fields(outlier_spec(spec), spec.outliers, flush)
        out = (FieldDecl(INDEX_FIELD, "layer", spec.outliers, "int16", "indices"),
               *(f.prefixed(PREFIX, "outliers") for f in sub))
    return out + spec.fam.fields(spec.params, d - spec.outliers, flush)


def stored_fields(spec: QuantSpec, d: int, flush: int) -> tuple[FieldDecl, ...]:
    """The fields that grow with the tokens (everything but ``layer`` scope): what a cache's stores hold."""
    return tuple(f for f in fields(spec, d, flush) if f.scope != "layer")


def layer_fields(spec: QuantSpec, d: int, flush: int = 1) -> dict[str, FieldDecl]:
    """The ``layer``-scope fields (calibrated or fitted state, one row per head) by name."""
    return {f.name: f for f in fields(spec, d, flush) if f.scope == "layer"}


def _index(state: Mapping[str, torch.Tensor], x: torch.Tensor) -> torch.Tensor:
    """Outlier indices broadcast to ``x``'s leading dims: ``[..., o]``."""
    idx = state.get(INDEX_FIELD)
    if idx is None:
        raise ValueError("a spec with outlier channels needs their indices (state['outlier_idx'])")
    idx = idx.to(device=x.device, dtype=torch.long)
    return idx.expand(*x.shape[:-2], idx.shape[-1])


def fit(spec: QuantSpec, x: torch.Tensor, known: Mapping[str, torch.Tensor] | None = None) -> Fields:
    """``layer``-scope state from a sample ``x [B, h, T, D]`` (or ``[h, T, D]``): outlier channels ranked in the
    rotated basis (int16 ``[h, o]``) and the family's own fitted fields ``[h, width]``. ``known`` state is kept
    as it is (e.g. calibrated outlier channels, which the family is then fitted around)."""
    known = dict(known or {})
    if spec.passthrough:
        return known
    x = _as_heads(x)
    state: Fields = {}
    if spec.center:
        state[CENTER_FIELD] = known.get(CENTER_FIELD, centering.fit_center(_heads_flat(x)))
        x = centering.remove(x, state)
    flat = _heads_flat(rotation(spec.rotation).forward(x))  # [h, B*T, D]
    if spec.outliers:
        state[INDEX_FIELD] = known.get(INDEX_FIELD, rank_channels(flat, spec.outliers).to(torch.int16))
        idx = state[INDEX_FIELD].to(flat.device, torch.long)
        flat = split_channels(flat, idx.reshape(-1, idx.shape[-1])[: flat.shape[0]].expand(flat.shape[0], -1))[0]
    state.update(spec.fam.fit(spec.params, flat))
    return {**state, **known}


def _as_heads(x: torch.Tensor) -> torch.Tensor:
    """A sample ``[h, T, D]`` or ``[..., h, T, D]`` as float32 ``[B, h, T, D]``."""
    return x.float().unsqueeze(0) if x.dim() == 3 else x.float().reshape(-1, *x.shape[-3:])


def _heads_flat(x: torch.Tensor) -> torch.Tensor:
    """``[B, h, T, D] -> [h, B*T, D]``."""
    return x.transpose(0, 1).reshape(x.shape[1], -1, x.shape[-1])


def encode(x: torch.Tensor, spec: QuantSpec, flush: int, state: Mapping[str, torch.Tensor] | None = None) -> Fields:
    """Encode whole blocks ``x [..., n*F, D]`` into the spec's stored fields ``[..., rows, width]``."""
    state = state or {}
    if spec.passthrough:
        return spec.fam.encode(spec.params, x, flush, state)
    y = rotation(spec.rotation).forward(centering.remove(x, state) if spec.center else x.float())
    out: Fields = {}
    if spec.outliers:
        y, o = split_channels(y, _index(state, y))
        out.update({PREFIX + k: v for k, v in encode(o, outlier_spec(spec), flush).items()})
    out.update(spec.fam.encode(spec.params, y, flush, state))
    return out


def decode(stored: Mapping[str, torch.Tensor], spec: QuantSpec, flush: int, d: int,
           state: Mapping[str, torch.Tensor] | None = None) -> torch.Tensor:
    """Stored fields of ``T`` tokens (whole blocks) back to float32 ``[..., T, d]``."""
    state = state or {}
    if spec.passthrough:
        return spec.fam.decode(spec.params, stored, flush, d, state)
    y = spec.fam.decode(spec.params, {k: v for k, v in stored.items() if not k.startswith(PREFIX)}, flush,
                        d - spec.outliers, state)
    if spec.outliers:
        sub = {k[len(PREFIX):]: v for k, v in stored.items() if k.startswith(PREFIX)}
        o = decode(sub, outlier_spec(spec), flush, spec.outliers)
        y = merge_channels(y, o, _index(state, y))
    y = rotation(spec.rotation).inverse(y)
    return centering.restore(y, state) if spec.center else y


def fake_quantize(x: torch.Tensor, spec: QuantSpec, outlier_idx: torch.Tensor | None = None,
                  state: Mapping[str, torch.Tensor] | None = None) -> torch.Tensor:
    """Quantize then dequantize ``x [..., T, D]`` as one flushed block of ``T`` tokens (``outlier_idx [..., o]``:
    the outlier channels, default the top ``spec.outliers`` of ``x`` itself in the rotated basis; ``state``: other
    ``layer`` fields, default fitted on ``x``). Returns x's dtype and shape."""
    if spec.passthrough:
        return x.to(torch.float16).to(x.dtype)
    state = dict(state or {})
    if spec.center and CENTER_FIELD not in state:  # the mean of x itself (outliers are then ranked centered)
        state[CENTER_FIELD] = centering.fit_center(_heads_flat(_as_heads(x if x.dim() >= 3 else x.unsqueeze(0))))
    if spec.outliers:
        y = rotation(spec.rotation).forward(centering.remove(x, state) if spec.center else x.float())
        state.setdefault(INDEX_FIELD, rank_channels(y, spec.outliers) if outlier_idx is None else outlier_idx)
    if layer_fields(spec, x.shape[-1]).keys() - state.keys():  # the family's calibrated state: fitted on x
        state = fit(spec, x if x.dim() >= 3 else x.unsqueeze(0), state)
    t = x.shape[-2]
    return decode(encode(x, spec, t, state), spec, t, x.shape[-1], state).to(x.dtype)


def kernel_ok(spec: QuantSpec, role: str) -> bool:
    """True when the fused decode kernel reads ``spec`` for ``role`` (rotations are applied to the query; a centered
    spec's fp16 tokens are shifted by its mean: :func:`kvtune.quant.centering.shift`)."""
    return not spec.passthrough and not spec.outliers and spec.fam.kernel_ok(spec.params, role)


def kernel_operands(spec: QuantSpec, role: str, stored: Mapping[str, torch.Tensor],
                    state: Mapping[str, torch.Tensor] | None = None) -> object:
    """The kernel's operand over the stored fields and the ``layer`` state (see
    :meth:`~kvtune.quant.family.QuantFamily.kernel_operands`)."""
    return spec.fam.kernel_operands(spec.params, role, stored, state or {})
