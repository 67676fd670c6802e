"""Decode speed and memory of a method's cache: ms per step, tokens/s, peak memory, cache bytes.

One measurement: a random prompt ``[batch, length]`` is prefilled through a fresh cache in one forward
(``logits_to_keep=1``), then ``new_tokens`` greedy steps of one token per sequence are timed (after
``warmup`` untimed steps). ``ms_per_token`` is the wall time of one decode step (all sequences of the
batch advance by one token); ``tokens_per_s = batch * steps / time``.

Peak memory, for prefill and for decode separately (``peak_memory_bytes`` is the larger): on CUDA
``torch.cuda.max_memory_allocated`` (reset before each phase); on CPU the resident set size of the process
sampled every 2 ms by a thread (psutil; without it ``ru_maxrss``, the process-lifetime peak). Both include
the model's weights.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import asdict, dataclass
from typing import Any

import torch

from kvtune.eval.baselines import Method
from kvtune.models import cache_kwargs

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class SpeedResult:
    """One (method, context length, batch) measurement."""

    name: str
    length: int
    batch: int
    new_tokens: int
    prefill_s: float
    ms_per_token: float
    tokens_per_s: float
    peak_memory_bytes: int
    peak_decode_bytes: int
    memory_kind: str
    cache_bytes: int
    device: str

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


@dataclass
class _PeakBox:
    peak: int = 0
    kind: str = ""


def _rss_reader() -> Callable[[], int] | None:
    try:
        import psutil
    except ImportError:
        return None
    proc = psutil.Process()
    return lambda: int(proc.memory_info().rss)


@contextmanager
def _peak_rss(interval: float = 0.002) -> Iterator[_PeakBox]:
    """Peak RSS of this process while the block runs, polled by a thread (``ru_maxrss`` without psutil)."""
    box, read, stop = _PeakBox(kind="peak_rss"), _rss_reader(), threading.Event()
    if read is None:
        import resource

        yield box
        box.peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
        return

    def poll() -> None:
        while not stop.is_set():
            box.peak = max(box.peak, read())
            stop.wait(interval)

    box.peak = read()
    thread = threading.Thread(target=poll, daemon=True)
    thread.start()
    try:
        yield box
    finally:
        stop.set()
        thread.join()
        box.peak = max(box.peak, read())


@contextmanager
def _peak(device: torch.device) -> Iterator[_PeakBox]:
    """Peak memory inside the block: CUDA ``max_memory_allocated`` (reset on entry) or sampled peak RSS."""
    if device.type != "cuda":
        with _peak_rss() as box:
            yield box
        return
    box = _PeakBox(kind="cuda_max_allocated")
    torch.cuda.synchronize(device)
    torch.cuda.reset_peak_memory_stats(device)
    yield box
    torch.cuda.synchronize(device)
    box.peak = int(torch.cuda.max_memory_allocated(device))


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


@torch.no_grad()
def decode_speed(model: Any, method: Method, length: int, batch: int, new_tokens: int = 32, warmup: int = 2,
                 seed: int = 0, prefill_chunk: int | None = None) -> SpeedResult:
    """Time ``new_tokens`` decode steps after a ``length``-token prompt of ``batch`` sequences.

    ``prefill_chunk`` feeds the prompt that many tokens per forward (bounds prefill memory at long contexts).
    """
    if new_tokens < 1 or length < 1 or batch < 1 or warmup < 0:
        raise ValueError("length, batch and new_tokens must be >= 1, warmup >= 0")
    device = next(model.parameters()).device
    gen = torch.Generator().manual_seed(seed)
    prompt = torch.randint(0, model.config.vocab_size, (batch, length), generator=gen).to(device)  # [B, T]
    cache = method.new_cache(model)
    step = prefill_chunk or length
    with _peak(device) as prefill_peak:
        t0 = time.perf_counter()
        for s in range(0, length, step):
            logits = model(prompt[:, s:s + step], logits_to_keep=1, **cache_kwargs(model, cache)).logits
        _sync(device)
        prefill = time.perf_counter() - t0
    nxt = logits[:, -1:].argmax(-1)  # [B, 1]
    del logits
    with _peak(device) as decode_peak:
        for i in range(warmup + new_tokens):
            if i == warmup:
                _sync(device)
                t1 = time.perf_counter()
            nxt = model(nxt, **cache_kwargs(model, cache)).logits[:, -1:].argmax(-1)
        _sync(device)
        decode = time.perf_counter() - t1
    result = SpeedResult(name=method.name, length=length, batch=batch, new_tokens=new_tokens, prefill_s=prefill,
                         ms_per_token=1000 * decode / new_tokens, tokens_per_s=batch * new_tokens / decode,
                         peak_memory_bytes=max(prefill_peak.peak, decode_peak.peak),
                         peak_decode_bytes=decode_peak.peak, memory_kind=prefill_peak.kind,
                         cache_bytes=method.cache_bytes(cache), device=str(device))
    log.info("%s L=%d B=%d: %.1f ms/token", method.name, length, batch, result.ms_per_token)
    return result


def device_info(device: torch.device | str) -> dict[str, Any]:
    """Device name and library versions for a benchmark's JSON."""
    import platform

    import transformers

    device = torch.device(device)
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else (platform.processor() or platform.machine())
    return {"device": str(device), "device_name": name, "torch": torch.__version__,
            "transformers": transformers.__version__, "cpu_threads": torch.get_num_threads(),
            "cuda": torch.version.cuda if device.type == "cuda" else None}
