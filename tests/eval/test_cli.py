"""``kvtune eval`` / ``kvtune bench`` on a tiny saved model directory: tables, JSON, one-line errors."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest

from kvtune.cli import main


@pytest.fixture(autouse=True)
def wide_terminal(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("COLUMNS", "250")


def test_eval_cli_table_and_json(tiny_dir: Path, text_file: Path, tmp_path: Path, capsys: Any) -> None:
    out = tmp_path / "results.json"
    rc = main(["eval", "--plan", "kivi-2bit", "--baselines", "fp16,kivi-2bit,kv4",
               "--model", str(tiny_dir), "--data", str(text_file), "--ctx", "128", "--chunk", "32",
               "--gen-tokens", "8", "--passkey-lengths", "128", "--passkey-depths", "0.5", "--json", str(out),
               "--plot", str(tmp_path / "q.png"), "--no-progress"])
    text = capsys.readouterr().out
    assert rc == 0
    assert "kivi-2bit (plan)" in text and "kv4" in text and "fp16" in text and "Δppl" in text
    data = json.loads(out.read_text())
    assert [r["name"] for r in data["rows"]] == ["kivi-2bit", "fp16", "kv4"]  # the plan's duplicate row dropped
    assert data["rows"][0]["is_plan"] and all(r["error"] is None for r in data["rows"])
    assert data["rows"][1]["kl"] == pytest.approx(0.0, abs=1e-5)
    assert set(data["rows"][0]["passkey_by_length"]) == {"128"}
    assert (tmp_path / "q.png").stat().st_size > 0


def _other_model_plan(path: Path) -> Path:
    """A kv4 plan saved for a 3-layer model (the tiny test model has 2 layers)."""
    from dataclasses import replace

    from kvtune.plan import load_plan, save_plan
    from kvtune.plan_types import ModelIdentity

    plan = load_plan("kv4")
    bound = replace(plan, layers=plan.layers * 3 if len(plan.layers) == 1 else plan.layers[:1] * 3,
                    model=ModelIdentity("LlamaForCausalLM", 3, 4, 2, 16), name="other")
    return save_plan(bound, path)


@pytest.mark.parametrize(("args", "message"), [
    (["--baselines", "kv4,kv5"], "unknown baseline 'kv5'"),
    (["--ctx", "4096"], "beyond the model's limit of 512"),
    (["--ctx", "500", "--data", "SHORT"], "fewer than --ctx"),
    (["--plan", "no-such-plan"], "no plan directory or preset"),
    (["--plan", "OTHER"], "another model"),
])
def test_eval_cli_errors(tiny_dir: Path, text_file: Path, tmp_path: Path, capsys: Any, args: list[str],
                         message: str) -> None:
    short = tmp_path / "short.txt"
    short.write_text("w1 w2 w3", encoding="utf-8")
    files = {"SHORT": str(short), "OTHER": str(_other_model_plan(tmp_path / "other-plan"))}
    base = {"--plan": "kv4", "--baselines": "fp16", "--model": str(tiny_dir), "--data": str(text_file), "--ctx": "64"}
    for k, v in zip(args[::2], args[1::2]):
        base[k] = files.get(v, v)
    rc = main(["eval", *[x for kv in base.items() for x in kv], "--no-progress"])
    err = capsys.readouterr().err
    assert rc == 2 and message in err and "Traceback" not in err


def test_bench_cli(tiny_dir: Path, tmp_path: Path, capsys: Any) -> None:
    out = tmp_path / "bench.json"
    rc = main(["bench", "--plan", "kv4", "--baselines", "hf-dynamic,kv4", "--model", str(tiny_dir),
               "--lengths", "32,64", "--batch", "1,2", "--new-tokens", "3", "--warmup", "1", "--json", str(out),
               "--no-progress"])
    assert rc == 0 and "ms/token" in capsys.readouterr().out
    data = json.loads(out.read_text())
    assert len(data["rows"]) == 2 * 2 * 2 and data["device"] == "cpu"
    row = data["rows"][0]
    assert row["name"] == "kv4" and row["ms_per_token"] > 0 and row["peak_memory_bytes"] > 0 and row["cache_bytes"] > 0


def test_eval_rows_in_worker_processes_equal_the_serial_rows(tiny_dir: Path, text_file: Path, tmp_path: Path,
                                                             capsys: Any) -> None:
    """--jobs 2 (forked workers) gives the same numbers as --jobs 1, rows in the same order."""
    rows = {}
    for jobs in ("1", "2"):
        out = tmp_path / f"r{jobs}.json"
        rc = main(["eval", "--plan", "kivi-2bit", "--baselines", "fp16,kv2,k4v2", "--model", str(tiny_dir),
                   "--data", str(text_file), "--ctx", "96", "--chunk", "16", "--gen-tokens", "4",
                   "--passkey-lengths", "96", "--passkey-depths", "0.5", "--jobs", jobs, "--json", str(out),
                   "--no-progress"])
        assert rc == 0
        data = json.loads(out.read_text())
        assert data["settings"]["jobs"] == int(jobs)
        rows[jobs] = [{k: v for k, v in r.items() if k != "seconds"} for r in data["rows"]]
    capsys.readouterr()
    assert [r["name"] for r in rows["2"]] == ["kivi-2bit", "fp16", "kv2", "k4v2"]
    assert rows["1"] == rows["2"]
