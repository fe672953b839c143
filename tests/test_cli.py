"""The command line: --help for every command, one-line errors with a non-zero exit, from any directory."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
import tomllib
from pathlib import Path

import pytest
import redis

from clickrank.cli import EXTRA_OF_MODULE, main
from models.data import DATA_DIR_ENV

REPO = Path(__file__).resolve().parent.parent
COMMANDS = ["train", "evaluate", "serve", "load-history"]
CLI_TIMEOUT_S = 300
"""A guard against a hung command, not a speed check: ``evaluate --tiny`` fits three small models (the ID-only
baseline and clickrank's two), which took over 120 s on the 2-core machine while other training runs shared
it."""


def run_cli(
    *args: str, cwd: Path | None = None, env: dict[str, str] | None = None, absent: str | None = None
) -> subprocess.CompletedProcess:
    """``clickrank ARGS`` from this checkout in a fresh interpreter, run in ``cwd``, with ``env`` added to
    the environment (CLICKRANK_DATA_DIR removed unless given) and the module ``absent`` made unimportable."""
    environ = {k: v for k, v in os.environ.items() if k != DATA_DIR_ENV}
    environ |= {"PYTHONPATH": str(REPO), **(env or {})}
    shim = f"sys.modules[{absent!r}] = None; " if absent else ""
    code = f"import sys; {shim}from clickrank.cli import main; sys.exit(main(sys.argv[1:]))"
    return subprocess.run(
        [sys.executable, "-c", code, *args],
        capture_output=True,
        text=True,
        timeout=CLI_TIMEOUT_S,
        cwd=cwd,
        env=environ,
    )


def one_line_error(result: subprocess.CompletedProcess) -> str:
    """The single stderr line of a command that failed the expected way (exit status 2, no traceback)."""
    assert result.returncode == 2, (result.returncode, result.stderr)
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1, result.stderr
    assert re.match(r"clickrank( [a-z-]+)?: error: ", lines[0]), lines[0]
    return lines[0]


@pytest.mark.parametrize("command", COMMANDS)
def test_help(command: str) -> None:
    result = run_cli(command, "--help")
    assert result.returncode == 0
    assert "--data-dir" in result.stdout or "--host" in result.stdout


def test_missing_data_dir_is_one_line(tmp_path: Path) -> None:
    result = run_cli("train", "--data-dir", str(tmp_path / "absent"), "--model-dir", str(tmp_path / "m"))
    assert "absent: data directory not found" in one_line_error(result)


def test_malformed_data_is_one_line(tmp_path: Path) -> None:
    (tmp_path / "u.item").write_text("1|Toy Story|x\n")
    (tmp_path / "u.data").write_text("1\t1\t5\t10\n")
    result = run_cli("train", "--data-dir", str(tmp_path), "--model-dir", str(tmp_path / "m"))
    assert "u.item:1:" in one_line_error(result)


def test_evaluate_without_a_model_says_what_to_do(tmp_path: Path, data_dir: Path) -> None:
    result = run_cli("evaluate", "--seeds", "0", "--data-dir", str(data_dir), "--model-dir", str(tmp_path))
    assert "run `clickrank train` first" in one_line_error(result)


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


def test_unknown_argument_is_one_line_from_any_directory(tmp_path: Path) -> None:
    """Parsing looks for no data set: a bad argument is reported as such wherever the command runs."""
    line = one_line_error(run_cli("train", "--bogus", cwd=tmp_path))
    assert "unrecognized arguments: --bogus" in line and "not found" not in line


def test_bad_argument_value_is_one_line(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["train", "--seed", "x"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err == [
        "clickrank train: error: argument --seed: invalid int value: 'x' (see clickrank train --help)"
    ]


def test_help_through_main_exits_zero(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["load-history", "--help"]) == 0
    assert f"${DATA_DIR_ENV}" in capsys.readouterr().out


def test_the_saved_table_prints_from_any_directory(model_dir: Path, tmp_path: Path) -> None:
    """``evaluate --seeds 0`` reads the model's table, not the data set: no data dir is needed."""
    result = run_cli("evaluate", "--seeds", "0", "--model-dir", str(model_dir), cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    assert "| clickrank (BERT + transformer) |" in result.stdout


def test_an_absent_default_data_dir_is_reported_when_a_command_reads_it(tmp_path: Path) -> None:
    absent = tmp_path / "nowhere"
    line = one_line_error(run_cli("load-history", cwd=tmp_path, env={DATA_DIR_ENV: str(absent)}))
    assert f"{absent}: data directory not found" in line
    line = one_line_error(run_cli("load-history", cwd=tmp_path))
    assert "../shared/data/ml-100k: data directory not found" in line and DATA_DIR_ENV in line


def test_the_data_dir_defaults_to_the_environment(
    data_dir: Path,
    redis_url: str,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
) -> None:
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv(DATA_DIR_ENV, str(data_dir))
    monkeypatch.setenv("CLICKRANK_REDIS_URL", redis_url)
    assert main(["load-history", "--limit", "20"]) == 0
    assert "20 events" in capsys.readouterr().out
    with redis.Redis.from_url(redis_url) as client:
        assert client.exists("cr:trend")


@pytest.mark.parametrize(("absent", "extra"), [("torch", "train"), ("onnxruntime", "cpu")])
def test_a_missing_extra_names_what_to_install(
    absent: str, extra: str, data_dir: Path, tmp_path: Path
) -> None:
    """``pip install .[cpu]`` has no torch, ``.[train]`` alone no onnxruntime: ``train`` says which extra."""
    result = run_cli("train", "--data-dir", str(data_dir), "--model-dir", str(tmp_path), absent=absent)
    line = one_line_error(result)
    assert f"{absent} is not installed; install the {extra} extra: pip install 'clickrank[{extra}]'" in line
    assert not (tmp_path / "manifest.json").exists()


def test_a_missing_core_module_is_a_bug_not_a_hint(data_dir: Path) -> None:
    result = run_cli("load-history", "--data-dir", str(data_dir), absent="redis")
    assert result.returncode == 1 and "ModuleNotFoundError" in result.stderr


def test_the_extras_of_the_hints_are_the_packaged_ones() -> None:
    extras = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]["optional-dependencies"]
    names = {
        extra: {re.split(r"[<>=\[;\s]", req, maxsplit=1)[0].replace("-", "_") for req in reqs}
        for extra, reqs in extras.items()
    }
    assert {module for module, extra in EXTRA_OF_MODULE.items() if module not in names[extra]} == set()
    assert names["train"] <= set(EXTRA_OF_MODULE), "a train dependency the CLI would not name"
