"""One group of KV heads of a layer that share a :class:`~kvtune.plan_types.HeadPlan`.

A group owns the quantized part of its heads' K and V (:class:`~kvtune.runtime.store.FieldStore` s of
the codec's fields) and, when the layer keeps salient tokens, their higher-precision copies. Heads of
a layer with different specs live in different groups; attention runs per group (heads never mix).
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

from kvtune.plan_types import HeadPlan
from kvtune.quant.formats import QuantSpec
from kvtune.runtime import codec
from kvtune.runtime.store import FieldStore, TokenBuffer


@dataclass
class Salient:
    """Higher-precision copies of selected quantized tokens, per (batch row, head).

    idx: int32 ``[B, h, S]`` token indices into the quantized part; k/v: codec fields of ``S`` tokens
    (per-token rows at the salient bits).
    """

    spec: QuantSpec
    idx: torch.Tensor | None = None
    k: dict[str, torch.Tensor] = field(default_factory=dict)
    v: dict[str, torch.Tensor] = field(default_factory=dict)

    def nbytes(self) -> int:
        tensors = [*self.k.values(), *self.v.values(), *([self.idx] if self.idx is not None else [])]
        return sum(t.numel() * t.element_size() for t in tensors)


@dataclass
class HeadGroup:
    """KV heads ``heads`` of one layer with one K/V spec pair."""

    heads: tuple[int, ...]
    plan: HeadPlan
    flush: int
    head_dim: int
    k_idx: torch.Tensor | None = None  # int16 [h, o_k] outlier channels of the keys
    v_idx: torch.Tensor | None = None
    headroom: float = 0.0
    keys: FieldStore = field(init=False)
    values: FieldStore = field(init=False)
    salient: Salient | None = None

    def __post_init__(self) -> None:
        self.keys, self.values = FieldStore(self.headroom), FieldStore(self.headroom)

    @property
    def quantized(self) -> bool:
        return not (self.plan.key.passthrough and self.plan.value.passthrough)

    def select(self, x: torch.Tensor) -> torch.Tensor:
        """This group's heads of ``x [B, Hkv, ...]``."""
        if len(self.heads) == x.shape[1]:
            return x
        return x[:, list(self.heads)]

    def append(self, k: torch.Tensor, v: torch.Tensor) -> None:
        """Quantize whole blocks ``k, v [B, h, n*F, D]`` (this group's heads) and store them."""
        if self.plan.key.outliers and self.k_idx is None:
            self.k_idx = _first_block_outliers(k[:, :, : self.flush], self.plan.key)
        if self.plan.value.outliers and self.v_idx is None:
            self.v_idx = _first_block_outliers(v[:, :, : self.flush], self.plan.value)
        self.keys.append(codec.encode(k, self.plan.key, self.flush, self.k_idx))
        self.values.append(codec.encode(v, self.plan.value, self.flush, self.v_idx))

    def roundtrip(self, k: torch.Tensor, v: torch.Tensor, select) -> tuple[torch.Tensor, torch.Tensor]:
        """What storing whole blocks ``k, v [B, Hkv, n, D]`` (all heads) would read back, for this group's
        heads, without storing them: float32 ``[B, h, n, D]``."""
        k, v = select(k).float(), select(v).float()
        f, kspec, vspec = self.flush, self.plan.key, self.plan.value
        k_idx = (self.k_idx if self.k_idx is not None or not kspec.outliers
                 else _first_block_outliers(k[:, :, :f], kspec))
        v_idx = (self.v_idx if self.v_idx is not None or not vspec.outliers
                 else _first_block_outliers(v[:, :, :f], vspec))
        outs_k, outs_v = [], []
        for s in range(0, k.shape[2], f):
            kb, vb = k[:, :, s:s + f], v[:, :, s:s + f]
            outs_k.append(codec.decode(codec.encode(kb, kspec, f, k_idx), kspec, f, self.head_dim, k_idx))
            outs_v.append(codec.decode(codec.encode(vb, vspec, f, v_idx), vspec, f, self.head_dim, v_idx))
        return torch.cat(outs_k, 2), torch.cat(outs_v, 2)

    def dequantized(self) -> tuple[torch.Tensor, torch.Tensor]:
        """All quantized tokens back in float32 ``[B, h, Nq, D]`` (salient tokens from their copies)."""
        k = codec.decode(self.keys.fields(), self.plan.key, self.flush, self.head_dim, self.k_idx)
        v = codec.decode(self.values.fields(), self.plan.value, self.flush, self.head_dim, self.v_idx)
        s = self.salient
        if s is not None and s.idx is not None and s.idx.shape[-1]:
            idx = s.idx.long().unsqueeze(-1).expand(*s.idx.shape, self.head_dim)
            k = k.scatter(2, idx, codec.decode(s.k, s.spec, 1, self.head_dim))
            v = v.scatter(2, idx, codec.decode(s.v, s.spec, 1, self.head_dim))
        return k, v

    def nbytes(self, used: bool = False) -> int:
        idx = sum(t.numel() * t.element_size() for t in (self.k_idx, self.v_idx) if t is not None)
        sal = self.salient.nbytes() if self.salient is not None else 0
        return self.keys.nbytes(used) + self.values.nbytes(used) + idx + sal

    def index_select(self, batch_idx: torch.Tensor) -> None:
        self.keys.index_select(batch_idx)
        self.values.index_select(batch_idx)
        s = self.salient
        if s is not None and s.idx is not None:
            s.idx = s.idx.index_select(0, batch_idx.to(s.idx.device))
            s.k = {n: t.index_select(0, batch_idx.to(t.device)) for n, t in s.k.items()}
            s.v = {n: t.index_select(0, batch_idx.to(t.device)) for n, t in s.v.items()}


def _first_block_outliers(x: torch.Tensor, spec: QuantSpec) -> torch.Tensor:
    """Outlier channels ``[h, o]`` (int16) from the first block ``x [B, h, F, D]`` when the plan has none
    (ranked in the rotated domain when the spec rotates, as the codec splits after the rotation)."""
    from kvtune.quant.outliers import rank_channels
    from kvtune.quant.transforms import hadamard

    y = hadamard(x.float()) if spec.hadamard else x.float()
    flat = y.transpose(0, 1).reshape(x.shape[1], -1, x.shape[-1])  # [h, B*F, D]
    return rank_channels(flat, spec.outliers).to(torch.int16)


def sink_buffers(headroom: float = 0.0) -> tuple[TokenBuffer, TokenBuffer]:
    """Two fp16 token buffers (keys, values) ``[B, Hkv, s, D]``."""
    return TokenBuffer(headroom), TokenBuffer(headroom)
