"""Compare a plan with baselines on the same inputs: the one verb :func:`evaluate`.

For every method (see :mod:`kvtune.eval.baselines`) and the same token sequences:

* bits: the accountant's effective bits at the plan's reference length and at ``ctx``; the bytes the live
  cache holds after ``ctx`` tokens (prompt + greedy generation), measured on its tensors;
* quality vs the reference (the model's dense forward without a cache): perplexity, KL, top-1 agreement,
  each over all positions and over the tail (positions >= ``ctx // 2``). Logits are teacher-forced through
  the method's cache with token-by-token semantics: kvtune caches run ``chunk`` tokens per forward in stepwise
  mode (each query reads exactly what decoding one token at a time would show it; tests/runtime and
  tests/eval check chunked == ``chunk=1``); transformers' caches run in the chunks that reproduce their own
  token-by-token flushes (see :mod:`kvtune.eval.baselines`);
* greedy agreement with the reference's greedy tokens (``DynamicCache``) over ``gen_tokens`` tokens after a
  ``ctx - gen_tokens + 1``-token prompt;
* passkey retrieval at ``passkey_lengths`` x ``passkey_depths`` (see :mod:`kvtune.eval.retrieval`).

CPU cost, measured (SmolLM2-135M float32, one thread per row, defaults: ctx 2048, 2 sequences, chunk 64,
1 generation prompt, passkey 512/1024/2048 x depths 0.5/0.9) on 2 cores of an AMD EPYC: reference 44 s, then
~130 s per kvtune row (teacher-forced pass ~57 s, 64 greedy tokens ~30 s, 6 passkey cases ~42 s). Rows run
``jobs`` at a time in forked worker processes (:mod:`kvtune.eval.parallel`): the demo's five rows took 430 s
with two workers, 735 s one after another.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass
from typing import Any

import torch

from kvtune.errors import KVTuneError
from kvtune.eval.baselines import Method, identity_of
from kvtune.eval.parallel import run_forked, usable_jobs
from kvtune.eval.quality import SequenceScorer, dense_logits, greedy_agreement, greedy_generate
from kvtune.eval.report import EvalReport, EvalRow
from kvtune.eval.retrieval import default_lengths, passkey_prompts, run_passkey

log = logging.getLogger(__name__)

ProgressFn = Callable[[str, int, int], None]
"""``progress(label, done, total)``: called after every unit of work (a sequence, a prompt, a passkey case)."""

__all__ = ["EvalSettings", "ProgressFn", "evaluate"]

EVAL_DEPTHS = (0.5, 0.9)
"""Default needle depths: with its own fp16 cache SmolLM2-135M misses a needle at depth 0.1 at 1024, 2048 and
4096 tokens (and finds it at 0.5 / 0.9), so early needles measure the model more than the cache."""


@dataclass(frozen=True)
class EvalSettings:
    """What ``evaluate`` measures; the defaults fit the demo's budget (module docstring: ~80 s a row)."""

    ctx: int = 2048
    sequences: int = 2
    chunk: int = 64
    prefill: int = 0
    gen_tokens: int = 64
    gen_prompts: int = 1
    passkey_lengths: tuple[int, ...] | None = None  # None: 512, 1024, ... up to ctx
    passkey_depths: tuple[float, ...] = EVAL_DEPTHS
    seed: int = 0

    def __post_init__(self) -> None:
        for name in ("ctx", "sequences", "chunk"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1, got {getattr(self, name)}")
        if not 0 <= self.prefill < self.ctx:
            raise ValueError(f"prefill must be in [0, ctx), got {self.prefill}")
        if self.gen_tokens < 0 or self.gen_prompts < 0 or self.gen_tokens >= self.ctx:
            raise ValueError("gen_tokens and gen_prompts must be >= 0 and gen_tokens < ctx")
        if any(not 0.0 <= d <= 1.0 for d in self.passkey_depths):
            raise ValueError("passkey depths must be in [0, 1]")

    @property
    def lengths(self) -> tuple[int, ...]:
        return self.passkey_lengths if self.passkey_lengths is not None else default_lengths(self.ctx)

    @property
    def tail_start(self) -> int:
        return self.ctx // 2

    def units(self, sequences: int | None = None) -> int:
        """Units of progress per row (``sequences``: how many the text really holds)."""
        n = self.sequences if sequences is None else sequences
        return n + (min(self.gen_prompts, n) if self.gen_tokens else 0) + len(self.lengths) * len(self.passkey_depths)


def _check_limits(model: Any, settings: EvalSettings) -> None:
    limit = getattr(model.config, "max_position_embeddings", None)
    longest = max((settings.ctx, *settings.lengths))
    if limit and longest > limit:
        raise KVTuneError(f"context {longest} is beyond the model's limit of {limit} tokens",
                          f"use --ctx and --passkey-lengths <= {limit}")


def _inputs(tok: Any, text: str, settings: EvalSettings) -> tuple[torch.Tensor, list[int]]:
    """``(sequences [S, ctx] int64, all token ids of text)``."""
    ids = list(tok(text, add_special_tokens=False, verbose=False)["input_ids"])
    if len(ids) < settings.ctx:
        raise KVTuneError(f"the text has {len(ids)} tokens, fewer than --ctx {settings.ctx}",
                          "use a longer text or a smaller --ctx")
    n = min(settings.sequences, len(ids) // settings.ctx)
    if n < settings.sequences:
        log.warning("the text holds %d sequences of %d tokens, not %d: using %d", n, settings.ctx,
                    settings.sequences, n)
    return torch.tensor(ids[: n * settings.ctx], dtype=torch.long).view(n, settings.ctx), ids


@dataclass
class _Reference:
    logits: list[torch.Tensor]       # per sequence [1, ctx, V] float32
    prompts: torch.Tensor            # [P, ctx - gen_tokens + 1]
    tokens: torch.Tensor             # [P, gen_tokens]
    metrics: dict[str, Any]


def _reference(model: Any, seqs: torch.Tensor, settings: EvalSettings, tick: Callable[[str], None]) -> _Reference:
    logits = []
    scorer = SequenceScorer(tail_start=settings.tail_start)
    for b in range(seqs.shape[0]):
        ref = dense_logits(model, seqs[b:b + 1])
        scorer.add(ref, ref, seqs[b:b + 1])
        logits.append(ref)
        tick("reference")
    prompts = (seqs[: settings.gen_prompts, : settings.ctx - settings.gen_tokens + 1] if settings.gen_tokens
               else seqs[:0])
    tokens = []
    for p in range(prompts.shape[0]):
        tokens.append(greedy_generate(model, prompts[p:p + 1], settings.gen_tokens))
        tick("reference")
    m = scorer.result()
    return _Reference(logits, prompts, torch.cat(tokens) if tokens else prompts[:, :0],
                      {"ppl": m["ppl"], "ppl_tail": m["ppl_tail"], "positions": m["positions"]})


def _run_row(model: Any, tok: Any, method: Method, seqs: torch.Tensor, ref: _Reference, prompts: list[Any],
             settings: EvalSettings, row: EvalRow, tick: Callable[[str], None]) -> None:
    ident = identity_of(model)
    t0 = time.perf_counter()
    scorer = SequenceScorer(tail_start=settings.tail_start)
    for b in range(seqs.shape[0]):
        logits = method.teacher_forced(model, seqs[b:b + 1], settings.chunk, settings.prefill)
        scorer.add(logits, ref.logits[b], seqs[b:b + 1])
        del logits
        tick(method.name)
    m = scorer.result()
    row.ppl, row.kl, row.top1 = m["ppl"], m["kl"], m["top1"]
    row.ppl_tail, row.kl_tail, row.top1_tail = m["ppl_tail"], m["kl_tail"], m["top1_tail"]
    row.delta_ppl = row.ppl - ref.metrics["ppl"]
    row.delta_ppl_pct = 100.0 * row.delta_ppl / ref.metrics["ppl"]
    t1 = time.perf_counter()
    outs = []
    for p in range(ref.prompts.shape[0]):
        cache = method.new_cache(model)
        outs.append(greedy_generate(model, ref.prompts[p:p + 1], settings.gen_tokens, cache=cache))
        if p == 0:
            row.cache_bytes, row.cache_tokens = method.cache_bytes(cache), int(cache.get_seq_length())
            elements = 2 * row.cache_tokens * ident.num_layers * ident.num_kv_heads * ident.head_dim
            row.measured_bits = row.cache_bytes * 8 / elements
        del cache
        tick(method.name)
    if outs:
        row.gen_agree_prefix, row.gen_agree = greedy_agreement(ref.tokens, torch.cat(outs))
    t2 = time.perf_counter()
    if prompts:
        pk = run_passkey(model, tok, prompts, lambda: method.new_cache(model), step=lambda: tick(method.name))
        row.passkey, row.passkey_by_length, row.passkey_cases = pk["accuracy"], pk["by_length"], pk["cases"]
    row.seconds = {"quality": t1 - t0, "generation": t2 - t1, "passkey": time.perf_counter() - t2}


@dataclass
class _Ticker:
    """Counts units of work and forwards them to a :data:`ProgressFn`."""

    total: int
    progress: ProgressFn | None
    done: int = 0

    def __call__(self, label: str) -> None:
        self.done += 1
        if self.progress is not None:
            self.progress(label, self.done, self.total)

    def finish(self, label: str, end: int) -> None:
        """Move to ``end`` (a row that stopped early still moves the bar to its end)."""
        if self.done < end:
            self.done = end - 1
            self(label)


def _guarded_row(model: Any, tok: Any, method: Method, seqs: torch.Tensor, ref: _Reference, prompts: list[Any],
                 settings: EvalSettings, row: EvalRow, tick: _Ticker) -> None:
    """:func:`_run_row`, with a failure (or an unavailable backend) recorded as the row's one-line error."""
    row.error = method.unavailable()
    if row.error is not None:
        return
    log.info("evaluating %s", method.name)
    try:
        _run_row(model, tok, method, seqs, ref, prompts, settings, row, tick)
    except Exception as exc:  # one broken method must not lose the other rows
        row.error = f"{type(exc).__name__}: {(str(exc).splitlines() or [''])[0][:160]}"
        log.warning("%s failed: %s", method.name, row.error)
        log.debug("%s traceback", method.name, exc_info=True)


@torch.no_grad()
def evaluate(model: Any, tok: Any, methods: list[Method], text: str, settings: EvalSettings = EvalSettings(),
             progress: ProgressFn | None = None, data_name: str = "", jobs: int = 1) -> EvalReport:
    """Evaluate every method on the same inputs; a method that cannot run gets a row with ``error`` set.

    ``jobs``: rows run at a time in forked CPU worker processes (0 = one per core; see
    :mod:`kvtune.eval.parallel`); the numbers do not depend on it.
    """
    _check_limits(model, settings)
    ident = identity_of(model)
    rows = [EvalRow(name=m.name, description=m.description, is_plan=m.is_plan) for m in methods]
    for method, row in zip(methods, rows):  # bits first: a plan for another model fails before any compute
        row.effective_bits = method.effective_bits(ident, settings.ctx)
        row.effective_bits_ref = method.effective_bits(ident, method.reference_length())
    seqs, ids = _inputs(tok, text, settings)
    prompts = passkey_prompts(tok, ids, settings.lengths, settings.passkey_depths, seed=settings.seed)
    n_seqs = seqs.shape[0]
    units = settings.units(n_seqs)
    tick = _Ticker(units * len(methods) + n_seqs + (min(settings.gen_prompts, n_seqs) if settings.gen_tokens else 0),
                   progress)
    t0 = time.perf_counter()
    ref = _reference(model, seqs, settings, tick)
    ref.metrics["seconds"] = time.perf_counter() - t0
    jobs = usable_jobs(jobs, len(methods), cuda=any(p.is_cuda for p in model.parameters()))
    quiet = _Ticker(0, None)

    def one_row(i: int) -> EvalRow:
        _guarded_row(model, tok, methods[i], seqs, ref, prompts, settings, rows[i], tick if jobs == 1 else quiet)
        return rows[i]

    base = tick.done
    for done, (i, row) in enumerate(run_forked(one_row, len(methods), jobs), start=1):
        rows[i] = row
        tick.finish(methods[i].name, base + done * units)  # a row that stopped early still fills its share
    return _report(model, text, len(ids), data_name, settings, ref, rows, jobs)


def _report(model: Any, text: str, n_tokens: int, data_name: str, settings: EvalSettings, ref: _Reference,
            rows: list[EvalRow], jobs: int) -> EvalReport:
    from kvtune.data import data_hash
    from kvtune.models import model_identity

    m = ref.metrics
    return EvalReport(model=model_identity(model),
                      data={"source": data_name, "sha256": data_hash(text), "tokens": n_tokens},
                      settings={**asdict(settings), "passkey_lengths": list(settings.lengths),
                                "tail_start": settings.tail_start, "jobs": jobs},
                      reference={"ppl": m["ppl"], "ppl_tail": m["ppl_tail"], "kl": 0.0, "positions": m["positions"],
                                 "seconds": m["seconds"]},
                      rows=rows)
