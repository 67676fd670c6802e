"""Evaluation rows in forked worker processes: ``jobs`` rows at a time, each on one CPU thread.

One row (a method's teacher-forced pass, generation and passkey cases) is a long chain of small forwards
that a second intra-op thread barely speeds up (measured on 2 cores: 2 threads, 92 s; 1 thread, ~90 s), so
on a CPU machine rows are spread over processes instead. The workers are *forked* after the model is loaded
and the reference computed, so they share both copy-on-write (no pickling of weights or of the ``[T, V]``
reference logits) and only the finished row (a small dataclass) travels back. Results are identical to the
serial loop: every row sees the same inputs and runs the same deterministic code.

Only where ``fork`` exists (Linux, macOS) and never with CUDA tensors (a forked child cannot use the
parent's CUDA context); :func:`usable_jobs` returns 1 otherwise.
"""

from __future__ import annotations

import multiprocessing as mp
import os
from collections.abc import Callable, Iterator
from typing import Any

import torch

_TASK: Callable[[int], Any] | None = None  # set just before the fork; the children inherit it


def usable_jobs(requested: int, rows: int, cuda: bool) -> int:
    """Worker processes to use: ``requested`` (0 = one per CPU core), at most ``rows``; 1 with CUDA or no fork."""
    if cuda or "fork" not in mp.get_all_start_methods():
        return 1
    jobs = requested or (os.cpu_count() or 1)
    return max(1, min(jobs, rows))


def _init() -> None:
    torch.set_num_threads(1)


def _call(i: int) -> tuple[int, Any]:
    assert _TASK is not None
    with torch.no_grad():
        return i, _TASK(i)


def run_forked(task: Callable[[int], Any], n: int, jobs: int) -> Iterator[tuple[int, Any]]:
    """``(i, task(i))`` for ``i < n``, in order of completion, from ``jobs`` forked workers (in this process,
    in order, when ``jobs`` is 1). ``task``'s result must pickle."""
    global _TASK
    if jobs <= 1:
        for i in range(n):
            yield i, task(i)
        return
    _TASK = task
    try:
        with mp.get_context("fork").Pool(jobs, initializer=_init, maxtasksperchild=1) as pool:
            yield from pool.imap_unordered(_call, range(n))
    finally:
        _TASK = None
