"""Decode steps replayed as CUDA graphs: no Python, no launch overhead per step.

    cache = plan.cache(model, static=True, batch=8, max_length=prompt_len + 256)
    tokens = kvtune.runtime.graphs.generate(model, cache, input_ids, attention_mask, max_new_tokens=256)

or step by step with :class:`GraphDecoder` (``prefill`` once, then ``step(tokens) -> logits``). The prompt runs
eagerly; each decode step is one replay of a graph captured the first time it is needed, one graph per set of layers
that flush a block in that step (:meth:`StaticKVTuneCache.next_flush` names the set on the host, without a device
sync: two graphs when every layer has the same window and block, a few more when layers differ). Inputs,
positions and the logits of the last position are static buffers.
Capture costs about a second or two per graph (``capture_s``); the cache's ``max_length`` bounds the tokens.

Any cache whose update and attention are fixed-shape device work can be captured the same way (the benchmarks
capture fp16 static caches for comparison); caches without ``next_flush`` get one graph.
"""

from __future__ import annotations

import time
from typing import Any

import torch

from kvtune.models import cache_kwargs

COUNTERS = ("nq", "nw", "cumulative_length")


class GraphDecoder:
    """Greedy-decoding helper over a static cache (see module docstring); ``graphs=False`` runs steps eagerly."""

    def __init__(self, model: Any, cache: Any, graphs: bool = True) -> None:
        self.model, self.cache = model, cache
        self.use_graphs = graphs and torch.cuda.is_available() and next(model.parameters()).is_cuda
        self.graphs: dict[Any, torch.cuda.CUDAGraph] = {}  # flush pattern (next_flush()) -> graph
        self.pool: Any = None
        self.capture_s = 0.0
        self.kw = cache_kwargs(model, cache)

    @torch.no_grad()
    def prefill(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None) -> torch.Tensor:
        """Run the prompt ``input_ids [B, L]`` (left-padded rows: ``attention_mask [B, L]``) in one call; returns the
        last position's logits ``[B, V]`` and sets up the static step inputs."""
        if hasattr(self.cache, "set_padding"):
            self.cache.set_padding(attention_mask)
        pos = None
        if attention_mask is not None:  # as generate() does: padding-aware positions
            pos = (attention_mask.long().cumsum(-1) - 1).masked_fill(attention_mask == 0, 1)
        out = self.model(input_ids, attention_mask=attention_mask, position_ids=pos, logits_to_keep=1, **self.kw)
        return self.start(out.logits[:, -1], input_ids.shape[1], attention_mask)

    def start(self, logits: torch.Tensor, length: int, attention_mask: torch.Tensor | None = None) -> torch.Tensor:
        """Set up the static step inputs after a prompt of ``length`` positions was stored some other way (chunked
        prefill of a cache that allows it); ``logits [B, V]``: its last position's. Returns the logits buffer."""
        bsz, dev = logits.shape[0], logits.device
        self.ids = torch.zeros(bsz, 1, dtype=torch.long, device=dev)
        real = attention_mask.sum(-1) if attention_mask is not None else torch.full((bsz,), length, device=dev)
        self.pos = real.view(bsz, 1).long().clone()  # next position id of each row
        self.cpos = torch.tensor([length], dtype=torch.long, device=dev)
        self.out = logits.clone()
        return self.out

    def _forward(self) -> None:
        out = self.model(self.ids, position_ids=self.pos, cache_position=self.cpos, **self.kw)
        self.out.copy_(out.logits[:, -1])
        self.pos += 1
        self.cpos += 1

    @torch.no_grad()
    def step(self, tokens: torch.Tensor) -> torch.Tensor:
        """Feed ``tokens [B]`` or ``[B, 1]``; returns the next logits ``[B, V]`` (a static buffer: copy to keep)."""
        self.ids.copy_(tokens.view(-1, 1))
        flush = self.cache.next_flush() if hasattr(self.cache, "next_flush") else False
        if not self.use_graphs:
            self._forward()
            return self.out
        graph = self.graphs.get(flush) or self._capture(flush)
        graph.replay()
        if hasattr(self.cache, "advance"):
            self.cache.advance(flush)
        return self.out

    def _state(self) -> Any:
        """What a warm-up or capture changes outside the buffers a later step rewrites: host mirrors and counters."""
        layers = getattr(self.cache, "layers", [])
        host = [(ly.n_quant, ly.n_win, ly.length) for ly in layers if hasattr(ly, "n_win")]
        dev = [t.clone() for t in self._counters()]
        return host, dev, self.pos.clone(), self.cpos.clone()

    def _counters(self) -> list[torch.Tensor]:
        """The device counters a step moves: kvtune's ``nq``/``nw``, transformers' ``cumulative_length``."""
        return [t for ly in getattr(self.cache, "layers", []) for name in COUNTERS
                if isinstance(t := getattr(ly, name, None), torch.Tensor)]

    def _restore(self, saved: Any) -> None:
        host, dev, pos, cpos = saved
        layers = [ly for ly in getattr(self.cache, "layers", []) if hasattr(ly, "n_win")]
        for ly, (nq, nw, length) in zip(layers, host):
            ly.n_quant, ly.n_win, ly.length = nq, nw, length
        for t, v in zip(self._counters(), dev):
            t.copy_(v)
        self.pos.copy_(pos)
        self.cpos.copy_(cpos)

    def _force(self, flush: Any) -> None:
        """Set every layer's flush for a warm-up or capture: one bool for all layers, a tuple of per-layer bools (a
        :meth:`next_flush` pattern), or None (back to the layers' own counters)."""
        layers = [ly for ly in getattr(self.cache, "layers", []) if hasattr(ly, "flush_due")]
        for i, ly in enumerate(layers):
            ly.flush_due = flush[i] if isinstance(flush, tuple) else flush

    def _capture(self, flush: Any) -> torch.cuda.CUDAGraph:
        """Warm up once (a plain step, undone), then capture the step with the flush pattern ``flush``."""
        t0 = time.perf_counter()
        saved = self._state()
        if not self.graphs:  # compile the kernels and create library handles outside the capture
            self._force(False)
            stream = torch.cuda.Stream()
            stream.wait_stream(torch.cuda.current_stream())
            with torch.cuda.stream(stream):
                self._forward()
            torch.cuda.current_stream().wait_stream(stream)
            torch.cuda.synchronize()
            self._restore(saved)
        self._force(flush)
        graph = torch.cuda.CUDAGraph()
        try:
            with torch.cuda.graph(graph, pool=self.pool):
                self._forward()
        finally:
            self._force(None)
            self._restore(saved)
        self.pool = graph.pool()
        self.graphs[flush] = graph
        torch.cuda.synchronize()
        self.capture_s += time.perf_counter() - t0
        return graph


@torch.no_grad()
def generate(model: Any, cache: Any, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None,
             max_new_tokens: int = 32, graphs: bool = True) -> torch.Tensor:
    """Greedy decoding through :class:`GraphDecoder`: the ``[B, max_new_tokens]`` new tokens."""
    dec = GraphDecoder(model, cache, graphs)
    logits = dec.prefill(input_ids, attention_mask)
    out = []
    for _ in range(max_new_tokens):
        tok = logits.argmax(-1)
        out.append(tok)
        if len(out) < max_new_tokens:
            logits = dec.step(tok)
    return torch.stack(out, 1)
