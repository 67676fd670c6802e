"""``kvtune bench``: decode speed and memory of fp16 vs a plan vs baselines at several lengths and batches."""

from __future__ import annotations

import json
from typing import Any

import click

from kvtune.commands import DEFAULT_MODEL, console
from kvtune.commands.eval import method_rows, progress_bar, set_threads, split_list
from kvtune.errors import KVTuneError


def bench_table(results: list[Any], info: dict[str, Any]) -> Any:
    """A rich table of :class:`~kvtune.eval.speed.SpeedResult` rows."""
    from rich.table import Table

    kind = results[0].memory_kind if results else ""
    table = Table(title=f"kvtune bench on {info['device_name']} ({info['device']}, torch {info['torch']})",
                  caption=f"ms/token = one decode step of the whole batch; peak memory = {kind} (includes weights)")
    for col in ("method", "ctx", "batch", "prefill s", "ms/token", "tokens/s", "peak MiB", "cache MiB"):
        table.add_column(col, justify="left" if col == "method" else "right")
    for r in results:
        if isinstance(r, dict):  # a row that could not run
            table.add_row(r["name"], str(r["length"]), str(r["batch"]), "not run (see note)", style="dim")
            continue
        table.add_row(r.name, str(r.length), str(r.batch), f"{r.prefill_s:.2f}", f"{r.ms_per_token:.1f}",
                      f"{r.tokens_per_s:.1f}", f"{r.peak_memory_bytes / 2**20:.0f}", f"{r.cache_bytes / 2**20:.2f}")
    return table


def _device(device: str) -> str:
    """``auto`` -> ``cuda`` when a GPU is visible, else ``cpu``."""
    if device != "auto":
        return device
    import torch

    return "cuda" if torch.cuda.is_available() else "cpu"


def _measure(loaded: Any, methods: list[Any], ctxs: tuple[int, ...], bs: tuple[int, ...], new_tokens: int,
             warmup: int, progress: Any) -> list[Any]:
    """One :class:`~kvtune.eval.speed.SpeedResult` (or an error dict) per method x length x batch."""
    from kvtune.eval.speed import decode_speed

    results: list[Any] = []
    total = len(methods) * len(ctxs) * len(bs)
    for m in methods:
        why = m.unavailable()
        for length in ctxs:
            for b in bs:
                if why is None:
                    results.append(decode_speed(loaded, m, length, b, new_tokens, warmup))
                else:
                    results.append({"name": m.name, "length": length, "batch": b, "error": why})
                if progress:
                    progress(f"{m.name} {length}x{b}", len(results), total)
    return results


def register(cli: click.Group) -> None:
    @cli.command()
    @click.option("--plan", default=None, help="Plan directory or preset name to benchmark with the baselines.")
    @click.option("--baselines", default="hf-dynamic,fp16,kivi-2bit,kv4", show_default=True,
                  help="Comma-separated baselines (hf-dynamic = transformers' uncompressed cache).")
    @click.option("--model", default=DEFAULT_MODEL, show_default=True, help="Model name or local HF directory.")
    @click.option("--lengths", default="256,1024", show_default=True, help="Comma-separated context lengths.")
    @click.option("--batch", "batches", default="1,4", show_default=True, help="Comma-separated batch sizes.")
    @click.option("--new-tokens", type=click.IntRange(min=1), default=16, show_default=True,
                  help="Timed decode steps.")
    @click.option("--warmup", type=click.IntRange(min=0), default=2, show_default=True, help="Untimed decode steps.")
    @click.option("--device", default="auto", show_default=True, help="auto (cuda when present), cpu or cuda.")
    @click.option("--dtype", default=None, help="Model dtype (default: float32 on cpu, float16 on cuda).")
    @click.option("--json", "json_path", type=click.Path(dir_okay=False), default=None, help="Write results as JSON.")
    @click.option("--threads", type=click.IntRange(min=1), default=None,
                  help="torch intra-op CPU threads (default: torch's choice; 1 helps on a busy machine).")
    @click.option("--no-progress", is_flag=True, help="No progress bar.")
    def bench(plan: str | None, baselines: str, model: str, lengths: str, batches: str, new_tokens: int, warmup: int,
              device: str, dtype: str | None, json_path: str | None, threads: int | None,
              no_progress: bool) -> None:
        """Decode ms/token, tokens/s, peak memory and cache bytes for each method, context length and batch.

        The default CPU run (5 methods with --plan, 2 lengths, 2 batches) takes about a minute on 2 cores.
        """
        from kvtune.eval.speed import device_info
        from kvtune.io import write_text_atomic
        from kvtune.models import load_model

        methods = method_rows(plan, baselines)
        ctxs, bs = split_list(lengths, int, "--lengths"), split_list(batches, int, "--batch")
        if not methods:
            raise KVTuneError("nothing to benchmark", "pass --plan or --baselines")
        if not ctxs or not bs or min(ctxs) < 1 or min(bs) < 1:
            raise KVTuneError("--lengths and --batch need positive integers")
        set_threads(threads)
        device = _device(device)
        loaded, _ = load_model(model, device=device,
                               dtype=dtype or ("float16" if device.startswith("cuda") else "float32"))
        limit = getattr(loaded.config, "max_position_embeddings", None)
        if limit and max(ctxs) + warmup + new_tokens > limit:
            raise KVTuneError(f"length {max(ctxs)} + {warmup + new_tokens} decode steps exceeds the model's limit "
                              f"of {limit} tokens", "use shorter --lengths")
        info = device_info(loaded.device)
        with progress_bar(not no_progress) as progress:
            results = _measure(loaded, methods, ctxs, bs, new_tokens, warmup, progress)
        console().print(bench_table(results, info))
        for note in sorted({f"note: {r['name']} not run: {r['error']}" for r in results if isinstance(r, dict)}):
            console().print(note)
        if json_path:
            rows = [r if isinstance(r, dict) else r.to_dict() for r in results]
            write_text_atomic(json_path, json.dumps({"schema_version": 1, **info, "model": model,
                                                     "new_tokens": new_tokens, "warmup": warmup, "rows": rows},
                                                    indent=2) + "\n")
            console(stderr=True).print(f"wrote {json_path}")
