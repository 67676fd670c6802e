"""One group of KV heads of a layer that share a :class:`~kvtune.plan_types.HeadPlan`.

A group owns the quantized part of its heads' K and V: per role a :class:`~kvtune.runtime.store.FieldStore`
of the fields the spec declares (:func:`kvtune.quant.codec.stored_fields`) and the spec's ``layer``-scope
state (calibrated from the plan's tensors, else fitted on the first block), and, when the layer keeps salient
tokens, their higher-precision copies. Heads of a layer with different specs live in different groups;
attention runs per group (heads never mix).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import torch

from kvtune.plan_types import HeadPlan
from kvtune.quant import codec
from kvtune.quant.formats import QuantSpec
from kvtune.runtime.store import FieldStore

ROLES = ("key", "value")


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
    """KV heads ``heads`` of one layer with one K/V spec pair.

    ``state``: per role (``key``/``value``) the spec's ``layer``-scope tensors ``[h, width]`` (e.g. outlier
    channels); missing ones are fitted on the first block stored.
    """

    heads: tuple[int, ...]
    plan: HeadPlan
    flush: int
    head_dim: int
    state: dict[str, dict[str, torch.Tensor]] = field(default_factory=dict)
    headroom: float = 0.0
    stores: dict[str, FieldStore] = field(init=False)
    salient: Salient | None = None
    kernel_memo: tuple[tuple, Any] | None = field(default=None, init=False)  # (store versions, kernel operands)
    tokens: int = field(default=0, init=False)  # quantized tokens held (both stores)
    decoded: tuple[int, torch.Tensor, torch.Tensor] | None = field(default=None, init=False)  # (tokens, k, v)

    def __post_init__(self) -> None:
        self.state = {r: dict(self.state.get(r, {})) for r in ROLES}
        self.stores = {r: FieldStore(codec.stored_fields(self.spec(r), self.head_dim, self.flush), self.headroom)
                       for r in ROLES}

    def spec(self, role: str) -> QuantSpec:
        return self.plan.key if role == "key" else self.plan.value

    @property
    def keys(self) -> FieldStore:
        return self.stores["key"]

    @property
    def values(self) -> FieldStore:
        return self.stores["value"]

    @property
    def quantized(self) -> bool:
        return not (self.plan.key.passthrough and self.plan.value.passthrough)

    def select(self, x: torch.Tensor) -> torch.Tensor:
        """This group's heads of ``x [B, Hkv, ...]``."""
        if len(self.heads) == x.shape[1]:
            return x
        return x[:, list(self.heads)]

    def _state(self, role: str, x: torch.Tensor) -> dict[str, torch.Tensor]:
        """The role's layer state, fitting what the plan did not provide on ``x [B, h, n, D]`` (its first block)."""
        spec, have = self.spec(role), self.state[role]
        if codec.layer_fields(spec, self.head_dim).keys() - have.keys():
            return codec.fit(spec, x[:, :, : self.flush], have)
        return have

    def append(self, k: torch.Tensor, v: torch.Tensor) -> None:
        """Quantize whole blocks ``k, v [B, h, n*F, D]`` (this group's heads) and store them."""
        for role, x in zip(ROLES, (k, v)):
            self.state[role] = self._state(role, x)
            self.stores[role].append(codec.encode(x, self.spec(role), self.flush, self.state[role]))
        self.tokens += k.shape[2]

    def drop_front(self, tokens: int) -> None:
        """Drop the first ``tokens`` quantized tokens (they left every window)."""
        for store in self.stores.values():
            store.drop_front(tokens, self.flush)
        self.tokens -= tokens
        if self.decoded is not None:
            n, k, v = self.decoded
            self.decoded = (n - tokens, k[:, :, tokens:], v[:, :, tokens:]) if n >= tokens else None

    def roundtrip(self, k: torch.Tensor, v: torch.Tensor, select) -> tuple[torch.Tensor, torch.Tensor]:
        """What storing whole blocks ``k, v [B, Hkv, n*F, D]`` (all heads) would read back, for this group's
        heads, without storing them: float32 ``[B, h, n*F, D]`` (all blocks in one encode, as :meth:`append`)."""
        out = []
        for role, x in zip(ROLES, (select(k).float(), select(v).float())):
            spec, state, f = self.spec(role), self._state(role, x), self.flush
            out.append(codec.decode(codec.encode(x, spec, f, state), spec, f, self.head_dim, state))
        return out[0], out[1]

    def dequantized(self, keep: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
        """All quantized tokens back in float32 ``[B, h, Nq, D]`` (salient tokens from their copies).

        ``keep``: hold the decoded tokens (float32, twice an fp16 cache) so that the next call decodes only the
        blocks appended since (teacher-forced evaluation reads the whole history once per chunk); a decoded
        block never changes, so this is the same result."""
        k, v = self._decoded(keep)
        s = self.salient
        if s is not None and s.idx is not None and s.idx.shape[-1]:
            idx = s.idx.long().unsqueeze(-1).expand(*s.idx.shape, self.head_dim)
            k = k.scatter(2, idx, codec.decode(s.k, s.spec, 1, self.head_dim))
            v = v.scatter(2, idx, codec.decode(s.v, s.spec, 1, self.head_dim))
        return k, v

    def _decoded(self, keep: bool) -> tuple[torch.Tensor, torch.Tensor]:
        """The stores decoded (from ``self.decoded`` plus the blocks after it when ``keep``)."""
        done = self.decoded[0] if keep and self.decoded is not None else 0
        if done and not all(self._block_edge(r, done) for r in ROLES):
            done = 0
        if done and done == self.tokens:
            assert self.decoded is not None
            return self.decoded[1], self.decoded[2]
        new = [codec.decode(self._fields_from(r, done), self.spec(r), self.flush, self.head_dim, self.state[r])
               for r in ROLES]
        if done:
            assert self.decoded is not None
            new = [torch.cat([old, x], 2) for old, x in zip(self.decoded[1:], new)]
        self.decoded = (self.tokens, new[0], new[1]) if keep else None
        return new[0], new[1]

    def _block_edge(self, role: str, n: int) -> bool:
        """Whether the first ``n`` tokens end on a row edge of every stored field of ``role``."""
        spans = [(d.every if d.scope == "group" and d.every else self.flush)
                 for d in self.stores[role].decls.values() if d.scope in ("group", "block")]
        return all(n % span == 0 for span in spans)

    def _fields_from(self, role: str, n: int) -> dict[str, torch.Tensor]:
        """The stored fields of ``role`` for the tokens after the first ``n``."""
        store = self.stores[role]
        return {name: t[:, :, store.decls[name].rows(n, self.flush):] for name, t in store.fields().items()}

    def nbytes(self, used: bool = False) -> int:
        """Bytes held; a role's layer state counts once it has quantized tokens (as the bit accountant counts a
        ``layer``-scope field: :meth:`FieldDecl.rows`), plan-provided state held before that is the plan's."""
        state = sum(t.numel() * t.element_size() for r, st in self.state.items() if self.stores[r]
                    for t in st.values())
        sal = self.salient.nbytes() if self.salient is not None else 0
        return self.keys.nbytes(used) + self.values.nbytes(used) + state + sal

    def index_select(self, batch_idx: torch.Tensor) -> None:
        self.decoded = None
        self.keys.index_select(batch_idx)
        self.values.index_select(batch_idx)
        s = self.salient
        if s is not None and s.idx is not None:
            s.idx = s.idx.index_select(0, batch_idx.to(s.idx.device))
            s.k = {n: t.index_select(0, batch_idx.to(t.device)) for n, t in s.k.items()}
            s.v = {n: t.index_select(0, batch_idx.to(t.device)) for n, t in s.v.items()}
