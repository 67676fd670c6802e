"""Streaming accumulators over activation rows: pure tensor maths, no hooks, no I/O.

Every accumulator sees a stream of row blocks ``x`` ``[N, C]`` (N rows, e.g. tokens; C channels, e.g.
``heads * head_dim``) and keeps bounded state, so calibrating on 64k tokens costs no more memory than on 1k.
State lives on the device of the first block it sees; ``finalize``/``quantiles`` return float32 CPU tensors.

* :class:`MomentStats` -- count, mean, variance (Chan et al. parallel merge of per-block Welford terms, in
  float64), min, max, absmax per channel. ``merge`` combines two accumulators exactly.
* :class:`HistogramSketch` -- a fixed number of equal-width bins per channel whose range adapts: when a
  block falls outside the range, the bin width grows by a power of two and old bins merge exactly (no
  re-binning error). A quantile is interpolated inside its bin, so its error is at most one bin width
  (:attr:`HistogramSketch.resolution`), then clamped to the exact running min/max.
* :class:`ReservoirSampler` -- uniform reservoir sampling (Algorithm R) of stream rows; it only decides
  *which* rows to keep (``plan``) so one decision can be applied to many tensors (Q, K, V of every layer
  keep the same tokens). :class:`RowReservoir` holds the kept rows of one tensor.
"""

from __future__ import annotations

import torch


class MomentStats:
    """Running count/mean/var/min/max/absmax per channel of ``[N, C]`` blocks (Chan merge, float64)."""

    def __init__(self, channels: int) -> None:
        if channels < 1:
            raise ValueError(f"channels must be >= 1, got {channels}")
        self.channels = channels
        self.count = 0
        self.mean: torch.Tensor | None = None  # float64 [C]
        self.m2: torch.Tensor | None = None  # float64 [C], sum of squared deviations
        self.min: torch.Tensor | None = None  # float32 [C]
        self.max: torch.Tensor | None = None  # float32 [C]

    def update(self, x: torch.Tensor) -> None:
        """Add a block ``x`` ``[N, C]`` (any float dtype)."""
        if x.dim() != 2 or x.shape[1] != self.channels:
            raise ValueError(f"expected [N, {self.channels}], got {tuple(x.shape)}")
        if x.shape[0] == 0:
            return
        xd = x.double()
        mean_b = xd.mean(dim=0)
        block = MomentStats(self.channels)
        block.count, block.mean = x.shape[0], mean_b
        block.m2 = (xd - mean_b).square().sum(dim=0)
        block.min, block.max = x.amin(dim=0).float(), x.amax(dim=0).float()
        self.merge(block)

    def merge(self, other: MomentStats) -> None:
        """Fold ``other`` into this accumulator (exact: the result equals one pass over both streams)."""
        if other.channels != self.channels:
            raise ValueError(f"cannot merge {other.channels} channels into {self.channels}")
        if other.count == 0:
            return
        if self.count == 0:
            self.count, self.mean, self.m2 = other.count, other.mean.clone(), other.m2.clone()
            self.min, self.max = other.min.clone(), other.max.clone()
            return
        n_a, n_b = self.count, other.count
        n = n_a + n_b
        delta = other.mean.to(self.mean.device) - self.mean
        self.mean = self.mean + delta * (n_b / n)
        self.m2 = self.m2 + other.m2.to(self.m2.device) + delta.square() * (n_a * n_b / n)
        self.min = torch.minimum(self.min, other.min.to(self.min.device))
        self.max = torch.maximum(self.max, other.max.to(self.max.device))
        self.count = n

    def finalize(self) -> dict[str, torch.Tensor]:
        """``{"mean", "var" (population), "min", "max", "absmax"}``: float32 CPU ``[C]`` each."""
        if self.count == 0:
            raise ValueError("no data was accumulated")
        return {"mean": self.mean.float().cpu(), "var": (self.m2 / self.count).float().cpu(),
                "min": self.min.cpu(), "max": self.max.cpu(),
                "absmax": torch.maximum(self.min.abs(), self.max.abs()).cpu()}


