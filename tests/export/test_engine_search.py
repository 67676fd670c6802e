"""``kvtune search --target``: the engine-constrained space, solved within the budget, exportable exactly."""

from __future__ import annotations

from pathlib import Path

import pytest

from kvtune.errors import KVTuneError
from kvtune.export import export, get_target
from kvtune.search.engine import engine_search


@pytest.mark.parametrize(("target", "budget"), [("vllm", 12.0), ("llama.cpp", 6.0), ("modelopt", 10.0),
                                                ("sglang", 8.5), ("compressed-tensors", 8.5)])
def test_engine_search_fits_the_budget_and_exports_exactly(target: str, budget: float, calib_dir: Path,
                                                           model_dir: Path, tmp_path: Path) -> None:
    result = engine_search(calib_dir, budget, target, tmp_path / "plan")
    assert result.effective_bits <= budget and result.predicted_kl >= 0
    assert all(t["bits"] > budget or t["predicted_kl"] >= result.predicted_kl - 1e-12 for t in result.tried)
    assert get_target(target).layers(result.config) == result.plan.layers
    exported = export(tmp_path / "plan", target, tmp_path / "out", model=str(model_dir), calib=calib_dir)
    assert exported.exact and exported.engine_bits == pytest.approx(result.effective_bits)


def test_llama_cpp_picks_k_and_v_apart(calib_dir: Path, tmp_path: Path) -> None:
    result = engine_search(calib_dir, 6.0, "llama.cpp")
    assert len(result.tried) == 49  # 7 K types x 7 V types
    assert result.config.key[0] != "f16" and result.config.value[0] != "f16"


def test_vllm_skips_layers_when_the_budget_allows(calib_dir: Path) -> None:
    tight, loose = engine_search(calib_dir, 8.2, "vllm"), engine_search(calib_dir, 13.0, "vllm")
    assert not tight.config.skipped() and loose.config.skipped()
    assert loose.predicted_kl <= tight.predicted_kl


def test_impossible_budget_is_one_line(calib_dir: Path) -> None:
    with pytest.raises(KVTuneError, match="no configuration within 3 bits"):
        engine_search(calib_dir, 3.0, "sglang")


def test_cli_target_option(calib_dir: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str],
                           monkeypatch: pytest.MonkeyPatch) -> None:
    from kvtune.cli import main

    monkeypatch.setenv("COLUMNS", "200")
    assert main(["search", "--budget", "6bit", "--calib", str(calib_dir), "--out", str(tmp_path / "p"),
                 "--target", "llama.cpp"]) == 0
    out = " ".join(capsys.readouterr().out.split())
    assert "kvtune search --target llama.cpp" in out and "kvtune export" in out
    assert (tmp_path / "p" / "plan.yaml").is_file()
