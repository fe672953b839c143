"""loadtests.ranking_alone against the real parts: a private redis-server, the tiny exported model, the
MovieLens histories loaded by the service's own loader; one short round at two concurrencies."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from loadtests import ranking_alone


def test_ranking_alone_reports_a_rate_and_the_cpu_of_each_thread(
    model_dir: Path, data_dir: Path, tmp_path: Path
) -> None:
    out = tmp_path / "report"
    argv = ["--model-dir", str(model_dir), "--data-dir", str(data_dir), "--requests", "40"]
    assert ranking_alone.main([*argv, "--concurrency", "1,4", "--rounds", "1", "--out", str(out)]) == 0
    report = json.loads((out / "report.json").read_text())
    assert report["requests_a_round"] == 40
    assert set(report["rounds_by_concurrency"]) == {"1", "4"}
    for rounds in report["rounds_by_concurrency"].values():
        (figures,) = rounds
        assert figures["recommends_per_s"] > 0
        # The loop's thread is one of the process's threads: its CPU is part of the process's.
        assert 0 < figures["loop_thread_cpu_us"] <= figures["process_cpu_us"]


def test_a_missing_data_set_is_one_line_and_status_2(
    model_dir: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    argv = ["--model-dir", str(model_dir), "--data-dir", str(tmp_path / "missing")]
    assert ranking_alone.main(argv) == 2
    (line,) = capsys.readouterr().err.strip().splitlines()
    assert line.startswith("loadtests.ranking_alone: error:")