class HistogramSketch:
    """Per-channel equal-width histogram with an adaptive (power-of-two growing) range.

    Bin ``i`` of channel ``c`` covers ``[lo[c] + i*width[c], lo[c] + (i+1)*width[c])``. Memory is
    ``C * bins`` int64 counts regardless of the stream length.
    """

    def __init__(self, channels: int, bins: int = 512) -> None:
        if channels < 1 or bins < 2:
            raise ValueError(f"need channels >= 1 and bins >= 2, got {channels}, {bins}")
        self.channels, self.bins = channels, bins
        self.count = 0
        self.lo: torch.Tensor | None = None  # float64 [C]
        self.width: torch.Tensor | None = None  # float64 [C]
        self.counts: torch.Tensor | None = None  # int64 [C, bins]
        self.min: torch.Tensor | None = None  # float64 [C]
        self.max: torch.Tensor | None = None

    @property
    def resolution(self) -> torch.Tensor:
        """Current bin width per channel ``[C]``: the bound on a quantile's error."""
        return self.width.float().cpu()

    def update(self, x: torch.Tensor) -> None:
        """Add a block ``x`` ``[N, C]``."""
        if x.dim() != 2 or x.shape[1] != self.channels:
            raise ValueError(f"expected [N, {self.channels}], got {tuple(x.shape)}")
        if x.shape[0] == 0:
            return
        xd = x.double()
        bmin, bmax = xd.amin(dim=0), xd.amax(dim=0)
        if self.counts is None:
            self._init(bmin, bmax)
        else:
            self.min, self.max = torch.minimum(self.min, bmin), torch.maximum(self.max, bmax)
            self._grow(bmin, bmax)
        idx = ((xd - self.lo) / self.width).floor_().clamp_(0, self.bins - 1).long()
        idx += torch.arange(self.channels, device=x.device) * self.bins
        self.counts += torch.bincount(idx.flatten(), minlength=self.channels * self.bins).view(self.channels, -1)
        self.count += x.shape[0]

    def _init(self, bmin: torch.Tensor, bmax: torch.Tensor) -> None:
        span = bmax - bmin
        floor = torch.maximum(bmin.abs(), bmax.abs()).clamp_min(1.0) * 1e-6  # constant channels: tiny bins
        self.width = torch.maximum(span * (1 + 1e-9), floor) / self.bins
        self.lo, self.min, self.max = bmin.clone(), bmin.clone(), bmax.clone()
        self.counts = torch.zeros(self.channels, self.bins, dtype=torch.long, device=bmin.device)

    def _grow(self, bmin: torch.Tensor, bmax: torch.Tensor) -> None:
        """Widen channels whose range misses ``[bmin, bmax]``: width *= 2^j, ``n`` new bins on the left.

        Old bin ``i`` maps into new bin ``n + (i >> j)`` exactly, since ``new_lo + n * new_width == lo``.
        """
        hi = self.lo + self.width * self.bins
        need = (bmin < self.lo) | (bmax >= hi)
        if not bool(need.any()):
            return
        shift = torch.zeros_like(self.counts[:, 0])
        left = torch.zeros_like(shift)
        pending = need.clone()
        for j in range(1, 64):
            new_w = self.width * 2.0 ** j
            n_min = ((self.lo - bmin).clamp_min(0) / new_w).ceil()
            n_max = torch.minimum(self.bins - 1 - ((bmax - self.lo) / new_w).floor(),
                                  torch.full_like(n_min, self.bins - 1 - ((self.bins - 1) >> j)))
            ok = pending & (n_min <= n_max)
            shift[ok], left[ok] = j, n_min[ok].long()
            pending &= ~ok
            if not bool(pending.any()):
                break
        target = left[:, None] + (torch.arange(self.bins, device=shift.device)[None, :] >> shift[:, None])
        self.counts = torch.zeros_like(self.counts).scatter_add_(1, target, self.counts)
        new_width = self.width * torch.pow(2.0, shift.double())
        self.lo = self.lo - left.double() * new_width
        self.width = new_width

    def quantiles(self, levels: tuple[float, ...] | list[float]) -> torch.Tensor:
        """Interpolated quantiles ``[C, len(levels)]`` (float32 CPU), clamped to the exact min/max."""
        if self.count == 0:
            raise ValueError("no data was accumulated")
        q = torch.tensor(list(levels), dtype=torch.float64, device=self.counts.device)
        if bool(((q < 0) | (q > 1)).any()):
            raise ValueError(f"quantile levels must lie in [0, 1], got {list(levels)}")
        cdf = self.counts.double().cumsum(dim=1)  # [C, bins]
        target = (q[None, :] * self.count).expand(self.channels, -1).contiguous()  # [C, nq]
        b = torch.searchsorted(cdf, target).clamp_(max=self.bins - 1)  # first bin with cdf >= target
        before = torch.where(b > 0, cdf.gather(1, (b - 1).clamp_min(0)), torch.zeros_like(target))
        inside = self.counts.double().gather(1, b).clamp_min(1)
        frac = ((target - before) / inside).clamp_(0, 1)
        value = self.lo[:, None] + (b.double() + frac) * self.width[:, None]
        value = torch.minimum(torch.maximum(value, self.min[:, None]), self.max[:, None])
        return value.float().cpu()


