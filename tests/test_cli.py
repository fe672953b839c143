"""The command line: --help for every command, one-line errors with a non-zero exit."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

COMMANDS = ["train", "evaluate", "serve", "load-history"]


def run_cli(*args: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "clickrank.cli", *args], capture_output=True, text=True, timeout=120, env=env
    )


@pytest.mark.parametrize("command", COMMANDS)
def test_help(command: str) -> None:
    result = run_cli(command, "--help")
    assert result.returncode == 0
    assert "--data-dir" in result.stdout or "--host" in result.stdout


def test_missing_data_dir_is_one_line(tmp_path: Path) -> None:
    result = run_cli("train", "--data-dir", str(tmp_path / "absent"), "--model-dir", str(tmp_path / "m"))
    assert result.returncode == 2
    assert "directory not found" in result.stderr
    assert "Traceback" not in result.stderr


def test_malformed_data_is_one_line(tmp_path: Path) -> None:
    (tmp_path / "u.item").write_text("1|Toy Story|x\n")
    (tmp_path / "u.data").write_text("1\t1\t5\t10\n")
    result = run_cli("train", "--data-dir", str(tmp_path), "--model-dir", str(tmp_path / "m"))
    assert result.returncode == 2
    assert result.stderr.strip().count("\n") == 0, result.stderr
    assert "u.item:1:" in result.stderr


def test_evaluate_without_a_model_says_what_to_do(tmp_path: Path, data_dir: Path) -> None:
    result = run_cli("evaluate", "--seeds", "0", "--data-dir", str(data_dir), "--model-dir", str(tmp_path))
    assert result.returncode == 2
    assert "run `clickrank train` first" in result.stderr


def test_evaluate_prints_the_saved_table(model_dir: Path, data_dir: Path, tmp_path: Path) -> None:
    out = tmp_path / "table.json"
    result = run_cli(
        "evaluate",
        "--seeds",
        "0",
        "--data-dir",
        str(data_dir),
        "--model-dir",
        str(model_dir),
        "--json",
        str(out),
    )
    assert result.returncode == 0, result.stderr
    assert "| popularity |" in result.stdout and "| clickrank (BERT + transformer) |" in result.stdout
    assert out.is_file()


def test_evaluate_runs_the_whole_harness(data_dir: Path, tmp_path: Path) -> None:
    out = tmp_path / "harness.json"
    result = run_cli("evaluate", "--tiny", "--data-dir", str(data_dir), "--json", str(out))
    assert result.returncode == 0, result.stderr
    for row in ("popularity", "id-only transformer", "clickrank (BERT + transformer)"):
        assert f"| {row} |" in result.stdout
    saved = json.loads(out.read_text())
    assert saved["seeds"] == 1 and len(saved["per_seed"]) == 1
    assert 0.0 < saved["mean"]["clickrank (BERT + transformer)"]["warm"]["NDCG@10"] <= 1.0


def test_unknown_argument_exits_non_zero() -> None:
    result = run_cli("train", "--bogus")
    assert result.returncode == 2
    assert "unrecognized arguments" in result.stderr
