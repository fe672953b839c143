"""deploy/grafana in step with the service: every series a panel queries is one a running app exports
(real Redis, real exported model) with the labels the query matches on, every metric the service exports
is on the dashboard, every query parses as PromQL (promtool, where installed: CI installs it), and the
compose file's Grafana loads the dashboard over the compose Prometheus."""

from __future__ import annotations

import json
import re
import shutil
from pathlib import Path
from urllib.parse import urlsplit

import pytest
import yaml
from promql import check_selectors, exported, label_names, promtool_check_expressions, selectors

REPO = Path(__file__).resolve().parents[1]
GRAFANA = REPO / "deploy" / "grafana"
DASHBOARD = GRAFANA / "dashboards" / "clickrank.json"
DATASOURCES = GRAFANA / "provisioning" / "datasources" / "prometheus.yaml"
PROVIDERS = GRAFANA / "provisioning" / "dashboards" / "clickrank.yaml"
VARIABLES = {"$__rate_interval": "5m", "$instance": ".*"}
"""Grafana's variables in the queries, as Prometheus would get them (``$instance``: every replica)."""
REPLICA_FILTER = 'instance=~"$instance"'


def panels() -> list[dict]:
    return json.loads(DASHBOARD.read_text())["panels"]


def queries() -> dict[str, str]:
    """``panel N target X`` → its PromQL, Grafana's variables substituted."""
    found = {}
    for panel in panels():
        for target in panel["targets"]:
            expr = target["expr"]
            for variable, value in VARIABLES.items():
                expr = expr.replace(variable, value)
            assert "$" not in expr, f"{panel['title']}: a variable the test does not know: {expr}"
            found[f"panel_{panel['id']}_{target['refId']}"] = expr
    return found


def variables() -> dict[str, dict]:
    return {v["name"]: v for v in json.loads(DASHBOARD.read_text())["templating"]["list"]}


def test_panels_are_laid_out_and_use_the_chosen_data_source() -> None:
    """Every panel and query reads the ``datasource`` variable, a Prometheus one that starts on the data
    source the compose Grafana provisions; the replica variable lists what the service exports."""
    provisioned = yaml.safe_load(DATASOURCES.read_text())["datasources"][0]
    source, replica = variables()["datasource"], variables()["instance"]
    assert (source["type"], source["query"]) == ("datasource", provisioned["type"])
    assert source["current"]["value"] == provisioned["uid"]
    assert replica["includeAll"] and replica["allValue"] == ".*"
    assert replica["datasource"]["uid"] == "${datasource}"
    assert replica["query"]["query"] == "label_values(clickrank_model_info, instance)"
    cells = set()
    for panel in panels():
        assert panel["targets"], panel["title"]
        assert panel["datasource"]["uid"] == "${datasource}"
        assert all(t["datasource"]["uid"] == "${datasource}" for t in panel["targets"]), panel["title"]
        grid = panel["gridPos"]
        assert grid["x"] + grid["w"] <= 24, panel["title"]  # Grafana's grid is 24 wide
        cell = (grid["x"], grid["y"])
        assert cell not in cells, f"{panel['title']} overlaps another panel"
        cells.add(cell)
    assert len({p["id"] for p in panels()}) == len(panels())


@pytest.mark.anyio
async def test_panels_read_what_the_service_exports(
    redis_url: str, model_dir: Path, catalog: list[str]
) -> None:
    exposition, routes = await exported(redis_url, model_dir, catalog)
    for where, expr in queries().items():
        check_selectors(where, expr, exposition, routes)
    # Every metric of the service has a panel: a new metric is shown, or this test says it is not.
    shown = {name for expr in queries().values() for name, _ in selectors(expr)}
    for family in label_names():
        samples = {family + suffix for suffix in ("", "_total", "_bucket", "_sum", "_count")}
        assert shown & samples, f"{family} is on no panel of the dashboard"


def test_every_series_a_panel_reads_is_filtered_to_the_chosen_replicas() -> None:
    for panel in panels():
        for target in panel["targets"]:
            series = re.findall(r"\b(?:clickrank_[a-z0-9_]+|up)(?:\{[^}]*\})?(?=[\s\[)]|$)", target["expr"])
            assert series, panel["title"]
            unfiltered = [s for s in series if REPLICA_FILTER not in s]
            assert not unfiltered, f"{panel['title']}: {unfiltered} is not filtered by replica"


def test_queries_parse_as_promql(tmp_path: Path) -> None:
    if shutil.which("promtool") is None:
        pytest.skip("promtool not installed (apt-get install prometheus); CI runs it")
    promtool_check_expressions(queries(), tmp_path)


def test_compose_grafana_loads_the_dashboard_over_the_compose_prometheus() -> None:
    services = yaml.safe_load((REPO / "docker-compose.yml").read_text())["services"]
    grafana, prometheus = services["grafana"], services["prometheus"]
    assert grafana["profiles"] == prometheus["profiles"] == ["monitoring"]
    mounts = {v.split(":")[1]: (REPO / v.split(":")[0]).resolve() for v in grafana["volumes"] if "/" in v}
    assert mounts["/etc/grafana/provisioning"] == GRAFANA / "provisioning"
    provider_path = yaml.safe_load(PROVIDERS.read_text())["providers"][0]["options"]["path"]
    assert mounts[provider_path] == DASHBOARD.parent
    home = grafana["environment"]["GF_DASHBOARDS_DEFAULT_HOME_DASHBOARD_PATH"]
    assert home == f"{provider_path}/{DASHBOARD.name}"
    source = urlsplit(yaml.safe_load(DATASOURCES.read_text())["datasources"][0]["url"])
    assert source.hostname == "prometheus" and f"{source.port}:{source.port}" in prometheus["ports"]
    assert "prometheus" in grafana["depends_on"]
