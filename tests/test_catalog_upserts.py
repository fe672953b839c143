"""loadtests.catalog_upserts, its in-process mode: each tree's ``ItemCatalog`` timed in a process of its
own, one report row per tree and size."""

from __future__ import annotations

import json
from pathlib import Path

from loadtests.catalog_upserts import REPO, main


def test_times_single_item_upserts_per_tree_and_size(tmp_path: Path) -> None:
    out = tmp_path / "report"
    assert main(["--items", "50,3000", "--repeat", "4", "--tree", f"again={REPO}", "--out", str(out)]) == 0
    report = json.loads((out / "report.json").read_text())
    runs = [(r["tree"], r["items"], r["repeat"], len(r["ms"])) for r in report["runs"]]
    assert runs == [("this", 50, 4, 4), ("again", 50, 4, 4), ("this", 3000, 4, 4), ("again", 3000, 4, 4)]
    for run in report["runs"]:
        assert 0 < run["median_ms"] <= run["p99_ms"] <= run["max_ms"] == max(run["ms"])
    assert "| this | 3,000 | 4 |" in (out / "report.md").read_text()
