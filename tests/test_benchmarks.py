"""The benchmark scripts run on CPU (tiny smoke case) and the committed GPU results render as tables."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

BENCH = Path(__file__).resolve().parents[1] / "benchmarks"


@pytest.fixture()
def bench_path(monkeypatch: pytest.MonkeyPatch) -> Path:
    monkeypatch.syspath_prepend(str(BENCH))
    return BENCH


def test_e2e_quick_on_cpu(bench_path: Path, tmp_path: Path) -> None:
    import bench_e2e

    out = tmp_path / "e2e.json"
    assert bench_e2e.main(["--quick", "--methods", "hf-dynamic,kivi-2bit", "--batches", "1", "--out", str(out)]) == 0
    rows = {r["method"]: r for r in json.loads(out.read_text())["rows"]}
    assert set(rows) == {"hf-dynamic", "kivi-2bit"}
    fp16, kivi = rows["hf-dynamic"], rows["kivi-2bit"]
    assert fp16["tokens_per_s"] > 0 and kivi["tokens_per_s"] > 0
    # the kvtune cache holds exactly the bytes the bit accountant counts, far fewer than fp16's
    assert kivi["cache_bytes_used"] < fp16["fp16_cache_bytes"]
    assert kivi["bits_per_element_held"] == pytest.approx(kivi["effective_bits_accountant"], rel=0.01)


def test_summarize_renders_the_committed_results(bench_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    import summarize

    summarize.main(["--device", "h200"])
    out = capsys.readouterr().out
    assert "| llama3-8b | 8 | 32k | kvtune-k2v2 |" in out
    assert "kernel_vs_reference_h200.json: kv2 lockstep B=1 64 steps: tokens equal True" in out
    assert "| llama3-8b | normq2-log8 | 8 | 168 |" in out  # the offline sm_90 builds


def test_format_choices_rows(bench_path: Path) -> None:
    """Centering helps per-token formats on data with a per-head offset, not per-channel groups; a per-layer
    k-means codebook is never worse than Lloyd-Max on the data it starts from."""
    import format_choices
    import torch

    gen = torch.Generator().manual_seed(0)
    layers = [(torch.randn(2, 256, 64, generator=gen) + 3 * torch.randn(2, 1, 64, generator=gen),
               torch.randn(2, 256, 64, generator=gen) + torch.randn(2, 1, 64, generator=gen)) for _ in range(2)]
    rows = {(r["role"], r["spec"]): r for r in format_choices.centering_rows(layers)}
    assert rows[("key", "2b/norm/uniform+h")]["reduction_pct"] > 30
    assert abs(rows[("key", "2b/ch/g128")]["reduction_pct"]) < 1
    for r in format_choices.codebook_rows(layers):
        assert r["mse_lloyd"] <= r["mse_uniform"] * 1.01 and r["mse_kmeans_per_layer"] <= r["mse_lloyd"] * 1.02


def test_kernel_formats_quick_on_cpu(bench_path: Path, tmp_path: Path) -> None:
    """Every format the kernel reads is built through the codec and agrees with the PyTorch reference, under the
    default launch and with 16 query rows a program."""
    import bench_kernel_formats

    out = tmp_path / "kf.json"
    assert bench_kernel_formats.main(["--quick", "--rows", "16", "--out", str(out)]) == 0
    rows = json.loads(out.read_text())["rows"]
    timed = [r for r in rows if "error" not in r]
    assert {r["format"] for r in timed} >= {"kivi2-g128", "normq2", "kivi4-g128"}
    assert {str(r["config"]) for r in timed} == {"default", "{'query_rows': 16}"}
    assert all(r["max_abs_err"] < 2e-3 and r["bits_per_element"] > 1 for r in timed)


def test_launch_count_of_a_static_step(bench_path: Path, tmp_path: Path) -> None:
    """A plain static-cache decode step of a rotated plan costs four launches a layer in the cache and attention:
    the append kernel (token rows, frames, query rotation, visible range), the row count, attention and merge."""
    from triton.runtime.interpreter import InterpretedFunction

    from kvtune.kernels import append_step

    if not isinstance(append_step._append_kernel, InterpretedFunction):
        pytest.skip("the kernels run compiled here: the count needs TRITON_INTERPRET=1")
    import bench_launches

    out = tmp_path / "launches.json"
    assert bench_launches.main(["--methods", "normq2-static-graph", "--steps", "3", "--prompt", "24",
                                "--out", str(out)]) == 0
    (row,) = json.loads(out.read_text())["rows"]
    assert row["plain"]["cache_attention_per_layer"] == 4
    assert row["plain"]["cache_attention_ops_per_layer"] == {"aten.add_": 1, "triton._append_kernel": 1,
                                                             "triton._decode_split_kernel": 1,
                                                             "triton._merge_kernel": 1}


def test_sass_report_compiles_offline(tmp_path: Path) -> None:
    """The decode kernel compiles for sm_90 on a machine without a GPU (Triton's bundled ptxas), and the report
    names its registers, spill stack and hot-loop instructions a token. Runs without the interpreter (a
    subprocess): CI exports TRITON_INTERPRET=1 for the suite."""
    import os
    import subprocess
    import sys

    triton = pytest.importorskip("triton")
    tools = Path(triton.__file__).parent / "backends" / "nvidia" / "bin"
    if not all((tools / t).exists() for t in ("ptxas", "cuobjdump", "nvdisasm")):
        pytest.skip("this triton wheel has no CUDA tools (ptxas, cuobjdump, nvdisasm)")
    out = tmp_path / "sass.json"
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env["PYTHONPATH"] = os.pathsep.join([str(BENCH.parent), env.get("PYTHONPATH", "")])
    run = subprocess.run([sys.executable, str(BENCH / "bench_sass.py"), "--shapes", "smollm2-135m", "--formats",
                          "normq2-log8", "--rows", "8", "--out", str(out)], env=env, capture_output=True, text=True,
                         timeout=600)
    assert run.returncode == 0, run.stderr[-2000:]
    (row,) = json.loads(out.read_text())["rows"]
    assert row["query_rows"] == 8 and row["d"] == 64 and row["num_warps"] in (1, 4)
    assert 0 < row["registers"] <= 255 and row["hot_loop_instructions"] > 100
    assert row["warp_instructions_per_token"] == pytest.approx(
        row["hot_loop_instructions"] * row["num_warps"] / row["block_t"], abs=0.01)
    assert row["hot_loop_top"].get("HMMA", 0) > 0  # the products run on tensor cores