class ReservoirSampler:
    """Which rows of a stream to keep: a uniform sample of ``capacity`` rows (Algorithm R, seeded)."""

    def __init__(self, capacity: int, seed: int = 0) -> None:
        if capacity < 0:
            raise ValueError(f"capacity must be >= 0, got {capacity}")
        self.capacity, self.seen = capacity, 0
        self._gen = torch.Generator().manual_seed(seed)

    @property
    def filled(self) -> int:
        return min(self.seen, self.capacity)

    def plan(self, n: int) -> tuple[torch.Tensor, torch.Tensor]:
        """For the next ``n`` stream rows: ``(src, dst)`` int64 -- row ``src[i]`` of the block goes to slot
        ``dst[i]``."""
        t = torch.arange(self.seen, self.seen + n, dtype=torch.float64)
        slot = torch.where(t < self.capacity, t,
                           (torch.rand(n, generator=self._gen, dtype=torch.float64) * (t + 1)).floor())
        self.seen += n
        keep = (slot < self.capacity).nonzero().flatten().tolist()
        last: dict[int, int] = {}
        for i in keep:  # later rows overwrite earlier ones in the same slot, as a sequential pass would
            last[int(slot[i])] = i
        src = torch.tensor(list(last.values()), dtype=torch.long)
        dst = torch.tensor(list(last.keys()), dtype=torch.long)
        return src, dst


class RowReservoir:
    """The kept rows of one tensor stream ``[H, N, D]`` (rows along dim 1), filled by a shared sampler plan."""

    def __init__(self, capacity: int) -> None:
        self.capacity = capacity
        self.rows: torch.Tensor | None = None  # float32 [H, capacity, D]

    def update(self, x: torch.Tensor, src: torch.Tensor, dst: torch.Tensor) -> None:
        """Store rows ``x[:, src]`` (``x`` ``[H, n, D]``) into slots ``dst``."""
        if self.rows is None:
            self.rows = torch.zeros(x.shape[0], self.capacity, x.shape[2], dtype=torch.float32, device=x.device)
        if src.numel():
            self.rows[:, dst.to(x.device)] = x[:, src.to(x.device)].float()

    def finalize(self, filled: int) -> torch.Tensor:
        """The first ``filled`` slots ``[H, filled, D]`` (float32 CPU)."""
        if self.rows is None:
            raise ValueError("no data was accumulated")
        return self.rows[:, :filled].cpu()
