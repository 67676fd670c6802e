"""Growing tensors along the token axis: the quantized part of one K or V store.

:class:`TokenBuffer` holds one tensor ``[B, h, cap, *]`` of which the first ``n`` rows along dim 2 are
used. On CPU it grows exactly (``headroom = 0``: bytes held = bytes used); on GPU it over-allocates by
``headroom`` so that appends do not copy the whole history every block. :class:`FieldStore` is a dict
of buffers, one per field a quantizer declares (:func:`kvtune.quant.codec.stored_fields`): it refuses a block
whose fields differ from the declarations, so bytes held always equal the bit accountant's count.
"""

from __future__ import annotations

import math

import torch

from kvtune.quant.family import FieldDecl

Fields = dict[str, torch.Tensor]


class TokenBuffer:
    """A tensor that grows along dim 2; ``view()`` is the used part ``[B, h, n, *]``."""

    def __init__(self, headroom: float = 0.0) -> None:
        self.data: torch.Tensor | None = None
        self.n = 0
        self.headroom = headroom

    def append(self, x: torch.Tensor) -> None:
        """Append ``x [B, h, m, *]`` along dim 2."""
        if self.data is None:
            self.data = x.clone() if not self.headroom else self._alloc(x, x.shape[2])
            if self.headroom:
                self.data[:, :, : x.shape[2]] = x
            self.n = x.shape[2]
            return
        need = self.n + x.shape[2]
        if need > self.data.shape[2]:
            if not self.headroom:
                self.data = torch.cat([self.data[:, :, : self.n], x], dim=2)
                self.n = need
                return
            grown = self._alloc(self.data, need)
            grown[:, :, : self.n] = self.data[:, :, : self.n]
            self.data = grown
        self.data[:, :, self.n: need] = x
        self.n = need

    def _alloc(self, like: torch.Tensor, need: int) -> torch.Tensor:
        # capacity in whole multiples of 64 rows: the head/batch strides then keep their divisibility by 16
        # as the buffer grows, so the kernels' specializations (vectorized loads) never change mid-decode
        cap = -(-max(need, math.ceil(need * (1 + self.headroom))) // 64) * 64
        return torch.empty(*like.shape[:2], cap, *like.shape[3:], dtype=like.dtype, device=like.device)

    def drop_front(self, rows: int) -> None:
        """Drop the first ``rows`` used rows along dim 2 (tokens that left every window), keeping the headroom
        policy: an exact copy on CPU, the same capacity rule on GPU."""
        if self.data is None or rows <= 0:
            return
        keep = self.data[:, :, rows: self.n]
        if self.headroom:
            data = self._alloc(keep, keep.shape[2])
            data[:, :, : keep.shape[2]] = keep
        else:
            data = keep.clone()
        self.data, self.n = data, self.n - rows

    def view(self) -> torch.Tensor:
        assert self.data is not None
        return self.data[:, :, : self.n]

    def nbytes(self, used: bool = False) -> int:
        if self.data is None:
            return 0
        rows = self.n if used else self.data.shape[2]
        return rows * self.data[:, :, :1].numel() * self.data.element_size()

    def index_select(self, batch_idx: torch.Tensor) -> None:
        if self.data is not None:
            self.data = self.data.index_select(0, batch_idx.to(self.data.device))

    def repeat_interleave(self, repeats: int) -> None:
        if self.data is not None:
            self.data = self.data.repeat_interleave(repeats, dim=0)


class FieldStore:
    """One :class:`TokenBuffer` per declared field ``[B, h, rows, width]``, grown together one block at a time."""

    def __init__(self, decls: tuple[FieldDecl, ...], headroom: float = 0.0) -> None:
        self.decls = {f.name: f for f in decls}
        self.buffers: dict[str, TokenBuffer] = {}
        self.headroom = headroom

    def append(self, fields: Fields) -> None:
        """Append one run of blocks: exactly the declared fields, each ``[B, h, rows, width]`` of its dtype."""
        if fields.keys() != self.decls.keys():
            raise ValueError(f"stored fields {sorted(fields)} differ from the declared {sorted(self.decls)}")
        for name, x in fields.items():
            f = self.decls[name]
            if x.dtype != f.torch_dtype or x.shape[-1] != f.width:
                raise ValueError(f"field {name}: got {x.dtype} x {x.shape[-1]}, declared {f.dtype} x {f.width}")
            self.buffers.setdefault(name, TokenBuffer(self.headroom)).append(x)

    def drop_front(self, tokens: int, flush: int) -> None:
        """Drop the first ``tokens`` stored tokens (a multiple of ``flush`` unless every field is per token):
        each field its rows for them (:meth:`FieldDecl.rows`); ``layer``-scope fields are never stored here."""
        for name, buf in self.buffers.items():
            buf.drop_front(self.decls[name].rows(tokens, flush))

    def fields(self) -> Fields:
        return {name: buf.view() for name, buf in self.buffers.items()}

    def empty(self, batch: int, heads: int, device: torch.device) -> Fields:
        """Zero-row stand-ins ``[B, h, 0, width]`` of every declared field (before the first block)."""
        return {n: torch.zeros(batch, heads, 0, f.width, dtype=f.torch_dtype, device=device)
                for n, f in self.decls.items()}

    def __bool__(self) -> bool:
        return bool(self.buffers)

    def nbytes(self, used: bool = False) -> int:
        return sum(buf.nbytes(used) for buf in self.buffers.values())

    def index_select(self, batch_idx: torch.Tensor) -> None:
        for buf in self.buffers.values():
            buf.index_select(batch_idx)

    def repeat_interleave(self, repeats: int) -> None:
        for buf in self.buffers.values():
            buf.repeat_interleave(repeats)
