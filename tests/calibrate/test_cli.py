"""``kvtune calibrate`` through ``kvtune.cli.main`` on a saved tiny model: output, reuse, and user errors
(exit code 2, one line on stderr, nothing written)."""

from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Any

import pytest

from kvtune.calibrate.artifact import CALIB_TENSORS, CALIB_YAML, load_calibration, save_calibration
from kvtune.cli import main

TEXT = "def f(x):\n    return x * 2  # doubles its argument\n" * 40  # 2,040 characters = tokens


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A tiny random Llama (max 512 positions) with a character-level tokenizer, saved as an HF directory."""
    from tokenizers import Tokenizer, models
    from transformers import PreTrainedTokenizerFast

    from kvtune.models import tiny_model

    folder = tmp_path_factory.mktemp("tiny-llama")
    tiny_model("llama").save_pretrained(folder)
    chars = Tokenizer(models.BPE(vocab={chr(i): i for i in range(128)}, merges=[], unk_token="\x00"))
    PreTrainedTokenizerFast(tokenizer_object=chars, unk_token="\x00").save_pretrained(folder)
    return folder


@pytest.fixture
def files(model_dir: Path, tmp_path: Path) -> dict[str, Any]:
    (tmp_path / "text.txt").write_text(TEXT)
    (tmp_path / "empty.txt").write_text(" \n")
    (tmp_path / "a-file").write_text("not a directory")
    return {"model": str(model_dir), "text": str(tmp_path / "text.txt"), "empty": str(tmp_path / "empty.txt"),
            "file": str(tmp_path / "a-file"), "missing": str(tmp_path / "missing"), "out": tmp_path / "calib"}


def _calibrate(f: dict[str, Any], capsys: pytest.CaptureFixture[str], *extra: str) -> tuple[int, str, str]:
    args = ["calibrate", "--model", f["model"], "--data", f["text"], "--tokens", "1024", "--seq-len", "256",
            "--out", str(f["out"]), "--device", "cpu", *extra]  # later options win
    rc = main(args)
    captured = capsys.readouterr()
    return rc, captured.out, captured.err


def test_writes_summary_then_reuses(files: dict[str, Any], capsys: pytest.CaptureFixture[str]) -> None:
    rc, out, err = _calibrate(files, capsys)
    assert rc == 0, err
    assert {p.name for p in files["out"].iterdir()} == {CALIB_YAML, CALIB_TENSORS}
    for label in ("written in", "1,024 (4 x 256)", "attention sinks", "outlier keys pre-RoPE", "head patterns",
                  "sensitive: K 2b", "KL: V 2b"):
        assert label in out, label
    for stage in ("load model", "stats (chunks)", "sensitivity (layers)", "KL (layers)", "tok/s", "ETA"):
        assert stage in err, stage
    assert load_calibration(files["out"]).summary["tokens_used"] == 1024
    rc, out, _ = _calibrate(files, capsys, "--no-progress")
    assert rc == 0 and "reused" in out


@pytest.mark.parametrize(("change", "message"), [
    (("--model", "{missing}"), "model not found"),
    (("--model", "{text}"), "model not found"),
    (("--data", "{empty}"), "is empty"),
    (("--data", "{missing}"), "text file not found"),
    (("--tokens", "100"), "less than one sequence"),
    (("--tokens", "0"), "--tokens"),
    (("--seq-len", "1024", "--tokens", "4096"), "exceeds the model's context of 512"),
    (("--data", "pydoc:nope"), "unknown text source"),
    (("--device", "tpu"), "unknown device"),
    (("--out", "{file}"), "not a directory"),
])
def test_bad_input_is_one_line_exit_2_nothing_written(files: dict[str, Any], capsys: pytest.CaptureFixture[str],
                                                      change: tuple[str, ...], message: str) -> None:
    rc, out, err = _calibrate(files, capsys, *(c.format(**files) for c in change))
    assert rc == 2 and out == ""
    assert len(err.splitlines()) == 1 and err.startswith("error: ") and message in err, err
    assert not files["out"].exists()
    assert Path(files["file"]).read_text() == "not a directory"


def test_out_dir_of_another_model_is_kept(files: dict[str, Any], capsys: pytest.CaptureFixture[str],
                                          tiny_calibration: Any) -> None:
    other = dataclasses.replace(tiny_calibration, model={**tiny_calibration.model, "fingerprint": "f" * 16})
    save_calibration(other, files["out"])
    before = {p.name: p.read_bytes() for p in files["out"].iterdir()}
    rc, out, err = _calibrate(files, capsys)
    assert rc == 2 and out == "" and len(err.splitlines()) == 1 and "another model" in err and "--force" in err
    assert {p.name: p.read_bytes() for p in files["out"].iterdir()} == before
    rc, _, err = _calibrate(files, capsys, "--force", "--no-progress")
    assert rc == 0, err
    assert load_calibration(files["out"]).fingerprint != "f" * 16
