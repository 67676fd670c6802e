"""``kvtune search`` end to end through the CLI: outputs, summary, re-solve, and one-line errors (exit code 2)."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest

from kvtune.cli import main
from kvtune.plan import load_plan


@pytest.fixture(autouse=True)
def _wide(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("COLUMNS", "250")  # rich wraps at 80 columns without a terminal


def _run(capsys: pytest.CaptureFixture[str], *args: str) -> tuple[int, str, str]:
    code = main(["search", "--no-progress", *args])
    out, err = capsys.readouterr()
    return code, out, err


def test_search_command_writes_everything(tmp_path: Path, tiny_calib: Path, capsys: pytest.CaptureFixture[str]) -> None:
    out = tmp_path / "plan"
    code, text, err = _run(capsys, "--budget", "3bit", "--calib", str(tiny_calib), "--out", str(out),
                           "--trials", "25", "--validate", "0", "--seed", "1")
    assert code == 0, err
    for name in ("plan.yaml", "plan.safetensors", "pareto.json", "pareto.png", "bits.png", "study.db"):
        assert (out / name).is_file(), name
    plan = load_plan(out)
    assert plan.effective_bits() <= 3.0
    assert "searched" in text and f"{plan.effective_bits():.4f}" in text and "chosen by the proxy" in text
    # re-solve the same study at a lower budget, without the calibration and without new trials
    code, text, err = _run(capsys, "--budget", "2.5", "--out", str(out), "--trials", "0", "--validate", "0",
                           "--calib", str(tmp_path / "gone"))
    assert code == 0, err
    assert load_plan(out).effective_bits() <= 2.5 and "(0 trials run, 25 in the study)" in " ".join(text.split())
    assert json.loads((out / "pareto.json").read_text())["budget"] == 2.5


@pytest.mark.parametrize("args, words", [
    (("--budget", "two"), "invalid budget 'two'"),
    (("--budget", "20bit"), "above 16"),
    (("--budget", "0.5bit"), "below the minimum achievable"),
    (("--budget", "3", "--calib", "{tmp}/missing"), "calibration not found"),
    (("--budget", "3", "--calib", "{tmp}/corrupt"), "do not match the checksum"),
    (("--budget", "3", "--storage", "postgresql://u:pw@127.0.0.1:9/db"), "cannot open storage"),
    (("--budget", "3", "--storage", "nosuch://x"), "cannot open storage"),
    (("--budget", "3", "--model", "{tmp}/other"), "calibration was made for another model"),
    (("--budget", "3", "--trials", "0", "--out", "{tmp}/nothing"), "no study.db in"),
])
def test_bad_input_is_one_line(tmp_path: Path, tiny_calib: Path, capsys: pytest.CaptureFixture[str],
                               args: tuple[str, ...], words: str) -> None:
    if "postgresql" in " ".join(args):
        pytest.importorskip("psycopg2")
    corrupt = tmp_path / "corrupt"
    shutil.copytree(tiny_calib, corrupt)
    with open(corrupt / "calib.safetensors", "r+b") as fh:
        fh.seek(200)
        fh.write(b"\x00\x01\x02")
    if "{tmp}/other" in args:
        from kvtune.models import tiny_model

        tiny_model("llama", layers=3).config.save_pretrained(tmp_path / "other")
    (tmp_path / "nothing").mkdir()
    full = [a.replace("{tmp}", str(tmp_path)) for a in args]
    if "--calib" not in full:
        full += ["--calib", str(tiny_calib)]
    if "--out" not in full:
        full += ["--out", str(tmp_path / "out")]
    code, _, err = _run(capsys, *full, "--trials", "5", "--validate", "0") if "--trials" not in full else \
        _run(capsys, *full, "--validate", "0")
    assert code == 2
    lines = err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: ") and words in lines[0], err
    assert "pw" not in err


def test_other_space_leaves_the_study_alone(tmp_path: Path, tiny_calib: Path,
                                            capsys: pytest.CaptureFixture[str]) -> None:
    out = tmp_path / "o"
    base = ("--budget", "3", "--calib", str(tiny_calib), "--out", str(out), "--validate", "0")
    assert _run(capsys, *base, "--trials", "10")[0] == 0
    wal = out / "study.db-wal"  # the command checkpoints SQLite's write-ahead log: study.db alone holds the study
    assert not wal.exists() or wal.stat().st_size == 0
    before = (out / "study.db").read_bytes()
    code, _, err = _run(capsys, *base, "--trials", "10", "--granularity", "head")
    assert code == 2 and "another search space (granularity differ)" in err
    assert (out / "study.db").read_bytes() == before
